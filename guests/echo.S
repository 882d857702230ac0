# echo.S - the serial console, both ways: a line on COM1, then every byte typed comes back.
#
# For `hvmport console` and the toolstack tests. On COM1 (a 16550 at 0x3f8, polled, no
# interrupts) it prints "echo: ready", then for each byte received prints it back between
# angle brackets ("<a>"); a 'q' ends the guest with status 0 after "echo: bye". The debug
# console gets "echo begin" first, so a test can tell the guest started.

.include "lib.S"

.set COM1, 0x3f8
.set LSR, COM1 + 5
.set LSR_DATA_READY, 0x01
.set LSR_THR_EMPTY, 0x20

    .text
main:
    LINE "echo begin"
    movl $ready_msg, %esi
    call com_puts
1:  call com_getc
    cmpb $'q', %al
    je 2f
    movb %al, %bl
    movb $'<', %al
    call com_putc
    movb %bl, %al
    call com_putc
    movb $'>', %al
    call com_putc
    jmp 1b
2:  movl $bye_msg, %esi
    call com_puts
    EXIT 0

# com_putc: send AL on COM1 once the transmitter has room.
com_putc:
    pushl %edx
    pushl %eax
    movw $LSR, %dx
1:  inb %dx, %al
    testb $LSR_THR_EMPTY, %al
    jz 1b
    popl %eax
    movw $COM1, %dx
    outb %al, %dx
    popl %edx
    ret

# com_getc: wait for a byte on COM1 and return it in AL.
com_getc:
    pushl %edx
    movw $LSR, %dx
1:  inb %dx, %al
    testb $LSR_DATA_READY, %al
    jz 1b
    movw $COM1, %dx
    inb %dx, %al
    popl %edx
    ret

# com_puts: send the NUL-terminated string at ESI.
com_puts:
    pushl %esi
1:  movb (%esi), %al
    testb %al, %al
    jz 2f
    call com_putc
    incl %esi
    jmp 1b
2:  popl %esi
    ret

    .section .rodata
ready_msg: .asciz "echo: ready\r\n"
bye_msg:   .asciz "\r\necho: bye\r\n"
