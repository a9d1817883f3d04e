"""The numbers that shape a target's paging, in one place."""

MAX_FILL_PAGES = 256      # pages brought in per fault batch (staging buffer)
# A prefetch window takes at most this share of the budget (below 16 MiB,
# less than MAX_FILL_PAGES). At 4 MiB an eviction round swings between 448
# and 960 pages, and four threads' sequential scans with windows of 256
# pages each pushed out each other's windows before use: about one run in
# 15 of tests/programs/threads.c (40 MiB, 4 threads) took 30-60 s instead
# of 2, with 3x the pages read and 50k faults instead of 5k.
WINDOW_DIVISOR = 16
# Pages per eviction batch: a 16th of the budget, from 512 to 2048. Each
# batch has a fixed cost in the daemon (a process_vm_readv, write-protects
# and move-outs, a backend write, the tasks' hand-overs): a first touch of
# 1 GiB under 64 MiB spent 4.4-4.7 us of the evictor's CPU a page in
# batches of 512, 2.8-2.9 in batches of 1024, so about 1.7 ms a batch and
# 0.6 us a page. A first touch of 2 GiB under 256 MiB took 3.9 s in
# batches of 512 and 2.8-3.2 in batches of 2048. When faults come faster
# than that (Budget.rushed), a second batch is taken out while the first
# is put away. Batches were a 32nd of the budget; a 16th, with the
# headroom below left as it was, took 0.94-0.99x the time on the shapes at
# 64 MiB and 0.94x at 1 GiB under 128 MiB (the touch 0.91x), and the
# CPython workload at scale 0.2 under 64 MiB 0.96x, with 0.3-0.5% more
# faults (alternating runs, medians of 3-5: docs/architecture.md).
EVICT_BATCH = 512         # the smallest batch (and a COLD hint's)
EVICT_BATCH_MAX = 2048    # the largest (the size of the batch buffers)
EVICT_BATCH_DIVISOR = 16  # a batch is this share of the budget, between the two
# A rushed round's batches (Budget.rushed: faults outrun one batch, as in a
# first touch or a scan, and wait at the budget for each) are up to this
# share of it, within the same bounds, and the round goes one of them below
# the high mark: there a batch's fixed cost is the faults' time. At 64 MiB
# (a round's first batch 2048 pages there, against 1024) a first touch of
# 1 GiB took 0.85-0.91x the time and the evictor 0.77-0.87x its CPU; the
# other shapes and the CPython workload at 32 MiB did not change beyond
# noise (alternating runs, medians of 4-8: docs/architecture.md). The cost:
# such a round ends lower (84.4% of the budget at 64 MiB, 81.25% at 32,
# and up to a quarter batch lower still: RUSHED_TAIL_SHARE), which a
# program's next phase fills again; rounds of one batch, where
# faults come one at a time, keep the marks below.
RUSHED_BATCH_DIVISOR = 8
RUSHED_TAIL_SHARE = 4     # a rushed round's last batch: at least a 4th of its span (budget.py)
# The batch buffers' memory (up to two batches of the budget's share: 16
# MiB at 64 MiB) goes back to the kernel once a target's eviction task has
# waited this long for a round, and the fault loop's staging buffers' (up
# to 2 MiB) once it has slept this long; the next round touches them
# afresh (about 0.4 us a page). (Target.release_idle_buffers.)
BUFFERS_IDLE_SECONDS = 2.0
SPIN_SECONDS = 50e-6      # busy-poll the uffd this long before sleeping
RECHECK_SECONDS = 1.0     # how often pinned (mlocked, unreadable) and SHARED pages are looked at again
MAX_EVENTS_PER_READ = 64  # uffd messages read per read(2)
REMOVE_LINGER_SECONDS = 30e-6   # a batch ending in a REMOVE waits this long for the zap's next one

# Water marks under a budget of B pages, with batches of b pages. Eviction
# starts above the high mark, B less the headroom h (a 32nd of B, within
# the batches' bounds, at most B/16 and at least 16 pages), and a round
# goes down to the low mark, a batch lower. Where rounds are of one batch a
# target holds on average its budget less h + b/2: 93.75% of it at 64 and
# 128 MiB, more above. The headroom was two batches and the round two more
# (a 16th and an 8th of the budget up to 256 MiB): a tenth of the budget
# unused, where a program whose working set is about its budget faults on
# every page it lacks.
# CPython sorting and verifying 6 million ints at 200 MiB (bench_shapes'
# workload at scale 1, a third of its peak) took 114 s instead of 177
# (kernel swap: 59 s); the shapes at 64 MiB within noise (paired rounds).
# A burst has the headroom's room; a first touch of 2 GiB under 256 MiB
# took as long with two batches of it (2.3-2.7 s, alternating runs;
# docs/architecture.md).
HEADROOM_DIVISOR = 32
HIGH_WATER_DIVISOR = 16
HIGH_WATER_MIN_PAGES = 16

# Longest a fault waits for eviction at the budget. Past it the page comes in
# anyway: the evictor may itself be waiting on that fault (a page the zap
# agent or a process_vm_readv touches), and overshooting beats a deadlock.
BACKPRESSURE_LIMIT = 0.1
# While waiting at the budget, the fault loop looks at its uffd at least this
# often (the evictor's zap waits for its REMOVE events to be read).
BACKPRESSURE_POLL = 0.005
# A target paused on a full backend is retried when RESUME_MIN_SLOTS are free,
# at most this often. A retry write-protects and copies a batch and stores
# what the free slots take; pages read back while the store is full give
# their slots up (CleanCopies.suspended), and at 0.1 s a program reading its
# data back over a full store paged 4x slower than over an empty one.
RESUME_INTERVAL = 0.01
RESUME_MIN_SLOTS = 64
# A target paused on a failing backend (a write error) tries again after this.
BACKEND_RETRY_SECONDS = 0.1

# Default of --clean-copies (umgr/paging/cleancopies.py): pages read back
# from swap come in write-protected and keep their slot while most such
# pages leave again unwritten, so evicting them again is a zap with no read
# and no write.
CLEAN_COPIES = "auto"
# The smallest mappings a target's maps scans take up on their own once its
# mappings below --min-region hold half its budget (Target.found_small_mappings):
# node's V8 opens its heap 256 KiB at a time. Each region costs the daemon
# work of its own (a table file, an entry the C call searches, a line of
# every scan), so smaller pieces are left to the kernel unless asked for.
SMALLEST_ADOPTED_REGION = 256 << 10
