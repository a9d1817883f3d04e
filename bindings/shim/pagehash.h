/* umgr_page_hash: a 64-bit hash of one page's content, the same in the
 * daemon (the _kernel cffi module hashes the pages it copies out) and in the
 * shim's agent (which hashes them again once it has moved them out of the
 * app, MOVE_OUT in protocol.h). A device write that bypassed the
 * write-protect bit in between (an O_DIRECT or io_uring read into a page
 * pinned before the daemon protected it, ending before the move) changes
 * the hash, and the page is kept rather than evicted with its old copy.
 *
 * Not a cryptographic hash: it guards against a device's data, not an
 * adversary (a program that wants its own page wrong can write it so).
 * Four lanes of xor-multiply-rotate over the page's words keep the
 * multiplier busy (about 0.3 us a page); a change in any word changes its
 * lane, each step being a bijection of the lane, and the lanes are folded
 * and mixed (splitmix64's finaliser) so that every bit counts. 0 is never
 * returned: MOVE_OUT uses it for "not checked". */
#ifndef UMGR_PAGEHASH_H
#define UMGR_PAGEHASH_H

#include <stddef.h>
#include <stdint.h>

#define UMGR_HASH_PAGE 4096

static inline uint64_t umgr_hash_rotl(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t umgr_page_hash(const void *page)
{
    const uint64_t K = 0x9E3779B97F4A7C15ull;   /* odd: multiplying by it is a bijection */
    const uint64_t *w = (const uint64_t *)page;
    uint64_t a = 1, b = 2, c = 3, d = 4;
    for (size_t i = 0; i < UMGR_HASH_PAGE / sizeof(uint64_t); i += 4) {
        a = umgr_hash_rotl((a ^ w[i]) * K, 29);
        b = umgr_hash_rotl((b ^ w[i + 1]) * K, 29);
        c = umgr_hash_rotl((c ^ w[i + 2]) * K, 29);
        d = umgr_hash_rotl((d ^ w[i + 3]) * K, 29);
    }
    uint64_t h = a ^ umgr_hash_rotl(b, 16) ^ umgr_hash_rotl(c, 32) ^ umgr_hash_rotl(d, 48);
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
    h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
    h ^= h >> 31;
    return h ? h : 1;
}

#endif
