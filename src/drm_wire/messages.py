"""Typed messages: one frozen, slotted, keyword-only dataclass per message type.

A message validates itself at construction, so an invalid message cannot exist: building
one with a bad value raises :class:`~drm_wire.errors.LocalProtocolError`. Decoding goes
through the same constructor, and :func:`from_frame` turns the error into a
:class:`~drm_wire.errors.RemoteProtocolError`: one set of checks for both directions.

Types are exact: ``True`` is not an int, ``1.0`` is not an int, ``5`` is not a float, and
``"5"`` is nothing but a string. Unknown fields and unknown message types are errors.

The catalogue, by link (``C`` = client, ``S`` = server; the state machine that orders
them lives in :mod:`drm_wire.protocol`):

* both links: ``hello`` (C), ``welcome`` / ``refusal`` (S), ``error`` (both);
* custodian link (enclave = C, custodian = S): ``model_begin``, ``model_chunk``,
  ``model_end``, ``grant``, ``usage_ack``, ``block``, ``unblock`` (S); ``model_loaded``,
  ``usage_report`` (C); ``heartbeat`` (both); version 3: ``model_keep``, ``recall``,
  ``return_ack`` (S), ``model_load_failed``, ``returned`` and ``hello``'s ``held`` (C);
  version 4: ``demand``, ``block_ack`` (C), and ``block``'s ``block_id`` (S);
* consumer link (consumer = C, enclave = S): ``infer``, ``model_info_request`` (C);
  ``waiting``, ``result``, ``model_info`` (S).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from types import NoneType, UnionType
from typing import (
    Any,
    ClassVar,
    Final,
    TypeVar,
    Union,
    dataclass_transform,
    get_args,
    get_origin,
    get_type_hints,
)

from .codec import Header
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .framing import Buffer, Frame, PayloadSink
from .limits import (
    MAX_BIN_LEN,
    MAX_CONTAINER_LEN,
    MAX_GRANT_UNITS,
    MAX_METADATA_BYTES,
    MAX_METADATA_KEYS,
    MAX_MODEL_BYTES,
    MAX_MODELS,
    MAX_PAYLOAD_BYTES,
    MAX_STR_LEN,
    MAX_TENSORS,
    MAX_UINT,
    MAX_WAIT_SECONDS,
    MODEL_CHUNK_BYTES,
)
from .model.terms import Terms, TermsError, metadata_key
from .tensors import DTYPES, Tensor, check_name, tensors_from_wire, tensors_to_wire

__all__ = [
    "MESSAGE_TYPES",
    "Block",
    "BlockAck",
    "Demand",
    "Error",
    "Grant",
    "Heartbeat",
    "HeldModel",
    "Hello",
    "InferenceRequest",
    "InferenceResult",
    "LoadFailure",
    "Message",
    "Metadata",
    "ModelBegin",
    "ModelChunk",
    "ModelDescription",
    "ModelEnd",
    "ModelInfo",
    "ModelInfoRequest",
    "ModelKeep",
    "ModelLoadFailed",
    "ModelLoaded",
    "PeerRole",
    "Recall",
    "Refusal",
    "ReturnAck",
    "Returned",
    "TensorSpec",
    "Unblock",
    "UsageAck",
    "UsageReport",
    "Waiting",
    "Welcome",
    "from_frame",
    "terms_digest",
]

TYPE_KEY: Final = "type"


class PeerRole(StrEnum):
    """Who opened the connection, as announced in :class:`Hello`."""

    #: An enclave dialling its custodian.
    ENCLAVE = "enclave"
    #: A consumer dialling an enclave.
    CONSUMER = "consumer"


class EnclaveState(StrEnum):
    """What an enclave tells consumers about itself in :class:`ModelInfo`."""

    #: Linked to its custodian, model loaded: requests are served.
    SERVING = "serving"
    #: No verified custodian link: nothing is served.
    CUSTODIAN_UNREACHABLE = "custodian_unreachable"
    #: The custodian blocked this borrower.
    BLOCKED = "blocked"
    #: Linked, but the model has not arrived yet.
    LOADING = "loading"


# --- field checks: each returns the (possibly normalised) value or raises -------------


def _bad(field: str, message: str, **extra: Any) -> LocalProtocolError:
    return LocalProtocolError(f"{field}: {message}", field=field, **extra)


def _uint(value: object, field: str, maximum: int = MAX_UINT) -> int:
    if type(value) is not int:
        raise _bad(field, "must be an int", got=type(value).__name__)
    if not 0 <= value <= maximum:
        raise _bad(field, f"must be between 0 and {maximum}", limit=maximum, got=value)
    return value


def _positive(value: object, field: str, maximum: int) -> int:
    if _uint(value, field, maximum) == 0:
        raise _bad(field, "must be positive", got=0)
    return value  # type: ignore[return-value]


def _text(value: object, field: str, *, empty: bool = False) -> str:
    if type(value) is not str:
        raise _bad(field, "must be a string", got=type(value).__name__)
    if len(value) > MAX_STR_LEN:
        raise _bad(field, "too long", code=ErrorCode.LIMIT_EXCEEDED, limit=MAX_STR_LEN)
    if not value and not empty:
        raise _bad(field, "must not be empty")
    return value


def _optional_text(value: object, field: str) -> str | None:
    return None if value is None else _text(value, field)


def _digest(value: object, field: str) -> bytes:
    if type(value) is not bytes or len(value) != 32:
        raise _bad(field, "must be 32 bytes")
    return value


def _enum(value: object, enum: type[StrEnum], field: str) -> Any:
    if isinstance(value, enum):
        return value
    if type(value) is str:
        try:
            return enum(value)
        except ValueError:
            pass
    raise _bad(field, f"must be one of {', '.join(e.value for e in enum)}")


def _tuple_of(value: object, field: str, check: Callable[[object, str], Any], limit: int) -> tuple:  # type: ignore[type-arg]
    # A list from the wire goes through here as it is: converting it first (``tuple(v)``)
    # would take an int for a TypeError and a binary for a tuple of versions.
    if type(value) is not tuple and type(value) is not list:
        raise _bad(field, "must be a list")
    if len(value) > limit:
        raise _bad(field, "too many entries", code=ErrorCode.LIMIT_EXCEEDED, limit=limit)
    return tuple(check(item, field) for item in value)


def _bool(value: object, field: str) -> bool:
    if type(value) is not bool:
        raise _bad(field, "must be a bool", got=type(value).__name__)
    return value


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


#: Shared model metadata: ``(key, value)`` pairs sorted by key (see :class:`ModelBegin`).
Metadata = tuple[tuple[str, str], ...]


# --- the base class and registry -----------------------------------------------------

M = TypeVar("M", bound="Message")

#: Wire type tag -> message class. Filled by :func:`_register`.
MESSAGE_TYPES: dict[str, type[Message]] = {}


class Message:
    """Base of all messages: a wire type tag plus validated fields."""

    __slots__ = ()

    #: The value of the header's ``type`` key.
    TYPE: ClassVar[str]
    #: Largest raw payload this message type may carry (0: none).
    MAX_PAYLOAD: ClassVar[int] = 0
    #: Field name -> converter from the wire value, for fields that are not plain scalars.
    _FROM_WIRE: ClassVar[dict[str, Callable[[Any], Any]]] = {}
    _REQUIRED: ClassVar[frozenset[str]]
    _ALLOWED: ClassVar[frozenset[str]]
    #: (field name, converter to the wire value or None), computed by :func:`_register`.
    _TO_WIRE: ClassVar[tuple[tuple[str, Callable[[Any], Any] | None], ...]]

    def to_wire(self) -> tuple[Header, list[Buffer]]:
        """The header map and payload buffers of this message."""
        header: Header = {TYPE_KEY: self.TYPE}
        for name, convert in self._TO_WIRE:
            value = getattr(self, name)
            header[name] = value if convert is None else convert(value)
        return header, []

    @classmethod
    def _from_header(cls: type[M], header: Header, payload: memoryview) -> M:
        keys = header.keys()
        if not keys >= cls._REQUIRED:
            missing = sorted(cls._REQUIRED - keys)
            raise _bad(missing[0], f"missing from {cls.TYPE}")
        if not keys <= cls._ALLOWED:
            unknown = sorted(keys - cls._ALLOWED)
            raise _bad(unknown[0][:64], f"unknown field in {cls.TYPE}")
        if payload.nbytes:
            raise _bad("payload", f"{cls.TYPE} carries no payload")
        converters = cls._FROM_WIRE
        if converters:
            header = {k: (converters[k](v) if k in converters else v) for k, v in header.items()}
        return cls(**header)


def _plain_from_header(cls: type[M], header: Header, payload: memoryview) -> M:
    """:meth:`Message._from_header` for a subclass that overrides it (a slotted dataclass
    has no ``super()`` without arguments)."""
    return Message._from_header.__func__(cls, header, payload)  # type: ignore[attr-defined,no-any-return]


def _enum_value(value: Enum) -> Any:
    return value.value


def _entries(values: tuple[Any, ...]) -> list[Any]:
    return [v.to_wire_entry() if hasattr(v, "to_wire_entry") else v for v in values]


def _wire_converter(hint: Any) -> Callable[[Any], Any] | None:
    """How a field of the (resolved) type ``hint`` goes on the wire, or ``None``: as it is.

    Tuples become lists of their entries, enum members their values, and ``X | None``
    converts like ``X`` but for ``None``. The type is what counts, not how the annotation
    is spelled, so a new enum (or an optional one) is converted like the others.
    """
    if get_origin(hint) in (Union, UnionType):
        kinds = [arg for arg in get_args(hint) if arg is not NoneType]
        convert = _wire_converter(kinds[0]) if len(kinds) == 1 else None
        if convert is None:
            return None
        return lambda value: None if value is None else convert(value)
    if get_origin(hint) is tuple:
        return _entries
    if isinstance(hint, type) and issubclass(hint, Enum):
        return _enum_value
    return None


def _wire_converters(cls: type) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """(field name, converter or None) for each field of the dataclass ``cls``, in order."""
    hints = get_type_hints(cls)  # the annotations are strings (PEP 563): resolve them
    return tuple((f.name, _wire_converter(hints[f.name])) for f in fields(cls))


def _register(cls: type[M]) -> type[M]:
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    cls._ALLOWED = frozenset(names)
    cls._TO_WIRE = _wire_converters(cls)
    cls._REQUIRED = frozenset(
        f.name
        for f in fields(cls)  # type: ignore[arg-type]
        if f.default is f.default_factory  # both MISSING: no default
    )
    assert cls.TYPE not in MESSAGE_TYPES
    MESSAGE_TYPES[cls.TYPE] = cls
    return cls


@dataclass_transform(frozen_default=True, kw_only_default=True)
def _message(cls: type[M]) -> type[M]:
    """Make ``cls`` a frozen, slotted, keyword-only dataclass and register its type tag."""
    return _register(dataclass(frozen=True, slots=True, kw_only=True)(cls))


def from_frame(frame: Frame) -> Message:
    """Build the typed message a frame carries.

    Raises:
        RemoteProtocolError: unknown type, missing or unknown fields, or invalid values.
    """
    header = frame.header
    tag = header.pop(TYPE_KEY, None)
    cls = MESSAGE_TYPES.get(tag) if type(tag) is str else None
    if cls is None:
        raise RemoteProtocolError("unknown message type", field=TYPE_KEY, got=str(tag)[:64])
    try:
        return cls._from_header(header, frame.payload)
    except LocalProtocolError as exc:
        raise exc._as_remote() from exc


def payload_limit(header: Header) -> int:
    """Largest payload the message type named in ``header`` may carry (for the decoder)."""
    cls = MESSAGE_TYPES.get(header.get(TYPE_KEY))  # type: ignore[arg-type]
    return 0 if cls is None else cls.MAX_PAYLOAD


# --- version 3: the models an enclave holds (hello's ``held``; docs/links.md) ---------


def terms_digest(terms: Terms) -> bytes:
    """SHA-256 of the terms' wire map in a canonical JSON form: how an enclave names the
    terms a held model was loaded under, in a few bytes (``hello``'s ``held``)."""
    canonical = json.dumps(terms.to_mapping(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldModel:
    """A model an enclave holds a session for: its name, SHA-256 and the digest of the
    terms it was loaded under (:func:`terms_digest`)."""

    name: str
    sha256: bytes
    terms_sha256: bytes

    def __post_init__(self) -> None:
        check_name(self.name)
        _digest(self.sha256, "sha256")
        _digest(self.terms_sha256, "terms_sha256")

    def to_wire_entry(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "terms_sha256": self.terms_sha256}

    @classmethod
    def from_wire_entry(cls, entry: object) -> HeldModel:
        if type(entry) is not dict:
            raise _bad("held", "each held model must be a map")
        _exact_keys(entry, {"name", "sha256", "terms_sha256"}, "held model")
        return cls(name=entry["name"], sha256=entry["sha256"], terms_sha256=entry["terms_sha256"])


def _held_entry(value: object, field: str) -> HeldModel:
    return value if type(value) is HeldModel else HeldModel.from_wire_entry(value)


def _held(value: object, field: str) -> tuple[HeldModel, ...]:
    held: tuple[HeldModel, ...] = _tuple_of(value, field, _held_entry, MAX_MODELS)
    if len({entry.name for entry in held}) != len(held):
        raise _bad(field, "names a model twice")
    return held


# --- version negotiation -------------------------------------------------------------


def _version(value: object, field: str) -> int:
    return _positive(value, field, 65535)


@_message
class Hello(Message):
    """Client's first message: the protocol versions it speaks and who it is.

    ``license`` and ``instance_id`` identify an enclave to its custodian and are absent on
    the consumer link. ``held`` (version 3, enclave only) lists the models the enclave
    already holds, so the custodian can skip their transfer (:class:`ModelKeep`).
    """

    TYPE: ClassVar[str] = "hello"
    _FROM_WIRE: ClassVar[dict[str, Callable[[Any], Any]]] = {"held": lambda v: _held(v, "held")}

    versions: tuple[int, ...]
    role: PeerRole
    software: str
    license: str | None = None
    instance_id: str | None = None
    held: tuple[HeldModel, ...] | None = None

    def __post_init__(self) -> None:
        _set(self, "versions", _tuple_of(self.versions, "versions", _version, 16))
        if not self.versions:
            raise _bad("versions", "must not be empty")
        _set(self, "role", _enum(self.role, PeerRole, "role"))
        _text(self.software, "software")
        _optional_text(self.license, "license")
        _optional_text(self.instance_id, "instance_id")
        if self.held is not None:
            _set(self, "held", _held(self.held, "held"))

    def to_wire(self) -> tuple[Header, list[Buffer]]:
        header, payload = Message.to_wire(self)
        if self.held is None:  # absent rather than nil: a peer of version 2 knows no such key
            del header["held"]
        return header, payload


@_message
class Welcome(Message):
    """Server's answer to :class:`Hello`: the version both sides will speak."""

    TYPE: ClassVar[str] = "welcome"

    version: int
    software: str

    def __post_init__(self) -> None:
        _version(self.version, "version")
        _text(self.software, "software")


@_message
class Refusal(Message):
    """Server's refusal of :class:`Hello`; the connection then closes."""

    TYPE: ClassVar[str] = "refusal"

    code: ErrorCode
    message: str
    supported_versions: tuple[int, ...]

    def __post_init__(self) -> None:
        _set(self, "code", _enum(self.code, ErrorCode, "code"))
        _text(self.message, "message")
        _set(
            self,
            "supported_versions",
            _tuple_of(self.supported_versions, "supported_versions", _version, 16),
        )


@_message
class Error(Message):
    """An error, with a stable code and a human message.

    With a ``request_id`` it answers that request and the connection stays open; without
    one it is about the whole connection, which then closes.
    """

    TYPE: ClassVar[str] = "error"

    code: ErrorCode
    message: str
    request_id: int | None = None

    def __post_init__(self) -> None:
        _set(self, "code", _enum(self.code, ErrorCode, "code"))
        _text(self.message, "message", empty=True)
        if self.request_id is not None:
            _uint(self.request_id, "request_id")


# --- custodian link ------------------------------------------------------------------


@_message
class ModelBegin(Message):
    """Custodian: a model of ``size`` bytes with this SHA-256 follows in chunks, lent under
    these ``terms`` (protocol version 2; the enclave enforces them, I14)."""

    TYPE: ClassVar[str] = "model_begin"
    _FROM_WIRE: ClassVar[dict[str, Callable[[Any], Any]]] = {"terms": lambda v: _terms(v, "terms")}

    MAX_PAYLOAD: ClassVar[int] = MAX_METADATA_BYTES

    name: str
    size: int
    sha256: bytes
    terms: Terms = field(default_factory=Terms)
    #: The model's shared metadata (protocol version 3): ``(key, value)`` sorted by key,
    #: the entries of its ONNX ``metadata_props`` that ``terms.share_metadata`` lists.
    metadata: Metadata = ()

    def __post_init__(self) -> None:
        check_name(self.name)
        _positive(self.size, "size", MAX_MODEL_BYTES)
        _digest(self.sha256, "sha256")
        _set(self, "terms", _terms(self.terms, "terms"))
        _set(self, "metadata", _metadata(self.metadata, "metadata"))
        unlisted = {key for key, _ in self.metadata} - set(self.terms.share_metadata)
        if unlisted:
            raise _bad("metadata", "holds a key its terms do not share")

    def to_wire(self) -> tuple[Header, list[Buffer]]:
        header: Header = {
            TYPE_KEY: self.TYPE,
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "terms": self.terms.to_mapping(),
        }
        entries, payload = _metadata_to_wire(self.metadata)
        if entries:
            header["metadata"] = entries
        return header, payload

    @classmethod
    def _from_header(cls, header: Header, payload: memoryview) -> ModelBegin:
        metadata, used = _metadata_from_wire(header.pop("metadata", []), payload, 0)
        if used != payload.nbytes:
            raise _bad("payload", "holds bytes no metadata entry accounts for")
        header["metadata"] = metadata
        return _plain_from_header(cls, header, payload[:0])


# Required on the wire: a model never travels without the terms the enclave must enforce.
ModelBegin._REQUIRED = ModelBegin._REQUIRED | {"terms"}


@_message
class ModelChunk(Message):
    """Custodian: ``data`` is the model's bytes from ``offset`` on (raw payload)."""

    TYPE: ClassVar[str] = "model_chunk"
    MAX_PAYLOAD: ClassVar[int] = MODEL_CHUNK_BYTES

    offset: int
    data: memoryview

    def __post_init__(self) -> None:
        _uint(self.offset, "offset", MAX_MODEL_BYTES)
        if type(self.data) is not memoryview or not 0 < self.data.nbytes <= MODEL_CHUNK_BYTES:
            raise _bad("data", "must be a non-empty memoryview within the chunk size")

    def to_wire(self) -> tuple[Header, list[Buffer]]:
        return {TYPE_KEY: self.TYPE, "offset": self.offset}, [self.data]

    @classmethod
    def payload_sink(cls, place: Callable[[int, int], memoryview | None]) -> PayloadSink:
        """A payload sink that asks ``place(offset, nbytes)`` where a chunk's bytes go.

        Frames of other types, and chunk headers whose ``offset`` is not an int, are left
        to the decoder's own buffers (and to the usual validation, which refuses the
        latter). ``place`` sees the header's values unchecked: it must range-check them.
        """

        def sink(header: Header, payload_len: int) -> memoryview | None:
            offset = header.get("offset")
            if header.get(TYPE_KEY) != cls.TYPE or type(offset) is not int:
                return None
            return place(offset, payload_len)

        return sink

    @classmethod
    def _from_header(cls, header: Header, payload: memoryview) -> ModelChunk:
        if header.keys() != {"offset"}:
            raise _bad("offset", "model_chunk carries exactly offset and a payload")
        return cls(offset=header["offset"], data=payload)


@_message
class ModelEnd(Message):
    """Custodian: the model's last chunk has been sent."""

    TYPE: ClassVar[str] = "model_end"

    name: str

    def __post_init__(self) -> None:
        check_name(self.name)


@_message
class ModelLoaded(Message):
    """Enclave: the model arrived intact (size and digest checked) and a session is ready."""

    TYPE: ClassVar[str] = "model_loaded"

    name: str
    sha256: bytes

    def __post_init__(self) -> None:
        check_name(self.name)
        _digest(self.sha256, "sha256")


@_message
class Grant(Message):
    """Custodian: ``units`` more inferences; ``granted_total`` is the instance's new total.

    The total makes grants idempotent: a replayed grant carries a total the enclave has
    already reached and adds nothing.
    """

    TYPE: ClassVar[str] = "grant"

    grant_id: int
    units: int
    granted_total: int

    def __post_init__(self) -> None:
        _uint(self.grant_id, "grant_id")
        _positive(self.units, "units", MAX_GRANT_UNITS)
        _uint(self.granted_total, "granted_total")
        if self.granted_total < self.units:
            raise _bad("granted_total", "must be at least units")


@_message
class UsageReport(Message):
    """Enclave: this instance has served ``served_total`` inferences (units: items under
    the models' terms) in ``requests_total`` requests since it started (version 2).

    Cumulative, so duplicated or reordered reports can never count an inference twice.
    """

    TYPE: ClassVar[str] = "usage_report"

    seq: int
    served_total: int
    requests_total: int = 0

    def __post_init__(self) -> None:
        _uint(self.seq, "seq")
        _uint(self.served_total, "served_total")
        _uint(self.requests_total, "requests_total")
        if self.requests_total > self.served_total:
            raise _bad("requests_total", "a request costs at least one inference")


# Required on the wire (version 2): the ledger counts requests as well as inferences.
UsageReport._REQUIRED = UsageReport._REQUIRED | {"requests_total"}


@_message
class UsageAck(Message):
    """Custodian: the report ``seq`` is durably recorded."""

    TYPE: ClassVar[str] = "usage_ack"

    seq: int
    served_total: int

    def __post_init__(self) -> None:
        _uint(self.seq, "seq")
        _uint(self.served_total, "served_total")


@_message
class Block(Message):
    """Custodian: stop serving at once; parked and new requests fail with ``blocked``.

    Version 4: ``block_id`` names this block on the link (from 1, growing with every
    block sent on it), so that the enclave's :class:`BlockAck` says which one it obeys.
    """

    TYPE: ClassVar[str] = "block"

    block_id: int
    reason: str

    def __post_init__(self) -> None:
        _positive(self.block_id, "block_id", MAX_UINT)
        _text(self.reason, "reason", empty=True)


@_message
class Unblock(Message):
    """Custodian: serving may resume."""

    TYPE: ClassVar[str] = "unblock"


@_message
class Heartbeat(Message):
    """Either side of the custodian link: still here. Missed beats trip the kill switch."""

    TYPE: ClassVar[str] = "heartbeat"

    seq: int

    def __post_init__(self) -> None:
        _uint(self.seq, "seq")


# --- custodian link: returning units (protocol version 3) -----------------------------


@_message
class Recall(Message):
    """Custodian: give back up to ``units`` idle inferences (version 3).

    The enclave answers with a :class:`Returned` naming the same ``recall_id``; it gives
    back only units no request holds or waits for, so the answer may return fewer, even
    none. Built for moving supply between the enclaves of a fleet; a clean stop sends the
    same :class:`Returned` unasked.
    """

    TYPE: ClassVar[str] = "recall"

    recall_id: int
    units: int

    def __post_init__(self) -> None:
        _uint(self.recall_id, "recall_id")
        _positive(self.units, "units", MAX_GRANT_UNITS)


@_message
class Returned(Message):
    """Enclave: this instance has given back ``returned_total`` inferences since it
    started, and served ``served_total`` in ``requests_total`` requests (version 3).

    Totals, like ``granted_total`` and ``served_total``: a returned total only grows, so a
    duplicated or replayed message credits nothing twice (P4). ``final`` says the instance
    is stopping: it holds nothing more it could serve, takes no grant after it, and its
    ``served_total`` is its last. ``recall_id`` names the :class:`Recall` answered, or is
    ``None`` for a return nobody asked for, which is always final.
    """

    TYPE: ClassVar[str] = "returned"

    recall_id: int | None
    returned_total: int
    served_total: int
    requests_total: int
    final: bool

    def __post_init__(self) -> None:
        if self.recall_id is not None:
            _uint(self.recall_id, "recall_id")
        _uint(self.returned_total, "returned_total")
        _uint(self.served_total, "served_total")
        _uint(self.requests_total, "requests_total")
        if self.requests_total > self.served_total:
            raise _bad("requests_total", "a request costs at least one inference")
        _bool(self.final, "final")
        if self.recall_id is None and not self.final:
            raise _bad("final", "a return nobody asked for is a final one")


@_message
class ReturnAck(Message):
    """Custodian: the return is durably recorded; ``returned_total`` is the instance's
    returned total in the ledger now (version 3). The enclave checks it is the total it
    sent."""

    TYPE: ClassVar[str] = "return_ack"

    recall_id: int | None
    returned_total: int

    def __post_init__(self) -> None:
        if self.recall_id is not None:
            _uint(self.recall_id, "recall_id")
        _uint(self.returned_total, "returned_total")


# --- custodian link: demand and block acknowledgement (protocol version 4) ------------


@_message
class Demand(Message):
    """Enclave: its parked requests need ``units`` more inferences than it holds, as of
    ``granted_total`` (version 4).

    ``parked_requests`` requests are waiting; both are 0 once nobody waits. ``seq`` grows
    with every demand on the link, so the newest figure wins. The custodian reads the
    units as what this instance lacks once it has been granted ``granted_total``: units
    it granted after that are counted against the demand, so a grant crossing a demand
    on the wire is not asked for twice. A claim, never a right: the custodian grants an
    instance at most its lease whatever it claims (I24).
    """

    TYPE: ClassVar[str] = "demand"

    seq: int
    units: int
    parked_requests: int
    granted_total: int

    def __post_init__(self) -> None:
        _uint(self.seq, "seq")
        _uint(self.units, "units", MAX_GRANT_UNITS)
        _uint(self.parked_requests, "parked_requests", MAX_GRANT_UNITS)
        _uint(self.granted_total, "granted_total")
        if (self.units == 0) != (self.parked_requests == 0):
            raise _bad("units", "a parked request lacks at least one unit, and only it does")


@_message
class BlockAck(Message):
    """Enclave: block ``block_id`` holds here; no request starts any more until an
    ``unblock`` (version 4, I25). Parked requests have failed with ``blocked``; requests
    already running finish and are reported as ever."""

    TYPE: ClassVar[str] = "block_ack"

    block_id: int

    def __post_init__(self) -> None:
        _positive(self.block_id, "block_id", MAX_UINT)


# --- consumer link -------------------------------------------------------------------


def _wait(value: object, field: str) -> float | None:
    if value is None:
        return None
    if type(value) is not float or not 0.0 <= value <= MAX_WAIT_SECONDS or math.isnan(value):
        raise _bad(field, f"must be null or a float between 0 and {MAX_WAIT_SECONDS}")
    return value


@_message
class InferenceRequest(Message):
    """Consumer: run ``model`` on ``inputs``.

    ``wait`` says what to do when no inferences are left: ``None`` waits until more are
    supplied, ``0.0`` fails at once, ``N`` waits at most N seconds.
    """

    TYPE: ClassVar[str] = "infer"
    MAX_PAYLOAD: ClassVar[int] = MAX_PAYLOAD_BYTES

    request_id: int
    model: str
    inputs: tuple[Tensor, ...]
    wait: float | None = None

    def __post_init__(self) -> None:
        _uint(self.request_id, "request_id")
        check_name(self.model, "model")
        _set(self, "inputs", _tensors(self.inputs, "inputs"))
        _wait(self.wait, "wait")

    def to_wire(self) -> tuple[Header, list[Buffer]]:
        entries, payload = tensors_to_wire(self.inputs)
        header = {
            TYPE_KEY: self.TYPE,
            "request_id": self.request_id,
            "model": self.model,
            "inputs": entries,
            "wait": self.wait,
        }
        return header, list(payload)

    @classmethod
    def _from_header(cls, header: Header, payload: memoryview) -> InferenceRequest:
        _exact_keys(header, {"request_id", "model", "inputs", "wait"}, cls.TYPE)
        inputs = tensors_from_wire(header["inputs"], payload, "inputs")
        return cls(
            request_id=header["request_id"],
            model=header["model"],
            inputs=inputs,
            wait=header["wait"],
        )


@_message
class Waiting(Message):
    """Enclave: request ``request_id`` is parked until inferences are supplied."""

    TYPE: ClassVar[str] = "waiting"

    request_id: int
    position: int

    def __post_init__(self) -> None:
        _uint(self.request_id, "request_id")
        _uint(self.position, "position")


@_message
class InferenceResult(Message):
    """Enclave: the outputs of request ``request_id``, the inferences it cost under the
    model's terms (version 2), and the inferences left after it."""

    TYPE: ClassVar[str] = "result"
    MAX_PAYLOAD: ClassVar[int] = MAX_PAYLOAD_BYTES

    request_id: int
    outputs: tuple[Tensor, ...]
    inferences_left: int
    cost: int = 1

    def __post_init__(self) -> None:
        _uint(self.request_id, "request_id")
        _set(self, "outputs", _tensors(self.outputs, "outputs"))
        _uint(self.inferences_left, "inferences_left")
        _positive(self.cost, "cost", MAX_GRANT_UNITS)

    def to_wire(self) -> tuple[Header, list[Buffer]]:
        entries, payload = tensors_to_wire(self.outputs)
        header = {
            TYPE_KEY: self.TYPE,
            "request_id": self.request_id,
            "outputs": entries,
            "inferences_left": self.inferences_left,
            "cost": self.cost,
        }
        return header, list(payload)

    @classmethod
    def _from_header(cls, header: Header, payload: memoryview) -> InferenceResult:
        _exact_keys(header, {"request_id", "outputs", "inferences_left", "cost"}, cls.TYPE)
        outputs = tensors_from_wire(header["outputs"], payload, "outputs")
        return cls(
            request_id=header["request_id"],
            outputs=outputs,
            inferences_left=header["inferences_left"],
            cost=header["cost"],
        )


@_message
class ModelInfoRequest(Message):
    """Consumer: which models are served, with which inputs and outputs?"""

    TYPE: ClassVar[str] = "model_info_request"

    request_id: int

    def __post_init__(self) -> None:
        _uint(self.request_id, "request_id")


def _dim(value: object, field: str) -> int | None:
    # None marks a dynamic dimension (a symbolic or unknown size in the ONNX graph).
    return None if value is None else _uint(value, field, MAX_UINT)


@dataclass(frozen=True, slots=True, kw_only=True)
class TensorSpec:
    """A model input or output: name, dtype, and shape with ``None`` for dynamic dims."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        check_name(self.name)
        if type(self.dtype) is not str or self.dtype not in DTYPES:
            raise _bad("dtype", "not an allowed dtype")
        _set(self, "shape", _tuple_of(self.shape, "shape", _dim, 8))

    def to_wire_entry(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_wire_entry(cls, entry: object) -> TensorSpec:
        if type(entry) is not dict:
            raise _bad("spec", "must be a map")
        _exact_keys(entry, {"name", "dtype", "shape"}, "tensor spec")
        return cls(name=entry["name"], dtype=entry["dtype"], shape=entry["shape"])


def _terms(value: object, field: str) -> Terms:
    """Terms from the wire's map (or a :class:`Terms` already built)."""
    if type(value) is Terms:
        return value
    if type(value) is not dict:
        raise _bad(field, "must be a map")
    try:
        return Terms.from_mapping(value)
    except TermsError as exc:
        raise _bad(field, exc.message) from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelDescription:
    """One served model: its name, SHA-256, signature, and its lending terms with every
    default made explicit (what one inference is, the shapes a request may have)."""

    name: str
    sha256: bytes
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    terms: Terms = field(default_factory=Terms)
    #: The metadata its owner shares (protocol version 3; see :class:`ModelBegin`).
    metadata: Metadata = ()

    def __post_init__(self) -> None:
        check_name(self.name)
        _digest(self.sha256, "sha256")
        _set(self, "terms", _terms(self.terms, "terms"))
        _set(self, "metadata", _metadata(self.metadata, "metadata"))
        for name in ("inputs", "outputs"):
            specs = getattr(self, name)
            if type(specs) is not tuple or len(specs) > MAX_TENSORS:
                raise _bad(name, "must be a tuple of at most MAX_TENSORS specs")
            if not all(type(s) is TensorSpec for s in specs):
                raise _bad(name, "must hold TensorSpec values")

    def to_wire_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "inputs": [s.to_wire_entry() for s in self.inputs],
            "outputs": [s.to_wire_entry() for s in self.outputs],
            "terms": self.terms.to_mapping(),
        }

    @classmethod
    def from_wire_entry(cls, entry: object) -> ModelDescription:
        if type(entry) is not dict:
            raise _bad("models", "each model must be a map")
        _exact_keys(entry, {"name", "sha256", "inputs", "outputs", "terms"}, "model")
        specs = {
            name: _tuple_of(
                entry[name], name, lambda e, _f: TensorSpec.from_wire_entry(e), MAX_TENSORS
            )
            for name in ("inputs", "outputs")
        }
        return cls(name=entry["name"], sha256=entry["sha256"], terms=entry["terms"], **specs)


@_message
class ModelInfo(Message):
    """Enclave: the models it serves, its state, and the inferences left."""

    TYPE: ClassVar[str] = "model_info"
    _FROM_WIRE: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "models": lambda v: _tuple_of(
            v, "models", lambda e, _f: ModelDescription.from_wire_entry(e), MAX_MODELS
        )
    }

    #: Every model's shared metadata values, in model order (their keys and sizes are in
    #: the header's model entries).
    MAX_PAYLOAD: ClassVar[int] = MAX_MODELS * MAX_METADATA_BYTES

    request_id: int
    models: tuple[ModelDescription, ...]
    inferences_left: int
    state: EnclaveState

    def __post_init__(self) -> None:
        _uint(self.request_id, "request_id")
        if type(self.models) is not tuple or len(self.models) > MAX_MODELS:
            raise _bad("models", "must be a tuple within MAX_MODELS")
        if not all(type(m) is ModelDescription for m in self.models):
            raise _bad("models", "must hold ModelDescription values")
        _uint(self.inferences_left, "inferences_left")
        _set(self, "state", _enum(self.state, EnclaveState, "state"))

    def to_wire(self) -> tuple[Header, list[Buffer]]:
        header, _ = Message.to_wire(self)
        payload: list[Buffer] = []
        for entry, model in zip(header["models"], self.models, strict=True):
            entries, values = _metadata_to_wire(model.metadata)
            if entries:
                entry["metadata"] = entries
                payload += values
        return header, payload

    @classmethod
    def _from_header(cls, header: Header, payload: memoryview) -> ModelInfo:
        entries = header.get("models")
        found: list[Metadata] = []
        used = 0
        if type(entries) is list:
            for entry in entries[: MAX_MODELS + 1]:
                wire = entry.pop("metadata", []) if type(entry) is dict else []
                metadata, used = _metadata_from_wire(wire, payload, used)
                found.append(metadata)
        if used != payload.nbytes:
            raise _bad("payload", "holds bytes no metadata entry accounts for")
        info = _plain_from_header(cls, header, payload[:0])
        for model, metadata in zip(info.models, found, strict=True):
            _set(model, "metadata", metadata)
        return info


# --- version 3: model load failures and transfer skip (docs/links.md, "Version 3") --------


class LoadFailure(StrEnum):
    """Why an enclave could not load a model (:class:`ModelLoadFailed`)."""

    #: The enclave's checks or onnxruntime refused the model, or its terms do not fit it.
    INVALID_MODEL = "invalid_model"
    #: The model is larger than the enclave's configured limit (``max_model_mib``).
    TOO_LARGE = "too_large"
    #: The enclave ran out of memory while loading it.
    OUT_OF_MEMORY = "out_of_memory"
    #: ``model_keep`` named a model the enclave does not hold with that digest and terms.
    NOT_HELD = "not_held"


@_message
class ModelKeep(Message):
    """Custodian (version 3): keep the session you hold for this model instead of a
    transfer; ``sha256`` and ``terms`` are the model's, and the enclave checks that its
    session was made from exactly those bytes under exactly those terms."""

    TYPE: ClassVar[str] = "model_keep"
    _FROM_WIRE: ClassVar[dict[str, Callable[[Any], Any]]] = {"terms": lambda v: _terms(v, "terms")}

    name: str
    size: int
    sha256: bytes
    terms: Terms

    def __post_init__(self) -> None:
        check_name(self.name)
        _positive(self.size, "size", MAX_MODEL_BYTES)
        _digest(self.sha256, "sha256")
        _set(self, "terms", _terms(self.terms, "terms"))

    def to_wire(self) -> tuple[Header, list[Buffer]]:
        return {
            TYPE_KEY: self.TYPE,
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "terms": self.terms.to_mapping(),
        }, []


@_message
class ModelLoadFailed(Message):
    """Enclave (version 3): the model ``name`` (announced with ``sha256``) will not be
    served here, because of ``code``; ``reason`` says what happened. The link goes on and
    the other models serve. Sent after ``model_end`` or ``model_keep``, or during a
    transfer the enclave refuses at ``model_begin`` (the custodian then ends it)."""

    TYPE: ClassVar[str] = "model_load_failed"

    name: str
    sha256: bytes
    code: LoadFailure
    reason: str

    def __post_init__(self) -> None:
        check_name(self.name)
        _digest(self.sha256, "sha256")
        _set(self, "code", _enum(self.code, LoadFailure, "code"))
        _text(self.reason, "reason")


# --- helpers used by several messages ------------------------------------------------


def _metadata(value: object, field: str) -> Metadata:
    """Check shared metadata: at most ``MAX_METADATA_KEYS`` sorted, distinct, valid keys
    with string values of at most ``MAX_METADATA_BYTES`` UTF-8 bytes together."""
    if type(value) is not tuple or len(value) > MAX_METADATA_KEYS:
        raise _bad(field, f"must be a tuple of at most {MAX_METADATA_KEYS} entries",
                   code=ErrorCode.LIMIT_EXCEEDED)  # fmt: skip
    total = 0
    for entry in value:
        if type(entry) is not tuple or len(entry) != 2 or type(entry[1]) is not str:
            raise _bad(field, "entries must be (key, text) pairs")
        try:
            metadata_key(entry[0], "a metadata key")
        except TermsError as exc:
            raise _bad(field, exc.message) from None
        try:
            total += len(entry[1].encode("utf-8"))
        except UnicodeEncodeError:
            raise _bad(field, "a value is not valid text") from None
    if total > MAX_METADATA_BYTES:
        raise _bad(field, "values too large", code=ErrorCode.LIMIT_EXCEEDED,
                   limit=MAX_METADATA_BYTES)  # fmt: skip
    keys = [key for key, _ in value]
    if keys != sorted(set(keys)):
        raise _bad(field, "keys must be distinct and sorted")
    return value


def _metadata_to_wire(metadata: Metadata) -> tuple[list[dict[str, Any]], list[Buffer]]:
    """Header entries (key, size) and the payload buffers (the UTF-8 values)."""
    values = [value.encode("utf-8") for _, value in metadata]
    entries = [{"key": key, "size": len(v)} for (key, _), v in zip(metadata, values, strict=True)]
    return entries, list(values)


def _metadata_from_wire(entries: object, payload: memoryview, offset: int) -> tuple[Metadata, int]:
    """Shared metadata from header ``entries`` and the payload from ``offset`` on; and the
    offset after its values. Every size is checked before a byte is read."""
    if type(entries) is not list or len(entries) > MAX_METADATA_KEYS:
        raise _bad("metadata", f"must be a list of at most {MAX_METADATA_KEYS} entries",
                   code=ErrorCode.LIMIT_EXCEEDED)  # fmt: skip
    pairs = []
    total = 0
    for entry in entries:
        if type(entry) is not dict:
            raise _bad("metadata", "each entry must be a map")
        _exact_keys(entry, {"key", "size"}, "metadata entry")
        size = _uint(entry["size"], "metadata size", MAX_METADATA_BYTES)
        total += size
        if total > MAX_METADATA_BYTES:
            raise _bad("metadata", "values too large", code=ErrorCode.LIMIT_EXCEEDED,
                       limit=MAX_METADATA_BYTES)  # fmt: skip
        if offset + size > payload.nbytes:
            raise _bad("metadata", "a value runs past the payload")
        try:
            text = str(payload[offset : offset + size], "utf-8")
        except UnicodeDecodeError:
            raise _bad("metadata", "a value is not UTF-8") from None
        offset += size
        pairs.append((entry["key"], text))
    return _metadata(tuple(pairs), "metadata"), offset


def _tensors(value: object, field: str) -> tuple[Tensor, ...]:
    if type(value) is not tuple or len(value) > MAX_TENSORS:
        raise _bad(field, f"must be a tuple of at most {MAX_TENSORS} tensors")
    if not all(type(t) is Tensor for t in value):
        raise _bad(field, "must hold Tensor values")
    return value


def _exact_keys(header: dict[str, Any], expected: set[str], what: str) -> None:
    keys = header.keys()
    if keys != expected:
        missing = sorted(expected - keys)
        unknown = sorted(keys - expected)
        if missing:
            raise _bad(missing[0], f"missing from {what}")
        raise _bad(str(unknown[0])[:64], f"unknown field in {what}")


# Digests travel as header binaries, and model lists as header arrays.
assert MAX_BIN_LEN >= 32
assert MAX_CONTAINER_LEN >= MAX_MODELS
