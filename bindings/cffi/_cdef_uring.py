"""cdef for liburing (>= 2.3): ring set-up, buffer and eventfd registration,
and batch helpers so that preparing, submitting or reaping a whole batch of
SQEs/CQEs is one call from Python (one cffi transition, GIL released once).

Every function returns a count or -errno, like liburing itself.
"""

INCLUDES = """
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <liburing.h>
"""

TYPES = """
struct iovec {
    void *iov_base;
    size_t iov_len;
};

/* Layout is liburing's; Python only allocates it and passes pointers. */
struct io_uring { ...; };

static const int UMGR_OP_READ;
static const int UMGR_OP_WRITE;
static const int UMGR_OP_READV;
static const int UMGR_OP_WRITEV;
static const int UMGR_OP_READ_FIXED;
static const int UMGR_OP_WRITE_FIXED;
static const int UMGR_OP_COUNT;
"""

FUNCTIONS = """
int io_uring_queue_init(unsigned entries, struct io_uring *ring, unsigned flags);
void io_uring_queue_exit(struct io_uring *ring);

int io_uring_register_buffers(struct io_uring *ring, const struct iovec *iovecs,
                              unsigned nr_iovecs);
int io_uring_unregister_buffers(struct io_uring *ring);
int io_uring_register_eventfd(struct io_uring *ring, int fd);
int io_uring_unregister_eventfd(struct io_uring *ring);

unsigned io_uring_sq_ready(const struct io_uring *ring);
unsigned io_uring_sq_space_left(const struct io_uring *ring);
unsigned io_uring_cq_ready(const struct io_uring *ring);

unsigned umgr_uring_sq_entries(const struct io_uring *ring);
unsigned umgr_uring_cq_entries(const struct io_uring *ring);

int umgr_uring_prep_batch(struct io_uring *ring, int n, const uint8_t *ops,
                          const int32_t *fds, const uint64_t *addrs,
                          const uint32_t *lens, const uint64_t *offsets,
                          const uint16_t *buf_index, uint64_t user_data_base);
int umgr_uring_submit(struct io_uring *ring);
int umgr_uring_reap(struct io_uring *ring, uint64_t *user_data_out,
                    int32_t *res_out, int max);
"""

CUSTOMIZATIONS = """
/* Op codes of the batch helper: umgr's own numbering (umgr.kernel.ring.Op), not the
   kernel's IORING_OP_*, so the Python side does not depend on header values. */
#define UMGR_OP_READ 0
#define UMGR_OP_WRITE 1
#define UMGR_OP_READV 2
#define UMGR_OP_WRITEV 3
#define UMGR_OP_READ_FIXED 4
#define UMGR_OP_WRITE_FIXED 5
#define UMGR_OP_COUNT 6

static unsigned umgr_uring_sq_entries(const struct io_uring *ring)
{
    return ring->sq.ring_entries;
}

static unsigned umgr_uring_cq_entries(const struct io_uring *ring)
{
    return ring->cq.ring_entries;
}

/* Prepare up to n SQEs, row i from ops[i], fds[i], ... with user_data
   user_data_base + i.  Stops early when the SQ is full and returns the number
   prepared; nothing is submitted.  All ops are checked before any SQE is
   taken, so an invalid op leaves the SQ untouched (-EINVAL).
   For READV/WRITEV addrs[i] points to an iovec array and lens[i] is its
   length; buf_index is used only by the *_FIXED ops. */
static int umgr_uring_prep_batch(struct io_uring *ring, int n, const uint8_t *ops,
                                 const int32_t *fds, const uint64_t *addrs,
                                 const uint32_t *lens, const uint64_t *offsets,
                                 const uint16_t *buf_index, uint64_t user_data_base)
{
    int i;

    if (n < 0)
        return -EINVAL;
    for (i = 0; i < n; i++)
        if (ops[i] >= UMGR_OP_COUNT)
            return -EINVAL;
    for (i = 0; i < n; i++) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
        void *addr = (void *)(uintptr_t)addrs[i];

        if (sqe == NULL)
            break;
        switch (ops[i]) {
        case UMGR_OP_READ:
            io_uring_prep_read(sqe, fds[i], addr, lens[i], offsets[i]);
            break;
        case UMGR_OP_WRITE:
            io_uring_prep_write(sqe, fds[i], addr, lens[i], offsets[i]);
            break;
        case UMGR_OP_READV:
            io_uring_prep_readv(sqe, fds[i], (const struct iovec *)addr,
                                lens[i], offsets[i]);
            break;
        case UMGR_OP_WRITEV:
            io_uring_prep_writev(sqe, fds[i], (const struct iovec *)addr,
                                 lens[i], offsets[i]);
            break;
        case UMGR_OP_READ_FIXED:
            io_uring_prep_read_fixed(sqe, fds[i], addr, lens[i], offsets[i],
                                     buf_index[i]);
            break;
        case UMGR_OP_WRITE_FIXED:
            io_uring_prep_write_fixed(sqe, fds[i], addr, lens[i], offsets[i],
                                      buf_index[i]);
            break;
        }
        io_uring_sqe_set_data64(sqe, user_data_base + (uint64_t)i);
    }
    return i;
}

/* Submit what is prepared.  EINTR is retried here; other errors (EAGAIN,
   EBUSY: the kernel is short of memory or the CQ is overflowing) leave the
   SQEs in the SQ for the next call and are returned to the caller. */
static int umgr_uring_submit(struct io_uring *ring)
{
    int ret;

    do {
        ret = io_uring_submit(ring);
    } while (ret == -EINTR);
    return ret;
}

/* Copy out and consume every available CQE, up to max. */
static int umgr_uring_reap(struct io_uring *ring, uint64_t *user_data_out,
                           int32_t *res_out, int max)
{
    struct io_uring_cqe *cqes[64];
    int got = 0;

    while (got < max) {
        unsigned want = (unsigned)(max - got) < 64 ? (unsigned)(max - got) : 64;
        unsigned k = io_uring_peek_batch_cqe(ring, cqes, want);
        unsigned j;

        if (k == 0)
            break;
        for (j = 0; j < k; j++) {
            user_data_out[got + j] = cqes[j]->user_data;
            res_out[got + j] = cqes[j]->res;
        }
        io_uring_cq_advance(ring, k);
        got += k;
    }
    return got;
}
"""
