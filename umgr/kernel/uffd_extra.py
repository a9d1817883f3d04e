"""The userfaultfd calls that only tests and benchmarks make, kept out of the
runtime module umgr.kernel.uffd (the daemon reads in place with read_batch()
and resolves with copy_fast()/zeropage_fast()).

Userfaultfd here is umgr.kernel.uffd.Userfaultfd plus:

- read_events(): a read typed as a list of events (PageFault, ForkEvent, ...);
- copy_read(): UFFDIO_COPY and the read of the next batch in one cffi call;
- continue_(), poison(), move(): UFFDIO_CONTINUE, UFFDIO_POISON, UFFDIO_MOVE.

It ships with the package so that `umgr bench` (umgr.benchmarks) works after
`pip install`; the daemon never imports it.
"""
from umgr.bindings._kernel import lib as _lib
from umgr.kernel import uffd
from umgr.kernel.uffd import EVENT_PAGEFAULT, PageFault

_copy_read = _lib.umgr_uffd_copy_read
_READ_FAILED = _lib.UMGR_READ_FAILED
_continue = _lib.umgr_uffd_continue
_poison = _lib.umgr_uffd_poison
_move = _lib.umgr_uffd_move

# A frozen dataclass's __init__ goes through object.__setattr__ per field;
# setting the slots directly builds the same object in ~60% of the time,
# which shows in bench_faults' typed mode (one PageFault per fault).
_object_new = object.__new__
_set_pf_address = PageFault.address.__set__
_set_pf_flags = PageFault.flags.__set__
_set_pf_tid = PageFault.tid.__set__


def _new_fault(address: int, flags: int, tid: int) -> PageFault:
    fault = _object_new(PageFault)
    _set_pf_address(fault, address)
    _set_pf_flags(fault, flags)
    _set_pf_tid(fault, tid)
    return fault


class Userfaultfd(uffd.Userfaultfd):
    __slots__ = ()

    def read_events(self, max_events: int = 64) -> list:
        """Read up to max_events queued messages with one read(); [] when
        none is queued. Events are typed, in the kernel's order."""
        n = self.read_batch(max_events)
        w = self.batch
        if n == 1 and w[0] & 0xFF == EVENT_PAGEFAULT:
            # The common case on a fault path: a single fault.
            return [_new_fault(w[2], w[1], w[3] & 0xFFFFFFFF)]
        return self.batch_events(n)

    def batch_events(self, n: int) -> list:
        """The first n messages of the last batch as typed events."""
        return [self.batch_event(i) for i in range(n)]

    def copy_read(self, dst: int, src: int, length: int, mode: int = 0,
                  max_events: int = 64) -> int:
        """copy_fast(), then, when the whole range was copied, read_batch()
        in the same cffi call: "resolve this fault, fetch the next" at one
        call per fault. Returns the messages now in .batch (0: none queued).
        When the copy stopped short nothing was read and the result is
        -copy_fast() (see umgr.kernel.uffd.unpack(-r)); it is EAGAIN while
        a non-cooperative event is queued, so read_batch() and retry. Raises
        as copy_fast() and read_batch() do. On a blocking uffd the read
        waits for the next message, as read() would."""
        if max_events > self._max or max_events < 1:
            self._grow(max_events)
        r = _copy_read(self._fd, dst, src, length, mode, self._msgs, max_events)
        if r >= 0:
            return r
        if r <= _READ_FAILED:
            self._raise(_READ_FAILED - r, "read")
        self._range_outcome(-r, length, "UFFDIO_COPY")   # raises unless EAGAIN, EEXIST, ENOENT
        return r

    def continue_(self, start: int, length: int, mode: int = 0) -> tuple[int, int]:
        """UFFDIO_CONTINUE: map the page cache pages already there (MINOR)."""
        return self._range_outcome(_continue(self._fd, start, length, mode), length, "UFFDIO_CONTINUE")

    def poison(self, start: int, length: int, mode: int = 0) -> tuple[int, int]:
        """UFFDIO_POISON: the range then raises SIGBUS when touched."""
        return self._range_outcome(_poison(self._fd, start, length, mode), length, "UFFDIO_POISON")

    def move(self, dst: int, src: int, length: int, mode: int = 0) -> tuple[int, int]:
        """UFFDIO_MOVE within the uffd's mm (src is an address there)."""
        return self._range_outcome(_move(self._fd, dst, src, length, mode), length, "UFFDIO_MOVE")

