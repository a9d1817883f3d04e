/* Pages pinned for I/O under a budget far below the data: usage pinned MIB FILE [split].
 *
 * 4 MiB in the middle of a MIB MiB region are io_uring's registered buffer
 * (IORING_REGISTER_BUFFERS pins them: a device writes those physical pages
 * for as long as they stay registered). The region is written (salt 1) and
 * checked under the budget, which evicts everything else around the
 * buffer; then the buffer is filled from FILE (salt 9, written here) by
 * IORING_OP_READ_FIXED and checked: a buffer page the daemon had taken out
 * of the process would show its old content, the read's data gone to the
 * page io_uring still holds. With "split", every other MiB of the region is
 * MADV_DONTDUMP, so it is many mappings (as madvise flags, anonymous names
 * or hugepage advice make them), and eviction batches cross their ends.
 * Exit 0 when every byte is right. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "salted.h"

#define BUFFER_PAGES 1024

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    size_t n = strtoull(argv[1], NULL, 10) << 8;
    uint64_t *m = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED || n < 2 * BUFFER_PAGES)
        return 2;
    size_t first = n / 2;   /* the buffer's first page */
    uint64_t *buffer = m + first * WORDS;
    struct io_uring ring;
    if (io_uring_queue_init(4, &ring, 0) != 0)
        return 2;
    fill(m, first, BUFFER_PAGES, 1);   /* (registering faults them in) */
    struct iovec iov = {buffer, BUFFER_PAGES * PAGE};
    int err = io_uring_register_buffers(&ring, &iov, 1);
    if (err) {
        fprintf(stderr, "io_uring_register_buffers: %d\n", err);
        return 2;
    }
    if (argc > 3 && strcmp(argv[3], "split") == 0)
        for (size_t p = 0; p + 256 <= n; p += 512)
            if (madvise(m + p * WORDS, 256 * PAGE, MADV_DONTDUMP) != 0) {
                perror("madvise");
                return 2;
            }
    fill(m, 0, n, 1);
    int bad = check(m, 0, n, 1, "the region, its middle pinned");
    bad |= check(m, 0, n, 1, "the region again");

    /* The file: the buffer's pages with salt 9, from a buffer of its own. */
    uint64_t *pattern = malloc(BUFFER_PAGES * PAGE);
    if (pattern == NULL)
        return 2;
    for (size_t p = 0; p < BUFFER_PAGES; p++)
        for (size_t w = 0; w < WORDS; w++)
            pattern[p * WORDS + w] = ((first + p) * WORDS + w) ^ 9;
    int fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || write(fd, pattern, BUFFER_PAGES * PAGE) != BUFFER_PAGES * PAGE)
        return 2;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
    io_uring_prep_read_fixed(sqe, fd, buffer, BUFFER_PAGES * PAGE, 0, 0);
    struct io_uring_cqe *cqe;
    if (io_uring_submit_and_wait(&ring, 1) != 1 || io_uring_wait_cqe(&ring, &cqe) != 0)
        return 2;
    if (cqe->res != BUFFER_PAGES * PAGE) {
        fprintf(stderr, "read_fixed: %d\n", cqe->res);
        return 2;
    }
    io_uring_cqe_seen(&ring, cqe);
    bad |= check(m, first, BUFFER_PAGES, 9, "the registered buffer after a READ_FIXED");
    bad |= check(m, 0, first, 1, "below the buffer");
    bad |= check(m, first + BUFFER_PAGES, n - first - BUFFER_PAGES, 1, "above the buffer");
    io_uring_queue_exit(&ring);
    close(fd);
    return bad;
}
