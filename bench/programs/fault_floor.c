/* Fault-service floor for bench/bench_faults.py.
 *
 * As a program:  fault_floor PAGES PAGES_PER_FAULT same|any REPS
 *   Per rep: mmap PAGES anonymous pages, register them MISSING with a
 *   (blocking) uffd, start a handler thread that reads uffd messages (up to
 *   64 per read) and serves each fault with one UFFDIO_COPY of
 *   PAGES_PER_FAULT pages from a source buffer (clipped to the region);
 *   the main thread touches every page sequentially. Prints one line per
 *   rep: microseconds per fault of the touch pass, the number of faults, and
 *   the handler thread's CPU time (user + system) in microseconds per fault.
 *   same: both threads pinned to CPU 0; any: the scheduler decides;
 *   sigbus: no handler thread: the uffd has UFFD_FEATURE_SIGBUS, so each
 *   fault raises SIGBUS in the touching thread, whose handler serves it
 *   with the same UFFDIO_COPY (what serving a fault in the faulting thread,
 *   with no wake-up of another, costs at the least; the CPU column is then
 *   the toucher's own).
 *
 * As a shared library (-shared -fPIC): umgr_touch(addr, pages) is the same
 *   toucher, for a Python handler; it returns the pass in nanoseconds and
 *   runs with the GIL released (cffi releases it around calls).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

uint64_t umgr_touch(volatile uint8_t *addr, size_t pages)
{
    uint64_t t0 = now_ns();
    unsigned sum = 0;
    for (size_t i = 0; i < pages; i++)
        sum += addr[i * PAGE];
    uint64_t t = now_ns() - t0;
    if (sum == 0xFFFFFFFFu)   /* keep the reads */
        fprintf(stderr, "?\n");
    return t;
}

struct handler {
    int uffd;
    uint8_t *region, *src;
    size_t len, per_fault;
    long faults;
    uint64_t cpu_ns;
};

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void *serve(void *arg)
{
    struct handler *h = arg;
    uint64_t cpu0 = thread_cpu_ns();
    struct uffd_msg msgs[64];
    size_t done = 0;
    uint64_t end = (uint64_t)h->region + h->len;
    while (done < h->len) {
        ssize_t n = read(h->uffd, msgs, sizeof msgs);
        if (n < 0)
            die("read uffd");
        for (size_t i = 0; i < n / sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t a = msgs[i].arg.pagefault.address & ~(PAGE - 1);
            uint64_t l = h->per_fault * PAGE;
            if (a + l > end)
                l = end - a;
            struct uffdio_copy c = {.dst = a, .src = (uint64_t)h->src, .len = l, .mode = 0};
            if (ioctl(h->uffd, UFFDIO_COPY, &c) && c.copy <= 0)
                die("UFFDIO_COPY");
            done += c.copy;
            h->faults++;
        }
    }
    h->cpu_ns = thread_cpu_ns() - cpu0;
    return NULL;
}

/* The sigbus mode's state: one region at a time, one touching thread. */
static struct handler *sigbus_h;

static void serve_sigbus(int sig, siginfo_t *info, void *ctx)
{
    (void)sig, (void)ctx;
    struct handler *h = sigbus_h;
    uint64_t a = (uint64_t)info->si_addr & ~(PAGE - 1);
    uint64_t end = (uint64_t)h->region + h->len, l = h->per_fault * PAGE;
    if (a < (uint64_t)h->region || a >= end)
        abort();   /* not ours: a real SIGBUS */
    if (a + l > end)
        l = end - a;
    struct uffdio_copy c = {.dst = a, .src = (uint64_t)h->src, .len = l, .mode = 0};
    if (ioctl(h->uffd, UFFDIO_COPY, &c) && c.copy <= 0)
        abort();
    h->faults++;
}

static void pin0(void)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    if (sched_setaffinity(0, sizeof set, &set))
        die("sched_setaffinity");
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s PAGES PAGES_PER_FAULT same|any|sigbus REPS\n", argv[0]);
        return 2;
    }
    size_t pages = strtoul(argv[1], 0, 0), per_fault = strtoul(argv[2], 0, 0);
    int same = !strcmp(argv[3], "same"), sigbus = !strcmp(argv[3], "sigbus"), reps = atoi(argv[4]);
    if (sigbus) {
        struct sigaction sa = {.sa_sigaction = serve_sigbus, .sa_flags = SA_SIGINFO};
        if (sigaction(SIGBUS, &sa, 0))
            die("sigaction");
    }
    if (same)
        pin0();   /* the handler thread inherits the mask */
    uint8_t *src = mmap(0, per_fault * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(src, 0xA5, per_fault * PAGE);
    for (int r = 0; r < reps; r++) {
        struct handler h = {.src = src, .len = pages * PAGE, .per_fault = per_fault};
        h.region = mmap(0, h.len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (h.region == MAP_FAILED)
            die("mmap");
        h.uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
        if (h.uffd < 0)
            die("userfaultfd");
        struct uffdio_api api = {.api = UFFD_API, .features = sigbus ? UFFD_FEATURE_SIGBUS : 0};
        if (ioctl(h.uffd, UFFDIO_API, &api))
            die("UFFDIO_API");
        struct uffdio_register reg = {.range = {(uint64_t)h.region, h.len}, .mode = UFFDIO_REGISTER_MODE_MISSING};
        if (ioctl(h.uffd, UFFDIO_REGISTER, &reg))
            die("UFFDIO_REGISTER");
        uint64_t ns;
        if (sigbus) {
            sigbus_h = &h;
            uint64_t cpu0 = thread_cpu_ns();
            ns = umgr_touch(h.region, pages);
            h.cpu_ns = thread_cpu_ns() - cpu0;
        } else {
            pthread_t t;
            pthread_create(&t, 0, serve, &h);
            ns = umgr_touch(h.region, pages);
            pthread_join(t, 0);
        }
        printf("%.3f %ld %.3f\n", ns / 1e3 / h.faults, h.faults, h.cpu_ns / 1e3 / h.faults);
        close(h.uffd);
        munmap(h.region, h.len);
    }
    return 0;
}
