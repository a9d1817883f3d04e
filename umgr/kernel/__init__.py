"""The typed layer over the kernel: userfaultfd (uffd), process memory and
pidfds (procmem), io_uring (ring), /proc/PID/maps (maps) and page-aligned
buffers. Kernel errnos become umgr.errors exceptions here, once.

This package's own module imports nothing but os: the submodules load the
cffi bindings, this one must stay cheap to import."""
import os as _os

# The base page size umgr is built for.
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

_kernel_page = _os.sysconf("SC_PAGE_SIZE")
if _kernel_page != PAGE_SIZE:
    raise ImportError(f"umgr is built for {PAGE_SIZE}-byte pages; this kernel's base page "
                      f"is {_kernel_page} bytes (os.sysconf('SC_PAGE_SIZE'))")
