"""``python -m drm_consumer gateway``: serve the Open Inference Protocol over HTTP in front
of one attested enclave.

:func:`add_arguments` adds the gateway's own options to the subcommand (the connection
options are the other commands'); :func:`run` serves until interrupted. It listens on
loopback by default. Any other address needs a bearer token, from ``--token-file`` or the
``DRM_GATEWAY_TOKEN`` environment variable (never on the command line, where ``ps`` shows
it to every user of the machine); without one it refuses to start (threat model G05).
Logs are JSON lines on standard error; ``gateway_listening`` says where it listens.

*Stopping.* SIGTERM (systemd, a container runtime) or SIGINT (Ctrl-C) starts a drain
(:class:`~drm_consumer.gateway.app.GatewayApp`, *Stopping*): ready answers 503 and new
inferences are refused while the requests in progress finish, for at most
``--stop-timeout`` seconds (a second signal cuts it short); those still running then are
answered 503. Then HTTP stops (no more connections accepted, idle keep-alive connections
closed within :data:`HTTP_CLOSE_TIMEOUT`), the attested connections are closed, and the
process exits 0 after SIGTERM, 130 after Ctrl-C (as the other commands do when
interrupted).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import Final, TextIO
from urllib.parse import urlsplit

import hypercorn.trio
import hypercorn.trio.tcp_server
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
#: Bytes hypercorn asks the socket for per read (its own default is 64 KiB).
RECV_BYTES: Final = 256 * 1024
#: The exit status after Ctrl-C (SIGINT), as every command of the CLI.
EXIT_INTERRUPTED: Final = 130
#: Seconds the requests in progress may take to finish once a stop is asked for.
DEFAULT_STOP_TIMEOUT: Final = 30.0
#: Longest ``--stop-timeout``.
MAX_STOP_TIMEOUT: Final = 3600.0
#: Seconds hypercorn gives its connections to close once the drain is over (they are idle
#: then, or answering the 503 of an abandoned request).
HTTP_CLOSE_TIMEOUT: Final = 2.0


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
    parser.add_argument("--stop-timeout", type=float, default=DEFAULT_STOP_TIMEOUT,
                        metavar="SECONDS",
                        help="on SIGTERM or Ctrl-C, how long the requests in progress may "
                        f"take to finish (default {DEFAULT_STOP_TIMEOUT:g})")  # fmt: skip
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
    """The gateway's hypercorn configuration, every limit spelled out.

    Also sets hypercorn's read size (:data:`RECV_BYTES`), which it has no setting for.
    """
    # A CNN-sized body (2.7 MB) in hypercorn's 64 KiB reads was 42 trips through h11, a
    # memory channel and the app's receive; 256 KiB reads cut the HTTP part of the
    # gateway's CPU per request by about a third (docs/production.md, *The gateway*).
    # h11 still bounds what it buffers (h11_max_incomplete_size for the headers; the body
    # is handed on as it comes, and the app counts it against MAX_BODY_BYTES).
    hypercorn.trio.tcp_server.MAX_RECV = RECV_BYTES
    config = Config()
    config.bind = [format_address(host, port)]
    config.alpn_protocols = ["http/1.1"]
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.read_timeout = 120  # an idle keep-alive connection is closed after this
    config.keep_alive_timeout = 120
    config.graceful_timeout = HTTP_CLOSE_TIMEOUT
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
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
) -> int:
    """Keep the pool and serve HTTP until SIGTERM or SIGINT, then stop as the module says.

    Returns:
        The signal that stopped it.
    """
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
    stop = trio.Event()
    http_stop, http_done = trio.Event(), trio.Event()
    received: list[int] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def watch() -> None:
            async for signum in signals:
                received.append(signum)
                if len(received) == 1:
                    stop.set()
                else:  # a second signal: do not wait for the requests in progress
                    app.abandon()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            nursery.start_soon(pool.run)

            async def http(*, task_status: trio.TaskStatus[list[str]]) -> None:
                await hypercorn.trio.serve(
                    app, config, shutdown_trigger=http_stop.wait, task_status=task_status,
                    mode="asgi",
                )  # fmt: skip
                http_done.set()

            try:
                binds: list[str] = await nursery.start(http)
            except OSError as exc:
                raise cannot_listen(exc, "HTTP clients", host, port, "--listen") from exc
            bound = [
                format_address(str(urlsplit(b).hostname), int(urlsplit(b).port or 0)) for b in binds
            ]
            log.info("gateway_listening", addresses=bound, authenticated=token is not None)
            await stop.wait()
            app.start_draining()
            log.info(
                "gateway_draining",
                signal=signal.Signals(received[0]).name,
                in_flight=app.in_flight,
                inferences=app.inferences_in_flight,
                stop_timeout=stop_timeout,
            )
            abandoned = 0
            with trio.move_on_after(stop_timeout):
                await app.drained()
            if app.in_flight:
                abandoned = app.abandon()
                log.warning("gateway_requests_abandoned", count=abandoned)
            with trio.move_on_after(HTTP_CLOSE_TIMEOUT):
                await app.drained()  # the abandoned requests send their 503
            http_stop.set()
            # hypercorn stops accepting, closes its connections (HTTP_CLOSE_TIMEOUT at
            # most) and returns; then the pool's connections are closed.
            with trio.move_on_after(HTTP_CLOSE_TIMEOUT + 1):
                await http_done.wait()
            nursery.cancel_scope.cancel()
    log.info("gateway_stopped", abandoned=abandoned)
    return received[0]


def run(
    args: argparse.Namespace,
    connect: Callable[[], AbstractAsyncContextManager[Client]],
    log_stream: TextIO | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT; the exit status: 0 after SIGTERM,
    :data:`EXIT_INTERRUPTED` after Ctrl-C.

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
    if not 0 <= args.stop_timeout <= MAX_STOP_TIMEOUT:
        raise GatewayUsageError(f"--stop-timeout must be from 0 to {MAX_STOP_TIMEOUT:g}")
    configure_logging(level=args.log_level, stream=log_stream or sys.stderr)
    signum = trio.run(
        partial(
            serve,
            connect,
            host=host,
            port=port,
            token=token,
            connections=args.connections,
            default_wait=args.default_wait,
            stop_timeout=args.stop_timeout,
        )
    )
    return EXIT_INTERRUPTED if signum == signal.SIGINT else 0
