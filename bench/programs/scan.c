/* Sequential scan workload for the paging benchmark.
 *
 * Usage: scan MIB [PASSES]
 *
 * mmaps MIB MiB of anonymous private memory, writes a pattern over every
 * word of every page (the first touch), then makes PASSES sequential read
 * passes that sum one 8-byte word per 64 bytes, so every page is faulted in
 * each pass. Each phase is timed with CLOCK_MONOTONIC. The sums are checked
 * against the value computed from the pattern formula: exit 1 on mismatch.
 *
 * Prints one JSON line on stdout:
 *   {"mib":..,"pages":..,"first_touch_s":..,"pass_s":[..],"checksum":..,
 *    "majflt":[first touch, pass 1, ..],"minflt":[..],
 *    "pswpin":[..],"pswpout":[..]}
 * majflt/minflt are getrusage deltas per phase; pswpin/pswpout are deltas of
 * the global /proc/vmstat counters per phase (kernel swap only; 0 otherwise).
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

#define PAGE 4096
#define STRIDE_WORDS 8 /* one word per 64 bytes */
#define MAX_PASSES 64

/* Never zero, different on every page and word: neither the kernel's
 * zero-page swap shortcut nor umgr's zero-page detection applies. */
static inline uint64_t word_for(uint64_t page, uint64_t word)
{
    return ((page + 1) * 0x9E3779B97F4A7C15ull) ^ (word * 0xBF58476D1CE4E5B9ull) ^ 0x5555555555555555ull;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct counters { long majflt, minflt; long long pswpin, pswpout; };

static void sample(struct counters *c)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    c->majflt = ru.ru_majflt;
    c->minflt = ru.ru_minflt;
    c->pswpin = c->pswpout = 0;
    FILE *f = fopen("/proc/vmstat", "r");
    if (!f)
        return;
    char key[64];
    long long value;
    while (fscanf(f, "%63s %lld", key, &value) == 2) {
        if (!strcmp(key, "pswpin"))
            c->pswpin = value;
        else if (!strcmp(key, "pswpout"))
            c->pswpout = value;
    }
    fclose(f);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: scan MIB [PASSES]\n");
        return 2;
    }
    size_t mib = strtoull(argv[1], NULL, 10);
    int passes = argc > 2 ? atoi(argv[2]) : 1;
    if (mib == 0 || passes < 0 || passes > MAX_PASSES) {
        fprintf(stderr, "scan: need MIB > 0 and 0 <= PASSES <= %d\n", MAX_PASSES);
        return 2;
    }
    size_t len = mib << 20, npages = len / PAGE;
    uint8_t *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("scan: mmap");
        return 2;
    }

    /* The expected sum of one read pass, from the formula (no memory). */
    uint64_t expected = 0;
    for (size_t p = 0; p < npages; p++)
        for (size_t w = 0; w < PAGE / 8; w += STRIDE_WORDS)
            expected += word_for(p, w);

    struct counters c[MAX_PASSES + 2];
    double t[MAX_PASSES + 2];
    sample(&c[0]);
    t[0] = now();
    for (size_t p = 0; p < npages; p++) {
        uint64_t *words = (uint64_t *)(mem + p * PAGE);
        for (size_t w = 0; w < PAGE / 8; w++)
            words[w] = word_for(p, w);
    }
    t[1] = now();
    sample(&c[1]);

    uint64_t sums[MAX_PASSES];
    for (int k = 0; k < passes; k++) {
        uint64_t sum = 0;
        for (size_t p = 0; p < npages; p++) {
            const volatile uint64_t *words = (const volatile uint64_t *)(mem + p * PAGE);
            for (size_t w = 0; w < PAGE / 8; w += STRIDE_WORDS)
                sum += words[w];
        }
        t[k + 2] = now();
        sample(&c[k + 2]);
        sums[k] = sum;
    }

    int bad = 0;
    for (int k = 0; k < passes; k++)
        if (sums[k] != expected) {
            fprintf(stderr, "scan: pass %d checksum %016" PRIx64 ", want %016" PRIx64 "\n", k + 1, sums[k], expected);
            bad = 1;
        }

    printf("{\"mib\": %zu, \"pages\": %zu, \"first_touch_s\": %.6f, \"pass_s\": [", mib, npages, t[1] - t[0]);
    for (int k = 0; k < passes; k++)
        printf("%s%.6f", k ? ", " : "", t[k + 2] - t[k + 1]);
    printf("], \"checksum\": \"%016" PRIx64 "\", \"ok\": %s", expected, bad ? "false" : "true");
#define SERIES(name, field)                                                      \
    do {                                                                         \
        printf(", \"" name "\": [");                                             \
        for (int k = 0; k <= passes; k++)                                        \
            printf("%s%lld", k ? ", " : "", (long long)(c[k + 1].field - c[k].field)); \
        printf("]");                                                             \
    } while (0)
    SERIES("majflt", majflt);
    SERIES("minflt", minflt);
    SERIES("pswpin", pswpin);
    SERIES("pswpout", pswpout);
    printf("}\n");
    fflush(stdout);
    munmap(mem, len);
    return bad;
}
