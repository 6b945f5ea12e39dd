"""The gateway's ASGI app: the Open Inference Protocol's REST API over the attested pool.

Theory of operation
-------------------
:class:`GatewayApp` is a plain ASGI callable that hypercorn serves (trio worker; h11 does
all HTTP parsing), as the custodian's admin API is: the protocol is a handful of fixed
routes with JSON answers, and the limits below must be explicit, which a framework would
hide. Routes (``{name}`` may be followed by ``/versions/1``, the only version there is):

- ``GET /v2/health/live``: 200 while the process runs.
- ``GET /v2/health/ready``: 200 once a connection is attested and the enclave says it is
  serving; else 400 (as Triton answers "not ready") with the reason.
- ``GET /v2``: server metadata (extension ``binary_tensor_data``).
- ``GET /v2/models/{name}``: inputs and outputs with v2 datatypes and shapes (``-1`` for
  a dynamic dim), and the lending terms in ``parameters``.
- ``GET /v2/models/{name}/ready``: 200, or 400 with the reason.
- ``POST /v2/models/{name}/infer``: JSON, or the binary tensor data extension
  (:mod:`drm_consumer.gateway.v2`).
- ``GET /metrics``: Prometheus text.

Every request goes through one pipeline and stops at the first failure (threat model
G01-G04): headers over :data:`MAX_HEADER_BYTES` -> 431; with a token, a missing or wrong
``Authorization: Bearer`` -> 401 (before routing; ``/v2/health/*`` excepted, for probes);
route -> 404 / 405; body over :data:`MAX_BODY_BYTES` -> 413 (from ``Content-Length``
before reading, and counted while reading) or not received within :data:`BODY_TIMEOUT`
-> 408; a ``Content-Encoding`` -> 415; then the v2 checks -> 400 / 413. Only then is an
attested connection used.

The enclave's answers map to HTTP statuses (:data:`STATUS_BY_ERROR`); every error body is
``{"error": message}``, which ``tritonclient`` shows. *No inferences left*: the request
waits for a supply up to its bound: the request's ``wait`` parameter (or ``timeout``,
:mod:`drm_consumer.gateway.v2`), else the ``Drm-Wait`` header (seconds), else
:data:`DEFAULT_WAIT`; then 429 with ``Retry-After``
set to the seconds it waited (at least 1, at most :data:`MAX_RETRY_AFTER`): a supply that
did not come within that time is not likely sooner, and a client that wants to wait
longer says so with a larger bound. *Busy*: 429 when the enclave refused the request
(too many in flight or parked on our connection), 503 when it closed the connection
(too many connections); both ``Retry-After: 1``. The cost and the inferences left travel
in the response's ``parameters`` (``cost``, ``inferences_left``).

*Stopping* (:meth:`GatewayApp.start_draining`, on SIGTERM or Ctrl-C): from then on
``/v2/health/ready`` and each model's ``ready`` answer 503, so a load balancer stops
sending; a new inference is answered 503 with ``Retry-After: 1`` (another gateway, or
this one restarted, will take it) and every answer carries ``Connection: close``. The
requests already in progress go on; :meth:`GatewayApp.drained` waits until none is left,
and :meth:`GatewayApp.abandon` ends those still running once the stop's bound has passed:
each is answered 503 (an inference that was already sent may have run and been charged,
as after any lost connection).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

import structlog
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from drm_consumer.client import Client, EnclaveInfo
from drm_consumer.errors import (
    AttestationRefused,
    BadRequest,
    Blocked,
    Busy,
    ConnectionFailed,
    ConsumerError,
    CustodianUnreachable,
    InferenceFailed,
    ModelNotFound,
    ModelUnavailable,
    NoInferencesLeft,
    RequestFailed,
)
from drm_consumer.gateway.pool import EnclavePool
from drm_consumer.gateway.v2 import (
    MAX_JSON_BYTES,
    V2Error,
    check_outputs,
    datatype_of,
    parse_infer,
    render_infer,
)
from drm_daemon.asgi import (
    HttpApp,
    HttpError,
    Response,
    check_header_size,
    header,
    json_response,
    read_body,
    send_response,
)
from drm_wire.limits import MAX_PAYLOAD_BYTES, MAX_WAIT_SECONDS, KiB
from drm_wire.messages import EnclaveState, ModelDescription

__all__ = [
    "BODY_TIMEOUT",
    "DEFAULT_WAIT",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_RETRY_AFTER",
    "STATUS_BY_ERROR",
    "GatewayApp",
]

log = structlog.get_logger(__name__)

#: Seconds an inference waits for a supply when no inferences are left, unless the
#: request says otherwise (``wait`` parameter or ``Drm-Wait`` header).
DEFAULT_WAIT: Final = 10.0
#: Largest ``Retry-After`` we send.
MAX_RETRY_AFTER: Final = 60
#: Request line plus headers. tritonclient sends about 300 bytes.
MAX_HEADER_BYTES: Final = 16 * KiB
#: A body: the JSON part and the binary tensors the enclave's wire can carry.
MAX_BODY_BYTES: Final = MAX_JSON_BYTES + MAX_PAYLOAD_BYTES
#: Seconds to receive a whole body once the headers are in (72 MiB at 2.5 MiB/s).
BODY_TIMEOUT: Final = 30.0
#: Seconds to find an attested connection (connecting one if none is up).
CONNECT_WAIT: Final = 10.0
#: Seconds an inference may run, past its wait, before the gateway answers 504.
RUN_TIMEOUT: Final = 120.0
#: Seconds the enclave's model list is reused for checking inference requests.
INFO_MAX_AGE: Final = 5.0
#: Longest model name in a path.
MAX_NAME_CHARS: Final = 256

#: What each of the consumer's errors becomes: status, and ``Retry-After`` if any.
STATUS_BY_ERROR: Final[Mapping[type[ConsumerError], tuple[int, int | None]]] = {
    BadRequest: (400, None),
    ModelNotFound: (404, None),
    Blocked: (403, None),
    CustodianUnreachable: (503, 5),
    # It did not load in this enclave: the custodian sends it again on the next link.
    ModelUnavailable: (503, 30),
    InferenceFailed: (500, None),
    AttestationRefused: (502, None),
    ConnectionFailed: (503, 1),
}

_MODEL_PATH: Final = re.compile(
    rf"/v2/models/(?P<name>[^/]{{1,{MAX_NAME_CHARS}}})"
    r"(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?"
)
_STATIC: Final = {"/v2/health/live", "/v2/health/ready", "/v2", "/metrics"}
_STOPPING: Final = "the gateway is stopping"


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> HttpError:
    """An error the gateway answers as the Open Inference Protocol's ``{"error": message}``;
    its code (in logs only) is the status's name."""
    code = HTTPStatus(status).phrase.lower().replace(" ", "_")
    return HttpError(status, code, message, headers=headers)


def _retry_after(seconds: float) -> str:
    return str(min(MAX_RETRY_AFTER, max(1, math.ceil(seconds))))


def _model_metadata(model: ModelDescription) -> dict[str, Any]:
    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": s.name,
                "datatype": datatype_of(s.dtype),
                "shape": [-1 if d is None else d for d in s.shape],
            }
            for s in specs
        ]

    return {
        "name": model.name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": tensors(model.inputs),
        "outputs": tensors(model.outputs),
        "parameters": {"sha256": model.sha256.hex(), "terms": model.terms.to_mapping()},
    }


class GatewayApp(HttpApp):
    """The ASGI app. ``token``: the bearer token every request (but health) must carry."""

    def __init__(
        self,
        pool: EnclavePool,
        *,
        token: str | None = None,
        default_wait: float = DEFAULT_WAIT,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._pool = pool
        self._token_digest = None if token is None else hashlib.sha256(token.encode()).digest()
        self._default_wait = default_wait
        self._info_cache: tuple[float, EnclaveInfo] | None = None
        self.registry = registry or CollectorRegistry()
        self._requests = Counter(
            "drm_gateway_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._seconds = Histogram(
            "drm_gateway_request_seconds",
            "Time to answer a request, by endpoint",
            ["endpoint"],
            registry=self.registry,
        )
        self.attestations = Counter(
            "drm_gateway_attestations",
            "Connections to the enclave, by outcome (attested, refused, failed)",
            ["outcome"],
            registry=self.registry,
        )
        self._connections = Gauge(
            "drm_gateway_connections", "Attested connections open now", registry=self.registry
        )
        self._left = Gauge(
            "drm_gateway_inferences_left",
            "Inferences the enclave had left at its last answer",
            registry=self.registry,
        )
        self._inferences_in_flight = Gauge(
            "drm_gateway_inferences_in_flight",
            "Inference requests in progress (their body read, their answer not yet sent)",
            registry=self.registry,
        )
        #: Set by :meth:`start_draining`; requests in progress and their cancel scopes.
        self.draining = False
        self._in_flight: set[trio.CancelScope] = set()
        self._idle = trio.Event()
        self._inference_count = 0
        self._charged = Counter(
            "drm_gateway_inferences_charged",
            "Inferences charged for requests through this gateway",
            registry=self.registry,
        )

    def on_attested(self, client: Client) -> None:
        """The pool's hook: a connection was attested."""
        self.attestations.labels("attested").inc()
        enclave = client.attestation
        log.info(
            "gateway_attested",
            mr_enclave=enclave.mr_enclave.hex(),
            mr_signer=enclave.mr_signer.hex(),
            tcb_status=None if enclave.tcb_status is None else str(enclave.tcb_status),
        )

    def on_connect_failed(self, error: ConsumerError) -> None:
        """The pool's hook: a connect failed."""
        refused = isinstance(error, AttestationRefused)
        self.attestations.labels("refused" if refused else "failed").inc()

    @property
    def in_flight(self) -> int:
        """HTTP requests in progress now."""
        return len(self._in_flight)

    @property
    def inferences_in_flight(self) -> int:
        """Inference requests in progress now (their body read, their answer not sent)."""
        return self._inference_count

    def start_draining(self) -> None:
        """Refuse new inferences and answer not ready from now on (the module's
        *Stopping*); the requests in progress go on."""
        self.draining = True

    async def drained(self) -> None:
        """Return once no request is in progress."""
        while self._in_flight:
            await self._idle.wait()

    def abandon(self) -> int:
        """End every request in progress (each is answered 503); how many there were."""
        for scope in self._in_flight:
            scope.cancel()
        return len(self._in_flight)

    async def http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        started = time.monotonic()
        path = scope["path"]
        match = _MODEL_PATH.fullmatch(path)
        if path in _STATIC:
            endpoint = path
        elif match is not None:
            endpoint = "/v2/models/{name}" + (match["action"] or "")
        else:
            endpoint = "other"
        cancel = trio.CancelScope()
        self._in_flight.add(cancel)
        try:
            with cancel:
                try:
                    response = await self._dispatch(scope, receive, path, match)
                except HttpError as exc:
                    response = json_response(exc.status, {"error": str(exc)}, **exc.headers)
                except Exception:  # the per-request boundary: log it, answer 500
                    log.exception("gateway_request_failed", path=endpoint)
                    response = json_response(500, {"error": "internal error in the gateway"})
            if cancel.cancelled_caught:
                response = json_response(
                    503,
                    {"error": "the gateway stopped before this request was answered (an "
                     "inference already sent may have run and been charged)"},
                    **{"Retry-After": "1"},
                )  # fmt: skip
            extra = [(b"connection", b"close")] if self.draining else []
            await send_response(send, response, *extra)
        finally:
            self._in_flight.discard(cancel)
            if not self._in_flight:
                self._idle.set()
                self._idle = trio.Event()
        elapsed = time.monotonic() - started
        self._requests.labels(endpoint, str(response.status)).inc()
        self._seconds.labels(endpoint).observe(elapsed)
        peer = scope.get("client")
        log.debug(
            "gateway_request",
            client=f"{peer[0]}:{peer[1]}" if peer else "-",
            method=scope["method"],
            path=endpoint,
            status=response.status,
            ms=round(elapsed * 1000, 1),
        )

    async def _dispatch(
        self,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        path: str,
        match: re.Match[str] | None,
    ) -> Response:
        check_header_size(scope, MAX_HEADER_BYTES)
        headers = scope["headers"]
        if self._token_digest is not None and not path.startswith("/v2/health/"):
            self._authenticate(headers)
        method = scope["method"]
        if path in _STATIC or match is not None:
            is_infer = match is not None and match["action"] == "/infer"
            wanted = "POST" if is_infer else "GET"
            if method != wanted:
                raise _error(405, f"use {wanted}", {"Allow": wanted})
        if path == "/v2/health/live":
            return json_response(200, {"live": True})
        if path == "/v2/health/ready":
            if self.draining:
                return json_response(503, {"ready": False, "reason": _STOPPING})
            reason = await self._not_ready(None)
            return json_response(400 if reason else 200, {"ready": not reason, "reason": reason})
        if path == "/v2":
            return json_response(
                200,
                {"name": "drm-gateway", "version": "1", "extensions": ["binary_tensor_data"]},
            )
        if path == "/metrics":
            self._connections.set(self._pool.live)
            return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        if match is None:
            raise _error(404, f"no such endpoint: {path[:128]}")
        name = match["name"]
        if match["version"] not in (None, "1"):
            raise _error(404, f"model {name!r} has only version 1")
        if match["action"] == "/ready":
            if self.draining:
                return json_response(503, {"name": name, "ready": False, "reason": _STOPPING})
            reason = await self._not_ready(name)
            return json_response(
                400 if reason else 200, {"name": name, "ready": not reason, "reason": reason}
            )
        if match["action"] is None:
            info = await self._info()
            return json_response(200, _model_metadata(self._model(info, name)))
        return await self._infer(name, scope, receive)

    def _authenticate(self, headers: Any) -> None:
        values = [v for k, v in headers if k.lower() == b"authorization"]
        scheme, _, credentials = (
            values[0].decode("latin-1") if len(values) == 1 else ""
        ).partition(" ")
        presented = hashlib.sha256(credentials.strip().encode("latin-1")).digest()
        assert self._token_digest is not None
        if scheme.lower() == "bearer" and hmac.compare_digest(presented, self._token_digest):
            return
        log.warning("gateway_auth_failed", reason="missing" if not values else "invalid")
        raise _error(
            401,
            "a valid bearer token is required",
            {"WWW-Authenticate": 'Bearer realm="drm-gateway"'},
        )

    # --- the enclave ---------------------------------------------------------------

    async def _info(self, *, fresh: bool = True) -> EnclaveInfo:
        """The enclave's models and state; with ``fresh`` false, one at most
        :data:`INFO_MAX_AGE` seconds old will do (an inference checks its model and
        requested outputs against it, and the enclave checks again)."""
        now = time.monotonic()
        if not fresh and self._info_cache is not None and now - self._info_cache[0] < INFO_MAX_AGE:
            return self._info_cache[1]
        try:
            info = await self._pool.info(within=CONNECT_WAIT)
        except ConsumerError as exc:
            raise self._mapped(exc) from exc
        self._info_cache = (now, info)
        return info

    def _model(self, info: EnclaveInfo, name: str) -> ModelDescription:
        model = info.models.get(name)
        if model is not None:
            return model
        if info.state == EnclaveState.LOADING:
            raise _error(
                503,
                f"model {name!r} is not available yet: the enclave is loading its models",
                {"Retry-After": "5"},
            )
        raise _error(404, f"no model {name!r}; the enclave serves {sorted(info.models)}")

    async def _not_ready(self, name: str | None) -> str:
        """Why the gateway (or model ``name``) is not ready, or ``""`` when it is."""
        try:
            info = await self._pool.info(within=CONNECT_WAIT)
        except ConsumerError as exc:
            return f"{type(exc).__name__}: {exc}"
        if info.state != EnclaveState.SERVING:
            return f"the enclave is {info.state.value}"
        if name is not None and name not in info.models:
            return f"no model {name!r}"
        return ""

    def _mapped(self, exc: ConsumerError, *, waited: float = 0.0) -> HttpError:
        if isinstance(exc, NoInferencesLeft):
            return _error(
                429,
                f"no inferences left: none came within {waited:g} s ({exc.detail})",
                {"Retry-After": _retry_after(waited)},
            )
        if isinstance(exc, Busy):
            status = 429 if exc.request_id is not None else 503
            return _error(status, f"the enclave is busy: {exc.detail}", {"Retry-After": "1"})
        for kind, (status, retry) in STATUS_BY_ERROR.items():
            if isinstance(exc, kind):
                message = exc.detail if isinstance(exc, RequestFailed) else str(exc)
                headers = {} if retry is None else {"Retry-After": str(retry)}
                return _error(status, message or type(exc).__name__, headers)
        return _error(502, f"the enclave answered an error this gateway does not know: {exc}")

    def _wait(self, scope: HTTPScope, parameter: float | None) -> float:
        if parameter is not None:
            return parameter
        values = [v for k, v in scope["headers"] if k.lower() == b"drm-wait"]
        if not values:
            return self._default_wait
        try:
            wait = float(values[0].decode("ascii")) if len(values) == 1 else math.nan
        except (UnicodeDecodeError, ValueError):
            wait = math.nan
        if not 0.0 <= wait <= MAX_WAIT_SECONDS:
            raise _error(
                400, f"Drm-Wait must be one number of seconds from 0 to {MAX_WAIT_SECONDS:g}"
            )
        return wait

    async def _infer(self, name: str, scope: HTTPScope, receive: ASGIReceiveCallable) -> Response:
        if self.draining:
            raise _error(503, _STOPPING, {"Retry-After": "1"})
        header_length = _header_length(scope)
        body = await read_body(scope, receive, limit=MAX_BODY_BYTES, time_limit=BODY_TIMEOUT)
        self._inference_count += 1
        self._inferences_in_flight.inc()
        try:
            return await self._infer_body(name, scope, body, header_length)
        finally:
            self._inference_count -= 1
            self._inferences_in_flight.dec()

    async def _infer_body(
        self, name: str, scope: HTTPScope, body: bytes, header_length: int | None
    ) -> Response:
        try:
            request = parse_infer(body, header_length)
        except V2Error as exc:
            raise _error(exc.status, str(exc)) from exc
        wait = self._wait(scope, request.wait)
        try:
            with trio.fail_after(wait + RUN_TIMEOUT):
                model = self._model(await self._info(fresh=False), name)
                check_outputs(request, [o.name for o in model.outputs])
                async with self._pool.client(within=CONNECT_WAIT) as client:
                    outcome = await client.infer(name, request.inputs, wait=wait)
        except V2Error as exc:
            raise _error(exc.status, str(exc)) from exc
        except trio.TooSlowError:
            raise _error(
                504, f"the enclave did not answer within {wait + RUN_TIMEOUT:g} s"
            ) from None
        except ConsumerError as exc:
            raise self._mapped(exc, waited=wait) from exc
        self._left.set(outcome.inferences_left)
        self._charged.inc(outcome.cost)
        body_out, json_length = render_infer(
            model=name,
            request=request,
            outputs=outcome.outputs,
            parameters={"cost": outcome.cost, "inferences_left": outcome.inferences_left},
        )
        if json_length is None:
            return Response(200, body_out)
        return Response(
            200,
            body_out,
            "application/octet-stream",
            {"Inference-Header-Content-Length": str(json_length)},
        )


def _header_length(scope: HTTPScope) -> int | None:
    encoding = header(scope, b"content-encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        raise _error(415, "compressed request bodies are not accepted")
    value = header(scope, b"inference-header-content-length")
    if value is None:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 10:
        raise _error(400, "Inference-Header-Content-Length must be a number of bytes")
    return int(value)
