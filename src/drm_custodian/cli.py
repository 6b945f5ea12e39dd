"""The custodian's command line: ``python -m drm_custodian <command>``.

``init`` makes a state directory; ``serve`` runs the daemon; ``supply``, ``block``,
``unblock`` and ``usage`` call a running daemon's admin API (over HTTPS, trusting the
state directory's CA, with its admin token). Everything blocking (reading the state, the
policy and the models) happens before ``trio.run``, so a bad file is a clear error and
exit status 2 before anything listens.

``serve`` takes its options from flags, from a TOML file (``--config``), or both: a flag
wins over the file, the file over the default (:mod:`drm_daemon.config_file`).
``check-config`` checks the same options and every file they name without starting.

The daemon stops cleanly on SIGTERM or SIGINT (see :mod:`drm_custodian.serve` for the
order). Under systemd (``Type=notify``) it sends ``READY=1`` once both the enclave link
and the admin API listen, ``STATUS=`` lines, ``STOPPING=1`` on a signal, and watchdog
pings (:mod:`drm_daemon.sd_notify`).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Final, TextIO

import structlog
import trio

from drm_custodian.admin import DEFAULT_ADMIN_PORT, MAX_BLOCK_WAIT
from drm_custodian.admin_client import (
    AdminClient,
    AdminClientError,
    format_borrowers,
    format_usage,
)
from drm_custodian.borrowers import BorrowerBook, BorrowerError, check_borrower_name, parse_models
from drm_custodian.grants import DEFAULT_LEASE, check_lease
from drm_custodian.ledger import Ledger
from drm_custodian.models import ModelFile, inspect_model, parse_models_table, read_model_file
from drm_custodian.serve import (
    DEFAULT_ENCLAVE_PORT,
    DEFAULT_LINK_BUDGET,
    DEFAULT_MAX_LINK_HANDSHAKES,
    DEFAULT_MAX_LINKS,
    MAX_LINK_BUDGET,
    BoundAddresses,
    ServeConfig,
    serve,
)
from drm_custodian.session import DEFAULT_RECLAIM_MARGIN, SessionConfig
from drm_custodian.state import (
    MAX_INSTANCES,
    CustodianState,
    StateExistsError,
    init_state_dir,
    load_state_dir,
)
from drm_custodian.state_lock import StateLockedError, lock_state_dir
from drm_daemon.arguments import bounded_integer
from drm_daemon.collector import settle_heap
from drm_daemon.config_file import ConfigSchema, Kind
from drm_daemon.logs import LOG_LEVELS, set_log_level
from drm_daemon.sd_notify import Notifier
from drm_wire.attestation.collateral_source import CollateralSet
from drm_wire.attestation.policy import Policy
from drm_wire.errors import ConfigError, DrmError
from drm_wire.limits import FRAME_TIMEOUT, MAX_GRANT_UNITS, MiB
from drm_wire.model.terms import Pricing
from drm_wire.net.address import format_address, port_argument
from drm_wire.net.budget import MIN_CONNECTION_SHARE

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


_port = port_argument(zero=True)


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of inferences (a whole number, such as 5)"
        ) from None


def _count(text: str) -> int:
    value = _whole_number(text)
    if not 0 <= value <= MAX_GRANT_UNITS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_GRANT_UNITS}, got {value}")
    return value


def _positive_count(text: str) -> int:
    value = _whole_number(text)
    if not 1 <= value <= MAX_GRANT_UNITS:
        raise argparse.ArgumentTypeError(
            f"must be between 1 and {MAX_GRANT_UNITS}, got {value} (a supply only adds: "
            "to stop lending, use block)"
        )
    return value


def _block_wait(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_BLOCK_WAIT:  # NaN fails this too
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 0 to {MAX_BLOCK_WAIT:g}, got {text[:20]!r}"
        )
    return value


_cap = bounded_integer(1, 1_000_000)

#: The largest --reclaim-margin: a day.
MAX_RECLAIM_MARGIN: Final = 86_400

_margin = bounded_integer(0, MAX_RECLAIM_MARGIN, "seconds")
_link_budget = bounded_integer(MIN_CONNECTION_SHARE // MiB + 1, MAX_LINK_BUDGET // MiB, "MiB")
_frame_timeout = bounded_integer(1, 3600, "seconds")


def _lease(text: str) -> int:
    try:
        return check_lease(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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

    def command(name: str, help_text: str, *, state_dir: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if state_dir:
            sub.add_argument("--state-dir", required=True, metavar="DIR", help="state directory")
        return sub

    init = command("init", "create a state directory: CA, server certificate, token, license")
    init.add_argument("--hostname", default="localhost", help="name enclaves dial (SAN)")
    init.add_argument("--borrower", default="borrower", help="the first borrower's name")

    run = command("serve", "run the daemon: the enclave link and the admin API", state_dir=False)
    run.set_defaults(schema=serve_options(run))
    check = command(
        "check-config",
        "check serve's options and the files they name without starting; print a summary",
        state_dir=False,
    )
    check.set_defaults(schema=serve_options(check, config_required=True))

    def admin_command(
        name: str, help_text: str, *, per_borrower: bool = True
    ) -> argparse.ArgumentParser:
        sub = command(name, help_text)
        sub.add_argument("--admin-port", type=_port, default=DEFAULT_ADMIN_PORT,
                         help="the daemon's admin API port")  # fmt: skip
        if per_borrower:
            sub.add_argument("--borrower", metavar="NAME", type=_borrower_name,
                             help="the borrower to act on (needed with several)")  # fmt: skip
        return sub

    supply = admin_command("supply", "add inferences to the borrower's supply")
    supply.add_argument("units", type=_positive_count, metavar="N",
                        help=f"inferences to add, 1 to {MAX_GRANT_UNITS}")  # fmt: skip
    block = admin_command("block", "block the borrower: its enclaves stop serving at once")
    block.add_argument("--reason", default="", help="shown to the borrower's enclaves")
    block.add_argument("--wait", type=_block_wait, default=None, metavar="SECONDS",
                       help="wait up to SECONDS (at most 10) until every live enclave "
                       "has acknowledged the block; block_acknowledged counts those that "
                       "did")  # fmt: skip
    admin_command("unblock", "unblock the borrower")
    reclaim = admin_command(
        "reclaim",
        "write off the inferences in doubt of a lost enclave instance (the owner's decision; "
        "allowed once the custodian has sent it nothing for its reclaim window); the "
        "instance id is refused from then on",
    )
    reclaim.add_argument("--instance", required=True, metavar="ID",
                         help="the instance id, as `usage` lists it")  # fmt: skip
    reclaim.add_argument("--json", action="store_true", help="print the JSON document")
    usage = admin_command(
        "usage", "supplied, granted, served, remaining, blocked, and each enclave instance"
    )
    usage.add_argument("--json", action="store_true", help="print the JSON document")

    borrower = commands.add_parser(
        "borrower",
        help="add, list and remove borrowers (one license each)",
        description="Add, list and remove borrowers. While the daemon runs these go "
        "through its admin API (it holds the state directory); else they change the "
        "state directory directly.",
    )
    actions = borrower.add_subparsers(dest="action", required=True, metavar="ACTION")

    def borrower_action(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text, description=help_text,
                                 epilog=_EXIT_CODES,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        sub.add_argument("--state-dir", required=True, metavar="DIR", help="state directory")
        sub.add_argument("--admin-port", type=_port, default=DEFAULT_ADMIN_PORT,
                         help="the daemon's admin API port")  # fmt: skip
        return sub

    add = borrower_action(
        "add", "make a borrower's license: handoff/NAME.license.json (hand it over, delete it)"
    )
    add.add_argument("name", metavar="NAME", type=_borrower_name, help="the borrower's name")
    add.add_argument("--max-instances", type=_instances, default=1, metavar="N",
                     help=f"enclave instances live at once (1 to {MAX_INSTANCES})")  # fmt: skip
    add.add_argument("--models", type=_models, metavar="A,B",
                     help="the models its enclaves receive (default: all lent)")  # fmt: skip
    set_models = borrower_action(
        "set-models",
        "set the models a borrower's enclaves receive; applies on each enclave's next link",
    )
    set_models.add_argument("name", metavar="NAME", type=_borrower_name,
                            help="the borrower's name")  # fmt: skip
    which = set_models.add_mutually_exclusive_group(required=True)
    which.add_argument("--models", type=_models, metavar="A,B", help="these models only")
    which.add_argument("--all-models", action="store_true", help="every model lent")
    listing = borrower_action("list", "each borrower: supply, served, in doubt, instances")
    listing.add_argument("--json", action="store_true", help="print the JSON document")
    remove = borrower_action(
        "remove",
        "remove a borrower: its license is refused and its enclaves cut at once; its "
        "history stays in the ledger and its name is not reused",
    )
    remove.add_argument("name", metavar="NAME", type=_borrower_name, help="the borrower's name")
    return parser


_instances = bounded_integer(1, MAX_INSTANCES)


def _borrower_name(text: str) -> str:
    try:
        return check_borrower_name(text)
    except BorrowerError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.message}") from None


def _models(text: str) -> tuple[str, ...]:
    try:
        return parse_models(text)
    except BorrowerError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _pccs_url(text: str) -> str:
    if not text.startswith("https://") or len(text) <= len("https://"):
        raise argparse.ArgumentTypeError(f"PCCS URL must be https://host[:port], not {text!r}")
    return text


def serve_options(sub: argparse.ArgumentParser, *, config_required: bool = False) -> ConfigSchema:
    """``serve``'s options, each also a key of its ``--config`` file (flag > file > default)."""
    schema = ConfigSchema(sub, config_required=config_required)
    schema.add("--state-dir", Kind.PATH, required=True, metavar="DIR", help="state directory")
    schema.add("--upload", Kind.PATHS, required=True, metavar="MODEL.onnx",
               help="a model to lend (repeatable; named as the file without .onnx)")  # fmt: skip
    schema.add("--policy", Kind.PATH, required=True, metavar="ENCLAVE_POLICY.toml",
               help="the enclaves accepted")  # fmt: skip
    schema.add("--collateral", Kind.PATHS, default=[], metavar="FILE",
               help="Intel collateral bundle for an enclave platform (from 'python -m "
               "drm_wire.attestation collateral fetch'; repeatable); collateral an enclave "
               "staples is used too")  # fmt: skip
    schema.add("--pccs-url", Kind.STRING, metavar="URL", type=_pccs_url,
               help="https URL of a PCCS (or Intel's PCS) to fetch and refresh enclave "
               "platforms' collateral from")  # fmt: skip
    schema.add("--pccs-ca", Kind.PATH, metavar="CA.pem",
               help="verify the PCCS with this CA instead of the system's")  # fmt: skip
    schema.add("--address", Kind.STRING, default="127.0.0.1", help="enclave link address")
    schema.add("--port", Kind.INTEGER, type=_port, default=DEFAULT_ENCLAVE_PORT,
               help="enclave link port (0: any free port)")  # fmt: skip
    schema.add("--admin-port", Kind.INTEGER, type=_port, default=DEFAULT_ADMIN_PORT,
               help="admin API port on 127.0.0.1 (0: any free port)")  # fmt: skip
    schema.add("--initial-inferences", Kind.INTEGER, type=_count, default=0, metavar="N",
               help="supply N inferences at the first start (never again)")  # fmt: skip
    schema.add("--lease", Kind.INTEGER, type=_lease, default=DEFAULT_LEASE, metavar="N",
               help="most inferences lent to one enclave at a time")  # fmt: skip
    schema.add("--log-level", Kind.STRING, choices=LOG_LEVELS, default="info",
               help="lowest level logged (debug adds per-request events)")  # fmt: skip
    schema.add("--max-links", Kind.INTEGER, type=_cap, default=DEFAULT_MAX_LINKS, metavar="N",
               help="enclave-link connections at once; more are closed")  # fmt: skip
    schema.add("--max-link-handshakes", Kind.INTEGER, type=_cap,
               default=DEFAULT_MAX_LINK_HANDSHAKES, metavar="N",
               help="enclave-link TLS handshakes in progress at once; more wait")  # fmt: skip
    schema.add("--reclaim-margin", Kind.INTEGER, type=_margin, default=int(DEFAULT_RECLAIM_MARGIN),
               metavar="SECONDS",
               help="`reclaim` writes off a lost enclave's units only after the custodian has "
               "sent it nothing for its detection timeout plus this margin")  # fmt: skip
    schema.add("--link-budget", Kind.INTEGER, type=_link_budget,
               default=DEFAULT_LINK_BUDGET // MiB, metavar="MiB",
               help="MiB all enclave links may hold of frames being received")  # fmt: skip
    schema.add("--link-frame-timeout", Kind.INTEGER, type=_frame_timeout,
               default=int(FRAME_TIMEOUT), metavar="SECONDS",
               help="seconds an enclave's frame may take once its first byte came")  # fmt: skip
    # [models.NAME] tables: each model's lending terms (README, "Lending terms").
    schema.add_table("models", parse_models_table)
    return schema


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
            return _serve(args.schema.resolve(args))
        if args.command == "check-config":
            return _check_config(args.schema.resolve(args), out)
        if args.command == "borrower":
            return _borrower(args, out)
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


def _read_models(args: argparse.Namespace) -> list[tuple[ModelFile, Pricing]]:
    """Read the models and their terms, each checked as the enclave will check it
    (:func:`~drm_custodian.models.inspect_model`): a model or terms the enclave would
    refuse, or terms whose largest request exceeds the lease, stop start-up here."""
    terms = dict(args.models or {})
    models = [read_model_file(path, terms.pop(_model_name(path), None)) for path in args.upload]
    if terms:
        names = ", ".join(sorted(terms))
        raise ConfigError(f"[models] names model(s) not uploaded: {names}", key="models")
    return [inspect_model(model, lease=args.lease) for model in models]


def _serve_config(
    args: argparse.Namespace, models: list[tuple[ModelFile, Pricing]] | None = None
) -> ServeConfig:
    """Read every file the options name and check the whole configuration (blocking)."""
    if models is None:
        models = _read_models(args)
    return ServeConfig(
        state=load_state_dir(args.state_dir),
        models=[model for model, _ in models],
        policy=Policy.load(args.policy),
        collateral=CollateralSet.load(args.collateral) if args.collateral else None,
        pccs_url=args.pccs_url,
        pccs_ca=args.pccs_ca,
        address=args.address,
        port=args.port,
        admin_port=args.admin_port,
        initial_inferences=args.initial_inferences,
        session=SessionConfig(lease=args.lease, reclaim_margin=float(args.reclaim_margin)),
        max_links=args.max_links,
        max_link_handshakes=args.max_link_handshakes,
        link_budget=args.link_budget * MiB,
        link_frame_timeout=args.link_frame_timeout,
    )


def _serve(args: argparse.Namespace) -> int:
    set_log_level(args.log_level)  # first: loggers keep the level of their first use
    # Before anything else reads the state: one custodian per state directory (I16). Held
    # until this process ends; a second one is refused here, naming the holder.
    with lock_state_dir(args.state_dir):
        config = _serve_config(args)
        settle_heap()  # start-up is done: see drm_daemon.collector
        status = EXIT_OK
        try:
            trio.run(run_daemon, config)
        except* (OSError, DrmError) as group:
            for exc in _leaves(group):  # not "1 sub-exception": say the port is taken
                log.error("custodian_failed", error=str(exc), kind=type(exc).__name__)
            status = EXIT_FAILED
    return status


def _check_config(args: argparse.Namespace, out: TextIO) -> int:
    models = _read_models(args)
    config = _serve_config(args, models)
    borrower = config.admin_borrower()
    for line in ConfigSchema.summary(args, _show):
        print(line, file=out)
    if borrower is not None:
        print(f"  borrower managed: {borrower}", file=out)
    else:
        print(f"  borrowers: {', '.join(sorted(config.state.borrowers))}", file=out)
    for model, pricing in models:
        print(f"  model {model.name}: {len(model.data)} bytes, sha256 {model.sha256.hex()}",
              file=out)  # fmt: skip
        print(f"    terms: {pricing.as_terms().describe()}; largest request costs "
              f"{pricing.max_cost}", file=out)  # fmt: skip
    return EXIT_OK


def _model_name(path: Path) -> str:
    return path.name.removesuffix(".onnx") or path.name


async def run_daemon(config: ServeConfig, notifier: Notifier | None = None) -> None:
    """:func:`serve` until SIGTERM or SIGINT, with systemd notifications.

    ``READY=1`` follows ``serve``'s ``started``, which comes once both the enclave link and
    the admin API listen.
    """
    notifier = notifier or Notifier.from_environment()
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def watch() -> None:
            async for signum in signals:
                log.info("custodian_signal", signal=signal.Signals(signum).name)
                stop.set()
                return

        async with trio.open_nursery() as nursery:

            async def run(*, task_status: trio.TaskStatus[BoundAddresses]) -> None:
                await serve(config, shutdown_trigger=stop.wait, task_status=task_status)
                nursery.cancel_scope.cancel()  # the watchdog pings end with the daemon

            nursery.start_soon(watch)
            nursery.start_soon(notifier.watchdog)
            notifier.status("starting: opening the ledger")
            bound: BoundAddresses = await nursery.start(run)
            notifier.ready(
                f"serving {len(config.models)} model(s): enclave link on "
                f"{format_address(*bound.enclave)}, admin API on {format_address(*bound.admin)}"
            )
            await stop.wait()
            notifier.stopping("stopping: closing enclave links")
            nursery.cancel_scope.deadline = trio.current_time() + 30.0  # a last resort


def _admin(args: argparse.Namespace, out: TextIO) -> int:
    state = load_state_dir(args.state_dir, warn_handoff=False)  # serve warns; once is enough
    client = AdminClient.from_state(state, port=args.admin_port)
    borrower = args.borrower
    if args.command == "supply":
        doc = client.supply(args.units, borrower=borrower)
    elif args.command == "block":
        doc = client.block(args.reason, borrower=borrower, wait=args.wait)
    elif args.command == "unblock":
        doc = client.unblock(borrower=borrower)
    elif args.command == "reclaim":
        doc = client.reclaim(args.instance, borrower=borrower)
    else:
        doc = client.usage(borrower=borrower)
    if getattr(args, "json", False):
        print(json.dumps(doc, sort_keys=True), file=out)
    else:
        print(format_usage(doc), file=out)
    return EXIT_OK


def _borrower(args: argparse.Namespace, out: TextIO) -> int:
    """``borrower add|list|remove``: through the daemon when it runs, else directly."""
    state = load_state_dir(args.state_dir, warn_handoff=False)
    try:
        lock = lock_state_dir(args.state_dir)
    except StateLockedError:  # the daemon runs: it alone writes the state
        doc = _borrower_through_daemon(args, AdminClient.from_state(state, port=args.admin_port))
    else:
        with lock:
            doc = trio.run(_borrower_offline, args, state)
    if args.action == "list":
        print(json.dumps(doc, sort_keys=True) if args.json else format_borrowers(doc), file=out)
    elif args.action == "add":
        print(f"borrower:          {doc['borrower']}", file=out)
        print(f"license file:      {doc['license_file']}", file=out)
        print("                   (hand it to the borrower, then delete it: it holds the secret)",
              file=out)  # fmt: skip
    elif args.action == "set-models":
        models = doc.get("models")
        shown = ",".join(map(str, models)) if isinstance(models, list | tuple) else "all"
        print(f"borrower {args.name} models: {shown} (from each enclave's next link)", file=out)
    else:
        print(f"borrower {args.name} removed: its license is refused from now on", file=out)
    return EXIT_OK


def _borrower_through_daemon(args: argparse.Namespace, client: AdminClient) -> dict[str, object]:
    if args.action == "add":
        return client.add_borrower(args.name, max_instances=args.max_instances, models=args.models)
    if args.action == "remove":
        return client.remove_borrower(args.name)
    if args.action == "set-models":
        return client.set_models(args.name, None if args.all_models else args.models)
    return client.borrowers()


async def _borrower_offline(args: argparse.Namespace, state: CustodianState) -> dict[str, object]:
    book = BorrowerBook(state)
    if args.action == "add":
        added = await book.add(args.name, max_instances=args.max_instances, models=args.models)
        return {"borrower": args.name, "license_file": str(added.license_path)}
    if args.action == "remove":
        await book.remove(args.name)
        return {"borrower": args.name, "removed": True}
    if args.action == "set-models":
        record = await book.set_models(args.name, None if args.all_models else args.models)
        return {"borrower": args.name, "models": record.models}
    ledger = await Ledger.open(state.ledger_path)
    try:
        rows = []
        for record in book.records():
            balance = await ledger.balance(record.borrower)
            rows.append({
                "borrower": record.borrower, "supplied": balance.supplied,
                "served": balance.served, "in_doubt": balance.in_doubt,
                "remaining": balance.remaining, "instances": 0,
                "max_instances": record.max_instances, "blocked": balance.blocked,
                "removed": record.removed,
                "models": list(record.models) if record.models is not None else None,
            })  # fmt: skip
    finally:
        await ledger.aclose()
    return {"borrowers": rows}


def _show(value: object) -> object:
    if value is None:  # no [models] table
        return "(none)"
    if isinstance(value, dict):  # [models]: name -> terms
        return ", ".join(f"{name} ({terms.describe()})" for name, terms in value.items())
    return ", ".join(map(str, value)) if isinstance(value, list) else value


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    """The exceptions inside ``group`` and its nested groups (nurseries nest them)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
