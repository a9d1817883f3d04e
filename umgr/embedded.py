"""`umgr exec`'s daemon: a child process that umgr exec restarts if it dies
while the program lives.

umgr exec forks the daemon (before any trio loop runs in it, so the child
starts clean), then runs the program. Both are its children, so the
daemon can die alone: a restart with the same socket and run directory
finds the page tables and the swap file the dead one left there
(umgr/daemon/statedir.py) and takes the program back, as a restarted
`umgr daemon` does; meanwhile the program's faults on paged-out memory
wait (its shim holds its userfaultfd). If umgr exec itself dies, the
daemon dies with it (PR_SET_PDEATHSIG) and every shim that sees its daemon
go checks UMGR_EXEC_PID: umgr exec gone, it kills its process at once.

The run directory, `STATE_DIR/exec-XXXX/`, holds the socket, the saved
tables and the swap file. umgr exec holds a lock on it while it runs; a
later umgr exec removes the directories of runs whose lock is free (their
umgr exec was killed, so nothing can come back for them).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import select
import tempfile
from dataclasses import dataclass, field

import trio

from umgr.backends.file import open_state_dir

log = logging.getLogger("umgr")

RUN_PREFIX = "exec-"
LOCK_NAME = "exec.lock"
SOCKET_NAME = "control.sock"   # the daemon's, in the run directory
TOTALS_NAME = "totals.json"
MAX_RESTARTS = 5          # daemon deaths one run survives; then the program is killed
EXEC_GRACE_SECONDS = 30   # how long a program waits for a restarted daemon (default of exec --grace)
PR_SET_PDEATHSIG = 1
FINISH = signal.SIGUSR1   # to the daemon: the program has exited; exit once no process is left
# Ignored by the daemon, which ends as above: a stop signal is the program's.
STOP_SIGNALS = {signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM}


def _run_dirs(state_dir: str) -> list[str]:
    """The run directories under state_dir, live or left by a killed exec."""
    try:
        return [os.path.join(state_dir, n) for n in os.listdir(state_dir) if n.startswith(RUN_PREFIX)]
    except OSError:
        return []


def sweep_stale_runs(state_dir: str) -> None:
    """Remove the run directories of umgr execs that were killed (their
    lock is free): their programs died with them."""
    for path in _run_dirs(state_dir):
        try:
            fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue   # being made, or not ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue   # its umgr exec runs
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        log.info("removed %s, left by a umgr exec that was killed", path)


def live_runs(state_dir: str) -> list[str]:
    """The control sockets of the umgr execs running under state_dir (their
    run directory's lock is held), oldest run first. Reads only: a run
    left by a killed exec is the next exec's to remove."""
    runs = []
    for path in _run_dirs(state_dir):
        try:
            fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(FileNotFoundError):   # (the run may end meanwhile)
                socket = os.path.join(path, SOCKET_NAME)
                os.stat(socket)
                runs.append((os.stat(path).st_mtime, socket))
        finally:
            os.close(fd)   # (a lock taken here goes with it)
    return [socket for _, socket in sorted(runs)]


def make_run_dir(state_dir: str) -> tuple[str, int]:
    """A new run directory in the (checked) state directory, and the
    descriptor of its lock, held until umgr exec ends."""
    os.close(open_state_dir(state_dir))   # made 0700 if missing, refused if not ours
    sweep_stale_runs(state_dir)
    # Made under another name and renamed once locked: another umgr exec's
    # sweep never sees it unlocked.
    making = tempfile.mkdtemp(prefix=".new-", dir=state_dir)
    lock = os.open(os.path.join(making, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    path = os.path.join(state_dir, RUN_PREFIX + os.path.basename(making)[len(".new-"):])
    os.rename(making, path)
    return path, lock


@dataclass
class Outcome:
    """What the daemon reported at its clean end (its own counts: a daemon
    that died took its counts with it)."""
    totals: dict = field(default_factory=dict)
    backend: dict = field(default_factory=dict)


class EmbeddedDaemon:
    """The daemon child of umgr exec. `serve(ready_fd)` runs in the child:
    it serves until told FINISH and no process is left, writes its totals
    to the run directory and returns its exit status."""

    def __init__(self, run_dir: str, serve, restartable: bool):
        self.run_dir = run_dir
        self._serve = serve
        self.restartable = restartable
        self.pid = 0
        self.pidfd = -1
        self.restarts = 0
        self._finishing = False

    # ---- in umgr exec --------------------------------------------------------------
    def start(self) -> None:
        """Fork the daemon and return once it serves its socket. Raises
        DaemonFailed when it exits before (it said why on stderr)."""
        ready_r, ready_w = os.pipe()
        parent = os.getpid()
        # Until the child ignores them, a stop signal would run exec's
        # handler there (which passes it on to the program) or, SIGTERM
        # before that handler, kill it: blocked across the fork.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            raise
        if pid == 0:
            os.close(ready_r)
            os._exit(self._child(parent, ready_w, mask))
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(ready_w)
        # Its process group here too (as in the child): a signal to exec's group
        # in between must not reach it. EACCES: it has exec'd; ESRCH: it is gone.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        self.pid, self.pidfd = pid, os.pidfd_open(pid)
        try:
            ready = os.read(ready_r, 1)
        finally:
            os.close(ready_r)
        if not ready:
            _, status = os.waitpid(pid, 0)
            os.close(self.pidfd)
            self.pidfd = -1
            raise DaemonFailed(os.waitstatus_to_exitcode(status))
        if self._finishing:
            os.kill(self.pid, FINISH)

    def finish(self) -> None:
        """The program has exited: the daemon exits once no process is left."""
        self._finishing = True
        os.kill(self.pid, FINISH)

    def reap(self) -> str:
        """After its pidfd fired: "done" (it ended as asked), "restarted"
        (it died, and a new one serves the same socket and state), or
        "lost" (it died and cannot be restarted)."""
        _, status = os.waitpid(self.pid, 0)
        os.close(self.pidfd)
        self.pidfd = -1
        code = os.waitstatus_to_exitcode(status)
        if code == 0 and self._finishing:
            return "done"
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        if not self.restartable or self.restarts >= MAX_RESTARTS:
            why = ("it cannot be restarted with this backend or with --record-trace" if not self.restartable
                   else f"it died {self.restarts + 1} times")
            log.error("umgr exec: the embedded daemon died (%s); %s", how, why)
            return "lost"
        self.restarts += 1
        log.warning("umgr exec: the embedded daemon died (%s); restarting it (%d of at most %d)",
                    how, self.restarts, MAX_RESTARTS)
        try:
            self.start()
        except DaemonFailed:
            return "lost"
        return "restarted"

    def outcome(self) -> Outcome:
        try:
            with open(os.path.join(self.run_dir, TOTALS_NAME)) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return Outcome()
        return Outcome(saved.get("totals", {}), saved.get("backend", {}))

    # ---- in the child ---------------------------------------------------------------
    def _child(self, parent: int, ready_fd: int, mask: set) -> int:
        # A process group of its own: a signal to umgr exec's group (a
        # terminal's ^C or ^Z, timeout(1)'s SIGTERM, kill -TERM -PGID) is
        # the program's business, and umgr exec forwards the others to it.
        # In the group, the daemon died of such a SIGTERM at once and was
        # restarted while the program shut down, and the run's figures went
        # with it. A stop signal to every process of the run (systemd's
        # default stop, `pkill -f`) reaches it anyway: it ignores them too,
        # and ends as it always does, when the program has (FINISH) or
        # umgr exec is gone (PR_SET_PDEATHSIG). Dying of it did nothing
        # but harm: the program shut down, reading back its paged-out
        # memory, while exec restarted the daemon, and where exec cannot
        # (--record-trace, two compressed tiers) the program was killed.
        # Out of the terminal's foreground group, its log lines would stop
        # it if the terminal is set to `tostop`: SIGTTOU is ignored (the
        # write then goes on).
        with contextlib.suppress(OSError):   # (nothing may raise out of the child here)
            os.setpgid(0, 0)   # (umgr exec does the same: whichever runs first)
        for signum in (*STOP_SIGNALS, signal.SIGTTOU):
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)   # (exec's, from before the fork)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            return 1   # umgr exec died before the line above
        try:
            return self._serve(ready_fd)
        except BaseException:   # the parent's main() must not run on in a child
            logging.getLogger("umgr").exception("umgr exec: the embedded daemon failed")
            return 125
        finally:
            logging.shutdown()


class DaemonFailed(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


async def serve_until_finished(daemon, ready_fd: int) -> None:
    """The child's trio main: serve, tell umgr exec it is ready, and after
    FINISH return once no target is left."""
    with trio.open_signal_receiver(FINISH) as finish:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.serve)
            os.write(ready_fd, b"r")
            os.close(ready_fd)
            async for _ in finish:
                break
            await daemon.idle.wait()
            nursery.cancel_scope.cancel()


def write_outcome(run_dir: str, totals: dict, backend: dict) -> None:
    path = os.path.join(run_dir, TOTALS_NAME)
    with open(path + ".tmp", "w") as f:
        json.dump({"totals": totals, "backend": backend}, f)
    os.replace(path + ".tmp", path)


def ended(*pidfds: int) -> list[int]:
    """The pidfds (processes) that have ended; blocks until one has."""
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll()]


