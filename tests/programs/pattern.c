/* Writes a known pattern over MiB of anonymous memory, then checks every
 * byte in several passes. Exit 0 when all is intact; 1 and a message at the
 * first wrong byte. Usage: pattern MIB [mmap|malloc] [PASSES] [THREADS]
 * PASSES is a string of s (sequential), r (random), b (backwards); a final
 * + runs them again and again until stdin reaches EOF (a victim that pages
 * for as long as a test needs, however fast the machine).
 * With THREADS > 1 each thread owns a slice and runs the same passes. */
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "rss.h"

#define PAGE 4096

static uint8_t *mem;
static size_t npages;
static const char *passes = "srb";
static int nthreads = 1;
static int failed;
static int until_eof;   /* PASSES ended in + */
static int stdin_ended;

/* Whether stdin has reached EOF (or is gone); never blocks. Only the first
 * thread looks (two could both see data and one block in read); the others
 * read what it found. */
static int stdin_at_eof(void)
{
    if (__atomic_load_n(&stdin_ended, __ATOMIC_RELAXED))
        return 1;
    struct pollfd p = {.fd = 0, .events = POLLIN};
    char c;
    if (poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR | POLLNVAL) || read(0, &c, 1) <= 0))
        __atomic_store_n(&stdin_ended, 1, __ATOMIC_RELAXED);
    return __atomic_load_n(&stdin_ended, __ATOMIC_RELAXED);
}

static uint64_t word_for(size_t page, size_t word, unsigned round)
{
    return (page * 0x9E3779B97F4A7C15ull) ^ (word * 0xBF58476D1CE4E5B9ull) ^ round;
}

static void fill_page(size_t page, unsigned round)
{
    uint64_t *w = (uint64_t *)(mem + page * PAGE);
    for (size_t i = 0; i < PAGE / 8; i++)
        w[i] = word_for(page, i, round);
}

static int check_page(size_t page, unsigned round)
{
    uint64_t *w = (uint64_t *)(mem + page * PAGE);
    for (size_t i = 0; i < PAGE / 8; i++)
        if (w[i] != word_for(page, i, round)) {
            fprintf(stderr, "pattern: page %zu word %zu: %016llx, want %016llx (round %u)\n", page, i,
                    (unsigned long long)w[i], (unsigned long long)word_for(page, i, round), round);
            return 1;
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

struct slice { size_t lo, hi; unsigned id; };

static void *run(void *arg)
{
    struct slice *s = arg;
    size_t n = s->hi - s->lo;
    unsigned round = 0;
    for (size_t p = s->lo; p < s->hi; p++)
        fill_page(p, round);
    do {
        for (const char *pass = passes; *pass && *pass != '+'; pass++) {
            uint64_t rng = 88172645463325252ull + s->id;
            for (size_t k = 0; k < n && !__atomic_load_n(&failed, __ATOMIC_RELAXED); k++) {
                size_t p = *pass == 's' ? s->lo + k : *pass == 'b' ? s->hi - 1 - k : s->lo + next_random(&rng) % n;
                if (check_page(p, round)) {
                    __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
                    return NULL;
                }
                if (*pass != 'r')
                    fill_page(p, round + 1);
            }
            if (*pass != 'r')
                round++;
        }
    } while (until_eof && !__atomic_load_n(&failed, __ATOMIC_RELAXED) &&
             !(s->id == 0 ? stdin_at_eof() : __atomic_load_n(&stdin_ended, __ATOMIC_RELAXED)));
    for (size_t p = s->lo; p < s->hi && !failed; p++)
        if (check_page(p, round))
            __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: pattern MIB [mmap|malloc] [PASSES] [THREADS]\n");
        return 2;
    }
    size_t bytes = strtoull(argv[1], NULL, 10) << 20;
    int use_malloc = argc > 2 && strcmp(argv[2], "malloc") == 0;
    if (argc > 3)
        passes = argv[3];
    until_eof = *passes && passes[strlen(passes) - 1] == '+';
    if (argc > 4)
        nthreads = atoi(argv[4]);
    npages = bytes / PAGE;
    if (use_malloc) {
        mem = aligned_alloc(PAGE, bytes);
    } else {
        mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED)
            mem = NULL;
    }
    if (!mem) {
        perror("pattern: alloc");
        return 2;
    }
    pthread_t threads[64];
    struct slice slices[64];
    if (nthreads < 1 || nthreads > 64)
        nthreads = 1;
    for (int t = 0; t < nthreads; t++) {
        slices[t] = (struct slice){npages * t / nthreads, npages * (t + 1) / nthreads, (unsigned)t};
        pthread_create(&threads[t], NULL, run, &slices[t]);
    }
    for (int t = 0; t < nthreads; t++)
        pthread_join(threads[t], NULL);
    if (failed)
        return 1;
    printf("ok %zu pages rss_kb %ld\n", npages, rss_kb());
    return 0;
}
