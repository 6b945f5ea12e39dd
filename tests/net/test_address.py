"""``HOST:PORT`` formatting and parsing agree, IPv6 included."""

from __future__ import annotations

import pytest

from drm_wire.net.address import format_address, parse_address


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("127.0.0.1", 7000, "127.0.0.1:7000"),
        ("::1", 0, "[::1]:0"),
        ("custodian.example.com", 65535, "custodian.example.com:65535"),
    ],
)
def test_format_then_parse_round_trips(host: str, port: int, text: str) -> None:
    assert format_address(host, port) == text
    assert parse_address(text) == (host, port)
