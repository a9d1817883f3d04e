/* Fills MIB of anonymous memory with a known pattern, prints "ready", then
 * waits for stdin to reach EOF before checking every byte. Lets a test look
 * at a target (umgr status) while it is alive, idle and partly swapped out.
 * Usage: ctl_hold MIB [fork|fork-clearenv|rename|term]. With "fork" it forks
 * once filled, and parent and child each check every byte (the parent exits
 * 1 if the child failed); "fork-clearenv" clears its environment first, as
 * a server that sanitises it before forking workers does. With "rename" it renames itself (PR_SET_NAME "renamed")
 * once ready, and rewrites its command line to "ctl_hold: renamed", as
 * servers do (postgres's backends, nginx's workers). With "term" a
 * SIGTERM, as a service's stop, also ends the wait ("term" is printed):
 * every byte is checked then, as a shutdown that saves its data reads it
 * all.
 * Exit 0 and "ok N pages" when all is intact; 1 and a message at the first
 * wrong word. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <signal.h>
#include <errno.h>
#include <poll.h>
#include <unistd.h>

#define PAGE 4096

static uint64_t word_for(size_t page, size_t word)
{
    return (page * 0x9E3779B97F4A7C15ull) ^ (word * 0xBF58476D1CE4E5B9ull) ^ 0x5A;
}

static volatile sig_atomic_t terminated;

static void on_term(int sig)
{
    (void)sig;
    terminated = 1;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: ctl_hold MIB\n");
        return 2;
    }
    size_t bytes = strtoull(argv[1], NULL, 10) << 20;
    size_t npages = bytes / PAGE;
    uint64_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        perror("ctl_hold: mmap");
        return 2;
    }
    for (size_t p = 0; p < npages; p++)
        for (size_t w = 0; w < PAGE / 8; w++)
            mem[p * (PAGE / 8) + w] = word_for(p, w);
    /* "term": SIGTERM handled from before "ready", and blocked but while
       ppoll waits, so one that comes between two waits is not lost. */
    int term = argc > 2 && strcmp(argv[2], "term") == 0;
    sigset_t waiting;
    if (term) {
        struct sigaction sa = { .sa_handler = on_term };
        sigaction(SIGTERM, &sa, NULL);
        sigset_t blocked;
        sigemptyset(&blocked);
        sigaddset(&blocked, SIGTERM);
        sigprocmask(SIG_BLOCK, &blocked, &waiting);
        sigdelset(&waiting, SIGTERM);
    }
    pid_t child = -1;
    int forks = argc > 2 && strncmp(argv[2], "fork", 4) == 0;
    if (forks && strcmp(argv[2], "fork-clearenv") == 0)
        clearenv();
    if (forks && (child = fork()) < 0) {
        perror("ctl_hold: fork");
        return 2;
    }
    if (child != 0) {
        printf("ready\n");
        fflush(stdout);
    }
    if (argc > 2 && strcmp(argv[2], "rename") == 0) {
        prctl(PR_SET_NAME, "renamed", 0, 0, 0);   /* its comm, after its daemon named it */
        size_t room = (size_t)(argv[argc - 1] + strlen(argv[argc - 1]) - argv[0]);   /* the argument strings */
        memset(argv[0], 0, room);
        snprintf(argv[0], room, "ctl_hold: renamed");
    }
    char buf[64];
    if (term) {
        struct pollfd in = { .fd = 0, .events = POLLIN };
        while (!terminated) {
            int ready = ppoll(&in, 1, NULL, &waiting);
            if (ready < 0 && errno != EINTR)
                break;
            if (ready > 0 && read(0, buf, sizeof buf) <= 0)
                break;
        }
        if (terminated)
            printf("term\n");   /* (not the end of stdin) */
    } else {
        while (read(0, buf, sizeof buf) > 0)
            ;
    }
    for (size_t p = 0; p < npages; p++)
        for (size_t w = 0; w < PAGE / 8; w++)
            if (mem[p * (PAGE / 8) + w] != word_for(p, w)) {
                fprintf(stderr, "ctl_hold: page %zu word %zu: %016llx, want %016llx\n", p, w,
                        (unsigned long long)mem[p * (PAGE / 8) + w], (unsigned long long)word_for(p, w));
                return 1;
            }
    printf("ok %zu pages\n", npages);
    fflush(stdout);
    int status = 0;
    if (child > 0 && (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0)) {
        fprintf(stderr, "ctl_hold: child failed (status %#x)\n", status);
        return 1;
    }
    return 0;
}
