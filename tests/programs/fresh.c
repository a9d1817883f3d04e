/* Fresh memory must read as zeros even while swapped data streams in
 * beside it. Interleaves, a MiB at a time: a sequential read of OLD MiB of
 * patterned data (evicted under the budget, so it comes back in prefetch
 * windows through the daemon's staging pages) and a first write to a MiB
 * of NEW memory, one byte a page, each page then checked to be zero but
 * for that byte. Exit 0 when all is intact. Usage: fresh MIB ROUNDS */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define PAGE 4096
#define MiB (1u << 20)

static uint64_t word_for(size_t page, size_t word)
{
    return (page * 0x9E3779B97F4A7C15ull) ^ (word * 0xBF58476D1CE4E5B9ull) ^ 1;
}

static void *map(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("fresh: mmap");
        exit(2);
    }
    return p;
}

int main(int argc, char **argv)
{
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 32;
    int rounds = argc > 2 ? atoi(argv[2]) : 2;
    size_t npages = mib * MiB / PAGE, per_mib = MiB / PAGE;
    uint64_t *old = map(mib * MiB);
    for (size_t page = 0; page < npages; page++)
        for (size_t w = 0; w < PAGE / 8; w++)
            old[page * (PAGE / 8) + w] = word_for(page, w);
    for (int round = 0; round < rounds; round++) {
        uint8_t *new = map(mib * MiB);
        for (size_t chunk = 0; chunk < mib; chunk++) {
            for (size_t page = chunk * per_mib; page < (chunk + 1) * per_mib; page++)
                for (size_t w = 0; w < PAGE / 8; w++)
                    if (old[page * (PAGE / 8) + w] != word_for(page, w)) {
                        fprintf(stderr, "fresh: old page %zu word %zu is wrong\n", page, w);
                        return 1;
                    }
            for (size_t page = chunk * per_mib; page < (chunk + 1) * per_mib; page++) {
                uint8_t *p = new + page * PAGE;
                p[0] = 0x5A;   /* the first touch: a write fault */
                for (size_t i = 1; i < PAGE; i++)
                    if (p[i] != 0) {
                        fprintf(stderr, "fresh: new page %zu byte %zu reads %#x, not zero (round %d)\n", page, i,
                                p[i], round);
                        return 1;
                    }
            }
        }
        munmap(new, mib * MiB);
    }
    printf("ok %zu MiB, %d rounds\n", mib, rounds);
    return 0;
}
