"""``python -m drm_consumer``: ask an attested enclave for predictions (``query``) or its
state (``info``).

Both commands verify the enclave's RA-TLS attestation against the policy file during the
TLS handshake, before anything is sent. ``query`` asks the enclave which models it
serves, then serves its inputs one after another over that one connection: each is read,
preprocessed for the chosen model and checked against it (dtype, rank, fixed dimensions)
before its inference request is sent, and a request waits (with a live status line on
standard error) when the borrower has no inferences left. One input that cannot be read,
does not fit or is refused is reported, and the next is still served; a failure of the
connection, the attestation or the custodian ends the run. ``--preprocess auto`` guesses
nothing: it preprocesses an image only for a model it recognises exactly (COVID-Net's
shape), and otherwise asks for ``--preprocess``.

Results go to standard output, as text (every output of the model) or, with ``--json``,
as one JSON object per input (and a summary line after several); diagnostics, the
status line and, on a terminal, the progress bar over several inputs go to standard
error.

The exit status is one of the ``EXIT_*`` constants (see :data:`EPILOG`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import ssl
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, TextIO, cast

import numpy as np
import trio
from tqdm import tqdm

from drm_consumer._status import WaitStatus
from drm_consumer.client import DEFAULT_PORT, Client, EnclaveInfo, InferenceOutcome
from drm_consumer.errors import (
    AttestationRefused,
    BadRequest,
    Blocked,
    Busy,
    ConsumerError,
    CustodianUnreachable,
    InferenceFailed,
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
from drm_wire.attestation.pccs import CaType, PccsClient, PccsError
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
#: Most input files one query takes (those given, and those in the directories given).
MAX_INPUTS: Final = 100_000
#: The shared metadata key ``--labels-from metadata`` reads when none is given.
LABELS_KEY: Final = "labels"
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
     reason (busy, still loading its model, a model that did not load there, inference
     failed, unknown error)
  {EXIT_INTERRUPTED}  interrupted

With several inputs (or a directory), every input is tried: the status is that of the
first input that failed (0 if every one was served). A failure that ends the run is its
own status: a refused attestation, a lost connection, an unreachable custodian or a
blocked borrower, or an image whose preprocessing --preprocess auto does not know.

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
        help="run inferences",
        description="Verify the enclave, send each input, print the predictions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(query)
    query.add_argument("--input", type=Path, required=True, action="extend", nargs="+",
                       metavar="FILE",
                       help="JPEG or PNG images, .npy or .npz tensor files, or directories "
                       "of them (their files, in name order); several are served one after "
                       "another over one connection")  # fmt: skip
    query.add_argument("--model", metavar="NAME",
                       help="the model to run (default: the only one served)")  # fmt: skip
    query.add_argument("--preprocess", choices=[p.value for p in Preset], default="auto",
                       help="image preprocessing; auto knows only a model it recognises "
                       "exactly (COVID-Net's shape) and otherwise asks for this option "
                       "(default auto)")  # fmt: skip
    waiting = query.add_mutually_exclusive_group()
    waiting.add_argument("--wait", type=_seconds, metavar="SECONDS",
                         help="when no inferences are left, wait at most this long "
                         "(default: until the custodian supplies more)")  # fmt: skip
    waiting.add_argument("--no-wait", action="store_true",
                         help="when no inferences are left, fail at once")  # fmt: skip
    labels = query.add_mutually_exclusive_group()
    labels.add_argument("--labels", type=Path, metavar="FILE",
                        help="class names, one per line, for the top classes")  # fmt: skip
    labels.add_argument("--labels-from", metavar="metadata[:KEY]",
                        help="class names from the model's metadata its owner shares (key "
                        f"{LABELS_KEY!r} unless given): a JSON list of strings, or one "
                        "name per line")  # fmt: skip
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


def _labels_text(text: str) -> list[str]:
    """Class names from a text: a JSON list of strings, or one name per line."""
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, list) and all(isinstance(item, str) for item in document):
        return document
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _metadata_labels(spec: str, model: ModelDescription) -> list[str]:
    """``--labels-from metadata[:KEY]``: the class names the model's owner shares."""
    source, _, key = spec.partition(":")
    if source != "metadata":
        raise _Failure(EXIT_USAGE, f"--labels-from {spec!r}: the only source is metadata[:KEY]")
    key = key or LABELS_KEY
    shared = dict(model.metadata)
    if key not in shared:
        have = ", ".join(sorted(shared)) or "none"
        raise _Failure(
            EXIT_USAGE,
            f"model {model.name!r} shares no metadata {key!r} (it shares: {have})",
            "input",
        )
    return _labels_text(shared[key])


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
    loaded: ImageInput | TensorInput,
    preset: Preset,
    model: ModelDescription,
    note: Callable[[str], None],
) -> tuple[dict[str, np.ndarray[Any, Any]], Preset]:
    """Preprocess ``loaded`` for ``model`` and check the result fits it."""
    if isinstance(loaded, TensorInput):
        if preset is Preset.AUTO:
            preset = Preset.NONE
            note("preprocess: auto: a tensor file is sent as it is")
        arrays = loaded.arrays
    else:
        named = model.terms.preprocess
        if preset is Preset.AUTO and named is not None:
            if named not in (Preset.COVIDNET, Preset.IMAGENET):
                raise _Failure(
                    EXIT_USAGE,
                    f"the terms of model {model.name!r} name its preprocessing {named!r}, "
                    f"which this client does not have: give --preprocess, or send "
                    f".npy/.npz tensors",
                    "input",
                )
            preset = Preset(named)
            note(f"preprocess: auto picked {preset}: the terms of model {model.name!r} name it")
        if preset is Preset.AUTO:
            chosen = choose_preset(model)
            if chosen is None:
                shapes = ", ".join(
                    f"{s.name} {s.dtype} {describe_shape(s.shape)}" for s in model.inputs
                )
                raise _Failure(
                    EXIT_USAGE,
                    f"--preprocess auto does not know which preprocessing model "
                    f"{model.name!r} (inputs: {shapes}) was trained with: give --preprocess "
                    f"covidnet or imagenet if one is right for it, or send .npy/.npz tensors",
                    "input",
                )
            preset = chosen
            note(f"preprocess: auto picked {preset} for model {model.name!r} (COVID-Net's shape)")
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
    outputs: dict[str, np.ndarray[Any, Any]], labels: list[str] | None, preset: Preset
) -> dict[str, Any]:
    """Interpret the first output: COVID-Net's two-class softmax (only under the
    ``covidnet`` preset, without labels), top classes, or raw."""
    name, array = next(iter(outputs.items()))
    rows = _rows(array)
    if (
        rows is not None
        and labels is None
        and preset is Preset.COVIDNET
        and _is_two_class_softmax(rows)
    ):
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


def _raw_line(name: str, array: np.ndarray[Any, Any]) -> str:
    values = np.array2string(array, threshold=20, precision=4)
    return f"Output {name}: {array.dtype} {describe_shape(array.shape)} {values}"


def _prediction_lines(
    prediction: dict[str, Any], outputs: dict[str, np.ndarray[Any, Any]]
) -> list[str]:
    """The interpreted first output, then every other output as it is."""
    if prediction["kind"] == "covid":
        lines = [f"Probability of COVID positivity: {prediction['covid_positive_probability']:.2f}"]
    elif prediction["kind"] == "raw":
        lines = [_raw_line(prediction["output"], outputs[prediction["output"]])]
    else:
        rows = prediction["rows"]
        lines = [f"Top {len(rows[0])} classes (output {prediction['output']}):"]
        for number, top in enumerate(rows):
            if len(rows) > 1:
                lines.append(f"  row {number}:")
            for rank, entry in enumerate(top, 1):
                name = entry["label"] or f"class {entry['class']}"
                suffix = f" (class {entry['class']})" if entry["label"] else ""
                lines.append(f"  {rank}. {name}{suffix}: {entry['score']:.4f}")
    lines += [_raw_line(n, a) for n, a in outputs.items() if n != prediction["output"]]
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
        #: The PCK CA type the verifier named for each noted platform (None: unknown).
        self._ca: dict[bytes, CaType | None] = {}
        #: Counts the fetches: the verifier's result cache keys on it.
        self.generation = 0

    def candidates(self, fmspc: bytes, ca: CaType | None = None) -> Sequence[Collateral]:
        held = self._held.get(fmspc)
        if held is None and len(self.noted) < MAX_NOTED_PLATFORMS:
            self.noted.add(fmspc)
            self._ca[fmspc] = ca
        return held or ()

    async def fetch_noted(self, pccs: PccsClient) -> bool:
        """Fetch every noted platform's collateral, for the PCK CA type its PCK leaf
        named (both if it named neither). False: nothing noted.

        Raises:
            PccsError: the service failed or answered something that is not collateral.
            ValueError: a noted FMSPC is not 6 bytes.
        """
        wanted = sorted(self.noted - self._held.keys())
        for fmspc in wanted:
            named = self._ca.get(fmspc)
            types: tuple[CaType, ...] = ("processor", "platform") if named is None else (named,)
            self._held[fmspc] = tuple([await pccs.fetch(fmspc, ca=ca) for ca in types])
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
) -> tuple[InferenceOutcome, bool]:
    """Run the inference with the waiting status line ticking beside it; the outcome,
    and whether the enclave parked it for want of inferences."""
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
    return outcome, status.waited


@dataclass(frozen=True)
class _Result:
    """What became of one input: served (``outcome``), or ``failure``."""

    path: Path
    model: str | None = None
    preset: Preset | None = None
    outcome: InferenceOutcome | None = None
    waited: bool = False
    failure: _Failure | None = None


#: What fails one input among several: it is reported and the next input is tried. Any
#: other failure (attestation, connection, custodian, blocked, a preprocessing ``auto``
#: does not know) ends the run.
_INPUT_FAILURES: Final = (BadRequest, ModelNotFound, NoInferencesLeft, Busy, InferenceFailed)


def _input_paths(given: Sequence[Path]) -> tuple[list[Path], bool]:
    """The files to serve, in order, and whether there are several (a directory counts:
    its files, not hidden, in name order, not its subdirectories)."""
    paths: list[Path] = []
    for path in given:
        if path.is_dir():
            try:
                with os.scandir(path) as entries:
                    found = sorted(
                        Path(entry.path)
                        for entry in itertools.islice(entries, MAX_INPUTS + 1)
                        if not entry.name.startswith(".") and entry.is_file()
                    )
            except OSError as exc:
                raise _Failure(EXIT_USAGE, f"cannot list {path}: {exc.strerror or exc}") from exc
            if not found:
                raise _Failure(EXIT_USAGE, f"directory {path} holds no input files")
            paths += found
        else:
            paths.append(path)
        if len(paths) > MAX_INPUTS:
            raise _Failure(EXIT_USAGE, f"more than {MAX_INPUTS} inputs in one query")
    return paths, len(given) > 1 or any(path.is_dir() for path in given)


class _BarStream:
    """A text stream that writes whole lines above the progress bar (for the status)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                tqdm.write(line.lstrip("\r"), file=self._stream)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return False


class _Report:
    """Prints each input's result as it comes, the progress bar and the summary.

    With one input the output is the single-query form (text, or one JSON object); with
    several, each result is headed by its file (text) or is one JSON line with an
    ``input`` key, and a summary ends the run. The progress bar is drawn on standard
    error only when there are several inputs and standard error is a terminal.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        labels: list[str] | None,
        total: int,
        several: bool,
        out: TextIO,
        log: TextIO,
    ) -> None:
        self._args, self.labels, self._total, self.several = args, labels, total, several
        self._out, self._log = out, log
        self._bar = tqdm(
            total=total, file=log, unit="input", dynamic_ncols=True,
            disable=not (several and log.isatty()),
        )  # fmt: skip
        self.status_log: TextIO = cast("TextIO", _BarStream(log)) if not self._bar.disable else log
        self._noted: set[str] = set()
        self.served = self.waited = self.failed = 0
        self.inferences_left: int | None = None
        self.first_failure: _Failure | None = None

    def close(self) -> None:
        self._bar.close()

    def _line(self, text: str, stream: TextIO | None = None) -> None:
        stream = self._out if stream is None else stream
        if self._bar.disable:
            print(text, file=stream)
        else:
            tqdm.write(text, file=stream)

    def note(self, text: str) -> None:
        """A diagnostic, once however many inputs say it."""
        if text not in self._noted:
            self._noted.add(text)
            self._line(text, self._log)

    def result(self, result: _Result) -> None:
        self._bar.update(1)
        if result.failure is not None:
            self.failed += 1
            self.first_failure = self.first_failure or result.failure
            failure = result.failure
            if not self.several:
                raise failure
            if self._args.json:
                error: dict[str, Any] = {"exit_code": failure.exit_code, "kind": failure.kind}
                error["message"] = str(failure)
                _emit_json({"input": str(result.path), "error": error}, self._out)
            else:
                self._line(f"== {result.path} ==")
                self._line(f"Failed: {failure}")
            return
        outcome = result.outcome
        assert outcome is not None
        assert result.preset is not None
        self.served += 1
        self.waited += result.waited
        self.inferences_left = outcome.inferences_left
        prediction = _prediction(outcome.outputs, self.labels, result.preset)
        if self._args.json:
            document: dict[str, Any] = {
                "model": result.model,
                "preprocess": str(result.preset),
                "prediction": prediction,
                "outputs": _json_outputs(outcome.outputs),
                "cost": outcome.cost,
                "inferences_left": outcome.inferences_left,
            }
            if self.several:
                document = {"input": str(result.path), **document, "waited": result.waited}
            else:
                document["attestation"] = _attestation(self.attestation)
            _emit_json(document, self._out)
            return
        if self.several:
            self._line(f"== {result.path} ==")
        for line in _prediction_lines(prediction, outcome.outputs):
            self._line(line)
        self._line(f"Cost: {outcome.cost} inference{'' if outcome.cost == 1 else 's'}")
        self._line(f"Inferences left: {outcome.inferences_left}")
        if not self.several:
            self._line(_attestation_line(self.attestation))

    def summary(self, stopped: _Failure | None) -> None:
        """The counts of a run of several inputs (and why it stopped early, if it did)."""
        self.close()
        if not self.several:
            return
        attempted = self.served + self.failed
        left = self.inferences_left
        if self._args.json:
            summary: dict[str, Any] = {
                "inputs": self._total,
                "served": self.served,
                "waited": self.waited,
                "failed": self.failed,
                "not_attempted": self._total - attempted,
                "inferences_left": left,
                "stopped": None if stopped is None else str(stopped),
            }
            attestation = _attestation(self.attestation)
            _emit_json({"summary": summary, "attestation": attestation}, self._out)
            return
        text = (
            f"Summary: {self._total} inputs: {self.served} served "
            f"({self.waited} after waiting for inferences), {self.failed} failed"
        )
        if stopped is not None:
            text += f", {self._total - attempted} not attempted (stopped: {stopped})"
        self._line(text + f"; inferences left: {'unknown' if left is None else left}")
        self._line(_attestation_line(self.attestation))

    attestation: VerifiedEnclave


async def _serve_one(
    client: Client,
    model: ModelDescription,
    path: Path,
    loaded: ImageInput | TensorInput | None,
    args: argparse.Namespace,
    report: _Report,
) -> _Result:
    """Load, preprocess and serve one input; a failure of this input alone is returned."""
    try:
        if loaded is None:
            loaded = load_input(path)
            _check_preset(loaded, Preset(args.preprocess))
        inputs, preset = _prepare(loaded, Preset(args.preprocess), model, report.note)
    except InputError as exc:
        return _Result(path, failure=_Failure(EXIT_USAGE, str(exc), "input"))
    wait = 0.0 if args.no_wait else args.wait
    try:
        outcome, waited = await _infer(client, model.name, inputs, wait, report.status_log)
    except _INPUT_FAILURES as exc:
        failure = _Failure(_exit_code(exc), _describe(exc), type(exc).__name__)
        return _Result(path, model.name, preset, failure=failure)
    return _Result(path, model.name, preset, outcome, waited)


async def _run_query(
    connection: _Connection,
    paths: list[Path],
    loaded: ImageInput | TensorInput | None,
    args: argparse.Namespace,
    report: _Report,
) -> None:
    """Serve every input in turn over one connection, reporting each as it is done."""
    failure: RequestFailed | _Failure | None = None
    async with _connect(connection) as client:
        report.attestation = client.attestation
        # An answer we refuse or an error the enclave sent leaves the connection sound:
        # leave the block normally so that it is closed gracefully, then fail.
        try:
            info = await client.info()
            report.inferences_left = info.inferences_left
            model = _pick_model(info, args.model)
            if args.labels_from is not None:
                report.labels = _metadata_labels(args.labels_from, model)
            for path in paths:
                report.result(await _serve_one(client, model, path, loaded, args, report))
        except (RequestFailed, _Failure) as exc:
            failure = exc
        except ConsumerError as exc:
            report.summary(_Failure(_exit_code(exc), _describe(exc)))
            raise
    if failure is not None:
        if isinstance(failure, ConsumerError):
            report.summary(_Failure(_exit_code(failure), _describe(failure)))
        else:
            report.summary(failure)
        raise failure
    report.summary(None)


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


def _query(args: argparse.Namespace, out: TextIO, log: TextIO) -> int:
    connection = _connection(args)
    labels = _load_labels(args.labels)
    paths, several = _input_paths(args.input)
    loaded = None
    if not several:  # one input: read and check it before connecting
        try:
            loaded = load_input(paths[0])
            _check_preset(loaded, Preset(args.preprocess))
        except InputError as exc:
            raise _Failure(EXIT_USAGE, str(exc), "input") from exc
    report = _Report(args, labels, len(paths), several, out, log)
    try:
        trio.run(_run_query, connection, paths, loaded, args, report)
    finally:
        report.close()
    first = report.first_failure
    return EXIT_OK if first is None else first.exit_code


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
                "metadata": dict(m.metadata),
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
        for key, value in model.metadata:
            print(f"  metadata {key}: {_preview(value)}", file=out)
    print(_attestation_line(enclave), file=out)


#: How much of a metadata value ``info`` shows (``--json`` shows it all).
PREVIEW_CHARS: Final = 72


def _preview(value: str) -> str:
    """A metadata value on one line: its line count and size, and its start."""
    lines = value.splitlines()
    flat = " | ".join(line.strip() for line in lines[:20])
    flat = "".join(c if c.isprintable() else "?" for c in flat)
    if len(flat) > PREVIEW_CHARS:
        flat = flat[: PREVIEW_CHARS - 3] + "..."
    size = len(value.encode("utf-8"))
    return f"{len(lines)} line{'' if len(lines) == 1 else 's'}, {size} bytes: {flat}"


def _gateway(args: argparse.Namespace, log: TextIO) -> int:
    try:
        return gateway_command.run(args, partial(_connect, _connection(args)), log)
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
    if terms.preprocess is not None:
        parts.append(f"preprocessing {terms.preprocess}")
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
            return _query(args, out, log)
        if args.command == "gateway":
            return _gateway(args, log)
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
