"""CPython's garbage collector, set for a daemon that holds many long-lived links.

Why: the collector runs its youngest generation every 700 net container allocations.
A custodian holding a thousand enclave links allocates that many several times a second
on heartbeats alone, so objects that live one heartbeat interval (a task's wait, the
cancel scope of a deadline, a message in a queue) survive two young collections and are
promoted to the oldest generation. That generation is then collected in full every few
seconds: a pause that grows with the whole heap (every link's session, TLS stream,
channel and tasks) and lands on whatever was due then (a grant a supply made, a
recall's answer), and CPU spent at idle for garbage that reference counting frees anyway.

How: :func:`settle_heap` runs once, after start-up and before serving. It collects, then
freezes what start-up built (modules, configuration, the models lent: never garbage)
out of every later collection, and raises the youngest generation's threshold to
:data:`YOUNG_THRESHOLD`, so that young collections come a few times a second at most and
a heartbeat's objects die young. Cycles are still found: by the young and middle
generations, and by the full collections that the promotions still trigger, now rarely.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["YOUNG_THRESHOLD", "settle_heap"]

#: Net container allocations between two young collections (CPython's default is 700).
YOUNG_THRESHOLD: Final = 50_000


def settle_heap(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Collect, freeze what exists now out of later collections, and raise the youngest
    generation's threshold (the older generations' are kept)."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, oldest)
