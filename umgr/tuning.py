"""The numbers that shape a target's paging, in one place."""

MAX_FILL_PAGES = 256      # pages brought in per fault batch (staging buffer)
EVICT_BATCH = 512         # pages per eviction batch
SPIN_SECONDS = 50e-6      # busy-poll the uffd this long before sleeping
RECHECK_SECONDS = 1.0     # how often pinned (mlocked, unreadable) and SHARED pages are looked at again
# Longest a fault waits for eviction at the budget. Past it the page comes in
# anyway: the evictor may itself be waiting on that fault (a page the zap
# agent or a process_vm_readv touches), and overshooting beats a deadlock.
BACKPRESSURE_LIMIT = 0.1
