"""The fault path's common case in C: read the queued uffd messages (up to
UMGR_FAST_GROUP at once) and serve each MISSING fault on a page that needs
nothing but its swap slot read (or zeros): read from the swap file, or
decompress it from the compressed store's memory (umgr/backends/compressed.py),
UFFDIO_COPY (or ZEROPAGE), and mark it resident in the page table; and
each write-protect fault on a RESIDENT page (a page that came in clean, or
prefetched, is written): unprotect it; on to the next group, until
something needs the daemon's Python side. Once faults come more than one
at a time, reads go through Linux AIO on the O_DIRECT swap file (one
thread's faults poll for their read's completion), and while they are in flight the call reads the
faults that come meanwhile and sends their reads too: several threads
faulting at once have their reads in flight together (as many as fault,
up to UMGR_FAST_GROUP), and each page is copied in, waking its thread, as
soon as its own read is done. (Reading a group, then waiting for all its
reads, kept about 2 of 4 threads' reads in flight.) A page an event of
the group names (the app's madvise, munmap or mremap returned when it was
read: the page may be zeroed, gone, or something new mapped there) is not
copied in: its fault goes to the full path, which handles the event first.

A lone fault on a swapped page may bring its neighbours too (the
readahead policy's `cluster`, umgr_fast_cluster): the swapped pages of its
aligned block that went out with it, while such pages prove used.

A call may also run in the background, in a thread of its own
(umgr_fast_bg_go), while the daemon's Python thread settles the previous
call's log: each call's Python half then overlaps the next call's faults
instead of delaying them (umgr/paging/fastpath.py says when, and why that
is safe).

Python's own path costs about 150 us of interpreter time per random fault
around a 40-70 us device read (measured here, Linux 6.18, 2 vCPUs), and the
next fault is already queued when it is done: the daemon was the
bottleneck. Here the faults of a call are served back to back, and Python
settles them afterwards in one batch (umgr/paging/fastpath.py).

The call changes the page table only as the Python side would for such a
fault (state RESIDENT, slot kept or cleared, per-state counts) and logs each
page it served. Anything else it reads (another event, a fault on a page
in any other state, a page outside the regions, a failed read, copy or
unprotect) it leaves in the message buffer for the full path, and returns.
"""

INCLUDES = """
#include <string.h>
#include <time.h>
#include <linux/aio_abi.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
"""

STRUCTS = """
/* One region of a target's page table (umgr/paging/pagetable.py). */
struct umgr_fast_region {
    uint64_t vpn;         /* its first page */
    uint64_t end;         /* one past its last page */
    uint8_t *state;       /* State per page */
    int32_t *slot;        /* swap slot per page, 0: none */
    uint8_t *flags;       /* Flag bits per page */
    int64_t *counts;      /* pages per state, the table's */
};

/* Where a swapped page's content is, as the backend tells
   (umgr/backends/__init__.py: sync_read_fd, memory_entries). */
struct umgr_fast_store {
    int fd;               /* a file holding slot s at offset s * 4096, read with pread; -1: none */
    const int32_t *length; /* a memory tier's entry per slot (NULL: none): 0 not held there,
                             else an entry as _cdef_codec.py makes them */
    const uint64_t *where;
    uint64_t area;        /* the address of the heap's area the entries are offsets in */
    uint64_t span;        /* slots below this have an entry */
    uint64_t dctx;        /* a zstd decompression context (umgr_fast_open) */
};

/* What one call did, and its limits. The arrays hold max entries. */
struct umgr_fast_log {
    int32_t max;
    int32_t served;       /* entries written by the last call */
    uint64_t *vpn;        /* the pages served, in fault order */
    int32_t *slot;        /* the slot each was read from, 0: zeros */
    uint8_t *kept;        /* came in write-protected, slot kept */
    uint8_t *kind;        /* 0: a MISSING fault (UMGR_FAST_MEMORY: read from a memory tier);
                             UMGR_FAST_WP, with UMGR_FAST_WAS_PREFETCHED: a write to a
                             resident page (its slot: the clean copy dropped) */
    int64_t *read_ns;     /* the pread of each (0: none) */
    int64_t *serve_ns;    /* from its message read to its copy done */
    int32_t keep_period;  /* keep clean copies: 0 never, 1 always, n: every nth read */
    int32_t keep_phase;   /* reads since the last kept one (keep_period > 1) */
    int32_t handoff;      /* HANDOFF: messages left at the buffer's start for the full path */
    uint64_t aio;         /* the AIO context of grouped reads (umgr_fast_open), 0: none: one per
                             process, shared by the calls made one at a time, and one per
                             member of a joint round (umgr/paging/joint.py); no read is in
                             flight between calls */
    int32_t efd;          /* the eventfd its reads signal as they complete (umgr_fast_open), -1:
                             none (a group then polls for completions) */
    uint64_t dctx;        /* the zstd context of decompressions (umgr_fast_open), 0: none */
    uint64_t recent[8];   /* the latest pages served, over calls (a ring) */
    int32_t recent_at;    /* where the next goes in it */
    uint64_t streams[8];  /* the far ends of the latest prefetch windows (0: none): a fault
                             on one, or one or two steps past it, continues its stream,
                             and goes to the full path, which brings the next window
                             with it */
    int32_t stream_step[8]; /* the pages between a window's pages: > 0 ascends, < 0 descends */
    uint64_t block_ends[8]; /* the page after each of the latest blocks brought beside lone faults
                               (umgr_fast_cluster; 0: none): a fault there goes to the full path */
    int32_t block_end_at;   /* where the next goes in it */
    /* Limits of serve beside its arguments, set before each call: */
    int32_t yield_after;  /* end the call once this many pages came in (<= room): the evictor
                             is to start as soon as the high water mark is passed */
    int32_t cluster;      /* a lone fault on a swapped page brings the pages of its aligned block of
                             this many (a power of 2, at most UMGR_FAST_GROUP; 0: none) that went
                             out with it, while they prove used (umgr_fast_cluster) */
    int64_t cluster_reach; /* ... went out with it: within this many evictions of it */
    int32_t cluster_bar;  /* ... while more than this percentage (+ UMGR_CLUSTER_MARGIN) of the
                             pages brought are written soon after, or ... */
    int32_t cluster_fault_bar; /* ... more than this percentage (+ the margin) of the pages of the
                                  blocks left out come back from swap soon after (umgr_cluster_wanted) */
    int32_t fresh_window; /* a write fault on a fresh page that follows the page before it (a first
                             write going up) brings up to this many fresh pages after it, as zeros,
                             the first time UMGR_FILL_START, doubling while the writes go on
                             (umgr_fast_fill); 0: none */
    int32_t max_stride;   /* end it on a fault that extends the last two served by their gap,
                             a gap of up to this many pages: a strided stream may start */
    int32_t watch_fd;     /* end it when this fd is readable (the daemon's event loop has
                             work: an I/O wait over, a thread's result); -1: none */
    int64_t watch_ns;     /* how often watch_fd is looked at */
    int32_t wake_fd;      /* -1: the call runs in the foreground. Else it runs in the background
                             (umgr_fast_bg_go) while the daemon's thread settles the previous
                             call: rather than spin for a message (on 2 vCPUs a spinning thread
                             takes the CPU of the program it serves) it sleeps in ppoll() on the
                             uffd, watch_fd and this eventfd, which wakes it when the daemon's
                             thread stops it or starts to wait for it (then it spins, as in the
                             foreground: that thread sleeps meanwhile) */
    int32_t waited;       /* set when the daemon's thread waits for the call */
    int32_t stop;         /* set when the daemon's thread stops the call: it ends after its group */
    int32_t why;          /* what ended the call, if it yielded (UMGR_FAST_WHY_*; else 0) */
    /* The bookkeeping that needs no Python, done here as each page is
       logged (umgr/paging/fastpath.py settles the rest). Per call: */
    int32_t missing;      /* MISSING faults served (serve) */
    int32_t wp;           /* writes to resident pages served (serve) */
    int32_t wp_dropped;   /* of them, dropping a kept clean copy */
    int32_t swapped;      /* pages read from a slot */
    int32_t kept_count;   /* of them, come in clean (write-protected, slot kept) */
    int32_t also_read;    /* umgr_fast_prefetch read its faulting page alongside (counted in
                             file_reads/memory_reads, not in swapped: the full path brings it) */
    int64_t read_ns_sum;  /* read_ns of the logged pages, summed */
    int64_t serve_ns_sum; /* serve_ns of the logged pages, summed */
    int64_t cluster_ns_sum; /* of serve_ns_sum, bringing pages beside lone faults or ahead of first
                               writes (no fault's latency) */
    int32_t file_reads, memory_reads; /* of the pages read: from store->fd, unpacked from its memory tier */
    int64_t file_read_ns, memory_read_ns; /* their read_ns, summed */
    int32_t slow_file_reads;  /* file reads that took longer than slow_read_ns */
    int32_t clustered;    /* pages brought beside lone faults (kind UMGR_FAST_CLUSTER) */
    int32_t filled;       /* fresh pages brought ahead of first writes (kind UMGR_FAST_FILL) */
    int32_t released_count; /* slots whose last reference went: released[0..released_count) */
    int32_t *released;    /* (max entries: a logged page gives up at most one slot) */
    int32_t double_free;  /* a slot without a reference was to be given up (left as it was) */
    /* Over calls, carried from one log to the next: */
    int32_t concurrent;   /* groups to come that send their reads through AIO although they
                             start with one fault (umgr_fast_group) */
    /* ... and (umgr_fast_cluster): */
    int32_t cluster_brought; /* pages brought beside lone faults lately (halved now and then) */
    int32_t cluster_hits;    /* of them, written (a write-protect fault; halved alike) */
    int32_t cluster_skips;   /* lone faults since the last that left its block out, while on by faults */
    int32_t cluster_probes;  /* lone faults since the last probe, while off */
    uint64_t fill_next[4];   /* per first write going up (a thread's, say): the page after the pages
                                brought ahead of it last (0: none) ... */
    int32_t fill_size[4];    /* ... and how many those were */
    int32_t fill_at;         /* where the next one goes in them */
    /* Over calls, set once by the Python side: */
    uint16_t *refs;       /* the slot allocator's reference counts (umgr/backends/slots.py) */
    uint64_t nrefs;
    uint64_t fill_zeros;  /* UMGR_FILL_MAX pages that read as zeros (private, never written: the
                             zero page), the source of the pages brought ahead of first writes */
    const uint32_t *evicted_at; /* per slot, the eviction count when its page went out (slots.py) */
    uint64_t *noted_vpn;  /* pages lone faults' blocks left out (umgr_cluster_note), by vpn modulo
                             UMGR_CLUSTER_NOTES (0: none; NULL: no table), and ... */
    uint32_t *noted_tick; /* ... the clock then (umgr/paging/clusternotes.py) */
    int64_t *cluster_counts; /* [UMGR_CLUSTER_NOTED]: pages noted; [_WANTED]: of them, faulted back
                                from swap soon after; [_TICK]: pages faulted back from swap (the
                                last two counted by the daemon, ClusterNotes.came_back) */
    int64_t *latency;     /* the fault latency histogram (umgr/paging/stats.py), NULL: none */
    const int64_t *latency_bounds; /* bucket b counts serve_ns <= bounds[b] (and > bounds[b-1]) */
    int32_t nbounds;
    int64_t *file_buckets, *memory_buckets; /* per call: reads per bucket of io_bounds (nio_bounds + 1 each) */
    const int64_t *io_bounds;
    int32_t nio_bounds;
    int64_t slow_read_ns;
};
"""

STRUCTS += """
/* A thread that runs one umgr_fast_serve call at a time in the background,
   with these arguments (umgr_fast_bg_go, then umgr_fast_bg_finish). */
struct umgr_fast_bg {
    int uffd;
    struct uffd_msg *msgs;
    int max_msgs;
    const struct umgr_fast_region *regions;
    int nregions;
    const struct umgr_fast_store *store;
    uint64_t pages, zeros;
    int64_t spin_ns, slice_ns;
    int32_t room;
    int64_t near;
    struct umgr_fast_log *log;   /* its wake_fd is the caller's eventfd (nonblocking) */
    int result;          /* the call's UMGR_FAST_* or -errno */
    int go_fd, done_fd;  /* eventfds: a call to run (or the end), the call done */
    int notify_fd;       /* -1, or an eventfd the thread adds 1 to as each call ends (the members
                            of a joint round share one: umgr/paging/joint.py) */
    int quit;
    uint64_t thread;     /* its pthread_t */
    int unpinned;        /* umgr_fast_bg_wait let it run on any CPU again (the caller's to clear) */
    int tid;             /* its thread id (set before umgr_fast_bg_start returns) */
    int own_nice;        /* the daemon's thread's nice value when it was started: the thread's own */
};
"""

TYPES = STRUCTS + """
#define UMGR_FAST_GROUP ...
#define UMGR_FAST_IDLE ...
#define UMGR_FAST_HANDOFF ...
#define UMGR_FAST_YIELD ...
#define UMGR_STATE_FRESH ...
#define UMGR_STATE_RESIDENT ...
#define UMGR_STATE_SWAPPED ...
#define UMGR_FLAG_DISCARDABLE ...
#define UMGR_FLAG_PREFETCHED ...
#define UMGR_FLAG_CLUSTERED ...
#define UMGR_FAST_WP ...
#define UMGR_FAST_WAS_PREFETCHED ...
#define UMGR_FAST_MEMORY ...
#define UMGR_FAST_CLUSTER ...
#define UMGR_FAST_FILL ...
#define UMGR_FAST_AHEAD ...
#define UMGR_FILL_MAX ...
#define UMGR_CLUSTER_NOTES ...
#define UMGR_CLUSTER_NOTED ...
#define UMGR_CLUSTER_WANTED ...
#define UMGR_CLUSTER_TICK ...
#define UMGR_FAST_WHY_NEAR ...
#define UMGR_FAST_WHY_FULL ...
#define UMGR_FAST_WHY_ROOM ...
#define UMGR_FAST_WHY_SLICE ...
#define UMGR_FAST_WHY_WATCH ...
#define UMGR_FAST_WHY_STOP ...
"""

FUNCTIONS = """
int umgr_fast_open(struct umgr_fast_log *log);
int umgr_fast_serve(int uffd, struct uffd_msg *msgs, int max_msgs, const struct umgr_fast_region *regions,
                    int nregions, const struct umgr_fast_store *store, uint64_t pages, uint64_t zeros,
                    int64_t spin_ns, int64_t slice_ns, int32_t room, int64_t near, struct umgr_fast_log *log);
int umgr_fast_unpack(const struct umgr_fast_store *store, uint32_t slot, uint64_t page);
int umgr_fast_bg_start(struct umgr_fast_bg *bg);
void umgr_fast_bg_go(struct umgr_fast_bg *bg);
void umgr_fast_bg_stop(struct umgr_fast_bg *bg);
int umgr_fast_bg_finish(struct umgr_fast_bg *bg, int stop);
int umgr_fast_bg_wait(struct umgr_fast_bg *bg, int stop, int64_t timeout_ns);
int umgr_fast_bg_pin(struct umgr_fast_bg *bg, int cpu, int nice);
void umgr_fast_bg_end(struct umgr_fast_bg *bg);
int umgr_fast_prefetch(int uffd, const struct umgr_fast_region *regions, int nregions,
                       const struct umgr_fast_store *store, const int64_t *vpns, int n, uint64_t pages,
                       int keep_period, int fresh, int32_t also_slot, uint64_t also_page,
                       struct umgr_fast_log *log);
"""

CUSTOMIZATIONS = STRUCTS + """
#define UMGR_FAST_GROUP 8     /* messages read and served together */
#define UMGR_AIO_DEPTH 64      /* reads in flight at once (an AIO context of umgr_fast_open holds this many) */
#define UMGR_FAST_IDLE 0      /* nothing was queued for spin_ns */
#define UMGR_FAST_HANDOFF 1   /* log->handoff messages for the full path */
#define UMGR_FAST_YIELD 2     /* a limit was reached: log full, room used, time slice over, near fault */
/* umgr/paging/pagetable.py State values (checked at import there) */
#define UMGR_STATE_FRESH 0
#define UMGR_STATE_RESIDENT 1
#define UMGR_STATE_SWAPPED 4
/* and its Flag bits */
#define UMGR_FLAG_DISCARDABLE 1
#define UMGR_FLAG_PREFETCHED 2
#define UMGR_FLAG_CLUSTERED 4     /* with PREFETCHED: brought beside a lone fault */
/* log->kind bits */
#define UMGR_FAST_WP 1
#define UMGR_FAST_WAS_PREFETCHED 2
#define UMGR_FAST_MEMORY 4
#define UMGR_FAST_CLUSTER 8   /* brought beside a lone fault (log->cluster): not a fault */
#define UMGR_FAST_FILL 16     /* brought ahead of a first write (log->fresh_window): not a fault */
#define UMGR_FAST_WRITE 32    /* a MISSING fault by a write */
#define UMGR_FAST_AHEAD 64    /* ... that brought fresh pages ahead of it (umgr_fast_fill) */
#define UMGR_FILL_START 16    /* pages a first write going up brings the first time */
#define UMGR_FILL_MAX 128     /* ... at most (log->fresh_window is clipped to it) */
#define UMGR_FILL_CHAINS 4    /* first writes going up followed at once (log->fill_next) */
_Static_assert(UMGR_FILL_CHAINS == sizeof(((struct umgr_fast_log *)0)->fill_next) / sizeof(uint64_t),
               "log->fill_next and fill_size hold UMGR_FILL_CHAINS chains");
/* log->why: a call yielded because */
#define UMGR_FAST_WHY_NEAR 1    /* a page served may start a stream (the prefetch policy is to see it) */
#define UMGR_FAST_WHY_FULL 2    /* the log is full */
#define UMGR_FAST_WHY_ROOM 3    /* `room` pages came in, or log->yield_after (the evictor is to start) */
#define UMGR_FAST_WHY_SLICE 4   /* its time slice is over */
#define UMGR_FAST_WHY_WATCH 5   /* log->watch_fd is readable */
#define UMGR_FAST_WHY_STOP 6    /* it was stopped (in the background) */

static int64_t umgr_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Read up to max messages (those queued once one is), busy-polling the
   nonblocking uffd for up to spin_ns (on this VM a sleeping daemon's
   wake-up costs more than a fault). One read: the kernel's read of a uffd
   goes on taking queued messages, without waiting, while the buffer has
   room (userfaultfd_read_iter), and a second read for the rest cost a
   syscall a fault where faults come one at a time.
   How many were read; 0: none came; -errno: the read failed. EINTR is not a failure:
   the kernel looks for a pending signal before it answers EAGAIN, so a
   signal to the daemon (SIGHUP, the SIGUSR1 of umgr exec) fails a read
   even of a nonblocking uffd; its handler has run, the read is retried. */
static int umgr_fast_sleep(int uffd, const struct umgr_fast_log *log, int64_t until);

static int umgr_fast_next(int uffd, struct uffd_msg *msgs, int max, int64_t spin_ns, const struct umgr_fast_log *log,
                          int64_t until)
{
    int64_t deadline = 0;
    for (;;) {
        ssize_t n = read(uffd, msgs, (size_t)max * sizeof(*msgs));
        if (n >= (ssize_t)sizeof(*msgs))
            return (int)(n / (ssize_t)sizeof(*msgs));
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            return -errno;
        if (__atomic_load_n(&log->stop, __ATOMIC_ACQUIRE))
            return 0;
        if (log->wake_fd >= 0 && !__atomic_load_n(&log->waited, __ATOMIC_ACQUIRE)) {
            if (!umgr_fast_sleep(uffd, log, until))
                return 0;
            continue;
        }
        int64_t now = umgr_now_ns();
        if (!deadline)
            deadline = now + spin_ns;
        else if (now >= deadline)
            return 0;
    }
}

/* A call in the background waits for a message: sleep until the uffd,
   log->watch_fd or log->wake_fd is readable, or until `until`. 0 when the
   call is to end (watch_fd readable, or `until` passed), else 1. */
static int umgr_fast_sleep(int uffd, const struct umgr_fast_log *log, int64_t until)
{
    int64_t left = until - umgr_now_ns();
    if (left <= 0)
        return 0;
    struct pollfd fds[3] = { { .fd = uffd, .events = POLLIN }, { .fd = log->wake_fd, .events = POLLIN },
                             { .fd = log->watch_fd, .events = POLLIN } };
    int nfds = log->watch_fd >= 0 ? 3 : 2;
    struct timespec wait = { left / 1000000000, left % 1000000000 };
    if (ppoll(fds, nfds, &wait, NULL) <= 0)
        return 1;   /* (timed out, or EINTR: the caller looks again) */
    uint64_t count;
    if ((fds[1].revents & POLLIN) && read(log->wake_fd, &count, sizeof count) < 0) {
        /* EAGAIN: another thread drained it; nothing to do */
    }
    return !(nfds == 3 && (fds[2].revents & POLLIN) && !(fds[0].revents & POLLIN));
}

/* What a message of a group asks for. */
#define UMGR_PLAN_OTHER 0    /* the full path's */
#define UMGR_PLAN_SWAPPED 1  /* read its slot, copy it in */
#define UMGR_PLAN_FRESH 2    /* zeros */
#define UMGR_PLAN_DUP 3      /* the same page as an earlier one: that copy wakes it too */
#define UMGR_PLAN_WP 4       /* a write to a RESIDENT page: unprotect it */
#define UMGR_PLAN_MEMORY 5   /* unpack its slot from the memory tier, copy it in */

/* log->concurrent: groups to come that send their reads through AIO
   although they start with one fault: set when a group has more than one,
   counting down with each that has one. A lone fault's read is polled for
   (umgr_fast_read_polled), which reads no other faults meanwhile; grouped
   AIO lets the faults of other threads be read and served while it is in
   flight. */
#define UMGR_FAST_CONCURRENT_GROUPS 64

/* Set once io_getevents failed other than by EINTR (EINVAL or EFAULT: cannot
   happen with a valid context). Reads may still be in flight then, into
   buffers the next call uses for other pages, and their completions would
   be reaped by another call as its own: umgr_aio_fail destroys the context,
   which waits for every read in flight on it (io_destroy(2)), and from then
   on every read is a pread (in every context: the members of a joint round
   have one each, and each failing one is destroyed). */
static int umgr_aio_dead = 0;

/* The AIO context of log's reads, 0: none (every read a pread). */
static aio_context_t umgr_aio(const struct umgr_fast_log *log)
{
    return __atomic_load_n(&umgr_aio_dead, __ATOMIC_ACQUIRE) ? 0 : (aio_context_t)log->aio;
}

static void umgr_aio_fail(aio_context_t ctx)
{
    __atomic_store_n(&umgr_aio_dead, 1, __ATOMIC_RELEASE);
    syscall(SYS_io_destroy, ctx);   /* (a context destroyed already answers EINVAL) */
}

static int umgr_fast_open(struct umgr_fast_log *log)
{
    log->dctx = umgr_zstd_new_dctx();
    log->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, UMGR_AIO_DEPTH, &ctx) < 0)
        return -errno;
    log->aio = ctx;
    return 0;
}

/* Whether the memory tier holds slot. */
static int umgr_fast_in_memory(const struct umgr_fast_store *store, int32_t slot)
{
    return store->length != NULL && (uint64_t)slot < store->span && store->length[slot] != 0;
}

/* Unpack the memory tier's page of slot into page (4096 bytes,
   _cdef_codec.py); 1 when it came out whole. */
static int umgr_fast_unpack(const struct umgr_fast_store *store, uint32_t slot, uint64_t page)
{
    if (!umgr_fast_in_memory(store, (int32_t)slot))
        return 0;
    return umgr_entry_unpack(store->dctx, store->length[slot], store->where[slot], store->area, page);
}

/* The region of regions[0..nregions) (sorted by vpn) holding vpn, or NULL. */
static const struct umgr_fast_region *umgr_fast_find(const struct umgr_fast_region *regions, int nregions,
                                                     uint64_t vpn)
{
    int lo = 0, hi = nregions;   /* finds the first region that starts after vpn */
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (regions[mid].vpn <= vpn)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0 || vpn >= regions[lo - 1].end)
        return NULL;
    return &regions[lo - 1];
}

/* Whether `vpn` lies within `near` pages of one of `pages` (0: none). */
static int umgr_fast_close_to(const uint64_t *pages, uint64_t vpn, int64_t near)
{
    for (int i = 0; i < 8; i++) {
        int64_t gap = (int64_t)(vpn - pages[i]);
        if (pages[i] && gap <= near && gap >= -near)
            return 1;
    }
    return 0;
}

/* Whether `vpn` is the far end of one of the latest prefetch windows, or
   one or two of its steps past it. */
static int umgr_fast_continues_stream(const struct umgr_fast_log *log, uint64_t vpn)
{
    for (int i = 0; i < 8; i++) {
        int64_t step = log->stream_step[i];
        int64_t past = (int64_t)(vpn - log->streams[i]);
        if (log->streams[i] && step && past % step == 0 && past / step >= 0 && past / step <= 2)
            return 1;
    }
    return 0;
}

/* Whether `vpn` is the page after one of the latest blocks brought beside
   lone faults while only the faults on blocks left out kept them coming.
   A scan whose windows stopped (at the budget a window may not come) faults
   on those, and then through the blocks that come, a block apart, where the
   prefetch policy sees no stream (and a stride of the block's size: that
   `reread 64 3` under 16 MiB took 1000-1200 faults in some runs, against
   300 where its streams went on). On the full path it brings no block, so
   the scan's next fault is the page after it, which starts a stream. Not
   while writes keep blocks coming: a JVM's arrays updated at random then
   took 1.2x the time (1.01-1.47, 5 pairs), their blocks in C being cheaper
   than the full path's windows. */
static int umgr_fast_continues_block(const struct umgr_fast_log *log, uint64_t vpn)
{
    for (int i = 0; i < 8; i++)
        if (log->block_ends[i] == vpn)
            return 1;
    return 0;
}

/* What one group is doing: message i's plan, region, whether it was
   served, when it was read and its slot read sent (reads in flight
   through AIO, cbs[i] for message i). */
struct umgr_fast_group_state {
    int plan[UMGR_FAST_GROUP], served[UMGR_FAST_GROUP];
    const struct umgr_fast_region *in[UMGR_FAST_GROUP];
    int64_t read_at[UMGR_FAST_GROUP], sent_at[UMGR_FAST_GROUP];
    int64_t last_done;   /* when a read of the group last came back */
    struct iocb cbs[UMGR_FAST_GROUP];
    int inflight;   /* reads sent and not yet completed */
    int planned;    /* messages planned to be served here (at most cap) */
    int other;      /* a message was not a plain fault (an event among them): it and all after it are
                       the full path's, and no more is read */
    /* The pages the group's events name (REMOVE, UNMAP: the range; REMAP:
       where the pages were), [lo, hi) in vpns; all_blocked: every page
       (FORK, or more ranges than fit). Once such an event is read, the
       app's madvise, munmap or mremap has returned, and the page may be
       zeroed, gone, or something new mapped there: a fault on one is the
       full path's, after the event. */
    uint64_t lo[8], hi[8];
    int nblocked, all_blocked;
};

/* The plan of message i (those before it planned already) and its
   region: a plain fault in the regions, up to `cap` of them, that
   continues no stream; from the first message that is not one on, OTHER. */
static int umgr_fast_plan(const struct uffd_msg *msgs, int i, struct umgr_fast_group_state *g,
                          const struct umgr_fast_region *regions, int nregions, const struct umgr_fast_store *store,
                          int cap, const struct umgr_fast_log *log)
{
    const struct uffd_msg *m = &msgs[i];
    if (g->other || g->planned >= cap || m->event != UFFD_EVENT_PAGEFAULT) {
        g->other = 1;
        return UMGR_PLAN_OTHER;
    }
    int wp = (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) != 0;
    uint64_t vpn = m->arg.pagefault.address >> 12;
    const struct umgr_fast_region *r = g->in[i] = umgr_fast_find(regions, nregions, vpn);
    if (r == NULL || (!wp && (umgr_fast_continues_stream(log, vpn) || umgr_fast_continues_block(log, vpn)))) {
        g->other = 1;
        return UMGR_PLAN_OTHER;
    }
    /* The same page as one whose read is in flight: its copy wakes this
       thread too. (Not one served already: a fault that came after that
       is a new one, such as a write to the page just copied in clean.) */
    for (int j = 0; j < i; j++)
        if (g->plan[j] == UMGR_PLAN_SWAPPED && !g->served[j] && msgs[j].arg.pagefault.address >> 12 == vpn)
            return UMGR_PLAN_DUP;
    uint8_t state = r->state[vpn - r->vpn];
    int32_t slot = r->slot[vpn - r->vpn];
    int plan = UMGR_PLAN_OTHER;
    if (wp) {
        /* Other states have race rules of their own (an EVICTING page's
           write cancels its eviction, a ZAPPING page's writer waits):
           the full path's. */
        if (state == UMGR_STATE_RESIDENT)
            plan = UMGR_PLAN_WP;
    } else if (state == UMGR_STATE_SWAPPED && slot != 0 && umgr_fast_in_memory(store, slot))
        plan = UMGR_PLAN_MEMORY;   /* a page is in exactly one tier: the memory one if it holds it */
    else if (state == UMGR_STATE_SWAPPED && slot != 0 && store->fd >= 0)
        plan = UMGR_PLAN_SWAPPED;
    else if (state == UMGR_STATE_FRESH && slot == 0)
        plan = UMGR_PLAN_FRESH;
    if (plan == UMGR_PLAN_OTHER)
        g->other = 1;
    else
        g->planned++;
    return plan;
}

/* Wait for the `submitted` reads of cbs to complete, marking ok[] for the
   pages each covers (index[k]: the first page of read k). 0, or -1 if
   some could not be waited for (umgr_aio_fail: they are over, their pages
   not to be used). */
static int umgr_aio_wait(aio_context_t aio, struct iocb *cbs, const int *index, int submitted, int *ok)
{
    int done = 0;
    while (done < submitted) {
        struct io_event events[UMGR_AIO_DEPTH];
        long got = syscall(SYS_io_getevents, aio, 1L, (long)(submitted - done), events, NULL);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            umgr_aio_fail(aio);
            return -1;
        }
        for (long e = 0; e < got; e++) {
            struct iocb *cb = (struct iocb *)(uintptr_t)events[e].obj;
            int first = index[cb - cbs];
            for (int p = 0; (uint64_t)p * 4096 < cb->aio_nbytes; p++)
                ok[first + p] = events[e].res > 0 && (int64_t)(p + 1) * 4096 <= events[e].res;
        }
        done += (int)got;
    }
    return 0;
}

static void umgr_fast_reset(struct umgr_fast_log *log)
{
    log->served = 0;
    log->missing = log->wp = log->wp_dropped = log->swapped = log->kept_count = 0;
    log->read_ns_sum = log->serve_ns_sum = log->cluster_ns_sum = 0;
    log->file_reads = log->memory_reads = log->slow_file_reads = 0;
    log->file_read_ns = log->memory_read_ns = 0;
    log->clustered = log->filled = 0;
    log->also_read = 0;
    if (log->file_buckets != NULL) {
        memset(log->file_buckets, 0, (size_t)(log->nio_bounds + 1) * sizeof(int64_t));
        memset(log->memory_buckets, 0, (size_t)(log->nio_bounds + 1) * sizeof(int64_t));
    }
    log->released_count = 0;
    log->double_free = 0;
    log->why = 0;
}

/* A page gave up its reference to slot (read and not kept, or its kept
   copy dropped by a write), as SlotAllocator.free() would. */
static void umgr_fast_unref(struct umgr_fast_log *log, int32_t slot)
{
    if (slot <= 0 || (uint64_t)slot >= log->nrefs) {
        log->double_free = 1;
        return;
    }
    /* Atomic: the members of a joint round run at once, and after a fork
       a parent and its child hold references to the same slots. (Nothing
       else changes the counts while any call runs.) */
    uint16_t refs = __atomic_load_n(&log->refs[slot], __ATOMIC_RELAXED);
    do {
        if (refs == 0) {
            log->double_free = 1;
            return;
        }
    } while (!__atomic_compare_exchange_n(&log->refs[slot], &refs, (uint16_t)(refs - 1), 0, __ATOMIC_RELAXED,
                                          __ATOMIC_RELAXED));
    if (refs == 1)
        log->released[log->released_count++] = slot;
}

/* Bucket b of bounds[0..n) holds values v with bounds[b-1] < v <= bounds[b]
   (as Python's bisect_left); bucket n the rest. */
static int umgr_bucket(const int64_t *bounds, int n, int64_t v)
{
    int b = 0;
    while (b < n && bounds[b] < v)
        b++;
    return b;
}

/* A read from the store (`memory`: its memory tier), counted with its time. */
static void umgr_fast_count_read(struct umgr_fast_log *log, int memory, int64_t read_ns)
{
    if (memory) {
        log->memory_reads++;
        log->memory_read_ns += read_ns;
    } else {
        log->file_reads++;
        log->file_read_ns += read_ns;
        log->slow_file_reads += read_ns > log->slow_read_ns;
    }
    if (log->file_buckets != NULL)
        (memory ? log->memory_buckets : log->file_buckets)[umgr_bucket(log->io_bounds, log->nio_bounds, read_ns)]++;
}

/* The counters of a page that came in (from `slot`, 0: zeros; from the
   store's memory tier if `memory`). `sample`: a kept page counts as one
   of the clean copies whose writes CleanCopies measures (pages brought
   beside a lone fault do not: they are always kept, to see them used). */
static void umgr_fast_came_in(struct umgr_fast_log *log, int32_t slot, int kept, int sample, int memory,
                              int64_t read_ns)
{
    if (!slot)
        return;
    log->swapped++;
    log->read_ns_sum += read_ns;
    umgr_fast_count_read(log, memory, read_ns);
    if (!kept)
        umgr_fast_unref(log, slot);
    else if (sample)
        log->kept_count++;
}

/* A fault served: its service time, summed and in the histogram. */
static void umgr_fast_served(struct umgr_fast_log *log, int64_t serve_ns)
{
    log->serve_ns_sum += serve_ns;
    if (log->latency != NULL)
        log->latency[umgr_bucket(log->latency_bounds, log->nbounds, serve_ns)]++;
}

/* A write to a RESIDENT page: unprotect it (which wakes the writer), drop
   the clean copy it kept and its DISCARDABLE and PREFETCHED flags, as the
   full path's _on_wp_fault does, and log it; 1 when done. */
static int umgr_fast_unprotect(int uffd, const struct uffd_msg *m, const struct umgr_fast_region *r,
                               struct umgr_fast_log *log, int64_t started)
{
    uint64_t address = m->arg.pagefault.address & ~(uint64_t)4095;
    uint64_t vpn = address >> 12, i = vpn - r->vpn;
    struct uffdio_writeprotect w = { .range = { .start = address, .len = 4096 }, .mode = 0 };
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &w) < 0)
        return 0;   /* EAGAIN (an event is queued) and the rest: the full path's */
    uint8_t flags = r->flags[i];
    r->flags[i] = flags & (uint8_t)~(UMGR_FLAG_DISCARDABLE | UMGR_FLAG_PREFETCHED | UMGR_FLAG_CLUSTERED);
    log->cluster_hits += (flags & UMGR_FLAG_CLUSTERED) != 0;
    int32_t n = log->served++;
    log->vpn[n] = vpn;
    log->slot[n] = r->slot[i];
    r->slot[i] = 0;
    log->kept[n] = 0;
    log->kind[n] = UMGR_FAST_WP | (flags & UMGR_FLAG_PREFETCHED ? UMGR_FAST_WAS_PREFETCHED : 0);
    log->read_ns[n] = 0;
    log->serve_ns[n] = umgr_now_ns() - started;
    log->wp++;
    if (log->slot[n]) {
        log->wp_dropped += !(flags & UMGR_FLAG_CLUSTERED);   /* (not a sample: umgr_fast_came_in) */
        umgr_fast_unref(log, log->slot[n]);
    }
    umgr_fast_served(log, log->serve_ns[n]);
    return 1;
}

/* Whether the next swapped page read, not written, keeps its clean copy:
   keep_period 0 none, 1 every one, n every nth (log->keep_phase counts;
   umgr/paging/cleancopies.py). */
static int umgr_keeps(struct umgr_fast_log *log, int32_t keep_period)
{
    if (keep_period <= 1)
        return keep_period == 1;
    log->keep_phase = (log->keep_phase + 1) % keep_period;   /* (kept below the period: no overflow) */
    return log->keep_phase == 0;
}

/* Copy message i's page in, update the table and log it; 1 when done. */
static int umgr_fast_place(int uffd, const struct uffd_msg *m, int plan, const struct umgr_fast_region *r,
                           uint64_t page, uint64_t zeros, struct umgr_fast_log *log, int64_t read_ns,
                           int64_t started)
{
    uint64_t address = m->arg.pagefault.address & ~(uint64_t)4095;
    uint64_t vpn = address >> 12, i = vpn - r->vpn;
    int write = (m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
    int32_t slot = 0;
    int kept = 0, ret;
    if (plan == UMGR_PLAN_SWAPPED || plan == UMGR_PLAN_MEMORY) {
        slot = r->slot[i];
        kept = !write && umgr_keeps(log, log->keep_period);
        struct uffdio_copy c = { .dst = address, .src = page, .len = 4096,
                                 .mode = kept ? UFFDIO_COPY_MODE_WP : 0 };
        ret = ioctl(uffd, UFFDIO_COPY, &c);
    } else if (write) {   /* a page of its own at once, not the zero page a write would replace */
        struct uffdio_copy c = { .dst = address, .src = zeros, .len = 4096 };
        ret = ioctl(uffd, UFFDIO_COPY, &c);
    } else {
        struct uffdio_zeropage z = { .range = { .start = address, .len = 4096 } };
        ret = ioctl(uffd, UFFDIO_ZEROPAGE, &z);
    }
    /* EAGAIN (an event is queued), EEXIST, ENOENT: the full path knows
       what each means; the fault is handed to it. */
    if (ret < 0)
        return 0;
    uint8_t state = r->state[i];
    r->counts[state]--;
    r->counts[UMGR_STATE_RESIDENT]++;
    r->state[i] = UMGR_STATE_RESIDENT;
    r->slot[i] = kept ? slot : 0;
    int32_t n = log->served++;
    log->vpn[n] = vpn;
    log->slot[n] = slot;
    log->kept[n] = (uint8_t)kept;
    log->kind[n] = (plan == UMGR_PLAN_MEMORY ? UMGR_FAST_MEMORY : 0) | (write ? UMGR_FAST_WRITE : 0);
    log->read_ns[n] = plan == UMGR_PLAN_SWAPPED || plan == UMGR_PLAN_MEMORY ? read_ns : 0;
    log->serve_ns[n] = umgr_now_ns() - started;
    log->missing++;
    umgr_fast_came_in(log, slot, kept, 1, plan == UMGR_PLAN_MEMORY, log->read_ns[n]);
    umgr_fast_served(log, log->serve_ns[n]);
    return 1;
}

/* Whether `vpn` may start a stream: it lies within `near` pages of a page
   served lately, or it extends the last two served by their gap (of up to
   log->max_stride pages). It joins the pages served lately. */
static int umgr_fast_near(struct umgr_fast_log *log, uint64_t vpn, int64_t near)
{
    int found = umgr_fast_close_to(log->recent, vpn, near);
    uint64_t last = log->recent[(log->recent_at + 7) % 8], before = log->recent[(log->recent_at + 6) % 8];
    int64_t gap = (int64_t)(last - before);
    if (before && gap == (int64_t)(vpn - last) && gap <= log->max_stride && gap >= -log->max_stride)
        found = 1;
    log->recent[log->recent_at] = vpn;
    log->recent_at = (log->recent_at + 1) % 8;
    return found;
}

/* Whether log->watch_fd is readable, looked at no more often than
   log->watch_ns (a poll costs about a microsecond). */
static int umgr_fast_watched_ready(struct umgr_fast_log *log, int64_t now, int64_t *looked)
{
    if (log->watch_fd < 0 || now - *looked < log->watch_ns)
        return 0;
    *looked = now;
    struct pollfd watched = { .fd = log->watch_fd, .events = POLLIN };
    return poll(&watched, 1, 0) > 0;
}

/* Note the pages that the events of msgs[from..to) (messages that are not
   page faults) name. */
static void umgr_fast_note_events(const struct uffd_msg *msgs, int from, int to, struct umgr_fast_group_state *g)
{
    for (int i = from; i < to; i++) {
        const struct uffd_msg *m = &msgs[i];
        if (m->event == UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t lo, hi;
        if (m->event == UFFD_EVENT_REMOVE || m->event == UFFD_EVENT_UNMAP) {
            lo = m->arg.remove.start >> 12;
            hi = (m->arg.remove.end + 4095) >> 12;
        } else if (m->event == UFFD_EVENT_REMAP) {
            lo = m->arg.remap.from >> 12;
            hi = (m->arg.remap.from + m->arg.remap.len + 4095) >> 12;
        } else {
            g->all_blocked = 1;
            continue;
        }
        if (g->nblocked == 8) {
            g->all_blocked = 1;
            continue;
        }
        g->lo[g->nblocked] = lo;
        g->hi[g->nblocked++] = hi;
    }
}

/* Whether an event of the group names message i's page. */
static int umgr_fast_blocked(const struct uffd_msg *msgs, int i, const struct umgr_fast_group_state *g)
{
    uint64_t vpn = msgs[i].arg.pagefault.address >> 12;
    if (g->all_blocked)
        return 1;
    for (int k = 0; k < g->nblocked; k++)
        if (vpn >= g->lo[k] && vpn < g->hi[k])
            return 1;
    return 0;
}

/* Read the page at `offset` of the swap file into `page` for a fault whose
   thread waits for nothing else: sent through AIO and its completion
   polled for up to UMGR_READ_POLL_NS, then slept for. Measured here
   (O_DIRECT 4 KiB random reads on virtio-blk, 2 vCPUs, alternating runs):
   21-28 us a read polled against 26-33 us by pread, which sleeps until the
   completion's interrupt wakes a halted vCPU. A plain pread where it may
   not poll (a call in the background while the daemon's thread settles:
   that thread needs the CPU), without an AIO context, or where AIO refuses.
   It is called with nothing else in flight on the context (a lone fault,
   or a group whose first AIO submit was refused; every other read is
   waited for whole before its function returns), so the event it gets is
   its own: another's would be lost to its owner. The bytes read, or a
   negative number (-errno of the read, or -1 if the completion could not
   be waited for: cannot happen with a valid context). */
#define UMGR_READ_POLL_NS 200000   /* reads slower than this are the device's queue, not a wake-up */
static ssize_t umgr_fast_read_polled(const struct umgr_fast_store *store, uint64_t page, int64_t offset,
                                     const struct umgr_fast_log *log)
{
    int may_poll = log->wake_fd < 0 || __atomic_load_n(&log->waited, __ATOMIC_ACQUIRE);
    struct iocb cb, *list = &cb;
    memset(&cb, 0, sizeof cb);
    cb.aio_lio_opcode = IOCB_CMD_PREAD;
    cb.aio_fildes = (uint32_t)store->fd;
    cb.aio_buf = page;
    cb.aio_nbytes = 4096;
    cb.aio_offset = offset;
    aio_context_t aio = umgr_aio(log);
    if (!may_poll || !aio || syscall(SYS_io_submit, aio, 1L, &list) != 1)
        return pread(store->fd, (void *)(uintptr_t)page, 4096, offset);
    struct io_event event;
    struct timespec now_only = { 0, 0 };
    int64_t deadline = umgr_now_ns() + UMGR_READ_POLL_NS;
    for (;;) {
        int late = umgr_now_ns() >= deadline;
        long got = syscall(SYS_io_getevents, aio, 1L, 1L, &event, late ? NULL : &now_only);
        if (got == 1 && event.obj == (uint64_t)(uintptr_t)&cb)
            return (ssize_t)event.res;
        if (got < 0 && errno != EINTR) {
            umgr_aio_fail(aio);   /* (cannot happen with a valid context) */
            return -1;
        }
    }
}

/* Start serving message i of the group: plan it; serve it at once if it
   needs no device read (a write to unprotect, zeros, the memory tier's
   copy, the same page as another); else send its slot's read, through AIO
   so that faults read meanwhile are served beside it; where faults have
   lately come one at a time (log->concurrent), or AIO refuses, read
   alone by umgr_fast_read_polled (a pread without an AIO context, or in
   the background while the daemon's thread settles), and by a pread if
   other reads of the group are in flight. */
static void umgr_fast_start(int uffd, const struct uffd_msg *msgs, int i, struct umgr_fast_group_state *g,
                            const struct umgr_fast_region *regions, int nregions,
                            const struct umgr_fast_store *store, uint64_t pages, uint64_t zeros, int cap,
                            struct umgr_fast_log *log)
{
    int plan = g->plan[i] = umgr_fast_plan(msgs, i, g, regions, nregions, store, cap, log);
    const struct umgr_fast_region *r = g->in[i];
    if (plan != UMGR_PLAN_OTHER && plan != UMGR_PLAN_DUP && umgr_fast_blocked(msgs, i, g))
        plan = g->plan[i] = UMGR_PLAN_OTHER;   /* an event read with it names its page */
    uint64_t page = pages + (uint64_t)i * 4096;
    int reads = plan == UMGR_PLAN_MEMORY || plan == UMGR_PLAN_SWAPPED;   /* (its region found) */
    int32_t slot = reads ? r->slot[(msgs[i].arg.pagefault.address >> 12) - r->vpn] : 0;
    g->served[i] = plan == UMGR_PLAN_DUP;   /* the copy of the other wakes it too */
    if (plan == UMGR_PLAN_WP)
        g->served[i] = umgr_fast_unprotect(uffd, &msgs[i], r, log, g->read_at[i]);
    else if (plan == UMGR_PLAN_FRESH)
        g->served[i] = umgr_fast_place(uffd, &msgs[i], plan, r, page, zeros, log, 0, g->read_at[i]);
    if (plan == UMGR_PLAN_MEMORY) {
        int64_t sent = umgr_now_ns();
        if (umgr_fast_unpack(store, (uint32_t)slot, page))
            g->served[i] = umgr_fast_place(uffd, &msgs[i], plan, r, page, zeros, log, umgr_now_ns() - sent,
                                           g->read_at[i]);
    }
    if (plan != UMGR_PLAN_SWAPPED)
        return;
    struct iocb *cb = &g->cbs[i];
    memset(cb, 0, sizeof *cb);
    cb->aio_lio_opcode = IOCB_CMD_PREAD;
    cb->aio_fildes = (uint32_t)store->fd;
    cb->aio_buf = page;
    cb->aio_nbytes = 4096;
    cb->aio_offset = (int64_t)slot * 4096;
    if (log->efd >= 0) {
        cb->aio_flags = IOCB_FLAG_RESFD;
        cb->aio_resfd = (uint32_t)log->efd;
    }
    g->sent_at[i] = umgr_now_ns();
    if (umgr_aio(log) && log->concurrent > 0 && syscall(SYS_io_submit, umgr_aio(log), 1L, &cb) == 1) {
        g->inflight++;
        return;
    }
    ssize_t got = g->inflight ? pread(store->fd, (void *)(uintptr_t)page, 4096, cb->aio_offset)
                              : umgr_fast_read_polled(store, page, cb->aio_offset, log);
    if (got == 4096)
        g->served[i] = umgr_fast_place(uffd, &msgs[i], plan, r, page, zeros, log, umgr_now_ns() - g->sent_at[i],
                                       g->read_at[i]);
}

/* Sleep until a read of the group completes, or (`more`) a message comes
   on the uffd. Not a busy-poll: on 2 vCPUs a spinning daemon took the CPU
   of the program's threads and of its own eviction, and reads it timed
   looked slow. */
static void umgr_fast_wait(int uffd, int more, const struct umgr_fast_log *log)
{
    struct pollfd fds[2] = { { .fd = log->efd, .events = POLLIN }, { .fd = uffd, .events = POLLIN } };
    if (fds[0].fd >= 0)
        poll(fds, more ? 2 : 1, 100);
}

/* Take the group's completed reads and copy their pages in, each as soon
   as it is there. -1 if they could not be waited for (umgr_aio_fail: they
   are over, their pages not to be used): nothing more may be placed. */
static int umgr_fast_reap(int uffd, const struct uffd_msg *msgs, struct umgr_fast_group_state *g, uint64_t zeros,
                          struct umgr_fast_log *log)
{
    struct io_event events[UMGR_FAST_GROUP];
    struct timespec now_only = { 0, 0 };
    uint64_t signalled;
    if (log->efd >= 0 && read(log->efd, &signalled, sizeof signalled) < 0)
        signalled = 0;   /* EAGAIN: nothing completed since the last look */
    long got = syscall(SYS_io_getevents, (aio_context_t)log->aio, 0L, (long)g->inflight, events, &now_only);
    if (got < 0 && errno != EINTR)
        umgr_aio_fail((aio_context_t)log->aio);
    if (got < 0)
        return errno == EINTR ? 0 : -1;
    int64_t done = umgr_now_ns();
    for (long e = 0; e < got; e++) {
        int i = (int)((struct iocb *)(uintptr_t)events[e].obj - g->cbs);
        g->inflight--;
        /* Its own time: from when it was sent or the group's previous read
           came back, whichever is later. Reads in flight together come
           back one after another, and time spent behind another read is
           not this one's slowness (the store judges the device by it). */
        int64_t from = g->sent_at[i] > g->last_done ? g->sent_at[i] : g->last_done;
        g->last_done = done;
        if (events[e].res == 4096 && !umgr_fast_blocked(msgs, i, g))
            g->served[i] = umgr_fast_place(uffd, &msgs[i], UMGR_PLAN_SWAPPED, g->in[i], g->cbs[i].aio_buf, zeros, log,
                                           done - from, g->read_at[i]);
    }
    return 0;
}

/* Serve one group: msgs[0..n) read, and more read while its slots are
   being read, up to max_n (several threads faulting at once have their
   reads in flight together, each page copied in as soon as its read is
   done). Returns how many messages it left at the buffer's start for the
   full path (in the order read); the rest of those it read is zeroed
   (served: nothing for a restarted daemon to replay). A fault on a page an
   event of the group names, and not yet copied in, is left to the full
   path too. */
static int umgr_fast_group(int uffd, struct uffd_msg *msgs, int n, int max_n, const struct umgr_fast_region *regions,
                           int nregions, const struct umgr_fast_store *store, uint64_t pages, uint64_t zeros,
                           int cap, struct umgr_fast_log *log)
{
    struct umgr_fast_group_state g;
    if (n > 1)
        log->concurrent = UMGR_FAST_CONCURRENT_GROUPS;
    else if (log->concurrent > 0)
        log->concurrent--;
    g.inflight = g.planned = g.other = g.nblocked = g.all_blocked = 0;
    g.last_done = 0;
    umgr_fast_note_events(msgs, 0, n, &g);
    int64_t now = umgr_now_ns();
    for (int i = 0; i < n; i++)
        g.read_at[i] = now;
    int started = 0;
    for (;;) {
        for (; started < n; started++)
            umgr_fast_start(uffd, msgs, started, &g, regions, nregions, store, pages, zeros, cap, log);
        if (!g.inflight)
            break;
        if (umgr_fast_reap(uffd, msgs, &g, zeros, log) < 0)
            break;   /* cannot happen with a valid context: what is not copied in goes to the full path */
        int may_read = !g.other && n < max_n;   /* (an event read is planned OTHER) */
        ssize_t more = may_read ? read(uffd, &msgs[n], (size_t)(max_n - n) * sizeof(*msgs)) : 0;
        if (more <= 0) {
            if (g.inflight)
                umgr_fast_wait(uffd, may_read, log);
            continue;
        }
        int k = (int)(more / (ssize_t)sizeof(*msgs));
        log->concurrent = UMGR_FAST_CONCURRENT_GROUPS;
        now = umgr_now_ns();
        for (int i = n; i < n + k; i++)
            g.read_at[i] = now;
        umgr_fast_note_events(msgs, n, n + k, &g);
        n += k;
    }
    int left = 0;
    for (int i = 0; i < n; i++) {
        if (g.served[i])
            continue;
        if (left != i)
            msgs[left] = msgs[i];
        left++;
    }
    memset(&msgs[left], 0, (size_t)(n - left) * sizeof(*msgs));
    return left;
}

static int umgr_fast_bring(int uffd, const struct umgr_fast_region *regions, int nregions,
                           const struct umgr_fast_store *store, const int64_t *vpns, int n, uint64_t pages,
                           int keep_period, int fresh, int kind, int32_t also_slot, uint64_t also_page,
                           struct umgr_fast_log *log);

#define UMGR_CLUSTER_SAMPLE 32   /* pages brought (or noted) lately, at least, to judge by */
#define UMGR_CLUSTER_MARGIN 10   /* percentage points over a bar a share must be */
#define UMGR_CLUSTER_PROBE 16    /* off, one lone fault in this many brings a page of its block anyway */
#define UMGR_CLUSTER_CONTROL 16  /* on, one lone fault in this many leaves its block out, to measure */
#define UMGR_CLUSTER_MEMORY 1024 /* brought and hits are halved past this many brought */
#define UMGR_CLUSTER_NOTES 4096  /* entries of log->noted_vpn (a power of 2) */
#define UMGR_CLUSTER_NOTED 0     /* log->cluster_counts[...] */
#define UMGR_CLUSTER_WANTED 1
#define UMGR_CLUSTER_TICK 2

/* How many pages of its block a lone fault brings: all of them while its
   blocks prove wanted one of two ways. More of the pages so brought lately
   were written since (a write-protect fault: they come in write-protected)
   than log->cluster_bar + UMGR_CLUSTER_MARGIN percent; or more of the
   pages of blocks left out lately came back from swap by a fault soon
   after (umgr/paging/clusternotes.py) than log->cluster_fault_bar + the
   margin, which sees reads too (a page brought in shows only a write:
   reads of a mapped page are not seen, and a sort's comparisons only
   read). Each page brought pushes one out, and the bars come from how
   likely that one is to be wanted back soon (fastpath.py,
   CLUSTER_BAR_SHARE). While on by the second way only, one lone fault in
   UMGR_CLUSTER_CONTROL leaves its block out (0), to go on measuring it
   (the first measures the blocks brought). While off, the block is left
   out, and one lone fault in UMGR_CLUSTER_PROBE brings one page of it, to
   go on measuring the first (a whole block at each probe cost random
   reads after a scan 15% of their time: the scan's pages went out
   together). */
static int umgr_cluster_written(const struct umgr_fast_log *log)
{
    return log->cluster_brought >= UMGR_CLUSTER_SAMPLE
           && (int64_t)log->cluster_hits * 100
              > (int64_t)log->cluster_brought * (log->cluster_bar + UMGR_CLUSTER_MARGIN);
}

static int umgr_cluster_wanted(struct umgr_fast_log *log, int *by_writes)
{
    int written = *by_writes = umgr_cluster_written(log);
    int faulted = 0;
    if (log->cluster_counts != NULL) {
        int64_t noted = log->cluster_counts[UMGR_CLUSTER_NOTED], wanted = log->cluster_counts[UMGR_CLUSTER_WANTED];
        faulted = noted >= UMGR_CLUSTER_SAMPLE && wanted * 100 > noted * (log->cluster_fault_bar + UMGR_CLUSTER_MARGIN);
    }
    if (written)
        return UMGR_FAST_GROUP;
    if (faulted) {
        if (++log->cluster_skips < UMGR_CLUSTER_CONTROL)
            return UMGR_FAST_GROUP;
        log->cluster_skips = 0;
        return 0;
    }
    if (++log->cluster_probes < UMGR_CLUSTER_PROBE)
        return 0;
    log->cluster_probes = 0;
    return 1;
}

/* The pages a lone fault's block would have brought, left out: noted, so
   that one faulted back from swap soon after counts as wanted. A later
   note in the same entry takes its place. */
static void umgr_cluster_note(struct umgr_fast_log *log, const int64_t *vpns, int n)
{
    if (log->noted_vpn == NULL || log->cluster_counts == NULL)
        return;
    uint32_t tick = (uint32_t)log->cluster_counts[UMGR_CLUSTER_TICK];
    for (int i = 0; i < n; i++) {
        uint32_t at = (uint32_t)vpns[i] & (UMGR_CLUSTER_NOTES - 1);
        log->noted_vpn[at] = (uint64_t)vpns[i];
        log->noted_tick[at] = tick;
    }
    log->cluster_counts[UMGR_CLUSTER_NOTED] += n;
}

/* After a lone fault on a swapped page (log entry `at`, from its slot),
   bring in the swapped pages of its aligned block of log->cluster pages
   that went out with it: evicted within log->cluster_reach evictions of
   it (the evictor stamps a batch's pages alike). Pages that went out
   together came in together, and were in use together; a neighbour that
   went out at another time is no more likely to be wanted than any other
   page. Up to `room` entries in the log, into `pages` (free: the group's
   pages are in), while such pages prove wanted (umgr_cluster_wanted); the
   pages of a block left out are noted, to measure that. They come in
   write-protected, as clean copies, so that a write shows them wanted. */
static void umgr_fast_cluster(int uffd, const struct umgr_fast_region *regions, int nregions,
                              const struct umgr_fast_store *store, uint64_t pages, int32_t at, int32_t room,
                              struct umgr_fast_log *log)
{
    uint64_t vpn = log->vpn[at], block = (uint64_t)log->cluster;
    int32_t own = log->slot[at];
    const struct umgr_fast_region *r = umgr_fast_find(regions, nregions, vpn);
    if (block < 2 || block > UMGR_FAST_GROUP || own <= 0 || (uint64_t)own >= log->nrefs
        || log->evicted_at == NULL || r == NULL || room - log->served <= 0)
        return;
    int64_t near[UMGR_FAST_GROUP];
    int n = 0;
    uint64_t first = vpn & ~(block - 1), lo = first > r->vpn ? first : r->vpn;
    uint64_t hi = first + block < r->end ? first + block : r->end;
    uint32_t out = log->evicted_at[own];
    for (uint64_t v = lo; v < hi; v++) {
        int32_t slot = r->slot[v - r->vpn];
        if (v == vpn || r->state[v - r->vpn] != UMGR_STATE_SWAPPED || slot <= 0 || (uint64_t)slot >= log->nrefs)
            continue;
        int64_t apart = (int32_t)(out - log->evicted_at[slot]);   /* (the clock wraps) */
        if (apart <= log->cluster_reach && -apart <= log->cluster_reach)
            near[n++] = (int64_t)v;
    }
    if (n == 0)
        return;
    int by_writes;   /* (whether writes keep blocks coming, not only faults on blocks left out) */
    int wanted = umgr_cluster_wanted(log, &by_writes);
    if (wanted <= 1)   /* (a probe's page aside, the block is left out) */
        umgr_cluster_note(log, near + wanted, n - wanted);
    if (!wanted)
        return;
    if (n > wanted)
        n = wanted;
    if (n > room - log->served)
        n = room - log->served;
    int64_t started = umgr_now_ns();
    int got = n > 0 ? umgr_fast_bring(uffd, regions, nregions, store, near, n, pages, 1, 0, UMGR_FAST_CLUSTER, 0, 0, log) : 0;
    /* The group's serving time (their reads are in read_ns_sum), not a fault's latency. */
    int64_t spent = umgr_now_ns() - started;
    log->serve_ns_sum += spent;
    log->cluster_ns_sum += spent;
    log->clustered += got;
    log->cluster_brought += got;
    if (got > 0 && wanted > 1 && !by_writes) {   /* (a probe's page is no block) */
        log->block_ends[log->block_end_at] = hi;
        log->block_end_at = (log->block_end_at + 1) % 8;
    }
    if (log->cluster_brought > UMGR_CLUSTER_MEMORY) {
        log->cluster_brought /= 2;
        log->cluster_hits /= 2;
    }
}

/* A page that came in beside the faults (no fault's own): RESIDENT, its
   slot kept if `kept` (a clean copy), `flags` set, logged with `kind`
   and its share of the read's time. */
static void umgr_fast_brought(const struct umgr_fast_region *r, uint64_t vpn, int32_t slot, int kept,
                              uint8_t flags, uint8_t kind, int64_t read_ns, struct umgr_fast_log *log)
{
    uint64_t at = vpn - r->vpn;
    r->counts[r->state[at]]--;
    r->counts[UMGR_STATE_RESIDENT]++;
    r->state[at] = UMGR_STATE_RESIDENT;
    r->slot[at] = kept ? slot : 0;
    r->flags[at] |= flags;
    int32_t e = log->served++;
    log->vpn[e] = vpn;
    log->slot[e] = slot;
    log->kept[e] = (uint8_t)kept;
    log->kind[e] = kind;
    log->read_ns[e] = read_ns;
    log->serve_ns[e] = 0;
}

/* After a write fault on a fresh page (log entry `at`) that came right
   after a fault on the page before it (a first write going up: a buffer
   being filled, memory an allocator hands out again), or on the page
   after those this brought last (one of UMGR_FILL_CHAINS): bring the
   fresh pages after it, as zeros (copied from log->fill_zeros).
   UMGR_FILL_START pages the first time, twice as many each time the
   writes reach the page after them, up to log->fresh_window; it stops at
   a page that is not fresh (nor without a slot), the region's end, the
   call's room, or its high water mark (log->yield_after: the evictor is
   to start then). Either way the page before it must be resident still:
   after the program discarded or unmapped it, a write on the page after
   is no longer a write going up. These are the readahead policy's windows
   over fresh pages, done here: in the full path each window cost a Python
   round of 100-150 us, far more than zeroing 128 pages. They come in
   writable (they are to be written), RESIDENT with PREFETCHED, logged
   with kind UMGR_FAST_FILL; the fault gets UMGR_FAST_AHEAD. Returns how
   many came in. */
static int umgr_fast_fill(int uffd, const struct umgr_fast_region *regions, int nregions, int32_t at,
                          int32_t room, struct umgr_fast_log *log)
{
    uint64_t vpn = log->vpn[at];
    int32_t most = log->fresh_window < UMGR_FILL_MAX ? log->fresh_window : UMGR_FILL_MAX, size;
    if (most <= 0 || log->fill_zeros == 0)
        return 0;
    const struct umgr_fast_region *r = umgr_fast_find(regions, nregions, vpn);
    if (r == NULL || vpn == r->vpn || r->state[vpn - 1 - r->vpn] != UMGR_STATE_RESIDENT)
        return 0;
    int chain = -1;
    for (int k = 0; k < UMGR_FILL_CHAINS; k++)
        if (log->fill_next[k] && vpn == log->fill_next[k])
            chain = k;
    if (chain >= 0)
        size = 2 * log->fill_size[chain];
    else if (umgr_fast_close_to(log->recent, vpn - 1, 0)) {
        size = UMGR_FILL_START;
        chain = log->fill_at;
        log->fill_at = (log->fill_at + 1) % UMGR_FILL_CHAINS;
    } else
        return 0;
    log->fill_next[chain] = 0;
    int32_t limit = room < log->max ? room : log->max;
    limit = limit < log->yield_after ? limit : log->yield_after;
    size = size < most ? size : most;
    size = size < limit - log->served ? size : limit - log->served;
    if (size <= 0)
        return 0;
    int32_t n = 0;
    while (n < size && vpn + 1 + (uint64_t)n < r->end && r->state[vpn + 1 + (uint64_t)n - r->vpn] == UMGR_STATE_FRESH
           && r->slot[vpn + 1 + (uint64_t)n - r->vpn] == 0)
        n++;
    if (n == 0)
        return 0;
    int64_t started = umgr_now_ns();
    struct uffdio_copy c = { .dst = (vpn + 1) << 12, .src = log->fill_zeros, .len = (uint64_t)n * 4096, .mode = 0 };
    /* Refused part way (EAGAIN: an event is queued, the full path's to read first): the rest stays fresh. */
    int32_t got = ioctl(uffd, UFFDIO_COPY, &c) == 0 ? n : c.copy > 0 ? (int32_t)(c.copy / 4096) : 0;
    for (int32_t p = 0; p < got; p++)
        umgr_fast_brought(r, vpn + 1 + (uint64_t)p, 0, 0, UMGR_FLAG_PREFETCHED, UMGR_FAST_FILL, 0, log);
    /* Serving time, not a fault's latency (as umgr_fast_cluster's). */
    int64_t spent = umgr_now_ns() - started;
    log->serve_ns_sum += spent;
    log->cluster_ns_sum += spent;
    log->filled += got;
    if (got > 0)
        log->kind[at] |= UMGR_FAST_AHEAD;
    if (got == size) {
        log->fill_next[chain] = vpn + 1 + (uint64_t)got;
        log->fill_size[chain] = got;
    }
    return got;
}

/* Serve faults until a message is not a plain one (HANDOFF: log->handoff
   messages are left at the buffer's start; a fault that continues a stream
   of log->streams is not plain), none comes for spin_ns (IDLE), or a limit is
   reached (YIELD): the log is full, log->yield_after pages came in,
   slice_ns passed, log->watch_fd is readable, or a page may start a stream
   (umgr_fast_near: the prefetch policy is to see it; threads that each scan
   their own part interleave their faults). At most `room` pages come in
   (more faults read with the last group go to the full path). A swapped page the store cannot give
   (not in its memory tier, and no file) goes to the full path. Returns UMGR_FAST_* or -errno of a failed
   read of the uffd; log->served says how many pages were served. */
static int umgr_fast_serve(int uffd, struct uffd_msg *msgs, int max_msgs, const struct umgr_fast_region *regions,
                           int nregions, const struct umgr_fast_store *store, uint64_t pages, uint64_t zeros,
                           int64_t spin_ns, int64_t slice_ns, int32_t room, int64_t near,
                           struct umgr_fast_log *log)
{
    int64_t looked = umgr_now_ns(), until = looked + slice_ns;
    int group = max_msgs < UMGR_FAST_GROUP ? max_msgs : UMGR_FAST_GROUP;
    umgr_fast_reset(log);
    log->handoff = 0;
    for (;;) {
        int n = umgr_fast_next(uffd, msgs, group, spin_ns, log, until);
        if (n <= 0)
            return n < 0 ? n : UMGR_FAST_IDLE;
        int64_t started = umgr_now_ns();
        int32_t first = log->served;
        int cap = room - log->served;
        if (cap > log->max - log->served)
            cap = log->max - log->served;
        log->handoff = umgr_fast_group(uffd, msgs, n, group, regions, nregions, store, pages, zeros, cap, log);
        int32_t group_end = log->served;
        int lone = group_end == first + 1 && !(log->kind[first] & UMGR_FAST_WP);
        /* Each write fault on a fresh page (several threads' too) may bring pages ahead; one
           that did starts no stream (settle() does not tell the policy of it either: its
           window is in). A read of a fresh page maps the zero page, no memory: pages ahead
           of it would take some. */
        for (int32_t i = first; i < group_end && !log->handoff; i++)
            if ((log->kind[i] & UMGR_FAST_WRITE) && log->slot[i] == 0)
                umgr_fast_fill(uffd, regions, nregions, i, room, log);   /* (UMGR_FAST_AHEAD if it brought any) */
        int near_one = 0;
        for (int32_t i = first; i < log->served; i++)   /* (a write to a resident page starts none) */
            if (!(log->kind[i] & (UMGR_FAST_WP | UMGR_FAST_FILL | UMGR_FAST_AHEAD)))
                near_one |= umgr_fast_near(log, log->vpn[i], near);
        if (log->handoff)
            return UMGR_FAST_HANDOFF;
        if (lone && log->slot[first] != 0)
            umgr_fast_cluster(uffd, regions, nregions, store, pages, first, room, log);
        log->why = near_one ? UMGR_FAST_WHY_NEAR
                 : log->served >= log->max ? UMGR_FAST_WHY_FULL
                 : log->served >= room || log->served >= log->yield_after ? UMGR_FAST_WHY_ROOM
                 : started >= until ? UMGR_FAST_WHY_SLICE
                 : __atomic_load_n(&log->stop, __ATOMIC_ACQUIRE) ? UMGR_FAST_WHY_STOP
                 : umgr_fast_watched_ready(log, started, &looked) ? UMGR_FAST_WHY_WATCH : 0;
        if (log->why)
            return UMGR_FAST_YIELD;
    }
}

static void umgr_eventfd_add(int fd)
{
    uint64_t one = 1;
    while (write(fd, &one, sizeof one) < 0 && errno == EINTR)
        ;
}

static void umgr_eventfd_take(int fd)
{
    uint64_t count;
    while (read(fd, &count, sizeof count) < 0 && errno == EINTR)
        ;
}

static void *umgr_fast_bg_main(void *arg)
{
    struct umgr_fast_bg *bg = arg;
    bg->tid = (int)syscall(SYS_gettid);
    umgr_eventfd_add(bg->done_fd);   /* (started: umgr_fast_bg_start waits for it) */
    for (;;) {
        umgr_eventfd_take(bg->go_fd);
        if (__atomic_load_n(&bg->quit, __ATOMIC_ACQUIRE))
            return NULL;
        bg->result = umgr_fast_serve(bg->uffd, bg->msgs, bg->max_msgs, bg->regions, bg->nregions, bg->store,
                                     bg->pages, bg->zeros, bg->spin_ns, bg->slice_ns, bg->room, bg->near, bg->log);
        int notify_fd = bg->notify_fd;   /* (read first: once done_fd is added to, bg is the caller's again) */
        if (notify_fd >= 0)
            umgr_eventfd_add(notify_fd);
        umgr_eventfd_add(bg->done_fd);
    }
}

/* Start bg's thread, with every signal blocked (they are the daemon's
   thread's to handle). 0 or -errno. */
static int umgr_fast_bg_start(struct umgr_fast_bg *bg)
{
    bg->go_fd = eventfd(0, EFD_CLOEXEC);
    bg->done_fd = eventfd(0, EFD_CLOEXEC);
    bg->notify_fd = -1;
    bg->own_nice = getpriority(PRIO_PROCESS, 0);   /* (this thread's: the new one takes it) */
    if (bg->go_fd < 0 || bg->done_fd < 0) {
        int err = errno;
        if (bg->go_fd >= 0)
            close(bg->go_fd);
        if (bg->done_fd >= 0)
            close(bg->done_fd);
        return -err;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t thread;
    int err = pthread_create(&thread, NULL, umgr_fast_bg_main, bg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        close(bg->go_fd);
        close(bg->done_fd);
        return -err;
    }
    bg->thread = (uint64_t)thread;
    umgr_eventfd_take(bg->done_fd);   /* its tid is set */
    return 0;
}

/* Run umgr_fast_serve with bg's arguments in its thread. */
static void umgr_fast_bg_go(struct umgr_fast_bg *bg)
{
    __atomic_store_n(&bg->log->stop, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&bg->log->waited, 0, __ATOMIC_RELEASE);
    umgr_eventfd_add(bg->go_fd);
}

/* Ask the call to end after the group it is serving (umgr_fast_bg_finish
   waits for it): the members of a joint round end together. */
static void umgr_fast_bg_stop(struct umgr_fast_bg *bg)
{
    __atomic_store_n(&bg->log->stop, 1, __ATOMIC_RELEASE);
    umgr_eventfd_add(bg->log->wake_fd);
}

/* Wait for the call: with `stop`, it ends after the group it is serving;
   else it ends on its own (it spins from now on). Its result. */
static int umgr_fast_bg_finish(struct umgr_fast_bg *bg, int stop)
{
    __atomic_store_n(stop ? &bg->log->stop : &bg->log->waited, 1, __ATOMIC_RELEASE);
    umgr_eventfd_add(bg->log->wake_fd);
    umgr_eventfd_take(bg->done_fd);
    return bg->result;
}

static int umgr_fast_bg_pin(struct umgr_fast_bg *bg, int cpu, int nice);
static void umgr_fast_bg_stop(struct umgr_fast_bg *bg);

/* Wait for the call to end (with `stop`, after the group it is serving)
   as it goes: between faults it goes on sleeping (umgr_fast_bg_finish has
   it spin from then on). A call ends within its slice; one that has not
   after timeout_ns is starved on the CPU it is kept on (a real-time
   thread there, say): it is let run anywhere (bg->unpinned) and ended
   after its group, so that no target's CPU can hold up the daemon. Its
   result. */
static int umgr_fast_bg_wait(struct umgr_fast_bg *bg, int stop, int64_t timeout_ns)
{
    if (stop)
        umgr_fast_bg_stop(bg);
    int64_t deadline = umgr_now_ns() + timeout_ns;
    struct pollfd done = { .fd = bg->done_fd, .events = POLLIN };
    for (;;) {
        int64_t left = deadline - umgr_now_ns();
        if (left <= 0)
            break;
        struct timespec wait = { left / 1000000000, left % 1000000000 };
        if (ppoll(&done, 1, &wait, NULL) > 0) {
            umgr_eventfd_take(bg->done_fd);
            return bg->result;
        }
    }
    bg->unpinned = umgr_fast_bg_pin(bg, -1, 0) == 0;
    return umgr_fast_bg_finish(bg, 1);
}

/* Keep bg's thread on `cpu` at `nice`, or (-1) on any CPU the daemon may
   use at its own nice value. Kept on a program's CPU it serves that
   program's faults in its place, at its priority: one above it held the
   CPU past each fault it served (the compressed store's random faults took
   1.2-1.4x the time at nice -10). A nice value refused (below the thread's,
   without CAP_SYS_NICE or RLIMIT_NICE) leaves the one it has. 0 or an
   errno (of the CPU's setting). */
static int umgr_fast_bg_pin(struct umgr_fast_bg *bg, int cpu, int nice)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    if (cpu < 0) {
        if (sched_getaffinity(getpid(), sizeof set, &set) < 0)
            return errno;
    } else if (cpu < CPU_SETSIZE)
        CPU_SET(cpu, &set);
    else
        return EINVAL;
    int err = pthread_setaffinity_np((pthread_t)bg->thread, sizeof set, &set);
    if (!err)   /* (a thread's own nice value: Linux keeps one per thread) */
        setpriority(PRIO_PROCESS, (id_t)bg->tid, cpu < 0 ? bg->own_nice : nice);
    return err;
}

/* End bg's thread (no call running) and close its eventfds. */
static void umgr_fast_bg_end(struct umgr_fast_bg *bg)
{
    __atomic_store_n(&bg->quit, 1, __ATOMIC_RELEASE);
    umgr_eventfd_add(bg->go_fd);
    pthread_join((pthread_t)bg->thread, NULL);
    close(bg->go_fd);
    close(bg->done_fd);
}

#define UMGR_PREFETCH_RUN 64   /* pages one read takes at most */

/* Read the slots of the n planned pages into pages (page k for page k):
   zeros for a fresh page (slot 0), a memory tier's unpacked, runs of
   consecutive file slots with one read each, all of a window's reads in
   flight together through AIO (a window's slots are often scattered: one
   pread after another cost a device round trip each). ok[k]: page k
   arrived whole. -1 if reads could not be waited for: nothing may be used. */
static int umgr_prefetch_read(const struct umgr_fast_store *store, const int32_t *slots, int n, uint64_t pages,
                              aio_context_t aio, int *ok)
{
    struct iocb cbs[UMGR_AIO_DEPTH], *list[UMGR_AIO_DEPTH];
    int index[UMGR_AIO_DEPTH], nreads = 0;
    for (int k = 0; k < n;) {
        ok[k] = 0;
        if (slots[k] == 0) {
            memset((void *)(uintptr_t)(pages + (uint64_t)k * 4096), 0, 4096);
            ok[k++] = 1;
            continue;
        }
        if (umgr_fast_in_memory(store, slots[k])) {
            ok[k] = umgr_fast_unpack(store, (uint32_t)slots[k], pages + (uint64_t)k * 4096);
            k++;
            continue;
        }
        int j = k + 1;
        while (j < n && j - k < UMGR_PREFETCH_RUN && slots[j] == slots[j - 1] + 1
               && !umgr_fast_in_memory(store, slots[j]))
            ok[j++] = 0;
        if (nreads == UMGR_AIO_DEPTH) {   /* more runs than fit in flight: the rest one by one */
            ssize_t got = pread(store->fd, (void *)(uintptr_t)(pages + (uint64_t)k * 4096), (size_t)(j - k) * 4096,
                                (off_t)slots[k] * 4096);
            for (int p = k; p < j; p++)
                ok[p] = got > 0 && (int64_t)(p - k + 1) * 4096 <= (int64_t)got;
        } else {
            struct iocb *cb = &cbs[nreads];
            memset(cb, 0, sizeof *cb);
            cb->aio_lio_opcode = IOCB_CMD_PREAD;
            cb->aio_fildes = (uint32_t)store->fd;
            cb->aio_buf = pages + (uint64_t)k * 4096;
            cb->aio_nbytes = (uint64_t)(j - k) * 4096;
            cb->aio_offset = (int64_t)slots[k] * 4096;
            list[nreads] = cb;
            index[nreads++] = k;
        }
        k = j;
    }
    long submitted = nreads > 1 && aio ? syscall(SYS_io_submit, aio, (long)nreads, list) : 0;
    if (submitted < 0)
        submitted = 0;
    for (int r = (int)submitted; r < nreads; r++) {   /* alone, or what AIO did not take */
        ssize_t got = pread(store->fd, (void *)(uintptr_t)cbs[r].aio_buf, cbs[r].aio_nbytes, cbs[r].aio_offset);
        for (int p = 0; (uint64_t)p * 4096 < cbs[r].aio_nbytes; p++)
            ok[index[r] + p] = got > 0 && (int64_t)(p + 1) * 4096 <= (int64_t)got;
    }
    return umgr_aio_wait(aio, cbs, index, (int)submitted, ok);
}

/* Prefetch: bring in those of vpns[0..n) (sorted) that are SWAPPED with
   a slot the store can give, and with `fresh` the FRESH ones too (as
   zeroed pages of their own, as a write's fill makes them), as the full
   path's fill would: read, UFFDIO_COPY by runs of consecutive pages
   (swapped ones write-protected, slot kept, as keep_period says: 0 none,
   1 all, n every nth page, counted on across calls), RESIDENT with
   the PREFETCHED flag, logged (slot 0: a fresh page). No thread waits on
   them: the prefetch policy asked for them. Other pages, and the rest of
   a run whose copy fails (an event queued, a page already there), are
   left as they are: prefetch is optional. At most log->max pages.
   With also_slot (not 0), the slot of the fault the window is for is read
   in the same go into also_page (4096 bytes), its read in flight with the
   window's, where the store can give it here and a window page is to
   come (log->also_read: it was): the full path then copies it in. Read
   after the window's, it waited out a device round trip of its own, often
   behind eviction writes (node under --min-region 256K: 290 us a fault).
   Returns how many came in. */
static int umgr_fast_prefetch(int uffd, const struct umgr_fast_region *regions, int nregions,
                              const struct umgr_fast_store *store, const int64_t *vpns, int n, uint64_t pages,
                              int keep_period, int fresh, int32_t also_slot, uint64_t also_page,
                              struct umgr_fast_log *log)
{
    umgr_fast_reset(log);
    return umgr_fast_bring(uffd, regions, nregions, store, vpns, n, pages, keep_period, fresh, 0, also_slot,
                           also_page, log);
}

/* umgr_fast_prefetch's work, logged after the entries log holds, with
   `kind` in each entry's kind (UMGR_FAST_CLUSTER: flagged CLUSTERED too);
   how many pages came in. also_slot, also_page: as umgr_fast_prefetch's
   (0: none); its read takes the page after the last planned one in
   `pages`, so only while fewer than log->max are planned. */
static int umgr_fast_bring(int uffd, const struct umgr_fast_region *regions, int nregions,
                           const struct umgr_fast_store *store, const int64_t *vpns, int n, uint64_t pages,
                           int keep_period, int fresh, int kind, int32_t also_slot, uint64_t also_page,
                           struct umgr_fast_log *log)
{
    int64_t started = umgr_now_ns();
    int before = log->served, room = log->max - log->served;
    if (room <= 0)
        return 0;
    uint64_t vpn[room];
    int32_t slot[room];
    int ok[room], protect[room];
    const struct umgr_fast_region *in[room];
    int m = 0;
    uint8_t flags = UMGR_FLAG_PREFETCHED | (kind & UMGR_FAST_CLUSTER ? UMGR_FLAG_CLUSTERED : 0);
    for (int i = 0; i < n && m < room; i++) {
        const struct umgr_fast_region *r = umgr_fast_find(regions, nregions, (uint64_t)vpns[i]);
        if (r == NULL)
            continue;
        uint64_t at = (uint64_t)vpns[i] - r->vpn;
        int32_t s = r->slot[at];
        int swapped = r->state[at] == UMGR_STATE_SWAPPED && s != 0 && (store->fd >= 0 || umgr_fast_in_memory(store, s));
        if (!swapped && !(fresh && r->state[at] == UMGR_STATE_FRESH && s == 0))
            continue;
        protect[m] = s != 0 && umgr_keeps(log, keep_period);
        vpn[m] = (uint64_t)vpns[i], slot[m] = s, in[m++] = r;
    }
    /* (Its entry, past the planned ones, is read and never copied.) */
    int also = m > 0 && m < room && also_slot != 0 && (store->fd >= 0 || umgr_fast_in_memory(store, also_slot));
    if (also)
        slot[m] = also_slot;
    if (m == 0 || umgr_prefetch_read(store, slot, m + also, pages, umgr_aio(log), ok) < 0)
        return 0;   /* nothing to bring; or reads not waited for (cannot happen with a valid context) */
    int64_t read_ns = (umgr_now_ns() - started) / (m + also);   /* each page's share */
    if (also && ok[m]) {
        memcpy((void *)(uintptr_t)also_page, (void *)(uintptr_t)(pages + (uint64_t)m * 4096), 4096);
        /* (Counted as a read, not as a page come in: the full path brings it.) */
        umgr_fast_count_read(log, umgr_fast_in_memory(store, also_slot), read_ns);
        log->also_read = 1;
    }
    for (int k = 0; k < m;) {
        int j = k + 1;   /* pages k..j: a run copied with one call (protect[k]: as clean copies) */
        if (ok[k])
            while (j < m && ok[j] && vpn[j] == vpn[j - 1] + 1 && in[j] == in[k] && protect[j] == protect[k])
                j++;
        else {
            k++;
            continue;
        }
        struct uffdio_copy c = { .dst = vpn[k] << 12, .src = pages + (uint64_t)k * 4096,
                                 .len = (uint64_t)(j - k) * 4096, .mode = protect[k] ? UFFDIO_COPY_MODE_WP : 0 };
        int failed = ioctl(uffd, UFFDIO_COPY, &c) < 0;
        int64_t copied = failed ? (c.copy > 0 ? c.copy / 4096 : 0) : j - k;
        for (int p = k; p < k + copied; p++) {
            int memory = umgr_fast_in_memory(store, slot[p]);
            umgr_fast_brought(in[p], vpn[p], slot[p], protect[p], flags,
                              (uint8_t)(kind | (memory ? UMGR_FAST_MEMORY : 0)), read_ns, log);
            umgr_fast_came_in(log, slot[p], protect[p], !(kind & UMGR_FAST_CLUSTER), memory, read_ns);
        }
        if (failed)
            break;   /* EAGAIN: an event is queued, the full path's to read first */
        k = j;
    }
    return log->served - before;
}
"""
