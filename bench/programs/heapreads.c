/* Random 4 KiB reads over a copy of real heap memory, for bench/bench_backends.py.
 *
 *   heapreads SAMPLE_FILE READS SEED
 *
 * "fill": the file (pages dumped from a CPython process) is read into an
 * anonymous mapping, and each page's hash kept aside; "random": READS pages
 * picked at random are read whole and hashed, and must hash as they did.
 * Prints one JSON line {"ok": true, "phases": {...}, "pages": N, "reads": R};
 * a page that comes back wrong is reported on stderr, exit 1. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t page_hash(const uint8_t *page)
{
    const uint64_t *w = (const uint64_t *)page;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < PAGE / 8; i++)
        h = (h ^ w[i]) * 0x100000001b3ull;
    return h;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: heapreads SAMPLE_FILE READS SEED\n");
        return 2;
    }
    long reads = atol(argv[2]);
    uint64_t state = strtoull(argv[3], NULL, 0) | 1;
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        perror(argv[1]);
        return 2;
    }
    size_t npages = st.st_size / PAGE;
    uint8_t *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *hashes = malloc(npages * sizeof *hashes);
    if (mem == MAP_FAILED || !hashes) {
        perror("heapreads: memory");
        return 2;
    }
    double t0 = now();
    for (size_t p = 0; p < npages; p++) {
        if (pread(fd, mem + p * PAGE, PAGE, (off_t)p * PAGE) != PAGE) {
            perror("heapreads: read");
            return 2;
        }
        hashes[p] = page_hash(mem + p * PAGE);
    }
    double t1 = now();
    for (long r = 0; r < reads; r++) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        size_t p = state % npages;
        if (page_hash(mem + p * PAGE) != hashes[p]) {
            fprintf(stderr, "heapreads: page %zu came back wrong\n", p);
            printf("{\"ok\": false}\n");
            return 1;
        }
    }
    double t2 = now();
    printf("{\"ok\": true, \"phases\": {\"fill\": %.6f, \"random\": %.6f}, \"pages\": %zu, \"reads\": %ld}\n",
           t1 - t0, t2 - t1, npages, reads);
    return 0;
}
