/* A program that closes every descriptor it did not open, as daemons and
 * process spawners do, while its memory is paged out, then reads and
 * rewrites all of it three times.
 * Usage: closeall closefrom|close_range|loop|raw|dup2|raw-fork
 * raw closes them with the close_range syscall itself (no libc function the
 * shim could wrap); dup2 puts /dev/null over every descriptor from 700 up
 * (where the shim keeps its own); raw-fork is raw, then a forked child
 * checks every page first (its parent can no longer name it to the
 * daemon). Prints "ok" and exits 0 when every page came back right and its
 * own descriptors (a low one and one above 700) were closed (with dup2: are
 * /dev/null). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    size_t n = 64UL << 20, words = n / 8;
    uint64_t *m = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return 2;
    for (size_t i = 0; i < words; i += 512)
        m[i] = i ^ 0x5a5a;
    int low = open("/dev/null", O_RDONLY);
    int high = fcntl(low, F_DUPFD, 900);
    if (low < 0 || high < 0)
        return 2;
    if (strcmp(argv[1], "closefrom") == 0)
        closefrom(3);
    else if (strcmp(argv[1], "close_range") == 0)
        close_range(3, ~0U, 0);
    else if (strcmp(argv[1], "raw") == 0 || strcmp(argv[1], "raw-fork") == 0)
        syscall(SYS_close_range, 3, ~0U, 0);
    else if (strcmp(argv[1], "dup2") == 0) {
        struct rlimit limit;
        getrlimit(RLIMIT_NOFILE, &limit);
        for (int fd = 700; fd < (int)limit.rlim_cur && fd < 4096; fd++)
            if (fd != high && dup2(low, fd) != fd)
                return 2;
        close(low);
        close(high);
    } else {
        struct rlimit limit;
        getrlimit(RLIMIT_NOFILE, &limit);
        for (int fd = 3; fd < (int)limit.rlim_cur; fd++)
            close(fd);
    }
    if (fcntl(low, F_GETFD) != -1 || fcntl(high, F_GETFD) != -1) {
        printf("its own descriptors were left open\n");
        return 1;
    }
    size_t bad = 0;
    if (strcmp(argv[1], "raw-fork") == 0) {
        pid_t child = fork();
        if (child == 0) {
            for (size_t i = 0; i < words; i += 512)
                bad += m[i] != (i ^ 0x5a5a);
            _exit(bad != 0);
        }
        int status;
        if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status)) {
            printf("its child saw pages wrong\n");
            return 1;
        }
    }
    for (uint64_t round = 0; round < 3; round++) {
        for (size_t i = 0; i < words; i += 512)
            bad += m[i] != ((i ^ 0x5a5a) + round);
        for (size_t i = 0; i < words; i += 512)
            m[i] += 1;
    }
    printf(bad ? "%zu pages wrong\n" : "ok\n", bad);
    return bad != 0;
}
