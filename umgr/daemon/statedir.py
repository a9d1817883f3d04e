"""What a standalone daemon keeps in its state directory so that, restarted
after a crash with the same --socket and --state-dir, it can take its
programs back: the swap file (named, not unlinked) and each target's page
table (umgr/paging/tablefile.py) with the process's identity.

Layout, in a directory of its own per control socket (two daemons of one
state directory never share files):

    STATE_DIR/daemon-HASH/        0700, locked (flock) while a daemon runs
        boot                      the boot id the files belong to
        backend                   the stores they were saved with (names, in order)
        memory                    the memfd their store in memory is in (its name)
        swap                      the swap file (umgr/backends/file.py)
        t-PID-START/              one per target: START is the process's
            target.json           start time (clock ticks after boot), so
            events                a pid reused by another process never
            rFFFF...              matches; then the uffd messages read and
                                  not yet applied, and its page table's files

Everything is opened relative to directory descriptors with O_NOFOLLOW,
inside the state directory the daemon checked (its own, mode 0700).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass

from umgr.backends.file import open_state_dir
from umgr.backends.region import memfd_name
from umgr.errors import BackendError
from umgr.kernel.procmem import process_start_time
from umgr.paging.pagetable import PageTable
from umgr.paging.tablefile import RECORD, EventJournal, FileArrays, remove_all
from umgr.paging.tuning import MAX_EVENTS_PER_READ

log = logging.getLogger("umgr.daemon")

SWAP_NAME = "swap"
BACKEND_NAME = "backend"   # the stores the tables were saved with (backends.chain_identity)
MEMORY_NAME = "memory"     # the name of the memfd a store in memory keeps its pages in
TARGET_PREFIX = "t-"
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _boot_id() -> str:
    with open(BOOT_ID) as f:
        return f.read().strip()


def _write_record(name: str, info: dict, flag: int, dir_fd: int) -> None:
    """A target's record, in one write (created with `flag`: O_EXCL, or
    O_TRUNC over a file of ours)."""
    data = json.dumps(info).encode()
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | flag | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, f"{name}: short write")
    finally:
        os.close(fd)


@dataclass(eq=False)
class SavedTarget:
    """One target's files: its directory and its table's arrays."""
    pid: int
    start_time: int
    dir_name: str
    dir_fd: int
    arrays: FileArrays
    info: dict
    journal: EventJournal            # the uffd messages read and not yet applied (tablefile.py)
    table: PageTable | None = None   # loaded from the files (a target of the dead daemon)


class StateDir:
    def __init__(self, state_dir: str, socket_path: str):
        key = hashlib.sha256(os.path.abspath(socket_path).encode()).hexdigest()[:16]
        self.path = os.path.join(state_dir, f"daemon-{key}")
        top = open_state_dir(state_dir)
        try:
            self.dir_fd = open_state_dir(f"daemon-{key}", top)
        finally:
            os.close(top)
        self._lock_fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                dir_fd=self.dir_fd)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackendError(f"another daemon serves {socket_path} (its state in {self.path} is locked)") from None
        self.saved: dict[int, SavedTarget] = {}   # by pid: the dead daemon's targets, until resumed
        self._load()

    # ---- the dead daemon's targets ------------------------------------------------
    def _load(self) -> None:
        boot = _boot_id()
        same_boot = self._read("boot") == boot
        for name in os.listdir(self.dir_fd):
            if not name.startswith(TARGET_PREFIX):
                continue
            saved = self._open_target(name) if same_boot else None
            if saved is None:
                self._remove_dir(name)
            else:
                self.saved[saved.pid] = saved
        self._write("boot", boot)
        if self.saved:
            log.info("state in %s: %d target(s) of a previous daemon may come back", self.path, len(self.saved))

    def _open_target(self, name: str) -> SavedTarget | None:
        try:
            pid, start_time = (int(x) for x in name[len(TARGET_PREFIX):].split("-"))
        except ValueError:
            return None
        if process_start_time(pid) != start_time:
            return None        # it exited (or its pid is another process's now)
        dir_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        try:
            with open(os.open(RECORD, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)) as f:
                info = json.load(f)
            arrays = FileArrays(dir_fd, f"pid {pid}")
            table = arrays.load()
            journal = EventJournal(dir_fd, MAX_EVENTS_PER_READ, create=False)
        except (OSError, ValueError) as exc:
            log.warning("state in %s: %s unreadable (%s); it cannot come back", self.path, name, exc)
            os.close(dir_fd)
            return None
        return SavedTarget(pid, start_time, name, dir_fd, arrays, info, journal, table)

    def store_instance(self) -> str:
        """The name a store that outlives the daemon keeps its pages under
        (redis keys), the same for every daemon of this directory: made
        once, then read back."""
        name = self._read("instance")
        if not name:
            name = secrets.token_hex(8)
            self._write("instance", name)
        return name

    def swap_reusable(self) -> bool:
        """Whether the swap file holds pages a target may come back for."""
        return bool(self.saved)

    def adopt_slots(self, slots) -> None:
        """Slot references from every saved table (pages shared after a fork
        share a slot: one reference each). A table naming a slot the swap
        file does not have cannot come back."""
        for pid, saved in list(self.saved.items()):
            if any(piece.min() < 1 or piece.max() >= slots.span for piece in saved.table.slot_steps()):
                log.warning("state in %s: pid %d names slots past the swap file; it cannot come back",
                            self.path, pid)
                self.forget(self.saved.pop(pid))
        slots.adopt(piece for saved in self.saved.values() for piece in saved.table.slot_steps())

    def take(self, pid: int, start_time: int | None, owner: tuple[int, int]) -> SavedTarget | None:
        """The saved target of this process (pid, start time and owner
        alike), now the caller's; None if there is none."""
        saved = self.saved.get(pid)
        if saved is None or saved.start_time != start_time or tuple(saved.info.get("owner", ())) != owner:
            return None
        return self.saved.pop(pid)

    def check_backend(self, chain: str) -> None:
        """Saved tables name slots of the stores they were saved with. A
        daemon started with another chain (`chain`: backends.chain_identity)
        cannot take them over (its stores hold other pages, or none): they
        are forgotten. The chain is kept for the next start."""
        saved_with = self._read(BACKEND_NAME)
        if saved_with is not None and saved_with != chain:
            self.forget_saved(f"its pages were saved with the stores {saved_with}, not {chain}")
        self._write(BACKEND_NAME, chain)

    def memory_is_theirs(self, fd: int) -> bool:
        """Whether the memfd is the one the saved tables' store in memory
        was in: its name, which new_memfd makes unique."""
        return self._read(MEMORY_NAME) == memfd_name(fd)

    def note_memory(self, fd: int) -> None:
        """The store in memory is in this memfd from now on."""
        self._write(MEMORY_NAME, memfd_name(fd))

    def forget_saved(self, reason: str) -> None:
        """None of the dead daemon's targets can come back (`reason`):
        their files go, so each is told at once it has nothing here."""
        if self.saved:
            log.warning("state in %s: %s; the %d program(s) of the previous daemon cannot come back",
                        self.path, reason, len(self.saved))
        for saved in self.unclaimed():
            self.forget(saved)

    def unclaimed(self) -> list[SavedTarget]:
        """The saved targets not taken back (their slots still referenced)."""
        out = list(self.saved.values())
        self.saved.clear()
        return out

    # ---- targets of this daemon ----------------------------------------------------
    def new_target(self, pid: int, info: dict) -> SavedTarget:
        start_time = process_start_time(pid)
        if start_time is None:
            raise ProcessLookupError(pid)
        name = f"{TARGET_PREFIX}{pid}-{start_time}"
        try:
            os.mkdir(name, 0o700, dir_fd=self.dir_fd)
        except FileExistsError:
            self._remove_dir(name)   # a leftover of the same process (a HELLO after exec)
            os.mkdir(name, 0o700, dir_fd=self.dir_fd)
        try:
            dir_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError:
            os.rmdir(name, dir_fd=self.dir_fd)
            raise
        info = dict(info, pid=pid, start_time=start_time)
        try:
            _write_record(RECORD, info, os.O_EXCL, dir_fd)
            journal = EventJournal(dir_fd, MAX_EVENTS_PER_READ, create=True)
        except BaseException:
            # (a full disk, no descriptor left: the caller pages the target
            # in memory; a half-made record would only be found unreadable)
            os.close(dir_fd)
            self._remove_dir(name)
            raise
        return SavedTarget(pid, start_time, name, dir_fd, FileArrays(dir_fd, f"pid {pid}"), info, journal)

    def update_info(self, saved: SavedTarget, info: dict) -> None:
        """Replace a target's record (written aside, then renamed over it:
        a crash leaves the old record or the new one)."""
        aside = RECORD + ".new"
        _write_record(aside, info, os.O_TRUNC, saved.dir_fd)
        os.rename(aside, RECORD, src_dir_fd=saved.dir_fd, dst_dir_fd=saved.dir_fd)
        saved.info = info

    def forget(self, saved: SavedTarget) -> None:
        """The target is gone: its files go. Its directory's name may be
        another's by now: after an exec (the same pid and start time) the
        new image's target, made while this one was still being released,
        cleared the old directory and made its own under that name."""
        remove_all(saved.dir_fd)
        ours = os.fstat(saved.dir_fd)
        os.close(saved.dir_fd)
        try:
            there = os.stat(saved.dir_name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (there.st_dev, there.st_ino) != (ours.st_dev, ours.st_ino):
            return
        try:
            os.rmdir(saved.dir_name, dir_fd=self.dir_fd)
        except OSError as exc:
            log.warning("cannot remove %s/%s: %s", self.path, saved.dir_name, exc.strerror)

    def close(self, clean: bool) -> None:
        """At exit. After a clean stop nothing is left to come back for:
        the directory goes (the caller removed the swap file)."""
        if clean:
            for name in os.listdir(self.dir_fd):
                if name.startswith(TARGET_PREFIX):
                    self._remove_dir(name)
                elif name in ("boot", "lock", "instance", BACKEND_NAME, MEMORY_NAME):
                    os.unlink(name, dir_fd=self.dir_fd)
        os.close(self._lock_fd)
        os.close(self.dir_fd)
        if clean:
            try:
                os.rmdir(self.path)
            except OSError as exc:
                log.warning("cannot remove %s: %s", self.path, exc.strerror)

    # ---- helpers ---------------------------------------------------------------------
    def _remove_dir(self, name: str) -> None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return
        except OSError:
            os.unlink(name, dir_fd=self.dir_fd)   # not a directory: nothing of ours
            return
        try:
            remove_all(fd)
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=self.dir_fd)

    def _read(self, name: str) -> str | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except OSError:
            return None
        with open(fd) as f:
            return f.read().strip()

    def _write(self, name: str, text: str) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dir_fd)
        with open(fd, "w") as f:
            f.write(text)

