"""The I/O-free helpers of TLSStream: the record counter above all."""

from __future__ import annotations

import pytest
import trio
from OpenSSL import SSL

from drm_wire.net._ssl_util import ConflictDetector, RecordCounter, describe


def _record(body_length: int) -> bytes:
    return b"\x17\x03\x03" + body_length.to_bytes(2, "big") + b"\xaa" * body_length


STREAM = _record(0) + _record(1) + _record(300) + _record(16 * 1024 + 256) + _record(7)
#: Offsets at which each record of STREAM is complete.
ENDS = [5, 11, 316, 316 + 5 + 16 * 1024 + 256, len(STREAM)]


def _complete_after(counter: RecordCounter) -> int:
    """How many records the counter has seen complete (via its public interface)."""
    counter.trusted = True
    seen = 0
    while not counter.none_buffered():
        counter.returned_one()
        seen += 1
    return seen


@pytest.mark.parametrize("split", [1, 2, 3, 4, 5, 6, 10, 11, 12, 315, 316, 317, 320, 5000])
def test_counts_records_across_any_split(split: int) -> None:
    counter = RecordCounter()
    fed = 0
    total = 0
    for start in range(0, len(STREAM), split):
        piece = STREAM[start : start + split]
        counter.fed(piece)
        fed += len(piece)
        total += _complete_after(counter)
        assert total == sum(1 for end in ENDS if end <= fed), f"after {fed} bytes"
    assert total == len(ENDS)


def test_untrusted_until_drained() -> None:
    counter = RecordCounter()
    assert not counter.none_buffered()  # untrusted: always ask OpenSSL
    counter.fed(_record(10))
    counter.drained()  # OpenSSL said "want read": everything fed was consumed
    assert counter.none_buffered()
    counter.fed(_record(3) + _record(4))
    assert not counter.none_buffered()
    counter.returned_one()
    assert not counter.none_buffered()
    counter.returned_one()
    assert counter.none_buffered()
    assert "trusted=True" in repr(counter)


def test_garbage_length_stops_trusting() -> None:
    counter = RecordCounter()
    counter.drained()
    counter.fed(b"HTTP/1.1 400 Bad Request\r\n")  # "P/" read as a length: 20,527
    assert not counter.trusted
    assert not counter.none_buffered()


async def test_conflict_detector() -> None:
    detector = ConflictDetector("busy!")
    with detector, pytest.raises(trio.BusyResourceError, match="busy!"), detector:
        pass
    with detector:  # released after use
        pass


def test_describe() -> None:
    error = SSL.Error([("SSL routines", "", "wrong version number")])
    assert describe(error) == "wrong version number"
    assert describe(SSL.Error("odd")) == "Error('odd')"
