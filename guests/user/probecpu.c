/* The CPUID half of the probe, in a shared library so that the supervisor must find it
 * when the dynamic loader maps it (mmap with PROT_EXEC), not only at exec. */
#include <stdint.h>

void probe_cpuid(uint32_t leaf, uint32_t sub, uint32_t out[4])
{
    __asm__ volatile("cpuid"
                     : "=a"(out[0]), "=b"(out[1]), "=c"(out[2]), "=d"(out[3])
                     : "a"(leaf), "c"(sub));
}
