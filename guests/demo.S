# demo.S - the built-in demo of `hvmport run` without a kernel.
#
# The Multiboot variant first shows what the boot loader passed (loader name, command
# line, memory, memory map). Then it asks the VMware backdoor the questions a guest's
# tools ask and says in plain words what came back, or that a command was not answered: all ones in EAX (EBX for GETHZ, whose
# "unsupported" answer is EBX = 0xffffffff). Unlike the battery, this output is for
# people and contains time-varying values; exit status 0 in every case.

.include "lib.S"

.set NOT_MAGIC, 0xa9b2a797

    .text
main:
.if MULTIBOOT
    call show_multiboot_info
.endif
    TEXT "hvmport demo: what the VMware backdoor (I/O port 0x5658) answers\n"

    # --- GETVERSION: is there a backdoor at all, and which product does it claim? ---
    BDCALL CMD_GETVERSION, ebx=NOT_MAGIC
    call keep
    TEXT "  GETVERSION    "
    cmpl $BDOOR_MAGIC, res_ebx
    jne 1f
    cmpl $0xffffffff, res_eax
    je 1f
    TEXT "backdoor present: version "
    movl res_eax, %eax
    DEC
    TEXT ", product type "
    movl res_ecx, %eax
    DEC
    TEXT " ("
    call put_product
    TEXT ")\n"
    jmp 2f
1:  TEXT "no VMware backdoor: EBX = 0x"
    movl res_ebx, %eax
    HEX32
    TEXT " (a backdoor answers 0x564d5868), EAX = 0x"
    movl res_eax, %eax
    HEX32
    NEWLINE
2:
    # --- GETHWVERSION ---
    BDCALL CMD_GETHWVERSION
    call keep
    TEXT "  GETHWVERSION  "
    call check_eax
    jc 1f
    TEXT "virtual hardware version "
    movl res_eax, %eax
    DEC
    NEWLINE
1:
    # --- GETMHZ ---
    BDCALL CMD_GETMHZ
    call keep
    TEXT "  GETMHZ        "
    call check_eax
    jc 1f
    TEXT "processor speed "
    movl res_eax, %eax
    DEC
    TEXT " MHz\n"
1:
    # --- GETHZ: EBX:EAX = TSC Hz, ECX = bus Hz; EBX = 0xffffffff means unsupported ---
    BDCALL CMD_GETHZ, ebx=0xffffffff
    call keep
    TEXT "  GETHZ         "
    cmpl $0xffffffff, res_ebx
    jne 1f
    TEXT "not answered (EBX = 0xffffffff: TSC frequency unknown; EAX = 0x"
    movl res_eax, %eax
    HEX32
    TEXT ")\n"
    jmp 2f
1:  TEXT "TSC frequency "
    movl res_eax, %eax
    movl res_ebx, %edx
    call put_mhz
    TEXT " MHz ("
    call putdec64
    TEXT " Hz), bus frequency "
    movl res_ecx, %eax
    xorl %edx, %edx
    call put_mhz
    TEXT " MHz\n"
2:
    # --- GETTIME: EAX = seconds since the epoch, EBX = microseconds ---
    BDCALL CMD_GETTIME
    call keep
    TEXT "  GETTIME       "
    call check_eax
    jc 1f
    movl res_eax, %eax
    DEC
    TEXT " s + "
    movl res_ebx, %eax
    DEC
    TEXT " us since the epoch = "
    movl res_eax, %eax
    call put_utc
    CHAR '.'
    movl res_ebx, %eax
    DECW 6
    TEXT " UTC; max time lag "
    movl res_ecx, %eax
    DEC
    TEXT " us, GMT offset "
    movl res_edx, %eax
    call put_signed
    TEXT " min\n"
1:
    TEXT "demo done\n"
    EXIT 0

.if MULTIBOOT
# show_multiboot_info: what the boot loader told us (Multiboot spec 3.3), so a run shows
# how hvmport's loader and QEMU's differ. Only the fields whose flag bit is set are read.
show_multiboot_info:
    cmpl $0x2badb002, mb_magic
    je 1f
    TEXT "multiboot: not started by a Multiboot loader (EAX = 0x"
    movl mb_magic, %eax
    HEX32
    TEXT ")\n"
    ret
1:  movl mb_info, %ebx
    TEXT "multiboot: info at 0x"
    movl %ebx, %eax
    HEX32
    TEXT ", flags 0x"
    movl (%ebx), %eax
    HEX32
    NEWLINE
    btl $9, (%ebx)
    jnc 2f
    TEXT "multiboot: boot loader \""
    movl 64(%ebx), %esi
    call puts
    TEXT "\"\n"
2:  btl $2, (%ebx)
    jnc 3f
    TEXT "multiboot: command line \""
    movl 16(%ebx), %esi
    call puts
    TEXT "\"\n"
3:  btl $0, (%ebx)
    jnc 4f
    TEXT "multiboot: memory "
    movl 4(%ebx), %eax
    DEC
    TEXT " KiB low, "
    movl 8(%ebx), %eax
    DEC
    TEXT " KiB above 1 MiB\n"
4:  btl $6, (%ebx)
    jnc 6f
    # Entries: size (not counting itself), base (64-bit), length (64-bit), type.
    movl 48(%ebx), %esi
    movl 44(%ebx), %ecx
    addl %esi, %ecx                         # end of the map
5:  cmpl %ecx, %esi
    jae 6f
    TEXT "multiboot: map 0x"
    movl 4(%esi), %eax
    movl 8(%esi), %edx
    call puthex64
    TEXT " +0x"
    movl 12(%esi), %eax
    movl 16(%esi), %edx
    call puthex64
    TEXT " type "
    movl 20(%esi), %eax
    DEC
    NEWLINE
    addl (%esi), %esi
    addl $4, %esi
    jmp 5b
6:  ret
.endif

# keep: store the six registers of the last backdoor call in res_*.
keep:
    movl %eax, res_eax
    movl %ebx, res_ebx
    movl %ecx, res_ecx
    movl %edx, res_edx
    movl %esi, res_esi
    movl %edi, res_edi
    ret

# check_eax: if res_eax is all ones, say so and return with CF set.
check_eax:
    cmpl $0xffffffff, res_eax
    je 1f
    clc
    ret
1:  TEXT "not answered (EAX = 0xffffffff)\n"
    stc
    ret

# put_product: the product name for the type in res_ecx (open-vm-tools' VMX types).
put_product:
    PUSHR ax
    PUSHR si
    movl res_ecx, %eax
    cmpl $5, %eax
    jbe 1f
    movl $6, %eax               # "unknown"
1:  movl products(,%eax,4), %esi
    call puts
    POPR si
    POPR ax
    ret

# put_mhz: print EDX:EAX Hz as MHz with three decimals (truncated).
put_mhz:
    PUSHR ax
    PUSHR bx
    PUSHR cx
    PUSHR dx
    movl $1000, %ebx
    call div64                  # kHz
    call div64                  # MHz, ECX = the kHz digits
    call putdec64
    CHAR '.'
    movl %ecx, %eax
    DECW 3
    POPR dx
    POPR cx
    POPR bx
    POPR ax
    ret

# put_signed: print EAX as a signed decimal.
put_signed:
    PUSHR ax
    testl %eax, %eax
    jns 1f
    CHAR '-'
    negl %eax
1:  DEC
    POPR ax
    ret

# put_utc: print EAX (seconds since 1970-01-01 UTC) as YYYY-MM-DD hh:mm:ss.
put_utc:
    PUSHR ax
    PUSHR bx
    PUSHR cx
    PUSHR dx
    PUSHR si
    xorl %edx, %edx
    movl $86400, %ebx
    divl %ebx                   # EAX = days, EDX = seconds into the day
    movl %edx, utc_tod
    movl $1970, %ecx
1:  call year_days              # EBX = days in year ECX
    cmpl %ebx, %eax
    jb 2f
    subl %ebx, %eax
    incl %ecx
    jmp 1b
2:  movl %ecx, utc_year
    xorl %esi, %esi             # month, 0-based
3:  movzbl month_days(%esi), %ebx
    cmpl $1, %esi
    jne 4f
    PUSHR bx
    call year_days
    cmpl $366, %ebx
    POPR bx
    jne 4f
    incl %ebx                   # February of a leap year
4:  cmpl %ebx, %eax
    jb 5f
    subl %ebx, %eax
    incl %esi
    jmp 3b
5:  movl %eax, %ebx             # day of month, 0-based
    movl utc_year, %eax
    DECW 4
    CHAR '-'
    leal 1(%esi), %eax
    DECW 2
    CHAR '-'
    leal 1(%ebx), %eax
    DECW 2
    CHAR 32
    movl utc_tod, %eax
    xorl %edx, %edx
    movl $3600, %ebx
    divl %ebx
    DECW 2
    CHAR ':'
    movl %edx, %eax
    xorl %edx, %edx
    movl $60, %ebx
    divl %ebx
    DECW 2
    CHAR ':'
    movl %edx, %eax
    DECW 2
    POPR si
    POPR dx
    POPR cx
    POPR bx
    POPR ax
    ret

# year_days: EBX = 365 or 366 for the year in ECX (Gregorian rules).
year_days:
    PUSHR ax
    PUSHR dx
    movl $365, %ebx
    movl %ecx, %eax
    testl $3, %eax
    jnz 2f                      # not divisible by 4
    xorl %edx, %edx
    PUSHR cx
    movl $100, %ecx
    divl %ecx
    POPR cx
    testl %edx, %edx
    jnz 1f                      # divisible by 4, not by 100: leap
    testl $3, %eax
    jnz 2f                      # divisible by 100, not by 400
1:  movl $366, %ebx
2:  POPR dx
    POPR ax
    ret

    .section .rodata
month_days:
    .byte 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31
p_unset:        .asciz "type not set"
p_express:      .asciz "Express"
p_esx:          .asciz "ESX Server"
p_server:       .asciz "Server"
p_workstation:  .asciz "Workstation"
p_ace:          .asciz "ACE"
p_unknown:      .asciz "unknown product"
    .balign 4
products:
    .long p_unset, p_express, p_esx, p_server, p_workstation, p_ace, p_unknown

    .data
    .balign 4
res_eax:    .long 0
res_ebx:    .long 0
res_ecx:    .long 0
res_edx:    .long 0
res_esi:    .long 0
res_edi:    .long 0
utc_tod:    .long 0
utc_year:   .long 0
