"""Fetch a platform's collateral from Intel's PCS or a PCCS (Provisioning Certification
Service API v4), verified HTTPS, into a :class:`~.collateral.Collateral` bundle.

Four requests, relative to the service's base URL (Intel's PCS is
``https://api.trustedservices.intel.com``; a PCCS, which every DCAP host runs for its quote
provider, serves the same paths, usually on port 8081):

=================================================  ===========================================
``GET /sgx/certification/v4/tcb?fmspc=HEX``        ``{"tcbInfo": {...}, "signature": "hex"}``;
                                                   chain in ``TCB-Info-Issuer-Chain`` (v4) or
                                                   ``SGX-TCB-Info-Issuer-Chain`` (v3)
``GET /sgx/certification/v4/qe/identity``          ``{"enclaveIdentity": {...}, "signature":``
                                                   ``"hex"}``; chain in
                                                   ``SGX-Enclave-Identity-Issuer-Chain``
``GET /sgx/certification/v4/pckcrl?ca=processor``  the PCK CRL (``ca=platform`` for the other
``&encoding=der``                                  PCK CA); chain in
                                                   ``SGX-PCK-CRL-Issuer-Chain``
``GET /sgx/certification/v4/rootcacrl``            the root CA CRL (a PCCS; Intel publishes it
                                                   as a DER file beside its root certificate)
=================================================  ===========================================

Issuer chains are URL-encoded PEM. The services differ in small ways, each handled here and
tested against a PCCS written to Intel's API in the tests: the TCB info chain header name
(v3 or v4 spelling), and the CRL encodings (Intel's PCS answers DER when asked with
``encoding=der`` and PEM otherwise; a PCCS may answer DER, PEM, or the DER as hex text), so
a CRL body is read as whichever of the three it is.

The signed bodies (``tcbInfo``, ``enclaveIdentity``) are kept as the exact bytes of the
response, cut out of it, never re-serialised: the signature is over those bytes. Nothing
fetched is trusted: the bundle is checked like any collateral, to the pinned root, at
verification. Responses are bounded (:data:`MAX_RESPONSE_BYTES`); a non-200 status, a
missing header, a malformed body or a timeout raises :class:`PccsError`.

HTTPS is verified against the system's trust store, or only against ``ca`` when given
(``--pccs-ca``): a PCCS usually has a self-signed certificate. Plain ``http://`` is refused.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import unquote

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from drm_wire.attestation._pck import CaType, parse_sgx_extension, pck_ca_type, x509_errors
from drm_wire.attestation.collateral import MAX_COLLATERAL_BYTES, Collateral
from drm_wire.attestation.errors import CertificateChainError
from drm_wire.attestation.quote import Quote
from drm_wire.errors import DrmError

__all__ = [
    "MAX_RESPONSE_BYTES",
    "CaType",
    "PccsClient",
    "PccsError",
    "quote_platform",
    "signed_member",
]

#: Largest response body read (TCB info is a few KiB; a CRL of every revoked PCK ~100 KiB).
MAX_RESPONSE_BYTES: Final = MAX_COLLATERAL_BYTES
#: Seconds for each request (connect, read...).
DEFAULT_TIMEOUT: Final = 10.0
_BASE: Final = "/sgx/certification/v4"
_TCB_CHAIN_HEADERS: Final = ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain")
_QE_CHAIN_HEADER: Final = "SGX-Enclave-Identity-Issuer-Chain"
_CRL_CHAIN_HEADER: Final = "SGX-PCK-CRL-Issuer-Chain"


class PccsError(DrmError):
    """The collateral service could not be reached, or answered something unusable."""


def quote_platform(quote: Quote) -> tuple[bytes, CaType] | None:
    """What a PCCS calls the platform that made ``quote``: the FMSPC in its PCK
    certificate's SGX extension and the PCK CA type that issued it (``None`` if the PCK
    certificate names no FMSPC or no PCK CA). Nothing is verified here.

    Raises:
        CertificateChainError: the PCK chain or its SGX extension is malformed.
    """
    with x509_errors(CertificateChainError, "PCK chain"):
        leaf = x509.load_pem_x509_certificates(quote.pck_chain_pem.removesuffix(b"\0"))[0]
    pck = parse_sgx_extension(leaf)
    ca = pck_ca_type(leaf)
    return None if pck is None or ca is None else (pck.fmspc, ca)


def signed_member(body: bytes, member: str) -> tuple[bytes, str]:
    """The exact bytes of ``member``'s value in a ``{member: {...}, "signature": hex}``
    response, and the signature, for verifying the signature over what was signed.

    The whole body is parsed strictly first (so the cut-out is the one value a JSON
    parser sees); then the top-level object is walked member by member with the JSON
    decoder to find where the value starts and ends.

    Raises:
        PccsError: not such an object.
    """
    try:
        text = body.decode("utf-8")
        whole = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PccsError(f"{member}: response is not JSON") from exc
    if not isinstance(whole, dict) or set(whole) != {member, "signature"}:
        raise PccsError(f"{member}: response must hold exactly {member!r} and 'signature'")
    signature = whole["signature"]
    if not isinstance(signature, str) or not isinstance(whole[member], dict):
        raise PccsError(f"{member}: wrong types")
    decoder = json.JSONDecoder()
    position = _skip(text, 0)
    if text[position : position + 1] != "{":
        raise PccsError(f"{member}: not an object")
    position += 1
    while True:
        position = _skip(text, position)
        key, position = decoder.raw_decode(text, position)
        position = _skip(text, position)
        if text[position : position + 1] != ":":
            raise PccsError(f"{member}: malformed object")
        start = _skip(text, position + 1)
        _, end = decoder.raw_decode(text, start)
        if key == member:
            return text[start:end].encode("utf-8"), signature
        position = _skip(text, end)
        if text[position : position + 1] != ",":
            raise PccsError(f"{member}: not found")  # pragma: no cover - checked above
        position += 1


def _skip(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _chain(headers: httpx.Headers, names: tuple[str, ...], what: str) -> str:
    for name in names:
        value = headers.get(name)
        if value is not None:
            return unquote(value)
    raise PccsError(f"{what}: response has no {names[0]} header")


def crl_hex(body: bytes, what: str) -> str:
    """A CRL body in any encoding a service uses (DER, PEM, hex DER) as hex DER."""
    try:
        if body[:1] == b"\x30":  # DER, as is: its last bytes may look like white space
            crl = x509.load_der_x509_crl(body)
        elif (stripped := body.strip()).startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(stripped)
        else:
            crl = x509.load_der_x509_crl(bytes.fromhex(stripped.decode("ascii")))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PccsError(f"{what}: not a CRL in DER, PEM or hex") from exc
    return crl.public_bytes(serialization.Encoding.DER).hex()


@dataclass(frozen=True, slots=True)
class _Response:
    body: bytes
    headers: httpx.Headers


class PccsClient:
    """An HTTPS client of one PCS/PCCS; use as ``async with PccsClient(url) as pccs``.

    Args:
        base_url: ``https://host[:port]`` (a path prefix is kept).
        ca: a PEM file of the CA(s) to verify the service with, instead of the system's.
        timeout: seconds for each request.
    """

    def __init__(
        self, base_url: str, *, ca: Path | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme != "https" or not url.host:
            raise ValueError(f"PCCS URL must be https://host[:port], not {base_url!r}")
        context = ssl.create_default_context(cafile=None if ca is None else str(ca))
        self.base_url = str(url).rstrip("/")
        self._client = httpx.AsyncClient(verify=context, timeout=timeout, follow_redirects=False)

    async def __aenter__(self) -> PccsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def _get(self, path: str, params: dict[str, str] | None = None) -> _Response:
        url = f"{self.base_url}{_BASE}/{path}"
        try:
            async with self._client.stream("GET", url, params=params) as response:
                if response.status_code != 200:
                    raise PccsError(f"GET {path}: HTTP {response.status_code}")
                declared = response.headers.get("content-length", "0")
                if not declared.isdigit() or int(declared) > MAX_RESPONSE_BYTES:
                    raise PccsError(f"GET {path}: response over {MAX_RESPONSE_BYTES} bytes")
                body = b""
                # Read to the end (httpx's stream is only cleanly closed when exhausted),
                # keeping no more than the limit: a chunked answer cannot grow memory.
                async for chunk in response.aiter_bytes():
                    if len(body) <= MAX_RESPONSE_BYTES:
                        body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise PccsError(f"GET {path}: response over {MAX_RESPONSE_BYTES} bytes")
                return _Response(body, response.headers)
        except httpx.HTTPError as exc:
            raise PccsError(f"GET {path}: {type(exc).__name__}: {exc}") from exc

    async def fetch(self, fmspc: bytes, *, ca: CaType = "processor") -> Collateral:
        """Everything a verifier needs for the platform ``fmspc`` whose PCK CA is ``ca``.

        Raises:
            PccsError: unreachable, an HTTP error, or a response that is not collateral.
        """
        return Collateral.from_json(await self.fetch_bundle(fmspc, ca=ca))

    async def fetch_bundle(self, fmspc: bytes, *, ca: CaType = "processor") -> str:
        """:meth:`fetch`, as the bundle's JSON text (what ``collateral fetch`` writes)."""
        if len(fmspc) != 6:
            raise ValueError("an FMSPC is 6 bytes")
        tcb = await self._get("tcb", {"fmspc": fmspc.hex().upper()})
        qe = await self._get("qe/identity")
        pck_crl = await self._get("pckcrl", {"ca": ca, "encoding": "der"})
        root_crl = await self._get("rootcacrl")
        tcb_body, tcb_signature = signed_member(tcb.body, "tcbInfo")
        qe_body, qe_signature = signed_member(qe.body, "enclaveIdentity")
        bundle = {
            "pck_crl_issuer_chain": _chain(pck_crl.headers, (_CRL_CHAIN_HEADER,), "PCK CRL"),
            "root_ca_crl": crl_hex(root_crl.body, "root CA CRL"),
            "pck_crl": crl_hex(pck_crl.body, "PCK CRL"),
            "tcb_info_issuer_chain": _chain(tcb.headers, _TCB_CHAIN_HEADERS, "TCB info"),
            "tcb_info": tcb_body.decode("utf-8"),
            "tcb_info_signature": tcb_signature,
            "qe_identity_issuer_chain": _chain(qe.headers, (_QE_CHAIN_HEADER,), "QE identity"),
            "qe_identity": qe_body.decode("utf-8"),
            "qe_identity_signature": qe_signature,
        }
        text = json.dumps(bundle, indent=1)
        try:
            parsed = Collateral.from_json(text)
        except DrmError as exc:
            raise PccsError(f"the service's answers are not collateral: {exc}") from exc
        if parsed.tcb_info.fmspc != fmspc:
            raise PccsError(
                f"asked for FMSPC {fmspc.hex().upper()}, got TCB info for "
                f"{parsed.tcb_info.fmspc.hex().upper()}"
            )
        return text
