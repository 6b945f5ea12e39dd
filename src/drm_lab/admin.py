"""The custodian's admin API over HTTPS, as an operator's script would call it.

:class:`AdminApi` uses ``http.client`` verifying the custodian CA and host name. Its
calls block: from a trio test, call them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlencode

from drm_lab.processes import Deviation, parse_address

__all__ = ["HTTP_TIMEOUT", "AdminApi"]

#: One admin HTTPS call on loopback.
HTTP_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class AdminApi:
    """The custodian's admin API over HTTPS, as an operator's script would call it.

    The server certificate is checked against the custodian CA, host name included.
    """

    host: str
    port: int
    token: str = field(repr=False)
    ca_path: Path

    @classmethod
    def from_state_dir(cls, state_dir: Path, address: str) -> AdminApi:
        """The admin API at ``address`` (``host:port``), with the state directory's token."""
        host, port = parse_address(address)
        token = (state_dir / "admin.token").read_text(encoding="ascii").strip()
        return cls(host, port, token, state_dir / "ca.pem")

    def call(
        self, method: str, path: str, form: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One authenticated request; the status and the JSON answer."""
        context = ssl.create_default_context(cafile=os.fspath(self.ca_path))
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=HTTP_TIMEOUT, context=context
        )
        headers = {"Authorization": f"Bearer {self.token}"}
        body = None
        if form is not None:
            body = urlencode(form).encode("ascii")
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = {"_raw": data.decode(errors="replace")}
        return response.status, doc if isinstance(doc, dict) else {"_raw": doc}

    def _ok(self, method: str, path: str, form: Mapping[str, str] | None = None) -> dict[str, Any]:
        status, doc = self.call(method, path, form)
        if status != 200:
            raise Deviation(f"{method} {path} to answer 200", f"it answered {status}: {doc}")
        return doc

    @staticmethod
    def _path(action: str, borrower: str | None) -> str:
        """The first API's route, or the per-borrower one when ``borrower`` is named."""
        return f"/{action}" if borrower is None else f"/borrowers/{borrower}/{action}"

    def supply(self, units: int, *, borrower: str | None = None) -> dict[str, Any]:
        """``POST /supply_inferences`` with ``number_inferences`` (``borrower``:
        ``/borrowers/NAME/supply_inferences``); the usage document."""
        form = {"number_inferences": str(units)}
        return self._ok("POST", self._path("supply_inferences", borrower), form)

    def block(
        self, reason: str = "", *, borrower: str | None = None, wait: float | None = None
    ) -> dict[str, Any]:
        """``POST /block``: the borrower's enclaves stop serving; with ``wait``, answer
        once they all acknowledged it (or after that many seconds)."""
        fields: dict[str, str] = {"reason": reason} if reason else {}
        if wait is not None:
            fields["wait"] = repr(float(wait))
        return self._ok("POST", self._path("block", borrower), fields or None)

    def unblock(self, *, borrower: str | None = None) -> dict[str, Any]:
        """``POST /unblock``: serving may resume."""
        return self._ok("POST", self._path("unblock", borrower))

    def usage(self, *, borrower: str | None = None) -> dict[str, Any]:
        """``GET /usage``: supplied, granted, served, remaining, blocked, instances."""
        return self._ok("GET", self._path("usage", borrower))

    def reclaim(self, instance: str, *, borrower: str | None = None) -> tuple[int, dict[str, Any]]:
        """``POST /reclaim`` of ``instance``: the status and the answer (a refusal, such as
        ``reclaim_too_soon``, is an answer, not an error)."""
        return self.call("POST", self._path("reclaim", borrower), {"instance": instance})

    def add_borrower(self, name: str, *, max_instances: int = 1) -> dict[str, Any]:
        """``POST /borrowers``: a new borrower; the answer names its ``license_file``."""
        form = {"name": name, "max_instances": str(max_instances)}
        return self._ok("POST", "/borrowers", form)
