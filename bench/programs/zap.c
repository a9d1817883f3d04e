/* Eviction (zap) throughput: MADV_DONTNEED of 512-page batches in several
 * shapes, on a range registered with a userfaultfd that reports REMOVE
 * events, as umgr's agent thread does it.
 *
 * Usage: zap READER TRIALS
 *
 * READER says who reads the REMOVE events, on which the zapping thread
 * blocks (one event per iovec or madvise call, each waited for in turn):
 *   none      no userfaultfd at all: the kernel's zap cost alone
 *   thread    a C thread of this process, blocking in read()
 *   external  another process (bench_zap.py, as the umgr daemon does). The
 *             program prints {"pid","uffd","region","length"} on a line,
 *             and waits for a line on stdin; meanwhile the reader takes the
 *             uffd with pidfd_getfd, calls UFFDIO_API with EVENT_REMOVE and
 *             registers the region MISSING|WP.
 *
 * Batch shapes (512 pages each):
 *   contiguous  one process_madvise iovec of 512 pages
 *   clustered   one process_madvise, 8 iovecs of 64-page runs (runs apart)
 *   scattered   one process_madvise, 512 iovecs of one page (pages apart)
 *   madvise     512 madvise() calls of one page (the same scattered pages)
 *
 * Before each batch its pages are populated (UFFDIO_COPY on a registered
 * range, plain writes otherwise; not timed). After the first batch of each
 * shape mincore() must show every page gone. Prints one JSON line:
 * {"reader","pidfd","shapes":{name:{"iovecs","trials","us":[...]}}}
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#define PIDFD_SELF_PROCESS (-10001) /* 6.15+ */

#define PAGE 4096
#define BATCH 512
#define REGION_PAGES (BATCH * 2)
#define WARMUP 5

static int uffd = -1;
static uint8_t *region, *pattern;
static long removes; /* thread reader */

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *reader(void *unused)
{
    (void)unused;
    struct uffd_msg msgs[64];
    for (;;) {
        ssize_t n = read(uffd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            die("zap: read uffd");
        }
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++)
            if (msgs[i].event == UFFD_EVENT_REMOVE)
                __atomic_fetch_add(&removes, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

struct shape {
    const char *name;
    int per_page_calls; /* madvise() per iovec instead of one process_madvise */
    int n;
    struct iovec iov[BATCH];
};

static void build(struct shape *s, const char *name, int run, int per_page_calls)
{
    /* runs of `run` pages, each followed by a gap of the same size */
    s->name = name;
    s->per_page_calls = per_page_calls;
    s->n = BATCH / run;
    for (int i = 0; i < s->n; i++) {
        s->iov[i].iov_base = region + (size_t)i * 2 * run * PAGE;
        s->iov[i].iov_len = (size_t)run * PAGE;
    }
}

static void populate(const struct shape *s)
{
    for (int i = 0; i < s->n; i++) {
        if (uffd < 0) {
            for (size_t off = 0; off < s->iov[i].iov_len; off += PAGE)
                ((volatile uint8_t *)s->iov[i].iov_base)[off] = 1;
            continue;
        }
        struct uffdio_copy copy = {
            .dst = (uint64_t)(uintptr_t)s->iov[i].iov_base,
            .src = (uint64_t)(uintptr_t)pattern,
            .len = s->iov[i].iov_len,
        };
        while (ioctl(uffd, UFFDIO_COPY, &copy)) {
            if (errno == EAGAIN) { /* an event is still being read */
                if (copy.copy > 0) {
                    copy.dst += copy.copy, copy.src += copy.copy, copy.len -= copy.copy;
                }
                copy.copy = 0;
                continue;
            }
            if (errno == EEXIST)
                break;
            die("zap: UFFDIO_COPY");
        }
    }
}

static int self_pidfd(void)
{
    struct iovec probe = { 0 };
    if (syscall(SYS_process_madvise, PIDFD_SELF_PROCESS, &probe, 1, MADV_DONTNEED, 0) >= 0)
        return PIDFD_SELF_PROCESS;
    int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    if (fd < 0)
        die("zap: pidfd_open");
    return fd;
}

static void zap(const struct shape *s, int pidfd)
{
    if (s->per_page_calls) {
        for (int i = 0; i < s->n; i++)
            if (madvise(s->iov[i].iov_base, s->iov[i].iov_len, MADV_DONTNEED))
                die("zap: madvise");
        return;
    }
    size_t want = 0;
    for (int i = 0; i < s->n; i++)
        want += s->iov[i].iov_len;
    long done = syscall(SYS_process_madvise, pidfd, s->iov, (size_t)s->n, MADV_DONTNEED, 0);
    if (done < 0)
        die("zap: process_madvise");
    if ((size_t)done != want) {
        fprintf(stderr, "zap: process_madvise did %ld of %zu bytes\n", done, want);
        exit(2);
    }
}

static void check_gone(const struct shape *s)
{
    unsigned char vec[BATCH];
    for (int i = 0; i < s->n; i++) {
        size_t pages = s->iov[i].iov_len / PAGE;
        if (mincore(s->iov[i].iov_base, s->iov[i].iov_len, vec))
            die("zap: mincore");
        for (size_t p = 0; p < pages; p++)
            if (vec[p] & 1) {
                fprintf(stderr, "zap: %s: page %p still resident after the zap\n", s->name,
                        (uint8_t *)s->iov[i].iov_base + p * PAGE);
                exit(1);
            }
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: zap none|thread|external TRIALS\n");
        return 2;
    }
    const char *mode = argv[1];
    int trials = atoi(argv[2]);
    if (trials < 1 || (strcmp(mode, "none") && strcmp(mode, "thread") && strcmp(mode, "external"))) {
        fprintf(stderr, "zap: bad arguments\n");
        return 2;
    }
    size_t length = (size_t)REGION_PAGES * PAGE;
    region = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pattern = mmap(NULL, (size_t)BATCH * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED || pattern == MAP_FAILED)
        die("zap: mmap");
    memset(pattern, 0x5a, (size_t)BATCH * PAGE);

    if (!strcmp(mode, "thread")) {
        uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
        if (uffd < 0)
            die("zap: userfaultfd");
        struct uffdio_api api = { .api = UFFD_API, .features = UFFD_FEATURE_EVENT_REMOVE };
        if (ioctl(uffd, UFFDIO_API, &api))
            die("zap: UFFDIO_API");
        struct uffdio_register reg = {
            .range = { .start = (uint64_t)(uintptr_t)region, .len = length },
            .mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
        };
        if (ioctl(uffd, UFFDIO_REGISTER, &reg))
            die("zap: UFFDIO_REGISTER");
        pthread_t t;
        if (pthread_create(&t, NULL, reader, NULL))
            die("zap: pthread_create");
    } else if (!strcmp(mode, "external")) {
        /* The reader process does UFFDIO_API and UFFDIO_REGISTER. */
        uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
        if (uffd < 0)
            die("zap: userfaultfd");
        printf("{\"pid\": %d, \"uffd\": %d, \"region\": %lu, \"length\": %zu}\n", getpid(), uffd,
               (unsigned long)(uintptr_t)region, length);
        fflush(stdout);
        char line[16];
        if (!fgets(line, sizeof line, stdin))
            die("zap: no go from the reader");
    }

    int pidfd = self_pidfd();
    static struct shape shapes[4];
    build(&shapes[0], "contiguous", BATCH, 0);
    build(&shapes[1], "clustered", 64, 0);
    build(&shapes[2], "scattered", 1, 0);
    build(&shapes[3], "madvise", 1, 1);

    double *us = calloc((size_t)trials, sizeof *us);
    long *events = calloc(4, sizeof *events);
    printf("{\"reader\": \"%s\", \"pidfd\": \"%s\", \"batch_pages\": %d, \"shapes\": {", mode,
           pidfd == PIDFD_SELF_PROCESS ? "PIDFD_SELF" : "pidfd_open", BATCH);
    for (int k = 0; k < 4; k++) {
        const struct shape *s = &shapes[k];
        for (int t = 0; t < WARMUP; t++) {
            populate(s);
            zap(s, pidfd);
            if (t == 0)
                check_gone(s);
        }
        long before = __atomic_load_n(&removes, __ATOMIC_RELAXED);
        for (int t = 0; t < trials; t++) {
            populate(s);
            double t0 = now();
            zap(s, pidfd);
            us[t] = (now() - t0) * 1e6;
        }
        events[k] = __atomic_load_n(&removes, __ATOMIC_RELAXED) - before;
        printf("%s\"%s\": {\"iovecs\": %d, \"calls\": %d, \"trials\": %d, \"warmup\": %d, \"events\": %ld, \"us\": [",
               k ? ", " : "", s->name, s->n, s->per_page_calls ? s->n : 1, trials, WARMUP, events[k]);
        for (int t = 0; t < trials; t++)
            printf("%s%.2f", t ? ", " : "", us[t]);
        printf("]}");
    }
    printf("}}\n");
    fflush(stdout);
    _exit(0); /* the reader thread is still in read() */
}
