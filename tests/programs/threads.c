/* Many threads paging one region: each thread owns a private slice and one
 * word in THREADS of every page of a shared slice, so every shared page is
 * written by all threads at once (WP faults and fills of one page racing from
 * many threads) while each word still has exactly one writer and a known
 * value.
 *
 * Usage: threads PRIVATE_MIB SHARED_MIB THREADS PASSES [hold]
 * PASSES is a string of s (sequential), r (random: a permutation), b
 * (backwards), or "-" for none; each letter is one round.
 * Round 0 fills everything. In round r (1..ROUNDS) each thread checks its
 * private slice (round r-1) and rewrites it with r, in the order given by the
 * r-th letter of PASSES, then checks and rewrites
 * its words of every shared page, starting at its own place; after a barrier
 * it checks every word (all threads' words) of the shared pages p with
 * p % THREADS == its id, then waits at a second barrier. At the end every
 * private page is checked once more.
 * Exit 0 and "ok N pages T threads R rounds rss_kb K" when all is intact;
 * 1 and a message at the first wrong word. With "hold" the ok line is
 * printed, then the program waits for EOF on stdin before exiting (so a test
 * can look at the live target's figures once its work is done). */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "rss.h"

#define PAGE 4096
#define WORDS (PAGE / 8)

static volatile uint64_t *mem;
static size_t private_pages, shared_pages, shared_lo;
static unsigned nthreads, rounds;
static const char *passes;
static pthread_barrier_t barrier;

static uint64_t word_for(size_t page, size_t word, unsigned round)
{
    return (page * 0x9E3779B97F4A7C15ull) ^ (word * 0xBF58476D1CE4E5B9ull) ^ ((uint64_t)round << 56) ^ 0x77;
}

static void fail(const char *what, unsigned id, size_t page, size_t word, uint64_t got, unsigned round)
{
    fprintf(stderr, "threads: thread %u, %s: page %zu word %zu: %016llx, want %016llx (round %u)\n", id, what,
            page, word, (unsigned long long)got, (unsigned long long)word_for(page, word, round), round);
    fflush(stderr);
    _exit(1);
}

static void check_words(size_t page, size_t first, size_t step, unsigned round, unsigned id, const char *what)
{
    volatile uint64_t *w = mem + page * WORDS;
    for (size_t i = first; i < WORDS; i += step) {
        uint64_t got = w[i];
        if (got != word_for(page, i, round))
            fail(what, id, page, i, got, round);
    }
}

static void fill_words(size_t page, size_t first, size_t step, unsigned round)
{
    volatile uint64_t *w = mem + page * WORDS;
    for (size_t i = first; i < WORDS; i += step)
        w[i] = word_for(page, i, round);
}

static size_t gcd(size_t a, size_t b)
{
    while (b) {
        size_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

/* The k-th page (0 <= k < n) of a pass over [lo, lo+n) in round r. */
static size_t nth(size_t lo, size_t n, size_t k, unsigned r, size_t stride)
{
    switch (passes[r - 1]) {
    case 'r': return lo + (k * stride + 12345) % n;     /* a permutation: gcd(stride, n) == 1 */
    case 'b': return lo + n - 1 - k;
    default: return lo + k;
    }
}

static void *run(void *arg)
{
    unsigned id = (unsigned)(uintptr_t)arg;
    size_t lo = private_pages * id / nthreads, hi = private_pages * (id + 1) / nthreads, n = hi - lo;
    size_t stride = 2654435761u % (n ? n : 1);
    while (n && gcd(stride, n) != 1)
        stride++;
    size_t start = shared_pages * id / nthreads;   /* where this thread begins its shared walk */

    for (size_t p = lo; p < hi; p++)
        fill_words(p, 0, 1, 0);
    for (size_t k = 0; k < shared_pages; k++)
        fill_words(shared_lo + (start + k) % shared_pages, id, nthreads, 0);
    pthread_barrier_wait(&barrier);

    for (unsigned r = 1; r <= rounds; r++) {
        for (size_t k = 0; k < n; k++) {
            size_t p = nth(lo, n, k, r, stride);
            check_words(p, 0, 1, r - 1, id, "private slice");
            fill_words(p, 0, 1, r);
        }
        for (size_t k = 0; k < shared_pages; k++) {
            size_t p = shared_lo + (start + k) % shared_pages;
            check_words(p, id, nthreads, r - 1, id, "own words of a shared page");
            fill_words(p, id, nthreads, r);
        }
        pthread_barrier_wait(&barrier);
        for (size_t p = id; p < shared_pages; p += nthreads)
            check_words(shared_lo + p, 0, 1, r, id, "shared page after the barrier");
        pthread_barrier_wait(&barrier);
    }
    for (size_t p = lo; p < hi; p++)
        check_words(p, 0, 1, rounds, id, "final check");
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: threads PRIVATE_MIB SHARED_MIB THREADS PASSES [hold]\n");
        return 2;
    }
    private_pages = (strtoull(argv[1], NULL, 10) << 20) / PAGE;
    shared_pages = (strtoull(argv[2], NULL, 10) << 20) / PAGE;
    nthreads = (unsigned)atoi(argv[3]);
    passes = strcmp(argv[4], "-") == 0 ? "" : argv[4];
    rounds = (unsigned)strlen(passes);
    int hold = argc > 5 && strcmp(argv[5], "hold") == 0;
    if (nthreads < 1 || nthreads > 256 || (shared_pages && nthreads > WORDS)) {
        fprintf(stderr, "threads: bad thread count\n");
        return 2;
    }
    shared_lo = private_pages;
    size_t bytes = (private_pages + shared_pages) * PAGE;
    void *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("threads: mmap");
        return 2;
    }
    mem = m;
    pthread_barrier_init(&barrier, NULL, nthreads);
    pthread_t tids[256];
    for (unsigned t = 0; t < nthreads; t++)
        if (pthread_create(&tids[t], NULL, run, (void *)(uintptr_t)t)) {
            perror("threads: pthread_create");
            return 2;
        }
    for (unsigned t = 0; t < nthreads; t++)
        pthread_join(tids[t], NULL);
    printf("ok %zu pages %u threads %u rounds rss_kb %ld\n", private_pages + shared_pages, nthreads, rounds, rss_kb());
    fflush(stdout);
    if (hold) {
        char buf[64];
        while (read(0, buf, sizeof buf) > 0)
            ;
    }
    return 0;
}
