"""Joint rounds (umgr/paging/joint.py): several targets' faults served at
once, each target's C call in a thread of its own. Real processes under
one daemon, every byte checked, and the rounds seen to have served them."""
import shlex

import pytest

MiB = 1 << 20
PAGE = 4096


def together(commands: list[list[str]]) -> list[str]:
    """`sh -c` running the commands at once, each with its own output
    line, exiting 1 if any failed."""
    starts = "".join(f"{shlex.join(cmd)} | sed 's/^/{i}: /' & pids=\"$pids $!\"; " for i, cmd in enumerate(commands))
    # (A pipeline's status is sed's: each program's is checked through its "ok" line.)
    return ["sh", "-c", f"pids=; {starts}rc=0; for p in $pids; do wait $p || rc=1; done; exit $rc"]


@pytest.mark.timeout(240)
def test_several_targets_paging_at_once_are_served_together_and_lose_nothing(umgr_exec, programs):
    # Random reads, rewrites (write-protect faults on pages that came in
    # clean) and first touches from two processes (one with 2 threads), an
    # allocator's discards (REMOVE events read by a round and handled
    # before it ends) and writers racing the evictor, each under 8 MiB.
    commands = [
        [programs["scatter"], "24", "6000", "2"],
        [programs["scatter"], "24", "6000", "1"],
        [programs["refill"], "24", "3", "65", "1"],
        [programs["hammer"], "24", "2", "6", "512"],
    ]
    result = umgr_exec(together(commands), max_resident="8M", timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for i in range(len(commands)):
        assert any(line.startswith(f"{i}: ok") for line in lines), (i, result.stdout, result.stderr[-3000:])
    stats = result.stats
    assert stats["targets"] >= 1 + len(commands), stats
    assert stats["pages_out"] >= 4 * (24 - 8) * MiB // PAGE, stats   # every process's data really left
    assert stats["swap_slots_in_use_at_exit"] == 0, stats
    # Rounds served most of the fast path's faults, some while the
    # others' reads were in flight.
    assert stats["faults_joined"] > 0.3 * stats["faults_fast"], stats


@pytest.mark.timeout(180)
def test_forked_processes_reading_shared_slots_in_rounds_drop_each_reference_once(umgr_exec, programs):
    # A parent and 3 children read at random the swapped pages they share
    # (their slots referenced by all four, each reference dropped by the
    # call of whichever target reads the page in, those calls running at
    # once in rounds), then each writes its own pages and checks them all:
    # a reference dropped twice fails the daemon (a double free), one lost
    # leaves a slot in use at the end.
    result = umgr_exec([programs["forkreads"], "32", "3", "6000"], max_resident="8M", timeout=150)
    assert result.returncode == 0 and result.stdout.startswith("ok "), result.stderr[-3000:]
    stats = result.stats
    assert stats["forks"] == 3 and stats["pages_out"] >= (32 - 8) * MiB // PAGE, stats
    assert stats["faults_joined"] > 0.3 * stats["faults_fast"], stats
    assert stats["swap_slots_in_use_at_exit"] == 0, stats


# ---- the round's bookkeeping, with stand-ins for the fault services --------
class FakeCore:
    def over_budget(self):
        return False


class FakeFast:
    def __init__(self, outcome=1, start_fails=False, finish_fails=False):
        self.outcome, self.start_fails, self.finish_fails = outcome, start_fails, finish_fails
        self.started = self.stopped = self.finished = 0
        self.core = FakeCore()

    def has_background(self):
        return True

    def serve_in_background(self, joint):
        if self.start_fails:
            raise RuntimeError("no call")
        self.started += 1

    def stop_background(self):
        self.stopped += 1

    def finish_background(self, stop=False):
        assert stop
        self.finished += 1
        if self.finish_fails:
            raise OSError("read failed")
        return self.outcome


class FakeService:
    def __init__(self, fast, joinable=True, settle_fails=False):
        self.fast, self._joinable, self.settle_fails = fast, joinable, settle_fails
        self.paused, self.woken, self.carried = False, False, None
        self.task = object()

    def reads_files_lately(self, now):
        return True

    def joinable(self, now):
        if self._joinable == "fails":
            raise OSError("no thread to be had")
        return self._joinable

    def wake_to_join(self):
        self.woken = True

    def settle_joined(self, outcome):
        self.settled = getattr(self, "settled", 0) + 1
        if self.settle_fails:
            raise ValueError("double free")
        return outcome, ["window"]

    def carry(self, carried):
        self.carried = carried


def test_a_round_hands_each_member_its_own_outcome_and_its_own_failure():
    from umgr.paging.joint import JointRounds
    rounds = JointRounds()
    leader = FakeService(FakeFast(outcome=2))
    fine = FakeService(FakeFast(outcome=1))
    no_start = FakeService(FakeFast(start_fails=True))
    no_finish = FakeService(FakeFast(finish_fails=True))
    bad_settle = FakeService(FakeFast(), settle_fails=True)
    idle = FakeService(FakeFast(), joinable=False)
    broken = FakeService(FakeFast(), joinable="fails")   # (its own loop meets that, not the leader's)
    for service in (leader, fine, no_start, no_finish, bad_settle, idle, broken):
        rounds.add(service)
    try:
        assert rounds.run(leader) == (2, ["window"])   # the leader's own, not another's failure
        assert fine.carried == (1, ["window"]) and fine.woken
        assert isinstance(no_start.carried, RuntimeError)
        assert isinstance(no_finish.carried, OSError)
        assert isinstance(bad_settle.carried, ValueError)
        assert idle.carried is None and not idle.woken
        assert broken.carried is None and not broken.woken
        # Every call started was stopped, waited for and settled (a failed
        # one too: what it served is in its log), whatever failed; one
        # that did not start was not settled (its log was settled before).
        for service in (leader, fine, no_finish, bad_settle):
            assert service.fast.started == service.fast.stopped == service.fast.finished == service.settled == 1
        assert no_start.fast.finished == 0 and not hasattr(no_start, "settled")
        # Alone, a leader serves by itself.
        rounds.remove(fine), rounds.remove(no_start), rounds.remove(no_finish), rounds.remove(bad_settle)
        assert rounds.run(leader) is None
    finally:
        rounds.close()


def test_a_leader_whose_own_call_fails_raises_it_after_every_member_is_settled():
    from umgr.paging.joint import JointRounds
    rounds = JointRounds()
    leader = FakeService(FakeFast(finish_fails=True))
    partner = FakeService(FakeFast(outcome=1))
    rounds.add(leader), rounds.add(partner)
    try:
        with pytest.raises(OSError):
            rounds.run(leader)
        assert partner.carried == (1, ["window"]) and partner.fast.finished == 1
    finally:
        rounds.close()


def test_a_round_is_short_once_a_member_is_past_its_high_water_mark():
    # Its evictor is to run, and may be in the batch of tasks trio is
    # running, which no count of runnable tasks shows.
    from umgr.paging import fastpath
    from umgr.paging.joint import JointRounds
    rounds = JointRounds()
    over = FakeService(FakeFast())
    over.fast.core.over_budget = lambda: True
    try:
        assert rounds._slice([FakeService(FakeFast()), over]) == fastpath.SLICE_SECONDS
    finally:
        rounds.close()
