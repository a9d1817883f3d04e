/* mprotect on managed memory that is paged out, being evicted, or resident
 * while the daemon wants it out. Every byte is checked; mincore() tells
 * which pages are in memory, so the program can say that the pages it is
 * about to touch really had left (or really stayed).
 *
 * Usage: mprotect MIB [C_MIB] (MIB >= 32; run it with a budget of MIB/8)
 * One anonymous mmap, in parts (MiB offsets for MIB = 64, C_MIB = 1):
 *   A [0, 8)   paged out, made read-only, read back (swap-in into a
 *              read-only page), made read-write again and rewritten;
 *   B [8, 16)  paged out, made PROT_NONE, then read-write, read back and
 *              rewritten;
 *   C [16, 17) brought in, then kept PROT_NONE while everything else is
 *              swept twice (the daemon wants its pages out but cannot read
 *              them); then read-write, checked and rewritten, and never
 *              touched again until the final check (c_in_at_end says how
 *              much of it the later sweeps left in memory);
 *   E [17, 19) brought in, made read-only, swept out while read-only, read
 *              back read-only; then read-write, rewritten, swept out again
 *              and read back;
 *   F [19, 27) one thread flips pieces of it between read-only, PROT_NONE
 *              and read-write (checking what it may read) while the main
 *              thread sweeps the filler: mprotect racing eviction;
 *   filler     the rest: swept (checked and rewritten) to push pages out.
 * Prints one "figure NAME VALUE" line per measurement, then "ok N pages".
 * Exit 0 when all is intact; 1 and a message at the first wrong word. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MIB_PAGES 256

static uint8_t *mem;
static size_t npages;
static uint8_t *round_of;   /* expected round per page (unmanaged: malloc'd small) */

static uint64_t word_for(size_t page, size_t word, unsigned round)
{
    return (page * 0x9E3779B97F4A7C15ull) ^ (word * 0xBF58476D1CE4E5B9ull) ^ ((uint64_t)round << 48) ^ 0x3C;
}

static void check(size_t lo, size_t n, const char *what)
{
    for (size_t p = lo; p < lo + n; p++) {
        const volatile uint64_t *w = (const volatile uint64_t *)(mem + p * PAGE);
        for (size_t i = 0; i < WORDS; i++) {
            uint64_t got = w[i], want = word_for(p, i, round_of[p]);
            if (got != want) {
                fprintf(stderr, "mprotect: %s: page %zu word %zu: %016llx, want %016llx (round %u)\n", what, p, i,
                        (unsigned long long)got, (unsigned long long)want, round_of[p]);
                fflush(stderr);
                _exit(1);
            }
        }
    }
}

static void fill(size_t lo, size_t n, unsigned round)
{
    for (size_t p = lo; p < lo + n; p++) {
        uint64_t *w = (uint64_t *)(mem + p * PAGE);
        for (size_t i = 0; i < WORDS; i++)
            w[i] = word_for(p, i, round);
        round_of[p] = (uint8_t)round;
    }
}

/* Check, then rewrite with the next round. */
static void sweep(size_t lo, size_t n, const char *what)
{
    check(lo, n, what);
    for (size_t p = lo; p < lo + n; p++)
        fill(p, 1, round_of[p] + 1u);
}

static size_t in_memory(size_t lo, size_t n)
{
    unsigned char *vec = malloc(n);
    if (!vec || mincore(mem + lo * PAGE, n * PAGE, vec)) {
        perror("mprotect: mincore");
        _exit(2);
    }
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        count += vec[i] & 1;
    free(vec);
    return count;
}

static void protect(size_t lo, size_t n, int prot)
{
    if (mprotect(mem + lo * PAGE, n * PAGE, prot)) {
        perror("mprotect: mprotect");
        _exit(2);
    }
}

static void figure(const char *name, size_t value)
{
    printf("figure %s %zu\n", name, value);
    fflush(stdout);
}

/* ---- F: mprotect racing eviction ------------------------------------------ */
static size_t f_lo, f_n;
static volatile int stop_flipping;
static size_t flips;

static void *flipper(void *arg)
{
    (void)arg;
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    while (!stop_flipping) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        size_t len = 1 + rng % 64, lo = f_lo + (rng >> 20) % (f_n - len);
        switch ((rng >> 8) % 3) {
        case 0:
            protect(lo, len, PROT_READ);
            check(lo, len, "F read-only piece");
            break;
        case 1:
            protect(lo, len, PROT_NONE);
            break;
        default:
            protect(lo, len, PROT_READ | PROT_WRITE);
            check(lo, len, "F read-write piece");
            break;
        }
        flips++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 0;
    size_t c_mib = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
    if (mib < 32 || c_mib < 1 || c_mib > mib / 8) {
        fprintf(stderr, "usage: mprotect MIB [C_MIB] (MIB >= 32, 1 <= C_MIB <= MIB/8)\n");
        return 2;
    }
    npages = mib * MIB_PAGES;
    size_t eighth = npages / 8;
    size_t a_lo = 0, b_lo = eighth, c_lo = 2 * eighth, c_n = c_mib * MIB_PAGES, e_lo = c_lo + c_n, e_n = 2 * MIB_PAGES;
    f_lo = e_lo + e_n;
    f_n = eighth;
    size_t rest_lo = f_lo + f_n, rest_n = npages - rest_lo;
    round_of = calloc(npages, 1);
    mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED || !round_of) {
        perror("mprotect: mmap");
        return 2;
    }
    fill(0, npages, 0);

    /* A: swap-in into read-only pages. */
    figure("a_out", eighth - in_memory(a_lo, eighth));
    protect(a_lo, eighth, PROT_READ);
    check(a_lo, eighth, "A read-only after paging out");
    figure("a_in_after_read", in_memory(a_lo, eighth));
    protect(a_lo, eighth, PROT_READ | PROT_WRITE);
    sweep(a_lo, eighth, "A read-write again");

    /* B: PROT_NONE and back while paged out. */
    figure("b_out", eighth - in_memory(b_lo, eighth));
    protect(b_lo, eighth, PROT_NONE);
    protect(b_lo, eighth, PROT_READ | PROT_WRITE);
    sweep(b_lo, eighth, "B after PROT_NONE and back");

    /* C: PROT_NONE while the daemon wants it out. */
    check(c_lo, c_n, "C before PROT_NONE");
    figure("c_in_before", in_memory(c_lo, c_n));
    protect(c_lo, c_n, PROT_NONE);
    sweep(rest_lo, rest_n, "filler, C PROT_NONE (1)");
    sweep(rest_lo, rest_n, "filler, C PROT_NONE (2)");
    figure("c_in_after_sweeps", in_memory(c_lo, c_n));
    protect(c_lo, c_n, PROT_READ | PROT_WRITE);
    check(c_lo, c_n, "C after PROT_NONE during eviction");
    sweep(c_lo, c_n, "C rewritten");

    /* E: evicted while read-only, read back read-only. */
    check(e_lo, e_n, "E before read-only");
    protect(e_lo, e_n, PROT_READ);
    figure("e_in_before", in_memory(e_lo, e_n));
    sweep(rest_lo, rest_n, "filler, E read-only");
    figure("e_out_read_only", e_n - in_memory(e_lo, e_n));
    check(e_lo, e_n, "E read back read-only");
    protect(e_lo, e_n, PROT_READ | PROT_WRITE);
    sweep(e_lo, e_n, "E read-write again");
    sweep(rest_lo, rest_n, "filler, E read-write");
    figure("e_out_read_write", e_n - in_memory(e_lo, e_n));
    check(e_lo, e_n, "E read back read-write");

    /* F: mprotect racing eviction. */
    pthread_t flip;
    pthread_create(&flip, NULL, flipper, NULL);
    for (int i = 0; i < 2; i++)
        sweep(rest_lo, rest_n, "filler, F flipping");
    stop_flipping = 1;
    pthread_join(flip, NULL);
    figure("f_flips", flips);
    protect(f_lo, f_n, PROT_READ | PROT_WRITE);
    sweep(f_lo, f_n, "F after flipping");

    figure("c_in_at_end", in_memory(c_lo, c_n));
    check(0, npages, "final check");
    printf("ok %zu pages\n", npages);
    return 0;
}
