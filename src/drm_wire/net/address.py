"""``HOST:PORT`` text for the daemons' flags, logs and URLs, with IPv6 hosts in brackets."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["format_address", "parse_address", "parse_port", "port_argument"]


def parse_port(text: str, *, zero: bool = True) -> int:
    """A port number in ASCII digits (not ``+5``, `` 5`` or other scripts' digits, all of
    which ``int`` takes); 0, "any free port", only if ``zero``.

    Raises:
        ValueError: not such a number, or out of range.
    """
    if not (text.isascii() and text.isdigit() and len(text) <= 5):
        raise ValueError(f"not a port number: {text[:20]!r}")
    port, low = int(text), 0 if zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range ({low}-65535)")
    return port


def port_argument(*, zero: bool) -> Callable[[str], int]:
    """:func:`parse_port` as an argparse ``type=`` (and so a config file key's converter),
    reporting its own message rather than argparse's "invalid value"."""

    def port(text: str) -> int:
        try:
            return parse_port(text, zero=zero)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return port


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` to ``(host, port)``; port 0 is allowed.

    Raises:
        ValueError: not of that form, or the port is out of range.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, parse_port(port_text)


def format_address(host: str, port: int) -> str:
    """``(host, port)`` as ``HOST:PORT``, or ``[V6]:PORT`` (what :func:`parse_address` reads)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
