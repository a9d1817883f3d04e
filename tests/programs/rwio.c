/* read(2) and write(2) on buffers that are paged out: the kernel, not the
 * program, touches the pages (copy_from_user / copy_to_user), so the faults
 * are kernel-mode userfaults that the daemon must serve like any other.
 *
 * Usage: rwio MIB FILE
 * 1. A and B: two MIB MiB anonymous mmap'd buffers, each filled with its own
 *    pattern (B's pages get written, then paged out under a small budget).
 * 2. write(2) all of A to FILE (A is mostly paged out by then).
 * 3. read(2) FILE back into B (B is mostly paged out: the kernel's copy lands
 *    on missing pages whose old content must not win).
 * 4. Check every byte: A still holds A's pattern, B now holds A's pattern;
 *    then writev(2)/readv(2) of B's second half through 256 KiB iovecs into A's
 *    first half, and check again.
 * Exit 0 when everything is intact; 1 with a message at the first bad word. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "rss.h"

#define PAGE 4096
#define IOV_BYTES (256 << 10)

static uint64_t word_for(uint64_t seed, size_t i)
{
    uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
    x ^= x >> 31;
    return x * 0xBF58476D1CE4E5B9ull;
}

static void fill(uint64_t *w, size_t words, uint64_t seed)
{
    for (size_t i = 0; i < words; i++)
        w[i] = word_for(seed, i);
}

/* w[i] must equal word_for(seed, first + i) for i < words. */
static int check(const char *what, const uint64_t *w, size_t words, uint64_t seed, size_t first)
{
    for (size_t i = 0; i < words; i++)
        if (w[i] != word_for(seed, first + i)) {
            fprintf(stderr, "rwio: %s: word %zu (page %zu): %016llx, want %016llx\n", what, i, i * 8 / PAGE,
                    (unsigned long long)w[i], (unsigned long long)word_for(seed, first + i));
            return 1;
        }
    return 0;
}

static void *map(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("rwio: mmap");
        exit(2);
    }
    return p;
}

static void write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n <= 0) {
            perror("rwio: write");
            exit(2);
        }
        buf += n;
        len -= n;
    }
}

static void read_all(int fd, char *buf, size_t len)
{
    while (len) {
        ssize_t n = read(fd, buf, len);
        if (n <= 0) {
            fprintf(stderr, "rwio: read: %s\n", n ? strerror(errno) : "short file");
            exit(2);
        }
        buf += n;
        len -= n;
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: rwio MIB FILE\n");
        return 2;
    }
    size_t bytes = strtoull(argv[1], NULL, 10) << 20, words = bytes / 8;
    const uint64_t seed_a = 0xA5A5A5A5A5A5A5A5ull, seed_b = 0x5A5A5A5A12345678ull;
    uint64_t *a = map(bytes), *b = map(bytes);
    fill(a, words, seed_a);
    fill(b, words, seed_b);

    int fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) {
        perror("rwio: open");
        return 2;
    }
    write_all(fd, (const char *)a, bytes);   /* the kernel reads A's swapped pages */
    if (lseek(fd, 0, SEEK_SET) != 0) {
        perror("rwio: lseek");
        return 2;
    }
    read_all(fd, (char *)b, bytes);          /* the kernel writes onto B's swapped pages */
    if (check("A after write(2)", a, words, seed_a, 0) || check("B after read(2)", b, words, seed_a, 0))
        return 1;

    /* Vectored: B's second half out through 256 KiB iovecs, back into A's first half. */
    size_t half = bytes / 2, niov = half / IOV_BYTES;
    struct iovec *iov = calloc(niov, sizeof *iov);
    if (ftruncate(fd, 0) != 0 || lseek(fd, 0, SEEK_SET) != 0) {
        perror("rwio: truncate");
        return 2;
    }
    for (size_t i = 0; i < niov; i++)
        iov[i] = (struct iovec){(char *)b + half + i * IOV_BYTES, IOV_BYTES};
    if (writev(fd, iov, (int)niov) != (ssize_t)half) {
        perror("rwio: writev (short)");
        return 2;
    }
    for (size_t i = 0; i < niov; i++)
        iov[i] = (struct iovec){(char *)a + i * IOV_BYTES, IOV_BYTES};
    if (lseek(fd, 0, SEEK_SET) != 0 || readv(fd, iov, (int)niov) != (ssize_t)half) {
        perror("rwio: readv (short)");
        return 2;
    }
    close(fd);
    if (check("A's first half after readv(2)", a, half / 8, seed_a, half / 8) ||
        check("A's second half after readv(2)", a + half / 8, half / 8, seed_a, half / 8) ||
        check("B after writev(2)", b, words, seed_a, 0))
        return 1;

    printf("ok %zu MiB rss_kb %ld\n", bytes >> 20, rss_kb());
    return 0;
}
