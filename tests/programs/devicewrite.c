/* A device writes pages while umgr evicts them: usage devicewrite [PAGES].
 *
 * A page pinned for I/O before the daemon write-protects it can be written
 * by the device after the daemon copied it (the write-protect bit stops the
 * CPU, not a device); if the pin is dropped before the agent's move, the
 * move succeeds. The page used to leave with its old copy.
 *
 * io_uring stands in for the device: PAGES pages (16 unless given, at
 * most MAX_BUFFER_PAGES) of a managed region are its registered buffer
 * (pinned), and a READ_FIXED from a pipe waits to fill them (the kernel copies into the pinned pages, as a DMA
 * does, past the page tables). The test stops umgr's agent thread
 * (ptrace), so that the move waits for it:
 *   1. "agent TID" on stdout, then wait for "go" on stdin (agent stopped);
 *   2. COLD on the buffer and FLANK pages each side, every 8th of which
 *      was discarded (so the move names many ranges, the buffer's pages
 *      far from the first): the daemon write-protects and copies them
 *      (salt 1), stores the copies and asks the agent to move them out;
 *   3. once that request waits on a socket of ours, the pipe's data (salt 9)
 *      goes into the buffer through the pin, and the buffer is unregistered
 *      (unpinned); "landed" on stdout, then wait for "resumed" (the agent
 *      runs again and moves the pages);
 *   4. the buffer must read salt 9, the rest as before; COLD again, wait
 *      until the buffer has left (mincore), and it must read salt 9 once
 *      more, from the store.
 * Exit 0 when every byte is right, 1 if not, 2 when the setup failed. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/sockios.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../../bindings/shim/umgr.h"
#include "salted.h"

#define REGION_PAGES 1024   /* 4 MiB: over --min-region, so managed */
#define FIRST 256           /* the buffer's first page */
#define MAX_BUFFER_PAGES 128   /* 512 KiB: one write fills it from the pipe */
#define FLANK 64            /* pages each side of it in the COLD range */
#define COLD_FIRST (FIRST - FLANK)
#define COLD_PAGES (FLANK + buffer_pages + FLANK)

static size_t buffer_pages = 16;

static void sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

static int agent_tid(void)
{
    DIR *tasks = opendir("/proc/self/task");
    struct dirent *task;
    int tid = 0;
    while (tasks && (task = readdir(tasks)) && !tid) {
        char path[300], comm[32] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", task->d_name);
        FILE *f = fopen(path, "r");
        if (f && fgets(comm, sizeof comm, f) && strcmp(comm, "umgr-agent\n") == 0)
            tid = atoi(task->d_name);
        if (f)
            fclose(f);
    }
    if (tasks)
        closedir(tasks);
    return tid;
}

/* Whether a socket of this process has a message waiting: the daemon's
 * request to the stopped agent. */
static int request_waiting(void)
{
    for (int fd = 0; fd < 1024; fd++) {
        struct stat st;
        int queued = 0;
        if (fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode) && ioctl(fd, SIOCINQ, &queued) == 0 && queued > 0)
            return 1;
    }
    return 0;
}

static int wait_for(const char *line)
{
    char got[64];
    return fgets(got, sizeof got, stdin) && strncmp(got, line, strlen(line)) == 0 ? 0 : -1;
}

/* The discarded pages of the flanks: every 8th. */
static int discarded(size_t page)
{
    return (page < FIRST || page >= FIRST + buffer_pages) && page >= COLD_FIRST && page < COLD_FIRST + COLD_PAGES &&
           page % 8 == 3;
}

/* 0 when the region reads as it should outside the buffer: salt 1, or
 * zeros where a flank's page was discarded. */
static int check_around(const uint64_t *m)
{
    int bad = 0;
    for (size_t p = 0; p < REGION_PAGES && !bad; p++)
        if (p < FIRST || p >= FIRST + buffer_pages)
            bad = check(m, p, 1, discarded(p) ? 0 : 1, "the region around the buffer");
    return bad;
}

static int resident_pages(void *addr, size_t npages)
{
    unsigned char vec[MAX_BUFFER_PAGES];
    if (npages > MAX_BUFFER_PAGES || mincore(addr, npages * PAGE, vec) != 0)
        return -1;
    int n = 0;
    for (size_t i = 0; i < npages; i++)
        n += vec[i] & 1;
    return n;
}

int main(int argc, char **argv)
{
    if (argc > 1)
        buffer_pages = strtoul(argv[1], NULL, 10);
    if (buffer_pages < 1 || buffer_pages > MAX_BUFFER_PAGES)
        return 2;
    uint64_t *m = mmap(NULL, REGION_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    /* The pipe's data, in a mapping under --min-region: never managed. */
    uint64_t *data = mmap(NULL, MAX_BUFFER_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED || data == MAP_FAILED || !umgr_advise)
        return 2;
    uint64_t *buffer = m + FIRST * WORDS;
    fill(m, 0, REGION_PAGES, 1);
    for (size_t w = 0; w < buffer_pages * WORDS; w++)
        data[w] = (FIRST * WORDS + w) ^ 9;

    struct io_uring ring;
    int pipe_fds[2];
    if (io_uring_queue_init(4, &ring, 0) != 0 || pipe(pipe_fds) != 0 ||
        fcntl(pipe_fds[1], F_SETPIPE_SZ, 1 << 20) < 0)
        return 2;
    struct iovec iov = {buffer, buffer_pages * PAGE};
    if (io_uring_register_buffers(&ring, &iov, 1) != 0)
        return 2;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    io_uring_prep_read_fixed(sqe, pipe_fds[0], buffer, buffer_pages * PAGE, 0, 0);
    if (io_uring_submit(&ring) != 1)
        return 2;

    for (size_t p = COLD_FIRST; p < COLD_FIRST + COLD_PAGES; p++)
        if (discarded(p) && madvise(m + p * WORDS, PAGE, MADV_DONTNEED) != 0)
            return 2;
    printf("agent %d\n", agent_tid());
    fflush(stdout);
    if (wait_for("go") != 0)
        return 2;
    if (umgr_advise(m + COLD_FIRST * WORDS, COLD_PAGES * PAGE, UMGR_ADVISE_COLD) != 0) {
        perror("umgr_advise");
        return 2;
    }
    for (int waited = 0; !request_waiting(); waited += 2) {
        if (waited > 20000) {
            fprintf(stderr, "devicewrite: no request for the agent came\n");
            return 2;
        }
        sleep_ms(2);
    }
    /* The "device" writes the buffer, then lets go of it. */
    struct io_uring_cqe *cqe;
    if (write(pipe_fds[1], data, buffer_pages * PAGE) != buffer_pages * PAGE || io_uring_wait_cqe(&ring, &cqe) != 0)
        return 2;
    if (cqe->res != buffer_pages * PAGE) {
        fprintf(stderr, "devicewrite: the read got %d bytes\n", cqe->res);
        return 2;
    }
    io_uring_cqe_seen(&ring, cqe);
    if (io_uring_unregister_buffers(&ring) != 0)
        return 2;
    io_uring_queue_exit(&ring);
    printf("landed\n");
    fflush(stdout);
    if (wait_for("resumed") != 0)
        return 2;
    sleep_ms(300);   /* the agent's move, and the daemon's answer to it */

    int bad = check(m, FIRST, buffer_pages, 9, "the buffer the device wrote during its eviction");
    bad |= check_around(m);
    /* Unpinned now, the buffer leaves as any page does, and comes back. */
    if (umgr_advise(buffer, buffer_pages * PAGE, UMGR_ADVISE_COLD) != 0)
        return 2;
    int resident = -1;
    for (int waited = 0; waited < 10000 && (resident = resident_pages(buffer, buffer_pages)) != 0; waited += 10)
        sleep_ms(10);
    if (resident != 0) {
        fprintf(stderr, "devicewrite: %d buffer pages still resident after COLD\n", resident);
        return 1;
    }
    bad |= check(m, FIRST, buffer_pages, 9, "the buffer, read back");
    bad |= check_around(m);
    return bad;
}
