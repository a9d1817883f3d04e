/* Writes to pages KSM merged while umgr relied on their write-protection:
 * usage ksmwrite MIB [clean|discardable].
 *
 * The process asks KSM to merge all its memory (PR_SET_MEMORY_MERGE), fills
 * MIB MiB with pages all alike, has them paged out (COLD) and reads them
 * back (in write-protected, keeping their swap copies, as `--clean-copies
 * always` has it), waits for KSM to merge them, then writes a byte of each
 * page and has them paged out again. KSM maps the merged page without the
 * write-protect bit, so those writes raise no fault: a page umgr still
 * took for clean would leave with its old copy, the write lost. With
 * "discardable" the pages are not paged out first but hinted DISCARDABLE
 * (write-protected, to be dropped unless written) before KSM merges them:
 * a page written unseen would be dropped, the write read back as zeros.
 * Exit 0 and
 * "ok" when every page has its write; 1 and a message otherwise; 2 when
 * the machine cannot run the test (KSM off: the test turns it on). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "../../bindings/shim/umgr.h"

#define PAGE 4096
#ifndef PR_SET_MEMORY_MERGE
#define PR_SET_MEMORY_MERGE 67
#endif

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static size_t resident(uint8_t *mem, size_t npages)
{
    unsigned char vec[npages];
    if (mincore(mem, npages * PAGE, vec) != 0)
        return npages;
    size_t n = 0;
    for (size_t i = 0; i < npages; i++)
        n += vec[i] & 1;
    return n;
}

static int paged_out(uint8_t *mem, size_t npages, const char *when)
{
    if (umgr_hint(mem, npages * PAGE, UMGR_ADVISE_COLD) != 0) {
        perror("ksmwrite: umgr_hint");
        return 0;
    }
    for (double until = now() + 30; now() < until; usleep(10000))
        if (resident(mem, npages) <= npages / 10)
            return 1;
    fprintf(stderr, "ksmwrite: %s, %zu of %zu pages still resident\n", when, resident(mem, npages), npages);
    return 0;
}

static long merging_pages(void)
{
    FILE *f = fopen("/proc/self/ksm_stat", "r");
    char line[128];
    long n = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "ksm_merging_pages %ld", &n) == 1)
            break;
    if (f)
        fclose(f);
    return n;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    size_t npages = strtoull(argv[1], NULL, 10) << 8;
    if (prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0) {
        perror("ksmwrite: PR_SET_MEMORY_MERGE");
        return 2;
    }
    uint8_t *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return 2;
    memset(mem, 0x5A, npages * PAGE);
    unsigned sum = 0;
    if (argc > 2 && strcmp(argv[2], "discardable") == 0) {
        if (umgr_hint(mem, npages * PAGE, UMGR_ADVISE_DISCARDABLE) != 0) {
            perror("ksmwrite: DISCARDABLE");
            return 1;
        }
    } else {
        if (!paged_out(mem, npages, "first eviction"))
            return 1;
        for (size_t i = 0; i < npages; i++)   /* back in, read only: clean copies */
            sum += mem[i * PAGE];
    }
    long merged = 0;
    for (double until = now() + 30; now() < until && (merged = merging_pages()) <= 0; usleep(20000))
        ;
    if (merged <= 0) {
        fprintf(stderr, "ksmwrite: KSM merged nothing in 30 s (sum %u)\n", sum);
        return 2;
    }
    for (size_t i = 0; i < npages; i++)
        mem[i * PAGE] = (uint8_t)(i + 1);
    if (!paged_out(mem, npages, "second eviction"))
        return 1;
    for (size_t i = 0; i < npages; i++)
        for (size_t b = 0; b < PAGE; b++) {
            uint8_t want = b == 0 ? (uint8_t)(i + 1) : 0x5A;
            if (mem[i * PAGE + b] != want) {
                fprintf(stderr, "ksmwrite: page %zu byte %zu is %#x, want %#x (%ld pages were merged)\n",
                        i, b, mem[i * PAGE + b], want, merged);
                return 1;
            }
        }
    printf("ok\n");
    return 0;
}
