/* Forked processes reading the pages they share at random:
 * usage forkreads MIB CHILDREN OPS.
 *
 * The parent fills MIB MiB with salted pages (salt 1), then forks CHILDREN
 * children. Each process (the parent too) reads OPS pages picked at random
 * (each its own sequence) and checks them: pages the parent wrote before
 * the fork, whose swap slots all of them share, so several processes drop
 * references to the same slots at once. Then each writes its own salt over
 * every page with p % (CHILDREN + 1) == its number and checks the whole
 * region: its own pages hold its salt, the others still salt 1. Prints
 * "ok" and exits 0 when every byte was right in every process. */
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "salted.h"

static uint64_t next(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static int run(uint64_t *m, size_t npages, unsigned me, unsigned procs, size_t ops)
{
    uint64_t state = 0x5EED0000u + me;
    for (size_t i = 0; i < ops; i++) {
        size_t p = next(&state) % npages;
        if (check(m, p, 1, 1, "random read of a shared page"))
            return 1;
    }
    for (size_t p = me; p < npages; p += procs)
        fill(m, p, 1, 2 + me);
    for (size_t p = 0; p < npages; p++)
        if (check(m, p, 1, p % procs == me ? 2 + me : 1, "after its own writes"))
            return 1;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    size_t npages = strtoull(argv[1], NULL, 10) << 8;
    unsigned children = (unsigned)atoi(argv[2]);
    size_t ops = strtoull(argv[3], NULL, 10);
    uint64_t *m = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return 2;
    fill(m, 0, npages, 1);
    pid_t kids[64];
    if (children > 64)
        return 2;
    for (unsigned i = 0; i < children; i++) {
        kids[i] = fork();
        if (kids[i] < 0)
            return 2;
        if (kids[i] == 0)
            _exit(run(m, npages, i + 1, children + 1, ops));
    }
    int bad = run(m, npages, 0, children + 1, ops);
    for (unsigned i = 0; i < children; i++) {
        int status;
        if (waitpid(kids[i], &status, 0) != kids[i] || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "child %u failed (status %#x)\n", i, status);
            bad = 1;
        }
    }
    if (bad)
        return 1;
    printf("ok %zu pages %u processes\n", npages, children + 1);
    return 0;
}
