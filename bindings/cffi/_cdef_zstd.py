"""The compressed store's page codec in C, over libzstd
(umgr/backends/compressed.py; the fault fast path unpacks with it too).

A page is packed as one of: its repeated 8-byte word (a same-filled page,
zero pages included), one zstd frame (no content size, no checksum: the
size is always a page, and the frame lives in the daemon's memory), or
nothing when the frame would not fit the caller's cap (incompressible).
An entry is (length, where): UMGR_ENTRY_WORD and the word, 4096 and the
address of the raw page, or the frame's length and address.
"""

INCLUDES = """
#include <stdint.h>
#include <string.h>
#include <zstd.h>
#include <zstd_errors.h>
"""

LIBRARIES = ["zstd"]

TYPES = """
#define UMGR_ENTRY_WORD ...
"""

FUNCTIONS = """
uint64_t umgr_zstd_new_cctx(int level);
uint64_t umgr_zstd_new_dctx(void);
void umgr_zstd_free(uint64_t cctx, uint64_t dctx);
int umgr_zstd_pack_batch(uint64_t cctx, const uint64_t *pages, int n, char *out, int cap, int32_t *lengths,
                         uint64_t *words);
int umgr_zstd_unpack(uint64_t dctx, int32_t length, uint64_t where, uint64_t page);
"""

CUSTOMIZATIONS = """
#define UMGR_ENTRY_WORD (-1)

/* A compression context at `level`, writing bare frames; 0 on failure. */
static uint64_t umgr_zstd_new_cctx(int level)
{
    ZSTD_CCtx *c = ZSTD_createCCtx();
    if (c == NULL)
        return 0;
    if (ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level))
            || ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 0))
            || ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 0))) {
        ZSTD_freeCCtx(c);
        return 0;
    }
    return (uint64_t)(uintptr_t)c;
}

static uint64_t umgr_zstd_new_dctx(void)
{
    return (uint64_t)(uintptr_t)ZSTD_createDCtx();
}

static void umgr_zstd_free(uint64_t cctx, uint64_t dctx)
{
    ZSTD_freeCCtx((ZSTD_CCtx *)(uintptr_t)cctx);
    ZSTD_freeDCtx((ZSTD_DCtx *)(uintptr_t)dctx);
}

/* Pack pages[0..n) (page addresses): lengths[i] is UMGR_ENTRY_WORD (the
   word in words[i]), 0 (its frame would exceed cap bytes), or the length
   of its frame at out + i * cap. Returns how many were packed (n, or the
   index of a page zstd failed on for another reason than size). */
static int umgr_zstd_pack_batch(uint64_t cctx, const uint64_t *pages, int n, char *out, int cap, int32_t *lengths,
                                uint64_t *words)
{
    for (int i = 0; i < n; i++) {
        const uint64_t *w = (const uint64_t *)(uintptr_t)pages[i];
        int same = 1;
        for (int k = 1; k < 4096 / 8 && same; k++)
            same = w[k] == w[0];
        if (same) {
            lengths[i] = UMGR_ENTRY_WORD;
            words[i] = w[0];
            continue;
        }
        size_t got = ZSTD_compress2((ZSTD_CCtx *)(uintptr_t)cctx, out + (size_t)i * cap, (size_t)cap, w, 4096);
        if (ZSTD_isError(got)) {
            if (ZSTD_getErrorCode(got) != ZSTD_error_dstSize_tooSmall)
                return i;
            got = 0;
        }
        lengths[i] = (int32_t)got;
    }
    return n;
}

/* Unpack the entry (length, where) into the 4096 bytes at page; 1 when it
   came out whole, 0 when it does not decompress to exactly one page. */
static int umgr_zstd_unpack(uint64_t dctx, int32_t length, uint64_t where, uint64_t page)
{
    void *out = (void *)(uintptr_t)page;
    if (length == UMGR_ENTRY_WORD) {
        uint64_t *words = out;
        for (int w = 0; w < 4096 / 8; w++)
            words[w] = where;
        return 1;
    }
    if (length == 4096) {
        memcpy(out, (const void *)(uintptr_t)where, 4096);
        return 1;
    }
    if (length <= 0 || !dctx)
        return 0;
    size_t got = ZSTD_decompressDCtx((ZSTD_DCtx *)(uintptr_t)dctx, out, 4096, (const void *)(uintptr_t)where,
                                     (size_t)length);
    return !ZSTD_isError(got) && got == 4096;
}
"""
