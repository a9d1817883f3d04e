/* Pages of 64-bit words that say where they are: word i of the region holds
 * i ^ salt, and salt 0 means the page must read as zero (never written, or
 * discarded). Shared by the test programs that check every byte. */
#ifndef UMGR_TEST_SALTED_H
#define UMGR_TEST_SALTED_H

#include <stdint.h>
#include <stdio.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static inline void fill(uint64_t *m, size_t first, size_t npages, uint64_t salt)
{
    for (size_t p = first; p < first + npages; p++)
        for (size_t w = 0; w < WORDS; w++)
            m[p * WORDS + w] = (p * WORDS + w) ^ salt;
}

/* 0 when pages [first, first + npages) hold salt; else 1, and the first
 * wrong word on stderr. */
static inline int check(const uint64_t *m, size_t first, size_t npages, uint64_t salt, const char *what)
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

#endif
