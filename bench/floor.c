/*
 * floor.c - the physical floor for a backdoor call on this host: a minimal KVM exit loop in
 * C, with sync regs, running the same flat guest image as `hvmport bench`.
 *
 * usage: floor IMAGE LOAD_ADDR ENTRY
 * The guest starts in 32-bit flat protected mode at ENTRY. Every IN is answered with
 * GETVERSION's EAX (6) and the registers are read and written through kvm_run's sync regs,
 * as hvmport does; bytes written to 0xe9 go to stdout (the benchmark times the markers the
 * guest prints around its loop) and an OUT to 0xf4 ends the run. Written by us for
 * hvmport's benchmark.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define MEM (64u << 20)

static void die(const char *what) { perror(what); exit(2); }

static void flat(struct kvm_segment *s, int code) {
    memset(s, 0, sizeof *s);
    s->base = 0; s->limit = 0xffffffff; s->selector = code ? 0x08 : 0x10;
    s->type = code ? 11 : 3; s->present = 1; s->dpl = 0; s->db = 1; s->s = 1; s->g = 1;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: floor IMAGE LOAD_ADDR ENTRY\n"); return 2; }
    unsigned long load = strtoul(argv[2], 0, 0), entry = strtoul(argv[3], 0, 0);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul) < 0) die("KVM_SET_TSS_ADDR");
    uint8_t *mem = mmap(0, MEM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    FILE *f = fopen(argv[1], "rb");
    if (!f) die(argv[1]);
    size_t n = fread(mem + load, 1, MEM - load, f);
    fclose(f);
    if (!n) die("empty image");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM, .userspace_addr = (uint64_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("memory region");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(0, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
    flat(&sregs.cs, 1); flat(&sregs.ds, 0); flat(&sregs.es, 0); flat(&sregs.fs, 0);
    flat(&sregs.gs, 0); flat(&sregs.ss, 0);
    sregs.cr0 |= 1;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = entry, .rflags = 2, .rsp = 0x10000};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
    run->kvm_valid_regs = KVM_SYNC_X86_REGS;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 3;
        }
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        if (run->io.direction == KVM_EXIT_IO_OUT) {
            if (run->io.port == 0xf4) return (data[0] << 1) | 1;
            if (run->io.port == 0xe9) { fputc(data[0], stdout); fflush(stdout); }
            continue;
        }
        /* The hypervisor's work for GETVERSION: look at the registers, answer. */
        struct kvm_regs *r = &run->s.regs.regs;
        if ((uint32_t)r->rax == 0x564D5868 && (r->rcx & 0xffff) == 10) {
            r->rbx = (r->rbx & ~0xffffffffull) | 0x564D5868;
            r->rcx = (r->rcx & ~0xffffffffull) | 2;
            r->rax = 6;
            run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
        }
        memset(data, 0xff, run->io.size);
        data[0] = 6;
    }
}
