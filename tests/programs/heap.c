/* Many small malloc()s: glibc grows its brk heap with internal calls the
 * shim's mmap wrapper never sees. Usage: heap MIB; writes MIB of 500-byte
 * blocks with known patterns, then checks them all. Exit 0 when every byte
 * is right. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 500

static unsigned char byte_of(size_t block, size_t i)
{
    return (unsigned char)((block * 2654435761u + i * 40503u) >> 7);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    size_t nblocks = (strtoull(argv[1], NULL, 10) << 20) / BLOCK;
    unsigned char **blocks = calloc(nblocks, sizeof *blocks); /* small: stays below the threshold */
    if (blocks == NULL)
        return 2;
    for (size_t b = 0; b < nblocks; b++) {
        blocks[b] = malloc(BLOCK);
        if (blocks[b] == NULL)
            return 2;
        for (size_t i = 0; i < BLOCK; i++)
            blocks[b][i] = byte_of(b, i);
    }
    for (size_t b = 0; b < nblocks; b++) {
        for (size_t i = 0; i < BLOCK; i++)
            if (blocks[b][i] != byte_of(b, i)) {
                fprintf(stderr, "block %zu byte %zu is %u, want %u\n", b, i, blocks[b][i], byte_of(b, i));
                return 1;
            }
    }
    for (size_t b = 0; b < nblocks; b++) /* the allocator's own free() meets its own blocks */
        free(blocks[b]);
    free(blocks);
    printf("ok %zu blocks\n", nblocks);
    return 0;
}
