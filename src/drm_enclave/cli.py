"""``python -m drm_enclave``: the enclave daemon (``serve``) and its measurement (``measure``).

``serve`` runs until SIGTERM or SIGINT, then shuts down cleanly and exits 0. It logs
``enclave_serving`` (JSON on stderr, with ``consumer_address``; the way tests learn a
port-0 address) once the consumer port listens, and ``custodian_link_up`` once the
custodian link is attested, the models loaded and the quota synced. Under systemd
(``Type=notify``) ``READY=1`` is sent only then, never by an enclave that cannot reach its
custodian; ``STATUS=`` lines follow each phase, ``STOPPING=1`` a signal, and watchdog
pings come from the event loop (:mod:`drm_daemon.sd_notify`).

``serve`` takes its options from flags, from a TOML file (``--config``), or both: a flag
wins over the file, the file over the default (:mod:`drm_daemon.config_file`), so options
a Gramine manifest fixes in argv cannot be overridden by a host-provided file.
``check-config`` checks the same options and the files they name without starting.

``measure`` prints this build's simulated MRENCLAVE and MRSIGNER and writes the policy
file (``--out``) that the custodian and consumers load to accept it. With ``--sigstruct``
(the JSON of ``gramine-sgx-sigstruct-view`` for a signed SGX build, see ``gramine/``) it
prints and pins that build's real measurements instead (:mod:`drm_enclave.sigstruct`).

Exit status: 0 success (or a clean shutdown), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

import structlog
import trio

from drm_daemon.arguments import bounded_integer
from drm_daemon.config_file import ConfigSchema, Kind, read_bounded
from drm_daemon.listen import ListenError
from drm_daemon.logs import LOG_LEVELS, set_log_level
from drm_daemon.sd_notify import Notifier
from drm_wire.attestation.collateral import TcbStatus
from drm_wire.errors import ConfigError
from drm_wire.limits import MAX_MODEL_BYTES, KiB, MiB
from drm_wire.messages import EnclaveState
from drm_wire.net.address import format_address, parse_address

from .consumer_server import ConsumerLimits
from .identity import License, simulated_measurement, simulation_policy, warn_simulation
from .runtime import EnclaveRuntime
from .serve import DEFAULT_CONSUMER_PORT, DEFAULT_RETURN_TIMEOUT, EnclaveConfig, serve
from .sigstruct import measure_sigstruct

__all__ = ["EXIT_OK", "EXIT_USAGE", "load_license", "main", "parse_address"]

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
LICENSE_FORMAT: Final = "drm-license"
#: A license file is a few hundred bytes; refuse to read anything much larger.
_MAX_LICENSE_BYTES: Final = 64 * 1024
#: A CA certificate in PEM is a kilobyte or two.
_MAX_CA_BYTES: Final = 64 * 1024
#: onnxruntime intra-op threads per session.
_MAX_THREADS: Final = 64
#: The longest ``--return-timeout``: a stop that waits longer than this for an answer is
#: better settled by the owner (its units stay in doubt), and a supervisor's stop timeout
#: must cover it.
MAX_RETURN_TIMEOUT: Final = 300

_log = structlog.get_logger("drm_enclave.cli")


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_threads = bounded_integer(1, _MAX_THREADS)


def _pccs_url(text: str) -> str:
    if not text.startswith("https://") or len(text) <= len("https://"):
        raise argparse.ArgumentTypeError(f"PCCS URL must be https://host[:port], not {text!r}")
    return text


#: The consumer port's limits (I17): flag, its ConsumerLimits field, unit, bounds, help.
#: The largest ``--max-model-mib``: what the protocol carries (2 GiB less a byte).
MAX_MODEL_MIB: Final = (MAX_MODEL_BYTES + 1) // MiB

_LIMIT_OPTIONS: Final = (
    ("--max-connections", "max_connections", 1, 1, 1_000_000,
     "live consumer connections; past it the longest idle one is closed, else busy"),
    ("--max-handshakes", "max_handshakes", 1, 1, 100_000,
     "TLS handshakes in progress on the consumer port; more wait, then are closed"),
    ("--max-in-flight", "max_in_flight", 1, 1, 100_000,
     "requests in flight on one consumer connection; more get busy"),
    ("--max-parked-per-connection", "max_parked_per_connection", 1, 0, 100_000,
     "requests of one connection waiting for inferences; more get busy"),
    ("--frame-timeout", "frame_timeout", 1, 1, 3600,
     "seconds a consumer's frame may take once its first byte arrived"),
    ("--min-transfer-rate", "min_rate", KiB, 1, 1_000_000,
     "KiB/s a consumer's frame must average after a 5 s grace"),
    ("--payload-budget", "payload_budget", MiB, 66, 1_000_000,
     "MiB for everything received from consumers and not yet answered"),
    ("--connection-share", "connection_share", MiB, 66, 1_000_000,
     "MiB of the payload budget one consumer connection may hold"),
)  # fmt: skip


def load_license(path: Path) -> License:
    """Read the license file the custodian's ``init`` wrote (format ``drm-license``).

    Raises:
        ConfigError: unreadable, not JSON, another format, or a missing field.
    """
    raw = read_bounded(path, max_bytes=_MAX_LICENSE_BYTES, what="the license")
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
    return read_bounded(path, max_bytes=_MAX_CA_BYTES, what="the custodian CA")


_EXIT_CODES: Final = f"""\
exit status:
  {EXIT_OK}  success (serve: stopped cleanly on SIGTERM or SIGINT)
  1  the daemon failed at run time (a bug: the log says where)
  {EXIT_USAGE}  bad command line or configuration, or a port serve cannot listen on
"""

_MEASURE: Final = (
    "print this build's measurements (MRENCLAVE, MRSIGNER); with --out, write the policy "
    "that accepts exactly this build, for the custodian's serve --policy and the "
    "consumers' --policy"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drm_enclave",
        description="The borrower's enclave daemon (serve) and its measurement (measure).",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=textwrap.fill(help_text, 79),
            epilog=_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    run = command("serve", "run the enclave daemon until SIGTERM or SIGINT")
    run.set_defaults(schema=serve_options(run))
    check = command(
        "check-config",
        "check serve's options and the files they name without starting; print a summary",
    )
    check.set_defaults(schema=serve_options(check, config_required=True))

    measure = command("measure", _MEASURE)
    measure.add_argument("--custodian-ca", type=Path, required=True, metavar="CA.pem",
                         help="the custodian's CA (ca.pem of drm_custodian init): the build "
                         "pins it, so it is part of the measurement")  # fmt: skip
    measure.add_argument("--simulation-dir", type=Path, metavar="DIR",
                         help="simulated platform whose root the policy trusts")  # fmt: skip
    measure.add_argument("--sigstruct", type=Path, metavar="FILE.json",
                         help="a signed SGX build: gramine-sgx-sigstruct-view "
                         "--output-format=json of its .sig")  # fmt: skip
    measure.add_argument("--manifest", type=Path, metavar="FILE.manifest.sgx",
                         help="with --sigstruct: check that the signed manifest measured "
                         "this CA")  # fmt: skip
    measure.add_argument("--accept-tcb-status", action="append", type=TcbStatus,
                         choices=list(TcbStatus), metavar="STATUS",
                         help="with --sigstruct: an accepted Intel TCB status (repeatable; "
                         "default UpToDate)")  # fmt: skip
    measure.add_argument("--out", type=Path, metavar="POLICY.toml",
                         help="write the policy file (needs --simulation-dir or "
                         "--sigstruct)")  # fmt: skip
    return parser


def serve_options(sub: argparse.ArgumentParser, *, config_required: bool = False) -> ConfigSchema:
    """``serve``'s options, each also a key of its ``--config`` file (flag > file > default)."""
    schema = ConfigSchema(sub, config_required=config_required)
    schema.add("--custodian", Kind.STRING, type=_address, required=True, metavar="HOST:PORT",
               help="the custodian's enclave link")  # fmt: skip
    schema.add("--custodian-ca", Kind.PATH, required=True, metavar="CA.pem",
               help="the pinned custodian CA certificate")  # fmt: skip
    schema.add("--license", Kind.PATH, required=True, metavar="FILE",
               help="the license file the custodian's init wrote")  # fmt: skip
    schema.add("--listen", Kind.STRING, type=_address, metavar="HOST:PORT",
               default=f"127.0.0.1:{DEFAULT_CONSUMER_PORT}",
               help="consumer port (port 0 picks a free one)")  # fmt: skip
    schema.add("--attestation", Kind.STRING, choices=("auto", "gramine", "simulated"),
               default="auto", help="the attestation backend")  # fmt: skip
    schema.add("--simulation-dir", Kind.PATH, metavar="DIR",
               help="INSECURE simulated SGX platform (created on first use)")  # fmt: skip
    schema.add("--pccs-url", Kind.STRING, metavar="URL", type=_pccs_url,
               help="https URL of the borrower's PCCS (or Intel's PCS): the enclave fetches "
               "its platform's collateral there and staples it in its certificate, so "
               "verifiers need no PCCS of their own")  # fmt: skip
    schema.add("--pccs-ca", Kind.PATH, metavar="CA.pem",
               help="verify the PCCS with this CA instead of the system's")  # fmt: skip
    schema.add("--intra-op-threads", Kind.INTEGER, type=_threads, default=1, metavar="N",
               help="onnxruntime threads per model session")  # fmt: skip
    schema.add("--max-model-mib", Kind.INTEGER, type=bounded_integer(1, MAX_MODEL_MIB),
               default=MAX_MODEL_MIB, metavar="N",
               help="largest model this enclave loads, in MiB; a larger one is refused "
                    "(model_unavailable) and the others serve. Size the enclave's memory "
                    "for about twice it")  # fmt: skip
    schema.add("--return-timeout", Kind.INTEGER, type=bounded_integer(1, MAX_RETURN_TIMEOUT),
               default=int(DEFAULT_RETURN_TIMEOUT), metavar="SECONDS",
               help="seconds a clean stop waits for the custodian to acknowledge the "
                    "units it returns; past it they stay in doubt until the owner "
                    "settles them")  # fmt: skip
    schema.add("--log-level", Kind.STRING, choices=LOG_LEVELS, default="info",
               help="lowest level logged (debug adds per-request events)")  # fmt: skip
    defaults = ConsumerLimits()
    for flag, name, unit, low, high, text in _LIMIT_OPTIONS:
        schema.add(flag, Kind.INTEGER, type=bounded_integer(low, high), metavar="N",
                   default=int(getattr(defaults, name) // unit), help=text)  # fmt: skip
    return schema


def _consumer_limits(args: argparse.Namespace) -> ConsumerLimits:
    values = {name: getattr(args, flag[2:].replace("-", "_")) * unit
              for flag, name, unit, *_ in _LIMIT_OPTIONS}  # fmt: skip
    try:
        return ConsumerLimits(**values)
    except ValueError as exc:
        raise ConfigError(str(exc), key="connection_share") from exc


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "measure":
            return _measure(args, out or sys.stdout)
        if args.command == "check-config":
            return _check_config(args.schema.resolve(args), out or sys.stdout)
        return _serve(args.schema.resolve(args))
    except ConfigError as exc:
        _log.error("configuration_error", error=str(exc))
        return EXIT_USAGE


def _measure(args: argparse.Namespace, out: TextIO) -> int:
    if args.sigstruct is not None:
        if args.simulation_dir is not None:
            raise ConfigError("--sigstruct and --simulation-dir exclude each other")
        measure_sigstruct(
            args.sigstruct,
            args.custodian_ca,
            out,
            manifest=args.manifest,
            policy_path=args.out,
            tcb_statuses=args.accept_tcb_status or (TcbStatus.UP_TO_DATE,),
        )
        return EXIT_OK
    if args.manifest is not None or args.accept_tcb_status:
        raise ConfigError("--manifest and --accept-tcb-status need --sigstruct")
    ca_pem = _read_ca(args.custodian_ca)
    if args.out is not None and args.simulation_dir is None:
        raise ConfigError("--out needs --simulation-dir or --sigstruct (what the policy trusts)")
    measurement = simulated_measurement(ca_pem)
    warn_simulation(mr_enclave=measurement.mr_enclave.hex())
    print(f"MRENCLAVE {measurement.mr_enclave.hex()}  (SIMULATED)", file=out)
    print(f"MRSIGNER  {measurement.mr_signer.hex()}  (SIMULATED)", file=out)
    if args.out is not None:
        policy = simulation_policy(ca_pem, args.simulation_dir, policy_path=args.out)
        policy.write(args.out)
        print(f"policy written to {args.out}", file=out)
    return EXIT_OK


def _enclave_config(args: argparse.Namespace) -> EnclaveConfig:
    """Read the files the options name and check the whole configuration (blocking)."""
    if args.attestation == "simulated" and args.simulation_dir is None:
        raise ConfigError("--attestation simulated needs --simulation-dir", key="simulation_dir")
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
        pccs_url=args.pccs_url,
        pccs_ca=args.pccs_ca,
        intra_op_threads=args.intra_op_threads,
        limits=_consumer_limits(args),
        max_model_bytes=min(args.max_model_mib * MiB, MAX_MODEL_BYTES),
        return_timeout=float(args.return_timeout),
    )
    if args.pccs_ca is not None and args.pccs_url is None:
        raise ConfigError("--pccs-ca needs --pccs-url", key="pccs_ca")
    if args.pccs_ca is not None and not args.pccs_ca.is_file():
        raise ConfigError("cannot read the PCCS CA", path=str(args.pccs_ca), key="pccs_ca")
    try:
        config.custodian_ca()
    except ConfigError as exc:
        raise ConfigError(str(exc), path=str(args.custodian_ca)) from exc
    return config


def _check_config(args: argparse.Namespace, out: TextIO) -> int:
    config = _enclave_config(args)
    for line in ConfigSchema.summary(args, _show):
        print(line, file=out)
    subject = config.custodian_ca().subject.rfc4514_string()
    print(f"  custodian CA: {subject}", file=out)
    print(f"  license: {config.license.license_id} (borrower {config.license.borrower})",
          file=out)  # fmt: skip
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    set_log_level(args.log_level)  # first: loggers keep the level of their first use
    config = _enclave_config(args)
    return trio.run(_serve_until_signal, config, Notifier.from_environment())


async def _serve_until_signal(config: EnclaveConfig, notifier: Notifier) -> int:
    runtime = EnclaveRuntime()
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            stopping = trio.Event()

            async def stop_requested() -> None:
                async for signum in signals:
                    _log.info("enclave_stopping", signal=signal.Signals(signum).name)
                    stopping.set()
                    notifier.stopping("stopping: draining requests, reporting usage")
                    return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifier.watchdog)

                async def run(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
                    await serve(
                        config,
                        runtime=runtime,
                        shutdown_trigger=stop_requested,
                        task_status=task_status,
                    )
                    nursery.cancel_scope.cancel()  # the watchdog and the phase reporter

                consumer_address = await nursery.start(run)
                nursery.start_soon(
                    _report_phases, runtime, notifier, config, consumer_address, stopping
                )
    except BaseExceptionGroup as group:
        startup, rest = group.split((ConfigError, OSError, ListenError))
        if rest is not None or startup is None:
            raise
        for exc in startup.exceptions:
            _log.error("startup_failed", error_type=type(exc).__name__, error=str(exc))
        return EXIT_USAGE
    _log.info("enclave_stopped")
    return EXIT_OK


def _show(value: object) -> object:
    return format_address(*value) if isinstance(value, tuple) else value


_Phase = tuple[bool, EnclaveState, int, bool]


def _phase(runtime: EnclaveRuntime) -> _Phase:
    """What the STATUS line depends on: link up, state, models loaded, ready."""
    state = runtime.state
    # Ready: attested to the custodian, the models loaded, the quota synced (or blocked).
    ready = runtime.link_up and bool(runtime.models) and state is not EnclaveState.LOADING
    return runtime.link_up, state, len(runtime.models), ready


def _phase_changed(seen: _Phase, runtime: EnclaveRuntime) -> bool:
    return _phase(runtime) != seen


async def _report_phases(
    runtime: EnclaveRuntime,
    notifier: Notifier,
    config: EnclaveConfig,
    consumer_address: tuple[str, int],
    stopping: trio.Event,
) -> None:
    """STATUS= at each phase of the custodian link; READY=1 the first time it is ready.

    The consumer port already listens (this starts after ``serve``'s ``started``), so
    READY=1 means: listening for consumers AND attested with the models loaded. An
    enclave that never reaches its custodian never sends it.
    """
    custodian = format_address(config.custodian_host, config.custodian_port)
    listening = format_address(*consumer_address)
    announced = False
    shown = ""
    while not stopping.is_set():
        phase = link_up, state, models, ready = _phase(runtime)
        if not link_up:
            text = (
                f"custodian link lost; retrying {custodian}"
                if announced
                else f"dialing custodian {custodian}"
            )
        elif not ready:
            text = f"receiving model(s) from custodian {custodian}"
        elif state is EnclaveState.BLOCKED:
            text = f"blocked by the custodian; serving nothing on {listening}"
        else:
            text = f"serving {models} model(s) on {listening}"
        if ready and not announced:
            announced = True
            notifier.ready(text)
        elif text != shown:
            notifier.status(text)
        shown = text
        await runtime.wait_for(functools.partial(_phase_changed, phase))
