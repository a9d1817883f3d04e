/* A fork with MADV_WIPEONFORK and MADV_DONTFORK memory: usage wipefork MIB.
 *
 * Three regions of MIB MiB each, written (salts 1, 2, 3) and mostly paged
 * out under the budget: "kept" as it is, "wiped" MADV_WIPEONFORK, "not
 * forked" MADV_DONTFORK. Then a fork. The child must see "kept" as it was,
 * "wiped" as zeros (the kernel empties it in the child; the parent's data
 * there is what the parent meant no child to have), and no "not forked":
 * it maps fresh memory at that address (half as much: its shim's threads
 * took the top of the hole), which must read as zeros too. The
 * child writes both and checks them, then exits; the parent checks all
 * three of its own, unchanged. Exit 0 and "ok" when every byte was right
 * in both. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "salted.h"

static uint64_t *region(size_t bytes, int advice)
{
    uint64_t *m = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED || (advice && madvise(m, bytes, advice) != 0)) {
        perror("wipefork: mmap or madvise");
        exit(2);
    }
    return m;
}

static int child(uint64_t *kept, uint64_t *wiped, uint64_t *not_forked, size_t npages)
{
    int bad = check(kept, 0, npages, 1, "child: kept");
    bad |= check(wiped, 0, npages, 0, "child: wiped (MADV_WIPEONFORK)");
    /* (The lower half: the child's shim maps its threads' stacks at the top of the hole.) */
    size_t half = npages / 2;
    uint64_t *fresh = mmap(not_forked, half * PAGE, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (fresh != not_forked) {
        perror("wipefork: the child's mmap where the MADV_DONTFORK region was");
        return 2;
    }
    bad |= check(fresh, 0, half, 0, "child: new memory where MADV_DONTFORK memory was");
    fill(wiped, 0, npages, 5);
    fill(fresh, 0, half, 6);
    bad |= check(wiped, 0, npages, 5, "child: wiped, written");
    bad |= check(fresh, 0, half, 6, "child: new memory, written");
    return bad;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    size_t npages = strtoull(argv[1], NULL, 10) << 8, bytes = npages * PAGE;
    uint64_t *kept = region(bytes, 0), *wiped = region(bytes, MADV_WIPEONFORK),
             *not_forked = region(bytes, MADV_DONTFORK);
    fill(kept, 0, npages, 1);
    fill(wiped, 0, npages, 2);
    fill(not_forked, 0, npages, 3);
    sleep(1);   /* (time to page out what the budget cannot hold) */
    pid_t pid = fork();
    if (pid < 0)
        return 2;
    if (pid == 0)
        _exit(child(kept, wiped, not_forked, npages));
    int status, bad = 0;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "wipefork: the child failed (status %#x)\n", status);
        bad = 1;
    }
    bad |= check(kept, 0, npages, 1, "parent: kept");
    bad |= check(wiped, 0, npages, 2, "parent: wiped");
    bad |= check(not_forked, 0, npages, 3, "parent: not forked");
    if (!bad)
        printf("ok\n");
    return bad;
}
