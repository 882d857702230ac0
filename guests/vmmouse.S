# vmmouse.S - backdoor commands the device model answers, and the whole vmmouse sequence.
#
# Under hvmport these go to the device-model process as IOREQ_TYPE_VMWARE_PORT requests
# (the hypervisor answers only GETMHZ, GETVERSION, GETHWVERSION, GETHZ, GETTIME and
# GETTIMEFULL itself); under `qemu-system-x86_64 -machine pc,vmport=on` QEMU's own vmport
# and vmmouse answer. Output uses the battery's line format (battery.S), section "p32".
#
# Sections:
#   1. machine commands: GETVERSION (the probe a vmmouse client such as Linux's driver
#      makes first; under hvmport the hypervisor answers it), GETRAMSIZE, GETBIOSUUID,
#      GET_VCPU_INFO, and commands nobody implements (GETBUILDNUM, MESSAGE,
#      GETTIMEFULL_WITH_LAG, STEALCLOCK, ...);
#   2. vmmouse: STATUS while disabled, READ_ID, STATUS, DATA(1) = the version,
#      REQUEST_ABSOLUTE, the DATA errors that disable the mouse (0, 7, more than queued),
#      re-enabling with READ_ID, REQUEST_RELATIVE, an unknown sub-command, DISABLE, OUT
#      forms, and ECX with its high half set (X.org sets only the low 16 bits);
#   3. (Multiboot variant with "pointer=N" on its command line) absolute mode, then it prints "vmmouse waiting for N pointer packets" and
#      polls STATUS until N packets (4 dwords each) have arrived from the host, printing
#      each as "p32 packet buttons=XXXXXXXX x=XXXXXXXX y=XXXXXXXX z=XXXXXXXX".
# It exits with status 0.

.include "lib.S"

.set CMD_GETRAMSIZE, 20
.set CMD_GETBIOSUUID, 19
.set CMD_GET_VCPU_INFO, 68
.set CMD_DATA, 39
.set CMD_STATUS, 40
.set CMD_COMMAND, 41
.set CMD_RESTRICT, 86
.set READ_ID, 0x45414552
.set DISABLE, 0x000000f5
.set REL, 0x4c455252
.set ABS, 0x53424152

    .text
main:
    LINE "vmmouse begin"
    # --- 1. machine commands -----------------------------------------------------------
    BD GETVERSION.in4, ecx=CMD_GETVERSION
    BD GETRAMSIZE.in4, ecx=CMD_GETRAMSIZE
    BD GETBIOSUUID.in4, ecx=CMD_GETBIOSUUID
    BD GET_VCPU_INFO.in4, ecx=CMD_GET_VCPU_INFO
    BD GETBUILDNUM.in4, ecx=100, ebx=0x11111111, esi=0x22222222, edi=0x33333333
    BD MESSAGE.in4, ecx=30, ebx=0x49435052, esi=0x22222222, edi=0x33333333
    BD GETTIMEFULL_WITH_LAG.in4, ecx=55, ebx=0x11111111
    BD STEALCLOCK.in4, ecx=91, ebx=0, esi=0, edi=1
    BD GETRAMSIZE.out4, op=out, ecx=CMD_GETRAMSIZE
    BD GETRAMSIZE.in2, size=2, ecx=CMD_GETRAMSIZE
    # --- 2. vmmouse ----------------------------------------------------------------------
    BD STATUS.disabled.in4, ecx=CMD_STATUS
    BD COMMAND.READ_ID.in4, ecx=CMD_COMMAND, ebx=READ_ID
    BD STATUS.after_read_id.in4, ecx=CMD_STATUS
    BD DATA.1.in4, ecx=CMD_DATA, ebx=1
    BD STATUS.empty.in4, ecx=CMD_STATUS
    BD RESTRICT.in4, ecx=CMD_RESTRICT, ebx=1
    BD COMMAND.ABS.in4, ecx=CMD_COMMAND, ebx=ABS
    BD DATA.0.in4, ecx=CMD_DATA, ebx=0
    BD STATUS.after_data0.in4, ecx=CMD_STATUS
    BD COMMAND.READ_ID.2.in4, ecx=CMD_COMMAND, ebx=READ_ID
    BD DATA.7.in4, ecx=CMD_DATA, ebx=7
    BD STATUS.after_data7.in4, ecx=CMD_STATUS
    BD COMMAND.READ_ID.3.in4, ecx=CMD_COMMAND, ebx=READ_ID
    BD STATUS.queued_two.in4, ecx=CMD_STATUS
    BD DATA.2.in4, ecx=CMD_DATA, ebx=2
    BD STATUS.after_data2.in4, ecx=CMD_STATUS
    BD COMMAND.READ_ID.4.in4, ecx=CMD_COMMAND, ebx=READ_ID
    BD STATUS.hi16.in4, ecx=0xffff0000 | CMD_STATUS
    BD DATA.4.in4, ecx=CMD_DATA, ebx=4
    BD STATUS.out4, op=out, ecx=CMD_STATUS
    BD COMMAND.REL.in4, ecx=CMD_COMMAND, ebx=REL
    BD COMMAND.unknown.in4, ecx=CMD_COMMAND, ebx=0x12345678
    BD COMMAND.DISABLE.in4, ecx=CMD_COMMAND, ebx=DISABLE
    BD STATUS.after_disable.in4, ecx=CMD_STATUS
    BD DATA.1.disabled.in4, ecx=CMD_DATA, ebx=1
    LINE "vmmouse end"

    # --- 3. host pointer events ----------------------------------------------------------
    call packets_wanted
    testl %eax, %eax
    jz done
    movl %eax, %ebp
    BDCALL CMD_COMMAND, ebx=READ_ID
    BDCALL CMD_STATUS
    BDCALL CMD_DATA, ebx=1                  # the version READ_ID queued
    BDCALL CMD_COMMAND, ebx=ABS
    TEXT "p32 vmmouse waiting for "
    movl %ebp, %eax
    DEC
    TEXT " pointer packets"
    NEWLINE
next_packet:
    BDCALL CMD_STATUS
    cmpl $0xffff0000, %eax
    jae status_error
    andl $0xffff, %eax
    cmpl $4, %eax
    jb next_packet
    BDCALL CMD_DATA, ebx=4
    TEXT "p32 packet buttons="
    HEX32
    TEXT " x="
    movl %ebx, %eax
    HEX32
    TEXT " y="
    movl %ecx, %eax
    HEX32
    TEXT " z="
    movl %edx, %eax
    HEX32
    NEWLINE
    decl %ebp
    jnz next_packet
done:
    LINE "vmmouse done"
    EXIT 0
status_error:
    LINE "vmmouse status error"
    EXIT 2

# packets_wanted: EAX = N from the command line "pointer=N" (Multiboot only), 0 when
# absent. Only one digit is read: enough for a test, and nothing to overflow.
packets_wanted:
.if MULTIBOOT
    xorl %eax, %eax
    movl mb_info, %esi
    testl $4, (%esi)                        # flags bit 2: command line present
    jz 2f
    movl 16(%esi), %esi
1:  cmpb $0, (%esi)
    je 2f
    cmpl $0x6e696f70, (%esi)                # "poin"
    jne 3f
    cmpl $0x3d726574, 4(%esi)               # "ter="
    jne 3f
    movzbl 8(%esi), %eax
    subl $0x30, %eax
    cmpl $9, %eax
    jbe 2f
    xorl %eax, %eax
    jmp 2f
3:  incl %esi
    jmp 1b
2:  ret
.else
    xorl %eax, %eax
    ret
.endif
