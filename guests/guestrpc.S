# guestrpc.S - GuestRPC (backdoor command 30) the way open-vm-tools' lib/message does it.
#
# Each RPC opens an RPCI channel with cookies, sends the message (one `rep outsb` on the
# high-bandwidth port 0x5659 when SENDSIZE's status has the HB bit, else 4 bytes per
# SENDPAYLOAD), fetches the reply (`rep insb` or RECVPAYLOAD), acknowledges it with
# RECVSTATUS and closes the channel; then it prints
#     <mode> rpc <hb|lb> <reply>
# The RPCs: info-get guestinfo.x (the host sets x with --guestinfo), info-set
# guestinfo.fromguest, info-get of it, info-get of an unset key, an unknown command. A call
# whose status lacks SUCCESS prints "<mode> rpc failed at <step>" and the guest exits 2.
# A wrong cookie must be refused: "<mode> rpc bad cookie refused". It exits with status 0.

.include "lib.S"

.set CMD_MESSAGE, 30
.set PROTO_RPCI, 0x49435052
.set FLAG_COOKIE, 0x80000000
.set ST_SUCCESS, 0x00010000             # status bits as they appear in ECX / EBX
.set ST_DORECV, 0x00020000
.set ST_HB, 0x00800000

# MSG type: ECX = (type << 16) | 30, EDX = channel | 0x5658, ESI/EDI = the cookie.
.macro MSG type:req
    movl $BDOOR_MAGIC, %eax
    movl $((\type << 16) | CMD_MESSAGE), %ecx
    movl chan_hi, %edx
    orl $BDOOR_PORT, %edx
    movl cookie_hi, %esi
    movl cookie_lo, %edi
    inl %dx, %eax
.endm

.macro CHECK step:req
    testl $ST_SUCCESS, %ecx
    jnz 1f
    movl $.Lstep\@, %esi
    jmp rpc_failed
    .pushsection .rodata
.Lstep\@: .asciz "\step"
    .popsection
1:
.endm

.macro RPC text:req
    .pushsection .rodata
.Lrpc\@: .ascii "\text"
.Lrpc_end\@:
    .popsection
    movl $.Lrpc\@, %esi
    movl $(.Lrpc_end\@ - .Lrpc\@), %ecx
    call rpc
.endm

    .text
main:
    LINE "guestrpc begin"
    RPC "info-get guestinfo.x"
    RPC "info-set guestinfo.fromguest set by the guest"
    RPC "info-get guestinfo.fromguest"
    RPC "info-get guestinfo.unset"
    RPC "no-such-command"
    call bad_cookie
    LINE "guestrpc end"
    EXIT 0

# rpc: send the ECX bytes at ESI as one RPCI message and print the reply.
rpc:
    movl %esi, msg_ptr
    movl %ecx, msg_len
    movl $BDOOR_MAGIC, %eax                 # OPEN
    movl $(PROTO_RPCI | FLAG_COOKIE), %ebx
    movl $CMD_MESSAGE, %ecx
    movl $BDOOR_PORT, %edx
    xorl %esi, %esi
    xorl %edi, %edi
    inl %dx, %eax
    CHECK "open"
    andl $0xffff0000, %edx
    movl %edx, chan_hi
    movl %esi, cookie_hi
    movl %edi, cookie_lo
    movl msg_len, %ebx                      # SENDSIZE
    MSG 1
    CHECK "sendsize"
    testl $ST_HB, %ecx
    jz send_lb
    movb $'h', hb_char                      # one rep outsb: EDI = cookie low, EBP = high
    movl $BDOOR_MAGIC, %eax
    movl $ST_SUCCESS, %ebx
    movl msg_len, %ecx
    movl chan_hi, %edx
    orl $BDOORHB_PORT, %edx
    movl msg_ptr, %esi
    movl cookie_lo, %edi
    movl cookie_hi, %ebp
    cld
    rep outsb
    movl %ebx, %ecx
    CHECK "hb send"
    jmp receive
send_lb:
    movb $'l', hb_char
    movl msg_ptr, %ebp
    movl msg_len, %eax
    movl %eax, left
7:  cmpl $0, left
    jle receive
    movl (%ebp), %ebx                       # SENDPAYLOAD: 4 bytes (the host takes what is left)
    MSG 2
    CHECK "sendpayload"
    addl $4, %ebp
    subl $4, left
    jmp 7b
receive:
    MSG 3                                   # RECVSIZE
    CHECK "recvsize"
    testl $ST_DORECV, %ecx
    jnz 1f
    movl $.Lnoreply, %esi
    jmp rpc_failed
1:  movl %ebx, reply_len
    testl $ST_HB, %ecx
    jz receive_lb
    movl $BDOOR_MAGIC, %eax                 # one rep insb: ESI = cookie high, EBP = low
    movl $ST_SUCCESS, %ebx
    movl reply_len, %ecx
    movl chan_hi, %edx
    orl $BDOORHB_PORT, %edx
    movl cookie_hi, %esi
    movl $reply_buf, %edi
    movl cookie_lo, %ebp
    cld
    rep insb
    movl %ebx, %ecx
    CHECK "hb receive"
    jmp received
receive_lb:
    movl $reply_buf, %ebp
    movl reply_len, %eax
    movl %eax, left
8:  cmpl $0, left
    jle received
    movl $1, %ebx                           # RECVPAYLOAD
    MSG 4
    CHECK "recvpayload"
    movl %ebx, (%ebp)
    addl $4, %ebp
    subl $4, left
    jmp 8b
received:
    movl $1, %ebx                           # RECVSTATUS
    MSG 5
    CHECK "recvstatus"
    MSG 6                                   # CLOSE
    CHECK "close"
    call put_prefix
    TEXT " rpc "
    movb hb_char, %al
    call putc
    TEXT "b "
    movl $reply_buf, %esi
    movl reply_len, %ecx
    call putn
    NEWLINE
    ret

# bad_cookie: open a channel, then SENDSIZE with the cookie's low half changed.
bad_cookie:
    movl $BDOOR_MAGIC, %eax
    movl $(PROTO_RPCI | FLAG_COOKIE), %ebx
    movl $CMD_MESSAGE, %ecx
    movl $BDOOR_PORT, %edx
    inl %dx, %eax
    CHECK "open"
    andl $0xffff0000, %edx
    movl %edx, chan_hi
    movl %esi, cookie_hi
    xorl $1, %edi
    movl %edi, cookie_lo
    movl $4, %ebx
    MSG 1
    testl $ST_SUCCESS, %ecx
    jz 1f
    LINE "rpc bad cookie accepted"
    EXIT 3
1:  xorl $1, cookie_lo
    MSG 6
    CHECK "close"
    LINE "rpc bad cookie refused"
    ret

rpc_failed:
    call put_prefix
    TEXT " rpc failed at "
    call puts
    NEWLINE
    EXIT 2

    .section .rodata
.Lnoreply: .asciz "no reply"

    .data
    .balign 4
msg_ptr:    .long 0
msg_len:    .long 0
left:       .long 0
reply_len:  .long 0
chan_hi:    .long 0
cookie_hi:  .long 0
cookie_lo:  .long 0
hb_char:    .byte 0
    .balign 16
reply_buf:  .fill 256, 1, 0
