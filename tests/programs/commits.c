/* A heap grown by commits inside a reservation, as HotSpot's serial
 * collector grows its old generation: reserves RESERVE_MIB MiB
 * PROT_NONE, then opens it PIECE_KIB KiB at a time from its start with
 * mmap(MAP_FIXED, PROT_READ|PROT_WRITE) and fills each piece with a known
 * pattern before opening the next, until USED_MIB MiB are open. Every piece
 * is below umgr's --min-region; the kernel merges them into one mapping.
 * Then every word is checked. Usage: commits RESERVE_MIB USED_MIB PIECE_KIB.
 * Exit 0 and "ok N pages" when all is intact; 1 and a message at the first
 * wrong word. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t word_for(size_t page, size_t word)
{
    return (page * 0x9E3779B97F4A7C15ull) ^ (word * 0xBF58476D1CE4E5B9ull) ^ 0x5A;
}

static int open_piece(char *base, size_t first_page, size_t npages)
{
    void *at = base + first_page * PAGE;
    if (mmap(at, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != at) {
        perror("commits: mmap MAP_FIXED");
        return -1;
    }
    uint64_t *words = (uint64_t *)base;
    for (size_t p = first_page; p < first_page + npages; p++)
        for (size_t w = 0; w < WORDS; w++)
            words[p * WORDS + w] = word_for(p, w);
    return 0;
}

static int check(const char *base, size_t first_page, size_t npages)
{
    const uint64_t *words = (const uint64_t *)base;
    for (size_t p = first_page; p < first_page + npages; p++)
        for (size_t w = 0; w < WORDS; w++)
            if (words[p * WORDS + w] != word_for(p, w)) {
                fprintf(stderr, "commits: page %zu word %zu: %016llx, want %016llx\n", p, w,
                        (unsigned long long)words[p * WORDS + w], (unsigned long long)word_for(p, w));
                return -1;
            }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: commits RESERVE_MIB USED_MIB PIECE_KIB\n");
        return 2;
    }
    size_t reserved = (strtoull(argv[1], NULL, 10) << 20) / PAGE;
    size_t used = (strtoull(argv[2], NULL, 10) << 20) / PAGE;
    size_t piece = (strtoull(argv[3], NULL, 10) << 10) / PAGE;
    if (piece == 0 || used > reserved) {
        fprintf(stderr, "commits: the reservation is too small\n");
        return 2;
    }
    char *base = mmap(NULL, reserved * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) {
        perror("commits: mmap");
        return 2;
    }
    for (size_t p = 0; p < used; p += piece)
        if (open_piece(base, p, piece < used - p ? piece : used - p) < 0)
            return 2;
    if (check(base, 0, used) < 0)
        return 1;
    printf("ok %zu pages\n", used);
    return 0;
}
