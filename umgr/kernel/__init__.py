"""The typed layer over the kernel: userfaultfd (uffd), process memory and
pidfds (procmem), io_uring (ring), /proc/PID/maps (maps) and page-aligned
buffers. Kernel errnos become umgr.errors exceptions here, once."""
