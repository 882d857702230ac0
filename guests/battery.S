# battery.S - every backdoor case we care about, one stable line per result.
#
# Output format (one line per backdoor access):
#
#     <mode> <label> eax=XXXXXXXX ebx=XXXXXXXX ecx=XXXXXXXX edx=XXXXXXXX esi=XXXXXXXX edi=XXXXXXXX
#
#   <mode>   r16 (real mode), p32 (32-bit protected mode) or l64 (64-bit long mode, where
#            the registers print as rax=... with 16 hex digits)
#   <label>  <what>.<in|out><size>[@<port>]; the port is given when it is not 0x5658.
#            Examples: GETVERSION.in4, GETVERSION.out2@565a, magic.GETVERSION.in4
#   values   the registers right after the IN/OUT, lower-case hex
#
# Inputs are fixed per line: EAX = 0x564d5868 (the magic) unless the label says otherwise,
# ECX = the command, EDX = the port, ESI = EDI = 0 unless shown in the label. In 64-bit
# mode every register starts with a fixed upper half (rax a0a0a0a0, rbx b0b0b0b0,
# rcx c0c0c0c0, rdx d0d0d0d0, rsi 5e5e5e5e, rdi d1d1d1d1), so each l64 line also shows
# what the hypervisor did to the upper halves (a 4-byte IN zero-extends into RAX; Xen
# writes only the 32-bit halves of the others).
#
# Time-varying values. GETMHZ (EAX), GETHZ (EAX, EBX: the TSC frequency), GETTIME
# (EAX seconds, EBX microseconds) and GETTIMEFULL (EBX, EDX, ESI) differ between runs and
# hosts. On the main line those registers print as ******** (low 32 bits) unless the
# low 32 bits are unchanged from the input or all ones: those two outcomes
# ("not answered", "unsupported") are stable and are exactly what tests need to see. The
# raw values follow on a line that starts with "~ ", which comparisons skip:
#
#     p32 GETTIME.in4 eax=******** ebx=******** ecx=000f4240 edx=00000000 esi=00000000 edi=00000000
#     ~ p32 GETTIME.in4 eax=6790a1b2 ebx=000a3f21 ecx=000f4240 edx=00000000 esi=00000000 edi=00000000
#
# So: drop lines starting with "~", and the rest is identical from run to run on one
# backend, and comparable line by line between backends.
#
# Variants: flat16, flat32 and flat64 run one section each and exit 0. The Multiboot
# kernel runs the p32 section, copies the embedded 16-bit piece to 0x10000 and runs it in
# real mode (it returns), then enters long mode and runs the embedded 64-bit piece (placed
# at 0x180000 by multiboot.ld), which exits 0. Under QEMU that gives all three sections.

.include "lib.S"

.set NOT_MAGIC, 0xa9b2a797          # ~magic: what open-vm-tools passes in EBX

    .text
main:
    call battery
    LINE "battery done"
.if MULTIBOOT
    # --- real mode: copy the embedded 16-bit battery to EMBED16_BASE and run it --------
    movl $blob16, %esi
    movl $EMBED16_BASE, %edi
    movl $(blob16_end - blob16), %ecx
    rep movsb
    movl %esp, saved_esp
    movl $back_from_real_mode, %ebp
    ljmp $SEL_CODE16_EMBED, $0
back_from_real_mode:
    movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl saved_esp, %esp

    # --- long mode: identity-map the first 1 GiB with 2 MiB pages and jump -----------
    movl $pml4, %edi
    movl $pdpt, %eax
    orl $3, %eax                    # present, writable
    movl %eax, (%edi)
    movl $pdpt, %edi
    movl $pd, %eax
    orl $3, %eax
    movl %eax, (%edi)
    movl $pd, %edi
    movl $0x83, %eax                # present, writable, 2 MiB page
    movl $512, %ecx
1:  movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $0x200000, %eax
    addl $8, %edi
    decl %ecx
    jnz 1b
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                 # PAE
    movl %eax, %cr4
    movl $0xc0000080, %ecx          # EFER
    rdmsr
    orl $0x100, %eax                # LME
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax           # PG
    movl %eax, %cr0
    ljmp $SEL_CODE64, $EMBED64_BASE
.else
    EXIT 0
.endif

# The battery proper: the same sequence in every mode.
battery:
    LINE "battery begin"

    # What the hypervisor answers itself (vmware-port.md 4.4), IN and OUT.
    BD GETMHZ.in4, ecx=CMD_GETMHZ, mask=M_EAX
    BD GETVERSION.in4, ecx=CMD_GETVERSION, ebx=NOT_MAGIC
    BD GETHWVERSION.in4, ecx=CMD_GETHWVERSION
    BD GETTIME.in4, ecx=CMD_GETTIME, mask=M_EAX|M_EBX
    BD GETHZ.in4, ecx=CMD_GETHZ, mask=M_EAX|M_EBX
    BD GETTIMEFULL.in4, ecx=CMD_GETTIMEFULL, mask=M_EBX|M_EDX|M_ESI
    BD GETMHZ.out4, op=out, ecx=CMD_GETMHZ, mask=M_EAX
    BD GETVERSION.out4, op=out, ecx=CMD_GETVERSION, ebx=NOT_MAGIC
    BD GETHWVERSION.out4, op=out, ecx=CMD_GETHWVERSION
    BD GETTIME.out4, op=out, ecx=CMD_GETTIME, mask=M_EAX|M_EBX
    BD GETHZ.out4, op=out, ecx=CMD_GETHZ, mask=M_EAX|M_EBX
    BD GETTIMEFULL.out4, op=out, ecx=CMD_GETTIMEFULL, mask=M_EBX|M_EDX|M_ESI

    # Recognisable ESI/EDI inputs: an answer must leave them alone.
    BD GETVERSION.esi.edi.in4, ecx=CMD_GETVERSION, ebx=NOT_MAGIC, esi=0x12345678, edi=0x9abcdef0, dxhi=0x4321

    # Wrong magic, wrong ports (0x5659 is in the matrix below).
    BD magic.GETVERSION.in4, eax=0x564d5869, ecx=CMD_GETVERSION, ebx=NOT_MAGIC
    BD magic.GETVERSION.out4, op=out, eax=0x564d5869, ecx=CMD_GETVERSION, ebx=NOT_MAGIC
    BD GETVERSION.in4@5657, port=0x5657, ecx=CMD_GETVERSION, ebx=NOT_MAGIC

    # Every size at every port of the 0x5658..0x565b window, IN and OUT.
.irp port, 5658, 5659, 565a, 565b
  .irp op, in, out
    .irp size, 1, 2, 4
      BD GETVERSION.\op\()\size\()@\port, op=\op, size=\size, port=0x\port, ecx=CMD_GETVERSION, ebx=NOT_MAGIC
    .endr
  .endr
.endr

    # Command number decoding: Xen uses ECX & 0xffff, QEMU ECX & 0xff.
    BD GETVERSION.ecx_ffff000a.in4, ecx=0xffff000a, ebx=NOT_MAGIC
    BD cmd_010a.in4, ecx=0x010a, ebx=NOT_MAGIC
    BD cmd_ffff.in4, ecx=0xffff, ebx=0x11111111, esi=0x22222222, edi=0x33333333
    BD cmd_0064.in4, ecx=100, ebx=0x11111111, esi=0x22222222, edi=0x33333333

    LINE "battery end"
    ret

.if MULTIBOOT
    .data
saved_esp:
    .long 0

    # The two other modes' batteries, assembled separately by the build (an i386 object
    # cannot hold 64-bit code) and included here as bytes.
    .section .rodata
blob16:
    .incbin "battery.flat16e.bin"
blob16_end:

    .section .blob64, "ax"
    .incbin "battery.flat64e.bin"

    .bss
    .balign 4096
pml4:   .fill 4096, 1, 0
pdpt:   .fill 4096, 1, 0
pd:     .fill 4096, 1, 0
.endif
