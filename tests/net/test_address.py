"""``HOST:PORT`` formatting and parsing agree, IPv6 included; ports are ASCII digits in range."""

from __future__ import annotations

import argparse
import re

import pytest

from drm_wire.net.address import format_address, parse_address, parse_port, port_argument


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


@pytest.mark.parametrize(
    ("text", "zero", "message"),
    [
        ("", True, "not a port number: ''"),
        ("-1", True, "not a port number: '-1'"),
        ("+5", True, "not a port number: '+5'"),
        (" 5", True, "not a port number: ' 5'"),
        ("\u0665", True, "not a port number: '\u0665'"),  # int() would read 5
        ("000080", True, "not a port number: '000080'"),
        ("65536", True, "port 65536 is out of range (0-65535)"),
        ("0", False, "port 0 is out of range (1-65535)"),
    ],
)
def test_a_port_is_ascii_digits_within_range(text: str, zero: bool, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        parse_port(text, zero=zero)
    with pytest.raises(argparse.ArgumentTypeError) as caught:  # the same, for argparse
        port_argument(zero=zero)(text)
    assert str(caught.value) == message


def test_ports_at_the_edges() -> None:
    assert [parse_port("0"), parse_port("65535"), parse_port("1", zero=False)] == [0, 65535, 1]


def test_an_address_with_other_scripts_digits_is_refused() -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_address("127.0.0.1:\u0667\u0660\u0660\u0660")
