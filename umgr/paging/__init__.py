"""The paging engine of one target: its page table and the parts that serve
faults, evict, pin, apply hints and zap (docs/architecture.md)."""
