/* Memory whose zap would free nothing, under a budget far below the data.
 * Usage: unfreeable MODE MIB; exit 0 when every byte is right.
 *   zero    read all of fresh memory (the kernel's zero page), then write
 *           the first half; the second half must read zero throughout
 *   mlock   mlock the first 4 MiB, write and check everything, munlock,
 *           then write and check again (the unlocked pages may go now)
 *   mlock-all  the same with all of it locked
 *   mlock-late write everything, then mlock 1000 pages that are resident and
 *           were written after others still resident (eviction runs cross
 *           from unlocked pages into locked ones, at no batch's edge), then
 *           write a second region to push the first one out, and check both
 *   shared  fork: a child keeps the parent's pages shared copy-on-write
 *           while the parent writes a second region; both check theirs
 *   shared-clean  the same, with the parent's resident pages at the fork
 *           read back from swap (clean copies) rather than written */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "salted.h"

static uint64_t *map(size_t npages)
{
    uint64_t *m = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    return m;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    const char *mode = argv[1];
    size_t n = strtoull(argv[2], NULL, 10) << 8; /* pages */
    uint64_t *m = map(n);

    if (strcmp(mode, "zero") == 0) {
        int bad = check(m, 0, n, 0, "fresh memory");
        fill(m, 0, n / 2, 1);
        bad |= check(m, 0, n / 2, 1, "written half") | check(m, n / 2, n - n / 2, 0, "read-only half");
        return bad | check(m, n / 2, n - n / 2, 0, "read-only half again");
    }
    if (strcmp(mode, "mlock") == 0 || strcmp(mode, "mlock-all") == 0) {
        size_t locked = strcmp(mode, "mlock") == 0 ? 1024 : n;
        if (mlock(m, locked * PAGE) != 0) {
            perror("mlock");
            return 2;
        }
        fill(m, 0, n, 1);
        int bad = check(m, 0, n, 1, "while locked");
        munlock(m, locked * PAGE);
        usleep(1500 * 1000); /* the daemon looks at locks again about every second */
        fill(m, 0, n, 2);
        return bad | check(m, 0, n, 2, "after munlock");
    }
    if (strcmp(mode, "mlock-late") == 0) {
        fill(m, 0, n, 1);
        uint64_t *locked = m + (n - 2000) * WORDS;
        if (mlock(locked, 1000 * PAGE) != 0) {
            perror("mlock");
            return 2;
        }
        uint64_t *second = map(n / 2);
        fill(second, 0, n / 2, 7);
        int bad = check(m, 0, n, 1, "first region, part of it locked");
        munlock(locked, 1000 * PAGE);
        return bad | check(second, 0, n / 2, 7, "second region");
    }
    if (strcmp(mode, "shared") == 0 || strcmp(mode, "shared-clean") == 0) {
        fill(m, 0, n, 1);
        if (strcmp(mode, "shared-clean") == 0 && check(m, 0, n, 1, "before the fork"))
            return 1;
        int go[2];
        if (pipe(go) != 0)
            return 2;
        pid_t pid = fork();
        if (pid == 0) { /* keep the pages shared until the parent is done */
            char c;
            close(go[1]);
            if (read(go[0], &c, 1) != 1)
                _exit(5);
            _exit(check(m, 0, n, 1, "child's copy") ? 3 : 0);
        }
        close(go[0]);
        uint64_t *second = map(n);
        fill(second, 0, n, 7);
        int bad = check(second, 0, n, 7, "parent's second region") | check(m, 0, n, 1, "parent's first region");
        if (write(go[1], "g", 1) != 1)
            return 2;
        int status;
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            fprintf(stderr, "child failed: %d\n", status);
            return 1;
        }
        return bad;
    }
    return 2;
}
