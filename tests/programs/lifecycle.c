/* Process-lifecycle events on memory that is paged out at the moment of the
 * event; every byte is checked afterwards. Usage: lifecycle MODE MIB
 * MODE: fork | munmap | mremap | mremap-race | dontneed | dontneed-race | exit.
 * Exit 0 when all is intact. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static void fill(uint64_t *m, size_t first, size_t npages, uint64_t salt)
{
    for (size_t p = first; p < first + npages; p++)
        for (size_t w = 0; w < WORDS; w++)
            m[p * WORDS + w] = (p * WORDS + w) ^ salt;
}

static int check(const uint64_t *m, size_t first, size_t npages, uint64_t salt, const char *what)
{
    for (size_t p = first; p < first + npages; p++)
        for (size_t w = 0; w < WORDS; w++) {
            uint64_t want = salt == 0 ? 0 : (p * WORDS + w) ^ salt;
            if (m[p * WORDS + w] != want) {
                fprintf(stderr, "%s: page %zu word %zu is %llx, want %llx\n", what, p, w,
                        (unsigned long long)m[p * WORDS + w], (unsigned long long)want);
                return 1;
            }
        }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    const char *mode = argv[1];
    size_t n = strtoull(argv[2], NULL, 10) << 8; /* pages */
    uint64_t *m = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return 2;
    fill(m, 0, n, 1); /* under a small budget most of it is paged out now */

    if (strcmp(mode, "fork") == 0) {
        pid_t pid = fork();
        if (pid == 0) {
            if (check(m, 0, n, 1, "child sees parent's data"))
                _exit(3);
            fill(m, 0, n, 2);
            _exit(check(m, 0, n, 2, "child's own writes") ? 4 : 0);
        }
        int bad = check(m, 0, n, 1, "parent after fork");
        fill(m, 0, n, 5);
        int status;
        waitpid(pid, &status, 0);
        bad |= check(m, 0, n, 5, "parent's own writes");
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "child failed: %d\n", status);
            return 1;
        }
        return bad;
    }
    if (strcmp(mode, "munmap") == 0) { /* a hole in the middle splits the region */
        size_t lo = n / 4, len = n / 4;
        munmap(m + lo * WORDS, len * PAGE);
        return check(m, 0, lo, 1, "below the hole") | check(m, lo + len, n - lo - len, 1, "above the hole");
    }
    if (strcmp(mode, "mremap") == 0) { /* move and grow; the grown part reads as zero */
        uint64_t *moved = mremap(m, n * PAGE, 2 * n * PAGE, MREMAP_MAYMOVE);
        if (moved == MAP_FAILED)
            return 2;
        int bad = check(moved, 0, n, 1, "moved pages") | check(moved, n, n, 0, "grown part");
        uint64_t *shrunk = mremap(moved, 2 * n * PAGE, n / 2 * PAGE, 0);
        return bad | (shrunk == MAP_FAILED) | check(shrunk, 0, n / 2, 1, "after shrink");
    }
    if (strcmp(mode, "mremap-race") == 0) { /* moves back and forth while eviction is busy */
        uint64_t *salt = malloc(n * sizeof *salt);
        uint64_t *other = mmap(NULL, n * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (salt == NULL || other == MAP_FAILED)
            return 2;
        for (size_t p = 0; p < n; p++)
            salt[p] = 1;
        for (unsigned round = 0; round < 24; round++) {
            uint64_t *moved = mremap(m, n * PAGE, n * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, other);
            if (moved == MAP_FAILED)
                return 2;
            other = m;
            m = moved;
            size_t first = (round * 997) % (n - n / 8), count = n / 8;
            fill(m, first, count, 10 + round); /* keeps the evictor busy across the next move */
            for (size_t p = first; p < first + count; p++)
                salt[p] = 10 + round;
            size_t probe = (round * 4099) % n; /* a paged-out page read back at its new address */
            if (check(m, probe, 1, salt[probe], "probe after move"))
                return 1;
        }
        for (size_t p = 0; p < n; p++)
            if (check(m, p, 1, salt[p], "after the moves"))
                return 1;
        return 0;
    }
    if (strcmp(mode, "dontneed-race") == 0) { /* discards of pages the daemon is evicting */
        uint64_t *salt = malloc(n * sizeof *salt);
        if (salt == NULL)
            return 2;
        for (size_t p = 0; p < n; p++)
            salt[p] = 1;
        size_t window = n / 16;
        for (unsigned round = 0; round < 400; round++) {
            size_t hot = (round * 7919) % (n - window); /* new writes: the evictor stays busy */
            fill(m, hot, window, 100 + round);
            for (size_t p = hot; p < hot + window; p++)
                salt[p] = 100 + round;
            /* FIFO evicts the writes of about three rounds ago now: discard runs there */
            if (round < 3)
                continue;
            size_t cold = ((round - 3) * 7919) % (n - window);
            for (size_t k = 0; k < 4; k++) {
                size_t first = cold + (round * 131 + k * 251) % (window - 16), len = 1 + (round + k) % 12;
                madvise(m + first * WORDS, len * PAGE, MADV_DONTNEED);
                for (size_t p = first; p < first + len; p++)
                    salt[p] = 0;
            }
        }
        for (size_t p = 0; p < n; p++)
            if (check(m, p, 1, salt[p], "after racing discards"))
                return 1;
        return 0;
    }
    if (strcmp(mode, "dontneed") == 0) { /* discarded pages read zero, even paged-out ones */
        madvise(m + (n / 2) * WORDS, (n / 4) * PAGE, MADV_DONTNEED);
        return check(m, 0, n / 2, 1, "kept") | check(m, n / 2, n / 4, 0, "discarded") |
               check(m, 3 * n / 4, n - 3 * n / 4, 1, "kept above");
    }
    if (strcmp(mode, "exit") == 0)
        return 0; /* slots must all be freed when it is gone */
    return 2;
}
