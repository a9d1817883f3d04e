/* Memory an allocator hands out again: usage refill MIB ROUNDS BLOCK STEP.
 * Each round goes through the region's blocks of BLOCK pages in a shuffled
 * order and writes every STEP-th page of each, in order: its first word
 * first (the first touch is a write), then the rest must read as zero
 * (fresh, or discarded) before they are written with salted words. Then
 * every page is checked (the touched ones hold this round's salt, the
 * others zeros) and the whole region is discarded with MADV_DONTNEED, as
 * an allocator frees its blocks. Exit 0 when every byte was right. */
#include <stdlib.h>
#include <sys/mman.h>

#include "salted.h"

int main(int argc, char **argv)
{
    if (argc < 5)
        return 2;
    size_t n = strtoull(argv[1], NULL, 10) << 8;
    int rounds = atoi(argv[2]);
    size_t block = strtoull(argv[3], NULL, 10), step = strtoull(argv[4], NULL, 10);
    if (block < 1 || step < 1 || n < block)
        return 2;
    size_t nblocks = n / block;
    uint64_t *m = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    size_t *order = malloc(nblocks * sizeof *order);
    if (m == MAP_FAILED || order == NULL)
        return 2;
    for (size_t b = 0; b < nblocks; b++)
        order[b] = b;
    uint64_t rng = 88172645463325252ull;
    for (int round = 1; round <= rounds; round++) {
        uint64_t salt = 0x5EED0000u + (uint64_t)round;
        for (size_t b = nblocks - 1; b > 0; b--) {   /* Fisher-Yates with xorshift64 */
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            size_t k = rng % (b + 1), t = order[b];
            order[b] = order[k], order[k] = t;
        }
        for (size_t i = 0; i < nblocks; i++)
            for (size_t p = order[i] * block; p < (order[i] + 1) * block; p += step) {
                m[p * WORDS] = (p * WORDS) ^ salt;
                for (size_t w = 1; w < WORDS; w++)
                    if (m[p * WORDS + w] != 0) {
                        fprintf(stderr, "refill: page %zu word %zu is %llx before it was written\n", p, w,
                                (unsigned long long)m[p * WORDS + w]);
                        return 1;
                    }
                fill(m, p, 1, salt);
            }
        for (size_t p = 0; p < nblocks * block; p++)
            if (check(m, p, 1, (p % block) % step == 0 ? salt : 0, "refill: after the round"))
                return 1;
        if (madvise(m, n * PAGE, MADV_DONTNEED) != 0)
            return 2;
    }
    printf("ok %d rounds\n", rounds);
    return 0;
}
