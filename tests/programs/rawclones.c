/* Children made by a raw clone(SIGCHLD), which runs no atfork handler, so
 * no one names them to the daemon: usage rawclones MIB COUNT.
 *
 * Fills MIB MiB (mostly paged out under the budget), then makes COUNT such
 * children one after another, each exiting at once, and checks every byte
 * of its own. Exit 0 and "ok" when all is intact. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "salted.h"

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    size_t npages = strtoull(argv[1], NULL, 10) << 8;
    int count = atoi(argv[2]);
    uint64_t *m = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return 2;
    fill(m, 0, npages, 1);
    sleep(1);   /* (time to page out what the budget cannot hold) */
    for (int i = 0; i < count; i++) {
        long child = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
        if (child == 0)
            syscall(SYS_exit_group, 0);
        if (child < 0 || waitpid((pid_t)child, NULL, 0) != child)
            return 2;
    }
    int bad = check(m, 0, npages, 1, "the parent");
    if (!bad)
        printf("ok\n");
    return bad;
}
