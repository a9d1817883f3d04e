/* A heap in small pieces, as V8 lays out node's: usage chunks MIB CHUNK_KIB.
 *
 * MIB MiB of anonymous memory in separate mappings of CHUNK_KIB: each piece
 * is the first half of a PROT_NONE reservation twice its size, opened with
 * mprotect (so the kernel cannot merge two pieces into one mapping, and no
 * mmap of a writable mapping is made for the shim to see). Every page is
 * filled with salted data; after 300 ms (the daemon's maps scan looks every
 * 50 ms) all pages are checked, rewritten with a new salt, and checked again.
 * Prints "ok N pages" and the resident set at the end, exit 0 when every byte was right. */
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#include "rss.h"
#include "salted.h"

static uint64_t *base_of(uint64_t **pieces, size_t per_piece, size_t p)
{
    size_t piece = p / per_piece;
    return (uint64_t *)((uintptr_t)pieces[piece] - piece * per_piece * PAGE);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    size_t npages = strtoull(argv[1], NULL, 10) << 8;
    size_t per_piece = strtoull(argv[2], NULL, 10) / 4;
    if (per_piece == 0 || npages % per_piece)
        return 2;
    size_t npieces = npages / per_piece;
    uint64_t **pieces = calloc(npieces, sizeof *pieces);
    if (pieces == NULL)
        return 2;
    for (size_t i = 0; i < npieces; i++) {
        void *reserved = mmap(NULL, 2 * per_piece * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                              -1, 0);
        if (reserved == MAP_FAILED || mprotect(reserved, per_piece * PAGE, PROT_READ | PROT_WRITE) != 0)
            return 2;
        pieces[i] = reserved;
    }
    for (size_t p = 0; p < npages; p += per_piece)
        fill(base_of(pieces, per_piece, p), p, per_piece, 1);
    nanosleep(&(struct timespec){.tv_nsec = 300 * 1000 * 1000}, NULL);
    for (size_t p = 0; p < npages; p += per_piece) {
        uint64_t *base = base_of(pieces, per_piece, p);
        if (check(base, p, per_piece, 1, "first check"))
            return 1;
        fill(base, p, per_piece, 2);
    }
    for (size_t p = 0; p < npages; p += per_piece)
        if (check(base_of(pieces, per_piece, p), p, per_piece, 2, "check after rewrite"))
            return 1;
    printf("ok %zu pages rss_kb %ld\n", npages, rss_kb());
    return 0;
}
