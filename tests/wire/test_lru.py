"""The bounded LRU cache behind the attestation caches."""

from __future__ import annotations

import pytest

from drm_wire._lru import LruCache


def test_least_recently_used_entry_is_evicted_and_lookups_are_counted() -> None:
    cache = LruCache[str, int](2)
    for key, value in (("a", 1), ("b", 2)):
        cache.put(key, value)
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert cache.get("b") is None
    assert (cache.get("a"), cache.get("c")) == (1, 3)
    assert len(cache) == 2
    assert (cache.hits, cache.misses) == (3, 1)
    cache.clear()
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 0)


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="cache size"):
        LruCache[str, int](0)
