"""The daemon: the control socket server (server.py), the targets' life
cycle (lifecycle.py), what it reports (status.py) and its settings
(config.py), a clean stop (shutdown.py)."""
from umgr.daemon.config import HELLO_TIMEOUT, DaemonConfig
from umgr.daemon.server import BUDGET_REQUEST, STATUS_REQUEST, Daemon, printable

__all__ = ["BUDGET_REQUEST", "HELLO_TIMEOUT", "STATUS_REQUEST", "Daemon", "DaemonConfig", "printable"]
