/* The cost floor of a fault served from userspace: a minimal C userfaultfd
 * handler with no I/O and no bookkeeping.
 *
 * Usage: floor MIB PAGES_PER_COPY [any|same|cross|spin]
 *
 * mmaps MIB MiB of anonymous memory, registers it MISSING with a uffd, and
 * starts a handler thread that serves each missing fault with one
 * UFFDIO_COPY of PAGES_PER_COPY pattern pages (the faulting page and the
 * ones after it, clipped to the region). The main thread makes one
 * sequential read pass over the region, summing one word per 64 bytes, so
 * every fault comes from that pass; the sum is checked (exit 1 on mismatch).
 *
 * Placement of the two threads:
 *   any    no pinning: the scheduler decides (the handler sleeps in read())
 *   same   both pinned to CPU 0: a fault is a context switch
 *   cross  main on CPU 0, handler on CPU 1: each fault wakes an idle vCPU
 *   spin   as cross, but the handler busy-polls a non-blocking uffd instead
 *          of sleeping (no wake-up IPI; burns a CPU)
 *
 * Prints one JSON line: {"mib","pages_per_copy","mode","faults","pass_s",
 * "us_per_fault","pages_per_s","ok"}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
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

#define PAGE 4096
#define STRIDE_WORDS 8

static int uffd;
static uint8_t *region, *src;
static size_t region_len;
static size_t per_copy;
static int spin;
static long faults;

static inline uint64_t word_for(uint64_t word)
{
    return (word * 0xBF58476D1CE4E5B9ull) ^ 0x5555555555555555ull;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set)) {
        perror("floor: sched_setaffinity");
        exit(2);
    }
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void serve(uint64_t address)
{
    uint64_t dst = address & ~(uint64_t)(PAGE - 1);
    uint64_t end = (uint64_t)(uintptr_t)region + region_len;
    uint64_t len = (uint64_t)per_copy * PAGE;
    if (dst + len > end)
        len = end - dst;
    struct uffdio_copy copy = { .dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = 0 };
    if (ioctl(uffd, UFFDIO_COPY, &copy) == 0)
        return;
    if (errno == EEXIST || errno == EAGAIN) {
        /* Part of the range was present already: the faulting page is in. */
        struct uffdio_range range = { .start = dst, .len = PAGE };
        ioctl(uffd, UFFDIO_WAKE, &range);
        return;
    }
    die("floor: UFFDIO_COPY");
}

static void *handler(void *arg)
{
    int cpu = (int)(intptr_t)arg;
    if (cpu >= 0)
        pin(cpu);
    struct uffd_msg msgs[64];
    for (;;) {
        ssize_t n = read(uffd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue; /* spin mode: busy-poll */
            die("floor: read uffd");
        }
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            __atomic_fetch_add(&faults, 1, __ATOMIC_RELAXED);
            serve(msgs[i].arg.pagefault.address);
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: floor MIB PAGES_PER_COPY [any|same|cross|spin]\n");
        return 2;
    }
    size_t mib = strtoull(argv[1], NULL, 10);
    per_copy = strtoull(argv[2], NULL, 10);
    const char *mode = argc > 3 ? argv[3] : "any";
    if (!mib || !per_copy) {
        fprintf(stderr, "floor: MIB and PAGES_PER_COPY must be positive\n");
        return 2;
    }
    int main_cpu = -1, handler_cpu = -1;
    if (!strcmp(mode, "same"))
        main_cpu = handler_cpu = 0;
    else if (!strcmp(mode, "cross"))
        main_cpu = 0, handler_cpu = 1;
    else if (!strcmp(mode, "spin"))
        main_cpu = 0, handler_cpu = 1, spin = 1;
    else if (strcmp(mode, "any")) {
        fprintf(stderr, "floor: unknown mode %s\n", mode);
        return 2;
    }

    region_len = mib << 20;
    size_t npages = region_len / PAGE;
    region = mmap(NULL, region_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    src = mmap(NULL, per_copy * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (region == MAP_FAILED || src == MAP_FAILED)
        die("floor: mmap");
    for (size_t p = 0; p < per_copy; p++)
        for (size_t w = 0; w < PAGE / 8; w++)
            ((uint64_t *)(src + p * PAGE))[w] = word_for(w);

    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | (spin ? O_NONBLOCK : 0));
    if (uffd < 0)
        die("floor: userfaultfd");
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    if (ioctl(uffd, UFFDIO_API, &api))
        die("floor: UFFDIO_API");
    struct uffdio_register reg = {
        .range = { .start = (uint64_t)(uintptr_t)region, .len = region_len },
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg))
        die("floor: UFFDIO_REGISTER");

    if (main_cpu >= 0)
        pin(main_cpu);
    pthread_t thread;
    if (pthread_create(&thread, NULL, handler, (void *)(intptr_t)handler_cpu))
        die("floor: pthread_create");
    usleep(10000); /* let the handler reach its first read() */

    uint64_t per_page = 0;
    for (size_t w = 0; w < PAGE / 8; w += STRIDE_WORDS)
        per_page += word_for(w);
    double t0 = now();
    uint64_t sum = 0;
    for (size_t p = 0; p < npages; p++) {
        const volatile uint64_t *words = (const volatile uint64_t *)(region + p * PAGE);
        for (size_t w = 0; w < PAGE / 8; w += STRIDE_WORDS)
            sum += words[w];
    }
    double pass = now() - t0;
    long n = __atomic_load_n(&faults, __ATOMIC_RELAXED);
    int ok = sum == per_page * npages;
    if (!ok)
        fprintf(stderr, "floor: checksum %016" PRIx64 ", want %016" PRIx64 "\n", sum, per_page * npages);
    printf("{\"mib\": %zu, \"pages_per_copy\": %zu, \"mode\": \"%s\", \"faults\": %ld, \"pass_s\": %.6f, "
           "\"us_per_fault\": %.3f, \"pages_per_s\": %.0f, \"ok\": %s}\n",
           mib, per_copy, mode, n, pass, n ? pass / n * 1e6 : 0.0, npages / pass, ok ? "true" : "false");
    fflush(stdout);
    _exit(ok ? 0 : 1); /* the handler thread is still in read() */
}
