"""A bounded, thread-safe LRU cache, shared by the attestation caches.

Verification may run in several threads at once (TLS handshakes in worker threads, the
ledger's thread), hence the lock. Only results that can never change for the same key go
in: callers re-check anything that depends on time or policy on every hit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["LruCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """At most ``size`` entries; the least recently used goes first.

    Attributes:
        hits, misses: lookups since the last :meth:`clear` (for tests and benchmarks).
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("cache size must be >= 1")
        self._size = size
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {len(self)}/{self._size} "
            f"hits={self.hits} misses={self.misses}>"
        )

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        """The cached value for ``key``, or ``None``; counts a hit or a miss."""
        with self._lock:
            found = self._data.get(key)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self._data.move_to_end(key)
            return found

    def put(self, key: K, value: V) -> None:
        """Store ``value``, evicting the least recently used entry beyond the size."""
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        """Forget everything and reset the counters (tests; after rotating trust roots)."""
        with self._lock:
            self._data.clear()
            self.hits = self.misses = 0
