"""The custodian's admin API: top up, block, unblock and read usage over HTTPS.

Theory of operation
-------------------
:class:`AdminApp` is a plain ASGI callable; :func:`serve_admin` runs it under hypercorn's
trio worker with the custodian's server certificate (through
:func:`~drm_custodian._admin_serve.serve_https`, so that ``http://`` to the port is told
to use ``https://`` instead of getting an empty reply). Hypercorn (over h11) does all HTTP
parsing; the app sees a parsed scope and body chunks, and only routes, authenticates,
bounds and validates (body and field checks live in :mod:`drm_custodian._admin_http`).
It is a raw ASGI app rather than quart-trio or starlette because the API is a few fixed
routes with JSON answers: a framework would add a dependency tree, HTML error pages, its
own body-size and logging conventions, and hide the limit checks this module must make
explicit (D01-D08 in the threat model).

Every request goes through one pipeline, in this order, and stops at the first failure:

1. auth (all but ``GET /healthz``, and before routing, so that endpoints cannot be
   listed without the token): exactly one ``Authorization: Bearer <token>``, compared
   with :func:`hmac.compare_digest` over SHA-256 digests (so neither content nor length
   leaks through timing) -> else 401 with ``WWW-Authenticate: Bearer``; a token in the
   query string is never looked at;
2. route: unknown path -> 404 (naming the endpoints); known path, other method -> 405
   with ``Allow``; a query string (but on ``/healthz``) -> 400;
3. body: ``Content-Length`` over :data:`MAX_BODY_BYTES` -> 413 before reading; chunks are
   counted while read (chunked bodies too) -> 413; all of it within
   :data:`BODY_TIMEOUT` -> else 408; content type form or JSON -> else 415;
4. parse and validate -> 400 with ``{"error", "field", "message"}``;
5. act on the ledger, then call the :class:`AdminHooks`.

Borrowers: ``GET /borrowers`` lists them, ``POST /borrowers`` adds one (its license file
goes to ``handoff/``), and ``/borrowers/NAME/ACTION`` acts on one (``supply_inferences``,
``block``, ``unblock``, ``reclaim``, ``remove``; ``GET .../usage``). The name is checked
after auth (a bad one -> 400, an unknown one -> 404). The first API's routes
(``/supply_inferences``...) act on the only borrower, or on the one a ``borrower`` field
names: with several borrowers and no field, 400 names them.

Nothing before step 5 touches the ledger, so every 4xx leaves it unchanged. A hook runs
after the ledger commit: if it fails, the request answers 500 but the supply stands, and
a retry with the same ``Idempotency-Key`` counts once and calls the hook again. Hooks
should hand work to a daemon task and return promptly.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol
from urllib.parse import urlsplit

import structlog
import trio
from hypercorn.config import Config
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

from drm_custodian._admin_http import (
    BODY_TIMEOUT,
    IDEMPOTENCY_KEY_RE,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    HttpError,
    Request,
    Response,
    error_body,
    json_response,
    parse_count,
    read_fields,
)
from drm_custodian._admin_serve import serve_https
from drm_custodian.borrowers import BorrowerBook, BorrowerError, parse_models
from drm_custodian.ledger import (
    MAX_REASON_LEN,
    Balance,
    GrantPlan,
    IdempotencyConflict,
    InstanceRecord,
    Ledger,
    LedgerInputError,
    LedgerStorageError,
    ReclaimRefused,
    SupplyResult,
)
from drm_custodian.state import BORROWER_RE as BORROWER_NAME_RE
from drm_custodian.state import MAX_INSTANCES
from drm_daemon.asgi import HttpApp, check_header_size, send_response
from drm_wire.attestation.pccs import CaType
from drm_wire.errors import ConfigError
from drm_wire.limits import HANDSHAKE_TIMEOUT
from drm_wire.net.address import format_address

__all__ = [
    "BODY_TIMEOUT",
    "DEFAULT_ADMIN_PORT",
    "KEEP_ALIVE_TIMEOUT",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "READ_TIMEOUT",
    "AdminApp",
    "AdminHooks",
    "RecordingHooks",
    "hypercorn_config",
    "serve_admin",
]

log = structlog.get_logger(__name__)

#: The original demo's admin port.
DEFAULT_ADMIN_PORT: Final = 6000
#: Hypercorn: longest wait for any one read from a connection (headers or body).
READ_TIMEOUT: Final = 10
#: Hypercorn: how long an idle keep-alive connection is kept. CLI calls are one-shot.
KEEP_ALIVE_TIMEOUT: Final = 5.0
#: An enclave instance id: 32 lower-case hex characters (docs/links.md, step 2).
_INSTANCE_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
#: How many instances that are neither live nor in doubt ``usage`` lists (the ones granted
#: to most recently); it counts the rest in ``by_instance_omitted``. A borrower whose
#: enclaves restart daily has thousands after some years; the last hundred are what an
#: operator looks at, and the ledger keeps them all.
USAGE_ENDED_LISTED: Final = 100
#: The longest a block's answer waits for the instances' acknowledgements (``wait``): a
#: live instance acknowledges within a round trip, and an HTTP call must stay short.
MAX_BLOCK_WAIT: Final = 10.0


class AdminHooks(Protocol):
    """What the admin API tells the daemon, and asks it. Implemented by the daemon."""

    def grant_plans(self, borrower: str) -> list[tuple[str, GrantPlan]]:
        """The instances a supply should grant to in its own transaction, with their rules."""

    async def on_supplied(self, borrower: str, result: SupplyResult) -> None:
        """Units were supplied (or a retried supply replayed): send ``result.grants``, and
        let any instance without one look at the ledger."""

    async def on_blocked(self, borrower: str, reason: str) -> None:
        """The borrower was blocked: stop its instances."""

    async def on_unblocked(self, borrower: str) -> None:
        """The borrower was unblocked."""

    def instances(self, borrower: str) -> int:
        """Enclave instances of the borrower connected now."""

    def live_instances(self, borrower: str) -> set[str]:
        """The ids of the borrower's instances connected now."""

    def silent_for(self, borrower: str, instance_id: str) -> float | None:
        """Seconds the custodian has sent the instance nothing; ``None`` while it is live."""

    async def on_reclaimed(self, borrower: str) -> None:
        """Units in doubt were written off: they are supply again."""

    async def on_removed(self, borrower: str) -> None:
        """The borrower's license was removed: cut its live enclaves now."""

    def block_acks(self, borrower: str) -> dict[str, bool]:
        """For each live instance, whether it acknowledged the block it was last sent."""

    async def wait_block_acked(self, borrower: str, seconds: float) -> None:
        """Return once every live instance acknowledged its block, or after ``seconds``."""


@dataclass
class RecordingHooks:
    """A trivial :class:`AdminHooks`: records every call (tests, and a daemon-less run)."""

    connected: int = 0
    calls: list[tuple[str, str, object]] = field(default_factory=list)
    #: What :meth:`silent_for` answers for every instance (``None``: live).
    silence: float | None = 0.0

    def grant_plans(self, borrower: str) -> list[tuple[str, GrantPlan]]:
        return []

    async def on_supplied(self, borrower: str, result: SupplyResult) -> None:
        self.calls.append(("supplied", borrower, None))

    async def on_blocked(self, borrower: str, reason: str) -> None:
        self.calls.append(("blocked", borrower, reason))

    async def on_unblocked(self, borrower: str) -> None:
        self.calls.append(("unblocked", borrower, None))

    def instances(self, borrower: str) -> int:
        return self.connected

    def live_instances(self, borrower: str) -> set[str]:
        return set()

    def silent_for(self, borrower: str, instance_id: str) -> float | None:
        return self.silence

    async def on_reclaimed(self, borrower: str) -> None:
        self.calls.append(("reclaimed", borrower, None))

    async def on_removed(self, borrower: str) -> None:
        self.calls.append(("removed", borrower, None))

    def block_acks(self, borrower: str) -> dict[str, bool]:
        return {}

    async def wait_block_acked(self, borrower: str, seconds: float) -> None:
        self.calls.append(("wait_block_acked", borrower, seconds))


def instance_state(record: InstanceRecord, live: bool) -> str:
    """What ``usage`` calls an instance: ``live``, ``stopped_clean``, ``reclaimed``,
    ``in_doubt`` (gone with units in doubt), or ``ended`` (gone, nothing in doubt)."""
    if live:
        return "live"
    if record.retired == "reclaimed":
        return "reclaimed"
    if record.stopped:
        return "stopped_clean"
    return "in_doubt" if record.in_doubt else "ended"


def _instance_doc(record: InstanceRecord, live: bool) -> dict[str, object]:
    return {
        "instance": record.instance_id,
        "state": instance_state(record, live),
        "granted": record.granted,
        "served": record.served,
        "returned": record.returned,
        "reclaimed": record.reclaimed,
        "in_doubt": record.in_doubt,
    }


def _usage_doc(borrower: str, balance: Balance, instances: int) -> dict[str, object]:
    return {
        "borrower": borrower,
        "supplied": balance.supplied,
        "granted": balance.granted,
        "served": balance.served,
        "requests": balance.requests,
        "in_doubt": balance.in_doubt,
        "returned": balance.returned,
        "reclaimed": balance.reclaimed,
        "remaining": balance.remaining,
        "blocked": balance.blocked,
        "instances": instances,
    }


#: What ``/borrowers/NAME/ACTION`` accepts: action -> method.
_BORROWER_ACTIONS: Final = {
    "supply_inferences": "POST",
    "block": "POST",
    "unblock": "POST",
    "reclaim": "POST",
    "remove": "POST",
    "models": "POST",
    "usage": "GET",
}
_NAME_RULE: Final = "a borrower name: [A-Za-z0-9][A-Za-z0-9._-]{0,63}"


class AdminApp(HttpApp):
    """The admin API as an ASGI app, for the custodian's borrowers.

    Args:
        ledger: the open ledger.
        hooks: the daemon's side (see :class:`AdminHooks`).
        token: the bearer token (``CustodianState.admin_token``).
        borrower: without ``book``, the one account every route acts on.
        book: the daemon's borrowers (added and removed through ``/borrowers``).
        registry: where the metrics live (a fresh one by default).
        collateral_ages: seconds since each cached ``(fmspc, ca)`` collateral was fetched
            (the PCCS cache's ``ages``), read at every ``/metrics``; None without a PCCS.
        body_timeout: seconds to receive a whole request body (tests shorten it).
        reclaim_window: seconds the custodian must have sent an instance nothing before
            ``POST /reclaim`` writes its units off (``SessionConfig.reclaim_window``).
    """

    def __init__(
        self,
        *,
        ledger: Ledger,
        hooks: AdminHooks,
        token: str,
        borrower: str | None = None,
        book: BorrowerBook | None = None,
        registry: CollectorRegistry | None = None,
        body_timeout: float = BODY_TIMEOUT,
        collateral_ages: Callable[[], Mapping[tuple[bytes, CaType], float]] | None = None,
        reclaim_window: float = 63.0,
    ) -> None:
        if not token:
            raise ConfigError("the admin token must not be empty", key="token")
        self._ledger = ledger
        self._hooks = hooks
        self._token_digest = hashlib.sha256(token.encode()).digest()
        if book is None and borrower is None:
            raise ConfigError("a borrower or a borrower book is needed", key="borrower")
        self._fixed = borrower
        self._book = book
        self._body_timeout = body_timeout
        self._reclaim_window = reclaim_window
        self.registry = registry or CollectorRegistry()
        self._requests = Counter(
            "drm_custodian_admin_requests",
            "Admin API requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self._gauges = {
            name: Gauge(f"drm_custodian_{name}", help_text, ["borrower"], registry=self.registry)
            for name, help_text in (
                ("supplied", "Inferences supplied by the operator, in total."),
                ("granted", "Inferences lent to enclave instances, in total."),
                ("served", "Inferences reported served (items, under the models' terms)."),
                ("requests", "Requests the served inferences came in."),
                ("in_doubt", "Inferences granted and neither served, returned nor written off."),
                ("returned", "Inferences the enclaves gave back, confirmed by them."),
                ("reclaimed", "Inferences in doubt the owner wrote off."),
                ("remaining", "Inferences that may still be granted."),
                ("blocked", "1 when the borrower is blocked."),
                ("instances", "Enclave instances connected now."),
            )
        }
        self._instances_in_doubt = Gauge(
            "drm_custodian_instances_in_doubt",
            "Enclave instances gone (not linked) with inferences in doubt: candidates for "
            "`drm_custodian reclaim`.",
            ["borrower"],
            registry=self.registry,
        )
        self._instance_gauges = {
            name: Gauge(
                f"drm_custodian_instance_{name}",
                help_text + " Live instances only: ids are new per enclave process.",
                ["borrower", "instance"],
                registry=self.registry,
            )
            for name, help_text in (
                ("granted", "Inferences lent to the instance, in total."),
                ("served", "Inferences the instance reported served."),
            )
        }
        self._collateral_ages = collateral_ages
        self._collateral_age = Gauge(
            "drm_custodian_collateral_age_seconds",
            "Seconds since the cached collateral of a platform (FMSPC) and PCK CA was fetched.",
            ["fmspc", "ca"],
            registry=self.registry,
        )
        self._routes: dict[str, tuple[str, Callable[[Request], Awaitable[Response]]]] = {
            "/supply_inferences": ("POST", self._supply),
            "/block": ("POST", self._block),
            "/unblock": ("POST", self._unblock),
            "/usage": ("GET", self._usage),
            "/metrics": ("GET", self._metrics),
            "/healthz": ("GET", self._healthz),
            "/reclaim": ("POST", self._reclaim),
            "/borrowers": ("GET", self._list_borrowers),
        }

    async def http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        started = time.monotonic()
        peer = scope.get("client")
        client = f"{peer[0]}:{peer[1]}" if peer else "-"
        path = scope["path"]
        endpoint = path if path in self._routes else _borrower_endpoint(path)
        request = Request(scope, receive, client, self._body_timeout)
        try:
            response = await self._dispatch(request)
        except HttpError as exc:
            response = json_response(exc.status, error_body(exc), **exc.headers)
        except LedgerInputError as exc:  # our checks should have caught it first
            doc = {"error": "bad_request", "message": str(exc), "field": exc.field}
            response = json_response(400, doc)
        except LedgerStorageError:
            log.exception("admin_ledger_unavailable", client=client, path=path)
            response = json_response(503, {"error": "unavailable", "message": "ledger error"})
        except Exception:  # the per-request boundary: log it, answer 500
            log.exception("admin_request_failed", client=client, path=path)
            response = json_response(500, {"error": "internal", "message": "internal error"})
        await send_response(send, response, (b"cache-control", b"no-store"))
        self._requests.labels(endpoint, str(response.status)).inc()
        log.debug(
            "admin_request",
            client=client,
            method=scope["method"],
            path=endpoint,
            status=response.status,
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _dispatch(self, request: Request) -> Response:
        path, method = request.scope["path"], request.scope["method"]
        check_header_size(request.scope, MAX_HEADER_BYTES)
        if (path, method) != ("/healthz", "GET"):
            # Before the route: without the token, every path and method looks the same,
            # so nobody can list the endpoints by their 404s and 405s.
            self._authenticate(request)
        if path == "/borrowers" and method == "POST":
            return await self._add_borrower(request)
        if path.startswith("/borrowers/"):
            return await self._borrower_route(request)
        route = self._routes.get(path)
        if route is None:
            raise HttpError(404, "not_found", f"no such endpoint; there are {self._endpoints}")
        expected, handler = route
        if method != expected:
            raise HttpError(
                405, "method_not_allowed", f"use {expected}", headers={"Allow": expected}
            )
        if path != "/healthz" and request.scope["query_string"]:
            raise HttpError(400, "bad_request", "no query string is accepted", field="query_string")
        return await handler(request)

    @property
    def _endpoints(self) -> str:
        fixed = [f"{method} {path}" for path, (method, _) in self._routes.items()]
        each = [f"{m} /borrowers/NAME/{a}" for a, m in _BORROWER_ACTIONS.items()]
        return ", ".join([*fixed, "POST /borrowers", *each])

    async def _borrower_route(self, request: Request) -> Response:
        """``/borrowers/NAME/ACTION``: after auth, the name (400 bad, 404 unknown), then the
        method; the action's handler does the rest."""
        parts = request.scope["path"].split("/")
        if len(parts) != 4 or parts[3] not in _BORROWER_ACTIONS:
            raise HttpError(404, "not_found", f"no such endpoint; there are {self._endpoints}")
        name, action = parts[2], parts[3]
        expected = _BORROWER_ACTIONS[action]
        if request.scope["method"] != expected:
            raise HttpError(
                405, "method_not_allowed", f"use {expected}", headers={"Allow": expected}
            )
        if request.scope["query_string"]:
            raise HttpError(400, "bad_request", "no query string is accepted", field="query_string")
        self._known_borrower(name, changing=action not in ("usage", "reclaim"))
        if action == "supply_inferences":
            return await self._supply(request, name)
        if action == "block":
            return await self._block(request, name)
        if action == "unblock":
            return await self._unblock(request, name)
        if action == "reclaim":
            return await self._reclaim(request, name)
        if action == "remove":
            return await self._remove_borrower(request, name)
        if action == "models":
            return await self._set_models(request, name)
        return await self._usage(request, name)

    # --- borrowers -------------------------------------------------------------------

    def _all_borrowers(self) -> list[str]:
        """Every borrower with a ledger account here, removed ones too."""
        if self._book is None:
            assert self._fixed is not None
            return [self._fixed]
        return [record.borrower for record in self._book.records()]

    def _active_borrowers(self) -> list[str]:
        if self._book is None:
            assert self._fixed is not None
            return [self._fixed]
        return self._book.active

    def _known_borrower(self, name: object, *, changing: bool) -> str:
        """``name`` as a borrower of this custodian, else 400 (malformed), 404 (unknown) or,
        for a change, 409 (removed)."""
        if not isinstance(name, str) or not BORROWER_NAME_RE.fullmatch(name):
            raise HttpError(400, "bad_request", f"must be {_NAME_RULE}", field="borrower")
        if self._book is None:
            known, removed = name == self._fixed, False
        else:
            record = self._book.get(name)
            known, removed = record is not None, record is not None and record.removed
        if not known:
            raise HttpError(
                404,
                "unknown_borrower",
                f"no borrower {name}; there are: {', '.join(self._active_borrowers())}",
                field="borrower",
            )
        if removed and changing:
            raise HttpError(
                409, "borrower_removed", f"borrower {name} was removed", field="borrower"
            )
        return name

    def _borrower_of(self, fields: Mapping[str, object], *, changing: bool = True) -> str:
        """The first API's borrower: the ``borrower`` field, or the only borrower."""
        if "borrower" in fields:
            return self._known_borrower(fields["borrower"], changing=changing)
        active = self._active_borrowers()
        if len(active) != 1:
            raise HttpError(
                400,
                "borrower_required",
                f"this custodian has {len(active)} borrowers ({', '.join(active) or 'none'}): "
                "name one in the borrower field, or use /borrowers/NAME/...",
                field="borrower",
            )
        return active[0]

    @staticmethod
    def _first_api_field(borrower: str | None) -> frozenset[str]:
        """The first API's routes take an optional ``borrower`` field; the others do not."""
        return frozenset({"borrower"}) if borrower is None else frozenset()

    async def _list_borrowers(self, request: Request) -> Response:
        rows: list[dict[str, object]] = []
        records = {r.borrower: r for r in self._book.records()} if self._book is not None else {}
        for name in self._all_borrowers():
            balance = await self._ledger.balance(name)
            row = _usage_doc(name, balance, self._hooks.instances(name))
            record = records.get(name)
            row["max_instances"] = record.max_instances if record is not None else 1
            row["models"] = list(record.models) if record and record.models else None
            row["removed"] = record.removed if record is not None else False
            rows.append(row)
        return json_response(200, {"borrowers": rows})

    async def _add_borrower(self, request: Request) -> Response:
        fields, is_form = await read_fields(
            request,
            allowed={"name"},
            optional=frozenset({"max_instances", "models"}),
            required=True,
        )
        name = fields.get("name")
        if not isinstance(name, str) or not BORROWER_NAME_RE.fullmatch(name):
            raise HttpError(400, "bad_request", f"must be {_NAME_RULE}", field="name")
        max_instances = 1
        if "max_instances" in fields:
            max_instances = _parse_instances(fields["max_instances"], text=is_form)
        models_field = fields.get("models")
        models: tuple[str, ...] | None = None
        if models_field is not None:
            if not isinstance(models_field, str):
                raise HttpError(400, "bad_request", "comma-separated model names", field="models")
            models = _parse_models(models_field)
        if self._book is None:
            raise HttpError(409, "fixed_borrower", "this custodian serves one fixed borrower")
        try:
            added = await self._book.add(name, max_instances=max_instances, models=models)
        except BorrowerError as exc:
            status = 409 if exc.reason == "exists" else 400
            raise HttpError(status, exc.reason, str(exc.message), field=str(exc.key)) from exc
        log.info("admin_borrower_add", client=request.client, borrower=name)
        return json_response(
            200,
            {
                "borrower": name,
                "license_id": added.record.license_id,
                "max_instances": added.record.max_instances,
                "models": list(models) if models is not None else None,
                "license_file": str(added.license_path),
            },
        )

    async def _set_models(self, request: Request, borrower: str) -> Response:
        """``models``: ``a,b``, or ``*`` for every model lent; applies on the next link."""
        fields, _ = await read_fields(request, allowed={"models"}, required=True)
        text = fields.get("models")
        if not isinstance(text, str):
            raise HttpError(400, "bad_request", "comma-separated model names", field="models")
        models = None if text == "*" else _parse_models(text)
        if self._book is None:
            raise HttpError(409, "fixed_borrower", "this custodian serves one fixed borrower")
        try:
            record = await self._book.set_models(borrower, models)
        except BorrowerError as exc:
            status = 409 if exc.reason == "removed" else 400
            raise HttpError(status, exc.reason, str(exc.message), field=str(exc.key)) from exc
        log.info("admin_borrower_models", client=request.client, borrower=borrower)
        return json_response(
            200,
            {
                "borrower": borrower,
                "models": list(record.models) if record.models is not None else None,
            },
        )

    async def _remove_borrower(self, request: Request, borrower: str) -> Response:
        await read_fields(request, allowed=set(), required=False)
        if self._book is None:
            raise HttpError(409, "fixed_borrower", "this custodian serves one fixed borrower")
        try:
            await self._book.remove(borrower)
        except BorrowerError as exc:  # removed by a concurrent call
            raise HttpError(409, exc.reason, str(exc.message), field="borrower") from exc
        await self._hooks.on_removed(borrower)
        log.warning("admin_borrower_remove", client=request.client, borrower=borrower)
        doc = await self._usage_with_instances(borrower)
        return json_response(200, {**doc, "removed": True})

    def _authenticate(self, request: Request) -> None:
        values = [v for k, v in request.scope["headers"] if k.lower() == b"authorization"]
        scheme, _, credentials = (
            values[0].decode("latin-1") if len(values) == 1 else ""
        ).partition(" ")
        presented = credentials.strip().encode("latin-1")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            hashlib.sha256(presented).digest(), self._token_digest
        ):
            return
        reason = (
            "missing" if not values else "malformed" if scheme.lower() != "bearer" else "mismatch"
        )
        log.warning(
            "admin_auth_failed", client=request.client, path=request.scope["path"], reason=reason
        )
        challenge = 'Bearer realm="drm-custodian"'
        if values:
            challenge += ', error="invalid_token"'
        raise HttpError(
            401,
            "unauthorized",
            "a valid bearer token is required",
            headers={"WWW-Authenticate": challenge},
        )

    # --- endpoints -------------------------------------------------------------------

    async def _supply(self, request: Request, borrower: str | None = None) -> Response:
        key = request.header(b"idempotency-key")
        if key is not None and not IDEMPOTENCY_KEY_RE.fullmatch(key):
            raise HttpError(
                400, "bad_request", "must be 1-128 of [A-Za-z0-9._:-]", field="Idempotency-Key"
            )
        fields, is_form = await read_fields(
            request,
            allowed={"number_inferences"},
            optional=self._first_api_field(borrower),
            required=True,
        )
        units = parse_count(fields.get("number_inferences"), text=is_form)
        if borrower is None:
            borrower = self._borrower_of(fields)
        # The linked instances' grants are committed with the supply (one fsync) and
        # handed to their links before this answer is written.
        try:
            result = await self._ledger.supply(
                borrower,
                units,
                idempotency_key=key,
                grant_to=self._hooks.grant_plans(borrower),
            )
        except IdempotencyConflict as exc:
            raise HttpError(422, "idempotency_conflict", str(exc), field="Idempotency-Key") from exc
        await self._hooks.on_supplied(borrower, result)
        balance = result.balance
        log.info(
            "admin_supply",
            client=request.client,
            borrower=borrower,
            units=units,
            idempotency_key=key,
            replayed=result.replayed,
            supplied_before=balance.supplied - (0 if result.replayed else units),
            supplied=balance.supplied,
            remaining=balance.remaining,
            granted_now=sum(grant.units for grant in result.grants),
        )
        doc = _usage_doc(borrower, balance, self._hooks.instances(borrower))
        # A replay added nothing: "added" says what this request changed, so that a script
        # that sums it never counts a retried supply twice.
        added = 0 if result.replayed else units
        return json_response(200, {**doc, "added": added, "replayed": result.replayed})

    async def _block(self, request: Request, borrower: str | None = None) -> Response:
        """Block; with ``wait`` (seconds, at most :data:`MAX_BLOCK_WAIT`), answer once
        every live instance has acknowledged the block (I25) or that long has passed.
        ``block_acknowledged`` counts the live instances that did, of ``instances``."""
        borrower, reason, wait = await self._set_blocked(request, True, borrower)
        await self._hooks.on_blocked(borrower, reason)
        if wait:
            await self._hooks.wait_block_acked(borrower, wait)
        doc = await self._usage_with_instances(borrower)
        doc["block_acknowledged"] = sum(self._hooks.block_acks(borrower).values())
        return json_response(200, doc)

    async def _unblock(self, request: Request, borrower: str | None = None) -> Response:
        borrower, _, _ = await self._set_blocked(request, False, borrower)
        await self._hooks.on_unblocked(borrower)
        return await self._usage(request, borrower)

    async def _set_blocked(
        self, request: Request, blocked: bool, borrower: str | None
    ) -> tuple[str, str, float]:
        fields, is_form = await read_fields(
            request,
            allowed={"reason"},
            optional=self._first_api_field(borrower) | ({"wait"} if blocked else set()),
            required=False,
        )
        if borrower is None:
            borrower = self._borrower_of(fields)
        wait = _parse_wait(fields["wait"], text=is_form) if "wait" in fields else 0.0
        reason = fields.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_LEN or not reason.isprintable():
            raise HttpError(
                400,
                "bad_request",
                f"must be a string of at most {MAX_REASON_LEN} printable characters",
                field="reason",
            )
        await self._ledger.set_blocked(borrower, blocked, reason)
        log.info(
            "admin_block" if blocked else "admin_unblock",
            client=request.client,
            borrower=borrower,
            reason=reason,
        )
        return borrower, reason, wait

    async def _usage(self, request: Request, borrower: str | None = None) -> Response:
        if borrower is None:
            borrower = self._borrower_of({}, changing=False)
        return json_response(200, await self._usage_with_instances(borrower))

    async def _usage_with_instances(self, borrower: str) -> dict[str, object]:
        """The usage document with its instances: every live and in-doubt one, and the
        :data:`USAGE_ENDED_LISTED` granted to most recently of the others (ended,
        stopped cleanly, reclaimed), by id; ``by_instance_omitted`` counts the rest, so
        the answer stays small however many instances a borrower had over the months."""
        # One read transaction: a grant between two reads would make the rows disagree
        # with the totals.
        balance, records = await self._ledger.usage(borrower, newest_first=True)
        live = self._hooks.live_instances(borrower)
        acks = self._hooks.block_acks(borrower) if balance.blocked else {}
        doc = _usage_doc(borrower, balance, self._hooks.instances(borrower))
        listed: list[dict[str, object]] = []
        ended = omitted = 0
        for record in records:
            row = _instance_doc(record, record.instance_id in live)
            # While blocked, whether each live instance acknowledged the block (I25).
            if balance.blocked and record.instance_id in live:
                row["block_acknowledged"] = acks.get(record.instance_id, False)
            if row["state"] not in ("live", "in_doubt"):
                if ended >= USAGE_ENDED_LISTED:
                    omitted += 1
                    continue
                ended += 1
            listed.append(row)
        doc["by_instance"] = sorted(listed, key=lambda row: str(row["instance"]))
        doc["by_instance_omitted"] = omitted
        return doc

    async def _reclaim(self, request: Request, borrower: str | None = None) -> Response:
        """Write off a lost instance's units in doubt: the owner's decision (I21)."""
        fields, _ = await read_fields(
            request, allowed={"instance"}, optional=self._first_api_field(borrower), required=True
        )
        if borrower is None:
            borrower = self._borrower_of(fields, changing=False)
        instance = fields.get("instance")
        if not isinstance(instance, str) or not _INSTANCE_ID_RE.fullmatch(instance):
            raise HttpError(
                400,
                "bad_request",
                "must be an instance id: 32 hex characters (`usage` lists them)",
                field="instance",
            )
        window = self._reclaim_window
        silent = self._hooks.silent_for(borrower, instance)
        if silent is None:
            raise HttpError(
                409,
                "instance_live",
                f"instance {instance} is linked now, so it is not lost: a SIGTERM to its "
                "enclave returns its units; block the borrower to stop it serving",
                field="instance",
            )
        if silent < window:
            wait = window - silent
            raise HttpError(
                409,
                "reclaim_too_soon",
                f"the custodian could have sent instance {instance} something {silent:.1f} s "
                f"ago; a write-off is allowed {window:.1f} s after that (the enclave's "
                "detection timeout plus the margin, so that a lost enclave has stopped "
                f"serving): retry in {wait:.1f} s",
                field="instance",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        try:
            result = await self._ledger.reclaim(borrower, instance)
        except ReclaimRefused as exc:
            unknown = "no instance" in str(exc)
            raise HttpError(
                404 if unknown else 409,
                "unknown_instance" if unknown else "already_reclaimed",
                str(exc),
                field="instance",
            ) from exc
        log.warning(
            "admin_reclaim",
            client=request.client,
            borrower=borrower,
            instance=instance,
            units=result.units,
            silent_for=round(silent, 1),
            remaining=result.balance.remaining,
        )
        await self._hooks.on_reclaimed(borrower)
        doc = await self._usage_with_instances(borrower)
        return json_response(200, {**doc, "instance": instance, "written_off": result.units})

    async def _metrics(self, request: Request) -> Response:
        # Per-instance series for live instances only: an id is new with every enclave
        # process, so series of gone instances would pile up for months.
        for instance_gauge in self._instance_gauges.values():
            instance_gauge.clear()
        for borrower in self._all_borrowers():
            await self._borrower_metrics(borrower)
        if self._collateral_ages is not None:
            self._collateral_age.clear()  # a platform the cache dropped is not reported stale
            for (fmspc, ca), age in self._collateral_ages().items():
                self._collateral_age.labels(fmspc.hex().upper(), ca).set(age)
        return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    async def _borrower_metrics(self, borrower: str) -> None:
        balance = await self._ledger.balance(borrower)
        doc = _usage_doc(borrower, balance, self._hooks.instances(borrower))
        live = self._hooks.live_instances(borrower)
        gone_in_doubt = 0
        for record in await self._ledger.instances(borrower):
            if record.instance_id in live:
                labels = (borrower, record.instance_id)
                self._instance_gauges["granted"].labels(*labels).set(record.granted)
                self._instance_gauges["served"].labels(*labels).set(record.served)
            elif record.in_doubt and record.retired is None:
                gone_in_doubt += 1
        self._instances_in_doubt.labels(borrower).set(gone_in_doubt)
        for name, gauge in self._gauges.items():
            value = doc[name]
            assert isinstance(value, int)  # bool is an int: blocked -> 0/1
            gauge.labels(borrower).set(value)

    async def _healthz(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})


def _borrower_endpoint(path: str) -> str:
    """The metrics label of a request's path: bounded, never a borrower's name."""
    parts = path.split("/")
    if len(parts) == 4 and parts[1] == "borrowers" and parts[3] in _BORROWER_ACTIONS:
        return f"/borrowers/NAME/{parts[3]}"
    return "other"


def _parse_wait(value: object, *, text: bool) -> float:
    if text and isinstance(value, str) and len(value) <= 8:
        with contextlib.suppress(ValueError):
            value = float(value)
    if type(value) is int:
        value = float(value)
    if type(value) is not float or not 0 <= value <= MAX_BLOCK_WAIT:  # NaN fails this too
        raise HttpError(
            400, "bad_request", f"must be a number of seconds from 0 to {MAX_BLOCK_WAIT:g}",
            field="wait",
        )  # fmt: skip
    return value


def _parse_instances(value: object, *, text: bool) -> int:
    if text and isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 8:
        value = int(value)
    if type(value) is not int or not 1 <= value <= MAX_INSTANCES:
        raise HttpError(
            400, "bad_request", f"must be a whole number from 1 to {MAX_INSTANCES}",
            field="max_instances",
        )  # fmt: skip
    return value


def _parse_models(text: str) -> tuple[str, ...]:
    try:
        return parse_models(text)
    except BorrowerError as exc:
        raise HttpError(400, "bad_request", str(exc.message), field="models") from exc


# --- server --------------------------------------------------------------------------


def hypercorn_config(
    *, certfile: str | os.PathLike[str], keyfile: str | os.PathLike[str], host: str, port: int
) -> Config:
    """The hypercorn configuration :func:`serve_admin` uses, with every limit spelled out."""
    config = Config()
    config.bind = [format_address(host, port)]
    config.certfile = os.fspath(certfile)
    config.keyfile = os.fspath(keyfile)
    # HTTP/1.1 only: curl and the CLI need nothing more, and h2 brings its own DoS surface.
    config.alpn_protocols = ["http/1.1"]
    config.ssl_handshake_timeout = HANDSHAKE_TIMEOUT
    config.read_timeout = READ_TIMEOUT
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.keep_alive_max_requests = 100
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.graceful_timeout = 3.0
    config.backlog = 64
    config.include_server_header = False
    config.accesslog = None  # the app logs each request itself, structured
    config.errorlog = logging.getLogger("hypercorn.error")  # the daemon's logging setup
    return config


async def serve_admin(
    app: AdminApp,
    *,
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = DEFAULT_ADMIN_PORT,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    allow_non_loopback: bool = False,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API over HTTPS until cancelled or ``shutdown_trigger`` returns.

    Args:
        app: the ASGI app.
        certfile, keyfile: the custodian's server certificate and key (PEM).
        host: an IP literal; loopback only unless ``allow_non_loopback`` (threat model D02).
        port: 0 picks a free port; ``task_status.started`` reports the bound addresses.
        shutdown_trigger: returns to begin a graceful shutdown.

    Raises:
        ConfigError: ``host`` is not an IP literal, or not loopback when it must be.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError("admin host must be an IP address", key="host") from None
    if not address.is_loopback and not allow_non_loopback:
        raise ConfigError("the admin API binds to loopback only", key="host")
    config = hypercorn_config(certfile=certfile, keyfile=keyfile, host=host, port=port)
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            lambda task_status: serve_https(
                app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
            )
        )
        bound = [(str(urlsplit(b).hostname), int(urlsplit(b).port or 0)) for b in binds]
        log.info("admin_listening", addresses=[f"{h}:{p}" for h, p in bound])
        task_status.started(bound)
