"""userfaultfd: creation, the UFFDIO_* ioctls and struct uffd_msg.

The installed headers are Linux 6.1; the kernel is newer. What 6.1 lacks
(WP_UNPOPULATED, POISON, WP_ASYNC, MOVE) is defined below under #ifndef
with the upstream values of include/uapi/linux/userfaultfd.h.

Every helper returns 0 or -errno instead of setting errno, so the Python side
needs no ffi.errno round trip. Range ioctls that can make partial progress
(COPY, ZEROPAGE, CONTINUE, POISON, MOVE) return one packed int64: 0 when
the whole range was done, else ``(bytes_done << 16) | errno``. The kernel
stores either the bytes done or -errno in the struct's last field and
answers -EAGAIN when it stopped early; the helper folds both into that one
value so a fault-path call allocates nothing, and the Python side tests one
truth value. A read with nothing queued returns 0 (not -EAGAIN).
"""

INCLUDES = """
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>
"""

TYPES = """
struct uffd_msg { uint8_t event; ...; };

#define UFFD_API ...
#define UFFD_USER_MODE_ONLY ...
#define USERFAULTFD_IOC_NEW ...

#define UFFD_EVENT_PAGEFAULT ...
#define UFFD_EVENT_FORK ...
#define UFFD_EVENT_REMAP ...
#define UFFD_EVENT_REMOVE ...
#define UFFD_EVENT_UNMAP ...

#define UFFD_PAGEFAULT_FLAG_WRITE ...
#define UFFD_PAGEFAULT_FLAG_WP ...
#define UFFD_PAGEFAULT_FLAG_MINOR ...

#define UFFD_FEATURE_PAGEFAULT_FLAG_WP ...
#define UFFD_FEATURE_EVENT_FORK ...
#define UFFD_FEATURE_EVENT_REMAP ...
#define UFFD_FEATURE_EVENT_REMOVE ...
#define UFFD_FEATURE_MISSING_HUGETLBFS ...
#define UFFD_FEATURE_MISSING_SHMEM ...
#define UFFD_FEATURE_EVENT_UNMAP ...
#define UFFD_FEATURE_SIGBUS ...
#define UFFD_FEATURE_THREAD_ID ...
#define UFFD_FEATURE_MINOR_HUGETLBFS ...
#define UFFD_FEATURE_MINOR_SHMEM ...
#define UFFD_FEATURE_EXACT_ADDRESS ...
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM ...
#define UFFD_FEATURE_WP_UNPOPULATED ...
#define UFFD_FEATURE_POISON ...
#define UFFD_FEATURE_WP_ASYNC ...
#define UFFD_FEATURE_MOVE ...

#define _UFFDIO_REGISTER ...
#define _UFFDIO_UNREGISTER ...
#define _UFFDIO_WAKE ...
#define _UFFDIO_COPY ...
#define _UFFDIO_ZEROPAGE ...
#define _UFFDIO_MOVE ...
#define _UFFDIO_WRITEPROTECT ...
#define _UFFDIO_CONTINUE ...
#define _UFFDIO_POISON ...
#define _UFFDIO_API ...

#define UFFDIO_API ...
#define UFFDIO_REGISTER ...
#define UFFDIO_UNREGISTER ...
#define UFFDIO_WAKE ...
#define UFFDIO_COPY ...
#define UFFDIO_ZEROPAGE ...
#define UFFDIO_MOVE ...
#define UFFDIO_WRITEPROTECT ...
#define UFFDIO_CONTINUE ...
#define UFFDIO_POISON ...

#define UFFDIO_REGISTER_MODE_MISSING ...
#define UFFDIO_REGISTER_MODE_WP ...
#define UFFDIO_REGISTER_MODE_MINOR ...
#define UFFDIO_COPY_MODE_DONTWAKE ...
#define UFFDIO_COPY_MODE_WP ...
#define UFFDIO_ZEROPAGE_MODE_DONTWAKE ...
#define UFFDIO_WRITEPROTECT_MODE_WP ...
#define UFFDIO_WRITEPROTECT_MODE_DONTWAKE ...
#define UFFDIO_CONTINUE_MODE_DONTWAKE ...
#define UFFDIO_CONTINUE_MODE_WP ...
#define UFFDIO_POISON_MODE_DONTWAKE ...
#define UFFDIO_MOVE_MODE_DONTWAKE ...
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ...

/* Byte offsets inside struct uffd_msg, checked by umgr.kernel.uffd at import. */
#define UMGR_MSG_SIZE ...
#define UMGR_MSG_OFF_PF_FLAGS ...
#define UMGR_MSG_OFF_PF_ADDRESS ...
#define UMGR_MSG_OFF_PF_PTID ...
#define UMGR_MSG_OFF_FORK_UFD ...
#define UMGR_MSG_OFF_REMAP_FROM ...
#define UMGR_MSG_OFF_REMAP_TO ...
#define UMGR_MSG_OFF_REMAP_LEN ...
#define UMGR_MSG_OFF_REMOVE_START ...
#define UMGR_MSG_OFF_REMOVE_END ...
"""

FUNCTIONS = """
int umgr_userfaultfd(int flags);
int umgr_userfaultfd_dev(int flags);
int umgr_uffd_read_batch(int fd, struct uffd_msg *buf, int max, int64_t linger_ns);

int umgr_uffd_api(int fd, uint64_t features, uint64_t *out_features,
                  uint64_t *out_ioctls);
int umgr_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode,
                       uint64_t *out_ioctls);
int umgr_uffd_unregister(int fd, uint64_t start, uint64_t len);
int umgr_uffd_wake(int fd, uint64_t start, uint64_t len);
int umgr_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int umgr_uffd_runs(int fd, const int64_t *vpns, const int64_t *npages, int n, int64_t wp_mode, int *err);

int64_t umgr_uffd_continue(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t umgr_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t umgr_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len,
                       uint64_t mode);
int64_t umgr_uffd_copy_fast(int fd, uint64_t dst, uint64_t src, uint64_t len,
                            uint64_t mode);
int64_t umgr_uffd_zeropage_fast(int fd, uint64_t dst, uint64_t len,
                                uint64_t mode);
int64_t umgr_uffd_copy_read(int fd, uint64_t dst, uint64_t src, uint64_t len,
                            uint64_t mode, struct uffd_msg *buf, int max);
#define UMGR_READ_FAILED ...
"""

CUSTOMIZATIONS = """
/* Upstream additions after Linux 6.1 (include/uapi/linux/userfaultfd.h). */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1<<13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1<<14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1<<15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1<<16)
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1<<1)
#endif

#ifndef UFFDIO_POISON
#define _UFFDIO_POISON (0x08)
struct uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;          /* written by the kernel */
};
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1<<0)
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

#ifndef UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)
struct uffdio_move {
    __u64 dst;
    __u64 src;
    __u64 len;
    __u64 mode;
    __s64 move;             /* written by the kernel */
};
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1<<0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1<<1)
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

#define UMGR_MSG_SIZE sizeof(struct uffd_msg)
#define UMGR_MSG_OFF_PF_FLAGS offsetof(struct uffd_msg, arg.pagefault.flags)
#define UMGR_MSG_OFF_PF_ADDRESS offsetof(struct uffd_msg, arg.pagefault.address)
#define UMGR_MSG_OFF_PF_PTID offsetof(struct uffd_msg, arg.pagefault.feat.ptid)
#define UMGR_MSG_OFF_FORK_UFD offsetof(struct uffd_msg, arg.fork.ufd)
#define UMGR_MSG_OFF_REMAP_FROM offsetof(struct uffd_msg, arg.remap.from)
#define UMGR_MSG_OFF_REMAP_TO offsetof(struct uffd_msg, arg.remap.to)
#define UMGR_MSG_OFF_REMAP_LEN offsetof(struct uffd_msg, arg.remap.len)
#define UMGR_MSG_OFF_REMOVE_START offsetof(struct uffd_msg, arg.remove.start)
#define UMGR_MSG_OFF_REMOVE_END offsetof(struct uffd_msg, arg.remove.end)

static int umgr_userfaultfd(int flags)
{
    long fd = syscall(SYS_userfaultfd, flags);
    return fd < 0 ? -errno : (int)fd;
}

/* /dev/userfaultfd hands out uffds to whoever may open it, without the
   vm.unprivileged_userfaultfd sysctl check of the syscall. */
static int umgr_userfaultfd_dev(int flags)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    return fd < 0 ? -err : fd;
}

static int64_t umgr_uffd_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* One read() returns as many whole messages as fit; the kernel only blocks
   for the first, and never on an O_NONBLOCK uffd. Nothing queued (EAGAIN)
   is 0 messages.
   A batch that ends in a REMOVE waits up to linger_ns (nonblocking uffd:
   polling) for the next message, and so on while the buffer has room: a
   zap (or an app's madvise) of many ranges raises one REMOVE per range,
   each only after the one before was read, a few microseconds apart, and
   a batch of them costs the reader far less than a batch each. Only for
   an O_NONBLOCK uffd: a blocking one would wait in read() instead. */
static int umgr_uffd_read_batch(int fd, struct uffd_msg *buf, int max, int64_t linger_ns)
{
    ssize_t got;
    do   /* EINTR: a signal came (the kernel checks for one before EAGAIN); its handler has run */
        got = read(fd, buf, (size_t)max * sizeof(*buf));
    while (got < 0 && errno == EINTR);
    if (got < 0)
        return errno == EAGAIN ? 0 : -errno;
    int n = (int)(got / (ssize_t)sizeof(*buf));
    int64_t deadline = 0;
    while (n > 0 && n < max && linger_ns > 0 && buf[n - 1].event == UFFD_EVENT_REMOVE) {
        got = read(fd, &buf[n], (size_t)(max - n) * sizeof(*buf));
        if (got > 0) {
            n += (int)(got / (ssize_t)sizeof(*buf));
            deadline = 0;
            continue;
        }
        if (got < 0 && errno != EAGAIN && errno != EINTR)
            break;   /* the next read reports it */
        int64_t now = umgr_uffd_now_ns();
        if (!deadline)
            deadline = now + linger_ns;
        else if (now >= deadline)
            break;
    }
    return n;
}

static int umgr_uffd_api(int fd, uint64_t features, uint64_t *out_features,
                         uint64_t *out_ioctls)
{
    struct uffdio_api api = { .api = UFFD_API, .features = features };
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *out_features = api.features;
    *out_ioctls = api.ioctls;
    return 0;
}

static int umgr_uffd_register(int fd, uint64_t start, uint64_t len,
                              uint64_t mode, uint64_t *out_ioctls)
{
    struct uffdio_register reg = {
        .range = { .start = start, .len = len }, .mode = mode };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    *out_ioctls = reg.ioctls;
    return 0;
}

static int umgr_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { .start = start, .len = len };
    return ioctl(fd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

static int umgr_uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = { .start = start, .len = len };
    return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

static int umgr_uffd_writeprotect(int fd, uint64_t start, uint64_t len,
                                  uint64_t mode)
{
    struct uffdio_writeprotect wp = {
        .range = { .start = start, .len = len }, .mode = mode };
    return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

/* UFFDIO_WRITEPROTECT with wp_mode, or with wp_mode < 0 UFFDIO_WAKE, of
   each run of pages [vpns[i], vpns[i] + npages[i]) in order, until one
   fails: returns how many were done (n: all), the failing one's errno in
   *err. An eviction batch of scattered pages is hundreds of runs. */
static int umgr_uffd_runs(int fd, const int64_t *vpns, const int64_t *npages, int n, int64_t wp_mode, int *err)
{
    *err = 0;
    for (int i = 0; i < n; i++) {
        uint64_t start = (uint64_t)vpns[i] << 12, len = (uint64_t)npages[i] << 12;
        int r = wp_mode < 0 ? umgr_uffd_wake(fd, start, len) : umgr_uffd_writeprotect(fd, start, len, (uint64_t)wp_mode);
        if (r < 0) {
            *err = -r;
            return i;
        }
    }
    return n;
}

/* 0 when the whole range was done, else (bytes_done << 16) | errno.
   ret: the ioctl's result; done: the kernel's progress field, which it may
   leave untouched when it fails before starting (ESRCH, EFAULT, ...). */
static int64_t umgr_pack(int ret, int64_t done)
{
    if (ret == 0)
        return 0;
    int err = errno;
    if (done < 0)
        done = 0;
    return (done << 16) | (err & 0xffff);
}

static int64_t umgr_uffd_continue(int fd, uint64_t start, uint64_t len,
                                  uint64_t mode)
{
    struct uffdio_continue c = {
        .range = { .start = start, .len = len }, .mode = mode, .mapped = 0 };
    int ret = ioctl(fd, UFFDIO_CONTINUE, &c);
    return umgr_pack(ret, c.mapped);
}

static int64_t umgr_uffd_poison(int fd, uint64_t start, uint64_t len,
                                uint64_t mode)
{
    struct uffdio_poison p = {
        .range = { .start = start, .len = len }, .mode = mode, .updated = 0 };
    int ret = ioctl(fd, UFFDIO_POISON, &p);
    return umgr_pack(ret, p.updated);
}

static int64_t umgr_uffd_move(int fd, uint64_t dst, uint64_t src,
                              uint64_t len, uint64_t mode)
{
    struct uffdio_move m = {
        .dst = dst, .src = src, .len = len, .mode = mode, .move = 0 };
    int ret = ioctl(fd, UFFDIO_MOVE, &m);
    return umgr_pack(ret, m.move);
}

static int64_t umgr_uffd_copy_fast(int fd, uint64_t dst, uint64_t src,
                                   uint64_t len, uint64_t mode)
{
    struct uffdio_copy c = {
        .dst = dst, .src = src, .len = len, .mode = mode, .copy = 0 };
    int ret = ioctl(fd, UFFDIO_COPY, &c);
    return umgr_pack(ret, c.copy);
}

static int64_t umgr_uffd_zeropage_fast(int fd, uint64_t dst, uint64_t len,
                                       uint64_t mode)
{
    struct uffdio_zeropage z = {
        .range = { .start = dst, .len = len }, .mode = mode, .zeropage = 0 };
    int ret = ioctl(fd, UFFDIO_ZEROPAGE, &z);
    return umgr_pack(ret, z.zeropage);
}

/* UFFDIO_COPY, then, only if it did the whole range, read the next batch:
   one call per fault on the fault path. Returns the messages read (>= 0,
   0 when none is queued); -(bytes_done << 16 | errno) when the copy
   stopped short (nothing read); UMGR_READ_FAILED - errno when the copy was
   done but the read failed. */
#define UMGR_READ_FAILED (-((int64_t)1 << 62))
static int64_t umgr_uffd_copy_read(int fd, uint64_t dst, uint64_t src,
                                   uint64_t len, uint64_t mode,
                                   struct uffd_msg *buf, int max)
{
    struct uffdio_copy c = {
        .dst = dst, .src = src, .len = len, .mode = mode, .copy = 0 };
    int ret = ioctl(fd, UFFDIO_COPY, &c);
    if (ret)
        return -umgr_pack(ret, c.copy);
    int n = umgr_uffd_read_batch(fd, buf, max, 0);
    return n >= 0 ? n : UMGR_READ_FAILED + n;
}
"""
