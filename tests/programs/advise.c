/* umgr_advise() under `umgr exec`: each mode writes a known pattern, gives a
 * hint, waits (with mincore) for its asynchronous effect where there is one,
 * and checks every byte. Exit 0 when all is as the hint promises; 1 and a
 * message otherwise; 2 for a usage error.
 *
 *   advise cold MIB                 COLD on a filled region: it leaves RAM
 *                                   without budget pressure, comes back intact
 *   advise willneed MIB hint|nohint COLD, then (hint) WILLNEED: the region is
 *                                   back before it is touched
 *   advise discard MIB PRESSURE_MIB hint|nohint
 *                                   (hint) DISCARDABLE on a filled region, a
 *                                   quarter of it rewritten after the hint,
 *                                   then PRESSURE_MIB more memory filled: the
 *                                   rewritten pages keep their data, the others
 *                                   read as their data or (dropped) as zero
 *   advise errors                   the error convention (EINVAL, ENOMEM)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "../../bindings/shim/umgr.h"

#define PAGE 4096
#define WAIT_SECONDS 30

static uint64_t word_for(size_t page, size_t word, unsigned round)
{
    return (page * 0x9E3779B97F4A7C15ull) ^ (word * 0xBF58476D1CE4E5B9ull) ^ (round + 1);
}

static void fill_page(uint8_t *mem, size_t page, unsigned round)
{
    uint64_t *w = (uint64_t *)(mem + page * PAGE);
    for (size_t i = 0; i < PAGE / 8; i++)
        w[i] = word_for(page, i, round);
}

/* 0: the page holds `round`; 1: all zero; -1: anything else (reported). */
static int page_is(const uint8_t *mem, size_t page, unsigned round, const char *what)
{
    const uint64_t *w = (const uint64_t *)(mem + page * PAGE);
    if (w[0] == word_for(page, 0, round)) {
        for (size_t i = 1; i < PAGE / 8; i++)
            if (w[i] != word_for(page, i, round))
                goto bad;
        return 0;
    }
    for (size_t i = 0; i < PAGE / 8; i++)
        if (w[i] != 0)
            goto bad;
    return 1;
bad:
    fprintf(stderr, "advise: %s page %zu is neither round %u nor zero (word0 %016llx)\n", what, page, round,
            (unsigned long long)w[0]);
    return -1;
}

static uint8_t *map(size_t bytes)
{
    uint8_t *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    return p;
}

static size_t resident_pages(uint8_t *mem, size_t npages)
{
    static unsigned char *vec;
    static size_t vec_len;
    if (vec_len < npages) {
        free(vec);
        vec = malloc(npages);
        vec_len = npages;
    }
    if (mincore(mem, npages * PAGE, vec) != 0) {
        perror("mincore");
        exit(1);
    }
    size_t n = 0;
    for (size_t i = 0; i < npages; i++)
        n += vec[i] & 1;
    return n;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Wait until at most `most` (or, with at_least, at least `most`) pages of the
 * region are resident; exits 1 on timeout. Returns the seconds waited. */
static double wait_resident(uint8_t *mem, size_t npages, size_t count, int at_least, const char *why)
{
    double start = now();
    for (;;) {
        size_t r = resident_pages(mem, npages);
        if (at_least ? r >= count : r <= count)
            return now() - start;
        if (now() - start > WAIT_SECONDS) {
            fprintf(stderr, "advise: %s: %zu of %zu pages resident after %d s\n", why, r, npages, WAIT_SECONDS);
            exit(1);
        }
        usleep(2000);
    }
}

static long major_faults(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_majflt;
}

static void advise_or_die(void *addr, size_t len, int advice)
{
    if (umgr_hint(addr, len, advice) != 0) {
        fprintf(stderr, "advise: umgr_advise(%p, %zu, %d): %s\n", addr, len, advice, strerror(errno));
        exit(1);
    }
}

static int verify_all(uint8_t *mem, size_t npages, unsigned round, const char *what)
{
    for (size_t p = 0; p < npages; p++)
        if (page_is(mem, p, round, what) != 0) {
            fprintf(stderr, "advise: %s page %zu is not round %u\n", what, p, round);
            return 1;
        }
    return 0;
}

static int cold(size_t mib)
{
    size_t npages = (mib << 20) / PAGE;
    uint8_t *mem = map(npages * PAGE);
    for (size_t p = 0; p < npages; p++)
        fill_page(mem, p, 0);
    advise_or_die(mem, npages * PAGE, UMGR_ADVISE_COLD);
    double waited = wait_resident(mem, npages, npages / 16, 0, "COLD");
    if (verify_all(mem, npages, 0, "cold"))
        return 1;
    printf("ok cold %zu pages, out in %.3f s\n", npages, waited);
    return 0;
}

static int willneed(size_t mib, int hint)
{
    size_t npages = (mib << 20) / PAGE;
    uint8_t *mem = map(npages * PAGE);
    for (size_t p = 0; p < npages; p++)
        fill_page(mem, p, 0);
    advise_or_die(mem, npages * PAGE, UMGR_ADVISE_COLD);
    wait_resident(mem, npages, 0, 0, "COLD before WILLNEED");
    double waited = 0;
    if (hint) {
        advise_or_die(mem, npages * PAGE, UMGR_ADVISE_WILLNEED);
        waited = wait_resident(mem, npages, npages, 1, "WILLNEED");
    }
    long before = major_faults();
    if (verify_all(mem, npages, 0, "willneed"))
        return 1;
    printf("ok willneed %zu pages, in after %.3f s, %ld major faults while reading\n", npages, waited,
           major_faults() - before);
    return 0;
}

static int discard(size_t mib, size_t pressure_mib, int hint)
{
    size_t npages = (mib << 20) / PAGE;
    uint8_t *mem = map(npages * PAGE);
    for (size_t p = 0; p < npages; p++)
        fill_page(mem, p, 0);
    if (hint)
        advise_or_die(mem, npages * PAGE, UMGR_ADVISE_DISCARDABLE);
    /* Writes after the hint: these pages must keep their data. */
    for (size_t p = 0; p < npages; p += 4)
        fill_page(mem, p, 1);
    size_t nb = (pressure_mib << 20) / PAGE;
    uint8_t *b = map(nb * PAGE);
    for (size_t p = 0; p < nb; p++)
        fill_page(b, p, 7);
    if (verify_all(b, nb, 7, "pressure"))
        return 1;
    size_t zero = 0, intact = 0, rewritten = 0;
    for (size_t p = 0; p < npages; p++) {
        int r = page_is(mem, p, p % 4 == 0 ? 1 : 0, "discardable");
        if (r < 0)
            return 1;
        if (p % 4 == 0) {
            if (r != 0) {
                fprintf(stderr, "advise: page %zu was written after the hint but reads as zero\n", p);
                return 1;
            }
            rewritten++;
        } else if (r == 1) {
            if (!hint) {
                fprintf(stderr, "advise: page %zu reads as zero without a hint\n", p);
                return 1;
            }
            zero++;
        } else {
            intact++;
        }
    }
    printf("ok discard zero %zu intact %zu rewritten %zu\n", zero, intact, rewritten);
    return 0;
}

static int expect(int rc, int err, int want_err, const char *what)
{
    if (want_err == 0 ? rc == 0 : rc == -1 && err == want_err)
        return 0;
    fprintf(stderr, "advise: %s: got %d (%s), want %s\n", what, rc, rc ? strerror(err) : "ok",
            want_err ? strerror(want_err) : "0");
    return 1;
}

static int errors(void)
{
    size_t len = 4 << 20;
    uint8_t *mem = map(len);
    memset(mem, 1, len);
    int bad = 0, rc;
    rc = umgr_hint(mem, len, 42);
    bad |= expect(rc, errno, EINVAL, "unknown advice 42");
    rc = umgr_hint(mem, len, 0);
    bad |= expect(rc, errno, EINVAL, "advice 0");
    rc = umgr_hint(mem + 1, PAGE, UMGR_ADVISE_COLD);
    bad |= expect(rc, errno, EINVAL, "unaligned address");
    uint8_t *small = map(PAGE * 4); /* below UMGR_MIN_REGION: not managed */
    small[0] = 1;
    rc = umgr_hint(small, PAGE * 4, UMGR_ADVISE_COLD);
    bad |= expect(rc, errno, ENOMEM, "unmanaged range");
    rc = umgr_hint(mem, 0, UMGR_ADVISE_COLD);
    bad |= expect(rc, errno, 0, "empty range");
    for (int advice = UMGR_ADVISE_COLD; advice <= UMGR_ADVISE_DISCARDABLE; advice++) {
        rc = umgr_hint(mem, len, advice);
        bad |= expect(rc, errno, 0, "valid advice");
    }
    /* Still a working connection after the errors: the data is intact. */
    for (size_t i = 0; i < len; i++)
        if (mem[i] != 1 && mem[i] != 0) {
            fprintf(stderr, "advise: byte %zu is %d\n", i, mem[i]);
            return 1;
        }
    if (!bad)
        printf("ok errors\n");
    return bad;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "errors"))
        return errors();
    if (!umgr_is_managed || !umgr_is_managed()) {
        fprintf(stderr, "advise: not managed by umgr\n");
        return 1;
    }
    if (argc == 3 && !strcmp(argv[1], "cold"))
        return cold(strtoul(argv[2], NULL, 10));
    if (argc == 4 && !strcmp(argv[1], "willneed"))
        return willneed(strtoul(argv[2], NULL, 10), !strcmp(argv[3], "hint"));
    if (argc == 5 && !strcmp(argv[1], "discard"))
        return discard(strtoul(argv[2], NULL, 10), strtoul(argv[3], NULL, 10), !strcmp(argv[4], "hint"));
    fprintf(stderr, "usage: advise cold MIB | willneed MIB hint|nohint | discard MIB PRESSURE_MIB hint|nohint | errors\n");
    return 2;
}
