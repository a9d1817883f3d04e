"""The compressed store's memory, kept by the service manager while
`umgr daemon` restarts: systemd's file descriptor store (sd_notify(3)
FDSTORE=1, sd_listen_fds(3)), without libsystemd.

umgr exec holds its daemon's memfd itself; a standalone daemon has no
parent to do that. Under systemd, with FileDescriptorStoreMax= set in the
unit, the daemon sends its memfd to the service manager (FDSTORE=1 with a
name, and FDPOLL=0: a memfd never hangs up), which passes it back to the
next start of the unit: at descriptor 3 onwards, $LISTEN_FDS of them,
named in $LISTEN_FDNAMES, for the process $LISTEN_PID. A clean stop takes
it out of the store (FDSTOREREMOVE=1): every page is back by then.

systemd keeps a descriptor only where the unit sets FileDescriptorStoreMax=
(0 by default), and answers nothing either way, so a daemon cannot know
whether its memory will come back. A start that finds saved tables but no
memfd, one holding no store, or another memfd than theirs (the state
directory keeps its name, which has a random part) takes none of the dead daemon's
programs back: they are killed at once, never served zeros. A memfd
passed back and not taken over is closed, and a new one stored.
"""
from __future__ import annotations

import logging
import os

from umgr.daemon.notify import notify

log = logging.getLogger("umgr.daemon")

STORE_NAME = "umgr-store"
LISTEN_FDS_START = 3   # SD_LISTEN_FDS_START
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def available() -> bool:
    """Whether a service manager may hold descriptors for this daemon."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def passed() -> dict[str, int]:
    """The descriptors the service manager passed this process, by name
    (sd_listen_fds_with_names), made close-on-exec. The variables that
    named them are unset, as sd_listen_fds(1) does: they are this
    process's, not its children's."""
    pid, count, names = (os.environ.pop(name, "") for name in LISTEN_VARIABLES)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return {}
    names = names.split(":") if names else []
    fds: dict[str, int] = {}
    for i in range(int(count)):
        fd = LISTEN_FDS_START + i
        name = names[i] if i < len(names) else "unknown"
        try:
            os.set_inheritable(fd, False)
        except OSError:   # (not open: a miscounted $LISTEN_FDS)
            continue
        if name in fds:
            os.close(fd)   # (umgr stores one of each name)
        else:
            fds[name] = fd
    return fds


def take(name: str) -> int:
    """The descriptor `name` the service manager passed (-1: none); any
    other it passed is closed and taken out of its store (umgr stores
    nothing else, and the store holds at most FileDescriptorStoreMax=)."""
    fds = passed()
    found = fds.pop(name, -1)
    for other, fd in fds.items():
        log.info("closing descriptor %d (%s) the service manager passed: umgr stores none by that name", fd, other)
        os.close(fd)
        remove(other)
    return found


def store(fd: int, name: str) -> bool:
    """Hand `fd` to the service manager's store as `name`, in place of any
    it holds by that name. True when sent (not: kept; see above)."""
    return notify("FDSTOREREMOVE=1", f"FDNAME={name}") and \
        notify("FDSTORE=1", f"FDNAME={name}", "FDPOLL=0", fds=(fd,))


def remove(name: str) -> None:
    """Take `name` out of the service manager's store (a clean stop)."""
    notify("FDSTOREREMOVE=1", f"FDNAME={name}")
