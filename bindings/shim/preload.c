/* libumgr-preload: the part of umgr that lives inside the target process.
 *
 * Loaded with LD_PRELOAD. On load it hands the daemon a userfaultfd for this
 * process's mm and a socket for the zap agent, then reports large anonymous
 * private mappings as they are made. Everything else (registration, faults,
 * eviction) is done by the daemon through the userfaultfd: uffd ioctls act on
 * the mm that created the uffd, whoever calls them.
 *
 * Rule: the shim never breaks or hangs the app. Any failure leaves the app
 * running unmanaged, with one line on stderr.
 *
 * The shim keeps its own reference to the uffd. If the daemon dies, the
 * uffd context lives on: faults on paged-out memory wait (the kernel would
 * otherwise release the context and serve them as zeros). A watchdog thread
 * sees the daemon's end of the agent socket close and asks a daemon at the
 * same socket, with backoff, to take the process back (HELLO with
 * UMGR_HELLO_RESUME, the same uffd, new sockets); if none does within the
 * grace period, it kills the process with one line on stderr. A program never runs on wrong memory. A daemon that stops
 * cleanly brings every page back first and sends DETACH: the shim drops its
 * reference and the program runs on unmanaged.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <limits.h>
#include <sys/resource.h>
#include <sys/un.h>
#include <unistd.h>

#include "pagehash.h"
#include "protocol.h"
#include "size.h"

#define EXPORT __attribute__((visibility("default")))

#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#define PIDFD_SELF_PROCESS (-10001) /* 6.15+; older kernels answer EBADF */

/* Descriptors are moved up here so apps that expect low numbers
 * (shells, daemons closing 0..2) are not surprised. */
#define HIGH_FD_BASE 700
#define SHIM_PAGE_SIZE 4096 /* umgr.kernel.PAGE_SIZE: the least budget or region */
#define ACK_TIMEOUT_SECONDS 30
#define DEFAULT_GRACE_SECONDS 60 /* a daemon too old to send one in HELLO_ACK */

/* What attach() came to. */
enum attach_result {
    ATTACHED = 0,
    ATTACH_FAILED = -1,
    ATTACH_DAEMON_STOPPING = 1, /* ESHUTDOWN: run unmanaged, nothing of ours is at the daemon */
    ATTACH_NO_FORK_EVENT = 2,   /* a forked child: attach with a uffd of our own */
};

struct shim_state {
    int active;           /* managed: control connection is up */
    int ctl_fd;           /* control connection, guarded by ctl_lock */
    unsigned acks_owed;   /* ACKs of requests that timed out, still to come on ctl_fd (ctl_lock) */
    unsigned ack_timeout; /* seconds a request waits for its ACK (UMGR_ACK_TIMEOUT_SECONDS) */
    int taking_back;      /* the watchdog is handing the uffd to a restarted daemon (atomic) */
    unsigned ctl_generation; /* connections swapped in so far (atomic) */
    int agent_fd;         /* agent end of the socketpair (replaced when a restarted daemon takes us back) */
    int agent_idle;       /* the agent found its daemon gone and waits for a new agent_fd */
    int self_pidfd;       /* for process_madvise on ourselves */
    int uffd_ref;         /* our own reference to the uffd: a dead daemon leaves faults waiting */
    int exec_pidfd;       /* the umgr exec that runs us (UMGR_EXEC_PID), or -1: if it is gone, no
                             daemon will come back for us */
    int exec_pid;
    unsigned grace_seconds; /* how long to wait for a lost daemon (UMGR_GRACE_SECONDS, else HELLO_ACK) */
    int detached;         /* the daemon let us go cleanly (DETACH): every page is back */
    void *canary;         /* the HELLO's probe page, kept and never touched: the daemon writes a
                             token there before each eviction read (umgr_checked_readv) */
    uint64_t min_region;  /* mappings smaller than this are not reported */
    uint64_t max_resident; /* UMGR_MAX_RESIDENT; 0: the daemon's default */
    char socket_path[108]; /* UMGR_SOCKET, for taking us back after a crash */
    char policy[32];      /* UMGR_POLICY and UMGR_NAME as sent in HELLO: the watchdog */
    char name[64];        /* sends them again and must not read the environment */
    pthread_mutex_t ctl_lock;
    pthread_mutex_t fork_lock; /* serialises fork() so the daemon pairs child and uffd */
    pthread_t agent;
};

static struct shim_state shim = {
    .ctl_fd = -1,
    .agent_fd = -1,
    .self_pidfd = -1,
    .uffd_ref = -1,
    .exec_pidfd = -1,
    .min_region = 1 << 20,
    .ack_timeout = ACK_TIMEOUT_SECONDS,
    .ctl_lock = PTHREAD_MUTEX_INITIALIZER,
    .fork_lock = PTHREAD_MUTEX_INITIALIZER,
};

static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof line)
        n = sizeof line - 1;
    ssize_t ignored = write(2, line, n);
    (void)ignored;
}

/* The shim closes its own descriptors with this: close() is wrapped below
 * to keep them open against the program. */
static int raw_close(int fd)
{
    return (int)syscall(SYS_close, fd);
}

static int move_high(int fd)
{
    if (fd < 0)
        return fd;
    int high = fcntl(fd, F_DUPFD_CLOEXEC, HIGH_FD_BASE);
    if (high < 0)
        return fd;
    raw_close(fd);
    return high;
}

/* A size from the environment (size.h's grammar, the CLI's): 0 and *bytes
 * set (left alone when the variable is unset or empty), or -1 after one
 * line on stderr. */
static int env_size(const char *name, uint64_t minimum, uint64_t *bytes)
{
    const char *text = getenv(name);
    if (!text || !*text)
        return 0;
    if (umgr_parse_size(text, minimum, bytes) == 0)
        return 0;
    say("umgr: %s=%s is not a size of at least %llu bytes (e.g. 512M, 1.5G); running unmanaged\n",
        name, text, (unsigned long long)minimum);
    return -1;
}

static int open_uffd(void)
{
    /* No UFFD_USER_MODE_ONLY: the kernel's own accesses (read(2) into a
     * swapped-out buffer) must fault to the daemon too. */
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0)
        return fd;
    int refused = errno;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) {
        if (errno == ENOENT)   /* (no device: the syscall's reason is the one to give) */
            errno = refused;
        return -1;
    }
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    raw_close(dev);
    return fd;
}

static int send_with_fds(int sock, const void *msg, size_t len, const int *fds, int nfds)
{
    struct iovec iov = {.iov_base = (void *)msg, .iov_len = len};
    union {
        char buf[CMSG_SPACE(sizeof(int) * 2)];
        struct cmsghdr align;
    } control;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > 0) {
        memset(&control, 0, sizeof control);
        mh.msg_control = control.buf;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
    }
    ssize_t n;
    do {
        n = sendmsg(sock, &mh, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n == (ssize_t)len ? 0 : -1;
}

static ssize_t recv_exact_type(int sock, void *buf, size_t len, uint16_t type)
{
    ssize_t n;
    do {
        n = recv(sock, buf, len, 0);
    } while (n < 0 && errno == EINTR);
    if (n < (ssize_t)sizeof(struct umgr_hdr))
        return -1;
    struct umgr_hdr *hdr = buf;
    if (hdr->magic != UMGR_MAGIC || hdr->type != type)
        return -1;
    return n;
}

/* HELLO_ACK, with the uffd a forked child gets back (SCM_RIGHTS), if any. */
static int recv_hello_ack(int sock, struct umgr_hello_ack *ack, int *fd)
{
    struct iovec iov = {.iov_base = ack, .iov_len = sizeof *ack};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                        .msg_controllen = sizeof control.buf};
    ssize_t n;
    do {
        n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    *fd = -1;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); n >= 0 && cm; cm = CMSG_NXTHDR(&mh, cm))
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS && cm->cmsg_len == CMSG_LEN(sizeof(int)))
            memcpy(fd, CMSG_DATA(cm), sizeof(int));
    if (n != sizeof *ack || ack->hdr.magic != UMGR_MAGIC || ack->hdr.type != UMGR_HELLO_ACK) {
        if (*fd >= 0)
            raw_close(*fd);
        *fd = -1;
        if (n >= 0)
            errno = n == 0 ? ECONNRESET : EPROTO;
        return -1;
    }
    return 0;
}

static void fill_hdr(struct umgr_hdr *hdr, uint16_t type, size_t size)
{
    hdr->magic = UMGR_MAGIC;
    hdr->type = type;
    hdr->size = (uint16_t)size;
}

/* The ACK of the oldest request unanswered on the control connection: its
 * status; -1 if the daemon is gone; -2 if none came within `wait_ms` (it
 * is still owed then). ctl_lock held. The wait is the shim's ack_timeout
 * (UMGR_ACK_TIMEOUT_SECONDS), not the socket's receive timeout, which
 * bounds a HELLO's answer. */
static int receive_ack(int wait_ms)
{
    struct pollfd ready = {.fd = shim.ctl_fd, .events = POLLIN};
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int64_t deadline_ms = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000 + wait_ms;
    int n;
    for (;;) {   /* (a signal's EINTR waits out the time left, not the whole wait again) */
        n = poll(&ready, 1, wait_ms);
        if (n >= 0 || errno != EINTR)
            break;
        clock_gettime(CLOCK_MONOTONIC, &now);
        int64_t left = deadline_ms - ((int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000);
        wait_ms = left > 0 ? (int)left : 0;
    }
    if (n == 0) {
        shim.acks_owed++;
        return -2;
    }
    struct umgr_ack ack;
    errno = 0;
    if (recv_exact_type(shim.ctl_fd, &ack, sizeof ack, UMGR_ACK) == sizeof ack)
        return ack.status;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
        shim.acks_owed++;
        return -2;
    }
    return -1;
}

/* A request on the control connection and its ACK status; -1 if the
 * daemon is gone, -2 if its answer is not known (the request may still
 * take effect): it did not come within ack_timeout, or the daemon has not
 * answered an earlier request yet. The daemon answers a connection's
 * requests in order, so the ACKs owed for requests that timed out are read
 * first (else each later request would take the one before it); one that
 * does not come within ack_timeout leaves the new request's answer owed
 * too, and the request is sent all the same (a FORKED must not be lost). */
static int control_request(const void *msg, size_t len)
{
    int status = -1, behind = 0;
    pthread_mutex_lock(&shim.ctl_lock);
    while (shim.active && shim.acks_owed > 0 && !behind) {
        shim.acks_owed--;
        int late = receive_ack((int)shim.ack_timeout * 1000);
        if (late == -1)
            goto out;
        behind = late == -2;
    }
    if (shim.active && send_with_fds(shim.ctl_fd, msg, len, NULL, 0) == 0) {
        if (behind) {
            shim.acks_owed++;
            status = -2;
        } else {
            status = receive_ack((int)shim.ack_timeout * 1000);
        }
    }
out:
    pthread_mutex_unlock(&shim.ctl_lock);
    return status;
}

/* ---- the zap agent ---------------------------------------------------- */

static long zap_ranges(const struct umgr_range *ranges, uint32_t count)
{
    struct iovec iov[UMGR_ZAP_MAX_RANGES];
    for (uint32_t i = 0; i < count; i++) {
        iov[i].iov_base = (void *)(uintptr_t)ranges[i].start;
        iov[i].iov_len = ranges[i].length;
    }
    /* Each iovec makes the kernel queue one UFFD_EVENT_REMOVE and wait until
     * the daemon has read it; the daemon sends contiguous runs to keep the
     * count low. */
    long done = syscall(SYS_process_madvise, shim.self_pidfd, iov, (size_t)count, MADV_DONTNEED, 0);
    return done < 0 ? -errno : done;
}

/* ---- moving pages out (MOVE_OUT) ---------------------------------------
 * UFFDIO_MOVE takes a page out of the app's range with no UFFD_EVENT_REMOVE,
 * so no round trip to the daemon per range as a zap has (measured on 6.18:
 * about 2 us a scattered page, as MADV_DONTNEED costs, against 25-50 us for
 * a zapped one). The kernel accepts it only from inside the mm, and only
 * into a range registered on the uffd the ioctl is issued on. That is the
 * app's own uffd (our reference to it), with a scratch area registered on
 * it: a move then answers EAGAIN while one of the app's events is queued
 * (the kernel checks the context's mmap_changing under its lock, as for
 * UFFDIO_COPY), so a move never runs after an munmap or mremap the daemon
 * has not read. On a uffd of its own the scratch was outside that check: one
 * thread could unmap batch pages and another map new memory into the hole
 * and write it, and the move took the new page. The scratch is emptied
 * unregistered, so that discarding the moved pages raises no REMOVE. The
 * daemon has the pages' content already (it evicts only what it stored or
 * can read back). */

#ifndef UFFDIO_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#define _UFFDIO_MOVE 0x05
struct uffdio_move {
    uint64_t dst, src, len, mode;
    int64_t move; /* written by the kernel: bytes moved, or -errno */
};
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((uint64_t)1 << 1)
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

/* The scratch is SCRATCH_PARTS parts of SCRATCH_PART bytes, each a mapping
 * of its own (a PROT_NONE page on each side keeps the kernel from merging
 * them with each other or with a neighbour), each under the default
 * --min-region (1 MiB), so the daemon's maps scan leaves them alone. Under
 * a smaller one, or once the scan takes up a heap of small mappings
 * (node's, of 256 KiB), the scan registers them as regions (on the same uffd that
 * succeeds): harmless, as nothing faults there, and their pages, which the
 * daemon saved already, are never SWAPPED; a page it took for RESIDENT
 * (present at that moment) cannot be write-protected once the part is
 * registered again without WP, and stays. Together the parts hold the
 * daemon's smallest batch (512 pages), so a batch moves out whole and the
 * parts are emptied after the answer: emptying them (MADV_DONTNEED frees
 * the pages) was 62% of the agent's CPU, and the daemon reads no fault
 * while a move is out (umgr/paging/readgate.py). */
#define SCRATCH_PART (128 * SHIM_PAGE_SIZE)
#define SCRATCH_PARTS 4
#define SCRATCH_BYTES (SCRATCH_PARTS * SCRATCH_PART)     /* what moves in before the parts must be emptied */
#define SCRATCH_STRIDE (SCRATCH_PART + SHIM_PAGE_SIZE)   /* a part and the PROT_NONE page after it */
#define SCRATCH_SPAN (SHIM_PAGE_SIZE + SCRATCH_PARTS * SCRATCH_STRIDE)

/* The changed-page area: where the agent keeps the pages a MOVE_OUT found
 * changed since the daemon's copy (protocol.h), for the daemon to read. A
 * shared mapping, so never managed: the agent writes it while the daemon
 * waits for its answer and serves no fault. MADV_DONTFORK: a child's agent
 * makes its own. Made with the scratch, touched only when a device wrote a
 * page during its eviction; small (260 KiB), as under mlockall(MCL_FUTURE)
 * it is locked in memory whole. */
#define CHANGED_BYTES (UMGR_CHANGED_INDEX_BYTES + (size_t)UMGR_CHANGED_MAX * SHIM_PAGE_SIZE)

static struct {
    int uffd;      /* the uffd the parts are registered on (shim.uffd_ref, not ours to close); -1 until the first MOVE_OUT */
    char *span;    /* the reservation: PROT_NONE but for the parts */
    size_t used;   /* bytes moved in since the parts were last emptied */
    int error;     /* why moving out is impossible here (answered to every MOVE_OUT), or 0 */
    char *changed; /* the changed-page area */
    uint32_t nchanged;   /* pages in it since the last MOVE_OUT */
} scratch = {.uffd = -1};

/* Pages moved into the scratch that are still to be checked against
 * their hash (check_moved): their index among the request's pages, and
 * where in the scratch they went (bytes into its parts, as scratch.used). */
static struct {
    uint32_t index[UMGR_CHANGED_MAX];
    uint32_t at[UMGR_CHANGED_MAX];
    uint32_t count;
} unchecked;

static char *scratch_part(int i)
{
    return scratch.span + SHIM_PAGE_SIZE + (size_t)i * SCRATCH_STRIDE;
}

static int scratch_register(void)
{
    for (int i = 0; i < SCRATCH_PARTS; i++) {
        struct uffdio_register reg = {.range = {.start = (uintptr_t)scratch_part(i), .len = SCRATCH_PART},
                                      .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (ioctl(scratch.uffd, UFFDIO_REGISTER, &reg) < 0)
            return -1;
    }
    return 0;
}

static void scratch_unregister(void)
{
    for (int i = 0; i < SCRATCH_PARTS; i++) {
        struct uffdio_range range = {.start = (uintptr_t)scratch_part(i), .len = SCRATCH_PART};
        ioctl(scratch.uffd, UFFDIO_UNREGISTER, &range);
    }
}

/* The scratch parts, registered on the app's uffd, made on first use. 0, or a positive errno. */
static int scratch_ready(void)
{
    if (scratch.uffd >= 0 || scratch.error)
        return scratch.error;
    char *span = (char *)syscall(SYS_mmap, NULL, SCRATCH_SPAN, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                                 -1, 0);
    /* A forked child must not inherit it: not registered there, it would be a stray mapping. */
    if (span == MAP_FAILED || syscall(SYS_madvise, span, SCRATCH_SPAN, MADV_DONTFORK) < 0)
        goto fail;
    scratch.span = span;
    char *changed = (char *)syscall(SYS_mmap, NULL, CHANGED_BYTES, PROT_READ | PROT_WRITE,
                                    MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (changed == MAP_FAILED)
        goto fail;
    scratch.changed = changed;
    scratch.nchanged = 0;
    if (syscall(SYS_madvise, changed, CHANGED_BYTES, MADV_DONTFORK) < 0)
        goto fail;
    for (int i = 0; i < SCRATCH_PARTS; i++)
        if (syscall(SYS_mprotect, scratch_part(i), SCRATCH_PART, PROT_READ | PROT_WRITE) < 0)
            goto fail;
    scratch.uffd = shim.uffd_ref;
    scratch.used = 0;
    if (scratch_register() < 0)
        goto fail;
    return 0;
fail:
    scratch.error = errno ? errno : EOPNOTSUPP;
    if (scratch.uffd >= 0)
        scratch_unregister();
    if (span != MAP_FAILED)
        syscall(SYS_munmap, span, SCRATCH_SPAN);
    if (scratch.changed)
        syscall(SYS_munmap, scratch.changed, CHANGED_BYTES);
    scratch.uffd = -1;
    scratch.span = NULL;
    scratch.changed = NULL;
    return scratch.error;
}

/* Let go of the scratch. Where it is ours it is unregistered first, so
 * that its munmap raises no UNMAP (the agent would wait for the daemon to
 * read it); a forked child has the parent's descriptor but not the span
 * (MADV_DONTFORK), and the descriptor is the shim's to close. */
static void scratch_drop(int unmap)
{
    if (unmap && scratch.span) {
        scratch_unregister();
        syscall(SYS_munmap, scratch.span, SCRATCH_SPAN);
    }
    if (unmap && scratch.changed)
        syscall(SYS_munmap, scratch.changed, CHANGED_BYTES);
    scratch.uffd = -1;
    scratch.span = NULL;
    scratch.changed = NULL;
    scratch.nchanged = 0;
    unchecked.count = 0;   /* (a fork from another thread may find the agent between two moves) */
    scratch.used = 0;
    scratch.error = 0;
}

/* Empty the parts moved into with no event: unregistered meanwhile, they
 * are outside the uffd's EVENT_REMOVE. 0, or an errno (the parts could not
 * be registered again: no move can be made any more). */
static int scratch_discard(void)
{
    if (!scratch.used)
        return 0;
    scratch_unregister();
    for (int i = 0; i < SCRATCH_PARTS && (size_t)i * SCRATCH_PART < scratch.used; i++)
        syscall(SYS_madvise, scratch_part(i), SCRATCH_PART, MADV_DONTNEED);
    scratch.used = 0;
    if (scratch_register() == 0)
        return 0;
    scratch.error = errno;
    return errno;
}

/* The pages just moved in at scratch.used (npages, the first being page
 * `first` of the request) that the daemon copied (a hash) wait for
 * check_moved(). Pages it did not copy (hash 0: a clean copy's page, which
 * came in through UFFDIO_COPY write-protected and cannot be pinned for a
 * write since) are not checked. */
static void note_moved(uint64_t npages, uint64_t first, const uint64_t *hashes)
{
    for (uint64_t p = 0; p < npages; p++)
        if (hashes[first + p]) {
            unchecked.index[unchecked.count] = (uint32_t)(first + p);
            unchecked.at[unchecked.count++] = (uint32_t)(scratch.used + p * SHIM_PAGE_SIZE);
        }
}

/* The pages moved whose content is not what the daemon copied: a device
 * wrote them after the copy, through a pin taken before the daemon
 * write-protected them and dropped before the move (the move refuses a
 * pinned page: EBUSY). Each goes to the changed-page area with its index.
 * A hole (the app discarded the page meanwhile: the move skips it) has no
 * page to hash, and touching it would fault on the scratch's uffd, so
 * mincore picks the pages that arrived: one call over the scratch for all
 * the pages waiting, where a call per move cost a syscall per page of a
 * scattered batch. (A page the kernel swapped out in between, unpinned,
 * is passed over with the holes: mincore cannot tell them apart.) Called
 * before the scratch is emptied and before the answer; checkable() keeps
 * the pages waiting within what the changed-page area can take. */
static void check_moved(const uint64_t *hashes)
{
    if (!unchecked.count)
        return;
    unsigned char present[SCRATCH_SPAN / SHIM_PAGE_SIZE];
    char *base = scratch_part(0);
    uint32_t last = unchecked.at[unchecked.count - 1];
    char *end = scratch_part((int)(last / SCRATCH_PART)) + last % SCRATCH_PART + SHIM_PAGE_SIZE;
    int known = syscall(SYS_mincore, base, (size_t)(end - base), present) == 0;
    for (uint32_t i = 0; i < unchecked.count && known; i++) {
        uint32_t at = unchecked.at[i];
        const char *page = scratch_part((int)(at / SCRATCH_PART)) + at % SCRATCH_PART;
        if (!(present[(page - base) / SHIM_PAGE_SIZE] & 1) || umgr_page_hash(page) == hashes[unchecked.index[i]])
            continue;
        uint32_t *index = (uint32_t *)scratch.changed;
        memcpy(scratch.changed + UMGR_CHANGED_INDEX_BYTES + (size_t)scratch.nchanged * SHIM_PAGE_SIZE, page,
               SHIM_PAGE_SIZE);
        index[scratch.nchanged++] = unchecked.index[i];
    }
    unchecked.count = 0;
}

/* How many of the `most` pages from page `first` one move may take: all,
 * unless more of them are checked (a hash) than the changed-page area has
 * room left for, counting the pages still to be checked as changed. */
static uint64_t checkable(const uint64_t *hashes, uint64_t first, uint64_t most)
{
    uint32_t room = UMGR_CHANGED_MAX - scratch.nchanged - unchecked.count;
    for (uint64_t p = 0; p < most; p++)
        if (hashes[first + p] && room-- == 0)
            return p;
    return most;
}

/* The changed-page area's pages go back to the kernel (a shared mapping's
 * pages live in its shmem file: MADV_REMOVE frees them) once the daemon,
 * which reads them before its next MOVE_OUT, is done with them. */
static void changed_reset(void)
{
    if (scratch.nchanged)
        syscall(SYS_madvise, scratch.changed, CHANGED_BYTES, MADV_REMOVE);   /* (EINVAL if locked: it stays) */
    scratch.nchanged = 0;
}

/* Move the ranges out, in order, until one cannot move further (ENOENT: no
 * mapping there any more, an mremap or munmap took it; EBUSY: a page
 * shared copy-on-write after fork, or pinned for I/O; EINVAL: another
 * protection, an mlock; ENOSPC: the changed-page area is full). A move across the end of a mapping is refused
 * whole (EINVAL: the kernel wants source and destination each within one
 * mapping), and a range of the daemon's may cross any number of them
 * (madvise flags, anonymous names and hugepage advice split a region into
 * mappings): such a move is tried again on half as much, down to a page,
 * and the rest goes on whole from where it stopped. Left to the daemon's
 * zap, the rest of the batch would lose pages pinned for I/O. Returns the bytes
 * moved from the start, with the errno that stopped it in *stopped (0 if
 * all moved), or -errno when nothing can move here (no UFFDIO_MOVE). The
 * pages stay in the scratch until scratch_discard(), after the answer;
 * those whose hash (one per page of the ranges) says a device changed them
 * since the daemon's copy go to the changed-page area (check_moved). */
static long move_ranges(const struct umgr_range *ranges, uint32_t count, const uint64_t *hashes, int *stopped);

static long move_out_ranges(const struct umgr_range *ranges, uint32_t count, const uint64_t *hashes, int *stopped)
{
    int error = scratch_ready();
    if (error)
        return -error;
    changed_reset();
    unchecked.count = 0;
    long done = move_ranges(ranges, count, hashes, stopped);
    check_moved(hashes);
    return done;
}

static long move_ranges(const struct umgr_range *ranges, uint32_t count, const uint64_t *hashes, int *stopped)
{
    long done = 0;
    *stopped = 0;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t at = ranges[i].start, left = ranges[i].length;
        uint64_t most = left;   /* what one move may take: halved while moves cross a mapping's end */
        while (left) {
            if (scratch.used == SCRATCH_BYTES) {   /* (a batch of more than 512 pages) */
                check_moved(hashes);
                int why = scratch_discard();
                if (why) {
                    *stopped = why;
                    return done;
                }
            }
            size_t room = SCRATCH_PART - scratch.used % SCRATCH_PART;   /* a move stays within one part */
            uint64_t len = left < room ? left : room;
            len = len < most ? len : most;
            if (!checkable(hashes, (uint64_t)done / SHIM_PAGE_SIZE, 1))
                check_moved(hashes);   /* (room for the pages waiting, which are mostly unchanged) */
            len = checkable(hashes, (uint64_t)done / SHIM_PAGE_SIZE, len / SHIM_PAGE_SIZE) * SHIM_PAGE_SIZE;
            if (!len) {   /* the changed-page area is full: the daemon takes those first */
                *stopped = ENOSPC;
                return done;
            }
            char *dst = scratch_part((int)(scratch.used / SCRATCH_PART)) + scratch.used % SCRATCH_PART;
            /* A hole (a page the app discarded meanwhile) is skipped, and counted as moved. */
            struct uffdio_move move = {.dst = (uintptr_t)dst, .src = at, .len = len,
                                       .mode = UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES};
            int why = ioctl(scratch.uffd, UFFDIO_MOVE, &move) < 0 ? errno : 0;
            uint64_t moved = move.move > 0 ? (uint64_t)move.move & ~(uint64_t)(SHIM_PAGE_SIZE - 1) : 0;
            note_moved(moved / SHIM_PAGE_SIZE, (uint64_t)done / SHIM_PAGE_SIZE, hashes);
            done += (long)moved;
            scratch.used += moved;
            /* A move that stops part way answers EAGAIN: the next one,
             * from where it stopped, moves nothing and says why. */
            if (!moved && why == EINVAL && len > SHIM_PAGE_SIZE) {
                most = len / 2 & ~(uint64_t)(SHIM_PAGE_SIZE - 1);
                continue;
            }
            if (!moved) {
                *stopped = why ? why : EIO;
                return done;
            }
            at += moved;
            left -= moved;
            most = left;
        }
    }
    return done;
}

/* DETACH: the daemon brought every page back and lets this process go.
 * Dropping our uffd reference lets the kernel release the context once the
 * daemon closes its own (unregistering every range). */
static void detach_from_daemon(int agent_fd)
{
    __atomic_store_n(&shim.detached, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&shim.active, 0, __ATOMIC_RELEASE);
    scratch_drop(1); /* while its uffd is open: unregistered, its munmap raises no UNMAP */
    int uffd = shim.uffd_ref;
    shim.uffd_ref = -1;   /* before the close: the program's close() of a number reused meanwhile is its own */
    if (uffd >= 0)
        raw_close(uffd);
    struct umgr_detach done;
    fill_hdr(&done.hdr, UMGR_DETACH_DONE, sizeof done);
    send_with_fds(agent_fd, &done, sizeof done, NULL, 0);
}

#define AGENT_WAIT_MS 20

/* The daemon is gone (its end closed, or a reply could not be sent): wait
 * until the watchdog has a restarted daemon take us back, then serve the new
 * socket. The old one is closed only here, so its number is never reused
 * while this thread still writes to it. */
static int next_agent_fd(int old)
{
    __atomic_store_n(&shim.agent_idle, 1, __ATOMIC_RELEASE);
    int fd;
    while ((fd = __atomic_load_n(&shim.agent_fd, __ATOMIC_ACQUIRE)) == old) {
        struct timespec step = {.tv_nsec = AGENT_WAIT_MS * 1000000L};
        while (clock_nanosleep(CLOCK_MONOTONIC, 0, &step, &step) == EINTR)
            ;
    }
    raw_close(old);
    __atomic_store_n(&shim.agent_idle, 0, __ATOMIC_RELEASE);
    return fd;
}

/* The pages a MOVE_OUT's ranges name, or UINT64_MAX where they are not
 * whole pages or more than UMGR_MOVE_MAX_PAGES (no message has that size). */
static uint64_t move_pages(const struct umgr_zap *zap)
{
    uint64_t pages = 0;
    for (uint32_t i = 0; i < zap->count; i++) {
        uint64_t length = zap->ranges[i].length;
        if (length % SHIM_PAGE_SIZE || length / SHIM_PAGE_SIZE > UMGR_MOVE_MAX_PAGES - pages)
            return UINT64_MAX / sizeof(uint64_t);
        pages += length / SHIM_PAGE_SIZE;
    }
    return pages;
}

static void *agent_main(void *unused)
{
    (void)unused;
    prctl(PR_SET_NAME, "umgr-agent");   /* its CPU time is the moves and zaps: bench/programs/shapes.c reports it */
    /* On the agent's own (never managed) stack: a __thread buffer would be
     * reached through the DTV, which glibc mallocs on the heap, a managed
     * page the agent could fault on while the daemon waits for its zap. */
    char buf[sizeof(struct umgr_zap) + UMGR_ZAP_MAX_RANGES * sizeof(struct umgr_range) +
             UMGR_MOVE_MAX_PAGES * sizeof(uint64_t)];
    int fd = __atomic_load_n(&shim.agent_fd, __ATOMIC_ACQUIRE);
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n < 0 && errno == EINTR)
            continue;
        struct umgr_zap *zap = (struct umgr_zap *)buf;
        if (n == sizeof(struct umgr_detach) && zap->hdr.magic == UMGR_MAGIC && zap->hdr.type == UMGR_DETACH) {
            detach_from_daemon(fd);
            break;
        }
        int moving = n >= (ssize_t)sizeof *zap && zap->hdr.type == UMGR_MOVE_OUT;
        int valid = n >= (ssize_t)sizeof *zap && zap->hdr.magic == UMGR_MAGIC &&
                    (zap->hdr.type == UMGR_ZAP || moving) && zap->count <= UMGR_ZAP_MAX_RANGES &&
                    (size_t)n >= sizeof *zap + zap->count * sizeof(struct umgr_range) &&
                    (size_t)n == sizeof *zap + zap->count * sizeof(struct umgr_range) +
                                     (moving ? move_pages(zap) * sizeof(uint64_t) : 0);
        if (valid) {
            struct umgr_zap_done done = {0};
            fill_hdr(&done.hdr, UMGR_ZAP_DONE, sizeof done);
            done.seq = zap->seq;
            int stopped = 0;
            const uint64_t *hashes = (const uint64_t *)(zap->ranges + zap->count);
            long result = !zap->count ? 0
                          : moving    ? move_out_ranges(zap->ranges, zap->count, hashes, &stopped)
                                      : zap_ranges(zap->ranges, zap->count);
            /* A move that cannot be made here at all answers a negative errno. */
            done.error = result >= 0 ? stopped : moving ? (int32_t)result : (int32_t)-result;
            done.bytes = result < 0 ? 0 : result;
            if (moving && scratch.nchanged) {
                done.changed = scratch.nchanged;
                done.changed_at = (uintptr_t)scratch.changed;
            }
            int sent = send_with_fds(fd, &done, sizeof done, NULL, 0);
            scratch_discard();   /* after the answer: the daemon reads faults again meanwhile */
            if (sent == 0)
                continue;
        }
        /* The daemon is gone (or spoke nonsense: its connection is given
         * up alike): the watchdog takes it from here. */
        fd = next_agent_fd(fd);
    }
    return NULL;
}

static int open_self_pidfd(void)
{
    struct iovec probe = {0};
    /* A zero-length vector is a cheap way to ask whether PIDFD_SELF works. */
    if (syscall(SYS_process_madvise, PIDFD_SELF_PROCESS, &probe, 1, MADV_DONTNEED, 0) >= 0)
        return PIDFD_SELF_PROCESS;
    return move_high((int)syscall(SYS_pidfd_open, getpid(), 0));
}

/* ---- the watchdog ------------------------------------------------------
 * A thread of its own, not the agent: the agent may be stuck in
 * process_madvise when the daemon dies (each range's UFFD_EVENT_REMOVE waits
 * for a reader, and with our uffd reference the context, and the wait, go
 * on). Like the agent it must never touch managed memory: its stack is a
 * shared mapping, it reads only the shim's own static state, and say()
 * formats on that stack. */

#define WATCH_STEP_MS 100
#define MIN_WAIT_STEPS 10 /* a DETACH queued before the daemon closed is read by then */

#define MAX_BACKOFF_MS 1000

static void sleep_ms(unsigned ms)
{
    struct timespec step = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    while (clock_nanosleep(CLOCK_MONOTONIC, 0, &step, &step) == EINTR)
        ;
}

static uint64_t now_ms(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000 + (uint64_t)now.tv_nsec / 1000000;
}

/* After the daemon's end closed: a DETACH it queued first is read by the
 * agent within a second. Returns whether it came; returns early, without,
 * once the agent has read to the end of the socket. (The agent may instead
 * be stuck in a zap whose REMOVE events only a new daemon will read.) */
static int wait_for_detach(void)
{
    for (int i = 0; i < MIN_WAIT_STEPS; i++) {
        if (__atomic_load_n(&shim.detached, __ATOMIC_ACQUIRE))
            return 1;
        if (__atomic_load_n(&shim.agent_idle, __ATOMIC_ACQUIRE))
            return 0;
        sleep_ms(WATCH_STEP_MS);
    }
    return __atomic_load_n(&shim.detached, __ATOMIC_ACQUIRE);
}

static int take_back(void);

/* Whether the umgr exec that runs us has exited (its pidfd is readable).
 * Unknown (no UMGR_EXEC_PID, or the app closed the descriptor): no. */
static int exec_gone(void)
{
    if (shim.exec_pidfd < 0)
        return 0;
    struct pollfd exec = {.fd = shim.exec_pidfd, .events = POLLIN};
    return poll(&exec, 1, 0) == 1 && (exec.revents & POLLIN);
}

/* Ask, with backoff, until `grace` seconds (at least one) are over, for a
 * daemon restarted at our socket to take us back. Returns 0 when one did,
 * ESTALE when one answered that it has nothing of ours, ESRCH when the
 * umgr exec running us is gone (its daemon died with it), else ETIMEDOUT. */
static int wait_for_daemon(unsigned grace)
{
    uint64_t deadline = now_ms() + (grace ? grace : 1) * 1000ull;
    unsigned backoff = 50;
    for (;;) {
        if (exec_gone())
            return ESRCH;
        int status = take_back();
        if (status == 0 || status == ESTALE)
            return status;
        uint64_t now = now_ms();
        if (now >= deadline)
            return ETIMEDOUT;
        sleep_ms(now + backoff > deadline ? (unsigned)(deadline - now) : backoff);
        backoff = backoff * 2 > MAX_BACKOFF_MS ? MAX_BACKOFF_MS : backoff * 2;
    }
}

static void *watchdog_main(void *unused)
{
    (void)unused;
    prctl(PR_SET_NAME, "umgr-watchdog");   /* as ps -T and top -H show it */
    for (;;) {
        /* Only POLLRDHUP is asked for: a ZAP waiting to be read does not
         * wake us. The daemon's end closing sets both RDHUP and HUP on a
         * seqpacket socket. */
        struct pollfd agent = {.fd = __atomic_load_n(&shim.agent_fd, __ATOMIC_ACQUIRE), .events = POLLRDHUP};
        while (poll(&agent, 1, -1) < 0 && errno == EINTR)
            ;
        if (wait_for_detach())
            return NULL; /* a clean stop: every page is back */
        unsigned grace = shim.grace_seconds;
        int status = wait_for_daemon(grace);
        if (status == 0)
            continue; /* taken back: watch the new daemon */
        if (status == ESTALE)
            say("umgr: pid %d: killed: the umgr daemon serving it died, and the one restarted at %s has none "
                "of its paged-out memory\n", (int)getpid(), shim.socket_path);
        else if (status == ESRCH)
            say("umgr: pid %d: killed: umgr exec (pid %d), which ran it, is gone, and its daemon with it; "
                "its paged-out memory cannot be served\n", (int)getpid(), shim.exec_pid);
        else
            say("umgr: pid %d: killed: the umgr daemon serving it is gone and none came back within %u s "
                "(UMGR_GRACE_SECONDS); its paged-out memory cannot be served\n", (int)getpid(), grace);
        syscall(SYS_kill, getpid(), SIGKILL);
        return NULL;
    }
}

#define AGENT_STACK_SIZE (256 << 10)
#define WATCHDOG_STACK_SIZE (64 << 10)

static int start_thread(void *(*main_fn)(void *), size_t stack_size, pthread_t *thread)
{
    /* The thread's stack (and its TLS, which glibc puts in it) must never be
     * paged out: if a zap took the page the agent stands on, it would fault
     * before it could report the zap done, and the daemon serves no fault on a
     * page whose zap is in flight. A shared mapping is never managed. */
    void *stack = (void *)syscall(SYS_mmap, NULL, stack_size, PROT_READ | PROT_WRITE,
                                  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (stack == MAP_FAILED)
        return errno;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstack(&attr, stack, stack_size);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    sigset_t all, old;
    sigfillset(&all);
    /* The shim's threads must never run the app's signal handlers. */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(thread, &attr, main_fn, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    if (rc != 0)
        syscall(SYS_munmap, stack, stack_size);
    return rc;
}

static int start_agent(void)
{
    static pthread_t watchdog;
    int rc = start_thread(watchdog_main, WATCHDOG_STACK_SIZE, &watchdog);
    return rc != 0 ? rc : start_thread(agent_main, AGENT_STACK_SIZE, &shim.agent);
}

/* ---- attaching ------------------------------------------------------- */

/* Whoever can create the socket file or listen on it gets this process's
 * memory: only a socket in a directory no other user may write to, served
 * by root or by this process's own user, is trusted (errno EPERM if not). */
static int trusted_daemon(int fd, const char *path)
{
    char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];
    const char *slash = strrchr(path, '/');
    size_t len = slash ? (size_t)(slash - path) : 0;
    if (len == 0)
        strcpy(dir, slash ? "/" : ".");
    else {
        memcpy(dir, path, len);
        dir[len] = '\0';
    }
    struct stat st;
    if (stat(dir, &st) != 0)
        return -1;
    uid_t me = geteuid();
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) || (st.st_uid != 0 && st.st_uid != me)) {
        errno = EPERM;
        return -1;
    }
    struct ucred cred;
    socklen_t size = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &size) != 0)
        return -1;
    if (cred.uid != 0 && cred.uid != me) {
        errno = EPERM;
        return -1;
    }
    return 0;
}

static int connect_daemon(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || trusted_daemon(fd, path) != 0) {
        int saved = errno;
        raw_close(fd);
        errno = saved;
        return -1;
    }
    struct timeval timeout = {.tv_sec = ACK_TIMEOUT_SECONDS};   /* (a HELLO's answer; a request's: ack_timeout) */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    return move_high(fd);
}

/* One untouched private anonymous page for the daemon's ownership probe
 * (protocol.h, struct umgr_hello.probe); kept while managed as the canary
 * that proves the daemon's reads reach this process. */
static void *map_probe_page(void)
{
    void *page = (void *)syscall(SYS_mmap, NULL, 4096, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return page == MAP_FAILED ? NULL : page;
}

static void close_all(int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            raw_close(fds[i]);
}

static unsigned grace_seconds(const struct umgr_hello_ack *ack)
{
    const char *text = getenv("UMGR_GRACE_SECONDS");
    if (text && *text) {
        char *end;
        unsigned long value = strtoul(text, &end, 10);
        if (*end == '\0' && value <= 86400 * 365)
            return (unsigned)value;
        say("umgr: UMGR_GRACE_SECONDS=%s is not a number of seconds; using %u\n", text, ack->grace_seconds);
    }
    return ack->grace_seconds;
}

static void fill_hello(struct umgr_hello *hello, uint32_t flags)
{
    memset(hello, 0, sizeof *hello);
    fill_hdr(&hello->hdr, UMGR_HELLO, sizeof *hello);
    hello->version = UMGR_VERSION;
    hello->pid = getpid();
    hello->max_resident = shim.max_resident;
    hello->min_region = shim.min_region;
    memcpy(hello->policy, shim.policy, sizeof hello->policy);
    memcpy(hello->name, shim.name, sizeof hello->name);
    hello->flags = flags;
}

/* The watchdog's request to a daemon restarted at our socket: take us back
 * with our uffd (the one the dead daemon set up) and new sockets. 0 when
 * it did; else the errno of the failure (ESTALE: it has nothing of ours). */
static int take_back(void)
{
    int ctl = connect_daemon(shim.socket_path);
    if (ctl < 0)
        return errno;
    int pair[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
        int saved = errno;
        raw_close(ctl);
        return saved;
    }
    pair[0] = move_high(pair[0]);
    struct umgr_hello hello;
    fill_hello(&hello, UMGR_HELLO_RESUME);
    void *probe = map_probe_page();
    hello.probe = (uintptr_t)probe;
    int fds[2] = {pair[1], shim.uffd_ref};
    /* Once the daemon has the uffd it may read a fork's event, and the
     * fork() it lets return names its child (FORKED) at once, maybe on the
     * dead connection: name_child() sends it again after the swap. (Not by
     * holding ctl_lock from here: a thread that holds it may be faulting
     * on a page only this daemon can bring back.) */
    __atomic_store_n(&shim.taking_back, 1, __ATOMIC_SEQ_CST);
    int sent = send_with_fds(ctl, &hello, sizeof hello, fds, 2);
    raw_close(pair[1]);
    struct umgr_hello_ack ack;
    int returned_uffd = -1;
    int status = sent != 0 ? ECONNRESET : recv_hello_ack(ctl, &ack, &returned_uffd) != 0 ? errno : ack.status;
    if (probe)
        syscall(SYS_munmap, probe, 4096);
    if (returned_uffd >= 0)
        raw_close(returned_uffd);
    if (status != 0) {
        __atomic_store_n(&shim.taking_back, 0, __ATOMIC_SEQ_CST);
        raw_close(ctl);
        raw_close(pair[0]);
        return status;
    }
    pthread_mutex_lock(&shim.ctl_lock);
    int old_ctl = shim.ctl_fd;
    shim.ctl_fd = ctl;
    shim.acks_owed = 0; /* (the old connection's) */
    __atomic_add_fetch(&shim.ctl_generation, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&shim.taking_back, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&shim.ctl_lock);
    if (old_ctl >= 0)
        raw_close(old_ctl);
    shim.grace_seconds = grace_seconds(&ack);
    __atomic_store_n(&shim.agent_fd, pair[0], __ATOMIC_RELEASE); /* the agent closes the old one */
    say("umgr: pid %d: taken back by the umgr daemon restarted at %s\n", (int)getpid(), shim.socket_path);
    return 0;
}

/* Connect, hand over the uffd (or, in a forked child, only the agent
 * socket: the child's uffd reached the daemon through UFFD_EVENT_FORK and
 * comes back with HELLO_ACK), and start the agent and the watchdog. */
static enum attach_result attach(const char *path, int with_uffd)
{
    int ctl = -1, uffd = -1, pair[2] = {-1, -1};
    void *probe = NULL;
    /* The uffd first: a process that may not have one never troubles the
     * daemon with a connection it cannot use. */
    const char *failed = "userfaultfd";
    if (with_uffd && (uffd = move_high(open_uffd())) < 0) {
        if (errno != EPERM && errno != EACCES)
            goto fail;
        say("umgr: this process may not create a userfaultfd (%s): with vm.unprivileged_userfaultfd at 0 a user"
            " other than root needs /dev/userfaultfd open to it (see \"Serving other users\" in umgr's README),"
            " and a container may forbid both; running unmanaged\n", strerror(errno));
        return ATTACH_FAILED;
    }
    failed = "connect";
    ctl = connect_daemon(path);
    if (ctl < 0) {
        if (errno == EPERM)
            failed = "trust check (daemon neither root nor this user, or socket directory writable by others)";
        goto fail;
    }
    failed = "socketpair";
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0)
        goto fail;
    pair[0] = move_high(pair[0]);

    struct umgr_hello hello;
    fill_hello(&hello, 0);
    probe = map_probe_page();
    hello.probe = (uintptr_t)probe;
    int fds[2] = {pair[1], uffd};
    failed = "hello";
    if (send_with_fds(ctl, &hello, sizeof hello, fds, with_uffd ? 2 : 1) != 0)
        goto fail;
    raw_close(pair[1]);
    pair[1] = -1;

    struct umgr_hello_ack ack;
    int returned_uffd;
    failed = "hello acknowledgement";
    if (recv_hello_ack(ctl, &ack, &returned_uffd) != 0)
        goto fail;
    if (returned_uffd >= 0 && uffd < 0)
        uffd = move_high(returned_uffd); /* a forked child's, from its fork event */
    else if (returned_uffd >= 0)
        raw_close(returned_uffd);
    if ((ack.status == ENOENT && !with_uffd) || ack.status == ESHUTDOWN) {
        if (probe)
            syscall(SYS_munmap, probe, 4096);
        probe = NULL;
    }
    if (ack.status == ENOENT && !with_uffd) {
        /* No fork event for us (the parent had nothing registered). */
        int leftovers[3] = {ctl, pair[0], uffd};
        close_all(leftovers, 3);
        return ATTACH_NO_FORK_EVENT;
    }
    if (ack.status == ESHUTDOWN) {
        int leftovers[3] = {ctl, pair[0], uffd};
        close_all(leftovers, 3);
        say("umgr: the daemon at %s is stopping; running unmanaged\n", path);
        return ATTACH_DAEMON_STOPPING;
    }
    if (ack.status != 0) {
        errno = ack.status;
        failed = "daemon refused";
        goto fail;
    }
    shim.ctl_fd = ctl;
    shim.agent_fd = pair[0];
    shim.uffd_ref = uffd;
    shim.grace_seconds = grace_seconds(&ack);
    shim.self_pidfd = open_self_pidfd();
    failed = "agent thread";
    if (start_agent() != 0)
        goto fail_attached;
    shim.canary = probe;
    shim.active = 1;
    return ATTACHED;

fail_attached:
    shim.ctl_fd = shim.agent_fd = shim.uffd_ref = -1;
fail:;
    int saved = errno;
    if (probe)
        syscall(SYS_munmap, probe, 4096);
    int leftovers[4] = {ctl, uffd, pair[0], pair[1]};
    close_all(leftovers, 4);
    say("umgr: %s failed (%s) for %s; running unmanaged\n", failed, strerror(saved), path);
    return ATTACH_FAILED;
}

/* A forked child of a managed process: its memory may be paged out, and
 * the uffd that serves it came to the daemon with the fork event, so only
 * the daemon can bring it back. If that fails it must not run on. */
static void attach_forked(const char *path)
{
    enum attach_result result = attach(path, 0);
    if (result == ATTACH_NO_FORK_EVENT)
        attach(path, 1); /* nothing of ours was ever registered: as a new process */
    else if (result == ATTACH_FAILED) {
        say("umgr: pid %d: killed: this forked child could not reach the umgr daemon serving its "
            "paged-out memory\n", (int)getpid());
        syscall(SYS_kill, getpid(), SIGKILL);
    }
}

static void find_next_allocator(void);
static void fork_prepare(void);
static void fork_parent(void);
static void fork_child(void);

/* Under umgr exec (UMGR_EXEC_PID): a pidfd of it, taken now, while it is
 * surely alive (it started us or an ancestor of ours), so that a reused pid
 * is never mistaken for it. The pidfd is close-on-exec; a forked child
 * shares it. */
static void watch_exec(void)
{
    const char *text = getenv("UMGR_EXEC_PID");
    if (!text || !*text)
        return;
    char *end;
    long pid = strtol(text, &end, 10);
    if (*end || pid <= 0)
        return;
    shim.exec_pid = (int)pid;
    shim.exec_pidfd = move_high((int)syscall(SYS_pidfd_open, (pid_t)pid, 0));
}

__attribute__((constructor)) static void umgr_shim_init(void)
{
    find_next_allocator();
    const char *path = getenv("UMGR_SOCKET");
    if (!path || !*path) {
        say("umgr: UMGR_SOCKET is not set; running unmanaged\n");
        return;
    }
    if (env_size("UMGR_MAX_RESIDENT", SHIM_PAGE_SIZE, &shim.max_resident) != 0
        || env_size("UMGR_MIN_REGION", SHIM_PAGE_SIZE, &shim.min_region) != 0)
        return;
    strncpy(shim.socket_path, path, sizeof shim.socket_path - 1);
    const char *policy = getenv("UMGR_POLICY");
    if (policy)
        strncpy(shim.policy, policy, sizeof shim.policy - 1);
    const char *name = getenv("UMGR_NAME");
    if (name)
        strncpy(shim.name, name, sizeof shim.name - 1);
    const char *timeout = getenv("UMGR_ACK_TIMEOUT_SECONDS");
    if (timeout && *timeout) {
        char *end;
        unsigned long seconds = strtoul(timeout, &end, 10);
        if (*end || seconds == 0 || seconds > 3600) {
            say("umgr: UMGR_ACK_TIMEOUT_SECONDS=%s is not a number of seconds from 1 to 3600; running unmanaged\n",
                timeout);
            return;
        }
        shim.ack_timeout = (unsigned)seconds;
    }
    watch_exec();
    pthread_atfork(fork_prepare, fork_parent, fork_child);
    attach(path, 1);
}

/* ---- interposed calls ------------------------------------------------ */

static void report_region(void *addr, size_t length)
{
    struct umgr_region msg;
    fill_hdr(&msg.hdr, UMGR_REGION, sizeof msg);
    msg.start = (uintptr_t)addr;
    msg.length = length;
    /* The answer only says whether the daemon manages the range; the app
     * gets its mapping either way. */
    control_request(&msg, sizeof msg);
}

static int is_managed_kind(int flags, int fd)
{
    return shim.active && fd == -1 && (flags & MAP_ANONYMOUS) && (flags & MAP_PRIVATE) &&
           !(flags & (MAP_HUGETLB | MAP_LOCKED | MAP_STACK | MAP_GROWSDOWN));
}

/* A mapping worth telling the daemon of: one of min_region or more, or a
 * smaller one placed at a fixed address and open to access. The latter is
 * how a heap grows inside a reservation it made: HotSpot's serial
 * collector commits its old generation 192 KiB at a time with
 * mmap(MAP_FIXED), and the kernel merges the pieces into one mapping that
 * the maps scan would find only after the app filled it. The daemon
 * manages such a piece when it extends memory it manages. */
static int is_reported(size_t length, int prot, int flags)
{
    return length >= shim.min_region || ((flags & (MAP_FIXED | MAP_FIXED_NOREPLACE)) && prot != PROT_NONE);
}

EXPORT void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
{
    void *p = (void *)syscall(SYS_mmap, addr, length, prot, flags, fd, offset);
    if (p != MAP_FAILED && is_managed_kind(flags, fd) && is_reported(length, prot, flags)) {
        int saved = errno;
        report_region(p, length);
        errno = saved;
    }
    return p;
}

EXPORT void *mmap64(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    __attribute__((alias("mmap")));

/* ---- memory the allocator maps itself ---------------------------------
 * glibc's malloc maps big blocks and grows the main heap (brk) with
 * internal calls the mmap wrapper never sees. The daemon's maps scan finds
 * that memory, but only every 50 ms: long enough for a program to touch
 * hundreds of MiB past its budget. So the allocator entry points are
 * wrapped: a block of min_region or more, and every min_region of heap
 * growth, is reported before the app gets the memory. The wrappers call
 * the next definition (RTLD_NEXT), so a program's own allocator (jemalloc,
 * tcmalloc) keeps working; UMGR_WRAP_MALLOC=0 turns them off. */

struct allocator {
    void *(*malloc)(size_t);
    void *(*calloc)(size_t, size_t);
    void *(*realloc)(void *, size_t);
    void *(*memalign)(size_t, size_t);
    int (*posix_memalign)(void **, size_t, size_t);
    void *(*aligned_alloc)(size_t, size_t);
};

/* glibc's own entry points: used until the next ones are looked up (dlsym
 * may itself allocate). */
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static int libc_posix_memalign(void **out, size_t align, size_t size)
{
    void *p = __libc_memalign(align, size);
    if (p == NULL)
        return ENOMEM;
    *out = p;
    return 0;
}

static struct allocator next_alloc = {
    __libc_malloc, __libc_calloc, __libc_realloc, __libc_memalign, libc_posix_memalign, __libc_memalign,
};
static int wrap_malloc = 1;
static uintptr_t heap_reported; /* main heap (brk) reported up to here */

#define PAGE_MASK_ ((uintptr_t)4095)

/* Looked up at the first allocation, which may come before the shim's
 * constructor (another library's constructor): memory handed out there by
 * glibc would otherwise be freed later by the program's own allocator. */
static int next_found;

static const struct allocator *next(void)
{
    static int looking;
    if (__builtin_expect(__atomic_load_n(&next_found, __ATOMIC_ACQUIRE), 1) ||
        __atomic_exchange_n(&looking, 1, __ATOMIC_ACQ_REL))
        return &next_alloc; /* found, or dlsym is allocating: glibc's until then */
    struct allocator found = {
        (void *(*)(size_t))dlsym(RTLD_NEXT, "malloc"),
        (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "calloc"),
        (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc"),
        (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "memalign"),
        (int (*)(void **, size_t, size_t))dlsym(RTLD_NEXT, "posix_memalign"),
        (void *(*)(size_t, size_t))dlsym(RTLD_NEXT, "aligned_alloc"),
    };
    if (found.malloc && found.calloc && found.realloc && found.memalign && found.posix_memalign &&
        found.aligned_alloc)
        next_alloc = found;
    __atomic_store_n(&next_found, 1, __ATOMIC_RELEASE);
    return &next_alloc;
}

static void find_next_allocator(void)
{
    const char *wrap = getenv("UMGR_WRAP_MALLOC");
    wrap_malloc = !(wrap && strcmp(wrap, "0") == 0);
    next();
    heap_reported = (uintptr_t)sbrk(0);
}

static void report_allocation(void *block, size_t size)
{
    if (!shim.active || !wrap_malloc || block == NULL)
        return;
    int saved = errno;
    if (size >= shim.min_region) {
        uintptr_t lo = (uintptr_t)block & ~PAGE_MASK_;
        uintptr_t hi = ((uintptr_t)block + size + PAGE_MASK_) & ~PAGE_MASK_;
        report_region((void *)lo, hi - lo);
    }
    /* sbrk(0) reads glibc's cached break: no system call. */
    uintptr_t brk_now = (uintptr_t)sbrk(0);
    uintptr_t from = __atomic_load_n(&heap_reported, __ATOMIC_RELAXED);
    if (brk_now >= from + shim.min_region &&
        __atomic_compare_exchange_n(&heap_reported, &from, brk_now, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
        report_region((void *)from, brk_now - from);
    else if (brk_now < from) /* the heap was trimmed */
        __atomic_store_n(&heap_reported, brk_now, __ATOMIC_RELAXED);
    errno = saved;
}

EXPORT void *malloc(size_t size)
{
    void *p = next()->malloc(size);
    report_allocation(p, size);
    return p;
}

EXPORT void *calloc(size_t count, size_t size)
{
    void *p = next()->calloc(count, size);
    size_t total;
    if (!__builtin_mul_overflow(count, size, &total))
        report_allocation(p, total);
    return p;
}

EXPORT void *realloc(void *old, size_t size)
{
    void *p = next()->realloc(old, size);
    report_allocation(p, size);
    return p;
}

EXPORT void *memalign(size_t align, size_t size)
{
    void *p = next()->memalign(align, size);
    report_allocation(p, size);
    return p;
}

EXPORT int posix_memalign(void **out, size_t align, size_t size)
{
    int err = next()->posix_memalign(out, align, size);
    if (err == 0)
        report_allocation(*out, size);
    return err;
}

EXPORT void *aligned_alloc(size_t align, size_t size)
{
    void *p = next()->aligned_alloc(align, size);
    report_allocation(p, size);
    return p;
}

static void detach_in_child(void)
{
    /* The control socket and agent socket belong to the parent; the agent
     * thread did not survive fork. */
    if (shim.ctl_fd >= 0)
        raw_close(shim.ctl_fd);
    if (shim.agent_fd >= 0)
        raw_close(shim.agent_fd);
    if (shim.self_pidfd >= 0)
        raw_close(shim.self_pidfd);
    if (shim.uffd_ref >= 0)
        raw_close(shim.uffd_ref); /* the parent's */
    scratch_drop(0); /* the parent's: ours is made anew */
    if (shim.canary)
        syscall(SYS_munmap, shim.canary, 4096); /* the parent's copy: ours comes with our HELLO */
    shim.canary = NULL;
    shim.ctl_fd = shim.agent_fd = shim.self_pidfd = shim.uffd_ref = -1;
    shim.acks_owed = 0;
    shim.taking_back = 0; /* (the parent's watchdog's) */
    shim.active = 0;
    pthread_mutex_init(&shim.ctl_lock, NULL);
    pthread_mutex_init(&shim.fork_lock, NULL);
}

typedef pid_t (*fork_fn)(void);

/* A forked child's pid, named to the daemon (FORKED) in the parent: the
 * kernel delivers the child's uffd to the daemon (UFFD_EVENT_FORK) before
 * fork returns in the parent, and the daemon pairs FORKED messages with
 * fork events in order, so forks are serialised (fork_lock) and every
 * fork is named. */
static void name_child(pid_t pid)
{
    struct umgr_region msg; /* start = child pid */
    fill_hdr(&msg.hdr, UMGR_FORKED, sizeof msg);
    msg.start = (uint64_t)pid;
    msg.length = 0;
    unsigned generation = __atomic_load_n(&shim.ctl_generation, __ATOMIC_SEQ_CST);
    if (control_request(&msg, sizeof msg) != -1)
        return;
    /* The connection was dead: a restarted daemon taking us back may have
     * let this fork return before the watchdog swapped connections (see
     * take_back). Once it has, again on the new one. */
    for (unsigned waited_ms = 0; __atomic_load_n(&shim.taking_back, __ATOMIC_SEQ_CST)
                                 && waited_ms < shim.ack_timeout * 1000 + 1000; waited_ms++) {
        struct timespec ms = {.tv_nsec = 1000000};
        nanosleep(&ms, NULL);
    }
    if (__atomic_load_n(&shim.ctl_generation, __ATOMIC_SEQ_CST) != generation)
        control_request(&msg, sizeof msg);
}

/* The fork made no child to name: it failed after the kernel copied the
 * child's memory (EAGAIN at a pids cgroup's limit), or a fork inside glibc
 * made a child that died and was reaped at once. The daemon may have read a
 * fork event that names no child: a FORKED of pid 0 has it dropped, or the
 * next child would be paired with it, fail its proof and be killed. */
static void name_no_child(void)
{
    int saved = errno;   /* (the caller of fork() reads it) */
    struct umgr_region msg;
    fill_hdr(&msg.hdr, UMGR_FORKED, sizeof msg);
    msg.start = 0;
    msg.length = 0;
    control_request(&msg, sizeof msg);
    errno = saved;
}

static void child_after_fork(int was_active)
{
    detach_in_child();
    /* The socket the parent attached through, not UMGR_SOCKET now: a parent
     * may have cleared its environment (clearenv, os.environ.clear()) since,
     * and a child left unattached holds no reference to the uffd the daemon
     * made for it at the fork: its paged-out pages would read as zeros
     * once that daemon stopped. */
    if (was_active && shim.socket_path[0])
        attach_forked(shim.socket_path);
}

/* Every fork glibc makes runs its atfork handlers: fork() (wrapped below,
 * as it knows the child's pid) and its own forks inside daemon(3) and
 * forkpty(3) (Python's pty.fork), which call glibc's internal __fork, not
 * fork(). Unnamed, such a fork's uffd would pair with the parent's next
 * FORKED (that child then killed by its shim for failing the proof), or
 * outlive a parent that exits at once (daemon) only ORPHAN_WAIT seconds,
 * after which the child's paged-out pages read as zeros. So the handlers
 * name those children too, found among the forking thread's children
 * (/proc/thread-self/children) as the one that was not there before: the
 * parent does not wait for the child, whose first steps in glibc (other
 * threads' stacks) may fault on pages only the daemon can bring back, and
 * it does so once the child is its target. fork_lock is taken in the
 * prepare handler on both paths: glibc runs it after the prepare handlers
 * registered after the shim's (other libraries take their locks there), so
 * every fork takes the locks in one order. (_Fork() and a raw clone run
 * no handler: such a child is not served; the README says what follows.) */
static __thread int in_fork_wrapper;  /* fork() names its child itself */
static __thread int fork_locked;      /* this thread's prepare handler took fork_lock */
static int fork_was_active;
#define KNOWN_CHILDREN_MAX 4096
static pid_t known_children[KNOWN_CHILDREN_MAX]; /* the thread's children before the fork (under fork_lock) */
static int nknown_children = -1;                 /* -1: not known */

/* The calling thread's children, up to `max` (-1: unreadable or more). */
static int thread_children(pid_t *out, int max)
{
    static char text[8 * KNOWN_CHILDREN_MAX];
    int fd = (int)syscall(SYS_openat, AT_FDCWD, "/proc/thread-self/children", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t len = 0, got;
    while (len < (ssize_t)sizeof text - 1 && (got = read(fd, text + len, sizeof text - 1 - len)) != 0) {
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            break;
        len += got;
    }
    raw_close(fd);
    if (len >= (ssize_t)sizeof text - 1)
        return -1;
    text[len] = 0;
    int n = 0;
    for (char *at = text, *end; *at; at = end) {
        long pid = strtol(at, &end, 10);
        if (end == at)
            break;
        if (n == max)
            return -1;
        out[n++] = (pid_t)pid;
    }
    return n;
}

static void fork_prepare(void)
{
    if (!shim.active)
        return;
    pthread_mutex_lock(&shim.fork_lock);
    fork_locked = 1;
    fork_was_active = shim.active;
    nknown_children = in_fork_wrapper ? -1 : thread_children(known_children, KNOWN_CHILDREN_MAX);
}

/* The child a fork just made: the thread's child that was not there
 * before it; 0 when there is none (the fork failed, or its child died and
 * was reaped at once), -1 when the thread's children cannot be read. */
static pid_t new_child(void)
{
    static pid_t now[KNOWN_CHILDREN_MAX];
    int n = nknown_children < 0 ? -1 : thread_children(now, KNOWN_CHILDREN_MAX);
    if (n < 0)
        return -1;
    for (int i = n - 1; i >= 0; i--) {   /* (the newest last) */
        int known = 0;
        for (int j = 0; j < nknown_children && !known; j++)
            known = now[i] == known_children[j];
        if (!known)
            return now[i];
    }
    return 0;
}

static void fork_parent(void)
{
    if (!fork_locked)
        return;
    if (in_fork_wrapper)
        return;   /* fork() names its child and unlocks */
    fork_locked = 0;
    pid_t pid = new_child();
    if (pid > 0 && fork_was_active)
        name_child(pid);
    else if (pid == 0 && fork_was_active)
        name_no_child();
    pthread_mutex_unlock(&shim.fork_lock);
}

static void fork_child(void)
{
    if (!fork_locked || in_fork_wrapper)
        return;   /* (fork() goes on from here once it returns) */
    fork_locked = 0;
    child_after_fork(fork_was_active);
}

EXPORT pid_t fork(void)
{
    static fork_fn real_fork;
    if (!real_fork)
        real_fork = (fork_fn)dlsym(RTLD_NEXT, "fork");
    in_fork_wrapper = 1;
    pid_t pid = real_fork();   /* fork_prepare took fork_lock if the shim is active */
    in_fork_wrapper = 0;
    int locked = fork_locked, was_active = fork_was_active;
    fork_locked = 0;
    if (pid == 0) {
        if (locked)
            child_after_fork(was_active);
        return 0;
    }
    if (locked) {
        if (pid > 0 && was_active)
            name_child(pid);
        else if (pid < 0 && was_active)
            name_no_child();
        pthread_mutex_unlock(&shim.fork_lock);
    }
    return pid;
}

/* ---- the shim's own descriptors ------------------------------------------
 * A program that closes every descriptor it did not open (closefrom(),
 * close_range(), or close() in a loop, as daemons and process spawners do)
 * would close the control socket, the agent's socket and the uffd
 * reference. The agent could then not answer a MOVE_OUT that the daemon
 * waits on with the uffd unread (paging/readgate.py), and the program would
 * hang at its next fault. So through libc these leave the shim's
 * descriptors open (close() of one returns 0). A raw
 * syscall(SYS_close_range, ...) is not seen. */
#define SHIM_FDS 5

/* The shim's descriptors, ascending (-1 for those not open). */
static void shim_fds(int fds[SHIM_FDS])
{
    int mine[SHIM_FDS] = {__atomic_load_n(&shim.ctl_fd, __ATOMIC_ACQUIRE),
                          __atomic_load_n(&shim.agent_fd, __ATOMIC_ACQUIRE), shim.self_pidfd, shim.uffd_ref,
                          shim.exec_pidfd};
    for (int i = 0; i < SHIM_FDS; i++) {
        int j = i;
        for (; j > 0 && fds[j - 1] > mine[i]; j--)
            fds[j] = fds[j - 1];
        fds[j] = mine[i];
    }
}

static int shim_owns(int fd)
{
    if (fd < 0)
        return 0;
    int fds[SHIM_FDS];   /* (below HIGH_FD_BASE too: under a low RLIMIT_NOFILE they stay where they were made) */
    shim_fds(fds);
    for (int i = 0; i < SHIM_FDS; i++)
        if (fd == fds[i])
            return 1;
    return 0;
}

typedef int (*close_fn)(int);

EXPORT int close(int fd)
{
    static close_fn next_close;   /* libc's (a cancellation point), or a later interposer's */
    if (shim_owns(fd))
        return 0;   /* (not EBADF: some programs assert that what they close was open) */
    if (!next_close)
        next_close = (close_fn)dlsym(RTLD_NEXT, "close");
    return next_close ? next_close(fd) : raw_close(fd);
}

/* close_range(2) over [first, last], in pieces around the shim's descriptors. */
EXPORT int close_range(unsigned int first, unsigned int last, int flags)
{
    int fds[SHIM_FDS];
    shim_fds(fds);
    unsigned int from = first;
    for (int i = 0; i < SHIM_FDS && first <= last; i++) {
        if (fds[i] < 0 || (unsigned int)fds[i] < from || (unsigned int)fds[i] > last)
            continue;
        unsigned int fd = (unsigned int)fds[i];
        if (fd > from && syscall(SYS_close_range, from, fd - 1, flags) < 0)
            return -1;
        if (fd == last)
            return 0;
        from = fd + 1;
    }
    return (int)syscall(SYS_close_range, from, last, flags);
}

EXPORT void closefrom(int lowfd)
{
    unsigned int first = lowfd < 0 ? 0 : (unsigned int)lowfd;
    if (close_range(first, ~0U, 0) == 0)
        return;
    /* No close_range (ENOSYS, or a seccomp filter's EPERM): one by one, as
     * glibc falls back to, up to the descriptor limit. */
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY || limit.rlim_cur > INT_MAX)
        limit.rlim_cur = 1 << 20;
    for (unsigned int fd = first; fd < limit.rlim_cur; fd++)
        if (!shim_owns((int)fd))
            raw_close((int)fd);
}

/* Application hints (README "Hints", declared in umgr.h). Like madvise(2):
 * 0 on success, else -1 with errno set: EINVAL (unknown advice, unaligned
 * addr), ENOMEM (part of the range is not managed; the rest is advised),
 * ENOTCONN (this process is not managed: no daemon), ETIMEDOUT (the daemon
 * did not answer within shim.ack_timeout; the hint may take effect later).
 * A hint is advisory: COLD and WILLNEED take effect in the background
 * after the call returns;
 * DISCARDABLE has taken effect when it returns (a later write to a page
 * keeps that page). */
EXPORT int umgr_advise(void *addr, size_t length, int advice)
{
    int status = ENOTCONN;
    if (shim.active) {
        struct umgr_advise msg;
        memset(&msg, 0, sizeof msg);
        fill_hdr(&msg.hdr, UMGR_ADVISE, sizeof msg);
        msg.start = (uintptr_t)addr;
        msg.length = length;
        msg.advice = (uint32_t)advice;
        status = control_request(&msg, sizeof msg);
        if (status == -2)
            status = ETIMEDOUT;
        else if (status < 0)
            status = ENOTCONN;
    }
    if (status == 0)
        return 0;
    errno = status;
    return -1;
}

EXPORT int umgr_is_managed(void)
{
    return shim.active;
}
