/* Starting processes, for bench/bench_spawn.py.
 *
 *   spawn MODE COUNT DATA_MIB
 *
 * First writes DATA_MIB MiB of its own memory (page p's first word holds
 * p ^ K), then starts COUNT processes one after another, each waited for:
 *
 *   fork  a child that reads 8 pages of that memory, an 8th of it apart
 *         (from a page that moves with the child's number), checks them
 *         and exits: what a forking server or a worker pool pays a child;
 *   exec  a child that execs /bin/true at once, as a shell runs a command.
 *
 * Prints one JSON line {"ok": true, "mode": .., "count": .., "data_mib": ..,
 * "seconds": s, "us_per_process": us}; a child that fails or reads a wrong
 * word: a message on stderr and exit 1. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define K 0x9E3779B97F4A7C15ull
#define READS 8

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int child_reads(const uint64_t *data, uint64_t pages, int n)
{
    for (uint64_t r = 0; r < READS; r++) {
        uint64_t p = (n * 7919ull + r * (pages / READS)) % pages;
        if (data[p * (PAGE / 8)] != (p ^ K))
            return 1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 4 || (strcmp(argv[1], "fork") && strcmp(argv[1], "exec"))) {
        fprintf(stderr, "usage: spawn fork|exec COUNT DATA_MIB\n");
        return 2;
    }
    int exec_mode = strcmp(argv[1], "exec") == 0;
    int count = atoi(argv[2]);
    uint64_t pages = (uint64_t)atoll(argv[3]) * 256;
    if (pages == 0)
        pages = 1;
    uint64_t *data = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    for (uint64_t p = 0; p < pages; p++)
        data[p * (PAGE / 8)] = p ^ K;

    double start = now();
    for (int n = 0; n < count; n++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            if (exec_mode) {
                execl("/bin/true", "true", (char *)NULL);
                _exit(127);
            }
            _exit(child_reads(data, pages, n));
        }
        int status;
        if (waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) {
            fprintf(stderr, "spawn: child %d (%s) failed: status %#x\n", n, argv[1], status);
            return 1;
        }
    }
    double seconds = now() - start;
    printf("{\"ok\": true, \"mode\": \"%s\", \"count\": %d, \"data_mib\": %s, \"seconds\": %.6f, "
           "\"us_per_process\": %.1f}\n", argv[1], count, argv[3], seconds, count ? seconds / count * 1e6 : 0.0);
    return 0;
}
