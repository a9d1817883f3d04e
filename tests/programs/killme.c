/* Pages as hard as it can until it is killed: a target to SIGKILL at any
 * moment of its daemon's eviction pipeline (HELLO, registration, WP, read,
 * store, zap, fill). Every word it reads is checked, so a wrong page seen
 * before the kill makes it exit 1 instead of dying of the signal.
 *
 * Usage: killme MIB THREADS
 * Each thread owns a slice of one anonymous mmap (MIB MiB); it fills it, then
 * loops forever: a sequential pass that checks and rewrites each page, a
 * backwards one, and a random one that only checks. Never exits 0. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static volatile uint64_t *mem;

static uint64_t word_for(size_t page, size_t word, uint64_t round)
{
    return (page * 0x9E3779B97F4A7C15ull) ^ (word * 0xBF58476D1CE4E5B9ull) ^ (round << 40);
}

static void check(size_t page, uint64_t round)
{
    for (size_t i = 0; i < WORDS; i++) {
        uint64_t got = mem[page * WORDS + i];
        if (got != word_for(page, i, round)) {
            fprintf(stderr, "killme: page %zu word %zu: %016llx, want %016llx (round %llu)\n", page, i,
                    (unsigned long long)got, (unsigned long long)word_for(page, i, round),
                    (unsigned long long)round);
            fflush(stderr);
            _exit(1);
        }
    }
}

static void fill(size_t page, uint64_t round)
{
    for (size_t i = 0; i < WORDS; i++)
        mem[page * WORDS + i] = word_for(page, i, round);
}

struct slice { size_t lo, hi; };

static void *run(void *arg)
{
    struct slice *s = arg;
    size_t n = s->hi - s->lo;
    uint64_t rng = 0x2545F4914F6CDD1Dull ^ s->lo, round = 0;
    for (size_t p = s->lo; p < s->hi; p++)
        fill(p, round);
    for (;;) {
        for (size_t p = s->lo; p < s->hi; p++) {
            check(p, round);
            fill(p, round + 1);
        }
        round++;
        for (size_t p = s->hi; p-- > s->lo;) {
            check(p, round);
            fill(p, round + 1);
        }
        round++;
        for (size_t k = 0; k < n; k++) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            check(s->lo + rng % n, round);
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: killme MIB THREADS\n");
        return 2;
    }
    size_t npages = (strtoull(argv[1], NULL, 10) << 20) / PAGE;
    int nthreads = atoi(argv[2]);
    if (nthreads < 1 || nthreads > 64 || (size_t)nthreads > npages) {
        fprintf(stderr, "killme: bad thread count\n");
        return 2;
    }
    void *m = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("killme: mmap");
        return 2;
    }
    mem = m;
    pthread_t tids[64];
    struct slice slices[64];
    for (int t = 0; t < nthreads; t++) {
        slices[t] = (struct slice){npages * t / nthreads, npages * (t + 1) / nthreads};
        pthread_create(&tids[t], NULL, run, &slices[t]);
    }
    for (int t = 0; t < nthreads; t++)
        pthread_join(tids[t], NULL);
    return 0;
}
