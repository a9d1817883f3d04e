/* GNU sort of a text file, checked: the "sort" workload of bench/bench_shapes.py.
 *
 * Usage: sortrun INPUT
 *
 * Hashes INPUT's lines (a sum of per-line hashes: the same for any order),
 * then runs `sort INPUT` (LC_ALL=C: byte order) as a child with its output
 * on a pipe, and reads that output as it comes: every line must be at
 * least the one before it, and the lines must hash as the input's did.
 * The output goes to a pipe, not a file: a file's page cache would count
 * against the kernel's cgroup limit and not against umgr's budget.
 *
 * sort holds its input's text and a 32-byte record per line (and as much
 * again to merge into) in one buffer, and its comparisons read the text
 * of lines all over it: a working set the size of the whole buffer, used
 * in every pass of the merge sort and again as it writes the output.
 *
 * Prints one JSON line on stdout:
 *   {"ok":true,"phases":{"sort":s},"minflt":{"sort":n},"majflt":{"sort":n},
 *    "peak_rss_kb":..,"lines":..,"input_mib":..}
 * minflt/majflt/peak_rss_kb are sort's own (wait4's rusage); under umgr a
 * userfault counts as a minor fault. A check that fails: a message on
 * stderr and exit 1.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t line_hash(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;   /* FNV-1a, then splitmix64's finaliser */
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 0x100000001b3ull;
    h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
    h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
    return h ^ (h >> 31);
}

static void fail(const char *what)
{
    fprintf(stderr, "sortrun: %s\n", what);
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The lines of f: how many, and the sum of their hashes. */
static void hash_lines(FILE *f, uint64_t *count, uint64_t *sum)
{
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    *count = *sum = 0;
    while ((n = getline(&line, &cap, f)) > 0) {
        (*count)++;
        *sum += line_hash(line, (size_t)n);
    }
    free(line);
}

int main(int argc, char **argv)
{
    if (argc != 2)
        fail("usage: sortrun INPUT");
    FILE *in = fopen(argv[1], "r");
    if (!in)
        fail("cannot open the input");
    struct stat st;
    fstat(fileno(in), &st);
    uint64_t lines, sum;
    hash_lines(in, &lines, &sum);
    fclose(in);

    int out[2];
    if (pipe(out) < 0)
        fail("pipe");
    double started = now();
    pid_t pid = fork();
    if (pid < 0)
        fail("fork");
    if (pid == 0) {
        dup2(out[1], 1);
        close(out[0]);
        close(out[1]);
        setenv("LC_ALL", "C", 1);
        execlp("sort", "sort", argv[1], (char *)NULL);
        _exit(127);
    }
    close(out[1]);
    FILE *sorted = fdopen(out[0], "r");
    char *prev = NULL, *line = NULL;
    size_t prev_cap = 0, cap = 0, prev_len = 0;
    uint64_t got = 0, got_sum = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, sorted)) > 0) {
        /* C locale order: bytes, then the shorter first (the newline sorts
         * below any other byte of these lines). */
        size_t common = prev_len < (size_t)n ? prev_len : (size_t)n;
        int order = got ? memcmp(prev, line, common) : -1;
        if (order > 0 || (order == 0 && prev_len > (size_t)n))
            fail("sort's output is out of order");
        got++;
        got_sum += line_hash(line, (size_t)n);
        char *swap = prev;
        size_t swap_cap = prev_cap;
        prev = line, prev_cap = cap, prev_len = (size_t)n;
        line = swap, cap = swap_cap;
    }
    int status;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) != pid)
        fail("wait4");
    double seconds = now() - started;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail("sort failed");
    if (got != lines || got_sum != sum)
        fail("sort's output is not its input's lines");
    printf("{\"ok\":true,\"phases\":{\"sort\":%.6f},\"minflt\":{\"sort\":%ld},\"majflt\":{\"sort\":%ld},"
           "\"peak_rss_kb\":%ld,\"lines\":%llu,\"input_mib\":%.1f}\n",
           seconds, ru.ru_minflt, ru.ru_majflt, ru.ru_maxrss, (unsigned long long)lines,
           st.st_size / 1048576.0);
    free(prev);
    free(line);
    return 0;
}
