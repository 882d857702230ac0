# smp.S - every vCPU hammers the backdoor with its own register values.
#
# For `--smp-entry` flat loading: all vCPUs start at the same entry with the same state
# except ESI = vCPU id and EDI = number of vCPUs (hv/loader.py, for_vcpu). Each vCPU
# takes its own 4 KiB stack above the image (id + 1 pages past _end, rounded up to a
# page), then makes ITERATIONS rounds of two calls whose inputs are derived from its id
# and the round:
#
#   GETVERSION (answered by the hypervisor): needs EAX != all ones, EBX = magic, and
#     EDX, ESI, EDI exactly as passed;
#   an unknown command, 0x7777 (forwarded to a device model, if any): EBX, ECX, EDX,
#     ESI, EDI must come back exactly as passed.
#
# A backend that mixes up vCPUs (a shared or mis-indexed register slot) hands a vCPU
# another vCPU's values, which counts as an error. Output, one line per vCPU under a
# spinlock (the order of these lines varies between runs):
#
#   smp vcpu=<id> calls=<n> errors=<n>
#
# and from the last vCPU to finish (found with a locked counter), which then exits with
# status 0 if no vCPU saw an error, else 1:
#
#   smp done vcpus=<n> errors=<total>
#
# The other vCPUs halt with interrupts off. EDI = 0 (count unknown): vCPU 0 says so and
# exits 2; an id >= MAX_VCPUS prints a message without using a stack and exits 2.

.include "lib.S"

.if BITS == 16
    .error "smp is a 32- or 64-bit guest"
.endif

.set MAX_VCPUS, 64
.set ITERATIONS, 64
.set STACK_SIZE, 4096
.set NOT_MAGIC, 0xa9b2a797
.set UNKNOWN_CMD, 0x7777

# Compare a register with a slot of the stack (slot 0 = the last push).
.macro CMPSTK reg:req, slot:req
.if BITS == 64
    cmpl \slot * 8(%rsp), %\reg
.else
    cmpl \slot * 4(%esp), %\reg
.endif
.endm

.macro DROP n:req
.if BITS == 64
    addq $(\n * 8), %rsp
.else
    addl $(\n * 4), %esp
.endif
.endm

    .text
main:
    cmpl $MAX_VCPUS, %esi
    jae too_many
    # Stack first: nothing before this line may push.
    movl $_end, %eax
    addl $(STACK_SIZE - 1), %eax
    andl $~(STACK_SIZE - 1), %eax
    leal 1(%esi), %ebx
    shll $12, %ebx
    addl %ebx, %eax
    movl %eax, %esp
    movl %esi, %ebp                         # EBP = id from here on; routines keep it
    movl %edi, vcpus(,%ebp,4)
    testl %edi, %edi
    jz no_count
    movl $0, iter(,%ebp,4)
    movl $0, errors(,%ebp,4)

round:
    # ESI = 5a | id | round, EDI = ~ESI, EDX = id << 16 | port: unique per vCPU and round.
    movl iter(,%ebp,4), %ecx
    movl %ebp, %esi
    shll $16, %esi
    orl %ecx, %esi
    orl $0x5a000000, %esi
    movl %esi, %edi
    notl %edi
    movl %ebp, %edx
    shll $16, %edx
    orl $BDOOR_PORT, %edx

    # 1. GETVERSION
    movl $BDOOR_MAGIC, %eax
    movl $NOT_MAGIC, %ebx
    movl $CMD_GETVERSION, %ecx
    PUSHR si
    PUSHR di
    PUSHR dx
    inl %dx, %eax
    cmpl $0xffffffff, %eax
    je 1f
    cmpl $BDOOR_MAGIC, %ebx
    jne 1f
    CMPSTK edx, 0
    jne 1f
    CMPSTK edi, 1
    jne 1f
    CMPSTK esi, 2
    je 2f
1:  incl errors(,%ebp,4)
2:  POPR dx
    POPR di
    POPR si

    # 2. an unknown command: everything but EAX must come back as it went out
    movl $BDOOR_MAGIC, %eax
    movl %esi, %ebx
    xorl $0xeb000000, %ebx
    movl $UNKNOWN_CMD, %ecx
    PUSHR si
    PUSHR di
    PUSHR dx
    PUSHR cx
    PUSHR bx
    inl %dx, %eax
    CMPSTK ebx, 0
    jne 1f
    CMPSTK ecx, 1
    jne 1f
    CMPSTK edx, 2
    jne 1f
    CMPSTK edi, 3
    jne 1f
    CMPSTK esi, 4
    je 2f
1:  incl errors(,%ebp,4)
2:  DROP 5

    incl iter(,%ebp,4)
    cmpl $ITERATIONS, iter(,%ebp,4)
    jb round

    call lock_console
    TEXT "smp vcpu="
    movl %ebp, %eax
    DEC
    TEXT " calls="
    movl iter(,%ebp,4), %eax
    addl %eax, %eax
    DEC
    TEXT " errors="
    movl errors(,%ebp,4), %eax
    DEC
    NEWLINE
    call unlock_console

    # Account for this vCPU; whoever completes the count is the last one and reports.
    movl errors(,%ebp,4), %eax
    lock addl %eax, total_errors
    movl $1, %eax
    lock xaddl %eax, done
    incl %eax
    cmpl vcpus(,%ebp,4), %eax
    jne park
    call lock_console
    TEXT "smp done vcpus="
    DEC
    TEXT " errors="
    movl total_errors, %eax
    DEC
    NEWLINE
    call unlock_console
    cmpl $0, total_errors
    jne 1f
    EXIT 0
1:  EXIT 1

park:
    cli
    hlt
    jmp park

no_count:
    testl %ebp, %ebp
    jnz park
    TEXT "smp needs EDI = the number of vCPUs (for_vcpu(state, id, vcpu_count)); EDI was 0\n"
    EXIT 2

too_many:
    # No stack of our own: print with a loop that needs none.
    movl $too_many_msg, %esi
1:  movb (%esi), %al
    testb %al, %al
    jz 2f
    outb %al, $DEBUGCON_PORT
    incl %esi
    jmp 1b
2:  movb $2, %al
    outb %al, $DEBUG_EXIT_PORT
    jmp park

# A spinlock around each line, so lines from different vCPUs do not interleave.
lock_console:
    PUSHR ax
1:  movl $1, %eax
    xchgl %eax, console_lock
    testl %eax, %eax
    jz 2f
    pause
    jmp 1b
2:  POPR ax
    ret

unlock_console:
    movl $0, console_lock
    ret

    .section .rodata
too_many_msg:
    .asciz "smp: vCPU id too large (at most 63)\n"

    .data
    .balign 64
console_lock:   .long 0
    .balign 64
done:           .long 0
total_errors:   .long 0
    .balign 64
vcpus:          .fill MAX_VCPUS, 4, 0
iter:           .fill MAX_VCPUS, 4, 0
errors:         .fill MAX_VCPUS, 4, 0
