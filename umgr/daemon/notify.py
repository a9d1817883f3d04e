"""Readiness for systemd (Type=notify): the sd_notify(3) datagram, without
libsystemd.

systemd passes the path of a datagram socket in $NOTIFY_SOCKET ('@' starts
an abstract name); a service says it is ready by sending "READY=1" there.
The daemon sends it once its control socket listens, so units ordered
After=umgr.service find a daemon that accepts connections.
"""
from __future__ import annotations

import array
import logging
import os
import socket

log = logging.getLogger("umgr.daemon")


def notify(*assignments: str, fds: tuple[int, ...] = ()) -> bool:
    """Send assignments such as "READY=1" to the service manager, with
    file descriptors `fds` (SCM_RIGHTS: FDSTORE=1, umgr/daemon/fdstore.py);
    False when there is none ($NOTIFY_SOCKET unset). A failed send is
    logged: the daemon serves regardless (systemd then times the start out)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendmsg(["\n".join(assignments).encode()], rights)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", path, exc.strerror or exc)
        return False
    return True
