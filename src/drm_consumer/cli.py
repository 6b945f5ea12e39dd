"""``python -m drm_consumer``: ask an attested enclave for a prediction (``query``) or its
state (``info``).

Both commands verify the enclave's RA-TLS attestation against the policy file during the
TLS handshake, before anything is sent. ``query`` reads and checks its input file before
it connects, asks the enclave which models it serves, preprocesses the input for the
chosen model and checks that the tensors fit it (dtype, rank, fixed dimensions) before
the inference request is sent, and waits (with a live status line on standard error)
when the borrower has no inferences left. Results go to standard output, as text or, with
``--json``, as one JSON object; diagnostics and the status line go to standard error.

The exit status is one of the ``EXIT_*`` constants (see :data:`EPILOG`).
"""

from __future__ import annotations

import argparse
import json
import math
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np
import trio

from drm_consumer._status import WaitStatus
from drm_consumer.client import DEFAULT_PORT, Client, EnclaveInfo, InferenceOutcome
from drm_consumer.errors import (
    AttestationRefused,
    BadRequest,
    Blocked,
    ConsumerError,
    CustodianUnreachable,
    ModelNotFound,
    NoInferencesLeft,
    RequestFailed,
)
from drm_consumer.gateway import command as gateway_command
from drm_consumer.preprocess import (
    ImageInput,
    InputError,
    Preset,
    TensorInput,
    choose_preset,
    covidnet,
    describe_shape,
    fit_inputs,
    imagenet,
    load_input,
)
from drm_daemon.listen import ListenError
from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.collateral_source import CollateralSet, chain_sources
from drm_wire.attestation.pccs import PccsClient, PccsError
from drm_wire.attestation.policy import Policy, TcbStatusError
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.errors import ConfigError
from drm_wire.limits import MAX_WAIT_SECONDS
from drm_wire.messages import EnclaveState, ModelDescription
from drm_wire.model.terms import Terms, Unit
from drm_wire.net.address import port_argument

__all__ = [
    "DEFAULT_POLICY",
    "EPILOG",
    "EXIT_ATTESTATION",
    "EXIT_CONNECTION",
    "EXIT_CUSTODIAN",
    "EXIT_INTERRUPTED",
    "EXIT_NO_INFERENCES",
    "EXIT_OK",
    "EXIT_USAGE",
    "main",
]

#: Success.
EXIT_OK: Final = 0
#: Bad usage or input: arguments, policy or labels file, an input that cannot be read or
#: does not fit the model, an unknown model. Nothing was sent for inference.
EXIT_USAGE: Final = 2
#: The enclave's attestation did not satisfy the policy; nothing was sent.
EXIT_ATTESTATION: Final = 3
#: No inferences left (with ``--no-wait``, or after ``--wait`` seconds).
EXIT_NO_INFERENCES: Final = 4
#: The enclave cannot reach its custodian, or the custodian blocked the borrower.
EXIT_CUSTODIAN: Final = 5
#: The connection failed or was lost, or the enclave could not serve for another reason:
#: busy, still loading the model, the inference failed, or an error code we do not know.
EXIT_CONNECTION: Final = 6
#: Interrupted (Ctrl-C), as shells report SIGINT.
EXIT_INTERRUPTED: Final = 130

#: Read when ``--policy`` is not given (in the current directory).
DEFAULT_POLICY: Final = Path("policy.toml")
#: How many classes a classification prints.
TOP_CLASSES: Final = 5
#: Platforms one command fetches collateral for (an enclave's quote names one).
MAX_NOTED_PLATFORMS: Final = 4
#: A labels file is one name per line; refuse anything much larger than any real one.
MAX_LABELS_BYTES: Final = 4 * 1024 * 1024

EPILOG: Final = f"""\
exit status:
  {EXIT_OK}  success
  {EXIT_USAGE}  bad usage or input (arguments, policy, labels or input file; an input that
     does not fit the model; an unknown model): nothing was sent for inference
  {EXIT_ATTESTATION}  the enclave's attestation was refused by the policy: nothing was sent
  {EXIT_NO_INFERENCES}  no inferences left (with --no-wait, or after --wait SECONDS)
  {EXIT_CUSTODIAN}  the enclave cannot reach its custodian, or the borrower is blocked
  {EXIT_CONNECTION}  connection failed or lost, or the enclave could not serve for another
     reason (busy, still loading its model, inference failed, unknown error)
  {EXIT_INTERRUPTED}  interrupted

The policy file defaults to ./{DEFAULT_POLICY} (written beside the signed enclave).
"""

_PROG: Final = "python -m drm_consumer"


class _Failure(Exception):
    """Ends the command with ``exit_code`` after printing ``message``."""

    def __init__(self, exit_code: int, message: str, kind: str = "usage") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.kind = kind


# --- arguments -------------------------------------------------------------------------


_port = port_argument(zero=False)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= MAX_WAIT_SECONDS:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_WAIT_SECONDS:g} seconds")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", required=True, metavar="HOST", help="the enclave's host")
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT,
                        help=f"its consumer port (default {DEFAULT_PORT})")  # fmt: skip
    parser.add_argument("--policy", type=Path, metavar="POLICY.toml",
                        help=f"the enclaves to accept (default ./{DEFAULT_POLICY})")  # fmt: skip
    parser.add_argument("--collateral", type=Path, action="append", default=[], metavar="FILE",
                        help="Intel collateral bundle for the enclave's platform (from "
                        "'python -m drm_wire.attestation collateral fetch'; repeatable); "
                        "collateral the enclave staples is used too")  # fmt: skip
    parser.add_argument("--pccs-url", metavar="URL",
                        help="a PCS/PCCS (https://host[:port]) to fetch the enclave's "
                        "platform collateral from when it staples none the policy accepts: "
                        "fetched after the first handshake names the platform, then the "
                        "handshake is made once more")  # fmt: skip
    parser.add_argument("--pccs-ca", type=Path, metavar="CA.pem",
                        help="the CA to verify the PCCS with (default: the system's)")  # fmt: skip
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object on standard output, not text")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Query a model lent to an attested SGX enclave.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    query = commands.add_parser(
        "query",
        help="run one inference",
        description="Verify the enclave, send one input, print the prediction.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(query)
    query.add_argument("--input", type=Path, required=True, metavar="FILE",
                       help="a JPEG or PNG image, or a .npy or .npz tensor file")  # fmt: skip
    query.add_argument("--model", metavar="NAME",
                       help="the model to run (default: the only one served)")  # fmt: skip
    query.add_argument("--preprocess", choices=[p.value for p in Preset], default="auto",
                       help="image preprocessing; auto picks it from the model's input "
                       "shape (default auto)")  # fmt: skip
    waiting = query.add_mutually_exclusive_group()
    waiting.add_argument("--wait", type=_seconds, metavar="SECONDS",
                         help="when no inferences are left, wait at most this long "
                         "(default: until the custodian supplies more)")  # fmt: skip
    waiting.add_argument("--no-wait", action="store_true",
                         help="when no inferences are left, fail at once")  # fmt: skip
    query.add_argument("--labels", type=Path, metavar="FILE",
                       help="class names, one per line, for the top classes")  # fmt: skip
    info = commands.add_parser(
        "info",
        help="show the enclave's models, state and attestation",
        description="Verify the enclave and show what it serves.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(info)
    gateway = commands.add_parser(
        "gateway",
        help="serve the Open Inference Protocol (KServe v2, Triton) over HTTP",
        description="Keep attested connections to the enclave and serve its models to "
        "standard clients (tritonclient, KServe, curl): see drm_consumer.gateway.",
    )
    _common(gateway)
    gateway_command.add_arguments(gateway)
    return parser


# --- files -----------------------------------------------------------------------------


def _load_collateral(paths: list[Path]) -> CollateralSet | None:
    try:
        return CollateralSet.load(paths) if paths else None
    except ConfigError as exc:
        raise _Failure(EXIT_USAGE, f"bad collateral: {exc}") from exc


def _load_policy(path: Path | None) -> Policy:
    if path is None:
        if not DEFAULT_POLICY.is_file():
            raise _Failure(EXIT_USAGE, f"no --policy given and no ./{DEFAULT_POLICY} here")
        path = DEFAULT_POLICY
    try:
        return Policy.load(path)
    except ConfigError as exc:
        raise _Failure(EXIT_USAGE, f"bad policy {path}: {exc}") from exc


def _load_labels(path: Path | None) -> list[str] | None:
    if path is None:
        return None
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_LABELS_BYTES + 1)
    except OSError as exc:
        raise _Failure(EXIT_USAGE, f"cannot read labels {path}: {exc.strerror}") from exc
    if len(raw) > MAX_LABELS_BYTES:
        raise _Failure(EXIT_USAGE, f"labels file {path} is larger than {MAX_LABELS_BYTES} bytes")
    try:
        lines = [line.strip() for line in raw.decode("utf-8-sig").splitlines()]
    except UnicodeDecodeError as exc:
        raise _Failure(EXIT_USAGE, f"labels file {path} is not UTF-8") from exc
    while lines and not lines[-1]:
        lines.pop()
    return lines


# --- preprocessing ---------------------------------------------------------------------


def _pick_model(info: EnclaveInfo, wanted: str | None) -> ModelDescription:
    if not info.models:
        if info.state in (EnclaveState.CUSTODIAN_UNREACHABLE, EnclaveState.BLOCKED):
            raise _Failure(EXIT_CUSTODIAN, f"the enclave serves no model: {info.state}", "state")
        raise _Failure(EXIT_CONNECTION, f"the enclave serves no model yet ({info.state})", "state")
    names = ", ".join(sorted(info.models))
    if wanted is None:
        if len(info.models) > 1:
            raise _Failure(EXIT_USAGE, f"the enclave serves several models; pick one of {names}")
        return next(iter(info.models.values()))
    if wanted not in info.models:
        raise _Failure(EXIT_USAGE, f"the enclave serves no model {wanted!r}; it serves {names}")
    return info.models[wanted]


def _prepare(
    loaded: ImageInput | TensorInput, preset: Preset, model: ModelDescription, log: TextIO
) -> tuple[dict[str, np.ndarray[Any, Any]], Preset]:
    """Preprocess ``loaded`` for ``model`` and check the result fits it."""
    if isinstance(loaded, TensorInput):
        if preset is Preset.AUTO:
            preset = Preset.NONE
            print("preprocess: auto: a tensor file is sent as it is", file=log)
        arrays = loaded.arrays
    else:
        if preset is Preset.AUTO:
            spec = model.inputs[0] if len(model.inputs) == 1 else None
            chosen = None if spec is None else choose_preset(spec)
            if spec is None or chosen is None:
                shapes = ", ".join(
                    f"{s.name} {s.dtype} {describe_shape(s.shape)}" for s in model.inputs
                )
                raise InputError(
                    f"auto cannot pick an image preprocessing for model {model.name!r} "
                    f"(inputs: {shapes}); give --preprocess, or a .npy/.npz tensor"
                )
            preset = chosen
            print(
                f"preprocess: auto picked {preset} for input {spec.name!r} "
                f"({spec.dtype} {describe_shape(spec.shape)})",
                file=log,
            )
        transform = {Preset.COVIDNET: covidnet, Preset.IMAGENET: imagenet}[preset]
        arrays = {None: transform(loaded.pixels)}
    return fit_inputs(model, arrays), preset


def _check_preset(loaded: ImageInput | TensorInput, preset: Preset) -> None:
    if isinstance(loaded, TensorInput) and preset in (Preset.COVIDNET, Preset.IMAGENET):
        raise InputError(f"--preprocess {preset} needs an image; the input is a tensor file")
    if isinstance(loaded, ImageInput) and preset is Preset.NONE:
        raise InputError("--preprocess none needs a .npy or .npz tensor; the input is an image")


# --- output ----------------------------------------------------------------------------


def _attestation(enclave: VerifiedEnclave) -> dict[str, Any]:
    return {
        "mr_enclave": enclave.mr_enclave.hex(),
        "mr_signer": enclave.mr_signer.hex(),
        "isv_prod_id": enclave.isv_prod_id,
        "isv_svn": enclave.isv_svn,
        "debug": enclave.debug,
        "simulated": enclave.simulated,
        "tcb_status": None if enclave.tcb_status is None else str(enclave.tcb_status),
        "advisory_ids": list(enclave.advisory_ids),
    }


def _attestation_line(enclave: VerifiedEnclave) -> str:
    kind = ("SIMULATED (no hardware protection)" if enclave.simulated else "SGX hardware") + (
        ", DEBUG enclave" if enclave.debug else ""
    )
    tcb = "not checked (no collateral)" if enclave.tcb_status is None else str(enclave.tcb_status)
    advisories = ", ".join(enclave.advisory_ids) or "none"
    return (
        f"Attested: MRENCLAVE {enclave.mr_enclave.hex()}, {kind}, TCB status {tcb}, "
        f"advisories {advisories}"
    )


def _rows(array: np.ndarray[Any, Any]) -> list[np.ndarray[Any, Any]] | None:
    """The score vectors of a classification output, or ``None`` if it is not one."""
    if array.dtype.kind not in "fiu" or array.size == 0 or array.ndim not in (1, 2):
        return None
    return [array] if array.ndim == 1 else list(array)


def _is_two_class_softmax(rows: list[np.ndarray[Any, Any]]) -> bool:
    if len(rows) != 1 or rows[0].shape != (2,) or rows[0].dtype.kind != "f":
        return False
    scores = rows[0].astype(np.float64)
    return bool(np.all((scores >= 0) & (scores <= 1)) and abs(scores.sum() - 1.0) < 1e-3)


def _prediction(
    outputs: dict[str, np.ndarray[Any, Any]], labels: list[str] | None
) -> dict[str, Any]:
    """Interpret the first output: COVID-Net's two-class softmax, top classes, or raw."""
    name, array = next(iter(outputs.items()))
    rows = _rows(array)
    if rows is not None and labels is None and _is_two_class_softmax(rows):
        return {"kind": "covid", "output": name, "covid_positive_probability": float(rows[0][1])}
    if rows is None:
        return {"kind": "raw", "output": name}
    top = []
    for row in rows:
        order = np.argsort(-row.astype(np.float64), kind="stable")[:TOP_CLASSES]
        top.append([
            {
                "class": int(i),
                "label": labels[i] if labels is not None and i < len(labels) else None,
                "score": float(row[i]),
            }
            for i in order
        ])  # fmt: skip
    return {"kind": "top_classes", "output": name, "rows": top}


def _prediction_lines(
    prediction: dict[str, Any], outputs: dict[str, np.ndarray[Any, Any]]
) -> list[str]:
    if prediction["kind"] == "covid":
        return [f"Probability of COVID positivity: {prediction['covid_positive_probability']:.2f}"]
    if prediction["kind"] == "raw":
        lines = []
        for name, array in outputs.items():
            values = np.array2string(array, threshold=20, precision=4)
            lines.append(f"Output {name}: {array.dtype} {describe_shape(array.shape)} {values}")
        return lines
    rows = prediction["rows"]
    lines = [f"Top {len(rows[0])} classes (output {prediction['output']}):"]
    for number, top in enumerate(rows):
        if len(rows) > 1:
            lines.append(f"  row {number}:")
        for rank, entry in enumerate(top, 1):
            name = entry["label"] or f"class {entry['class']}"
            suffix = f" (class {entry['class']})" if entry["label"] else ""
            lines.append(f"  {rank}. {name}{suffix}: {entry['score']:.4f}")
    return lines


def _json_outputs(outputs: dict[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
    return {
        name: {"dtype": str(a.dtype), "shape": list(a.shape), "values": a.tolist()}
        for name, a in outputs.items()
    }


def _emit_json(document: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(document) + "\n")


# --- commands --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Connection:
    host: str
    port: int
    policy: Policy
    collateral: CollateralSet | None = None
    pccs_url: str | None = None
    pccs_ca: Path | None = None


class _FetchedCollateral:
    """Collateral fetched from a PCCS between two handshakes, and the platforms to fetch.

    The FMSPC is known only inside the handshake's verify callback, which does no I/O; so
    :meth:`candidates` notes a platform it holds nothing for (at most
    :data:`MAX_NOTED_PLATFORMS`: a quote names one), and :meth:`fetch_noted` fetches them
    after the handshake was refused. Nothing fetched is trusted: it is verified to the
    pinned root at the next handshake like any collateral.
    """

    def __init__(self) -> None:
        self._held: dict[bytes, tuple[Collateral, ...]] = {}
        self.noted: set[bytes] = set()
        #: Counts the fetches: the verifier's result cache keys on it.
        self.generation = 0

    def candidates(self, fmspc: bytes) -> Sequence[Collateral]:
        held = self._held.get(fmspc)
        if held is None and len(self.noted) < MAX_NOTED_PLATFORMS:
            self.noted.add(fmspc)
        return held or ()

    async def fetch_noted(self, pccs: PccsClient) -> bool:
        """Fetch every noted platform's collateral, for both PCK CA types (the PCK leaf
        names one; which one is not known outside the callback). False: nothing noted.

        Raises:
            PccsError: the service failed or answered something that is not collateral.
            ValueError: a noted FMSPC is not 6 bytes.
        """
        wanted = sorted(self.noted - self._held.keys())
        for fmspc in wanted:
            self._held[fmspc] = tuple(
                [await pccs.fetch(fmspc, ca=ca) for ca in ("processor", "platform")]
            )
            self.generation += 1
        return bool(wanted)


def _refused_for_tcb_status(exc: AttestationRefused) -> bool:
    """Whether the policy refused the TCB status (unknown for want of collateral, or a
    verdict from a staple or bundle that the PCCS's newer collateral may change)."""
    cause = exc.__cause__
    return cause is not None and isinstance(cause.__cause__, TcbStatusError)


@asynccontextmanager
async def _connect(connection: _Connection) -> AsyncIterator[Client]:
    """``Client.connect``; with a PCCS, once more after fetching the platform's collateral
    when the first handshake was refused for want of it (docs/production.md)."""
    if connection.pccs_url is None:
        async with Client.connect(
            connection.host, connection.port, policy=connection.policy,
            collateral=connection.collateral,
        ) as client:  # fmt: skip
            yield client
        return
    try:
        pccs = PccsClient(connection.pccs_url, ca=connection.pccs_ca)
    except (ValueError, OSError, ssl.SSLError) as exc:
        raise _Failure(EXIT_USAGE, f"bad --pccs-url or --pccs-ca: {exc}") from exc
    fetched = _FetchedCollateral()
    collateral = chain_sources(connection.collateral, fetched)
    async with pccs, AsyncExitStack() as stack:
        connect = partial(
            Client.connect, connection.host, connection.port, policy=connection.policy,
            collateral=collateral,
        )  # fmt: skip
        try:
            client = await stack.enter_async_context(connect())
        except AttestationRefused as exc:
            if not _refused_for_tcb_status(exc) or not fetched.noted:
                raise
            try:
                await fetched.fetch_noted(pccs)
            except (PccsError, ValueError) as pccs_exc:  # ValueError: not a 6-byte FMSPC
                platforms = ", ".join(f.hex().upper() for f in sorted(fetched.noted))
                raise _Failure(
                    EXIT_ATTESTATION,
                    f"{exc}; the collateral of its platform (FMSPC {platforms}) could not be "
                    f"fetched from {pccs.base_url}: {pccs_exc}",
                    "AttestationRefused",
                ) from pccs_exc
            client = await stack.enter_async_context(connect())
        yield client


async def _infer(
    client: Client,
    model: str,
    inputs: dict[str, np.ndarray[Any, Any]],
    wait: float | None,
    log: TextIO,
) -> InferenceOutcome:
    """Run the inference with the waiting status line ticking beside it."""
    status = WaitStatus(log, limit=wait)
    outcome: InferenceOutcome | None = None
    error: ConsumerError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(status.run)
        try:
            outcome = await client.infer(model, inputs, wait=wait, on_waiting=status.waiting)
        except ConsumerError as exc:  # raised below, not wrapped in the nursery's group
            error = exc
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        gave_up = isinstance(error, NoInferencesLeft)
        status.finish("Gave up waiting for inferences" if gave_up else "Stopped waiting")
        raise error
    assert outcome is not None
    status.finish("Inferences supplied")
    return outcome


async def _run_query(
    connection: _Connection,
    loaded: ImageInput | TensorInput,
    args: argparse.Namespace,
    log: TextIO,
) -> dict[str, Any]:
    preset = Preset(args.preprocess)
    wait = 0.0 if args.no_wait else args.wait
    failure: Exception | None = None
    async with _connect(connection) as client:
        # An answer we refuse or an error the enclave sent leaves the connection sound:
        # leave the block normally so that it is closed gracefully, then fail.
        try:
            info = await client.info()
            model = _pick_model(info, args.model)
            try:
                inputs, preset = _prepare(loaded, preset, model, log)
            except InputError as exc:
                raise _Failure(EXIT_USAGE, str(exc), "input") from exc
            outcome = await _infer(client, model.name, inputs, wait, log)
            return {
                "model": model.name,
                "preprocess": str(preset),
                "outputs": outcome.outputs,
                "inferences_left": outcome.inferences_left,
                "cost": outcome.cost,
                "attestation": client.attestation,
            }
        except (RequestFailed, _Failure) as exc:
            failure = exc
    assert failure is not None
    raise failure


async def _run_info(connection: _Connection) -> tuple[EnclaveInfo, VerifiedEnclave]:
    failure: RequestFailed | None = None
    async with _connect(connection) as client:
        try:
            return await client.info(), client.attestation
        except RequestFailed as exc:
            failure = exc
    assert failure is not None
    raise failure


def _connection(args: argparse.Namespace) -> _Connection:
    """Where ``query`` and ``info`` connect, and what they verify the enclave with."""
    return _Connection(
        args.address,
        args.port,
        _load_policy(args.policy),
        _load_collateral(args.collateral),
        args.pccs_url,
        args.pccs_ca,
    )


def _query(args: argparse.Namespace, out: TextIO, log: TextIO) -> None:
    connection = _connection(args)
    labels = _load_labels(args.labels)
    try:
        loaded = load_input(args.input)
        _check_preset(loaded, Preset(args.preprocess))
    except InputError as exc:
        raise _Failure(EXIT_USAGE, str(exc), "input") from exc
    result = trio.run(_run_query, connection, loaded, args, log)
    outputs: dict[str, np.ndarray[Any, Any]] = result["outputs"]
    prediction = _prediction(outputs, labels)
    enclave: VerifiedEnclave = result["attestation"]
    if args.json:
        _emit_json(
            {
                "model": result["model"],
                "preprocess": result["preprocess"],
                "prediction": prediction,
                "outputs": _json_outputs(outputs),
                "cost": result["cost"],
                "inferences_left": result["inferences_left"],
                "attestation": _attestation(enclave),
            },
            out,
        )
        return
    for line in _prediction_lines(prediction, outputs):
        print(line, file=out)
    cost = result["cost"]
    print(f"Cost: {cost} inference{'' if cost == 1 else 's'}", file=out)
    print(f"Inferences left: {result['inferences_left']}", file=out)
    print(_attestation_line(enclave), file=out)


def _info(args: argparse.Namespace, out: TextIO) -> None:
    connection = _connection(args)
    info, enclave = trio.run(_run_info, connection)
    if args.json:
        models = [
            {
                "name": m.name,
                "sha256": m.sha256.hex(),
                "inputs": [
                    {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in m.inputs
                ],
                "outputs": [
                    {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in m.outputs
                ],
                "terms": m.terms.to_mapping(),
            }
            for m in info.models.values()
        ]
        _emit_json(
            {
                "state": str(info.state),
                "inferences_left": info.inferences_left,
                "models": models,
                "attestation": _attestation(enclave),
            },
            out,
        )
        return
    print(f"State: {info.state}", file=out)
    print(f"Inferences left: {info.inferences_left}", file=out)
    if not info.models:
        print("Models: none yet", file=out)
    for model in info.models.values():
        print(f"Model {model.name} (sha256 {model.sha256.hex()})", file=out)
        for kind, specs in (("input ", model.inputs), ("output", model.outputs)):
            for spec in specs:
                print(f"  {kind} {spec.name}: {spec.dtype} {describe_shape(spec.shape)}", file=out)
        print(f"  terms: {_describe_terms(model.terms)}", file=out)
    print(_attestation_line(enclave), file=out)


def _gateway(args: argparse.Namespace, log: TextIO) -> None:
    try:
        gateway_command.run(args, partial(_connect, _connection(args)), log)
    except (gateway_command.GatewayUsageError, ListenError) as exc:
        raise _Failure(EXIT_USAGE, str(exc)) from exc


def _describe_terms(terms: Terms) -> str:
    """One line: the unit, then each input's sizes (``1..16 x 3``) and batch axis."""
    per = "item along the batch axis" if terms.unit is Unit.ITEM else "request"
    parts = [f"1 inference per {per}, batch at most {terms.max_batch}"]
    axes = dict(terms.batch_axis)
    for name, dims in terms.inputs:
        sizes = " x ".join(str(d) if isinstance(d, int) else f"{d[0]}..{d[1]}" for d in dims)
        axis = axes.get(name)
        parts.append(f"{name} {sizes}" + ("" if axis is None else f" (batch axis {axis})"))
    return "; ".join(parts)


def _exit_code(exc: ConsumerError) -> int:
    if isinstance(exc, AttestationRefused):
        return EXIT_ATTESTATION
    if isinstance(exc, NoInferencesLeft):
        return EXIT_NO_INFERENCES
    if isinstance(exc, CustodianUnreachable | Blocked):
        return EXIT_CUSTODIAN
    if isinstance(exc, BadRequest | ModelNotFound):
        return EXIT_USAGE
    return EXIT_CONNECTION


def _describe(exc: BaseException) -> str:
    """The error's message, and the root cause's when it adds something."""
    message = str(exc)
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if (
        root is not exc
        and str(root)
        and str(root) not in message
        and not isinstance(root, BaseExceptionGroup | OSError)  # said in other words
        and "ragged EOF" not in str(root)
    ):
        message += f" ({type(root).__name__}: {root})"
    return message


def _fail(failure: _Failure, *, as_json: bool, out: TextIO, log: TextIO) -> int:
    print(f"{_PROG}: error: {failure}", file=log)
    if as_json:
        _emit_json(
            {
                "error": {
                    "exit_code": failure.exit_code,
                    "kind": failure.kind,
                    "message": str(failure),
                }
            },
            out,
        )
    return failure.exit_code


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, log: TextIO | None = None
) -> int:
    """Run the command line; return the exit status (see :data:`EPILOG`)."""
    out = sys.stdout if out is None else out
    log = sys.stderr if log is None else log
    args = _parser().parse_args(argv)
    try:
        if args.command == "query":
            _query(args, out, log)
        elif args.command == "gateway":
            _gateway(args, log)
        else:
            _info(args, out)
    except _Failure as failure:
        return _fail(failure, as_json=args.json, out=out, log=log)
    except ConsumerError as exc:
        mapped = _Failure(_exit_code(exc), _describe(exc), type(exc).__name__)
        return _fail(mapped, as_json=args.json, out=out, log=log)
    except KeyboardInterrupt:
        print(f"\n{_PROG}: interrupted", file=log)
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:  # Ctrl-C may arrive through a nursery
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        print(f"\n{_PROG}: interrupted", file=log)
        return EXIT_INTERRUPTED
    return EXIT_OK
