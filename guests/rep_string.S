# rep_string.S - REP INSB / REP OUTSB on the backdoor ports and on an unclaimed port.
#
# Xen's v14 forwarding excludes string I/O (data_is_addr), and VMware's high-bandwidth
# channel on 0x5659 is exactly REP INSB/OUTSB; this guest shows what each backend does
# with them. Each case starts with EAX = the magic, EBX = 0x0000bbbb, ECX = 4 (the
# count, which is also what a vmport device would read as the command), EDX = the port,
# a 16-byte buffer filled with a0 a1 .. af, and DF as named. One line per case:
#
#   <mode> rep.<insb|outsb>@<port>.df<0|1> eax=... ebx=... ecx=... edx=... <esi|edi>=buf+XXXXXXXX buf=<32 hex digits>
#
# Registers print as 32-bit values in every mode. <esi|edi> is the pointer the instruction advanced, as an offset from the buffer so the
# line is the same in every mode. INSB with DF = 0 stores at buf+4..buf+7, with DF = 1 at
# buf+11 down to buf+8; OUTSB reads the same bytes. Nothing here varies with time.

.include "lib.S"

.set COUNT, 4
# Ports: 0x5658 (backdoor), 0x5659 (high-bandwidth backdoor), 0x5660 (claimed by nothing).

# (\() separates a macro argument from what follows: without it GAS mis-substitutes
# "\op@\port" inside the string.)
.macro REPCASE op:req, port:req, df:req
    .pushsection .rodata
.Lrc\@: .asciz "rep.\op\()@\port\().df\df"
    .popsection
    movl $.Lrc\@, rs_label
    call fill_buffer
    movl $BDOOR_MAGIC, %eax
    movl $0x0000bbbb, %ebx
    movl $COUNT, %ecx
    movl $0x\port, %edx
  .if \df
    movl $(rsbuf + 11), %esi
    movl $(rsbuf + 11), %edi
    std
  .else
    movl $(rsbuf + 4), %esi
    movl $(rsbuf + 4), %edi
    cld
  .endif
  .ifc \op,insb
    rep insb
    cld
    movl %edi, rs_ptr
    movl $.Ledi, rs_ptrname
  .else
    rep outsb
    cld
    movl %esi, rs_ptr
    movl $.Lesi, rs_ptrname
  .endif
    call rs_dump
.endm

    .text
main:
    LINE "rep_string begin"
.irp port, 5658, 5659, 5660
  .irp op, insb, outsb
    .irp df, 0, 1
      REPCASE \op, \port, \df
    .endr
  .endr
.endr
    LINE "rep_string end"
    EXIT 0

# fill_buffer: rsbuf = a0 a1 ... af.
fill_buffer:
    PUSHR ax
    PUSHR cx
    xorl %ecx, %ecx
1:  leal 0xa0(%ecx), %eax
    movb %al, rsbuf(%ecx)
    incl %ecx
    cmpl $16, %ecx
    jb 1b
    POPR cx
    POPR ax
    ret

# rs_dump: print the result line of one case. Clobbers everything.
rs_dump:
    movl %eax, rs_regs + 0
    movl %ebx, rs_regs + 4
    movl %ecx, rs_regs + 8
    movl %edx, rs_regs + 12
    call put_prefix
    CHAR 32
    movl rs_label, %esi
    call puts
    xorl %ebx, %ebx
1:  CHAR 32
    leal rs_names(,%ebx,4), %esi
    movl $4, %ecx
    call putn
    movl rs_regs(,%ebx,4), %eax
    HEX32
    incl %ebx
    cmpl $4, %ebx
    jb 1b
    CHAR 32
    movl rs_ptrname, %esi
    call puts
    TEXT "=buf+"
    movl rs_ptr, %eax
    subl $rsbuf, %eax
    HEX32
    TEXT " buf="
    xorl %ebx, %ebx
2:  movzbl rsbuf(%ebx), %eax
    HEXN 2
    incl %ebx
    cmpl $16, %ebx
    jb 2b
    NEWLINE
    ret

    .section .rodata
rs_names: .ascii "eax=ebx=ecx=edx="
.Lesi:  .asciz "esi"
.Ledi:  .asciz "edi"

    .data
    .balign 4
rs_regs:    .fill 4, 4, 0
rs_label:   .long 0
rs_ptr:     .long 0
rs_ptrname: .long 0
rsbuf:      .fill 16, 1, 0
