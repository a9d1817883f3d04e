/* A large reservation of which little is used, as runtimes and databases
 * make: maps GIB GiB with MAP_NORESERVE, fills its first and last USED_MIB/2
 * MiB with a known pattern, prints "ready", waits for stdin to reach EOF,
 * then checks every byte it wrote and that an untouched page in the middle
 * reads zero. Usage: reserve GIB USED_MIB [spread]. With "spread" the
 * used pages lie evenly across the whole mapping instead, one page every
 * GIB GiB / (USED_MIB MiB / 4 KiB). Exit 0 and "ok N pages" when all is
 * intact (then it unmaps it all); 1 and a message at the first wrong word. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

static uint64_t word_for(size_t page, size_t word)
{
    return (page * 0x9E3779B97F4A7C15ull) ^ (word * 0xBF58476D1CE4E5B9ull) ^ 0xA5;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: reserve GIB USED_MIB\n");
        return 2;
    }
    size_t npages = (strtoull(argv[1], NULL, 10) << 30) / PAGE;
    size_t half = (strtoull(argv[2], NULL, 10) << 20) / PAGE / 2;
    uint64_t *mem = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                         -1, 0);
    if (mem == MAP_FAILED) {
        perror("reserve: mmap");
        return 2;
    }
    int spread = argc > 3 && strcmp(argv[3], "spread") == 0;
    size_t stride = spread ? npages / (2 * half) : 0;
    for (size_t i = 0; i < 2 * half; i++) {
        size_t p = spread ? i * stride : i < half ? i : npages - 2 * half + i;
        for (size_t w = 0; w < PAGE / 8; w++)
            mem[p * (PAGE / 8) + w] = word_for(p, w);
    }
    printf("ready\n");
    fflush(stdout);
    char buf[64];
    while (read(0, buf, sizeof buf) > 0)
        ;
    for (size_t i = 0; i < 2 * half; i++) {
        size_t p = spread ? i * stride : i < half ? i : npages - 2 * half + i;
        for (size_t w = 0; w < PAGE / 8; w++)
            if (mem[p * (PAGE / 8) + w] != word_for(p, w)) {
                fprintf(stderr, "reserve: page %zu word %zu: %016llx, want %016llx\n", p, w,
                        (unsigned long long)mem[p * (PAGE / 8) + w], (unsigned long long)word_for(p, w));
                return 1;
            }
    }
    if (mem[(npages / 2 + 1) * (PAGE / 8)] != 0) {
        fprintf(stderr, "reserve: an untouched page does not read zero\n");
        return 1;
    }
    printf("ok %zu pages\n", 2 * half);
    fflush(stdout);
    munmap(mem, npages * PAGE);   /* the daemon hears of it (an UNMAP), as a program freeing a heap does */
    return 0;
}
