/* Objects of a few pages each, read and then updated in random order, as a
 * JVM's heap is by random updates of its arrays. Fills MIB of anonymous
 * memory page by page, then ROUNDS times visits every aligned block of
 * BLOCK pages in a random order: checks each page of the block, then
 * rewrites it for the next round (with "read", only checks it: records
 * looked up and never changed). At the end checks every page. Exit 0
 * when all is intact; 1 and a message at the first wrong word.
 * Usage: blocks MIB [ROUNDS] [BLOCK] [read] */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "rss.h"
#include "salted.h"

/* Round r's pages hold salt r + 1 (salt 0 would mean zeros). */
#define SALT(round) (0x5EED0000ull + (round) + 1)

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: blocks MIB [ROUNDS] [BLOCK] [read]\n");
        return 2;
    }
    size_t npages = (strtoull(argv[1], NULL, 10) << 20) / PAGE;
    unsigned rounds = argc > 2 ? (unsigned)atoi(argv[2]) : 2;
    size_t block = argc > 3 ? strtoull(argv[3], NULL, 10) : 8;
    int writes = !(argc > 4 && strcmp(argv[4], "read") == 0);
    uint64_t *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED || block == 0 || npages % block) {
        fprintf(stderr, "blocks: cannot map %zu pages in blocks of %zu\n", npages, block);
        return 2;
    }
    size_t nblocks = npages / block;
    size_t *order = malloc(nblocks * sizeof *order);
    for (size_t b = 0; b < nblocks; b++)
        order[b] = b;
    fill(mem, 0, npages, SALT(0));
    uint64_t rng = 0x2545F4914F6CDD1Dull;
    for (unsigned round = 0; round < rounds; round++) {
        for (size_t b = nblocks - 1; b > 0; b--) {   /* a new order each round */
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            size_t other = rng % (b + 1), kept = order[b];
            order[b] = order[other], order[other] = kept;
        }
        for (size_t b = 0; b < nblocks; b++) {
            size_t first = order[b] * block;
            if (check(mem, first, block, SALT(writes ? round : 0), "blocks"))
                return 1;
            if (writes)
                fill(mem, first, block, SALT(round + 1));
        }
    }
    if (check(mem, 0, npages, SALT(writes ? rounds : 0), "blocks"))
        return 1;
    printf("ok %zu pages rss_kb %ld\n", npages, rss_kb());
    return 0;
}
