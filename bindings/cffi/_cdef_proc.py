"""Another process's memory: process_vm_readv/writev, process_madvise,
pidfds, madvise, and the PAGEMAP_SCAN ioctl of /proc/PID/pagemap.

Vectored calls take two arrays (remote address, length) and loop in C: the
kernel takes at most IOV_MAX (1024) iovecs per call and silently caps a
call's total at MAX_RW_COUNT (2 GiB - 4 KiB), so the loop sends at most
1024 iovecs and 1 GiB per call and resumes after a short count. Syscalls go
through syscall(2) with their x86_64 numbers where glibc 2.36 has no wrapper.
PAGEMAP_SCAN (Linux 6.7) is defined from upstream include/uapi/linux/fs.h.
Helpers return the result or -errno.
"""

INCLUDES = """
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/random.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <linux/fs.h>
#include "pagehash.h"   /* bindings/shim/: the agent hashes with the same function */
"""

TYPES = """
struct page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

struct pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

#define PAGEMAP_SCAN ...
#define PM_SCAN_WP_MATCHING ...
#define PM_SCAN_CHECK_WPASYNC ...
#define PAGE_IS_WPALLOWED ...
#define PAGE_IS_WRITTEN ...
#define PAGE_IS_FILE ...
#define PAGE_IS_PRESENT ...
#define PAGE_IS_SWAPPED ...
#define PAGE_IS_PFNZERO ...
#define PAGE_IS_HUGE ...
#define PAGE_IS_SOFT_DIRTY ...

#define UMGR_IOV_MAX ...
"""

FUNCTIONS = """
int64_t umgr_process_vm_readv(int pid, uint64_t local, const uint64_t *addrs,
                              const uint64_t *lens, size_t n);
int64_t umgr_process_vm_writev(int pid, uint64_t local, const uint64_t *addrs,
                               const uint64_t *lens, size_t n);
int64_t umgr_process_madvise(int pidfd, const uint64_t *addrs,
                             const uint64_t *lens, size_t n, int advice);
int umgr_madvise(uint64_t addr, uint64_t len, int advice);
int umgr_pidfd_open(int pid, unsigned int flags);
int umgr_pidfd_getfd(int pidfd, int fd, unsigned int flags);
int umgr_pidfd_send_signal(int pidfd, int sig, unsigned int flags);
int64_t umgr_pagemap_scan(int fd, struct pm_scan_arg *arg);
int64_t umgr_mem_readv(int memfd, uint64_t local, const uint64_t *addrs,
                       const uint64_t *lens, size_t n);
int64_t umgr_checked_readv(int pid, int memfd, uint64_t canary, uint64_t local,
                           const uint64_t *addrs, const uint64_t *lens, size_t n);
void umgr_zero_pages(uint64_t base, int count, uint8_t *zero);
void umgr_page_hashes(uint64_t base, size_t count, uint64_t *out);
int64_t umgr_pagemap_runs(int fd, const int64_t *starts, const int64_t *lengths, int n, uint64_t *out);
"""

CUSTOMIZATIONS = """
/* umgr_page_hash of each of `count` pages from `base`: what MOVE_OUT sends. */
static void umgr_page_hashes(uint64_t base, size_t count, uint64_t *out)
{
    for (size_t i = 0; i < count; i++)
        out[i] = umgr_page_hash((const char *)(uintptr_t)base + i * UMGR_HASH_PAGE);
}

#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif

/* Upstream include/uapi/linux/fs.h, Linux 6.7. */
#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED  (1 << 0)
#define PAGE_IS_WRITTEN    (1 << 1)
#define PAGE_IS_FILE       (1 << 2)
#define PAGE_IS_PRESENT    (1 << 3)
#define PAGE_IS_SWAPPED    (1 << 4)
#define PAGE_IS_PFNZERO    (1 << 5)
#define PAGE_IS_HUGE       (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)
struct page_region {
    __u64 start;
    __u64 end;
    __u64 categories;
};
#define PM_SCAN_WP_MATCHING   (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
struct pm_scan_arg {
    __u64 size;
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end;
    __u64 vec;
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};
#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

#define UMGR_IOV_MAX 1024
#define UMGR_CALL_BYTES (1ULL << 30)

enum umgr_iov_op { UMGR_VM_READ, UMGR_VM_WRITE, UMGR_MADVISE };

/* Walks (addrs[i], lens[i]) from entry *i, byte *off of it; fills at most
   UMGR_IOV_MAX iovecs and UMGR_CALL_BYTES bytes (but at least one entry). */
static size_t umgr_fill_iov(struct iovec *iov, const uint64_t *addrs,
                            const uint64_t *lens, size_t n, size_t i,
                            uint64_t off, uint64_t *bytes)
{
    size_t k = 0;
    uint64_t want = 0;
    for (; i + k < n && k < UMGR_IOV_MAX; k++) {
        uint64_t skip = k == 0 ? off : 0;
        uint64_t len = lens[i + k] - skip;
        if (k > 0 && want + len > UMGR_CALL_BYTES)
            break;
        iov[k].iov_base = (void *)(uintptr_t)(addrs[i + k] + skip);
        iov[k].iov_len = len;
        want += len;
    }
    *bytes = want;
    return k;
}

/* Returns the bytes done, or -errno when nothing was done. A short count
   is resumed where it stopped: a real failure then shows as an error on the
   next call, which ends the loop with the count so far. */
static int64_t umgr_iov_loop(enum umgr_iov_op op, int pid, uint64_t local,
                             const uint64_t *addrs, const uint64_t *lens,
                             size_t n, int advice)
{
    struct iovec riov[UMGR_IOV_MAX], liov;
    int64_t total = 0;
    size_t i = 0;
    uint64_t off = 0;

    while (i < n) {
        uint64_t want;
        size_t k = umgr_fill_iov(riov, addrs, lens, n, i, off, &want);
        ssize_t r;
        if (want == 0) {
            i += k;
            off = 0;
            continue;
        }
        liov.iov_base = (void *)(uintptr_t)(local + (uint64_t)total);
        liov.iov_len = want;
        if (op == UMGR_VM_READ)
            r = process_vm_readv(pid, &liov, 1, riov, k, 0);
        else if (op == UMGR_VM_WRITE)
            r = process_vm_writev(pid, &liov, 1, riov, k, 0);
        else
            r = syscall(SYS_process_madvise, pid, riov, k, advice, 0);
        if (r < 0)
            return total ? total : -errno;
        if (r == 0)
            return total;
        total += r;
        for (uint64_t adv = (uint64_t)r; adv > 0 && i < n;) {
            uint64_t rest = lens[i] - off;
            if (adv >= rest) {
                adv -= rest;
                i++;
                off = 0;
            } else {
                off += adv;
                adv = 0;
            }
        }
    }
    return total;
}

static int64_t umgr_process_vm_readv(int pid, uint64_t local,
                                     const uint64_t *addrs,
                                     const uint64_t *lens, size_t n)
{
    return umgr_iov_loop(UMGR_VM_READ, pid, local, addrs, lens, n, 0);
}

static int64_t umgr_process_vm_writev(int pid, uint64_t local,
                                      const uint64_t *addrs,
                                      const uint64_t *lens, size_t n)
{
    return umgr_iov_loop(UMGR_VM_WRITE, pid, local, addrs, lens, n, 0);
}

static int64_t umgr_process_madvise(int pidfd, const uint64_t *addrs,
                                    const uint64_t *lens, size_t n, int advice)
{
    return umgr_iov_loop(UMGR_MADVISE, pidfd, 0, addrs, lens, n, advice);
}

static int umgr_madvise(uint64_t addr, uint64_t len, int advice)
{
    return madvise((void *)(uintptr_t)addr, len, advice) < 0 ? -errno : 0;
}

static int umgr_pidfd_open(int pid, unsigned int flags)
{
    long fd = syscall(SYS_pidfd_open, pid, flags);
    return fd < 0 ? -errno : (int)fd;
}

static int umgr_pidfd_getfd(int pidfd, int fd, unsigned int flags)
{
    long r = syscall(SYS_pidfd_getfd, pidfd, fd, flags);
    return r < 0 ? -errno : (int)r;
}

static int umgr_pidfd_send_signal(int pidfd, int sig, unsigned int flags)
{
    return syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, flags) < 0
        ? -errno : 0;
}

static int64_t umgr_pagemap_scan(int fd, struct pm_scan_arg *arg)
{
    long r = ioctl(fd, PAGEMAP_SCAN, arg);
    return r < 0 ? -errno : r;
}

/* Reads the remote ranges, back to back, through an open /proc/PID/mem:
   one pread per range (the file offset is the remote address). The file
   holds the mm it was opened on: once that mm is gone (exit, exec) a read
   returns 0, never another program's memory. Returns the bytes read, or
   -errno when nothing was; stops at the first short or failed range. */
static int64_t umgr_mem_readv(int memfd, uint64_t local, const uint64_t *addrs,
                              const uint64_t *lens, size_t n)
{
    int64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t done = 0;
        while (done < lens[i]) {
            uint64_t want = lens[i] - done;
            if (want > UMGR_CALL_BYTES)
                want = UMGR_CALL_BYTES;
            ssize_t r = pread(memfd, (void *)(uintptr_t)(local + (uint64_t)total),
                              want, (off_t)(addrs[i] + done));
            if (r < 0)
                return total ? total : -errno;
            total += r;
            done += (uint64_t)r;
            if ((uint64_t)r < want)
                return total;
        }
    }
    return total;
}

/* process_vm_readv, proven to read the mm the daemon checked at attach. A
   pid is only a number: once its process has exec'd (a setuid program, say)
   or the number is reused, process_vm_readv reads another program. So a
   fresh random token is first written through memfd (/proc/PID/mem opened
   at attach, which only ever reaches that mm) at `canary`, a private page
   the shim set aside, and each process_vm_readv call reads the token back
   ahead of the ranges: one call reads one mm, so ranges that came with the
   token came from the mm that holds it. Returns the bytes of the ranges
   read (a short count where a range failed, as process_vm_readv); -EXDEV
   when the token could not be written or did not come back (what was read
   is wiped: it may be another program's memory); -ESRCH when the mm or the
   process is gone. */
static int64_t umgr_checked_readv(int pid, int memfd, uint64_t canary, uint64_t local,
                                  const uint64_t *addrs, const uint64_t *lens, size_t n)
{
    unsigned char token[16], seen[16];
    if (getrandom(token, sizeof token, 0) != (ssize_t)sizeof token)
        return -EXDEV;
    ssize_t w = pwrite(memfd, token, sizeof token, (off_t)canary);
    if (w == 0)
        return -ESRCH; /* the mm has no users left: the process exited or exec'd */
    if (w != (ssize_t)sizeof token)
        return -EXDEV;
    struct iovec riov[UMGR_IOV_MAX], liov[2];
    int64_t total = 0;
    for (size_t i = 0; i < n;) {
        size_t k = 0;
        uint64_t want = 0;
        riov[0] = (struct iovec){(void *)(uintptr_t)canary, sizeof token};
        for (; i + k < n && k + 1 < UMGR_IOV_MAX; k++) {
            riov[k + 1] = (struct iovec){(void *)(uintptr_t)addrs[i + k], lens[i + k]};
            want += lens[i + k];
        }
        liov[0] = (struct iovec){seen, sizeof seen};
        liov[1] = (struct iovec){(void *)(uintptr_t)(local + (uint64_t)total), want};
        ssize_t r = process_vm_readv(pid, liov, 2, riov, k + 1, 0);
        if (r < 0 && errno == ESRCH)
            return -ESRCH;
        if (r < (ssize_t)sizeof token || memcmp(seen, token, sizeof token) != 0) {
            memset((void *)(uintptr_t)local, 0, (size_t)total + (r > (ssize_t)sizeof token ? (size_t)r - sizeof token : 0));
            return -EXDEV;
        }
        r -= (ssize_t)sizeof token;
        total += r;
        if ((uint64_t)r < want)
            return total;
        i += k;
    }
    return total;
}

/* zero[i] = whether the i-th of `count` pages from base is all zero. A
   page stops at its first nonzero word: most pages read out of a process
   are not zero, and a whole-buffer scan (numpy's any per row) read all
   2 MiB of an eviction batch every time. */
/* The /proc/PID/pagemap entries (fd) of the pages of each run (first vpn,
   page count) into out, in order, a pread a run: returns how many were
   read (fewer at a short read: the process has exited), or -errno. */
static int64_t umgr_pagemap_runs(int fd, const int64_t *starts, const int64_t *lengths, int n, uint64_t *out)
{
    int64_t done = 0;
    for (int i = 0; i < n; i++) {
        size_t want = (size_t)lengths[i] * 8;
        ssize_t got;
        do
            got = pread(fd, out + done, want, (off_t)starts[i] * 8);
        while (got < 0 && errno == EINTR);
        if (got < 0)
            return -errno;
        done += got / 8;
        if ((size_t)got != want)
            return done;
    }
    return done;
}

static void umgr_zero_pages(uint64_t base, int count, uint8_t *zero)
{
    for (int i = 0; i < count; i++) {
        const uint64_t *words = (const uint64_t *)(uintptr_t)(base + (uint64_t)i * 4096);
        int k = 0;
        for (; k < 512; k += 16) {   /* a cache line and the next, or-ed: no branch per word */
            uint64_t any = 0;
            for (int j = 0; j < 16; j++)
                any |= words[k + j];
            if (any)
                break;
        }
        zero[i] = k >= 512;
    }
}
"""
