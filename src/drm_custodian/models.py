"""The models a custodian lends, as it holds them: read once into memory, named, hashed,
checked as the enclave will check them, with the owner's lending terms.

:func:`read_model_file` reads each ``--upload`` before the daemon starts;
:func:`inspect_model` checks it with the enclave's own code (:mod:`drm_wire.model`: the
protobuf scan, the signature onnxruntime gives it, the terms resolved against its inputs),
so that a model or terms the enclave would refuse stops ``serve`` and ``check-config``
at once, naming the model and why, instead of failing on the borrower's side.
:class:`ModelFile` is what :mod:`drm_custodian.serve` hands to every enclave session,
which streams it to the enclave with its terms and commits to its SHA-256.

Terms (:mod:`drm_wire.model.terms`) come from a ``[models.NAME]`` table of the config
file, or from a terms file next to the model (``NAME.terms.toml`` beside ``NAME.onnx``,
read when it exists; :func:`terms_file_for`); giving both for one model is refused, and
a model with neither is lent under the defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drm_daemon.config_file import read_toml
from drm_wire.errors import ConfigError, LocalProtocolError
from drm_wire.limits import MAX_MODEL_BYTES
from drm_wire.messages import ModelBegin
from drm_wire.model.scan import ModelError, scan_model
from drm_wire.model.signature import signature
from drm_wire.model.terms import DEFAULT_MAX_BATCH, Pricing, Terms, TermsError, resolve
from drm_wire.tensors import check_name

__all__ = [
    "ModelFile",
    "inspect_model",
    "parse_terms_table",
    "read_model_file",
    "terms_file_for",
]


@dataclass(frozen=True, slots=True, eq=False)
class ModelFile:
    """A model to lend, held in memory: its name on the wire, bytes, SHA-256, and the
    lending terms that travel with it."""

    name: str
    data: bytes = field(repr=False)
    sha256: bytes = field(repr=False)
    terms: Terms = field(default_factory=Terms)
    #: The largest cost of one request under the terms, once :func:`inspect_model` has
    #: resolved them (``None`` before): the grant planner's reserve.
    max_cost: int | None = None
    #: The entries of the model's ONNX ``metadata_props`` its terms share
    #: (``share_metadata``), sorted by key, once :func:`inspect_model` has read them; no
    #: other entry is ever copied here, so no other leaves the custodian in a message.
    metadata: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_bytes(cls, name: str, data: bytes, terms: Terms | None = None) -> ModelFile:
        """Raises: ValueError: empty, larger than ``MAX_MODEL_BYTES``, or a bad name."""
        if not data or len(data) > MAX_MODEL_BYTES:
            raise ValueError(f"a model must be 1 to {MAX_MODEL_BYTES} bytes")
        try:
            check_name(name)
        except LocalProtocolError as exc:
            raise ValueError(f"{name!r} is not a valid model name") from exc
        return cls(name, data, hashlib.sha256(data).digest(), terms or Terms())


def terms_file_for(model_path: str | os.PathLike[str]) -> Path:
    """Where the terms file of a model lives: ``x.onnx`` -> ``x.terms.toml``."""
    path = Path(model_path)
    return path.with_name(path.name.removesuffix(".onnx") + ".terms.toml")


def parse_terms_table(table: object, *, where: str, key: str) -> Terms:
    """Terms from a TOML table (a ``[models.NAME]`` table or a terms file's document).

    Raises:
        ConfigError: naming ``where`` and ``key``, with the terms' own reason.
    """
    if not isinstance(table, Mapping):
        raise ConfigError("must be a table of lending terms", path=where, key=key)
    try:
        return Terms.from_mapping(table)
    except TermsError as exc:
        raise ConfigError(exc.message, path=where, key=key) from None


def parse_models_table(value: object, where: str) -> dict[str, Terms]:
    """The config file's ``[models]`` table: model name -> terms."""
    if not isinstance(value, Mapping):
        raise ConfigError("must be a table of [models.NAME] tables", path=where, key="models")
    return {
        str(name): parse_terms_table(table, where=where, key=f"models.{name}")
        for name, table in value.items()
    }


def inspect_model(model: ModelFile, *, lease: int | None = None) -> tuple[ModelFile, Pricing]:
    """Check a model as the enclave will (scan, onnxruntime, signature, terms) and return
    it with the terms it is lent under, and those terms resolved against its inputs.

    Blocking and CPU-bound (onnxruntime builds a session): call it before ``trio.run``.

    Args:
        lease: the most units one enclave holds at a time; terms whose largest request
            costs more could never be served (a request must fit in one lease), so they
            are refused. When the owner set no ``max_batch`` and half the lease is
            smaller than the default, half the lease (at least 1) becomes the model's
            ``max_batch``, written into the terms sent so the enclave enforces the same:
            then the planner's half-lease top-up alone keeps a largest request servable,
            and grants flow as they did before terms (a larger request, which the owner
            asks for explicitly, makes the planner top up below it too, Q13).

    Raises:
        ConfigError: naming the model: a model the enclave would refuse, terms that do
            not fit its inputs, or a largest request over the lease.
    """
    where = f"model {model.name!r}"
    try:
        scan_model(memoryview(model.data))
        inputs, properties = _signature(model.data)
    except ModelError as exc:
        raise ConfigError(f"{where}: the enclave would refuse it: {exc}") from None
    model = dataclasses.replace(model, metadata=_shared_metadata(where, model.terms, properties))
    try:
        pricing = resolve(model.terms, inputs)  # the owner's terms, as written
    except TermsError as exc:
        raise ConfigError(f"{where}: its terms do not fit it: {exc.message}") from None
    if lease is not None and model.terms.max_batch is None and lease // 2 < DEFAULT_MAX_BATCH:
        default = max(1, lease // 2)
        model = dataclasses.replace(
            model, terms=dataclasses.replace(model.terms, max_batch=default)
        )
        try:
            pricing = resolve(model.terms, inputs)
        except TermsError as exc:
            raise ConfigError(
                f"{where}: with max_batch {default} (half the lease of {lease}: set "
                f"max_batch, or raise --lease) its terms do not fit it: {exc.message}"
            ) from None
    if lease is not None and pricing.max_cost > lease:
        raise ConfigError(
            f"{where}: its largest request costs {pricing.max_cost} inferences, more than "
            f"the lease of {lease} an enclave may hold: it could never be served; lower "
            "max_batch or raise --lease"
        )
    return dataclasses.replace(model, max_cost=pricing.max_cost), pricing


def _shared_metadata(
    where: str, terms: Terms, properties: Mapping[str, str]
) -> tuple[tuple[str, str], ...]:
    """The entries of ``properties`` that ``terms`` share, checked as the wire will.

    Raises:
        ConfigError: a shared key the model does not have, or values over the limits.
    """
    missing = [key for key in terms.share_metadata if key not in properties]
    if missing:
        have = ", ".join(map(repr, sorted(properties)[:20])) or "none"
        raise ConfigError(
            f"{where}: its terms share metadata {missing[0]!r}, which the model does not "
            f"have (its metadata_props keys: {have})"
        )
    shared = tuple((key, properties[key]) for key in terms.share_metadata)
    try:
        ModelBegin(name="check", size=1, sha256=bytes(32), terms=terms, metadata=shared)
    except LocalProtocolError as exc:
        raise ConfigError(f"{where}: its shared metadata cannot travel: {exc}") from None
    return shared


def _signature(data: bytes) -> tuple[tuple[Any, ...], dict[str, str]]:
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # before the first import (see model_host)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.optimized_model_filepath = ""
    options.add_session_config_entry("session.load_model_format", "ONNX")
    try:
        session = ort.InferenceSession(
            data, options, providers=["CPUExecutionProvider"], enable_fallback=0
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own classes, for a bad model
        raise ModelError(f"onnxruntime refused it ({type(exc).__name__})") from None
    inputs, _ = signature(session.get_inputs(), session.get_outputs())
    return inputs, dict(session.get_modelmeta().custom_metadata_map)


def read_model_file(path: str | os.PathLike[str], terms: Terms | None = None) -> ModelFile:
    """Read a model into memory; its wire name is the file name without ``.onnx``.

    Its terms are ``terms`` (from the config file) or its terms file
    (:func:`terms_file_for`), or the defaults; both at once is refused.

    Blocking: call it before ``trio.run`` or in a worker thread.

    Raises:
        ConfigError: not a readable regular file, empty, or over ``MAX_MODEL_BYTES``; a
            bad terms file, or terms given both ways.
    """
    file = Path(path)
    try:
        with file.open("rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError("not a regular file", path=str(file))
            if st.st_size > MAX_MODEL_BYTES:
                raise ConfigError(
                    f"{st.st_size} bytes: larger than the {MAX_MODEL_BYTES}-byte limit",
                    path=str(file),
                )
            data = handle.read(MAX_MODEL_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read model: {exc.strerror}", path=str(file)) from exc
    name = file.name.removesuffix(".onnx") or file.name
    terms_path = terms_file_for(file)
    if terms_path.exists():
        if terms is not None:
            raise ConfigError(
                f"terms for model {name!r} are given twice: in the config file's "
                f"[models.{name}] and in {terms_path}; keep one",
                path=str(file),
            )
        document = read_toml(terms_path)
        terms = parse_terms_table(document, where=str(terms_path), key="terms")
    try:
        return ModelFile.from_bytes(name, data, terms)
    except ValueError as exc:
        raise ConfigError(str(exc), path=str(file)) from exc
