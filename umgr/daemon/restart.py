"""What a restarted `umgr daemon` takes over, beside its state directory
(statedir.py): the memfd of a compressed store, which the service manager
keeps for it (fdstore.py); and what a crash would do to the programs, as
`umgr status` says it.

Saved tables whose store did not come back are forgotten
(StateDir.forget_saved): their programs, asking to be taken back, are told
at once that nothing of theirs is here, and are killed rather than served
zeros. A memfd passed back and not taken over is closed and a new one
stored: its name (which the state directory keeps to recognise its store)
has a random part, so no other state directory's store is taken for it.
"""
from __future__ import annotations

import logging
import os

from umgr.backends import memory_stores
from umgr.backends.region import holds_a_store, new_memfd
from umgr.daemon import fdstore

log = logging.getLogger("umgr.daemon")

# What the daemon knows of the keeping of its memory store's memfd: the
# service manager passed it (or one) back at this start, so the unit keeps
# descriptors; it was handed over and nothing says yet whether the unit
# keeps it; it could not be handed over.
KEPT, HANDED, NOT_HANDED = "kept", "handed", "not handed"


def service_memory(specs: list[str], state) -> tuple[int, str | None]:
    """The memfd of the chain's store in memory (`specs`: --backend),
    kept in the service manager's descriptor store so that a restarted
    daemon takes over what this one held: the dead daemon's, passed back
    at the start and taken over, else a new one; and what is known of its
    keeping (KEPT, HANDED, NOT_HANDED). (-1, None): no such store, or
    nothing saved (`state` None)."""
    passed = fdstore.take(fdstore.STORE_NAME)
    if state is None or not memory_stores(specs):
        if passed >= 0:   # (kept for a daemon of another --backend: nothing takes it over now)
            os.close(passed)
            fdstore.remove(fdstore.STORE_NAME)
        return -1, None
    if state.swap_reusable():
        if passed < 0:
            state.forget_saved("the compressed store's memory did not come back from the service manager "
                               "(FileDescriptorStoreMax= unset in the unit?)")
        elif not holds_a_store(passed) or not state.memory_is_theirs(passed):
            state.forget_saved("the memory the service manager passed back holds no compressed store of theirs")
        else:
            log.info("the compressed store's memory came back from the service manager")
            state.note_memory(passed)
            return passed, KEPT
    if passed >= 0:
        os.close(passed)   # (not taken over: see above)
    fd = new_memfd(fdstore.STORE_NAME)
    state.note_memory(fd)
    if not fdstore.store(fd, fdstore.STORE_NAME):
        log.warning("the compressed store's memory was not handed to the service manager: a restarted "
                    "daemon cannot take programs back")
        return fd, NOT_HANDED
    return fd, KEPT if passed >= 0 else HANDED


def on_crash(specs: list[str], no_persist: bool, grace_seconds: int, state, keeping: str | None) -> str:
    """What becomes of the daemon's programs if it dies, in a line
    (`keeping`: service_memory's)."""
    wait = f"programs wait {grace_seconds} s (or their UMGR_GRACE_SECONDS)"
    if state is None or keeping == NOT_HANDED:
        return f"{wait}, then are killed: nothing is saved ({_why_not_saved(specs, no_persist, keeping)})"
    memory = {None: "",
              KEPT: "; the compressed store's memory kept by the service manager",
              HANDED: "; the compressed store's memory handed to the service manager, kept only if the unit "
                      "sets FileDescriptorStoreMax=, else they are killed"}[keeping]
    return (f"{wait} for a daemon restarted with this --socket, --state-dir and --backend, which takes them "
            f"back (state in {state.path}{memory})")


def _why_not_saved(specs: list[str], no_persist: bool, keeping: str | None) -> str:
    if no_persist:
        return "--no-persist"
    if keeping == NOT_HANDED:
        return "the compressed store's memory could not be handed to the service manager"
    in_memory = memory_stores(specs)
    if len(in_memory) > 1:
        return "two stores in memory: one at most can outlive the daemon"
    if in_memory:
        return "its compressed store dies with it: no service manager keeps it"
    return "a store that does not outlive the daemon"
