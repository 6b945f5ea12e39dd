"""The custodian's command line: ``python -m drm_custodian <command>``.

``init`` makes a state directory; ``serve`` runs the daemon; ``supply``, ``block``,
``unblock`` and ``usage`` call a running daemon's admin API (over HTTPS, trusting the
state directory's CA, with its admin token). Everything blocking (reading the state, the
policy and the models) happens before ``trio.run``, so a bad file is a clear error and
exit status 2 before anything listens.

The daemon stops cleanly on SIGTERM or SIGINT (see :mod:`drm_custodian.serve` for the
order) and tells systemd when it is ready and when it stops, if ``NOTIFY_SOCKET`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from functools import partial
from typing import Final, TextIO

import structlog
import trio

from drm_custodian.admin import DEFAULT_ADMIN_PORT
from drm_custodian.admin_client import AdminClient, AdminClientError, format_usage
from drm_custodian.grants import DEFAULT_LEASE, check_lease
from drm_custodian.serve import DEFAULT_ENCLAVE_PORT, ServeConfig, read_model_file, serve
from drm_custodian.session import SessionConfig
from drm_custodian.state import StateExistsError, init_state_dir, load_state_dir
from drm_wire.attestation.policy import Policy
from drm_wire.errors import ConfigError, DrmError
from drm_wire.limits import MAX_GRANT_UNITS

__all__ = [
    "EXIT_API_ERROR",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_UNREACHABLE",
    "build_parser",
    "main",
]

log = structlog.get_logger(__name__)

EXIT_OK: Final = 0
#: The daemon failed at run time (a port in use, the ledger unusable), or an API call
#: was refused: ``EXIT_API_ERROR`` is the same value.
EXIT_FAILED: Final = 1
EXIT_API_ERROR: Final = 1
#: A bad command line or configuration: nothing was done (argparse uses 2 as well).
EXIT_CONFIG: Final = 2
#: The admin API could not be reached (is the daemon running, on that admin port?).
EXIT_UNREACHABLE: Final = 3

_EXIT_CODES: Final = f"""\
exit status:
  {EXIT_OK}  success (serve: stopped cleanly on SIGTERM or SIGINT)
  {EXIT_FAILED}  the daemon failed, or the admin API refused the call
  {EXIT_CONFIG}  bad command line or configuration (init: the state directory exists)
  {EXIT_UNREACHABLE}  the admin API could not be reached
"""


def _count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_GRANT_UNITS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_GRANT_UNITS}")
    return value


def _positive_count(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _lease(text: str) -> int:
    try:
        return check_lease(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 0-65535 (0 picks a free port)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="python -m drm_custodian",
        description="The model owner's daemon: lends ONNX models to attested enclaves and "
        "meters every inference.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--state-dir", required=True, metavar="DIR", help="state directory")
        return sub

    init = command("init", "create a state directory: CA, server certificate, token, license")
    init.add_argument("--hostname", default="localhost", help="name enclaves dial (SAN)")
    init.add_argument("--borrower", default="borrower", help="the first borrower's name")

    run = command("serve", "run the daemon: the enclave link and the admin API")
    run.add_argument("--upload", action="append", required=True, metavar="MODEL.onnx",
                     help="a model to lend (repeatable; its name is the file name without "
                     ".onnx)")  # fmt: skip
    run.add_argument("--policy", required=True, metavar="ENCLAVE_POLICY.toml",
                     help="the enclaves accepted")  # fmt: skip
    run.add_argument("--address", default="127.0.0.1", help="enclave link address")
    run.add_argument("--port", type=_port, default=DEFAULT_ENCLAVE_PORT,
                     help="enclave link port (0: any free port)")  # fmt: skip
    run.add_argument("--admin-port", type=_port, default=DEFAULT_ADMIN_PORT,
                     help="admin API port on 127.0.0.1 (0: any free port)")  # fmt: skip
    run.add_argument("--initial-inferences", type=_count, default=0, metavar="N",
                     help="supply N inferences at the first start (never again)")  # fmt: skip
    run.add_argument("--lease", type=_lease, default=DEFAULT_LEASE, metavar="N",
                     help="most inferences lent to one enclave at a time")  # fmt: skip

    def admin_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = command(name, help_text)
        sub.add_argument("--admin-port", type=_port, default=DEFAULT_ADMIN_PORT,
                         help="the daemon's admin API port")  # fmt: skip
        return sub

    supply = admin_command("supply", "add inferences to the borrower's supply")
    supply.add_argument("units", type=_positive_count, metavar="N")
    block = admin_command("block", "block the borrower: its enclaves stop serving at once")
    block.add_argument("--reason", default="", help="shown to the borrower's enclaves")
    admin_command("unblock", "unblock the borrower")
    usage = admin_command("usage", "supplied, granted, served, remaining, blocked")
    usage.add_argument("--json", action="store_true", help="print the JSON document")
    return parser


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run one command; return the exit status (see ``--help``)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            return _init(args, out)
        if args.command == "serve":
            return _serve(args)
        return _admin(args, out)
    except ConfigError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_CONFIG
    except AdminClientError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_UNREACHABLE if exc.status is None else EXIT_API_ERROR


def _init(args: argparse.Namespace, out: TextIO) -> int:
    try:
        made = trio.run(
            partial(init_state_dir, args.state_dir, hostname=args.hostname, borrower=args.borrower)
        )
    except StateExistsError as exc:
        raise ConfigError(f"{exc}; nothing was changed") from exc
    print(f"state directory:   {made.path}", file=out)
    print(f"borrower:          {made.license.borrower}", file=out)
    print(f"CA to pin:         {made.ca_cert_path}", file=out)
    print("                   (the enclave's measured configuration pins this certificate)",
          file=out)  # fmt: skip
    print(f"license file:      {made.license_path}", file=out)
    print("                   (hand it to the borrower, then delete it: it holds the secret)",
          file=out)  # fmt: skip
    print(f"admin token:       {made.admin_token_path}", file=out)
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    state = load_state_dir(args.state_dir)
    models = [read_model_file(path) for path in args.upload]
    config = ServeConfig(
        state=state,
        models=models,
        policy=Policy.load(args.policy),
        address=args.address,
        port=args.port,
        admin_port=args.admin_port,
        initial_inferences=args.initial_inferences,
        session=SessionConfig(lease=args.lease),
    )
    status = EXIT_OK
    try:
        trio.run(run_daemon, config)
    except* (OSError, DrmError) as group:
        for exc in group.exceptions:
            log.error("custodian_failed", error=str(exc), kind=type(exc).__name__)
        status = EXIT_FAILED
    return status


async def run_daemon(config: ServeConfig) -> None:
    """:func:`serve` until SIGTERM or SIGINT, with systemd readiness notifications."""
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def watch() -> None:
            async for signum in signals:
                log.info("custodian_signal", signal=signal.Signals(signum).name)
                stop.set()
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await nursery.start(partial(serve, config, shutdown_trigger=stop.wait))
            _sd_notify("READY=1")
            await stop.wait()
            _sd_notify("STOPPING=1")
            nursery.cancel_scope.deadline = trio.current_time() + 30.0  # a last resort


def _sd_notify(message: str) -> None:
    """Tell systemd (``Type=notify``) about readiness; does nothing outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("sd_notify_failed", error=str(exc))


def _admin(args: argparse.Namespace, out: TextIO) -> int:
    state = load_state_dir(args.state_dir)
    client = AdminClient.from_state(state, port=args.admin_port)
    if args.command == "supply":
        doc = client.supply(args.units)
    elif args.command == "block":
        doc = client.block(args.reason)
    elif args.command == "unblock":
        doc = client.unblock()
    else:
        doc = client.usage()
    if getattr(args, "json", False):
        print(json.dumps(doc, sort_keys=True), file=out)
    else:
        print(format_usage(doc), file=out)
    return EXIT_OK
