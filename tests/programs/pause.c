/* Paging in two bursts with a quiet time between: usage pause MIB.
 * Writes MIB MiB of salted pages, prints "ready" and waits for a line on
 * stdin; then checks every page, writes each again with a new salt and
 * checks them all once more. Prints "ok N pages", exit 0 when every byte
 * was right. */
#include <stdlib.h>
#include <sys/mman.h>

#include "salted.h"

int main(int argc, char **argv)
{
    if (argc != 2)
        return 2;
    size_t n = strtoull(argv[1], NULL, 10) << 8;
    uint64_t *m = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return 1;
    fill(m, 0, n, 0x1111);
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    if (check(m, 0, n, 0x1111, "first"))
        return 1;
    fill(m, 0, n, 0x2222);
    if (check(m, 0, n, 0x2222, "second"))
        return 1;
    printf("ok %zu pages\n", n);
    return 0;
}
