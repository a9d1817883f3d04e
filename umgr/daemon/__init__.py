"""The daemon: control socket server, target lifecycle, status."""
from umgr.daemon.server import HELLO_TIMEOUT, STATUS_REQUEST, Daemon, DaemonConfig, printable

__all__ = ["HELLO_TIMEOUT", "STATUS_REQUEST", "Daemon", "DaemonConfig", "printable"]
