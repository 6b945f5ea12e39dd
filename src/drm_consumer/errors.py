"""What a consumer can be told, as one small hierarchy, and the one place it is mapped.

::

    DrmError                      (drm_wire.errors)
     +-- ConsumerError            anything this package raises on purpose
          +-- AttestationRefused  the enclave's RA-TLS certificate failed our policy
          +-- ConnectionFailed    TCP, TLS, hello or the channel failed or timed out
          +-- RequestFailed       the enclave answered a request with an error code
               +-- NoInferencesLeft     no_inferences
               +-- CustodianUnreachable custodian_unreachable
               +-- Blocked              blocked
               +-- Busy                 busy
               +-- BadRequest           bad_request, limit_exceeded (and inputs we refuse
               |                        to send: a dtype or shape the wire cannot carry)
               +-- ModelNotFound        model_not_found
               +-- ModelUnavailable     model_unavailable (lent, but it did not load)
               +-- InferenceFailed      inference_failed

Every translation from ``drm_wire`` (and trio, and the OS) to these classes happens in
:func:`map_errors`, in the spirit of httpcore's ``map_exceptions``: one table for the
enclave's codes, one ``except`` per foreign exception family, always ``raise ... from
exc`` so the original stays in the traceback.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

import trio

from drm_wire.errors import DrmError, ErrorCode, LocalProtocolError, PeerError, ProtocolError
from drm_wire.net.channel import ChannelError
from drm_wire.net.tls import PeerVerificationError

__all__ = [
    "AttestationRefused",
    "BadRequest",
    "Blocked",
    "Busy",
    "ConnectionFailed",
    "ConsumerError",
    "CustodianUnreachable",
    "InferenceFailed",
    "ModelNotFound",
    "ModelUnavailable",
    "NoInferencesLeft",
    "RequestFailed",
    "map_errors",
]


class ConsumerError(DrmError):
    """Root of the errors :mod:`drm_consumer` raises."""


class AttestationRefused(ConsumerError):
    """The enclave's attestation did not satisfy the policy; the handshake was aborted.

    Not one byte of application data was sent. The ``__cause__`` chain names the check
    that failed (measurement, signer, debug, trust root...).
    """


class ConnectionFailed(ConsumerError):
    """The connection could not be made, or it was lost, cut or closed.

    Covers TCP connect errors, TLS failures other than attestation, a refused or late
    hello, a peer that broke the protocol, and any use of a closed client. A request that
    was in flight when the connection failed may or may not have been served.
    """


class RequestFailed(ConsumerError):
    """The enclave answered a request with an error; the connection stays usable.

    Raised as one of the subclasses when the code is known; as this class itself for a
    code this client has no name for. With ``request_id`` ``None`` the enclave ended the
    whole connection with this code (``busy`` when it has too many, say): the client is
    then finished, and every later call on it raises the same error.

    Attributes:
        code: the stable code the enclave sent.
        detail: the enclave's human-readable message.
        request_id: the request it answered, or ``None`` for a connection-level error.
    """

    def __init__(self, code: ErrorCode, detail: str, request_id: int | None = None) -> None:
        super().__init__(f"{code.value}: {detail}" if detail else code.value)
        self.code = code
        self.detail = detail
        self.request_id = request_id


class NoInferencesLeft(RequestFailed):
    """No inferences left, and the request asked not to wait (or waited long enough)."""


class CustodianUnreachable(RequestFailed):
    """The enclave has no verified link to its custodian, so it serves nothing."""


class Blocked(RequestFailed):
    """The custodian blocked this borrower."""


class Busy(RequestFailed):
    """The enclave has too many connections, parked or running requests; retry later."""


class BadRequest(RequestFailed):
    """The inputs do not fit the model, or cannot be sent at all (see the module docs)."""


class ModelNotFound(RequestFailed):
    """The enclave serves no model of that name."""


class ModelUnavailable(RequestFailed):
    """The model is lent to this enclave but did not load there (protocol version 3); the
    message says why and what to do. Its other models are served."""


class InferenceFailed(RequestFailed):
    """The model failed to run on these inputs. No inference was counted."""


#: The enclave's error codes, as exceptions. A code missing here is a plain
#: :class:`RequestFailed` when it answers a request, and :class:`ConnectionFailed` when it
#: ended the connection.
ERRORS_BY_CODE: Final[dict[ErrorCode, type[RequestFailed]]] = {
    ErrorCode.NO_INFERENCES: NoInferencesLeft,
    ErrorCode.CUSTODIAN_UNREACHABLE: CustodianUnreachable,
    ErrorCode.BLOCKED: Blocked,
    ErrorCode.BUSY: Busy,
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.LIMIT_EXCEEDED: BadRequest,
    ErrorCode.MODEL_NOT_FOUND: ModelNotFound,
    ErrorCode.MODEL_UNAVAILABLE: ModelUnavailable,
    ErrorCode.INFERENCE_FAILED: InferenceFailed,
}


def _from_peer(exc: PeerError) -> ConsumerError:
    kind = ERRORS_BY_CODE.get(exc.code)
    if kind is not None:
        return kind(exc.code, exc.detail, exc.request_id)
    if exc.request_id is not None:
        return RequestFailed(exc.code, exc.detail, exc.request_id)
    return ConnectionFailed(f"the enclave ended the connection: {exc}")


@contextmanager
def map_errors(what: str) -> Iterator[None]:
    """Translate what ``drm_wire``, trio and the OS raise into :class:`ConsumerError`.

    Args:
        what: what was being done, for the messages ("connecting to host:port").

    Raises:
        ConsumerError: the matching subclass, chained to the original exception.
    """
    try:
        yield
    except ConsumerError:
        raise
    except PeerVerificationError as exc:
        raise AttestationRefused(
            f"{what}: the enclave's attestation was refused{_attestation_hint(exc)}"
        ) from exc
    except PeerError as exc:  # HelloRefused too: an unmapped connection-level code
        raise _from_peer(exc) from exc
    except LocalProtocolError as exc:
        # Building the request failed before anything was sent: the caller's inputs.
        raise BadRequest(exc.code, str(exc)) from exc
    except trio.TooSlowError as exc:
        raise ConnectionFailed(f"{what}: timed out ({exc})") from exc
    except (ChannelError, ProtocolError) as exc:
        raise ConnectionFailed(f"{what}: {_lost(exc) or exc}") from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise ConnectionFailed(f"{what}: {_lost(exc) or _unreachable(exc) or exc}") from exc


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, and the first leaf of any exception group among them."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(found) < 16:
        found.append(current)
        if isinstance(current, BaseExceptionGroup) and current.exceptions:
            current = current.exceptions[0]
        else:
            current = current.__cause__
    return found


def _unreachable(exc: BaseException) -> str | None:
    """No TCP connection at all (trio's "all attempts to connect ... failed", with the OS
    errors in a group): say what the OS said, and what to check."""
    errors = [e for e in _chain(exc) if isinstance(e, OSError) and e.errno]
    if not errors:
        return None
    return (
        f"cannot connect: {os.strerror(errors[-1].errno or 0).lower()}; is the enclave running "
        "(`drm_enclave serve`), and is this the address and port of its --listen?"
    )


def _lost(exc: BaseException) -> str | None:
    """The enclave's end of an established connection went away without a TLS goodbye."""
    if not any("ragged EOF" in str(e) for e in _chain(exc)):
        return None
    return (
        "the enclave closed the connection without a goodbye (it stopped or crashed, or "
        "the network cut it); nothing more came of this request: retry, and if it "
        "persists, tell the enclave's operator"
    )


def _attestation_hint(exc: PeerVerificationError) -> str:
    """What the refusal says, and what to do when a root of trust is the question."""
    cause = exc.__cause__
    if cause is None:
        return ""
    detail = f" ({type(cause).__name__}: {cause})"
    if type(cause).__name__ == "UntrustedRootError":
        return (
            f"{detail}: its quote does not chain to a root the policy trusts. A real SGX "
            "quote needs Intel's root; a SIMULATED enclave's needs the policy's "
            "[simulation] root to be that enclave's platform: use the policy "
            "`drm_enclave measure --simulation-dir DIR` wrote with the enclave's own DIR"
        )
    return detail
