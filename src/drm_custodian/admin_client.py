"""A small blocking HTTPS client for the admin API: what ``supply N``, ``block``, ``unblock``
and ``usage`` on the custodian's command line call.

Standard library only (``http.client`` + ``ssl``): the CLI makes one call and exits, so
there is nothing for an async or pooled client to win. The server certificate is verified
against the custodian CA (``ca.pem``), hostname included. Every call is safe to retry on a
transport error, which it does once: ``supply`` sends an ``Idempotency-Key`` (a fresh
random one unless given), so a retry after a lost answer counts once; block, unblock and
usage set or read state.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, urlencode, urlsplit

from drm_custodian.admin import DEFAULT_ADMIN_PORT
from drm_custodian.state import CustodianState
from drm_wire.errors import DrmError
from drm_wire.net.address import format_address

#: Connect, send and receive, each. The server answers in milliseconds.
DEFAULT_TIMEOUT: Final = 10.0
#: Largest answer read: /metrics is the biggest, well under this.
_MAX_RESPONSE_BYTES: Final = 1024 * 1024


class AdminClientError(DrmError):
    """The admin API answered with an error, or could not be reached.

    Attributes:
        status: the HTTP status, or ``None`` when there was no answer.
        error: the server's error code (``"unauthorized"``, ``"bad_request"``...), if any.
        field: the field the server named, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.field = field


@dataclass(frozen=True, slots=True)
class AdminClient:
    """Calls the admin API at ``url`` (``https://host:port``), trusting ``ca_path``."""

    url: str
    token: str = field(repr=False)
    ca_path: str | os.PathLike[str]
    timeout: float = DEFAULT_TIMEOUT
    retries: int = 1

    @classmethod
    def from_state(
        cls, state: CustodianState, *, host: str = "127.0.0.1", port: int = DEFAULT_ADMIN_PORT
    ) -> AdminClient:
        """A client for the custodian whose state directory this is (same machine)."""
        return cls(f"https://{format_address(host, port)}", state.admin_token, state.ca_cert_path)

    def supply(
        self, units: int, *, idempotency_key: str | None = None, borrower: str | None = None
    ) -> dict[str, object]:
        """Add ``units`` inferences (to ``borrower``, else the only borrower); returns the
        new usage document."""
        key = idempotency_key or f"cli-{secrets.token_hex(16)}"
        return self._call(
            "POST",
            _path(borrower, "supply_inferences"),
            form={"number_inferences": str(units)},
            headers={"Idempotency-Key": key},
        )

    def block(
        self, reason: str = "", *, borrower: str | None = None, wait: float | None = None
    ) -> dict[str, object]:
        """Block the borrower; returns the usage document, with ``block_acknowledged``:
        the live instances that acknowledged the block (after up to ``wait`` seconds for
        all of them, 0 to 10)."""
        form = {"reason": reason} if reason else {}
        if wait is not None:
            form["wait"] = repr(float(wait))
        return self._call("POST", _path(borrower, "block"), form=form or None)

    def unblock(self, *, borrower: str | None = None) -> dict[str, object]:
        """Unblock the borrower; returns the usage document."""
        return self._call("POST", _path(borrower, "unblock"))

    def reclaim(self, instance_id: str, *, borrower: str | None = None) -> dict[str, object]:
        """Write off a lost instance's units in doubt (I21); returns the usage document
        with ``written_off``."""
        return self._call("POST", _path(borrower, "reclaim"), form={"instance": instance_id})

    def usage(self, *, borrower: str | None = None) -> dict[str, object]:
        """Supplied, granted, served, in doubt, remaining, blocked, instances."""
        return self._call("GET", _path(borrower, "usage"))

    def borrowers(self) -> dict[str, object]:
        """Every borrower: supply, served, in doubt, instances, blocked, removed."""
        return self._call("GET", "/borrowers")

    def add_borrower(
        self, name: str, *, max_instances: int = 1, models: Sequence[str] | None = None
    ) -> dict[str, object]:
        """Make a borrower's license; the answer names its file in ``handoff/``."""
        form = {"name": name, "max_instances": str(max_instances)}
        if models is not None:
            form["models"] = ",".join(models)
        return self._call("POST", "/borrowers", form=form)

    def set_models(self, name: str, models: Sequence[str] | None) -> dict[str, object]:
        """Set the models a borrower's enclaves receive (``None``: all); next link on."""
        form = {"models": "*" if models is None else ",".join(models)}
        return self._call("POST", _path(name, "models"), form=form)

    def remove_borrower(self, name: str) -> dict[str, object]:
        """Remove a borrower: its license is refused and its enclaves cut at once."""
        return self._call("POST", _path(name, "remove"))

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One raw call (authenticated); returns status, headers (lower-cased), body.

        Raises:
            AdminClientError: the server could not be reached or the TLS check failed.
        """
        parts = urlsplit(self.url)
        if parts.scheme != "https" or not parts.hostname:
            raise AdminClientError(f"not an https:// URL: {self.url!r}")
        context = ssl.create_default_context(cafile=os.fspath(self.ca_path))
        all_headers = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        for attempt in range(self.retries + 1):
            conn = http.client.HTTPSConnection(
                parts.hostname, parts.port or DEFAULT_ADMIN_PORT,
                timeout=self.timeout, context=context,
            )  # fmt: skip
            try:
                conn.request(method, path, body=body, headers=all_headers)
                response = conn.getresponse()
                data = response.read(_MAX_RESPONSE_BYTES)
                return response.status, {k.lower(): v for k, v in response.getheaders()}, data
            except ssl.SSLError as exc:
                raise AdminClientError(f"TLS failed: {exc}") from exc
            except (OSError, http.client.HTTPException) as exc:
                if attempt == self.retries:
                    port = parts.port or DEFAULT_ADMIN_PORT
                    raise AdminClientError(
                        f"cannot reach the admin API at {self.url}: {_reason(exc)}; is "
                        f"`drm_custodian serve` running, with --admin-port {port}?"
                    ) from exc
            finally:
                conn.close()
        raise AssertionError("unreachable")

    def _call(
        self,
        method: str,
        path: str,
        *,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, object]:
        all_headers = dict(headers or {})
        body = None
        if form is not None:
            body = urlencode(form).encode("ascii")
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        status, _, data = self.request(method, path, body=body, headers=all_headers)
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise AdminClientError(f"HTTP {status}: not a JSON object", status=status)
        if status != 200:
            error = doc.get("error")
            where = doc.get("field")
            raise AdminClientError(
                f"HTTP {status}: {doc.get('message', error)}" + (f" ({where})" if where else ""),
                status=status,
                error=str(error) if error is not None else None,
                field=str(where) if where is not None else None,
            )
        return doc


def format_usage(doc: Mapping[str, object]) -> str:
    """The usage document as the ``usage`` command prints it without ``--json``."""
    keys = ("borrower", "supplied", "granted", "served", "requests", "in_doubt", "returned",
            "reclaimed", "remaining", "blocked", "instances", "block_acknowledged",
            "written_off")  # fmt: skip
    lines = [f"{key:<10} {doc[key]}" for key in keys if key in doc]
    rows = doc.get("by_instance")
    if isinstance(rows, list) and rows:
        columns = ("instance", "state", "granted", "served", "returned", "reclaimed", "in_doubt")
        lines.append("")
        lines.append("  ".join(f"{c:<32}" if c == "instance" else f"{c:>13}" if c == "state"
                               else f"{c:>9}" for c in columns))  # fmt: skip
        for row in rows:
            if isinstance(row, dict):
                lines.append(
                    "  ".join(
                        f"{row.get(c)!s:<32}" if c == "instance"
                        else f"{row.get(c)!s:>13}" if c == "state"
                        else f"{row.get(c)!s:>9}"
                        for c in columns
                    )
                )  # fmt: skip
    omitted = doc.get("by_instance_omitted")
    if isinstance(omitted, int) and omitted > 0:
        lines.append(f"(and {omitted} older ended instances not listed)")
    return "\n".join(lines)


def _path(borrower: str | None, action: str) -> str:
    """``/ACTION`` for the only borrower, ``/borrowers/NAME/ACTION`` for a named one."""
    if borrower is None:
        return f"/{action}"
    return f"/borrowers/{quote(borrower, safe='')}/{action}"


def format_borrowers(doc: Mapping[str, object]) -> str:
    """``GET /borrowers`` as ``borrower list`` prints it without ``--json``."""
    columns = ("borrower", "supplied", "served", "in_doubt", "remaining", "instances",
               "max_instances", "blocked", "removed", "models")  # fmt: skip
    lines = ["  ".join(f"{c:<20}" if c == "borrower" else f"{c:>9}" for c in columns)]
    rows = doc.get("borrowers")
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict):
            cells = []
            for c in columns:
                value = row.get(c)
                if c == "models":
                    value = ",".join(map(str, value)) if isinstance(value, list) else "all"
                cells.append(f"{value!s:<20}" if c == "borrower" else f"{value!s:>9}")
            lines.append("  ".join(cells))
    return "\n".join(lines)


def _reason(exc: BaseException) -> str:
    """``[Errno 111] Connection refused`` -> ``connection refused``."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return (text or type(exc).__name__).lower()
