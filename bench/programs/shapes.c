/* Access-shape workload for bench/bench_shapes.py.
 *
 * Usage: shapes DATA_MIB PHASE[,PHASE...] [SEED [OPS [HOT_MIB]]]
 *
 * mmaps DATA_MIB MiB of anonymous private memory and first-touches it (the
 * phase "touch", always first): every 8-byte word i of page p holds
 * base(p, version) ^ (i * K), version 0. Then it runs the phases in order:
 *
 *   seq      one sequential pass over all pages, every word checked
 *   random   OPS uniform random page reads, each page checked
 *   hot      OPS page reads: 90% to a hot set of HOT_MIB of pages scattered
 *            over the data (a fixed random choice), 10% uniform
 *   rewrite  OPS random pages: read and checked, then rewritten with
 *            version + 1 (versions live in a separate malloc'd array)
 *   threads  4 pthreads, each OPS/4 uniform random page reads, checked
 *   seq2     a second sequential pass (any phase may be repeated; a
 *            repeated name is reported as name#2, name#3, ...)
 *
 * OPS defaults to min(65536, DATA_PAGES / 4), HOT_MIB to 64 (at most half
 * the data); SEED to 1. The PRNG is splitmix64, so a seed gives the same
 * pages in every run. Any word that reads back wrong: a message on stderr
 * and exit 1.
 *
 * Prints one JSON line on stdout:
 *   {"ok":true,"data_mib":..,"pages":..,"ops":..,"hot_pages":..,"seed":..,
 *    "phases":{"touch":s,"seq":s,..},"minflt":{"touch":n,..},
 *    "majflt":{..},"checksum":..,"peak_rss_kb":..,"agent_cpu_seconds":..}
 * minflt/majflt are getrusage(RUSAGE_SELF) deltas per phase; under umgr a
 * userfault counts as a minor fault. peak_rss_kb is ru_maxrss.
 * agent_cpu_seconds: CPU time of the umgr shim's agent thread (the thread
 * named umgr-agent, which moves and zaps evicted pages for the daemon), 0
 * without one.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <dirent.h>
#include <time.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define MAX_PHASES 64
#define NTHREADS 4
#define WORD_K 0xBF58476D1CE4E5B9ull

static uint64_t *data;
static uint32_t *versions;
static uint64_t npages;

static inline uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* A uniform page number in [0, n). */
static inline uint64_t below(uint64_t *state, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)splitmix64(state) * n) >> 64);
}

/* Different on every page and version; never a page of zeros, so neither
 * the kernel's nor umgr's zero-page shortcuts apply. */
static inline uint64_t page_base(uint64_t page, uint32_t version)
{
    uint64_t s = (page << 20) ^ version;
    return splitmix64(&s) | 1;
}

static void write_page(uint64_t page, uint32_t version)
{
    uint64_t *w = data + page * WORDS;
    uint64_t base = page_base(page, version);
    for (uint64_t i = 0; i < WORDS; i++)
        w[i] = base ^ (i * WORD_K);
}

static const char *current_phase = "";

/* Checks every word of the page; returns their sum. */
static uint64_t check_page(uint64_t page)
{
    const uint64_t *w = data + page * WORDS;
    uint32_t version = __atomic_load_n(&versions[page], __ATOMIC_RELAXED);
    uint64_t base = page_base(page, version);
    uint64_t sum = 0, bad = 0;
    for (uint64_t i = 0; i < WORDS; i++) {
        sum += w[i];
        bad |= w[i] ^ (base ^ (i * WORD_K));
    }
    if (bad) {
        for (uint64_t i = 0; i < WORDS; i++) {
            uint64_t want = base ^ (i * WORD_K);
            if (w[i] != want) {
                fprintf(stderr, "shapes: %s: page %" PRIu64 " word %" PRIu64 ": read %016" PRIx64
                        ", expected %016" PRIx64 " (version %u)\n", current_phase, page, i, w[i], want, version);
                break;
            }
        }
        exit(1);
    }
    return sum;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void faults(long *minflt, long *majflt)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *minflt = ru.ru_minflt;
    *majflt = ru.ru_majflt;
}

/* ---- the phases --------------------------------------------------------------- */
static uint64_t ops, *hot;
static uint64_t hot_pages;

static uint64_t phase_seq(uint64_t seed)
{
    (void)seed;
    uint64_t sum = 0;
    for (uint64_t p = 0; p < npages; p++)
        sum += check_page(p);
    return sum;
}

static uint64_t phase_random(uint64_t seed)
{
    uint64_t sum = 0, st = seed;
    for (uint64_t n = 0; n < ops; n++)
        sum += check_page(below(&st, npages));
    return sum;
}

static uint64_t phase_hot(uint64_t seed)
{
    uint64_t sum = 0, st = seed;
    for (uint64_t n = 0; n < ops; n++) {
        uint64_t r = below(&st, 10);
        uint64_t page = r < 9 ? hot[below(&st, hot_pages)] : below(&st, npages);
        sum += check_page(page);
    }
    return sum;
}

static uint64_t phase_rewrite(uint64_t seed)
{
    uint64_t sum = 0, st = seed;
    for (uint64_t n = 0; n < ops; n++) {
        uint64_t page = below(&st, npages);
        sum += check_page(page);
        versions[page]++;
        write_page(page, versions[page]);
    }
    return sum;
}

struct worker { pthread_t tid; uint64_t seed, sum; };

static void *thread_reads(void *arg)
{
    struct worker *w = arg;
    uint64_t st = w->seed;
    for (uint64_t n = 0; n < ops / NTHREADS; n++)
        w->sum += check_page(below(&st, npages));
    return NULL;
}

static uint64_t phase_threads(uint64_t seed)
{
    struct worker w[NTHREADS];
    uint64_t sum = 0;
    for (int t = 0; t < NTHREADS; t++) {
        w[t].seed = seed + 0x1000 * (t + 1);
        w[t].sum = 0;
        if (pthread_create(&w[t].tid, NULL, thread_reads, &w[t])) {
            fprintf(stderr, "shapes: pthread_create failed\n");
            exit(2);
        }
    }
    for (int t = 0; t < NTHREADS; t++) {
        pthread_join(w[t].tid, NULL);
        sum += w[t].sum;
    }
    return sum;
}

static const struct { const char *name; uint64_t (*run)(uint64_t); } PHASES[] = {
    {"seq", phase_seq}, {"random", phase_random}, {"hot", phase_hot},
    {"rewrite", phase_rewrite}, {"threads", phase_threads}, {"seq2", phase_seq},
};
#define NPHASES (sizeof(PHASES) / sizeof(PHASES[0]))

/* The first field of /proc/self/task/TID/schedstat, nanoseconds on a
   CPU, of the thread named umgr-agent (the shim names it so). */
static double agent_cpu_seconds(void)
{
    DIR *tasks = opendir("/proc/self/task");
    struct dirent *task;
    double seconds = 0;
    while (tasks && (task = readdir(tasks)) != NULL) {
        char path[300], comm[32] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", task->d_name);
        FILE *f = fopen(path, "r");
        if (f == NULL)
            continue;
        int named = fgets(comm, sizeof comm, f) != NULL && strcmp(comm, "umgr-agent\n") == 0;
        fclose(f);
        unsigned long long ns;
        snprintf(path, sizeof path, "/proc/self/task/%s/schedstat", task->d_name);
        if (named && (f = fopen(path, "r")) != NULL) {
            if (fscanf(f, "%llu", &ns) == 1)
                seconds = ns / 1e9;
            fclose(f);
        }
    }
    if (tasks)
        closedir(tasks);
    return seconds;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: shapes DATA_MIB PHASE[,PHASE...] [SEED [OPS [HOT_MIB]]]\n"
                        "phases: seq random hot rewrite threads seq2\n");
        return 2;
    }
    uint64_t mib = strtoull(argv[1], NULL, 10);
    uint64_t seed = argc > 3 ? strtoull(argv[3], NULL, 0) : 1;
    npages = mib * (1 << 20) / PAGE;
    ops = argc > 4 && atoll(argv[4]) > 0 ? (uint64_t)atoll(argv[4]) : (npages / 4 < 65536 ? npages / 4 : 65536);
    uint64_t hot_mib = argc > 5 ? strtoull(argv[5], NULL, 10) : 64;
    if (mib == 0 || ops == 0) {
        fprintf(stderr, "shapes: need DATA_MIB >= 1\n");
        return 2;
    }

    /* Parse the phase list before anything runs. */
    int order[MAX_PHASES], nphases = 0;
    char *list = strdup(argv[2]), *save = NULL;
    for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        size_t i;
        for (i = 0; i < NPHASES && strcmp(tok, PHASES[i].name); i++)
            ;
        if (i == NPHASES || nphases == MAX_PHASES) {
            fprintf(stderr, "shapes: unknown phase '%s' (or more than %d)\n", tok, MAX_PHASES);
            return 2;
        }
        order[nphases++] = (int)i;
    }

    data = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    versions = calloc(npages, sizeof(*versions));
    if (data == MAP_FAILED || !versions) {
        perror("shapes: mmap/calloc");
        return 2;
    }

    /* The hot set: hot_pages distinct pages, a partial Fisher-Yates shuffle
     * with its own seed (the same set whatever the phases). */
    hot_pages = hot_mib * (1 << 20) / PAGE;
    if (hot_pages > npages / 2)
        hot_pages = npages / 2 ? npages / 2 : 1;
    hot = malloc(hot_pages * sizeof(*hot));
    uint32_t *perm = malloc(npages * sizeof(*perm));
    if (!hot || !perm) {
        perror("shapes: malloc");
        return 2;
    }
    for (uint64_t p = 0; p < npages; p++)
        perm[p] = (uint32_t)p;
    uint64_t hst = seed ^ 0x484f54ull;
    for (uint64_t i = 0; i < hot_pages; i++) {
        uint64_t j = i + below(&hst, npages - i);
        uint32_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
        hot[i] = perm[i];
    }
    free(perm);

    char names[MAX_PHASES + 1][32];
    double secs[MAX_PHASES + 1];
    long minflt[MAX_PHASES + 1], majflt[MAX_PHASES + 1];
    long min0, maj0, min1, maj1;
    uint64_t checksum = 0;

    current_phase = "touch";
    faults(&min0, &maj0);
    double t0 = now();
    for (uint64_t p = 0; p < npages; p++)
        write_page(p, 0);
    secs[0] = now() - t0;
    faults(&min1, &maj1);
    strcpy(names[0], "touch");
    minflt[0] = min1 - min0;
    majflt[0] = maj1 - maj0;

    for (int k = 0; k < nphases; k++) {
        const char *name = PHASES[order[k]].name;
        int repeat = 1;
        for (int j = 0; j < k; j++)
            repeat += order[j] == order[k];
        if (repeat > 1)
            snprintf(names[k + 1], sizeof(names[k + 1]), "%s#%d", name, repeat);
        else
            snprintf(names[k + 1], sizeof(names[k + 1]), "%s", name);
        current_phase = names[k + 1];
        faults(&min0, &maj0);
        t0 = now();
        checksum += PHASES[order[k]].run(seed * 0x100 + k + 1);
        secs[k + 1] = now() - t0;
        faults(&min1, &maj1);
        minflt[k + 1] = min1 - min0;
        majflt[k + 1] = maj1 - maj0;
    }

    printf("{\"ok\":true,\"data_mib\":%" PRIu64 ",\"pages\":%" PRIu64 ",\"ops\":%" PRIu64 ",\"hot_pages\":%" PRIu64
           ",\"seed\":%" PRIu64 ",\"checksum\":%" PRIu64,
           mib, npages, ops, hot_pages, seed, checksum);
    const char *keys[3] = {"phases", "minflt", "majflt"};
    for (int f = 0; f < 3; f++) {
        printf(",\"%s\":{", keys[f]);
        for (int k = 0; k <= nphases; k++) {
            if (f == 0)
                printf("%s\"%s\":%.6f", k ? "," : "", names[k], secs[k]);
            else
                printf("%s\"%s\":%ld", k ? "," : "", names[k], f == 1 ? minflt[k] : majflt[k]);
        }
        printf("}");
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf(",\"peak_rss_kb\":%ld,\"agent_cpu_seconds\":%.6f}\n", ru.ru_maxrss, agent_cpu_seconds());
    return 0;
}
