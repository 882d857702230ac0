# cpl3.S - backdoor calls from ring 3, the way vmware-checkvm makes them.
#
# open-vm-tools runs in user space at IOPL 0 and expects VMware's behaviour: the backdoor
# IN works at any CPL. A real CPU (and QEMU's TCG, which checks IOPL and the TSS I/O
# bitmap like one) raises #GP instead; KVM with enable_vmware_backdoor and hvmport's
# backends let it through. So this guest:
#
# 1. at CPL 0 makes reference calls (cpl0.*);
# 2. installs its own GDT (user code/data with DPL 3), an IDT whose #GP handler reports
#    the fault and skips the faulting IN/OUT, and a TSS whose I/O bitmap opens the console
#    (0xe9), exit (0xf4) and the backdoor ports (0x5658..0x565f, so a 4-byte access at
#    0x5659 fits too) and nothing else, as
#    a process does with ioperm() (xf86-input-vmmouse's way). VMware lets ring 3 reach the
#    backdoor whatever the bitmap says, but CPUs do not: QEMU's TCG checks the bitmap, and
#    so does this machine's nested (PVM) KVM, which runs ring 3 natively and raised #GP
#    for a denied port; Unicorn never checks. With the ports opened, all of them agree;
# 3. enters ring 3 with IOPL 0 through SYSEXIT and makes the same calls (cpl3.*), then
#    exits from ring 3 with status 0. SYSEXIT rather than IRET or LRET because this
#    machine's nested (PVM) KVM emulates CPL-0 code and fails on a privilege-lowering
#    IRET/LRET ("emulation failure"), while SYSEXIT works there, under Unicorn and QEMU.
#
# Output: the battery's format (see battery.S). Where the CPU faulted, the handler
# prints "<mode> <label> #GP error=XXXXXXXX" and the label's register line follows with
# the inputs untouched. Any other exception prints "exception vector=..." and exits 3.
# Only PROT32 (flat32 and the Multiboot kernel).

.include "lib.S"

.if BITS != 32
    .error "cpl3 is a 32-bit guest"
.endif

.set NOT_MAGIC, 0xa9b2a797
.set K_CODE, 0x08
.set K_DATA, 0x10
.set U_CODE, 0x18 | 3
.set U_DATA, 0x20 | 3
.set TSS_SEL, 0x28
.set MSR_SYSENTER_CS, 0x174
.set TSS_IOMAP, 104                 # the I/O bitmap follows the 104-byte TSS
.set TSS_LIMIT, TSS_IOMAP + 8192    # includes the 0xff byte that must end the bitmap

    .text
main:
    LINE "cpl3 begin"
    BD cpl0.GETVERSION.in4, ecx=CMD_GETVERSION, ebx=NOT_MAGIC
    BD cpl0.GETHZ.in4, ecx=CMD_GETHZ, mask=M_EAX|M_EBX

    call setup_tss
    call setup_idt
    lgdt cpl3_gdt_desc
    ljmp $K_CODE, $1f
1:  movw $K_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    lidt idt_desc
    movw $TSS_SEL, %ax
    ltr %ax
    LINE "cpl3 entering ring 3, IOPL 0, I/O bitmap allows ports e9, f4 and 5658-565f only"

    # SYSEXIT takes CS = SYSENTER_CS + 16 and SS = SYSENTER_CS + 24 (both RPL 3), which is
    # why the ring-3 descriptors sit right after the ring-0 ones.
    pushl $0x00000002               # IOPL 0, interrupts off
    popfl
    movl $MSR_SYSENTER_CS, %ecx
    movl $K_CODE, %eax
    xorl %edx, %edx
    wrmsr
    movl $user_main, %edx           # EIP
    movl $user_stack_top, %ecx      # ESP
    sysexit

user_main:
    movw $U_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    call put_prefix
    TEXT " cpl3 running at CPL "
    movw %cs, %ax
    movzwl %ax, %eax
    andl $3, %eax
    DEC
    NEWLINE
    BD cpl3.GETVERSION.in4, ecx=CMD_GETVERSION, ebx=NOT_MAGIC
    BD cpl3.GETVERSION.in1, size=1, ecx=CMD_GETVERSION, ebx=NOT_MAGIC
    BD cpl3.GETVERSION.out4, op=out, ecx=CMD_GETVERSION, ebx=NOT_MAGIC
    BD cpl3.GETHZ.in4, ecx=CMD_GETHZ, mask=M_EAX|M_EBX
    BD cpl3.GETVERSION.in4@5659, port=0x5659, ecx=CMD_GETVERSION, ebx=NOT_MAGIC
    LINE "cpl3 end"
    EXIT 0                          # from ring 3, through the bitmap's hole at 0xf4

# setup_tss: ring-0 stack for traps from ring 3, the I/O bitmap, and the GDT descriptor.
setup_tss:
    movl $kernel_stack_top, tss + 4         # ESP0
    movl $K_DATA, tss + 8                   # SS0
    movw $TSS_IOMAP, tss + 102              # I/O map base
    # Deny every port (bit set), then open the ones this guest uses from ring 3.
    movl $(tss + TSS_IOMAP), %edi
    movl $(8192 + 1), %ecx
    movb $0xff, %al
    rep stosb
    movl $DEBUGCON_PORT, %eax
    btrl %eax, tss + TSS_IOMAP
    movl $DEBUG_EXIT_PORT, %eax
    btrl %eax, tss + TSS_IOMAP
    movl $0x5658, %eax
1:  btrl %eax, tss + TSS_IOMAP
    incl %eax
    cmpl $0x5660, %eax
    jb 1b
    # The descriptor's base is split into three fields; fill them in at run time.
    movl $tss, %eax
    movw %ax, tss_desc + 2
    shrl $16, %eax
    movb %al, tss_desc + 4
    movb %ah, tss_desc + 7
    ret

# setup_idt: 32 interrupt gates (DPL 0) to the stubs below, 16 bytes apart.
setup_idt:
    xorl %ecx, %ecx
    movl $isr_stubs, %edx
1:  movl %edx, %eax
    movw %ax, idt(,%ecx,8)                  # offset 15:0
    movw $K_CODE, idt + 2(,%ecx,8)
    movw $0x8e00, idt + 4(,%ecx,8)          # present, DPL 0, 32-bit interrupt gate
    shrl $16, %eax
    movw %ax, idt + 6(,%ecx,8)              # offset 31:16
    addl $16, %edx
    incl %ecx
    cmpl $32, %ecx
    jb 1b
    ret

# One stub per vector; those without a CPU error code push 0 so the frame is uniform:
# vector, error, EIP, CS, EFLAGS (+ ESP, SS when the trap came from ring 3).
    .balign 16
isr_stubs:
.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
  .if !((\n == 8) || (\n >= 10 && \n <= 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30))
    pushl $0
  .endif
    pushl $\n
    jmp isr_common
.endr

isr_common:
    pushal
    pushl %ds
    pushl %es
    movw $K_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    # Frame: 0 es, 4 ds, 8..39 pushal, 40 vector, 44 error, 48 EIP, 52 CS, 56 EFLAGS
    cmpl $13, 40(%esp)
    jne unexpected
    # #GP: report it against the call in progress, and skip the IN/OUT if that is what
    # faulted (so the guest goes on as if the port had not answered).
    call put_prefix
    CHAR 32
    movl bd_label, %esi
    call puts
    TEXT " #GP error="
    movl 44(%esp), %eax
    HEX32
    NEWLINE
    movl 48(%esp), %esi
    movzbl (%esi), %eax
    movl $1, %ecx
    cmpb $0x66, %al                         # operand-size prefix (inw/outw)
    jne 1f
    incl %ecx
    movzbl 1(%esi), %eax
1:  cmpb $0xec, %al                         # in/out with DX: ec ed ee ef
    jb unexpected
    cmpb $0xef, %al
    ja unexpected
    addl %ecx, 48(%esp)
    popl %es
    popl %ds
    popal
    addl $8, %esp                           # vector and error code
    iret

unexpected:
    call put_prefix
    TEXT " cpl3 exception vector="
    movl 40(%esp), %eax
    DEC
    TEXT " error="
    movl 44(%esp), %eax
    HEX32
    TEXT " eip="
    movl 48(%esp), %eax
    HEX32
    TEXT " cs="
    movl 52(%esp), %eax
    HEXN 4
    NEWLINE
    EXIT 3

    .data
    .balign 8
cpl3_gdt:
    .quad 0                         # null
    .quad 0x00cf9b000000ffff        # 0x08 ring-0 code, flat 32-bit
    .quad 0x00cf93000000ffff        # 0x10 ring-0 data, flat
    .quad 0x00cffb000000ffff        # 0x18 ring-3 code, flat 32-bit (DPL 3)
    .quad 0x00cff3000000ffff        # 0x20 ring-3 data, flat (DPL 3)
tss_desc:                           # 0x28 32-bit available TSS; base filled at run time
    .word TSS_LIMIT & 0xffff, 0
    .byte 0, 0x89, (TSS_LIMIT >> 16) & 0xf, 0
cpl3_gdt_end:
cpl3_gdt_desc:
    .word cpl3_gdt_end - cpl3_gdt - 1
    .long cpl3_gdt
idt_desc:
    .word 32 * 8 - 1
    .long idt

    .bss
    .balign 16
idt:            .fill 32 * 8, 1, 0
tss:            .fill TSS_LIMIT + 1, 1, 0
    .balign 16
kernel_stack:   .fill 4096, 1, 0
kernel_stack_top:
user_stack:     .fill 4096, 1, 0
user_stack_top:
