"""How often a target's maps are read (umgr/daemon/mapsreads.py): pure
pacing logic, and one real read."""
import os
import time

from umgr.daemon.config import SCAN_INTERVAL_MAX, SCAN_SHARE_MAX
from umgr.daemon.mapsreads import MapsReads


def test_reads_of_maps_take_at_most_their_share_of_the_daemon_s_time():
    cheap, usual, dear = MapsReads(1, cost=20e-6), MapsReads(1, cost=20e-3), MapsReads(1, cost=0.13)
    assert cheap.interval(0.05) == 0.05                     # the scan interval
    assert usual.interval(0.05) == SCAN_INTERVAL_MAX        # 50 times its cost, up to the cap...
    assert dear.interval(0.05) >= 0.13 / SCAN_SHARE_MAX     # ...unless reading would take more than its share
    dear.at = time.monotonic()
    assert dear.until_due() > 1.2                             # an ADVISE waits to read them again
    dear.at -= 0.13 / SCAN_SHARE_MAX
    assert dear.until_due() == 0
    cheap.at = time.monotonic()
    assert cheap.until_due() < 0.001 and 0.04 < cheap.until_due(0.05) <= 0.05


def test_a_read_notes_when_and_what_it_cost():
    reads = MapsReads(os.getpid())
    mappings = reads.read()
    assert mappings and all(lo < hi for lo, hi in mappings)
    assert 0 < reads.cost < 1 and time.monotonic() - reads.at < 1
