"""``HOST:PORT`` text for the daemons' flags, logs and URLs, with IPv6 hosts in brackets."""

from __future__ import annotations

__all__ = ["format_address", "parse_address"]


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` to ``(host, port)``; port 0 is allowed.

    Raises:
        ValueError: not of that form, or the port is out of range.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


def format_address(host: str, port: int) -> str:
    """``(host, port)`` as ``HOST:PORT``, or ``[V6]:PORT`` (what :func:`parse_address` reads)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
