/* Mapping churn for the persistence benchmark: ROUNDS times, mmap MIB MiB
 * of anonymous memory, write every page, unmap it. Under the shim each
 * mapping is a REGION the daemon registers (and, with saved page tables,
 * a file it creates and removes), so this measures that per-region cost.
 *
 * Usage: churn MIB ROUNDS. Prints {"seconds": ..., "rounds": ...}. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: churn MIB ROUNDS\n");
        return 2;
    }
    size_t bytes = strtoull(argv[1], NULL, 10) << 20;
    long rounds = atol(argv[2]);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long r = 0; r < rounds; r++) {
        char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            perror("churn: mmap");
            return 2;
        }
        for (size_t i = 0; i < bytes; i += 4096)
            p[i] = (char)(r + i);
        for (size_t i = 0; i < bytes; i += 4096)
            if (p[i] != (char)(r + i)) {
                fprintf(stderr, "churn: round %ld offset %zu wrong\n", r, i);
                return 1;
            }
        munmap(p, bytes);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("{\"seconds\": %.6f, \"rounds\": %ld}\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9, rounds);
    return 0;
}
