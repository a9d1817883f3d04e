/* The write-eviction race: threads keep writing pages that the evictor keeps
 * taking. A write that lands after the evictor copied a page but before the
 * zap (or one that is unprotected while the zap is in flight) is lost: the
 * page later comes back from the stale copy. Every word written here is the
 * round number, so a lost write shows up as an older round.
 *
 * Usage: hammer MIB THREADS ROUNDS [GROUP]
 * Each thread owns a slice of one MIB MiB anonymous mmap. In round r (1..R)
 * it walks its slice in groups of GROUP pages; within a group it stores r into
 * word 0 of every page, then word 1 of every page, and so on, so each page of
 * the group is being written for the whole time the group takes (the group's
 * pages are resident and old in fault order: exactly what the evictor picks).
 * After each group it re-reads a few pages from earlier in its slice (must
 * hold r everywhere) and a few from later (must still hold r-1). At the end
 * every word of the region must hold R.
 * Exit 0 when no write was lost; 1 with a message at the first bad word. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static volatile uint64_t *mem;
static size_t group = 128;
static unsigned rounds;
static int failed;

struct slice { size_t lo, hi; unsigned id; };

static int check_page(size_t page, uint64_t want, const char *when)
{
    volatile uint64_t *w = mem + page * WORDS;
    for (size_t i = 0; i < WORDS; i++) {
        uint64_t got = w[i];
        if (got != want) {
            fprintf(stderr, "hammer: %s: page %zu word %zu holds %llu, want %llu\n", when, page, i,
                    (unsigned long long)got, (unsigned long long)want);
            __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
            return 1;
        }
    }
    return 0;
}

static size_t next_random(uint64_t *state)
{
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return (size_t)*state;
}

static void *run(void *arg)
{
    struct slice *s = arg;
    uint64_t rng = 0x2545F4914F6CDD1Dull * (s->id + 1);
    for (uint64_t r = 1; r <= rounds; r++) {
        for (size_t g = s->lo; g < s->hi; g += group) {
            size_t end = g + group < s->hi ? g + group : s->hi;
            for (size_t i = 0; i < WORDS; i++)
                for (size_t p = g; p < end; p++)
                    mem[p * WORDS + i] = r;
            if (__atomic_load_n(&failed, __ATOMIC_RELAXED))
                return NULL;
            /* Written earlier in this round (including this group): r. */
            for (int k = 0; k < 4; k++)
                if (check_page(s->lo + next_random(&rng) % (end - s->lo), r, "re-read behind"))
                    return NULL;
            /* Not yet written in this round: the previous round's value. */
            if (end < s->hi)
                for (int k = 0; k < 2; k++)
                    if (check_page(end + next_random(&rng) % (s->hi - end), r - 1, "read ahead"))
                        return NULL;
        }
    }
    for (size_t p = s->lo; p < s->hi; p++)
        if (check_page(p, rounds, "final check"))
            return NULL;
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: hammer MIB THREADS ROUNDS [GROUP]\n");
        return 2;
    }
    size_t bytes = strtoull(argv[1], NULL, 10) << 20, npages = bytes / PAGE;
    int nthreads = atoi(argv[2]);
    rounds = (unsigned)atoi(argv[3]);
    if (argc > 4)
        group = strtoull(argv[4], NULL, 10);
    if (nthreads < 1 || nthreads > 64 || rounds < 1 || group < 1) {
        fprintf(stderr, "hammer: bad arguments\n");
        return 2;
    }
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("hammer: mmap");
        return 2;
    }
    mem = p;
    pthread_t threads[64];
    struct slice slices[64];
    for (int t = 0; t < nthreads; t++) {
        slices[t] = (struct slice){npages * t / nthreads, npages * (t + 1) / nthreads, (unsigned)t};
        pthread_create(&threads[t], NULL, run, &slices[t]);
    }
    for (int t = 0; t < nthreads; t++)
        pthread_join(threads[t], NULL);
    if (failed)
        return 1;
    printf("ok %zu pages %d threads %u rounds\n", npages, nthreads, rounds);
    return 0;
}
