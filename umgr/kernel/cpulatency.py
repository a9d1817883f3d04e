"""A CPU latency request (PM QoS): while it is held, idle CPUs poll instead
of entering sleep states, so waking a thread on them is cheap.

The kernel keeps one request per open file of /dev/cpu_dma_latency
(Documentation/power/pm_qos_interface.rst): the value written, an s32 in
microseconds, is the wake-up latency the holder accepts; cpuidle picks no
state whose exit latency exceeds the smallest held value, and 0 leaves only
polling. Closing the file drops the request. The device is root's (0600).

Why umgr wants it: a fault's round trip is two cross-CPU wake-ups, the
faulting thread's to the daemon and back. On this kind of machine (a VM
whose idle vCPUs halt; haltpoll's own polling off) a C handler's round trip
measured 95 us with both sides blocking and 30 us with the handler
spinning; held at 0, 11 us and 7.5 us.

Only cpuidle reads the request. A kernel with no cpuidle driver registered
(current_driver reads "none": seen on a VM booted without haltpoll or ACPI
idle states) idles every CPU in the architecture's default way (a halt on
x86) whatever is held: there the request changes nothing.
"""
from __future__ import annotations

import os
import struct

DEVICE = "/dev/cpu_dma_latency"
NO_LIMIT = 2_000_000_000   # what the device reads when no request is held (PM_QOS_CPU_LATENCY_DEFAULT_VALUE)


CPUIDLE_DRIVER = "/sys/devices/system/cpu/cpuidle/current_driver"


def cpuidle_driver(path: str = CPUIDLE_DRIVER) -> str | None:
    """The cpuidle driver in use; None without one (the request then
    changes nothing)."""
    try:
        with open(path) as f:
            name = f.read().strip()
    except OSError:
        return None
    return None if name in ("", "none") else name


def current_limit(path: str = DEVICE) -> int:
    """The wake-up latency, in microseconds, cpuidle keeps to now: the
    smallest value any process holds (reading the device gives it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return struct.unpack("=i", os.read(fd, 4))[0]
    finally:
        os.close(fd)


class CpuLatencyRequest:
    def __init__(self, path: str = DEVICE):
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def hold(self, microseconds: int = 0) -> None:
        """Hold the request at `microseconds`; OSError if the device cannot
        be opened or written (not root, no such device)."""
        if self._fd is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, struct.pack("=i", microseconds))
            except OSError:
                os.close(fd)
                raise
            self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
