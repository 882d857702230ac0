/* probe: a small user-mode Linux program for hvmport's user backend (--backend user).
 *
 * It uses port I/O and CPUID the way the VMware tools do, from ring 3, and prints one
 * stable line per result, so tests compare output. `probe TEST...` runs the named tests:
 *   cpuid      hypervisor bit and the 0x40000000 signature
 *   version    GETVERSION with `in %dx,%eax` (EAX, EBX, ECX after the call)
 *   forms      every IN/OUT form against the debug console (0xe9 reads 0xe9 per byte;
 *              writes go to hvmport's console), REP INSB/INSW/OUTSB with DF = 0 and 1
 *   sigill     UD2 reaches the program's own SIGILL handler
 *   sigsegv    a SIGSEGV handler around a backdoor call: reports whether it was called
 *   fork       a forked child calls GETVERSION; the parent reports its exit status
 *   thread     a second thread calls GETVERSION
 *   exec       execs itself to run `version`
 *   uart       REP OUTSB to the device model's UART (0x3f8), DF = 0 then 1: string I/O
 *              that leaves the hypervisor as data_is_ptr requests
 *   call:N     backdoor command N (decimal) with `in %dx,%eax`: EAX..EDX after the call
 *   loop:N:C   N backdoor calls of command C between "[" and "]" on the debug console
 *              (hvmport bench times the markers)
 *   exit:N     exits with status N
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAGIC 0x564D5868u
#define PORT 0x5658

void probe_cpuid(uint32_t leaf, uint32_t sub, uint32_t out[4]);

static void getversion(const char *who)
{
    uint32_t a = MAGIC, b = ~MAGIC, c = 10, d = PORT;
    __asm__ volatile("inl %%dx, %%eax" : "+a"(a), "+b"(b), "+c"(c), "+d"(d));
    printf("%s: eax=%08x ebx=%08x ecx=%08x\n", who, a, b, c);
    fflush(stdout);
}

static void test_cpuid(void)
{
    uint32_t r[4];
    char sig[13];
    probe_cpuid(1, 0, r);
    printf("cpuid: hypervisor bit %u\n", r[2] >> 31);
    probe_cpuid(0x40000000, 0, r);
    memcpy(sig, &r[1], 4);
    memcpy(sig + 4, &r[2], 4);
    memcpy(sig + 8, &r[3], 4);
    sig[12] = 0;
    printf("cpuid: 0x40000000 max=%08x signature \"%s\"\n", r[0], sig);
    probe_cpuid(0x40000010, 0, r);
    printf("cpuid: 0x40000010 tsc_khz nonzero %d bus_khz %u\n", r[0] != 0, r[1]);
}

static void test_forms(void)
{
    uint64_t rax = 0x1122334455667788ull;
    uint8_t buf[8];
    uint16_t wbuf[3];
    __asm__ volatile("inb $0xe9, %%al" : "+a"(rax));
    printf("forms: inb imm rax=%016llx\n", (unsigned long long)rax);
    rax = 0x1122334455667788ull;
    __asm__ volatile("inw %%dx, %%ax" : "+a"(rax) : "d"(0xe9));
    printf("forms: inw dx rax=%016llx\n", (unsigned long long)rax);
    rax = 0x1122334455667788ull;
    __asm__ volatile("inl $0xe9, %%eax" : "+a"(rax));
    printf("forms: inl imm rax=%016llx\n", (unsigned long long)rax);
    fflush(stdout);
    __asm__ volatile("outb %%al, $0xe9" : : "a"('['));
    __asm__ volatile("outb %%al, %%dx" : : "a"('<'), "d"(0xe9));
    __asm__ volatile("outw %%ax, %%dx" : : "a"(0x4142), "d"(0xe9)); /* low byte: 'B' */
    __asm__ volatile("outl %%eax, $0xe9" : : "a"(0x43));
    {
        const char *up = "up", *down = "nwod";
        const char *s = up;
        uint64_t n = 2;
        __asm__ volatile("cld; rep outsb" : "+S"(s), "+c"(n) : "d"(0xe9) : "memory");
        s = down + 3;
        n = 4;
        __asm__ volatile("std; rep outsb; cld" : "+S"(s), "+c"(n) : "d"(0xe9) : "memory");
        printf("forms: outs advanced rsi %ld, left rcx %llu\n", (long)(s - down),
               (unsigned long long)n);
    }
    __asm__ volatile("outb %%al, $0xe9" : : "a"(']'));
    __asm__ volatile("outb %%al, $0xe9" : : "a"('\n'));
    {
        uint8_t *p = buf + 1;
        uint64_t n = 3;
        memset(buf, 0, sizeof buf);
        __asm__ volatile("cld; rep insb" : "+D"(p), "+c"(n) : "d"(0xe9) : "memory");
        printf("forms: rep insb %02x %02x %02x %02x %02x rdi+%ld\n", buf[0], buf[1],
               buf[2], buf[3], buf[4], (long)(p - buf));
        uint16_t *w = wbuf + 2;
        n = 2;
        memset(wbuf, 0, sizeof wbuf);
        __asm__ volatile("std; rep insw; cld" : "+D"(w), "+c"(n) : "d"(0xe9) : "memory");
        printf("forms: rep insw down %04x %04x %04x rdi%+ld\n", wbuf[0], wbuf[1], wbuf[2],
               (long)(w - wbuf) - 2);
    }
    fflush(stdout);
}

static void on_sigill(int sig, siginfo_t *info, void *uc_)
{
    ucontext_t *uc = uc_;
    (void)sig;
    printf("sigill: handler called, si_code %d\n", info->si_code);
    uc->uc_mcontext.gregs[REG_RIP] += 2;
}

static sigjmp_buf segv_jump;

static void on_sigsegv(int sig)
{
    (void)sig;
    siglongjmp(segv_jump, 1);
}

static void test_sigsegv(void)
{
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigsegv;
    sigaction(SIGSEGV, &sa, &old);
    if (sigsetjmp(segv_jump, 1) == 0) {
        getversion("sigsegv");
        printf("sigsegv: no fault\n");
    } else {
        printf("sigsegv: the backdoor faulted\n");
    }
    sigaction(SIGSEGV, &old, NULL);
}

static void *thread_main(void *arg)
{
    getversion(arg);
    return NULL;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++) {
        const char *t = argv[i];
        if (!strcmp(t, "cpuid")) {
            test_cpuid();
        } else if (!strcmp(t, "version")) {
            getversion("version");
        } else if (!strcmp(t, "forms")) {
            test_forms();
        } else if (!strcmp(t, "sigill")) {
            struct sigaction sa;
            memset(&sa, 0, sizeof sa);
            sa.sa_sigaction = on_sigill;
            sa.sa_flags = SA_SIGINFO;
            sigaction(SIGILL, &sa, NULL);
            __asm__ volatile("ud2");
            printf("sigill: resumed after ud2\n");
        } else if (!strcmp(t, "sigsegv")) {
            test_sigsegv();
        } else if (!strcmp(t, "fork")) {
            pid_t pid = fork();
            if (pid == 0) {
                getversion("fork child");
                _exit(7);
            }
            int status = 0;
            waitpid(pid, &status, 0);
            printf("fork: child exited with %d\n", WEXITSTATUS(status));
        } else if (!strcmp(t, "thread")) {
            pthread_t th;
            pthread_create(&th, NULL, thread_main, "thread");
            pthread_join(th, NULL);
        } else if (!strcmp(t, "exec")) {
            fflush(stdout);
            execl("/proc/self/exe", argv[0], "version", (char *)NULL);
            perror("exec");
            return 99;
        } else if (!strcmp(t, "uart")) {
            const char *up = "up\n", *down = "\nnwod";
            const char *p = up;
            uint64_t n = 3;
            __asm__ volatile("cld; rep outsb" : "+S"(p), "+c"(n) : "d"(0x3f8) : "memory");
            p = down + 4;
            n = 5;
            __asm__ volatile("std; rep outsb; cld" : "+S"(p), "+c"(n) : "d"(0x3f8) : "memory");
        } else if (!strncmp(t, "call:", 5)) {
            uint32_t a = MAGIC, b = 0, c = (uint32_t)atoi(t + 5), d = PORT;
            __asm__ volatile("inl %%dx, %%eax" : "+a"(a), "+b"(b), "+c"(c), "+d"(d));
            printf("call %s: eax=%08x ebx=%08x ecx=%08x edx=%08x\n", t + 5, a, b, c, d);
        } else if (!strncmp(t, "loop:", 5)) {
            char *rest;
            long n = strtol(t + 5, &rest, 10);
            uint32_t cmd = (uint32_t)atoi(rest + 1);
            __asm__ volatile("outb %%al, $0xe9" : : "a"('['));
            for (long k = 0; k < n; k++) {
                uint32_t a = MAGIC, b = 0, c = cmd, d = PORT;
                __asm__ volatile("inl %%dx, %%eax" : "+a"(a), "+b"(b), "+c"(c), "+d"(d));
            }
            __asm__ volatile("outb %%al, $0xe9" : : "a"(']'));
        } else if (!strncmp(t, "exit:", 5)) {
            fflush(stdout);
            return atoi(t + 5);
        } else {
            fprintf(stderr, "probe: unknown test %s\n", t);
            return 2;
        }
    }
    return 0;
}
