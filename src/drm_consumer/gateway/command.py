"""``python -m drm_consumer gateway``: serve the Open Inference Protocol over HTTP in front
of one attested enclave.

:func:`add_arguments` adds the gateway's own options to the subcommand (the connection
options are the other commands'); :func:`run` serves until interrupted. It listens on
loopback by default. Any other address needs a bearer token, from ``--token-file`` or the
``DRM_GATEWAY_TOKEN`` environment variable (never on the command line, where ``ps`` shows
it to every user of the machine); without one it refuses to start (threat model G05).
Logs are JSON lines on standard error; ``gateway_listening`` says where it listens.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import Final, TextIO
from urllib.parse import urlsplit

import hypercorn.trio
import structlog
import trio
from hypercorn.config import Config

from drm_consumer.client import Client
from drm_consumer.gateway.app import DEFAULT_WAIT, MAX_HEADER_BYTES, GatewayApp
from drm_consumer.gateway.pool import EnclavePool
from drm_daemon.listen import cannot_listen
from drm_daemon.logs import configure_logging
from drm_wire.limits import MAX_WAIT_SECONDS
from drm_wire.net.address import format_address, parse_address

__all__ = ["DEFAULT_LISTEN", "TOKEN_ENV", "GatewayUsageError", "add_arguments", "run"]

log = structlog.get_logger(__name__)

#: Where the gateway listens unless told otherwise.
DEFAULT_LISTEN: Final = "127.0.0.1:8000"
#: The environment variable that may hold the bearer token.
TOKEN_ENV: Final = "DRM_GATEWAY_TOKEN"  # noqa: S105 (a variable name, not a secret)
#: A token file is one line; refuse anything larger.
MAX_TOKEN_BYTES: Final = 4096
#: Shortest token accepted (16 random bytes, hex).
MIN_TOKEN_CHARS: Final = 32


class GatewayUsageError(Exception):
    """The gateway cannot start as asked (exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's own options."""
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help=f"where to serve HTTP (default {DEFAULT_LISTEN}; port 0 picks "
                        "one; not loopback: a token is required)")  # fmt: skip
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help=f"the bearer token clients must send (or ${TOKEN_ENV})")  # fmt: skip
    parser.add_argument("--connections", type=int, default=2, metavar="N",
                        help="attested connections to keep open (default 2)")  # fmt: skip
    parser.add_argument("--default-wait", type=float, default=DEFAULT_WAIT, metavar="SECONDS",
                        help="how long an inference waits for a supply when no inferences "
                        "are left, unless the request says (default "
                        f"{DEFAULT_WAIT:g})")  # fmt: skip
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])  # fmt: skip


def _token(path: Path | None) -> str | None:
    if path is not None:
        try:
            with path.open("rb") as handle:
                raw = handle.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise GatewayUsageError(f"cannot read --token-file {path}: {exc.strerror}") from exc
        if len(raw) > MAX_TOKEN_BYTES:
            raise GatewayUsageError(f"--token-file {path} is over {MAX_TOKEN_BYTES} bytes")
        text = raw.decode("ascii", errors="replace").strip()
    else:
        text = os.environ.get(TOKEN_ENV, "").strip()
        if not text:
            return None
    if len(text) < MIN_TOKEN_CHARS or not text.isascii() or not text.isprintable() or " " in text:
        raise GatewayUsageError(
            f"the token must be at least {MIN_TOKEN_CHARS} printable ASCII characters without "
            "spaces (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    return text


def _listen(text: str, token: str | None) -> tuple[str, int]:
    try:
        host, port = parse_address(text)
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise GatewayUsageError(f"--listen must be IP:PORT: {exc}") from exc
    if not address.is_loopback and token is None:
        raise GatewayUsageError(
            f"--listen {text} is not loopback: give a bearer token (--token-file or "
            f"${TOKEN_ENV}) so that only your clients can spend your inferences"
        )
    return host, port


def hypercorn_config(host: str, port: int) -> Config:
    """The gateway's hypercorn configuration, every limit spelled out."""
    config = Config()
    config.bind = [format_address(host, port)]
    config.alpn_protocols = ["http/1.1"]
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.read_timeout = 120  # an idle keep-alive connection is closed after this
    config.keep_alive_timeout = 120
    config.graceful_timeout = 3.0
    config.backlog = 128
    config.include_server_header = False
    config.accesslog = None  # the app logs each request itself, structured
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve(
    connect: Callable[[], AbstractAsyncContextManager[Client]],
    *,
    host: str,
    port: int,
    token: str | None,
    connections: int,
    default_wait: float,
) -> None:
    """Keep the pool and serve HTTP until cancelled."""
    app_ref: list[GatewayApp] = []
    pool = EnclavePool(
        connect,
        size=connections,
        on_attested=lambda client: app_ref[0].on_attested(client),
        on_connect_failed=lambda error: app_ref[0].on_connect_failed(error),
    )
    app = GatewayApp(pool, token=token, default_wait=default_wait)
    app_ref.append(app)
    config = hypercorn_config(host, port)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        try:
            binds: list[str] = await nursery.start(
                partial(hypercorn.trio.serve, app, config, mode="asgi")
            )
        except OSError as exc:
            raise cannot_listen(exc, "HTTP clients", host, port, "--listen") from exc
        bound = [
            format_address(str(urlsplit(b).hostname), int(urlsplit(b).port or 0)) for b in binds
        ]
        log.info("gateway_listening", addresses=bound, authenticated=token is not None)


def run(
    args: argparse.Namespace,
    connect: Callable[[], AbstractAsyncContextManager[Client]],
    log_stream: TextIO | None = None,
) -> None:
    """Serve until interrupted.

    Raises:
        GatewayUsageError: bad options, or no token for a non-loopback address.
        ListenError: the address cannot be bound.
    """
    token = _token(args.token_file)
    host, port = _listen(args.listen, token)
    if not 1 <= args.connections <= 64:
        raise GatewayUsageError("--connections must be from 1 to 64")
    if not 0 <= args.default_wait <= MAX_WAIT_SECONDS:
        raise GatewayUsageError(f"--default-wait must be from 0 to {MAX_WAIT_SECONDS:g}")
    configure_logging(level=args.log_level, stream=log_stream or sys.stderr)
    trio.run(
        partial(
            serve,
            connect,
            host=host,
            port=port,
            token=token,
            connections=args.connections,
            default_wait=args.default_wait,
        )
    )
