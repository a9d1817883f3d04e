/* Process-lifecycle events on memory that is paged out at the moment of the
 * event; every byte is checked afterwards. Usage: lifecycle MODE MIB
 * MODE: fork | munmap | mremap | mremap-race | mremap-thread | remap-hole | unmap-thread | dontneed | dontneed-race | exit
 *     | fork-tree | exec | exec-parent | fork-exec | spawn | exit-killed
 *     | fork-parent-killed | fork-killed | daemon | forkpty
 *     | fork-orphan-slow-child | fork-slow-parent | forkpty-thread
 *     (helpers run by the program itself: fresh | true).
 * Exit 0 when all is intact. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pty.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#include "salted.h"

/* Pages whose expected salt is kept in a table (one entry a page). */
static void stamp(uint64_t *m, uint64_t *salt, size_t first, size_t npages, size_t stride, uint64_t s)
{
    for (size_t p = first; p < first + npages; p += stride) {
        fill(m, p, 1, s);
        salt[p] = s;
    }
}

static int verify(const uint64_t *m, const uint64_t *salt, size_t n, const char *what)
{
    for (size_t p = 0; p < n; p++)
        if (check(m, p, 1, salt[p], what))
            return 1;
    return 0;
}

/* 0 when the child exited 0; else says why on stderr. */
static int reap(pid_t pid, const char *who)
{
    int status;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) {
        perror(who);
        return 1;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
        return 0;
    fprintf(stderr, "%s (pid %d) failed: status %#x\n", who, (int)pid, status);
    return 1;
}

/* 0 when the child died of SIGKILL. */
static int reap_killed(pid_t pid, const char *who)
{
    int status;
    if (waitpid(pid, &status, 0) != pid) {
        perror(who);
        return 1;
    }
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        return 0;
    fprintf(stderr, "%s (pid %d) was not killed: status %#x\n", who, (int)pid, status);
    return 1;
}

/* A grandchild (depth 2) or child (depth 1) of fork-tree: check what it
 * inherited, write its own salt over part (child) or all (grandchild) of it,
 * fork the next generation, check again, and again once that one is done. */
static int tree_node(uint64_t *m, uint64_t *salt, size_t n, unsigned id, int depth)
{
    char what[64];
    snprintf(what, sizeof what, "tree node %u depth %d: inherited", id, depth);
    if (verify(m, salt, n, what))
        return 3;
    if (depth == 1)
        stamp(m, salt, id * n / 4, n / 4, 1, 10 + id); /* its quarter */
    else
        stamp(m, salt, 0, n, 1, 20 + id); /* everything */
    pid_t kid = -1;
    if (depth == 1) {
        kid = fork();
        if (kid == 0)
            _exit(tree_node(m, salt, n, id, 2));
    }
    snprintf(what, sizeof what, "tree node %u depth %d: own writes", id, depth);
    if (verify(m, salt, n, what))
        return 4;
    if (kid != 0 && depth == 1) {
        if (reap(kid, "grandchild"))
            return 5;
        snprintf(what, sizeof what, "tree node %u: after its grandchild", id);
        if (verify(m, salt, n, what))
            return 6;
    }
    return 0;
}

static size_t clone_pages;

static int clone_reader(void *arg)
{
    const uint64_t *m = arg; /* the parent's memory (CLONE_VM), paged out */
    for (size_t p = clone_pages / 2; p < clone_pages; p++)
        if (m[p * WORDS + 7] != ((p * WORDS + 7) ^ 3))
            return 1;
    return 0;
}

/* mremap-thread: a thread moves a region back and forth, writing a stripe
 * of it between moves, while the main thread's writes keep eviction busy.
 * Its moves come at any point of an eviction batch, also while a move out
 * is in flight (the daemon serves no fault then, so a thread that faults
 * cannot be the one that races it). */
struct mover {
    uint64_t *region, *other, *salt;
    size_t n;
    int bad;
    int done;
};

static void *mover_main(void *arg)
{
    struct mover *mv = arg;
    for (unsigned round = 0; round < 200; round++) {
        uint64_t *moved = mremap(mv->region, mv->n * PAGE, mv->n * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, mv->other);
        if (moved == MAP_FAILED) {
            mv->bad = 2;
            break;
        }
        mv->other = mv->region;
        mv->region = moved;
        size_t first = (round * 613) % (mv->n - 64);
        stamp(mv->region, mv->salt, first, 64, 1, 20 + round);
        usleep(300 + (round % 7) * 100);
    }
    __atomic_store_n(&mv->done, 1, __ATOMIC_RELEASE);
    return NULL;
}

static int mremap_thread(uint64_t *m, size_t n)
{
    struct mover mv = {.n = n / 4};
    mv.region = mmap(NULL, mv.n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mv.other = mmap(NULL, mv.n * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mv.salt = malloc(mv.n * sizeof *mv.salt);
    uint64_t *salt = malloc(n * sizeof *salt);
    if (mv.region == MAP_FAILED || mv.other == MAP_FAILED || !mv.salt || !salt)
        return 2;
    stamp(mv.region, mv.salt, 0, mv.n, 1, 2);
    for (size_t p = 0; p < n; p++)
        salt[p] = 1;
    pthread_t mover;
    if (pthread_create(&mover, NULL, mover_main, &mv))
        return 2;
    for (unsigned round = 0; !__atomic_load_n(&mv.done, __ATOMIC_ACQUIRE); round++)
        stamp(m, salt, (round * 1031) % (n - 256), 256, 1, 30 + round % 1000);
    pthread_join(mover, NULL);
    if (mv.bad)
        return mv.bad;
    return verify(m, salt, n, "main region after the moves") | verify(mv.region, mv.salt, mv.n, "moved region");
}

/* remap-hole: unmap a region twice the budget and map a new one
 * at the same address, over and over, writing every other page of each new
 * mapping and checking what it wrote and every 8th page (zeros). Writing
 * it keeps eviction busy with the region's own pages, so the munmap comes
 * while a batch of the old mapping's pages is being moved out or zapped:
 * that zap or move must not touch the new mapping's pages. */
static int remap_hole(uint64_t *m, size_t n)
{
    size_t hn = n / 2;
    uint64_t *region = mmap(NULL, hn * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *salt = calloc(hn, sizeof *salt);
    uint64_t *main_salt = malloc(n * sizeof *main_salt);
    if (region == MAP_FAILED || !salt || !main_salt)
        return 2;
    for (size_t p = 0; p < n; p++)
        main_salt[p] = 1;
    for (unsigned round = 0; round < 24; round++) {
        stamp(region, salt, round % 2, hn - 1, 2, 50 + round);
        if (munmap(region, hn * PAGE))
            return 2;
        uint64_t *again = mmap(region, hn * PAGE, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (again != region)
            return 2;
        memset(salt, 0, hn * sizeof *salt);
        stamp(region, salt, (round + 1) % 2, hn / 4, 2, 90 + round);   /* at once: the old one's batch may be in flight */
        for (size_t p = 0; p < hn; p++)
            if ((salt[p] || p % 8 == 0) && check(region, p, 1, salt[p], "new mapping at an unmapped region's address"))
                return 1;
    }
    return verify(m, main_salt, n, "main region after the remaps");
}

/* unmap-thread: one thread unmaps a region while another maps new memory
 * into the hole at once and writes it, over and over. The region (1 MiB)
 * lies above a bigger one, and the writes go 15 to the lower one for each
 * to the region, so that a batch in flight holds pages of both, the lower
 * one's first and most: a move that took the munmap's turn would still be
 * busy below when the new mapping is written, and reach it after. The
 * unmapping thread's munmap waits in the kernel until its UNMAP is read,
 * but the mapping thread does not wait for anything: no move may run while
 * that UNMAP is unread (the mapping, by a raw syscall, is one the shim
 * never hears of). */
struct unmapper {
    void *region;
    size_t bytes;
    int go;     /* 1: unmap now; 2: stop */
    int done;   /* rounds done */
};

static void *unmapper_main(void *arg)
{
    struct unmapper *u = arg;
    for (int round = 0;; round++) {
        int go;
        while ((go = __atomic_load_n(&u->go, __ATOMIC_ACQUIRE)) == 0)
            ;
        if (go == 2)
            return NULL;
        __atomic_store_n(&u->go, 0, __ATOMIC_RELAXED);
        munmap(u->region, u->bytes);
        __atomic_store_n(&u->done, round + 1, __ATOMIC_RELEASE);
    }
}

#define UNMAPPED_PAGES 256
#define LOWER_PER_UNMAPPED 15
#define ROUNDS 120

static int unmap_thread(uint64_t *m, size_t n)
{
    size_t hn = UNMAPPED_PAGES, ln = hn * LOWER_PER_UNMAPPED;
    uint64_t *high = mmap(NULL, hn * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *low = mmap(NULL, ln * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *main_salt = malloc(n * sizeof *main_salt);
    if (high == MAP_FAILED || low == MAP_FAILED || !main_salt)
        return 2;
    if (low > high) /* the move goes up from the lowest address: the unmapped region must come last */
        return 2;
    for (size_t p = 0; p < n; p++)
        main_salt[p] = 1;
    struct unmapper u = {.region = high, .bytes = hn * PAGE};
    pthread_t thread;
    if (pthread_create(&thread, NULL, unmapper_main, &u))
        return 2;
    int bad = 0;
    for (unsigned round = 0; round < ROUNDS && !bad; round++) {
        for (size_t p = 0; p < hn; p++) {
            fill(high, p, 1, 60 + round);
            fill(low, p * LOWER_PER_UNMAPPED, LOWER_PER_UNMAPPED, 60 + round);
        }
        __atomic_store_n(&u.go, 1, __ATOMIC_RELEASE);
        void *again;
        while ((again = (void *)syscall(SYS_mmap, high, hn * PAGE, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)) == MAP_FAILED &&
               errno == EEXIST)
            ;
        if (again != high)
            return 2;
        for (size_t p = 0; p < hn; p += 8)   /* a sparse pass first: it reaches a batch's pages sooner */
            fill(high, p, 1, 100 + round);
        fill(high, 0, hn, 100 + round);
        while (__atomic_load_n(&u.done, __ATOMIC_ACQUIRE) != (int)round + 1)
            ;
        bad = check(high, 0, hn, 100 + round, "new mapping written while another thread unmapped the old") |
              check(low, 0, ln, 60 + round, "lower region");
        /* Mapped again through the shim, which has the daemon manage it
         * at once (the raw one waits for its maps scan). */
        if (munmap(high, hn * PAGE) ||
            mmap(high, hn * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) != high)
            return 2;
    }
    __atomic_store_n(&u.go, 2, __ATOMIC_RELEASE);
    pthread_join(thread, NULL);
    return bad | verify(m, main_salt, n, "main region after the unmaps");
}

static void die_in_parent(void)
{
    kill(getpid(), SIGKILL);
}

static void *wait_on_pipe(void *fd)
{
    char c;
    ssize_t got = read(*(int *)fd, &c, 1);
    (void)got;
    return NULL;
}

static void sleep_a_while(void)
{
    usleep(1500 * 1000);
}

static void sleep_longer(void)
{
    usleep(4000 * 1000);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    const char *mode = argv[1];
    size_t n = strtoull(argv[2], NULL, 10) << 8; /* pages */
    if (strcmp(mode, "true") == 0) /* spawned: a new image, no memory of its own */
        return 0;
    uint64_t *m = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return 2;
    if (strcmp(mode, "fresh") == 0) { /* exec'd: nothing of the old image shows through */
        if (check(m, 0, n, 0, "fresh region after exec"))
            return 1;
        fill(m, 0, n, 7);
        int bad = check(m, 0, n, 7, "fresh region's own writes");
        int status; /* children of the old image, if any */
        for (pid_t kid; (kid = wait(&status)) > 0;)
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                fprintf(stderr, "child %d of the old image failed: status %#x\n", (int)kid, status);
                bad = 1;
            }
        return bad;
    }
    fill(m, 0, n, 1); /* under a small budget most of it is paged out now */

    if (strcmp(mode, "fork") == 0) {
        pid_t pid = fork();
        if (pid == 0) {
            if (check(m, 0, n, 1, "child sees parent's data"))
                _exit(3);
            fill(m, 0, n, 2);
            _exit(check(m, 0, n, 2, "child's own writes") ? 4 : 0);
        }
        int bad = check(m, 0, n, 1, "parent after fork");
        fill(m, 0, n, 5);
        int status;
        waitpid(pid, &status, 0);
        bad |= check(m, 0, n, 5, "parent's own writes");
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "child failed: %d\n", status);
            return 1;
        }
        return bad;
    }
    if (strcmp(mode, "fork-parent-killed") == 0) {
        /* glibc runs atfork parent handlers inside fork(), before the shim's
         * wrapper gets to name the child to the daemon (FORKED): the parent
         * dies in between, and the child must still get its paged-out data.
         * The child's verdict goes to stdout, which it shares with the test. */
        pthread_atfork(NULL, die_in_parent, NULL);
        if (fork() == 0) {
            int bad = check(m, 0, n, 1, "child of a parent killed at fork");
            fill(m, 0, n, 2);
            bad |= check(m, 0, n, 2, "that child's own writes");
            printf("child %s\n", bad ? "bad" : "ok");
            return bad;
        }
        return 2; /* not reached: the parent is killed in fork() */
    }
    if (strcmp(mode, "fork-orphan-slow-child") == 0) {
        /* As fork-parent-killed, and the child says hello 4 s late (an
         * atfork child handler runs before the shim's): its memory waits as
         * an orphan meanwhile. */
        pthread_atfork(NULL, die_in_parent, sleep_longer);
        if (fork() == 0) {
            int bad = check(m, 0, n, 1, "late child of a parent killed at fork");
            printf("child %s\n", bad ? "bad" : "ok");
            return bad;
        }
        return 2; /* not reached */
    }
    if (strcmp(mode, "fork-slow-parent") == 0) {
        /* The parent names its child 1.5 s late (an atfork parent handler
         * runs before the shim's FORKED): the child's hello comes first. */
        pthread_atfork(NULL, sleep_a_while, NULL);
        pid_t pid = fork();
        if (pid == 0)
            _exit(check(m, 0, n, 1, "child of a slow parent") ? 3 : 0);
        int status;
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "child of a slow parent failed: status %#x\n", status);
            return 1;
        }
        return check(m, 0, n, 1, "slow parent after its fork");
    }
    if (strcmp(mode, "daemon") == 0) {
        /* daemon(3) forks inside glibc (its own __fork, not fork()), and the
         * parent exits at once: the child must still be served its paged-out
         * data. Its verdict goes to stdout, which it shares with the test. */
        if (daemon(1, 1) != 0)
            return 2;
        int bad = check(m, 0, n, 1, "daemon(3)'s child");
        fill(m, 0, n, 2);
        bad |= check(m, 0, n, 2, "daemon(3)'s child's own writes");
        printf("daemon child %s\n", bad ? "bad" : "ok");
        return bad;
    }
    if (strcmp(mode, "forkpty-thread") == 0) {
        /* A thread sits idle while the region is written: the top of its
         * stack (glibc's struct pthread, in a managed mapping) is paged out
         * by the time the main thread forks, and glibc's own first steps in
         * the child write it (a fault only the daemon can serve, once the
         * parent has named the child). */
        int idle[2];
        pthread_t thread;
        if (pipe(idle) != 0 || pthread_create(&thread, NULL, wait_on_pipe, &idle[0]) != 0)
            return 2;
        usleep(100 * 1000);
        fill(m, 0, n, 1);
        int master = -1;
        pid_t pid = forkpty(&master, NULL, NULL, NULL);
        if (pid < 0)
            return 2;
        if (pid == 0)
            _exit(check(m, 0, n, 1, "forkpty(3)'s child of a threaded parent") ? 3 : 0);
        int status;
        waitpid(pid, &status, 0);
        close(master);
        int bad = !WIFEXITED(status) || WEXITSTATUS(status) != 0;
        if (bad)
            fprintf(stderr, "forkpty(3) child failed: status %#x\n", status);
        if (write(idle[1], "x", 1) != 1 || pthread_join(thread, NULL) != 0)
            return 2;
        return bad | check(m, 0, n, 1, "threaded parent after forkpty(3)");
    }
    if (strcmp(mode, "forkpty") == 0) {
        /* forkpty(3) forks inside glibc too; then a plain fork(): each child
         * must get its own memory (the second one the second fork's). */
        int bad = 0;
        for (int plain = 0; plain <= 1; plain++) {
            int master = -1;
            pid_t pid = plain ? fork() : forkpty(&master, NULL, NULL, NULL);
            if (pid < 0)
                return 2;
            if (pid == 0) {
                int wrong = check(m, 0, n, 1, plain ? "fork()'s child" : "forkpty(3)'s child");
                fill(m, 0, n, 3 + plain);
                _exit(wrong | check(m, 0, n, 3 + plain, "the child's own writes") ? 3 : 0);
            }
            int status;
            waitpid(pid, &status, 0);
            if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                fprintf(stderr, "%s child failed: status %#x\n", plain ? "fork()" : "forkpty(3)", status);
                bad = 1;
            }
            if (master >= 0)
                close(master);
        }
        return bad | check(m, 0, n, 1, "parent after its forks");
    }
    if (strcmp(mode, "munmap") == 0) { /* a hole in the middle splits the region */
        size_t lo = n / 4, len = n / 4;
        munmap(m + lo * WORDS, len * PAGE);
        return check(m, 0, lo, 1, "below the hole") | check(m, lo + len, n - lo - len, 1, "above the hole");
    }
    if (strcmp(mode, "mremap") == 0) { /* move and grow; the grown part reads as zero */
        uint64_t *moved = mremap(m, n * PAGE, 2 * n * PAGE, MREMAP_MAYMOVE);
        if (moved == MAP_FAILED)
            return 2;
        int bad = check(moved, 0, n, 1, "moved pages") | check(moved, n, n, 0, "grown part");
        uint64_t *shrunk = mremap(moved, 2 * n * PAGE, n / 2 * PAGE, 0);
        return bad | (shrunk == MAP_FAILED) | check(shrunk, 0, n / 2, 1, "after shrink");
    }
    if (strcmp(mode, "mremap-thread") == 0)
        return mremap_thread(m, n);
    if (strcmp(mode, "remap-hole") == 0)
        return remap_hole(m, n);
    if (strcmp(mode, "unmap-thread") == 0)
        return unmap_thread(m, n);
    if (strcmp(mode, "mremap-race") == 0) { /* moves back and forth while eviction is busy */
        uint64_t *salt = malloc(n * sizeof *salt);
        uint64_t *other = mmap(NULL, n * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (salt == NULL || other == MAP_FAILED)
            return 2;
        for (size_t p = 0; p < n; p++)
            salt[p] = 1;
        for (unsigned round = 0; round < 24; round++) {
            uint64_t *moved = mremap(m, n * PAGE, n * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, other);
            if (moved == MAP_FAILED)
                return 2;
            other = m;
            m = moved;
            size_t first = (round * 997) % (n - n / 8), count = n / 8;
            fill(m, first, count, 10 + round); /* keeps the evictor busy across the next move */
            for (size_t p = first; p < first + count; p++)
                salt[p] = 10 + round;
            size_t probe = (round * 4099) % n; /* a paged-out page read back at its new address */
            if (check(m, probe, 1, salt[probe], "probe after move"))
                return 1;
        }
        for (size_t p = 0; p < n; p++)
            if (check(m, p, 1, salt[p], "after the moves"))
                return 1;
        return 0;
    }
    if (strcmp(mode, "dontneed-race") == 0) { /* discards of pages the daemon is evicting */
        uint64_t *salt = malloc(n * sizeof *salt);
        if (salt == NULL)
            return 2;
        for (size_t p = 0; p < n; p++)
            salt[p] = 1;
        size_t window = n / 16;
        for (unsigned round = 0; round < 400; round++) {
            size_t hot = (round * 7919) % (n - window); /* new writes: the evictor stays busy */
            fill(m, hot, window, 100 + round);
            for (size_t p = hot; p < hot + window; p++)
                salt[p] = 100 + round;
            /* FIFO evicts the writes of about three rounds ago now: discard runs there */
            if (round < 3)
                continue;
            size_t cold = ((round - 3) * 7919) % (n - window);
            for (size_t k = 0; k < 4; k++) {
                size_t first = cold + (round * 131 + k * 251) % (window - 16), len = 1 + (round + k) % 12;
                madvise(m + first * WORDS, len * PAGE, MADV_DONTNEED);
                for (size_t p = first; p < first + len; p++)
                    salt[p] = 0;
            }
        }
        for (size_t p = 0; p < n; p++)
            if (check(m, p, 1, salt[p], "after racing discards"))
                return 1;
        return 0;
    }
    if (strcmp(mode, "dontneed") == 0) { /* discarded pages read zero, even paged-out ones */
        madvise(m + (n / 2) * WORDS, (n / 4) * PAGE, MADV_DONTNEED);
        return check(m, 0, n / 2, 1, "kept") | check(m, n / 2, n / 4, 0, "discarded") |
               check(m, 3 * n / 4, n - 3 * n / 4, 1, "kept above");
    }
    if (strcmp(mode, "exit") == 0)
        return 0; /* slots must all be freed when it is gone */
    if (strcmp(mode, "fork-tree") == 0) { /* 4 children, each with a grandchild: 9 processes */
        uint64_t *salt = malloc(n * sizeof *salt);
        if (salt == NULL)
            return 2;
        for (size_t p = 0; p < n; p++)
            salt[p] = 1;
        pid_t kids[4];
        for (unsigned i = 0; i < 4; i++) {
            kids[i] = fork();
            if (kids[i] == 0)
                _exit(tree_node(m, salt, n, i, 1));
        }
        int bad = verify(m, salt, n, "tree root after forks");
        stamp(m, salt, 1, n - 1, 2, 5); /* odd pages: shared slots, now the root's own */
        bad |= verify(m, salt, n, "tree root's own writes");
        for (unsigned i = 0; i < 4; i++)
            bad |= reap(kids[i], "child");
        return bad | verify(m, salt, n, "tree root after its children");
    }
    if (strcmp(mode, "exec-unmanaged") == 0) { /* replaced by a program without the shim */
        unsetenv("LD_PRELOAD");
        execl("/bin/sleep", "sleep", "60", (char *)NULL); /* the test kills it */
        perror("exec");
        return 2;
    }
    if (strcmp(mode, "exec") == 0) { /* the image is replaced while its pages are out */
        execl("/proc/self/exe", argv[0], "fresh", argv[2], (char *)NULL);
        perror("exec");
        return 2;
    }
    if (strcmp(mode, "exec-parent") == 0) { /* the parent execs; its child checks the shared pages */
        int gone[2];
        if (pipe2(gone, O_CLOEXEC) != 0)
            return 2;
        pid_t pid = fork();
        if (pid == 0) {
            close(gone[1]);
            char c;
            if (read(gone[0], &c, 1) != 0) /* EOF: the parent's old image is gone */
                _exit(2);
            if (check(m, 0, n, 1, "child after its parent's exec"))
                _exit(3);
            fill(m, 0, n, 2);
            _exit(check(m, 0, n, 2, "child's own writes after its parent's exec") ? 4 : 0);
        }
        execl("/proc/self/exe", argv[0], "fresh", argv[2], (char *)NULL);
        perror("exec");
        return 2;
    }
    if (strcmp(mode, "fork-exec") == 0) { /* a child reads some inherited pages, then execs */
        pid_t pid = fork();
        if (pid == 0) {
            if (check(m, 0, n / 8, 1, "child before exec"))
                _exit(3);
            execl("/proc/self/exe", argv[0], "fresh", argv[2], (char *)NULL);
            _exit(2);
        }
        int bad = check(m, 0, n, 1, "parent while its child execs");
        fill(m, 0, n, 5);
        bad |= check(m, 0, n, 5, "parent's own writes");
        bad |= reap(pid, "exec'd child");
        return bad | check(m, 0, n, 5, "parent after its child");
    }
    if (strcmp(mode, "spawn") == 0) { /* CLONE_VM children: no fork event, one mm */
        int bad = 0;
        char *child_argv[] = {argv[0], "true", argv[2], NULL};
        pid_t pid;
        if (posix_spawn(&pid, "/proc/self/exe", NULL, NULL, child_argv, environ) != 0)
            return 2;
        bad |= reap(pid, "posix_spawn'd self");
        bad |= check(m, 0, n, 1, "after posix_spawn");
        fill(m, 0, n, 3); /* eviction is busy at the next spawn */
        char *true_argv[] = {"true", NULL};
        if (posix_spawnp(&pid, "true", NULL, NULL, true_argv, environ) != 0)
            return 2;
        bad |= reap(pid, "posix_spawnp'd true");
        pid = vfork();
        if (pid == 0) {
            execv("/bin/true", true_argv);
            _exit(127);
        }
        bad |= reap(pid, "vfork+exec'd /bin/true");
        pid = vfork(); /* the child reads paged-out pages of the shared mm */
        if (pid == 0) {
            for (size_t p = 0; p < n; p++)
                if (m[p * WORDS + 5] != ((p * WORDS + 5) ^ 3))
                    _exit(1);
            _exit(0);
        }
        bad |= reap(pid, "vfork child reading the parent's memory");
        /* A CLONE_VM child reads the upper half while the parent reads the lower. */
        clone_pages = n;
        size_t stack_size = 1 << 16;
        char *stack = malloc(stack_size);
        if (stack == NULL)
            return 2;
        pid = clone(clone_reader, stack + stack_size, CLONE_VM | SIGCHLD, m);
        bad |= check(m, 0, n / 2, 3, "parent beside its CLONE_VM child");
        bad |= reap(pid, "CLONE_VM child");
        return bad | check(m, 0, n, 3, "after the spawns");
    }
    if (strcmp(mode, "fork-killed") == 0) { /* 100 children SIGKILLed as they attach, as strace's probes are */
        int bad = 0;
        for (int i = 0; i < 100; i++) {
            pid_t pid = fork();
            if (pid < 0)
                return 2;
            if (pid == 0) {
                for (;;)
                    pause();
            }
            if (i & 1)
                usleep((useconds_t)(i * 20));
            kill(pid, SIGKILL);
            bad |= reap_killed(pid, "child killed as it attached");
        }
        return bad | check(m, 0, n, 1, "parent after the kills");
    }
    if (strcmp(mode, "exit-killed") == 0) { /* children SIGKILLed, idle and while paging */
        int ready[2];
        if (pipe(ready) != 0)
            return 2;
        pid_t idle = fork();
        if (idle == 0) { /* never touches its inherited, paged-out pages */
            if (write(ready[1], "i", 1) != 1)
                _exit(2);
            for (;;)
                pause();
        }
        pid_t busy = fork();
        if (busy == 0) { /* pages in and out until it is killed */
            for (unsigned round = 0;; round++) {
                uint64_t s = round == 0 ? 1 : 30 + round - 1;
                if (check(m, 0, n, s, "busy child"))
                    _exit(3);
                fill(m, 0, n / 2, 30 + round);
                if (round == 0 && write(ready[1], "b", 1) != 1)
                    _exit(2);
                fill(m, n / 2, n - n / 2, 30 + round);
            }
        }
        char c;
        for (int i = 0; i < 2; i++)
            if (read(ready[0], &c, 1) != 1)
                return 2;
        kill(idle, SIGKILL);
        int bad = check(m, 0, n, 1, "parent while its child pages"); /* busy is still paging */
        kill(busy, SIGKILL);
        bad |= reap_killed(idle, "idle child") | reap_killed(busy, "busy child");
        bad |= check(m, 0, n, 1, "parent after the kills");
        fill(m, 0, n, 5);
        return bad | check(m, 0, n, 5, "parent's own writes");
    }
    return 2;
}
