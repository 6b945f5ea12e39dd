"""The errors every part of the product raises, in one small hierarchy.

``DrmError`` is the root. Each branch says *who* is at fault, in the spirit of h11:

* :class:`LocalProtocolError`: our own code tried to build or send something the protocol
  forbids. A bug on our side; never caused by a peer.
* :class:`RemoteProtocolError`: the peer sent something the protocol forbids. The peer is
  told the :attr:`ProtocolError.code` and the connection closes; the daemon lives on.
* :class:`AttestationError`: evidence did not verify. Subclasses name the failed check.
* :class:`ConfigError`: a configuration or policy file is invalid.

Errors carry structured fields (``limit``, ``got``, ``field``, ``state``) so logs can show
them as keys. They never carry secrets: no key bytes, model bytes or tensor payloads.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable error codes that travel on the wire in :class:`~drm_wire.messages.Error`.

    Codes are part of the protocol: add new ones, never rename or reuse one.
    """

    #: The peer broke the framing, the codec rules or the state machine.
    PROTOCOL_ERROR = "protocol_error"
    #: A value crossed one of the limits in :mod:`drm_wire.limits`.
    LIMIT_EXCEEDED = "limit_exceeded"
    #: No protocol version in common.
    UNSUPPORTED_VERSION = "unsupported_version"
    #: The peer's attestation or certificate was refused. Deliberately uninformative.
    ATTESTATION_FAILED = "attestation_failed"
    #: A well-formed request that cannot be served as asked (bad tensor, unknown input...).
    BAD_REQUEST = "bad_request"
    #: The named model is not loaded.
    MODEL_NOT_FOUND = "model_not_found"
    #: No inferences left and the request asked not to wait (or waited long enough).
    NO_INFERENCES = "no_inferences"
    #: Too many connections, parked requests or in-flight requests; try again later.
    BUSY = "busy"
    #: The custodian blocked this borrower.
    BLOCKED = "blocked"
    #: The enclave has no verified link to the custodian, so it serves nothing.
    CUSTODIAN_UNREACHABLE = "custodian_unreachable"
    #: Another instance already holds this license.
    DUPLICATE_INSTANCE = "duplicate_instance"
    #: A deadline passed.
    TIMEOUT = "timeout"
    #: This enclave instance stopped cleanly or the owner wrote its units off: its
    #: instance id is refused for good (version 3); a new process has a new one.
    INSTANCE_RETIRED = "instance_retired"
    #: The model failed to run. No inference is counted.
    INFERENCE_FAILED = "inference_failed"
    #: Anything else; the detail stays in the local log.
    INTERNAL = "internal"
    #: Version 3: the named model is lent but could not be loaded in this enclave (the
    #: message says why and what to do); the enclave's other models are served.
    MODEL_UNAVAILABLE = "model_unavailable"


class DrmError(Exception):
    """Root of every error this project raises on purpose."""


class ProtocolError(DrmError):
    """The wire protocol was broken, by us or by the peer.

    Not raised directly: use :class:`LocalProtocolError` or :class:`RemoteProtocolError`.

    Attributes:
        code: the :class:`ErrorCode` to send to the peer.
        field: the message field at fault, if any.
        limit: the limit that was crossed, if any.
        got: what was seen instead (a size, a type name; never a payload).
        state: the protocol state the connection was in, if relevant.
    """

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode = ErrorCode.PROTOCOL_ERROR,
        field: str | None = None,
        limit: int | None = None,
        got: object = None,
        state: str | None = None,
    ) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        super().__init__(message)
        self.code = code
        self.field = field
        self.limit = limit
        self.got = got
        self.state = state

    @property
    def message(self) -> str:
        """The human-readable text, without the structured fields."""
        return str(self.args[0])

    def _as_remote(self) -> RemoteProtocolError:
        return RemoteProtocolError(
            self.message,
            code=self.code,
            field=self.field,
            limit=self.limit,
            got=self.got,
            state=self.state,
        )


class LocalProtocolError(ProtocolError):
    """Our side tried to do something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class PeerError(DrmError):
    """The peer answered a request with an :class:`~drm_wire.messages.Error` message.

    Attributes:
        code: the stable code the peer sent.
        request_id: the request it answers, or ``None`` for a connection-level error.
    """

    def __init__(self, code: ErrorCode, message: str, request_id: int | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.request_id = request_id
        self.detail = message


class AttestationError(DrmError):
    """Evidence (a quote, a certificate, collateral) did not verify.

    The subclass names the check that failed. What a *remote* peer is told is always the
    uniform :attr:`ErrorCode.ATTESTATION_FAILED`; the detail stays in the local log.
    """

    code = ErrorCode.ATTESTATION_FAILED


class ConfigError(DrmError):
    """A configuration or policy file is invalid.

    Attributes:
        path: the file, if the value came from one.
        key: the offending key.
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        where = " ".join(part for part in (path and f"in {path}", key and f"at {key!r}") if part)
        super().__init__(f"{message} ({where})" if where else message)
        self.path = path
        self.key = key


def first_leaf(exc: BaseException) -> BaseException:
    """The first exception inside ``exc`` if it is a (nested) exception group, else ``exc``:
    the one to name when several tasks of a nursery failed the same way."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
