"""Probing the running kernel by real calls, not version numbers."""
from __future__ import annotations

import functools
import mmap
import os
import signal

import numpy as np

from umgr import procmem, protocol


@functools.cache
def remote_zap_supported() -> bool:
    """Does process_madvise(MADV_DONTNEED) work on another process? Upstream
    allows only WILLNEED, COLD, PAGEOUT and COLLAPSE remotely (EINVAL)."""
    page = mmap.mmap(-1, 4096)
    page[0] = 1
    addr = np.frombuffer(page, np.uint8).ctypes.data
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    try:
        pidfd = procmem.pidfd_open(pid)
        try:
            procmem.process_madvise(pidfd, np.array([addr], np.uint64), np.array([4096], np.uint64),
                                    procmem.MADV_DONTNEED)
            return True
        except OSError:
            return False
        finally:
            os.close(pidfd)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        page.close()


def zap_mode() -> protocol.ZapMode:
    return protocol.ZapMode.REMOTE if remote_zap_supported() else protocol.ZapMode.AGENT
