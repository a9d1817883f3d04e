/* Data written once and then only read: usage reread MIB PASSES [STRIDE [REWRITES]].
 * Writes salted pages, then checks them all PASSES times: in order, or with
 * STRIDE > 1 as STRIDE strided scans (pages 0, STRIDE, 2 STRIDE, ..., then
 * 1, 1 + STRIDE, ...). Exit 0 when every byte is right. Under --keep-clean
 * the re-reads evict without writing again. With REWRITES, that many
 * passes in order first check each page and write it again with a new
 * salt (read-modify-write), before the read passes. */
#include <stdlib.h>
#include <sys/mman.h>

#include "salted.h"

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    size_t n = strtoull(argv[1], NULL, 10) << 8;
    int passes = atoi(argv[2]);
    size_t stride = argc > 3 ? strtoull(argv[3], NULL, 10) : 1;
    if (stride < 1)
        return 2;
    uint64_t *m = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return 2;
    int rewrites = argc > 4 ? atoi(argv[4]) : 0;
    uint64_t salt = 7;
    fill(m, 0, n, salt);
    for (int pass = 0; pass < rewrites; pass++, salt++)
        for (size_t p = 0; p < n; p++) {
            if (check(m, p, 1, salt, "rewrite"))
                return 1;
            fill(m, p, 1, salt + 1);
        }
    for (int pass = 0; pass < passes; pass++)
        for (size_t first = 0; first < stride; first++)
            for (size_t p = first; p < n; p += stride)
                if (check(m, p, 1, salt, "re-read"))
                    return 1;
    printf("ok %zu pages\n", n);
    return 0;
}
