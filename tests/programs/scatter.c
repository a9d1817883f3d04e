/* Random access, the fault fast path's case: usage scatter MIB OPS [THREADS [PIECES]].
 *
 * Region A (MIB MiB) is filled with salted pages (salt 1), then OPS random
 * pages are read and checked, then OPS random pages are rewritten with a new
 * salt (their salt is kept in a separate mapping, checked too); THREADS
 * threads (default 1) share each phase. Region B (MIB MiB, never written
 * first) gets OPS random first touches: even pages are written (salted),
 * odd pages only read (they must read zero). At the end every page of both
 * regions is checked. Exit 0 when every byte is right. With PIECES (default
 * 1), region A is that many separate mappings, as an interpreter's heap is
 * (CPython's 1 MiB arenas); its pages are numbered across them all. */
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "salted.h"

static uint64_t *b;
static uint8_t *salt_a, *salt_b;
static size_t npages, ops, per_piece;
static int nthreads = 1, failed;
static uint64_t *pieces[1024];

/* Where page p of A is, as a base that salted.h's fill() and check() index
 * with p: the page's piece, less the pages before that piece. */
static uint64_t *a(size_t p)
{
    size_t piece = p / per_piece;
    return (uint64_t *)((uintptr_t)pieces[piece] - piece * per_piece * PAGE);
}

static uint64_t next(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Thread t's pages: those with p % nthreads == t, so no two threads write one page. */
static size_t pick(uint64_t *state, int t)
{
    size_t per = npages / nthreads;
    return (next(state) % per) * nthreads + t;
}

static void *work(void *arg)
{
    int t = (int)(intptr_t)arg;
    uint64_t state = 1000 + t;
    for (size_t i = 0; i < ops / nthreads; i++) {
        size_t p = pick(&state, t);
        if (check(a(p), p, 1, salt_a[p], "random read"))
            failed = 1;
    }
    for (size_t i = 0; i < ops / nthreads; i++) {
        size_t p = pick(&state, t);
        if (check(a(p), p, 1, salt_a[p], "read before rewrite"))
            failed = 1;
        salt_a[p] = (uint8_t)(salt_a[p] % 200 + 2);
        fill(a(p), p, 1, salt_a[p]);
    }
    for (size_t i = 0; i < ops / nthreads; i++) {
        size_t p = pick(&state, t);
        if (p % 2 == 0) {
            salt_b[p] = 3;
            fill(b, p, 1, 3);
        } else if (check(b, p, 1, 0, "first read of a fresh page")) {
            failed = 1;
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    npages = strtoull(argv[1], NULL, 10) << 8;
    ops = strtoull(argv[2], NULL, 10);
    if (argc > 3)
        nthreads = atoi(argv[3]);
    size_t npieces = argc > 4 ? strtoull(argv[4], NULL, 10) : 1;
    if (nthreads < 1 || nthreads > 16 || npieces < 1 || npieces > 1024 || npages % npieces)
        return 2;
    per_piece = npages / npieces;
    for (size_t i = 0; i < npieces; i++) {
        pieces[i] = mmap(NULL, per_piece * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (pieces[i] == MAP_FAILED)
            return 2;
    }
    b = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    salt_a = mmap(NULL, 2 * npages, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b == MAP_FAILED || salt_a == MAP_FAILED)
        return 2;
    salt_b = salt_a + npages;
    for (size_t p = 0; p < npages; p++)
        salt_a[p] = 1;
    for (size_t p = 0; p < npages; p += per_piece)
        fill(a(p), p, per_piece, 1);
    pthread_t threads[16];
    for (int t = 0; t < nthreads; t++)
        pthread_create(&threads[t], NULL, work, (void *)(intptr_t)t);
    for (int t = 0; t < nthreads; t++)
        pthread_join(threads[t], NULL);
    for (size_t p = 0; p < npages && !failed; p++)
        failed = check(a(p), p, 1, salt_a[p], "final check A") || check(b, p, 1, salt_b[p], "final check B");
    if (failed)
        return 1;
    printf("ok %zu pages\n", 2 * npages);
    return 0;
}
