"""``python -m drm_enclave``: the enclave daemon (``serve``) and its measurement (``measure``).

``serve`` runs until SIGTERM or SIGINT, then shuts down cleanly and exits 0. Its readiness
is the ``enclave_serving`` log event (JSON on stderr, with ``consumer_address``; the way
tests learn a port-0 address) and, under systemd, ``READY=1`` on ``$NOTIFY_SOCKET``.
``custodian_link_up`` follows once the custodian link is attested, loaded and synced.

``measure`` prints this build's simulated MRENCLAVE and MRSIGNER and writes the policy
file (``--out``) that the custodian and consumers load to accept it.

Exit status: 0 success (or a clean shutdown), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

import structlog
import trio

from drm_wire.errors import ConfigError

from .identity import License, simulated_measurement, simulation_policy, warn_simulation
from .serve import DEFAULT_CONSUMER_PORT, EnclaveConfig, serve

__all__ = ["EXIT_OK", "EXIT_USAGE", "load_license", "main", "parse_address"]

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
LICENSE_FORMAT: Final = "drm-license"
#: A license file is a few hundred bytes; refuse to read anything much larger.
_MAX_LICENSE_BYTES: Final = 64 * 1024

_log = structlog.get_logger("drm_enclave.cli")


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


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_license(path: Path) -> License:
    """Read the license file the custodian's ``init`` wrote (format ``drm-license``).

    Raises:
        ConfigError: unreadable, not JSON, another format, or a missing field.
    """
    try:
        with path.open("rb") as handle:
            raw = handle.read(_MAX_LICENSE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read license: {exc.strerror}", path=str(path)) from exc
    if len(raw) > _MAX_LICENSE_BYTES:
        raise ConfigError("license file is too large", path=str(path))
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError("license file is not JSON", path=str(path)) from exc
    if not isinstance(doc, dict) or doc.get("format") != LICENSE_FORMAT:
        raise ConfigError(f"not a {LICENSE_FORMAT} file", path=str(path), key="format")
    values = {key: doc.get(key) for key in ("borrower", "license_id", "secret")}
    for key, value in values.items():
        if not isinstance(value, str) or not value or (key == "license_id" and ":" in value):
            raise ConfigError("missing or invalid", path=str(path), key=key)
    return License(values["borrower"], values["license_id"], values["secret"])  # type: ignore[arg-type]


def _read_ca(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the custodian CA: {exc.strerror}", path=str(path)) from exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drm_enclave",
        description="The borrower's enclave daemon (serve) and its measurement (measure).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("serve", help="run the enclave daemon")
    run.add_argument("--custodian", type=_address, required=True, metavar="HOST:PORT")
    run.add_argument("--custodian-ca", type=Path, required=True, metavar="CA.pem",
                     help="the pinned custodian CA certificate")  # fmt: skip
    run.add_argument("--license", type=Path, required=True, metavar="FILE",
                     help="the license file the custodian's init wrote")  # fmt: skip
    run.add_argument("--listen", type=_address, default=("127.0.0.1", DEFAULT_CONSUMER_PORT),
                     metavar="HOST:PORT", help="consumer port (default 127.0.0.1:9924; port 0 "
                     "picks a free one)")  # fmt: skip
    run.add_argument("--attestation", choices=("auto", "gramine", "simulated"), default="auto")
    run.add_argument("--simulation-dir", type=Path, metavar="DIR",
                     help="INSECURE simulated SGX platform (created on first use)")  # fmt: skip
    run.add_argument("--intra-op-threads", type=int, default=1, metavar="N")

    measure = commands.add_parser("measure", help="print this build's simulated measurements")
    measure.add_argument("--custodian-ca", type=Path, required=True, metavar="CA.pem")
    measure.add_argument("--simulation-dir", type=Path, metavar="DIR",
                         help="simulated platform whose root the policy trusts")  # fmt: skip
    measure.add_argument("--out", type=Path, metavar="POLICY.toml",
                         help="write the policy file (needs --simulation-dir)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "measure":
            return _measure(args, out or sys.stdout)
        return _serve(args)
    except ConfigError as exc:
        _log.error("configuration_error", error=str(exc))
        return EXIT_USAGE


def _measure(args: argparse.Namespace, out: TextIO) -> int:
    ca_pem = _read_ca(args.custodian_ca)
    if args.out is not None and args.simulation_dir is None:
        raise ConfigError("--out needs --simulation-dir (the root the policy trusts)")
    measurement = simulated_measurement(ca_pem)
    warn_simulation(mr_enclave=measurement.mr_enclave.hex())
    print(f"MRENCLAVE {measurement.mr_enclave.hex()}  (SIMULATED)", file=out)
    print(f"MRSIGNER  {measurement.mr_signer.hex()}  (SIMULATED)", file=out)
    if args.out is not None:
        policy = simulation_policy(ca_pem, args.simulation_dir, policy_path=args.out)
        policy.write(args.out)
        print(f"policy written to {args.out}", file=out)
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    if args.attestation == "simulated" and args.simulation_dir is None:
        raise ConfigError("--attestation simulated needs --simulation-dir")
    if not 1 <= args.intra_op_threads <= 64:
        raise ConfigError("--intra-op-threads must be from 1 to 64")
    (custodian_host, custodian_port), (listen_host, listen_port) = args.custodian, args.listen
    config = EnclaveConfig(
        custodian_host=custodian_host,
        custodian_port=custodian_port,
        custodian_ca_pem=_read_ca(args.custodian_ca),
        license=load_license(args.license),
        listen_host=listen_host,
        listen_port=listen_port,
        attestation=args.attestation,
        simulation_dir=args.simulation_dir,
        intra_op_threads=args.intra_op_threads,
    )
    return trio.run(_serve_until_signal, config)


async def _serve_until_signal(config: EnclaveConfig) -> int:
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def stop_requested() -> None:
                async for signum in signals:
                    _log.info("enclave_stopping", signal=signal.Signals(signum).name)
                    _sd_notify(b"STOPPING=1")
                    return

            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(serve, config, shutdown_trigger=stop_requested)
                )
                _sd_notify(b"READY=1")
    except BaseExceptionGroup as group:
        startup, rest = group.split((ConfigError, OSError))
        if rest is not None or startup is None:
            raise
        for exc in startup.exceptions:
            _log.error("startup_failed", error_type=type(exc).__name__, error=str(exc))
        return EXIT_USAGE
    _log.info("enclave_stopped")
    return EXIT_OK


def _sd_notify(state: bytes) -> None:
    """systemd readiness (``Type=notify``); a no-op outside systemd."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state, address)
    except OSError as exc:
        _log.warning("sd_notify_failed", error=str(exc))
