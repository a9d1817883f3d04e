"""A target's name: the label its metrics carry by default.

Names, not pids, keep the number of series bounded: a pid is new for every
process (a shell pipeline or a launcher makes dozens), a name is shared by
every run of the same program. In order of preference: what the program's
environment asks for (UMGR_NAME, carried by the shim's HELLO), the systemd
service it runs in, the file name it was run by.
"""
from __future__ import annotations

import os

NAME_MAX = 63  # the HELLO's field, less its NUL
COMM_MAX = 15  # bytes of a task's comm: TASK_COMM_LEN less its NUL


def target_name(pid: int, requested: str = "") -> str:
    return _clean(requested) or service_of(pid) or run_name_of(pid) or "unknown"


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


def run_name_of(pid: int) -> str:
    """The name the program was run by: its comm, the file name it was
    executed as (what ps and top show; a symbolic link keeps its own name,
    as redis-server does, a link to redis-check-rdb, and a script its), or
    the file name of /proc/PID/exe where comm is that name cut to the
    kernel's COMM_MAX bytes, or cannot be read. Bytes, as the kernel keeps
    them: a cut may split a UTF-8 character, and a file name need not be
    UTF-8 at all (os.fsdecode keeps such bytes; _clean shows them as ?)."""
    comm = _first_line(f"/proc/{pid}/comm")
    try:
        exe = os.fsencode(os.path.basename(os.readlink(f"/proc/{pid}/exe"))).removesuffix(b" (deleted)")
    except OSError:
        exe = b""
    if comm and not (len(comm) == COMM_MAX and exe.startswith(comm)):
        return _clean(os.fsdecode(comm))
    return _clean(os.fsdecode(exe or comm))


def _first_line(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.readline().rstrip(b"\n")
    except OSError:
        return b""


def _clean(name: str) -> str:
    """Printable, at most NAME_MAX characters: it ends up in label values,
    log lines and table rows."""
    return "".join(ch if ch.isprintable() else "?" for ch in name.strip())[:NAME_MAX]
