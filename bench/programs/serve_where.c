/* Where a fault is served: a thread woken for it, or the faulting thread.
 * For bench/bench_faults.py --procs.
 *
 *   serve_where PROCS PAGES BUDGET OPS thread|sigbus FILE
 *
 * PROCS processes at once, each with PAGES pages of its own in FILE (made
 * and filled by the parent: page i of process k starts with k and i),
 * registered MISSING on a uffd of its own, of which at most BUDGET are
 * resident: past that the oldest is dropped (MADV_DONTNEED, no event).
 * Each process reads OPS uniformly random pages and checks each; a page not
 * resident faults and is served from FILE (one 4 KiB O_DIRECT pread, then
 * UFFDIO_COPY):
 *   thread  by a handler thread of the process, asleep in read(2) on the
 *           uffd: the faulting thread wakes it and is woken by its copy,
 *           as a daemon's service thread is woken (a thread of another
 *           process costs the same wake-ups);
 *   sigbus  by the faulting thread itself, in its SIGBUS handler
 *           (UFFD_FEATURE_SIGBUS): no wake-up, as kernel swap serves a
 *           fault on the faulting thread's own time.
 * FILE is written when it does not have the size these take (else it is
 * the last run's, reused). Prints one JSON line: the slowest process's
 * seconds, all processes' faults, and the most microseconds a fault of any
 * process took, its time over its own faults (the resident hits and the
 * drops in between included: both modes have them).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

struct proc {
    int uffd, fd, index;
    uint8_t *region;
    size_t pages;
    off_t file_offset;   /* where this process's pages start in FILE */
    uint8_t *buf;        /* one page, aligned for O_DIRECT */
    long faults;
};

static struct proc self;

static void die(const char *what)
{
    perror(what);
    _exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* Serve the fault at addr: its page read from FILE and copied in. */
static void serve(uint64_t addr)
{
    uint64_t page = (addr - (uint64_t)self.region) / PAGE;
    if (pread(self.fd, self.buf, PAGE, self.file_offset + page * PAGE) != (ssize_t)PAGE)
        abort();
    struct uffdio_copy c = {.dst = addr & ~(PAGE - 1), .src = (uint64_t)self.buf, .len = PAGE};
    if (ioctl(self.uffd, UFFDIO_COPY, &c) && errno != EEXIST)
        abort();
    __atomic_add_fetch(&self.faults, 1, __ATOMIC_RELEASE);
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx)
{
    (void)sig, (void)ctx;
    uint64_t a = (uint64_t)info->si_addr;
    if (a < (uint64_t)self.region || a >= (uint64_t)self.region + self.pages * PAGE)
        abort();   /* a real SIGBUS */
    serve(a);
}

static void *handler(void *arg)
{
    (void)arg;
    struct uffd_msg msg;
    for (;;) {
        ssize_t n = read(self.uffd, &msg, sizeof msg);
        if (n < 0 && errno == EINTR)
            continue;
        if (n != sizeof msg)
            return NULL;   /* the uffd closed: done */
        if (msg.event == UFFD_EVENT_PAGEFAULT)
            serve(msg.arg.pagefault.address);
    }
}

static void run(int index, size_t pages, size_t budget, long ops, int sigbus, const char *file, int out)
{
    self.index = index;
    self.pages = pages;
    self.file_offset = (off_t)index * pages * PAGE;
    self.fd = open(file, O_RDONLY | O_DIRECT);
    if (self.fd < 0)
        die("open");
    if (posix_memalign((void **)&self.buf, PAGE, PAGE))
        die("posix_memalign");
    self.region = mmap(0, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (self.region == MAP_FAILED)
        die("mmap");
    self.uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
    if (self.uffd < 0)
        die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API, .features = sigbus ? UFFD_FEATURE_SIGBUS : 0};
    if (ioctl(self.uffd, UFFDIO_API, &api))
        die("UFFDIO_API");
    struct uffdio_register reg = {.range = {(uint64_t)self.region, pages * PAGE},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(self.uffd, UFFDIO_REGISTER, &reg))
        die("UFFDIO_REGISTER");
    pthread_t t;
    if (sigbus) {
        struct sigaction sa = {.sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO};
        if (sigaction(SIGBUS, &sa, 0))
            die("sigaction");
    } else if (pthread_create(&t, 0, handler, 0)) {
        die("pthread_create");
    }
    /* Resident pages in the order they came: a ring of BUDGET. */
    uint64_t *ring = calloc(budget, sizeof *ring);
    uint8_t *resident = calloc(pages, 1);
    if (!ring || !resident)
        die("calloc");
    size_t head = 0, count = 0;
    unsigned seed = 12345 + index;
    uint64_t t0 = now_ns();
    for (long op = 0; op < ops; op++) {
        uint64_t page = rand_r(&seed) % pages;
        volatile uint64_t *word = (uint64_t *)(self.region + page * PAGE);
        if (word[0] != ((uint64_t)index << 32 | page))
            fprintf(stderr, "process %d: page %lu reads %#lx\n", index, (unsigned long)page,
                    (unsigned long)word[0]), _exit(1);
        if (resident[page])
            continue;
        resident[page] = 1;
        if (count == budget) {   /* the oldest leaves */
            uint64_t old = ring[head];
            if (madvise(self.region + old * PAGE, PAGE, MADV_DONTNEED))
                die("madvise");
            resident[old] = 0;
            ring[head] = page;
            head = (head + 1) % budget;
        } else {
            ring[(head + count++) % budget] = page;
        }
    }
    double seconds = (now_ns() - t0) / 1e9;
    char line[128];
    int len = snprintf(line, sizeof line, "%.6f %ld\n", seconds,
                       __atomic_load_n(&self.faults, __ATOMIC_ACQUIRE));
    if (write(out, line, len) != len)
        die("write");
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s PROCS PAGES BUDGET OPS thread|sigbus FILE\n", argv[0]);
        return 2;
    }
    int procs = atoi(argv[1]);
    size_t pages = strtoul(argv[2], 0, 0), budget = strtoul(argv[3], 0, 0);
    long ops = atol(argv[4]);
    int sigbus = !strcmp(argv[5], "sigbus");
    const char *file = argv[6];
    if (procs < 1 || !pages || !budget || budget > pages || (!sigbus && strcmp(argv[5], "thread"))) {
        fprintf(stderr, "serve_where: bad arguments\n");
        return 2;
    }
    /* The file: each process's pages, page i of process k starting with k << 32 | i. */
    int fd = open(file, O_RDWR | O_CREAT, 0600);
    if (fd < 0)
        die("open FILE");
    struct stat st;
    if (fstat(fd, &st))
        die("fstat FILE");
    if ((uint64_t)st.st_size != (uint64_t)procs * pages * PAGE) {
        if (ftruncate(fd, 0))
            die("ftruncate FILE");
        uint8_t *page = calloc(1, PAGE);
        if (!page)
            die("calloc");
        for (int k = 0; k < procs; k++)
            for (size_t i = 0; i < pages; i++) {
                *(uint64_t *)page = (uint64_t)k << 32 | i;
                if (write(fd, page, PAGE) != (ssize_t)PAGE)
                    die("write FILE");
            }
        free(page);
    }
    fsync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
    int results[2];
    if (pipe(results))
        die("pipe");
    for (int k = 0; k < procs; k++)
        if (fork() == 0)
            run(k, pages, budget, ops, sigbus, file, results[1]);
    close(results[1]);
    double slowest = 0, worst_us = 0;
    long faults = 0;
    FILE *in = fdopen(results[0], "r");
    double seconds;
    long n;
    int got = 0;
    while (fscanf(in, "%lf %ld", &seconds, &n) == 2) {
        slowest = seconds > slowest ? seconds : slowest;
        if (n > 0 && seconds * 1e6 / n > worst_us)
            worst_us = seconds * 1e6 / n;
        faults += n;
        got++;
    }
    int failed = 0, status;
    while (wait(&status) > 0)
        failed |= !WIFEXITED(status) || WEXITSTATUS(status);
    if (failed || got != procs) {
        fprintf(stderr, "serve_where: a process failed\n");
        return 1;
    }
    printf("{\"mode\": \"%s\", \"procs\": %d, \"seconds\": %.6f, \"faults\": %ld, \"us_per_fault\": %.2f}\n",
           argv[5], procs, slowest, faults, worst_us);
    return 0;
}
