/*
 * The public ABI hvmport implements, described in C by us from the facts in
 * shared/spec (xen-ioreq.md, vmware-port.md, guest-clients.md, qemu-vmport-vmmouse.md),
 * for a gcc cross-check of `hvmport abi --json`. Not copied from Xen's headers.
 */
#include <stdint.h>

#define uint64_aligned_t uint64_t __attribute__((aligned(8)))

struct ioreq {
    uint64_t addr;
    uint64_t data;
    uint32_t count;
    uint32_t size;
    uint32_t vp_eport;
    uint16_t _pad0;
    uint8_t state:4;
    uint8_t data_is_ptr:1;
    uint8_t dir:1;
    uint8_t df:1;
    uint8_t _pad1:1;
    uint8_t type;
};

struct buf_ioreq {
    uint8_t type;
    uint8_t pad:1;
    uint8_t dir:1;
    uint8_t size:2;
    uint32_t addr:20;
    uint32_t data;
};

struct buffered_iopage {
    uint32_t read_pointer;
    uint32_t write_pointer;
    struct buf_ioreq buf_ioreq[511];
};

struct shared_iopage { struct ioreq vcpu_ioreq[1]; };

struct vmware_regs { uint32_t esi, edi, ebx, ecx, edx; };
struct shared_vmport_iopage { struct vmware_regs vcpu_vmport_regs[1]; };
/* hvmport extension (issue 6, Jan Beulich's proposal): every 64-bit GPR but RSP, padded to
   a multiple of 16 bytes so that two vCPUs never share a cache line's worth of entry. */
struct vmport_gpr64 {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t _pad;
};

struct xen_dm_op_create_ioreq_server { uint8_t flags; uint8_t pad[3]; uint16_t id; };
struct xen_dm_op_get_ioreq_server_info {
    uint16_t id; uint16_t flags; uint32_t bufioreq_port;
    uint64_aligned_t ioreq_gfn; uint64_aligned_t bufioreq_gfn;
};
struct xen_dm_op_ioreq_server_range {
    uint16_t id; uint16_t pad; uint32_t type; uint64_aligned_t start, end;
};
struct xen_dm_op_set_ioreq_server_state { uint16_t id; uint8_t enabled; uint8_t pad; };
struct xen_dm_op_destroy_ioreq_server { uint16_t id; uint16_t pad; };
struct xen_dm_op_set_isa_irq_level { uint8_t isa_irq; uint8_t level; };
struct xen_dm_op_remote_shutdown { uint32_t reason; };

struct xen_dm_op {
    uint32_t op;
    uint32_t pad;
    union {
        struct xen_dm_op_create_ioreq_server create_ioreq_server;
        struct xen_dm_op_get_ioreq_server_info get_ioreq_server_info;
        struct xen_dm_op_ioreq_server_range map_io_range_to_ioreq_server;
        struct xen_dm_op_ioreq_server_range unmap_io_range_from_ioreq_server;
        struct xen_dm_op_set_ioreq_server_state set_ioreq_server_state;
        struct xen_dm_op_destroy_ioreq_server destroy_ioreq_server;
        struct xen_dm_op_set_isa_irq_level set_isa_irq_level;
        struct xen_dm_op_remote_shutdown remote_shutdown;
        /* Largest other 4.14 members (inject_event, relocate_memory) are 24 bytes. */
        uint8_t largest_member[24];
    } u;
};

struct xen_mem_acquire_resource {
    uint16_t domid; uint16_t type; uint32_t id; uint32_t nr_frames; uint32_t pad;
    uint64_aligned_t frame; uint64_aligned_t frame_list;
};

/* ioreq.h */
#define IOREQ_READ 1
#define IOREQ_WRITE 0
#define STATE_IOREQ_NONE 0
#define STATE_IOREQ_READY 1
#define STATE_IOREQ_INPROCESS 2
#define STATE_IORESP_READY 3
#define IOREQ_TYPE_PIO 0
#define IOREQ_TYPE_COPY 1
#define IOREQ_TYPE_PCI_CONFIG 2
#define IOREQ_TYPE_VMWARE_PORT_QEMU_COMPAT 3
#define IOREQ_TYPE_TIMEOFFSET 7
#define IOREQ_TYPE_INVALIDATE 8
#define IOREQ_TYPE_VMWARE_PORT 9
#define IOREQ_BUFFER_SLOT_NUM 511
/* params.h */
#define HVM_PARAM_IOREQ_PFN 5
#define HVM_PARAM_BUFIOREQ_PFN 6
#define HVM_PARAM_VMPORT_REGS_PFN 7
#define HVM_PARAM_BUFIOREQ_EVTCHN 26
#define HVM_PARAM_IOREQ_SERVER_PFN 32
#define HVM_PARAM_NR_IOREQ_SERVER_PAGES 33
/* libxc special pages, v14 */
#define X86_HVM_NR_SPECIAL_PAGES 9
#define X86_HVM_END_SPECIAL_REGION 0xff000
#define SPECIALPAGE_PAGING 0
#define SPECIALPAGE_ACCESS 1
#define SPECIALPAGE_SHARING 2
#define SPECIALPAGE_BUFIOREQ 3
#define SPECIALPAGE_XENSTORE 4
#define SPECIALPAGE_IOREQ 5
#define SPECIALPAGE_IDENT_PT 6
#define SPECIALPAGE_CONSOLE 7
#define SPECIALPAGE_VMPORT_REGS 8
#define XEN_X86_EMU_VMWARE_PORT (1U << 11)
/* dm_op.h / hvm_op.h / memory.h */
#define __HYPERVISOR_dm_op 41
#define XEN_DMOP_create_ioreq_server 1
#define XEN_DMOP_get_ioreq_server_info 2
#define XEN_DMOP_map_io_range_to_ioreq_server 3
#define XEN_DMOP_unmap_io_range_from_ioreq_server 4
#define XEN_DMOP_set_ioreq_server_state 5
#define XEN_DMOP_destroy_ioreq_server 6
#define XEN_DMOP_set_isa_irq_level 9
#define XEN_DMOP_remote_shutdown 12
#define XEN_DMOP_map_mem_type_to_ioreq_server 15
#define XEN_DMOP_set_irq_level 19
#define XEN_DMOP_nr_vcpus 20
#define SHUTDOWN_poweroff 0
#define SHUTDOWN_reboot 1
#define SHUTDOWN_suspend 2
#define SHUTDOWN_crash 3
#define SHUTDOWN_watchdog 4
#define SHUTDOWN_MAX 4
#define XEN_DMOP_no_gfns 1
#define XEN_DMOP_IO_RANGE_PORT 0
#define XEN_DMOP_IO_RANGE_MEMORY 1
#define XEN_DMOP_IO_RANGE_PCI 2
#define XEN_DMOP_IO_RANGE_TIMEOFFSET 7
#define XEN_DMOP_IO_RANGE_VMWARE_PORT 9
#define HVM_IOREQSRV_BUFIOREQ_OFF 0
#define HVM_IOREQSRV_BUFIOREQ_LEGACY 1
#define HVM_IOREQSRV_BUFIOREQ_ATOMIC 2
#define HVM_IOREQSRV_BUFIOREQ_MASK 3
#define HVM_IOREQSRV_DISABLE_VMPORT 4
#define HVM_IOREQSRV_FLAGS_MASK 7
#define MAX_NR_IOREQ_SERVERS 8
#define MAX_NR_IO_RANGES 256
#define XENMEM_acquire_resource 28
#define XENMEM_resource_ioreq_server 0
#define XENMEM_resource_ioreq_server_frame_bufioreq 0
#define HVMPORT_RESOURCE_IOREQ_SERVER_FRAME_VMPORT 0x100
#define HVMPORT_IOREQSRV_VMPORT_QEMU_TYPE (1 << 3)
#define HVMPORT_VMPORT_EBP_OFFSET 0xA00
#define HVMPORT_IOREQSRV_VMPORT_TRANSPORT_SHIFT 4
#define HVMPORT_IOREQSRV_VMPORT_TRANSPORT_MASK (3 << 4)
#define HVMPORT_VMPORT_TRANSPORT_REGS_PAGE 0
#define HVMPORT_VMPORT_TRANSPORT_IOREQ_UNION 1
#define HVMPORT_VMPORT_TRANSPORT_GPR64 2
#define HVMPORT_VMPORT_TRANSPORT_THREE_EXCHANGE 3
#define HVMPORT_IOREQSRV_EXT_MASK (HVMPORT_IOREQSRV_VMPORT_QEMU_TYPE | HVMPORT_IOREQSRV_VMPORT_TRANSPORT_MASK)
#define VMPORT_GPR64_ENTRY_SIZE 128
#define VMPORT_GPR64_PER_PAGE 32
/* VMware backdoor */
#define BDOOR_MAGIC 0x564D5868
#define BDOOR_PORT 0x5658
#define BDOORHB_PORT 0x5659
#define BDOOR_CMD_GETMHZ 1
#define BDOOR_CMD_GETPTRLOCATION 4
#define BDOOR_CMD_SETPTRLOCATION 5
#define BDOOR_CMD_GETVERSION 10
#define BDOOR_CMD_GETHWVERSION 17
#define BDOOR_CMD_GETUUID 19
#define BDOOR_CMD_GETMEMSIZE 20
#define BDOOR_CMD_GETTIME 23
#define BDOOR_CMD_MESSAGE 30
#define BDOOR_CMD_ISMOUSEABSOLUTE 36
#define BDOOR_CMD_ABSPOINTER_DATA 39
#define BDOOR_CMD_ABSPOINTER_STATUS 40
#define BDOOR_CMD_ABSPOINTER_COMMAND 41
#define BDOOR_CMD_GETHZ 45
#define BDOOR_CMD_GETTIMEFULL 46
#define BDOOR_CMD_GETTIMEFULL_WITH_LAG 55
#define BDOOR_CMD_NESTING_CONTROL 63
#define BDOOR_CMD_GET_VCPU_INFO 68
#define BDOOR_CMD_ABSPOINTER_RESTRICT 86
#define BDOOR_CMD_STEALCLOCK 91
#define BDOOR_CMD_GETBUILDNUM 100
#define BDOOR_CMD_MAX 105
#define BDOORHB_CMD_MESSAGE 0
#define BDOORHB_CMD_VASSERT 1
#define BDOOR_CMD_VCPU_SYNC_VTSCS 1
#define BDOOR_CMD_VCPU_LEGACY_X2APIC_OK 3
#define BDOOR_CMD_VCPU_MMIO_HONORS_PAT 4
#define BDOOR_CMD_VCPU_RESERVED 31
#define VERSION_MAGIC 6
#define VMX_TYPE_UNSET 0
#define VMX_TYPE_EXPRESS 1
#define VMX_TYPE_SCALABLE_SERVER 2
#define VMX_TYPE_WGS 3
#define VMX_TYPE_WORKSTATION 4
#define VMX_TYPE_WORKSTATION_ENTERPRISE 5
#define VMMOUSE_READ_ID 0x45414552
#define VMMOUSE_DISABLE 0x000000F5
#define VMMOUSE_REQUEST_RELATIVE 0x4C455252
#define VMMOUSE_REQUEST_ABSOLUTE 0x53424152
#define VMMOUSE_VERSION 0x3442554A
#define VMMOUSE_QUEUE_SIZE 1024
#define VMMOUSE_RELATIVE_PACKET 0x00010000
#define VMMOUSE_LEFT_BUTTON 0x20
#define VMMOUSE_RIGHT_BUTTON 0x10
#define VMMOUSE_MIDDLE_BUTTON 0x08
#define MESSAGE_TYPE_OPEN 0
#define MESSAGE_TYPE_SENDSIZE 1
#define MESSAGE_TYPE_SENDPAYLOAD 2
#define MESSAGE_TYPE_RECVSIZE 3
#define MESSAGE_TYPE_RECVPAYLOAD 4
#define MESSAGE_TYPE_RECVSTATUS 5
#define MESSAGE_TYPE_CLOSE 6
#define MESSAGE_STATUS_SUCCESS 0x0001
#define MESSAGE_STATUS_DORECV 0x0002
#define MESSAGE_STATUS_CLOSED 0x0004
#define MESSAGE_STATUS_UNSENT 0x0008
#define MESSAGE_STATUS_CPT 0x0010
#define MESSAGE_STATUS_POWEROFF 0x0020
#define MESSAGE_STATUS_TIMEOUT 0x0040
#define MESSAGE_STATUS_HB 0x0080
#define GUESTMSG_FLAG_COOKIE 0x80000000
#define GUESTRPC_PROTOCOL_RPCI 0x49435052
#define GUESTRPC_PROTOCOL_TCLO 0x4F4C4354
