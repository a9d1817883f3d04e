"""The evictor's choice of victims from its policy: pure logic, a fake of
the target's page table and budget around the real Evictor and policy."""
from types import SimpleNamespace

import numpy as np

from umgr.paging.evictor import Evictor
from umgr.paging.pagetable import State
from umgr.policies import GuardedEviction
from umgr.policies.fifo import FifoEviction


def evictor_over(resident_vpns: list[int], goal: int) -> Evictor:
    """An evictor whose target has these pages RESIDENT, queued in this
    order, and wants `goal` victims a round."""
    states = {vpn: State.RESIDENT for vpn in resident_vpns}
    policy = GuardedEviction(FifoEviction())
    policy.on_resident(np.array(resident_vpns, dtype=np.int64))
    core = SimpleNamespace(
        budget=SimpleNamespace(evict_goal=lambda resident, rushed: goal),
        pt=SimpleNamespace(resident=len(resident_vpns),
                           states=lambda vpns: np.array([states.get(v, State.FRESH) for v in vpns.tolist()],
                                                        dtype=np.uint8)),
        eviction=policy)
    return Evictor(core, pinning=None, removes=None)


def test_a_page_of_the_batch_in_flight_is_skipped_and_stays_queued():
    """A page written while its batch is put away is RESIDENT again; the
    next batch leaves it out, and it stays in the policy's queue, to be
    chosen once that batch is done (it was lost from the queue: resident
    for good, never offered again)."""
    evictor = evictor_over([7, 8, 9], goal=2)
    evictor._putting_away = np.array([7], dtype=np.int64)
    assert evictor._choose_victims(rushed=False).tolist() == [8, 9]
    assert len(evictor.core.eviction) == 1
    evictor._putting_away = np.empty(0, dtype=np.int64)
    assert evictor._choose_victims(rushed=False).tolist() == [7]
    assert len(evictor.core.eviction) == 0


def test_a_policy_that_does_not_say_how_many_it_holds_is_asked_for_victims():
    """len() is optional in a policy, as the other hooks are: one without
    it (the base class's says 0) is asked, as an offline replay asks it,
    instead of never evicting live."""
    from umgr.policies import EvictionPolicy

    class Newest(EvictionPolicy):
        def __init__(self):
            self.pages = []

        def on_resident(self, vpns):
            self.pages.extend(vpns.tolist())

        def choose(self, n):
            chosen, self.pages = self.pages[-n:], self.pages[:-n]
            return np.array(chosen, dtype=np.int64)

    evictor = evictor_over([1, 2, 3], goal=2)
    evictor.core.eviction = GuardedEviction(Newest())
    evictor.core.eviction.on_resident(np.array([1, 2, 3]))
    assert evictor._choose_victims(rushed=False).tolist() == [2, 3]
