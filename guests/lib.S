# lib.S - shared macros and routines for hvmport's own test guests (GNU as, AT&T syntax).
#
# Every guest starts with `.include "lib.S"` and defines `main`. The build (hvmport.guests)
# assembles each guest once per variant and passes:
#
#   --defsym BITS=16|32|64   the mode the code runs in
#   --defsym MULTIBOOT=1     a Multiboot v1 ELF kernel (BITS=32): emit the header and an
#                            entry that does not trust the boot loader's GDT or stack
#   --defsym EMBED=1         a piece the Multiboot battery carries inside itself (see
#                            battery.S): the 16-bit piece returns to 32-bit protected mode
#                            instead of exiting
#
# Conventions shared by all guests:
# * Output goes to the debug console, port 0xe9, one byte per `outb`.
# * The guest ends by writing its status to the isa-debug-exit port 0xf4; the run then
#   exits with (status << 1) | 1, QEMU's convention. `guest_exit` takes the status in AL.
# * Routines take arguments in registers and preserve every register they do not return
#   in, so a backdoor test can keep values live across a print.
# * The code is written with 32-bit registers so one source serves all three modes: in
#   16-bit mode the assembler adds operand/address-size prefixes (all our offsets are below
#   64 KiB), in 64-bit mode 32-bit operations zero-extend and `(%esi)`-style addressing
#   gets an address-size prefix (all our addresses are below 4 GiB and identity mapped).
#   Only pushes and pops differ, hence PUSHR/POPR.

.ifndef BITS
    .error "assemble with --defsym BITS=16, 32 or 64"
.endif
.ifndef MULTIBOOT
    .set MULTIBOOT, 0
.endif
.ifndef EMBED
    .set EMBED, 0
.endif

.if BITS == 16
    .code16
.elseif BITS == 32
    .code32
.elseif BITS == 64
    .code64
.else
    .error "BITS must be 16, 32 or 64"
.endif

# --- facts (vmware-port.md, guest-clients.md) ------------------------------------------
.set BDOOR_MAGIC, 0x564D5868
.set BDOOR_PORT, 0x5658
.set BDOORHB_PORT, 0x5659
.set CMD_GETMHZ, 1
.set CMD_GETVERSION, 10
.set CMD_GETHWVERSION, 17
.set CMD_GETTIME, 23
.set CMD_GETHZ, 45
.set CMD_GETTIMEFULL, 46

.set DEBUGCON_PORT, 0xe9
.set DEBUG_EXIT_PORT, 0xf4

# The flat GDT layout hvmport's loader uses (src/hvmport/cpu/base.py); our own GDT keeps
# it so code works the same whichever GDT is loaded, and adds one 16-bit code segment
# based at EMBED16_BASE for the Multiboot battery's trip to real mode.
.set SEL_CODE32, 0x08
.set SEL_DATA, 0x10
.set SEL_CODE64, 0x18
.set SEL_CODE16, 0x20
.set SEL_DATA16, 0x28
.set SEL_CODE16_EMBED, 0x30
.set EMBED16_BASE, 0x10000
.set EMBED16_SEG, EMBED16_BASE >> 4
.set EMBED64_BASE, 0x180000

# Real-mode stack: the loader gives SS:SP = segment:0xfff0 (hv/loader.py); we set the
# same ourselves so a guest does not depend on how a backend reads the start state.
.set REAL16_SP, 0xfff0

# Register masks for BD's `mask` argument (which outputs vary from run to run).
.set M_EAX, 1
.set M_EBX, 2
.set M_ECX, 4
.set M_EDX, 8
.set M_ESI, 16
.set M_EDI, 32

# In 64-bit mode every backdoor call starts with these upper halves, so the line printed
# after the call shows whether the hypervisor kept, zeroed or replaced them.
.if BITS == 64
    .set UPPER_RAX, 0xa0a0a0a000000000
    .set UPPER_RBX, 0xb0b0b0b000000000
    .set UPPER_RCX, 0xc0c0c0c000000000
    .set UPPER_RDX, 0xd0d0d0d000000000
    .set UPPER_RSI, 0x5e5e5e5e00000000
    .set UPPER_RDI, 0xd1d1d1d100000000
.endif

# --- register helpers -----------------------------------------------------------------
.macro PUSHR reg:req
.if BITS == 64
    push %r\reg
.else
    push %e\reg
.endif
.endm

.macro POPR reg:req
.if BITS == 64
    pop %r\reg
.else
    pop %e\reg
.endif
.endm

# --- printing macros: they preserve every register (not the flags) ---------------------
# TEXT "s": print s as is.  LINE "s": print "<mode> s\n", the form of every result line.
.macro TEXT str:req
    .pushsection .rodata
.Ltext\@: .asciz "\str"
    .popsection
    PUSHR si
    movl $.Ltext\@, %esi
    call puts
    POPR si
.endm

.macro LINE str:req
    call put_prefix
    TEXT " \str\n"
.endm

.macro CHAR c:req
    PUSHR ax
    movb $\c, %al
    outb %al, $DEBUGCON_PORT
    POPR ax
.endm

.macro NEWLINE
    CHAR 10
.endm

# HEX32: print EAX as 8 hex digits.  HEXN n: the low n digits of EAX.
.macro HEXN n:req
    PUSHR cx
    movb $\n, %cl
    call puthex
    POPR cx
.endm

.macro HEX32
    HEXN 8
.endm

# DEC: print EAX in decimal.  DECW n: at least n digits, zero-padded.
.macro DECW n:req
    PUSHR cx
    movb $\n, %cl
    call putdec
    POPR cx
.endm

.macro DEC
    DECW 1
.endm

# EXIT code: end the guest with `code` through the isa-debug-exit port.
.macro EXIT code:req
    movb $\code, %al
    jmp guest_exit
.endm

# --- backdoor call wrapper ------------------------------------------------------------
# BD label, op, size, port, eax, ebx, ecx, dxhi, esi, edi, mask
#
# Loads EAX, EBX, ECX, EDX = (dxhi << 16) | port, ESI, EDI (in 64-bit mode with the
# UPPER_* patterns in the upper halves), performs one IN or OUT of `size` bytes at `port`,
# and prints
#     <mode> <label> eax=........ ebx=........ ecx=........ edx=........ esi=........ edi=........
# (rax=... with 16 digits in 64-bit mode). Registers named in `mask` hold values that
# change from run to run (time, frequencies): on the line above they print as ********
# (the low 32 bits only) unless its low 32 bits are unchanged or all ones, the
# two outcomes that mean "not answered" and are themselves stable; a second line,
#     ~ <mode> <label> <all six registers raw>
# follows whenever mask is not 0. Comparisons across runs and backends ignore lines that
# start with "~".
.macro BD label:req, op=in, size=4, port=BDOOR_PORT, eax=BDOOR_MAGIC, ebx=0, ecx=0, dxhi=0, esi=0, edi=0, mask=0
    .pushsection .rodata
.Lbd\@: .asciz "\label"
    .popsection
    movl $.Lbd\@, bd_label
    movl $(\mask), bd_mask
.if BITS == 64
    movabsq $(UPPER_RAX | ((\eax) & 0xffffffff)), %rax
    movabsq $(UPPER_RBX | ((\ebx) & 0xffffffff)), %rbx
    movabsq $(UPPER_RCX | ((\ecx) & 0xffffffff)), %rcx
    movabsq $(UPPER_RDX | (((\dxhi) & 0xffff) << 16) | ((\port) & 0xffff)), %rdx
    movabsq $(UPPER_RSI | ((\esi) & 0xffffffff)), %rsi
    movabsq $(UPPER_RDI | ((\edi) & 0xffffffff)), %rdi
.else
    movl $(\eax), %eax
    movl $(\ebx), %ebx
    movl $(\ecx), %ecx
    movl $((((\dxhi) & 0xffff) << 16) | ((\port) & 0xffff)), %edx
    movl $(\esi), %esi
    movl $(\edi), %edi
.endif
    call bd_record_inputs
.ifc \op,in
  .if \size == 1
    inb %dx, %al
  .elseif \size == 2
    inw %dx, %ax
  .elseif \size == 4
    inl %dx, %eax
  .else
    .error "BD: size must be 1, 2 or 4"
  .endif
.else
  .ifc \op,out
    .if \size == 1
      outb %al, %dx
    .elseif \size == 2
      outw %ax, %dx
    .elseif \size == 4
      outl %eax, %dx
    .else
      .error "BD: size must be 1, 2 or 4"
    .endif
  .else
    .error "BD: op must be in or out"
  .endif
.endif
    call bd_dump
.endm

# BDCALL: a plain 4-byte IN backdoor call for guests that use the answer (demo, smp):
# loads EAX = magic, ECX = cmd, EDX = port 0x5658, and the given EBX/ESI/EDI.
.macro BDCALL cmd:req, ebx=0, esi=0, edi=0
    movl $BDOOR_MAGIC, %eax
    movl $(\ebx), %ebx
    movl $(\cmd), %ecx
    movl $BDOOR_PORT, %edx
    movl $(\esi), %esi
    movl $(\edi), %edi
    inl %dx, %eax
.endm

# =======================================================================================
# Entry. Placed first in the image by the linker scripts, so a flat binary's entry point
# is its first byte.
# =======================================================================================
    .section .text.entry, "ax"
    .globl _start
.if MULTIBOOT
    .if BITS != 32
        .error "Multiboot kernels are 32-bit"
    .endif
    # Flags: bit 0 page-align modules, bit 1 want memory information. No a.out kludge:
    # the loader reads our ELF program headers.
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003
    .pushsection .multiboot, "a"
    .balign 4
multiboot_header:
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)
    .popsection

_start:
    # The Multiboot spec leaves GDTR and ESP undefined: install our own before anything
    # touches a segment register or the stack.
    cli
    cld
    movl %eax, mb_magic
    movl %ebx, mb_info
    lgdt gdt_desc
    ljmp $SEL_CODE32, $1f
1:  movw $SEL_DATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl $boot_stack_top, %esp
    jmp main

.elseif BITS == 16
_start:
  .if EMBED
    # Entered from the Multiboot battery in 16-bit protected mode through
    # SEL_CODE16_EMBED (base EMBED16_BASE) with EBP = the 32-bit address to return to.
    # Load 64 KiB data segments first so real mode inherits sane limits.
    movw $SEL_DATA16, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %fs
    movw %ax, %gs
    movw %ax, %ss
    movl %cr0, %eax
    andl $~1, %eax
    movl %eax, %cr0
    ljmp $EMBED16_SEG, $1f
1:
  .endif
    cli
    movw %cs, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $REAL16_SP, %esp
  .if EMBED
    movl %ebp, embed_return_eip
    lidt realmode_idt_desc
  .endif
    cld
    jmp main

.else
_start:
    # Flat 32/64-bit entry: hvmport's loader already set flat segments and a stack. Do
    # not touch the stack here: the SMP guest sets a per-vCPU stack first thing in main.
    cld
    jmp main
.endif

# =======================================================================================
# Routines
# =======================================================================================
    .text

# guest_exit: AL = status. Never returns.
guest_exit:
.if BITS == 16 && EMBED
    # Back to the Multiboot battery: protected mode again, far jump to the saved address
    # with the flat 32-bit code selector (GDTR still holds the battery's GDT).
    cli
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl *embed_return
.else
    outb %al, $DEBUG_EXIT_PORT
    # If nothing listens on the exit port, stop here rather than run off into memory.
1:  cli
    hlt
    jmp 1b
.endif

# putc: print AL.
putc:
    outb %al, $DEBUGCON_PORT
    ret

# puts: print the NUL-terminated string at ESI.
puts:
    PUSHR ax
    PUSHR si
1:  movb (%esi), %al
    testb %al, %al
    jz 2f
    outb %al, $DEBUGCON_PORT
    incl %esi
    jmp 1b
2:  POPR si
    POPR ax
    ret

# putn: print ECX bytes from ESI.
putn:
    PUSHR ax
    PUSHR cx
    PUSHR si
    jecxz 2f
1:  movb (%esi), %al
    outb %al, $DEBUGCON_PORT
    incl %esi
    decl %ecx
    jnz 1b
2:  POPR si
    POPR cx
    POPR ax
    ret

# put_prefix: print the mode tag that starts every result line ("r16", "p32", "l64").
put_prefix:
    PUSHR si
    movl $mode_tag, %esi
    call puts
    POPR si
    ret

# puthex: print the low CL (1..8) hex digits of EAX.
puthex:
    PUSHR ax
    PUSHR bx
    PUSHR cx
    PUSHR dx
    movl %eax, %edx
    movzbl %cl, %ebx
    # Shift the wanted digits to the top of EDX, then rotate them out one at a time.
    movb $32, %cl
    subb %bl, %cl
    subb %bl, %cl
    subb %bl, %cl
    subb %bl, %cl
    shll %cl, %edx
1:  roll $4, %edx
    movl %edx, %eax
    andl $0xf, %eax
    movb hexdigits(%eax), %al
    outb %al, $DEBUGCON_PORT
    decl %ebx
    jnz 1b
    POPR dx
    POPR cx
    POPR bx
    POPR ax
    ret

# puthex64: print a 64-bit value as 16 hex digits: RAX in 64-bit mode, EDX:EAX otherwise.
puthex64:
    PUSHR ax
    PUSHR cx
    movb $8, %cl
.if BITS == 64
    rorq $32, %rax
    call puthex
    rorq $32, %rax
.else
    xchgl %eax, %edx
    call puthex
    xchgl %eax, %edx
.endif
    call puthex
    POPR cx
    POPR ax
    ret

# putdec: print EAX as an unsigned decimal with at least CL digits (zero-padded).
putdec:
    PUSHR ax
    PUSHR bx
    PUSHR cx
    PUSHR dx
    movzbl %cl, %ebx
    PUSHR bx                    # minimum width
    xorl %ecx, %ecx             # digits produced
1:  xorl %edx, %edx
    movl $10, %ebx
    divl %ebx
    PUSHR dx
    incl %ecx
    testl %eax, %eax
    jnz 1b
    # The width sits under the digits on the stack; fetch it without popping them.
    movl %ecx, %eax
.if BITS == 64
    movq (%rsp,%rcx,8), %rbx
.elseif BITS == 32
    movl (%esp,%ecx,4), %ebx
.else
    movl %esp, %ebx
    movzwl %bx, %ebx
    movl (%ebx,%ecx,4), %ebx    # real mode: SS = DS, so DS-relative is the stack
.endif
2:  cmpl %ebx, %eax
    jae 3f
    CHAR 48
    incl %eax
    jmp 2b
3:  POPR ax
    addb $48, %al
    outb %al, $DEBUGCON_PORT
    decl %ecx
    jnz 3b
    POPR bx                     # the width
    POPR dx
    POPR cx
    POPR bx
    POPR ax
    ret

# putdec64: print EDX:EAX (any mode) as an unsigned decimal.
putdec64:
    PUSHR ax
    PUSHR bx
    PUSHR cx
    PUSHR dx
    PUSHR si
    PUSHR di
    movl %edx, %esi             # high half
    movl %eax, %edi             # low half
    movl $10, %ebx
    xorl %ecx, %ecx
1:  # Long division by 10, high half first; the remainder carries into the low half.
    xorl %edx, %edx
    movl %esi, %eax
    divl %ebx
    movl %eax, %esi
    movl %edi, %eax
    divl %ebx
    movl %eax, %edi
    PUSHR dx
    incl %ecx
    movl %esi, %eax
    orl %edi, %eax
    jnz 1b
2:  POPR ax
    addb $48, %al
    outb %al, $DEBUGCON_PORT
    decl %ecx
    jnz 2b
    POPR di
    POPR si
    POPR dx
    POPR cx
    POPR bx
    POPR ax
    ret

# div64: EDX:EAX / EBX (32-bit divisor) -> EDX:EAX quotient, ECX remainder.
div64:
    PUSHR si
    movl %eax, %esi             # low half
    movl %edx, %eax
    xorl %edx, %edx
    divl %ebx
    movl %eax, %ecx             # high quotient
    movl %esi, %eax
    divl %ebx
    xchgl %ecx, %edx            # EDX = high quotient, ECX = remainder
    POPR si
    ret

# bd_record_inputs: remember the six registers a backdoor call starts with, so bd_dump can
# tell "unchanged" apart from "answered". Changes nothing.
bd_record_inputs:
.if BITS == 64
    movq %rax, bd_in + 0
    movq %rbx, bd_in + 8
    movq %rcx, bd_in + 16
    movq %rdx, bd_in + 24
    movq %rsi, bd_in + 32
    movq %rdi, bd_in + 40
.else
    movl %eax, bd_in + 0
    movl %ebx, bd_in + 8
    movl %ecx, bd_in + 16
    movl %edx, bd_in + 24
    movl %esi, bd_in + 32
    movl %edi, bd_in + 40
.endif
    ret

# bd_dump: print the result line(s) of a BD call (see BD). Clobbers everything.
bd_dump:
.if BITS == 64
    movq %rax, bd_out + 0
    movq %rbx, bd_out + 8
    movq %rcx, bd_out + 16
    movq %rdx, bd_out + 24
    movq %rsi, bd_out + 32
    movq %rdi, bd_out + 40
.else
    movl %eax, bd_out + 0
    movl %ebx, bd_out + 8
    movl %ecx, bd_out + 16
    movl %edx, bd_out + 24
    movl %esi, bd_out + 32
    movl %edi, bd_out + 40
.endif
    call put_prefix
    CHAR 32
    movl bd_label, %esi
    call puts
    movl bd_mask, %edi
    call bd_print_regs
    NEWLINE
    cmpl $0, bd_mask
    je 1f
    TEXT "~ "
    call put_prefix
    CHAR 32
    movl bd_label, %esi
    call puts
    xorl %edi, %edi
    call bd_print_regs
    NEWLINE
1:  ret

# bd_print_regs: print " eax=... ebx=... ecx=... edx=... esi=... edi=..." from bd_out,
# masking the registers whose bit is set in EDI. Clobbers EAX, EBX, ECX, ESI.
bd_print_regs:
    xorl %ebx, %ebx
1:  CHAR 32
    leal regnames(,%ebx,4), %esi
    movl $4, %ecx
    call putn
    btl %ebx, %edi
    jnc 3f
    # Masked register: still show the stable outcomes in full.
    # Only the low 32 bits are compared: a 4-byte IN zero-extends RAX, so the upper half
    # says nothing about whether the command was answered.
    movl bd_out(,%ebx,8), %eax
    cmpl $0xffffffff, %eax
    je 3f
    cmpl bd_in(,%ebx,8), %eax
    je 3f
.if BITS == 64
    movl bd_out + 4(,%ebx,8), %eax
    HEX32
.endif
    TEXT "********"
    jmp 4f
3:
.if BITS == 64
    movq bd_out(,%ebx,8), %rax
    call puthex64
.else
    movl bd_out(,%ebx,8), %eax
    HEX32
.endif
4:  incl %ebx
    cmpl $6, %ebx
    jb 1b
    ret

# =======================================================================================
# Data
# =======================================================================================
    .section .rodata
hexdigits:
    .ascii "0123456789abcdef"
mode_tag:
.if BITS == 16
    .asciz "r16"
.elseif BITS == 32
    .asciz "p32"
.else
    .asciz "l64"
.endif
regnames:
.if BITS == 64
    .ascii "rax=rbx=rcx=rdx=rsi=rdi="
.else
    .ascii "eax=ebx=ecx=edx=esi=edi="
.endif

    .data
    .balign 8
bd_in:      .fill 6, 8, 0
bd_out:     .fill 6, 8, 0
bd_label:   .long 0
bd_mask:    .long 0

.if MULTIBOOT
mb_magic:   .long 0
mb_info:    .long 0
    .balign 8
gdt:
    .quad 0                         # null
    .quad 0x00cf9b000000ffff        # 0x08 code, 32-bit, flat
    .quad 0x00cf93000000ffff        # 0x10 data, flat
    .quad 0x00af9b000000ffff        # 0x18 code, 64-bit
    .quad 0x00009b000000ffff        # 0x20 code, 16-bit, base 0, 64 KiB
    .quad 0x000093000000ffff        # 0x28 data, 16-bit, base 0, 64 KiB
    .quad 0x00009b010000ffff        # 0x30 code, 16-bit, base EMBED16_BASE (0x10000)
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .bss
    .balign 16
boot_stack:
    .fill 16384, 1, 0
boot_stack_top:
    .previous
.endif

.if BITS == 16 && EMBED
embed_return:
embed_return_eip:
    .long 0
    .word SEL_CODE32
realmode_idt_desc:
    .word 0x3ff
    .long 0
.endif

    .text
