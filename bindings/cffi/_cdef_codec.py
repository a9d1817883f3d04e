"""The compressed store's page codecs and entries in C, over libzstd and
liblz4 (umgr/backends/compressed.py; the fault fast path unpacks with it too).

An entry is (length, where), per slot in two arrays the store owns:
- UMGR_ENTRY_WORD and the word: a same-filled page (zero pages included);
- 4096 and the address of a copy of the raw page (an incompressible page
  held by a store alone);
- the length of a zstd frame (no content size, no checksum: the size is
  always a page, and the frame lives in the daemon's memory), or that of
  an lz4 block with UMGR_ENTRY_LZ4 added, and its address;
- 0: no entry.
Frames and raw copies are malloc'd blocks of their exact size: the store
frees them when an entry is dropped or replaced. Entries say which codec
made them, so unpacking needs no other state than a zstd context.
"""

INCLUDES = """
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <lz4.h>
#include <zstd.h>
#include <zstd_errors.h>
"""

LIBRARIES = ["zstd", "lz4"]

TYPES = """
#define UMGR_ENTRY_WORD ...
#define UMGR_ENTRY_LZ4 ...
#define UMGR_CODEC_ZSTD ...
#define UMGR_CODEC_LZ4 ...
"""

FUNCTIONS = """
uint64_t umgr_codec_new(int kind, int level);
void umgr_codec_free(uint64_t codec);
uint64_t umgr_zstd_new_dctx(void);
void umgr_zstd_free_dctx(uint64_t dctx);
int umgr_codec_pack_batch(uint64_t codec, const uint64_t *pages, int n, int limit, int alone, int32_t *lengths,
                          uint64_t *where);
int umgr_entry_unpack(uint64_t dctx, int32_t length, uint64_t where, uint64_t page);
int umgr_entries_unpack(uint64_t dctx, const int32_t *slots, int n, const int32_t *length, const uint64_t *where,
                        uint64_t span, const uint64_t *pages);
void umgr_entries_install(const int32_t *slots, const uint8_t *keep, int n, const int32_t *lengths,
                          const uint64_t *values, int32_t *length, uint64_t *where);
void umgr_entries_free(const int32_t *lengths, const uint64_t *values, int n);
void umgr_entries_drop(const int32_t *slots, int n, int32_t *length, uint64_t *where);
"""

CUSTOMIZATIONS = """
#define UMGR_ENTRY_WORD (-1)
#define UMGR_ENTRY_LZ4 (1 << 16)
#define UMGR_CODEC_ZSTD 0
#define UMGR_CODEC_LZ4 1

struct umgr_codec {
    int kind;            /* UMGR_CODEC_* */
    int level;           /* zstd: its level (set in cctx); lz4: its acceleration */
    ZSTD_CCtx *cctx;     /* zstd only */
};

/* A codec at `level`; 0 on failure (no memory, a level zstd refuses). */
static uint64_t umgr_codec_new(int kind, int level)
{
    struct umgr_codec *c = calloc(1, sizeof(*c));
    if (c == NULL)
        return 0;
    c->kind = kind;
    c->level = level;
    if (kind == UMGR_CODEC_LZ4)
        return level >= 1 ? (uint64_t)(uintptr_t)c : (free(c), 0);
    c->cctx = ZSTD_createCCtx();
    if (kind != UMGR_CODEC_ZSTD || c->cctx == NULL
            || ZSTD_isError(ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_compressionLevel, level))
            || ZSTD_isError(ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_contentSizeFlag, 0))
            || ZSTD_isError(ZSTD_CCtx_setParameter(c->cctx, ZSTD_c_checksumFlag, 0))) {
        ZSTD_freeCCtx(c->cctx);
        free(c);
        return 0;
    }
    return (uint64_t)(uintptr_t)c;
}

static void umgr_codec_free(uint64_t codec)
{
    struct umgr_codec *c = (struct umgr_codec *)(uintptr_t)codec;
    if (c != NULL)
        ZSTD_freeCCtx(c->cctx);
    free(c);
}

static uint64_t umgr_zstd_new_dctx(void)
{
    return (uint64_t)(uintptr_t)ZSTD_createDCtx();
}

static void umgr_zstd_free_dctx(uint64_t dctx)
{
    ZSTD_freeDCtx((ZSTD_DCtx *)(uintptr_t)dctx);
}

/* Compress one page into out (room for limit bytes): the entry's length,
   0 when it does not fit, -1 on another failure. */
static int umgr_codec_pack(struct umgr_codec *c, const void *page, char *out, int limit)
{
    if (c->kind == UMGR_CODEC_LZ4) {
        int got = LZ4_compress_fast(page, out, 4096, limit, c->level);
        return got > 0 ? got + UMGR_ENTRY_LZ4 : 0;   /* lz4 fails only for want of room */
    }
    size_t got = ZSTD_compress2(c->cctx, out, (size_t)limit, page, 4096);
    if (ZSTD_isError(got))
        return ZSTD_getErrorCode(got) == ZSTD_error_dstSize_tooSmall ? 0 : -1;
    return (int)got;
}

/* A malloc'd copy of len bytes at from; 0 when there is no memory. */
static uint64_t umgr_entry_copy(const void *from, size_t len)
{
    void *block = malloc(len);
    if (block != NULL)
        memcpy(block, from, len);
    return (uint64_t)(uintptr_t)block;
}

/* Pack pages[0..n) (page addresses) into new entries (lengths[i],
   where[i]): a same-filled page as its word, else a frame of at most
   `limit` bytes; a page that does not fit is held raw when `alone`, else
   gets length 0 (declined: the next tier takes it). Returns n, or the index
   of the page that failed (no memory, a codec error): the entries before
   it are made, those from it on are 0. The caller installs or frees them. */
static int umgr_codec_pack_batch(uint64_t codec, const uint64_t *pages, int n, int limit, int alone, int32_t *lengths,
                                 uint64_t *where)
{
    struct umgr_codec *c = (struct umgr_codec *)(uintptr_t)codec;
    char frame[4096];
    if (limit > (int)sizeof(frame))
        limit = sizeof(frame);
    memset(lengths, 0, sizeof(*lengths) * (size_t)n);
    for (int i = 0; i < n; i++) {
        const uint64_t *w = (const uint64_t *)(uintptr_t)pages[i];
        int same = 1;
        for (int k = 1; k < 4096 / 8 && same; k++)
            same = w[k] == w[0];
        if (same) {
            lengths[i] = UMGR_ENTRY_WORD;
            where[i] = w[0];
            continue;
        }
        int got = umgr_codec_pack(c, w, frame, limit);
        if (got < 0)
            return i;
        if (got == 0 && !alone)
            continue;
        int bytes = got ? got & (UMGR_ENTRY_LZ4 - 1) : 4096;
        uint64_t block = umgr_entry_copy(got ? (const void *)frame : (const void *)w, (size_t)bytes);
        if (!block)
            return i;
        lengths[i] = got ? got : 4096;
        where[i] = block;
    }
    return n;
}

/* Unpack the entry (length, where) into the 4096 bytes at page; 1 when it
   came out whole, 0 when it does not decompress to exactly one page. */
static int umgr_entry_unpack(uint64_t dctx, int32_t length, uint64_t where, uint64_t page)
{
    void *out = (void *)(uintptr_t)page;
    const void *from = (const void *)(uintptr_t)where;
    if (length == UMGR_ENTRY_WORD) {
        uint64_t *words = out;
        for (int w = 0; w < 4096 / 8; w++)
            words[w] = where;
        return 1;
    }
    if (length == 4096) {
        memcpy(out, from, 4096);
        return 1;
    }
    if (length > UMGR_ENTRY_LZ4)
        return LZ4_decompress_safe(from, out, length - UMGR_ENTRY_LZ4, 4096) == 4096;
    if (length <= 0 || !dctx)
        return 0;
    size_t got = ZSTD_decompressDCtx((ZSTD_DCtx *)(uintptr_t)dctx, out, 4096, from, (size_t)length);
    return !ZSTD_isError(got) && got == 4096;
}

/* Unpack the entries of slots[0..n) (of an index of span slots) into
   pages[0..n); returns n, or the index of the first that is missing (or
   out of the index) or does not come out whole. */
static int umgr_entries_unpack(uint64_t dctx, const int32_t *slots, int n, const int32_t *length, const uint64_t *where,
                               uint64_t span, const uint64_t *pages)
{
    for (int i = 0; i < n; i++) {
        uint64_t s = (uint32_t)slots[i];
        if (s >= span || !umgr_entry_unpack(dctx, length[s], where[s], pages[i]))
            return i;
    }
    return n;
}

static int umgr_entry_owns_block(int32_t length)
{
    return length > 0;   /* a frame or a raw copy; a word owns nothing */
}

/* Free the blocks of entries not installed. */
static void umgr_entries_free(const int32_t *lengths, const uint64_t *values, int n)
{
    for (int i = 0; i < n; i++)
        if (umgr_entry_owns_block(lengths[i]))
            free((void *)(uintptr_t)values[i]);
}

/* Drop the entries of slots[0..n) (freeing their blocks). */
static void umgr_entries_drop(const int32_t *slots, int n, int32_t *length, uint64_t *where)
{
    for (int i = 0; i < n; i++) {
        int32_t s = slots[i];
        if (umgr_entry_owns_block(length[s]))
            free((void *)(uintptr_t)where[s]);
        length[s] = 0;
        where[s] = 0;
    }
}

/* Each entry i with keep[i] becomes slots[i]'s (the entry it replaces is
   dropped); the others are freed. */
static void umgr_entries_install(const int32_t *slots, const uint8_t *keep, int n, const int32_t *lengths,
                                 const uint64_t *values, int32_t *length, uint64_t *where)
{
    for (int i = 0; i < n; i++) {
        if (!keep[i]) {
            umgr_entries_free(&lengths[i], &values[i], 1);
            continue;
        }
        umgr_entries_drop(&slots[i], 1, length, where);
        length[slots[i]] = lengths[i];
        where[slots[i]] = values[i];
    }
}
"""
