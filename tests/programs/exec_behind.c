/* A process that execs while its old memory lives on: the attack the
 * daemon's checked reads must stop (a pid that now runs another program).
 *
 * Usage: exec_behind keep|drop
 *
 * Maps a canary page and a data page at fixed addresses, the data filled
 * with 'O' (the old program), and with "keep" starts a CLONE_VM child that
 * shares this mm and sleeps, so the mm outlives the exec. Prints
 * "ready CANARY DATA" and waits for a line on stdin; then execs itself as
 * the new program, which maps the same two addresses filled with 'N',
 * prints "execd" and waits for stdin to close.
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define CANARY ((void *)0x7e0000000000ull)
#define DATA ((void *)0x7e0000010000ull)

static void map_filled(void *addr, char fill)
{
    void *p = mmap(addr, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (p != addr) {
        perror("mmap");
        exit(2);
    }
    memset(p, fill, PAGE);
}

static int sleeper(void *unused)
{
    (void)unused;
    for (;;)
        pause();
    return 0;
}

int main(int argc, char **argv)
{
    char line[16];
    if (argc == 2 && strcmp(argv[1], "new") == 0) {
        map_filled(CANARY, 'N');
        map_filled(DATA, 'N');
        printf("execd\n");
        fflush(stdout);
        while (fgets(line, sizeof line, stdin))
            ;
        return 0;
    }
    if (argc != 2 || (strcmp(argv[1], "keep") && strcmp(argv[1], "drop"))) {
        fprintf(stderr, "usage: exec_behind keep|drop\n");
        return 2;
    }
    map_filled(CANARY, 0);
    map_filled(DATA, 'O');
    if (strcmp(argv[1], "keep") == 0) {
        static char stack[64 << 10];
        /* SIGKILL'd with us: the test kills the process group. */
        if (clone(sleeper, stack + sizeof stack, CLONE_VM | SIGCHLD, NULL) < 0) {
            perror("clone");
            return 2;
        }
    }
    printf("ready %p %p\n", CANARY, DATA);
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin))
        return 0;
    execl("/proc/self/exe", argv[0], "new", (char *)NULL);
    perror("exec");
    return 2;
}
