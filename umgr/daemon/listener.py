"""The control socket's file, made without trusting anyone else's files.

The daemon runs as root, so nothing here follows a path another user could
have changed: the socket's directory is opened once (O_NOFOLLOW) and must
belong to the daemon's uid and be writable by nobody else; every later
step (lock, probe, unlink, bind, link) goes through that directory's
descriptor. The socket is bound under a name of its own and takes its
name once it listens.
The socket's mode comes from the umask and its group from the effective
gid at bind, so no chmod or chown ever runs on a path.

At most one daemon serves a socket: a second one finds the lock held (or a
daemon answering there) and refuses to start. A socket nobody answers on
is stale and replaced; anything else at that name (a file, a symlink) is
left alone and the daemon refuses to start.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import socket
import stat

from umgr.errors import UmgrError


class SocketSetupError(UmgrError):
    """The control socket cannot be set up safely."""


class ControlSocket:
    """The listening socket, its directory and its lock; close() removes
    the socket file if it is still the one bound here."""

    def __init__(self, path: str, group: str | None = None, backlog: int = 128):
        self.path = path
        self.name = os.path.basename(path)
        if not self.name:
            raise SocketSetupError(f"{path}: not a socket file name")
        self.dir_fd = open_private_dir(os.path.dirname(os.path.abspath(path)))
        self.lock_fd = -1
        self.sock: socket.socket | None = None
        self.inode = -1
        try:
            self._lock()
            self._clear_stale()
            self.sock = self._listening(group, backlog)
            self.inode = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False).st_ino
        except BaseException:
            self.close()
            raise

    def _listening(self, group: str | None, backlog: int) -> socket.socket:
        """Bound under a name of its own and listening, then given its
        name: a client that finds the socket file finds it listening (one
        found between bind and listen was refused, and its program ran
        unmanaged)."""
        temporary = f".{self.name}.{os.getpid()}"
        sock = _bind(f"/proc/self/fd/{self.dir_fd}/{temporary}", group)
        try:
            sock.listen(backlog)
            os.link(temporary, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        except BaseException:
            sock.close()
            raise
        finally:
            os.unlink(temporary, dir_fd=self.dir_fd)
        return sock

    def _proc_path(self) -> str:
        # The directory as opened, whatever its path points at now.
        return f"/proc/self/fd/{self.dir_fd}/{self.name}"

    def _lock(self) -> None:
        self.lock_fd = os.open(self.name + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                               0o600, dir_fd=self.dir_fd)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SocketSetupError(f"{self.path}: another daemon holds {self.name}.lock") from None

    def _clear_stale(self) -> None:
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketSetupError(f"{self.path} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.settimeout(1)
            probe.connect(self._proc_path())
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.name, dir_fd=self.dir_fd)  # stale: nobody listens
            return
        except OSError as exc:
            if exc.errno != errno.EPROTOTYPE:
                raise SocketSetupError(f"{self.path}: cannot tell whether a daemon answers there ({exc})") from None
        finally:
            probe.close()
        raise SocketSetupError(f"{self.path}: a daemon already answers there")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            with contextlib.suppress(OSError):
                if os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False).st_ino == self.inode:
                    os.unlink(self.name, dir_fd=self.dir_fd)
            self.sock = None
        for fd in (self.lock_fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.lock_fd = self.dir_fd = -1


def open_private_dir(path: str, create_mode: int = 0o755) -> int:
    """A descriptor of directory `path` (made with create_mode if missing),
    refused unless it is a real directory (not a symlink) that belongs to
    this process's uid and that no one else may write to."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, create_mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SocketSetupError(f"{path}: not a directory of its own ({exc.strerror})") from None
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"belongs to uid {st.st_uid}, not {os.geteuid()}"
    elif st.st_mode & 0o022:
        problem = f"is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    if problem:
        os.close(fd)
        raise SocketSetupError(f"{path} {problem}; refusing to use it")
    return fd


def _bind(path: str, group: str | None) -> socket.socket:
    """Bound with mode 0600 (0660 and the group's gid with a group): the
    umask and the effective gid at bind set both."""
    gid = None
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise SocketSetupError(f"no group named {group!r}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o117 if group else 0o177)
    old_egid = os.getegid()
    try:
        if gid is not None:
            os.setegid(gid)
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    finally:
        if gid is not None:
            os.setegid(old_egid)
        os.umask(old_umask)
    return sock
