"""umgr's exceptions. Kernel errnos are sorted into these once, at the
binding boundary (umgr.kernel.uffd, umgr.kernel.procmem); code above never inspects a raw
OSError from a target's uffd or memory."""


class UmgrError(Exception):
    """Base class of every umgr error."""


class TargetGone(UmgrError):
    """The target's address space is gone (ESRCH): it exited or exec'd.

    Not a failure of umgr: release what belongs to the target.
    """

    def __init__(self, message: str = "target's mm is gone", *, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class UffdError(UmgrError, OSError):
    """A userfaultfd ioctl failed in a way that is not a normal outcome.

    ``errno`` and ``strerror`` are those of OSError.
    """


class ClosedError(UmgrError):
    """A file-descriptor holder was used after close()."""


class Unsupported(UmgrError):
    """The running kernel lacks a facility umgr was asked to use."""


class BackendFull(UmgrError):
    """The swap backend has no free slot: eviction pauses, nothing is lost."""


class BackendError(UmgrError):
    """Backend I/O failed: the pages concerned stay resident.
    `may_land`: part of the I/O may still be on its way (submitted when the
    rest failed): a write's slots must not be used again, nor a read's or
    a write's buffers. `full`: nothing failed, the store is out of room (a
    memory cap): eviction pauses, the room clean copies hold is given back
    and none are kept until it resumes (tried again on a timer)."""

    def __init__(self, *args, may_land: bool = False, full: bool = False):
        super().__init__(*args)
        self.may_land = may_land
        self.full = full
