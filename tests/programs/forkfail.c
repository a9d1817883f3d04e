/* Forks that fail after the kernel copied the child's memory, then forks
 * that succeed: usage forkfail MIB PIDS_CGROUP.
 *
 * Fills MIB MiB (mostly paged out under the budget), moves itself into
 * the pids cgroup PIDS_CGROUP and sets its pids.max to 1: three forks fail
 * with EAGAIN (the pids controller refuses them in copy_process, after
 * copy_mm: the daemon has read a fork event for each). Then pids.max goes
 * back to max and three children each check every byte. Exit 0 and "ok"
 * when the forks failed with EAGAIN, errno intact, and every child and the
 * parent read every byte right. */
#define _GNU_SOURCE
#include <errno.h>
#include <pty.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "salted.h"

static void put(const char *dir, const char *file, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    FILE *f = fopen(path, "w");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        perror(path);
        exit(2);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    size_t npages = strtoull(argv[1], NULL, 10) << 8;
    uint64_t *m = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return 2;
    fill(m, 0, npages, 1);
    sleep(1);   /* (time to page out what the budget cannot hold) */
    char pid[32];
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    put(argv[2], "cgroup.procs", pid);
    put(argv[2], "pids.max", "1");
    int bad = 0;
    for (int i = 0; i < 3; i++) {
        errno = 0;
        pid_t child = fork();
        if (child == 0)
            _exit(0);
        if (child > 0 || errno != EAGAIN) {
            fprintf(stderr, "forkfail: fork %d at pids.max 1 gave %d, errno %d (%s)\n", i, (int)child, errno,
                    strerror(errno));
            bad = 1;
            if (child > 0)
                waitpid(child, NULL, 0);
        }
    }
    /* And a fork inside glibc (forkpty), which the shim sees through its atfork handlers. */
    int master;
    errno = 0;
    pid_t inner = forkpty(&master, NULL, NULL, NULL);
    if (inner == 0)
        _exit(0);
    if (inner > 0 || errno != EAGAIN) {
        fprintf(stderr, "forkfail: forkpty at pids.max 1 gave %d, errno %d (%s)\n", (int)inner, errno,
                strerror(errno));
        bad = 1;
        if (inner > 0)
            waitpid(inner, NULL, 0);
    }
    put(argv[2], "pids.max", "max");
    for (int i = 0; i < 3; i++) {
        pid_t child = fork();
        if (child == 0)
            _exit(check(m, 0, npages, 1, "a child after the failed forks"));
        int status = -1;
        if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "forkfail: child %d failed (status %#x)\n", i, status);
            bad = 1;
        }
    }
    bad |= check(m, 0, npages, 1, "the parent");
    if (!bad)
        printf("ok\n");
    return bad;
}
