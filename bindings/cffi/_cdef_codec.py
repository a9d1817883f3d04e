"""The compressed store's page codecs and entries in C, over libzstd and
liblz4 (umgr/backends/compressed.py; the fault fast path unpacks with it too).

An entry is (length, where), per slot in two arrays the store owns:
- UMGR_ENTRY_WORD and the word: a same-filled page (zero pages included);
- 4096 and the offset of a copy of the raw page (an incompressible page
  held by a store alone);
- the length of a zstd frame (no content size, no checksum: the size is
  always a page, and the frame lives in the daemon's memory), or that of
  an lz4 block with UMGR_ENTRY_LZ4 added, and its offset in the heap's
  area (an offset, not an address: a restarted daemon maps the area
  elsewhere);
- 0: no entry;
- UMGR_ENTRY_LOST: an entry a restarted daemon found damaged (its page
  cannot come back: reading it fails, and it is never taken for a page a
  next tier holds).
Frames and raw copies live in chunks of the store's heap (below), over
its region: the store gives them back when an entry is dropped or
replaced. Entries say which codec
made them, so unpacking needs no other state than a zstd context.
"""

INCLUDES = """
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <lz4.h>
#include <zstd.h>
#include <zstd_errors.h>
#include <sys/mman.h>
"""

LIBRARIES = ["zstd", "lz4"]

TYPES = """
#define UMGR_ENTRY_WORD ...
#define UMGR_ENTRY_LOST ...
#define UMGR_DECLINED_FULL ...
#define UMGR_ENTRY_LZ4 ...
#define UMGR_CODEC_ZSTD ...
#define UMGR_CODEC_LZ4 ...
#define UMGR_HEAP_GRAIN ...
#define UMGR_HEAP_SPAN ...
#define UMGR_HEAP_WARM ...
"""

FUNCTIONS = """
uint64_t umgr_codec_new(int kind, int level);
void umgr_codec_free(uint64_t codec);
uint64_t umgr_zstd_new_dctx(void);
void umgr_zstd_free_dctx(uint64_t dctx);
uint64_t umgr_heap_new(uint64_t area, uint64_t bytes);
void umgr_heap_free(uint64_t heap);
uint64_t umgr_heap_spans_in_use(uint64_t heap);
int64_t umgr_heap_adopt(uint64_t heap, int32_t *length, uint64_t *where, uint64_t span);
int umgr_codec_pack_batch(uint64_t codec, uint64_t heap, const uint64_t *pages, int n, int limit, int alone,
                          int32_t *lengths, uint64_t *where);
int umgr_entry_unpack(uint64_t dctx, int32_t length, uint64_t where, uint64_t area, uint64_t page);
int umgr_entries_unpack(uint64_t dctx, const int32_t *slots, int n, const int32_t *length, const uint64_t *where,
                        uint64_t area, uint64_t span, const uint64_t *pages);
void umgr_entries_install(uint64_t heap, const int32_t *slots, const uint8_t *keep, int n, const int32_t *lengths,
                          const uint64_t *values, int32_t *length, uint64_t *where);
void umgr_entries_free(uint64_t heap, const int32_t *lengths, const uint64_t *values, int n);
void umgr_entries_drop(uint64_t heap, const int32_t *slots, int n, int32_t *length, uint64_t *where);
"""

CUSTOMIZATIONS = """
#define UMGR_ENTRY_WORD (-1)
#define UMGR_ENTRY_LOST INT32_MIN
#define UMGR_DECLINED_FULL 1   /* the `where` of a page declined because the heap had no chunk */
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

/* The heap entries' frames and raw copies live in: chunks of a size class
   (a multiple of UMGR_HEAP_GRAIN, up to a page) carved from spans of
   UMGR_HEAP_SPAN bytes of one area, the store's region (a memfd: umgr exec
   holds it, so the entries outlive a daemon that dies). The bookkeeping is
   the daemon's own (malloc'd here), rebuilt by umgr_heap_adopt from the
   entries a restarted daemon finds. A free chunk holds the offset (+ 1) of
   the next free chunk of its span. Chunks are taken in the worker thread
   that packs a batch and given back on the fault loop's thread: a mutex
   covers both. A span whose chunks are all free goes back to the spans
   any class can take; beyond UMGR_HEAP_WARM such spans, its memory goes
   back to the kernel too (MADV_REMOVE frees a shared mapping's pages;
   under the mutex, as the span may be taken again at once). Spans are
   taken warm first: under churn (heapreads, 200k random reads under a
   32 MiB budget: ~2400 spans emptied) few are given back only to be
   touched again. */
#define UMGR_HEAP_GRAIN 32
#define UMGR_HEAP_SPAN (32 * 1024)
#define UMGR_HEAP_CLASSES (4096 / UMGR_HEAP_GRAIN)
#define UMGR_HEAP_WARM 64   /* free spans kept backed: 2 MiB */

struct umgr_span {
    uint32_t free_head;   /* offset + 1 of a free chunk (0: none) */
    uint32_t bump;        /* chunks ever handed out: those past it were never touched */
    uint32_t used;
    uint32_t cls;         /* its size class + 1; 0: the span is free */
    int32_t prev, next;   /* its class's spans with room; free spans (next only) */
};

struct umgr_heap {
    pthread_mutex_t lock;
    char *area;
    uint64_t nspans;
    uint64_t fresh;           /* spans from here on were never used */
    int32_t free_spans;       /* free spans given back to the kernel (-1: none) */
    int32_t warm_spans;       /* free spans still backed (-1: none), nwarm of them */
    int32_t nwarm;
    int32_t room[UMGR_HEAP_CLASSES];   /* per class, its spans with a free chunk (-1: none) */
    uint64_t spans_in_use;
    struct umgr_span span[];
};

static uint32_t umgr_heap_class(uint32_t bytes)
{
    return (bytes + UMGR_HEAP_GRAIN - 1) / UMGR_HEAP_GRAIN - 1;
}

static uint32_t umgr_heap_chunks(uint32_t cls)
{
    return UMGR_HEAP_SPAN / ((cls + 1) * UMGR_HEAP_GRAIN);
}

/* A heap over [area, area + bytes) (whole spans of it); 0 without memory. */
static uint64_t umgr_heap_new(uint64_t area, uint64_t bytes)
{
    uint64_t nspans = bytes / UMGR_HEAP_SPAN;
    struct umgr_heap *h = calloc(1, sizeof(*h) + nspans * sizeof(struct umgr_span));
    if (h == NULL)
        return 0;
    pthread_mutex_init(&h->lock, NULL);
    h->area = (char *)(uintptr_t)area;
    h->nspans = nspans;
    h->free_spans = h->warm_spans = -1;
    for (int c = 0; c < UMGR_HEAP_CLASSES; c++)
        h->room[c] = -1;
    return (uint64_t)(uintptr_t)h;
}

static void umgr_heap_free(uint64_t heap)
{
    struct umgr_heap *h = (struct umgr_heap *)(uintptr_t)heap;
    pthread_mutex_destroy(&h->lock);
    free(h);
}

static uint64_t umgr_heap_spans_in_use(uint64_t heap)
{
    return ((struct umgr_heap *)(uintptr_t)heap)->spans_in_use;
}

static void umgr_heap_unlink(struct umgr_heap *h, int32_t s)
{
    struct umgr_span *sp = &h->span[s];
    if (sp->prev >= 0)
        h->span[sp->prev].next = sp->next;
    else
        h->room[sp->cls - 1] = sp->next;
    if (sp->next >= 0)
        h->span[sp->next].prev = sp->prev;
}

static void umgr_heap_link(struct umgr_heap *h, int32_t s)
{
    struct umgr_span *sp = &h->span[s];
    int32_t *head = &h->room[sp->cls - 1];
    sp->prev = -1;
    sp->next = *head;
    if (*head >= 0)
        h->span[*head].prev = s;
    *head = s;
}

/* A span for class cls, linked in its list; -1 when the area is used up. */
static int32_t umgr_heap_new_span(struct umgr_heap *h, uint32_t cls)
{
    int32_t s = h->warm_spans;
    if (s >= 0) {
        h->warm_spans = h->span[s].next;
        h->nwarm--;
    } else if ((s = h->free_spans) >= 0)
        h->free_spans = h->span[s].next;
    else if (h->fresh < h->nspans)
        s = (int32_t)h->fresh++;
    else
        return -1;
    struct umgr_span *sp = &h->span[s];
    sp->free_head = sp->bump = sp->used = 0;
    sp->cls = cls + 1;
    h->spans_in_use++;
    umgr_heap_link(h, s);
    return s;
}

/* A chunk of at least `bytes` (1..4096); NULL when the area is used up. */
static void *umgr_heap_take(struct umgr_heap *h, uint32_t bytes)
{
    uint32_t cls = umgr_heap_class(bytes), size = (cls + 1) * UMGR_HEAP_GRAIN;
    pthread_mutex_lock(&h->lock);
    int32_t s = h->room[cls];
    if (s < 0 && (s = umgr_heap_new_span(h, cls)) < 0) {
        pthread_mutex_unlock(&h->lock);
        return NULL;
    }
    struct umgr_span *sp = &h->span[s];
    char *base = h->area + (uint64_t)s * UMGR_HEAP_SPAN;
    char *chunk;
    if (sp->free_head) {
        chunk = base + sp->free_head - 1;
        sp->free_head = *(uint32_t *)chunk;
    } else {
        chunk = base + (uint64_t)sp->bump++ * size;
    }
    if (++sp->used == umgr_heap_chunks(cls))
        umgr_heap_unlink(h, s);
    pthread_mutex_unlock(&h->lock);
    return chunk;
}

/* Span s has no chunk in use: warm, or its memory back to the kernel. */
static void umgr_heap_release_span(struct umgr_heap *h, int32_t s)
{
    struct umgr_span *sp = &h->span[s];
    sp->cls = 0;
    if (h->nwarm < UMGR_HEAP_WARM) {
        sp->next = h->warm_spans;
        h->warm_spans = s;
        h->nwarm++;
        return;
    }
    sp->next = h->free_spans;
    h->free_spans = s;
    madvise(h->area + (uint64_t)s * UMGR_HEAP_SPAN, UMGR_HEAP_SPAN, MADV_REMOVE);
}

/* Give back the chunk at offset `at`. */
static void umgr_heap_give(struct umgr_heap *h, uint64_t at)
{
    char *chunk = h->area + at;
    int32_t s = (int32_t)(at / UMGR_HEAP_SPAN);
    pthread_mutex_lock(&h->lock);
    struct umgr_span *sp = &h->span[s];
    if (sp->cls == 0) {   /* a chunk of a free span: given twice (a bug); never corrupt the lists */
        pthread_mutex_unlock(&h->lock);
        return;
    }
    int was_full = sp->used == umgr_heap_chunks(sp->cls - 1);
    *(uint32_t *)chunk = sp->free_head;
    sp->free_head = (uint32_t)(at % UMGR_HEAP_SPAN) + 1;
    if (--sp->used == 0) {
        if (!was_full)
            umgr_heap_unlink(h, s);
        umgr_heap_release_span(h, s);
        h->spans_in_use--;
    } else if (was_full) {
        umgr_heap_link(h, s);
    }
    pthread_mutex_unlock(&h->lock);
}

/* Bytes of the chunk an entry of this length owns (0: it owns none). */
static uint32_t umgr_entry_bytes(int32_t length)
{
    if (length <= 0)
        return 0;   /* none, or a word */
    return length > UMGR_ENTRY_LZ4 ? (uint32_t)(length - UMGR_ENTRY_LZ4) : (uint32_t)length;
}

/* Where the entry of a slot found in the region has its chunk: its span
   in *s and its index in the span in *k; 0 when no chunk the heap hands
   out is there (outside the area, or off its class's grid). */
static int umgr_heap_place(const struct umgr_heap *h, uint32_t bytes, uint64_t at, uint64_t *s, uint64_t *k)
{
    uint32_t size = (umgr_heap_class(bytes) + 1) * UMGR_HEAP_GRAIN;
    *s = at / UMGR_HEAP_SPAN;
    *k = at % UMGR_HEAP_SPAN / size;
    return bytes <= 4096 && *s < h->nspans && at % UMGR_HEAP_SPAN % size == 0
           && *k < umgr_heap_chunks(umgr_heap_class(bytes));
}

static void umgr_entry_lose(int32_t *length, uint64_t *where, uint64_t slot)
{
    length[slot] = UMGR_ENTRY_LOST;
    where[slot] = 0;
}

#define UMGR_BIT(map, i) ((map)[(i) / 8] & (1u << (i) % 8))
#define UMGR_SET_BIT(map, i) ((map)[(i) / 8] |= (uint8_t)(1u << (i) % 8))

/* Take over the entries of an index of `span` slots found in the region
   (a fresh heap over its area): each entry's chunk is marked used. An
   entry is marked UMGR_ENTRY_LOST when its length is none C makes, or its
   chunk is not one the heap could have handed out (outside the area, off
   its class's grid), and so are all
   entries of a chunk named twice, or of a span holding chunks of two
   classes: which of them is the damaged one cannot be told, and a page
   must never come back with another's bytes (nor with an older copy a
   next tier holds: a lost entry still says the page is here). Returns the
   number lost, or -1 without memory (nothing changed then). */
static int64_t umgr_heap_adopt(uint64_t heap, int32_t *length, uint64_t *where, uint64_t span)
{
    struct umgr_heap *h = (struct umgr_heap *)(uintptr_t)heap;
    uint64_t grains = h->nspans * (UMGR_HEAP_SPAN / UMGR_HEAP_GRAIN);
    uint8_t *named = calloc(grains / 8 + 1, 1), *twice = calloc(grains / 8 + 1, 1);
    uint8_t *mixed = calloc(h->nspans / 8 + 1, 1);
    if (named == NULL || twice == NULL || mixed == NULL) {
        free(named);
        free(twice);
        free(mixed);
        return -1;
    }
    int64_t dropped = 0;
    uint64_t s, k, marked = 0;   /* spans below `marked` may have had a class set */
    for (uint64_t slot = 0; slot < span; slot++) {
        uint32_t bytes = umgr_entry_bytes(length[slot]);
        if (length[slot] < 0 && length[slot] != UMGR_ENTRY_WORD && length[slot] != UMGR_ENTRY_LOST) {
            umgr_entry_lose(length, where, slot);   /* no length C makes */
            dropped++;
            continue;
        }
        if (bytes == 0)
            continue;
        if (!umgr_heap_place(h, bytes, where[slot], &s, &k)) {
            umgr_entry_lose(length, where, slot);
            dropped++;
            continue;
        }
        uint64_t grain = where[slot] / UMGR_HEAP_GRAIN;
        if (UMGR_BIT(named, grain))
            UMGR_SET_BIT(twice, grain);
        UMGR_SET_BIT(named, grain);
        uint32_t cls = umgr_heap_class(bytes) + 1;
        if (h->span[s].cls && h->span[s].cls != cls)
            UMGR_SET_BIT(mixed, s);
        h->span[s].cls = cls;
        if (s + 1 > marked)
            marked = s + 1;
    }
    free(named);   /* from here: the chunks of the entries kept (calloc: pages untouched stay unbacked) */
    if ((named = calloc(grains / 8 + 1, 1)) == NULL) {
        free(twice);
        free(mixed);
        return -1;
    }
    for (uint64_t slot = 0; slot < span; slot++) {
        uint32_t bytes = umgr_entry_bytes(length[slot]);
        if (bytes == 0)
            continue;
        umgr_heap_place(h, bytes, where[slot], &s, &k);
        if (UMGR_BIT(twice, where[slot] / UMGR_HEAP_GRAIN) || UMGR_BIT(mixed, s)) {
            umgr_entry_lose(length, where, slot);
            dropped++;
            continue;
        }
        UMGR_SET_BIT(named, where[slot] / UMGR_HEAP_GRAIN);
        struct umgr_span *sp = &h->span[s];
        sp->used++;
        if (k + 1 > sp->bump)
            sp->bump = (uint32_t)k + 1;
        if (s + 1 > h->fresh)
            h->fresh = s + 1;
    }
    for (int32_t t = (int32_t)h->fresh - 1; t >= 0; t--) {
        struct umgr_span *sp = &h->span[t];
        if (!sp->used) {
            umgr_heap_release_span(h, t);
            continue;
        }
        uint32_t size = sp->cls * UMGR_HEAP_GRAIN;
        for (int64_t c = (int64_t)sp->bump - 1; c >= 0; c--) {
            uint64_t at = (uint64_t)t * UMGR_HEAP_SPAN + (uint64_t)c * size;
            if (UMGR_BIT(named, at / UMGR_HEAP_GRAIN))
                continue;
            *(uint32_t *)(h->area + at) = sp->free_head;
            sp->free_head = (uint32_t)(c * size) + 1;
        }
        h->spans_in_use++;
        if (sp->used < umgr_heap_chunks(sp->cls - 1))
            umgr_heap_link(h, t);
    }
    for (uint64_t t = h->fresh; t < marked; t++)
        h->span[t].cls = 0;   /* (a span past the last used one may have been marked by a dropped entry) */
    /* Spans past the last used one are taken as never used: what the dead
       daemon left in them (its warm spans, lost entries') goes back. */
    if (h->fresh < h->nspans)
        madvise(h->area + h->fresh * UMGR_HEAP_SPAN, (h->nspans - h->fresh) * UMGR_HEAP_SPAN, MADV_REMOVE);
    free(named);
    free(twice);
    free(mixed);
    return dropped;
}

/* A copy of len bytes at from in a chunk of the heap, its offset in *at;
   0 when the heap is used up. */
static int umgr_entry_copy(struct umgr_heap *h, const void *from, uint32_t len, uint64_t *at)
{
    char *chunk = umgr_heap_take(h, len);
    if (chunk == NULL)
        return 0;
    memcpy(chunk, from, len);
    *at = (uint64_t)(chunk - h->area);
    return 1;
}

/* Pack pages[0..n) (page addresses) into new entries (lengths[i],
   where[i]): a same-filled page as its word, else a frame of at most
   `limit` bytes; a page that does not fit is held raw when `alone`, else
   gets length 0 (declined: the next tier takes it), and so does one the
   heap has no chunk for (where: UMGR_DECLINED_FULL; else 0). Returns n, or
   the index of the page that failed (a codec error, or the heap used up
   when `alone`): the entries before it are made, those from it on are 0.
   The caller installs or frees them. */
static int umgr_codec_pack_batch(uint64_t codec, uint64_t heap, const uint64_t *pages, int n, int limit, int alone,
                                 int32_t *lengths, uint64_t *where)
{
    struct umgr_codec *c = (struct umgr_codec *)(uintptr_t)codec;
    struct umgr_heap *h = (struct umgr_heap *)(uintptr_t)heap;
    char frame[4096];
    if (limit > (int)sizeof(frame))
        limit = sizeof(frame);
    memset(lengths, 0, sizeof(*lengths) * (size_t)n);
    memset(where, 0, sizeof(*where) * (size_t)n);
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
        if (!umgr_entry_copy(h, got ? (const void *)frame : (const void *)w, (uint32_t)bytes, &where[i])) {
            if (alone)
                return i;
            where[i] = UMGR_DECLINED_FULL;   /* the next tier takes it */
            continue;
        }
        lengths[i] = got ? got : 4096;
    }
    return n;
}

/* Unpack the entry (length, where) of a heap over `area` into the 4096
   bytes at page; 1 when it
   came out whole, 0 when it does not decompress to exactly one page. */
static int umgr_entry_unpack(uint64_t dctx, int32_t length, uint64_t where, uint64_t area, uint64_t page)
{
    void *out = (void *)(uintptr_t)page;
    const void *from = (const void *)(uintptr_t)(area + where);
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
                               uint64_t area, uint64_t span, const uint64_t *pages)
{
    for (int i = 0; i < n; i++) {
        uint64_t s = (uint32_t)slots[i];
        if (s >= span || !umgr_entry_unpack(dctx, length[s], where[s], area, pages[i]))
            return i;
    }
    return n;
}

/* Give back the chunks of entries not installed. */
static void umgr_entries_free(uint64_t heap, const int32_t *lengths, const uint64_t *values, int n)
{
    for (int i = 0; i < n; i++)
        if (umgr_entry_bytes(lengths[i]))
            umgr_heap_give((struct umgr_heap *)(uintptr_t)heap, values[i]);
}

/* Drop the entries of slots[0..n) (giving back their chunks). The index
   is cleared before the chunk goes back: a daemon that dies between the
   two leaves a chunk no entry names, never an entry naming a free chunk. */
static void umgr_entries_drop(uint64_t heap, const int32_t *slots, int n, int32_t *length, uint64_t *where)
{
    for (int i = 0; i < n; i++) {
        int32_t s = slots[i];
        uint32_t bytes = umgr_entry_bytes(length[s]);
        uint64_t at = where[s];
        length[s] = 0;
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        where[s] = 0;
        if (bytes)
            umgr_heap_give((struct umgr_heap *)(uintptr_t)heap, at);
    }
}

/* Each entry i with keep[i] becomes slots[i]'s (the entry it replaces is
   dropped); the others are given back. The address is stored before the
   length: an entry is whole once its length is set. */
static void umgr_entries_install(uint64_t heap, const int32_t *slots, const uint8_t *keep, int n,
                                 const int32_t *lengths, const uint64_t *values, int32_t *length, uint64_t *where)
{
    for (int i = 0; i < n; i++) {
        if (!keep[i]) {
            umgr_entries_free(heap, &lengths[i], &values[i], 1);
            continue;
        }
        umgr_entries_drop(heap, &slots[i], 1, length, where);
        where[slots[i]] = values[i];
        __atomic_signal_fence(__ATOMIC_SEQ_CST);   /* (kept in this order by the compiler too) */
        length[slots[i]] = lengths[i];
    }
}
"""
