/* Memory freed with MADV_FREE and written again: usage freereuse MIB ROUNDS.
 *
 * ROUNDS regions of MIB MiB each, one after the other: written (salt
 * round + 1), MADV_FREE'd, and written again at once. The kernel frees such
 * pages lazily, and a write before it does cancels the free: the pages are
 * still the process's, in memory, with no fault to say so (userfaultfd
 * reports the MADV_FREE as a REMOVE, as it does MADV_DONTNEED). Prints
 * "ready", waits for stdin to reach EOF, then checks every byte: "ok",
 * exit 0 when all is intact. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "salted.h"

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    size_t npages = strtoull(argv[1], NULL, 10) << 8, rounds = strtoull(argv[2], NULL, 10);
    uint64_t **regions = calloc(rounds, sizeof *regions);
    for (size_t r = 0; r < rounds; r++) {
        regions[r] = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (regions[r] == MAP_FAILED)
            return 2;
        fill(regions[r], 0, npages, r + 1);
        if (madvise(regions[r], npages * PAGE, MADV_FREE) != 0) {
            perror("freereuse: madvise");
            return 2;
        }
        fill(regions[r], 0, npages, r + 1);
    }
    printf("ready\n");
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0)
        ;
    int bad = 0;
    for (size_t r = 0; r < rounds; r++)
        bad |= check(regions[r], 0, npages, r + 1, "a region written again after MADV_FREE");
    if (!bad)
        printf("ok\n");
    return bad;
}
