# fullcpu.S - what a kernel needs of a 64-bit CPU beyond port I/O: exceptions and
# interrupts through the IDT, HLT waiting for the timer, SYSCALL/SYSRET, ring 3 and back.
#
# It checks, in order, printing one "fullcpu: ..." line per step:
# 1. three page faults in a row (write, read, write to an unmapped 2 MiB page): the error
#    code and CR2 each time, and that the third is still a #PF (not a double fault);
# 2. #UD from ud2, resumed after it;
# 3. the PIT's IRQ 0 through the 8259 (vector 0x20) waking HLT five times;
# 4. ring 3 entered with IRETQ; SYSCALL into the kernel (CPL 0, RCX = the return address)
#    and SYSRET back; a timer interrupt taken in ring 3 onto TSS.RSP0; a #GP (hlt in ring 3)
#    onto the IST1 stack, whose handler ends the run with status 0x10.
# Anything unexpected prints "fullcpu: FAIL ..." and exits with status 0x3f.
# Only flat64.

.include "lib.S"

.if BITS != 64
    .error "fullcpu is a 64-bit guest"
.endif

.set K_CS, 0x08
.set K_DS, 0x10
.set U_DS, 0x1b
.set U_CS, 0x23
.set TSS_SEL, 0x28
.set IDT, 0x120000
.set RSP0_TOP, 0x130000
.set IST1_TOP, 0x138000
.set USER_STACK_TOP, 0x140000
.set HOLE, 0x2000000           # a 2 MiB page (32 MiB) we unmap
.set HOLE_PDE, 0x6080          # its entry in the loader's first page directory
.set PIT_COUNT, 11932          # 100 Hz

main:
    lgdt gdt_desc
    pushq $K_CS
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  movw $K_DS, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movq $RSP0_TOP - 0x2000, %rsp      # a kernel stack apart from RSP0's

    # The TSS descriptor (64-bit available TSS, limit 103).
    leaq tss(%rip), %rax
    movq %rax, %rdx
    andq $0xffffff, %rdx
    shlq $16, %rdx
    orq $103, %rdx
    movq $0x89, %rcx
    shlq $40, %rcx
    orq %rcx, %rdx
    movq %rax, %rcx
    shrq $24, %rcx
    andq $0xff, %rcx
    shlq $56, %rcx
    orq %rcx, %rdx
    movq %rdx, gdt + TSS_SEL(%rip)
    shrq $32, %rax
    movq %rax, gdt + TSS_SEL + 8(%rip)
    movw $TSS_SEL, %ax
    ltr %ax

    # IDT: every vector to "unexpected", then the ones we use.
    xorl %edi, %edi
2:  leaq isr_unexpected(%rip), %rsi
    movl $0x8e, %edx
    call set_gate
    incl %edi
    cmpl $256, %edi
    jb 2b
    movl $6, %edi
    leaq isr_ud(%rip), %rsi
    call set_gate
    movl $14, %edi
    leaq isr_pf(%rip), %rsi
    call set_gate
    movl $13, %edi
    leaq isr_gp(%rip), %rsi
    movl $0x18e, %edx                  # IST 1
    call set_gate
    movl $0x20, %edi
    leaq isr_timer(%rip), %rsi
    movl $0x8e, %edx
    call set_gate
    lidt idt_desc

    # 1. three page faults
    movq HOLE_PDE, %r12
    movq $0, HOLE_PDE
    invlpg HOLE
    movl $0x1234, HOLE
    movq $0, HOLE_PDE
    invlpg HOLE
    movl HOLE, %eax
    movq $0, HOLE_PDE
    invlpg HOLE
    movl $0x5678, HOLE + 8
    cmpl $3, pf_count(%rip)
    jne fail
    movl HOLE, %eax
    cmpl $0x1234, %eax
    jne fail

    # 2. #UD
    ud2
    movl $msg_ud_back, %esi
    call puts

    # 3. the timer wakes HLT
    call init_pic
    movb $0x34, %al
    outb %al, $0x43
    movb $PIT_COUNT & 0xff, %al
    outb %al, $0x40
    movb $PIT_COUNT >> 8, %al
    outb %al, $0x40
    sti
3:  hlt
    cmpl $5, ticks(%rip)
    jb 3b
    cli
    movl $msg_hlt, %esi
    call puts

    # 4. ring 3
    movl $0xc0000080, %ecx             # EFER.SCE
    rdmsr
    orl $1, %eax
    wrmsr
    movl $0xc0000081, %ecx             # STAR: kernel CS 0x08, SYSRET base 0x10
    xorl %eax, %eax
    movl $(K_CS | (0x10 << 16)), %edx
    wrmsr
    movl $0xc0000082, %ecx             # LSTAR
    leaq syscall_entry(%rip), %rax
    movq %rax, %rdx
    shrq $32, %rdx
    wrmsr
    movl $0xc0000084, %ecx             # SFMASK: IF
    movl $0x200, %eax
    xorl %edx, %edx
    wrmsr
    pushq $U_DS
    pushq $USER_STACK_TOP
    pushq $0x202
    pushq $U_CS
    leaq user_code(%rip), %rax
    pushq %rax
    iretq

user_code:
    movl $7, %edi
    syscall
after_syscall:
    cmpl $42, %eax
    jne user_fail
    movw %cs, %ax
    cmpw $U_CS, %ax
    jne user_fail
4:  cmpl $0, user_ticks(%rip)
    je 4b
    cmpl $1, user_ticks(%rip)
    jne user_fail
    hlt                                # privileged: #GP onto IST1, which ends the run
user_fail:
    ud2

syscall_entry:
    movw %cs, %ax
    cmpw $K_CS, %ax
    jne fail
    leaq after_syscall(%rip), %rax
    cmpq %rax, %rcx
    jne fail
    cmpl $7, %edi
    jne fail
    movl $msg_syscall, %esi
    call puts
    movl $42, %eax
    sysretq

# set_gate: EDI = vector, RSI = handler, EDX = type/attributes (bits 8..10: IST).
set_gate:
    pushq %rax
    pushq %rbx
    movl %edi, %ebx
    shll $4, %ebx
    addl $IDT, %ebx
    movq %rsi, %rax
    movw %ax, (%rbx)
    movw $K_CS, 2(%rbx)
    movb %dh, 4(%rbx)
    movb %dl, 5(%rbx)
    shrq $16, %rax
    movw %ax, 6(%rbx)
    shrq $16, %rax
    movl %eax, 8(%rbx)
    movl $0, 12(%rbx)
    popq %rbx
    popq %rax
    ret

init_pic:
    movb $0x11, %al
    outb %al, $0x20
    outb %al, $0xa0
    movb $0x20, %al
    outb %al, $0x21
    movb $0x28, %al
    outb %al, $0xa1
    movb $0x04, %al
    outb %al, $0x21
    movb $0x02, %al
    outb %al, $0xa1
    movb $0x01, %al
    outb %al, $0x21
    outb %al, $0xa1
    movb $0xfe, %al                    # IRQ 0 only
    outb %al, $0x21
    movb $0xff, %al
    outb %al, $0xa1
    ret

isr_pf:
    pushq %rax
    pushq %rcx
    pushq %rsi
    movl $msg_pf, %esi
    call puts
    movq 24(%rsp), %rax                # the error code
    movb $8, %cl
    call puthex
    movl $msg_cr2, %esi
    call puts
    movq %cr2, %rax
    call puthex64
    movb $'\n', %al
    call putc
    incl pf_count(%rip)
    movq %r12, HOLE_PDE                # map the page again and retry
    invlpg HOLE
    popq %rsi
    popq %rcx
    popq %rax
    addq $8, %rsp
    iretq

isr_ud:
    pushq %rsi
    movl $msg_ud, %esi
    call puts
    popq %rsi
    addq $2, (%rsp)                    # resume past the ud2
    iretq

isr_timer:
    pushq %rax
    incl ticks(%rip)
    testb $3, 16(%rsp)                 # the interrupted CS
    jz 1f
    movl $2, user_ticks(%rip)
    cmpq $RSP0_TOP, %rsp
    jae 1f
    cmpq $RSP0_TOP - 0x1000, %rsp
    jb 1f
    movl $1, user_ticks(%rip)
    movl $msg_user_timer, %esi
    call puts
1:  movb $0x20, %al
    outb %al, $0x20
    popq %rax
    iretq

isr_gp:
    cmpq $IST1_TOP, %rsp
    jae fail
    cmpq $IST1_TOP - 0x1000, %rsp
    jb fail
    cmpq $U_CS, 16(%rsp)               # the interrupted CS
    jne fail
    movl $msg_gp, %esi
    call puts
    movq (%rsp), %rax
    movb $8, %cl
    call puthex
    movb $'\n', %al
    call putc
    movb $0x10, %al
    call guest_exit

isr_unexpected:
    movl $msg_unexpected, %esi
    call puts
fail:
    movl $msg_fail, %esi
    call puts
    movb $0x3f, %al
    call guest_exit

    .data
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff           # 0x08 kernel code, 64-bit
    .quad 0x00cf92000000ffff           # 0x10 kernel data
    .quad 0x00cff2000000ffff           # 0x18 user data
    .quad 0x00affa000000ffff           # 0x20 user code, 64-bit
    .quad 0, 0                         # 0x28 TSS, filled in
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt
idt_desc:
    .word 256 * 16 - 1
    .quad IDT
    .balign 16
tss:
    .long 0
    .quad RSP0_TOP                     # RSP0
    .quad 0, 0                         # RSP1, RSP2
    .quad 0                            # reserved
    .quad IST1_TOP                     # IST1
    .quad 0, 0, 0, 0, 0, 0             # IST2..7
    .quad 0
    .word 0, 104                       # no I/O bitmap
ticks:
    .long 0
user_ticks:
    .long 0
pf_count:
    .long 0
msg_pf:
    .asciz "fullcpu: page fault error="
msg_cr2:
    .asciz " cr2="
msg_ud:
    .asciz "fullcpu: invalid opcode\n"
msg_ud_back:
    .asciz "fullcpu: resumed after ud2\n"
msg_hlt:
    .asciz "fullcpu: five timer interrupts woke hlt\n"
msg_syscall:
    .asciz "fullcpu: syscall from ring 3 at cpl 0, rcx = return address\n"
msg_user_timer:
    .asciz "fullcpu: timer interrupt from ring 3 on the rsp0 stack\n"
msg_gp:
    .asciz "fullcpu: #GP from ring 3 on the ist1 stack, error="
msg_unexpected:
    .asciz "fullcpu: unexpected exception\n"
msg_fail:
    .asciz "fullcpu: FAIL\n"
