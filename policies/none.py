"""No prefetch: every page comes in on its own fault."""

from . import PrefetchPolicy


class NoPrefetch(PrefetchPolicy):
    name = "none"

    def __init__(self):
        pass

    def on_fault(self, vpn: int, region_start: int, region_end: int) -> tuple[()]:
        return ()
