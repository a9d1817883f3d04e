/* A program that closes every descriptor it did not open, as daemons and
 * process spawners do, while its memory is paged out, then reads and
 * rewrites all of it three times. Usage: closeall closefrom|close_range|loop
 * Prints "ok" and exits 0 when every page came back right and its own
 * descriptors (a low one and one above 700, where the shim keeps its own)
 * were closed. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
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
    else {
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
    for (uint64_t round = 0; round < 3; round++) {
        for (size_t i = 0; i < words; i += 512)
            bad += m[i] != ((i ^ 0x5a5a) + round);
        for (size_t i = 0; i < words; i += 512)
            m[i] += 1;
    }
    printf(bad ? "%zu pages wrong\n" : "ok\n", bad);
    return bad != 0;
}
