"""The collector settings a long-lived daemon starts serving with (in a fresh process:
they are process-wide)."""

from __future__ import annotations

import subprocess
import sys

from drm_daemon.collector import YOUNG_THRESHOLD

PROGRAM = """
import gc
from drm_daemon.collector import settle_heap

before = gc.get_threshold()
kept = [[i] for i in range(1000)]  # start-up's objects: frozen
settle_heap()
after = gc.get_threshold()
assert after == (YOUNG, before[1], before[2]), (before, after)
assert gc.get_freeze_count() >= 1000, gc.get_freeze_count()
assert all(gc.get_count()[g] < 10 for g in (1, 2))

# A cycle made after start-up is still found by a young collection.
class Node:
    pass

node = Node()
node.me = node
import weakref
ref = weakref.ref(node)
del node
gc.collect(0)
assert ref() is None
print("ok")
"""


def test_settle_heap_freezes_start_up_and_raises_only_the_young_threshold() -> None:
    program = PROGRAM.replace("YOUNG", str(YOUNG_THRESHOLD))
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
