"""A target's name: the label its metrics carry by default.

Names, not pids, keep the number of series bounded: a pid is new for every
process (a shell pipeline or a launcher makes dozens), a name is shared by
every run of the same program. In order of preference: what the program's
environment asks for (UMGR_NAME, carried by the shim's HELLO), the systemd
service it runs in, the executable's file name.
"""
from __future__ import annotations

import os

NAME_MAX = 63  # the HELLO's field, less its NUL


def target_name(pid: int, requested: str = "") -> str:
    return _clean(requested) or service_of(pid) or executable_of(pid) or "unknown"


def service_of(pid: int) -> str:
    """The systemd service unit whose cgroup holds the process, or ""."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return service_in(f.read())
    except OSError:
        return ""


def service_in(cgroups: str) -> str:
    """The service named by /proc/PID/cgroup text: the unified hierarchy's
    path ("0::/system.slice/NAME.service"), or on a legacy or hybrid host
    systemd's own ("1:name=systemd:/system.slice/NAME.service"). Scopes and
    sessions are not names: their unit names carry a fresh number each."""
    for line in cgroups.splitlines():
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        if controllers in ("", "name=systemd"):
            unit = path.rstrip("/").rpartition("/")[2]
            if unit.endswith(".service"):
                return _clean(unit)
    return ""


def executable_of(pid: int) -> str:
    """The file name of the program the process runs (/proc/PID/exe), or
    its comm if that link cannot be read."""
    try:
        return _clean(os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)"))
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/comm") as f:
            return _clean(f.read().strip())
    except OSError:
        return ""


def _clean(name: str) -> str:
    """Printable, at most NAME_MAX characters: it ends up in label values,
    log lines and table rows."""
    return "".join(ch if ch.isprintable() else "?" for ch in name.strip())[:NAME_MAX]
