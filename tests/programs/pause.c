/* Paging in bursts with quiet times between: usage pause MIB [BURSTS].
 * Writes MIB MiB of salted pages (the first burst); then, for each further
 * burst (2 in all by default), prints "ready", waits for a line on stdin,
 * checks every page in order and writes each again with a new salt. Then
 * checks them all once more, prints "ok N pages", exit 0 when every byte
 * was right. */
#include <stdlib.h>
#include <sys/mman.h>

#include "salted.h"

static int wait_line(void)
{
    char line[16];
    printf("ready\n");
    fflush(stdout);
    return fgets(line, sizeof line, stdin) != NULL;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    size_t n = strtoull(argv[1], NULL, 10) << 8;
    int bursts = argc > 2 ? atoi(argv[2]) : 2;
    uint64_t *m = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED)
        return 1;
    uint64_t salt = 0x1111;
    fill(m, 0, n, salt);
    for (int b = 1; b < bursts; b++) {
        if (!wait_line())
            return 1;
        if (check(m, 0, n, salt, "burst"))
            return 1;
        salt += 0x1111;
        fill(m, 0, n, salt);
    }
    if (check(m, 0, n, salt, "last"))
        return 1;
    printf("ok %zu pages\n", n);
    return 0;
}
