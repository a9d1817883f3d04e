"""C helpers for tests that touch userfaultfd-registered memory.

A Python thread that touches registered memory holds the GIL while it waits
for the fault to be served, and the Python handler in the same process then
never runs. These functions touch memory in C; cffi releases the GIL around
every call, so a Python thread blocked in one of them lets the handler run.
fork_check() forks a child that runs only C code (the parent's other threads
hold locks the child must not need).

The page pattern: the 64-bit word w of page p (counted from the start of the
buffer, plus `first`) is seed * 0x9E3779B97F4A7C15 + (p << 20) + w.
"""

import hashlib
import importlib.util
import os

import cffi

CDEF = """
void *h_map(size_t len);
void *h_map_shared(int fd, size_t len);
void *h_mremap(void *old, size_t len, void *new_addr);
int h_unmap(void *addr, size_t len);
void h_fill(void *addr, size_t npages, uint64_t first, uint64_t seed);
int64_t h_check(const void *addr, size_t npages, uint64_t first, uint64_t seed);
void h_write_byte(void *addr, uint8_t value);
int h_fork_check(void *addr, size_t npages, uint64_t first, uint64_t seed);
int h_discard_every_other(void *addr, size_t npages, unsigned gap_us);
"""

SOURCE = """
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static uint64_t h_word(uint64_t page, uint64_t w, uint64_t seed)
{
    return seed * 0x9E3779B97F4A7C15ULL + (page << 20) + w;
}

void *h_map(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void *h_map_shared(int fd, size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}

void *h_mremap(void *old, size_t len, void *new_addr)
{
    void *p = mremap(old, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr);
    return p == MAP_FAILED ? NULL : p;
}

int h_unmap(void *addr, size_t len)
{
    return munmap(addr, len);
}

/* MADV_DONTNEED on pages 0, 2, 4, ... one call each, as a zap of
   scattered pages does: each waits until its REMOVE event is read; then
   gap_us microseconds pass before the next. */
int h_discard_every_other(void *addr, size_t npages, unsigned gap_us)
{
    for (size_t p = 0; p < npages; p += 2) {
        if (madvise((char *)addr + p * 4096, 4096, MADV_DONTNEED))
            return -1;
        if (gap_us)
            usleep(gap_us);
    }
    return 0;
}

void h_fill(void *addr, size_t npages, uint64_t first, uint64_t seed)
{
    volatile uint64_t *q = addr;
    for (size_t p = 0; p < npages; p++)
        for (size_t w = 0; w < 512; w++)
            q[p * 512 + w] = h_word(first + p, w, seed);
}

/* -1 when every page matches, else the index of the first bad page. */
int64_t h_check(const void *addr, size_t npages, uint64_t first, uint64_t seed)
{
    const volatile uint64_t *q = addr;
    for (size_t p = 0; p < npages; p++)
        for (size_t w = 0; w < 512; w++)
            if (q[p * 512 + w] != h_word(first + p, w, seed))
                return (int64_t)p;
    return -1;
}

void h_write_byte(void *addr, uint8_t value)
{
    *(volatile uint8_t *)addr = value;
}

/* The child checks the pattern and exits 0, or 1 on a mismatch.
   A raw fork, not glibc's: glibc holds its malloc locks across the fork
   syscall, and with UFFD_EVENT_FORK that syscall waits until the event is
   read, so a handler thread in this process that mallocs would deadlock. */
int h_fork_check(void *addr, size_t npages, uint64_t first, uint64_t seed)
{
    pid_t pid = (pid_t)syscall(SYS_fork);
    if (pid == 0)
        _exit(h_check(addr, npages, first, seed) < 0 ? 0 : 1);
    return pid;
}
"""

_lib = None
_ffi = None


def load():
    """(ffi, lib), compiled once per source version under build/."""
    global _ffi, _lib
    if _lib is None:
        tag = hashlib.sha256((CDEF + SOURCE).encode()).hexdigest()[:12]
        name = f"_umgr_test_ctouch_{tag}"
        root = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
        tmpdir = os.path.abspath(os.path.join(root, "build", "test-helpers"))
        builder = cffi.FFI()
        builder.cdef(CDEF)
        builder.set_source(name, SOURCE, extra_compile_args=["-O1"])
        path = builder.compile(tmpdir=tmpdir)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _ffi, _lib = module.ffi, module.lib
    return _ffi, _lib
