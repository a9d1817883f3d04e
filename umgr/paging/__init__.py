"""The paging engine of one target: its page table and the parts that serve
faults, evict, pin, apply hints and zap (docs/architecture.md)."""

# np.unique imports numpy.ma on its first call (14 ms, measured): here, at
# the daemon's start, not in the middle of a target's first faults.
import numpy.ma  # noqa: F401
