"""Intel DCAP collateral: TCB info, QE identity, CRLs and their issuer chains.

Collateral is what a verifier needs beyond the quote to judge *how current* a platform is:
Intel's signed TCB info for the platform's FMSPC, Intel's signed identity of the Quoting
Enclave, and the CRLs of the PCK CA and the root CA. We read the JSON layout used by
Phala's ``dcap-qvl`` (``QuoteCollateralV3``), in which ``tcb_info`` and ``qe_identity`` are
the signed JSON bodies *as strings*, exactly the bytes Intel signed, so the signature is
checked over them as given and never over a re-serialisation.

Parsing here is strict (unknown or duplicated keys, wrong types, wrong sizes are refused)
but proves nothing: signatures, CRLs and dates are checked by
:func:`drm_wire.attestation.verify.verify_quote`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from cryptography import x509

from drm_wire.attestation._pck import x509_errors
from drm_wire.attestation.errors import CollateralError

__all__ = ["Collateral", "QeIdentity", "QeTcbLevel", "TcbInfo", "TcbLevel", "TcbStatus"]

#: Largest collateral document we parse. The real sample is 14 KiB; TCB info grows by a
#: few hundred bytes per TCB recovery, so 256 KiB leaves decades of room and bounds work.
MAX_COLLATERAL_BYTES = 256 * 1024

_T = TypeVar("_T")


class TcbStatus(StrEnum):
    """Intel's verdict on a TCB level, as spelled in TCB info and QE identity JSON."""

    #: Fully patched.
    UP_TO_DATE = "UpToDate"
    #: Patched, but the enclave software should add mitigations (e.g. LVI hardening).
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    #: Patched, but a BIOS/platform configuration is needed (e.g. hyper-threading off).
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    #: Both of the above.
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    #: A microcode or SGX PSW update is missing.
    OUT_OF_DATE = "OutOfDate"
    #: Out of date and a configuration is needed.
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    #: The platform's keys are revoked; never acceptable.
    REVOKED = "Revoked"


def _loads_strict(text: str | bytes, what: str) -> Any:
    """``json.loads`` that refuses duplicate keys: a signed document must have one meaning."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(items)
        if len(result) != len(items):
            raise CollateralError(f"{what}: duplicate key")
        return result

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CollateralError(f"{what}: not valid JSON") from exc


def _field(obj: Mapping[str, Any], key: str, kind: type[_T], what: str) -> _T:
    value = obj.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CollateralError(f"{what}: {key!r} missing or not {kind.__name__}")
    return value


def _keys(obj: object, required: set[str], optional: set[str], what: str) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise CollateralError(f"{what}: expected an object")
    missing = required - obj.keys()
    extra = obj.keys() - required - optional
    if missing or extra:
        raise CollateralError(f"{what}: missing {sorted(missing)} / unknown {sorted(extra)}")
    return obj


def _hex(obj: Mapping[str, Any], key: str, size: int, what: str) -> bytes:
    text = _field(obj, key, str, what)
    try:
        value = bytes.fromhex(text)
    except ValueError as exc:
        raise CollateralError(f"{what}: {key!r} is not hex") from exc
    if len(value) != size:
        raise CollateralError(f"{what}: {key!r} must be {size} bytes")
    return value


def _date(obj: Mapping[str, Any], key: str, what: str) -> datetime:
    text = _field(obj, key, str, what)
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CollateralError(f"{what}: {key!r} is not an ISO 8601 date") from exc
    if value.tzinfo is None:
        raise CollateralError(f"{what}: {key!r} has no time zone")
    return value.astimezone(UTC)


def _svn(value: object, what: str, bits: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise CollateralError(f"{what}: SVN out of range")
    return value


def _status(obj: Mapping[str, Any], what: str) -> TcbStatus:
    try:
        return TcbStatus(_field(obj, "tcbStatus", str, what))
    except ValueError as exc:
        raise CollateralError(f"{what}: unknown tcbStatus") from exc


def _advisories(obj: Mapping[str, Any], what: str) -> tuple[str, ...]:
    ids = obj.get("advisoryIDs", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise CollateralError(f"{what}: advisoryIDs must be a list of strings")
    return tuple(ids)


def _levels(obj: Mapping[str, Any], what: str, parse: Callable[[object], _T]) -> tuple[_T, ...]:
    levels = _field(obj, "tcbLevels", list, what)
    if not levels:
        raise CollateralError(f"{what}: no tcbLevels")
    return tuple(parse(level) for level in levels)


@dataclass(frozen=True, slots=True, kw_only=True)
class TcbLevel:
    """One row of TCB info: the minimum SVNs for a status."""

    sgx_components: tuple[int, ...]  # 16 CPU SVN components
    pcesvn: int
    tcb_date: datetime
    status: TcbStatus
    advisory_ids: tuple[str, ...]

    @classmethod
    def _from_json(cls, level: object, version: int) -> TcbLevel:
        what = "TCB info level"
        level = _keys(level, {"tcb", "tcbDate", "tcbStatus"}, {"advisoryIDs"}, what)
        tcb: Mapping[str, Any] = _field(level, "tcb", dict, what)
        if version == 2:
            names = [f"sgxtcbcomp{i:02d}svn" for i in range(1, 17)]
            tcb = _keys(tcb, {*names, "pcesvn"}, set(), what)
            components = [tcb[name] for name in names]
        else:
            tcb = _keys(tcb, {"sgxtcbcomponents", "pcesvn"}, set(), what)
            raw = _field(tcb, "sgxtcbcomponents", list, what)
            components = [_field(_keys(c, {"svn"}, {"category", "type"}, what), "svn", int, what)
                          for c in raw]  # fmt: skip
        if len(components) != 16:
            raise CollateralError(f"{what}: need 16 SGX TCB components")
        return cls(
            sgx_components=tuple(_svn(c, what, 8) for c in components),
            pcesvn=_svn(tcb["pcesvn"], what, 16),
            tcb_date=_date(level, "tcbDate", what),
            status=_status(level, what),
            advisory_ids=_advisories(level, what),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TcbInfo:
    """Intel's TCB info for one FMSPC (SGX, version 2 or 3), levels best first."""

    version: int
    issue_date: datetime
    next_update: datetime
    fmspc: bytes
    pce_id: bytes
    tcb_evaluation_data_number: int
    tcb_levels: tuple[TcbLevel, ...]

    @classmethod
    def from_json(cls, text: str | bytes) -> TcbInfo:
        """Parse the signed TCB info body. Raises :class:`CollateralError`."""
        what = "TCB info"
        obj = _loads_strict(text, what)
        common = {"version", "issueDate", "nextUpdate", "fmspc", "pceId", "tcbType",
                  "tcbEvaluationDataNumber", "tcbLevels"}  # fmt: skip
        version = _field(obj if isinstance(obj, dict) else {}, "version", int, what)
        if version not in (2, 3):
            raise CollateralError(f"{what}: version {version} is not supported")
        obj = _keys(obj, common | ({"id"} if version == 3 else set()), set(), what)
        if version == 3 and obj["id"] != "SGX":
            raise CollateralError(f"{what}: id {obj['id']!r} is not SGX")
        if _field(obj, "tcbType", int, what) != 0:
            raise CollateralError(f"{what}: tcbType must be 0")
        return cls(
            version=version,
            issue_date=_date(obj, "issueDate", what),
            next_update=_date(obj, "nextUpdate", what),
            fmspc=_hex(obj, "fmspc", 6, what),
            pce_id=_hex(obj, "pceId", 2, what),
            tcb_evaluation_data_number=_field(obj, "tcbEvaluationDataNumber", int, what),
            tcb_levels=_levels(obj, what, lambda level: TcbLevel._from_json(level, version)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class QeTcbLevel:
    """One row of QE identity: the minimum QE ISVSVN for a status."""

    isvsvn: int
    tcb_date: datetime
    status: TcbStatus
    advisory_ids: tuple[str, ...]

    @classmethod
    def _from_json(cls, level: object) -> QeTcbLevel:
        what = "QE identity level"
        level = _keys(level, {"tcb", "tcbDate", "tcbStatus"}, {"advisoryIDs"}, what)
        tcb = _keys(level["tcb"], {"isvsvn"}, set(), what)
        return cls(
            isvsvn=_svn(tcb["isvsvn"], what, 16),
            tcb_date=_date(level, "tcbDate", what),
            status=_status(level, what),
            advisory_ids=_advisories(level, what),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class QeIdentity:
    """Intel's identity of its Quoting Enclave (``id`` "QE", version 2)."""

    issue_date: datetime
    next_update: datetime
    miscselect: int
    miscselect_mask: int
    attributes: bytes  # 16 bytes: flags then xfrm, little-endian, as in the report
    attributes_mask: bytes
    mrsigner: bytes
    isvprodid: int
    tcb_levels: tuple[QeTcbLevel, ...]

    @classmethod
    def from_json(cls, text: str | bytes) -> QeIdentity:
        """Parse the signed QE identity body. Raises :class:`CollateralError`."""
        what = "QE identity"
        keys = {"id", "version", "issueDate", "nextUpdate", "tcbEvaluationDataNumber",
                "miscselect", "miscselectMask", "attributes", "attributesMask", "mrsigner",
                "isvprodid", "tcbLevels"}  # fmt: skip
        obj = _keys(_loads_strict(text, what), keys, set(), what)
        if obj["id"] != "QE" or obj["version"] != 2:
            raise CollateralError(f"{what}: need id 'QE' version 2")
        return cls(
            issue_date=_date(obj, "issueDate", what),
            next_update=_date(obj, "nextUpdate", what),
            miscselect=int.from_bytes(_hex(obj, "miscselect", 4, what), "big"),
            miscselect_mask=int.from_bytes(_hex(obj, "miscselectMask", 4, what), "big"),
            attributes=_hex(obj, "attributes", 16, what),
            attributes_mask=_hex(obj, "attributesMask", 16, what),
            mrsigner=_hex(obj, "mrsigner", 32, what),
            isvprodid=_svn(obj["isvprodid"], what, 16),
            tcb_levels=_levels(obj, what, QeTcbLevel._from_json),
        )


def _chain(obj: Mapping[str, Any], key: str) -> tuple[x509.Certificate, ...]:
    """Load a PEM chain and touch every lazily parsed part, so later use cannot fail."""
    text = _field(obj, key, str, "collateral")
    with x509_errors(CollateralError, f"collateral {key!r}"):
        certs = x509.load_pem_x509_certificates(text.encode("ascii"))
        for cert in certs:
            _ = (cert.subject, cert.issuer, cert.public_key(), cert.serial_number)
            _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, list(cert.extensions))
    if len(certs) < 2:
        raise CollateralError(f"collateral: {key!r} needs a signer and a root")
    return tuple(certs)


def _crl(obj: Mapping[str, Any], key: str) -> x509.CertificateRevocationList:
    """Load a CRL (hex DER or PEM) and touch every lazily parsed part."""
    text = _field(obj, key, str, "collateral")
    with x509_errors(CollateralError, f"collateral {key!r}"):
        if text.startswith("-----BEGIN"):
            crl = x509.load_pem_x509_crl(text.encode("ascii"))
        else:
            crl = x509.load_der_x509_crl(bytes.fromhex(text))
        _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc, list(crl.extensions))
        for revoked in crl:
            _ = (revoked.serial_number, revoked.revocation_date_utc, list(revoked.extensions))
    return crl


@dataclass(frozen=True, slots=True, kw_only=True)
class Collateral:
    """Everything :func:`~drm_wire.attestation.verify.verify_quote` needs for TCB status.

    ``tcb_info_body`` and ``qe_identity_body`` are the exact signed bytes.
    """

    tcb_info: TcbInfo
    tcb_info_body: bytes
    tcb_info_signature: bytes
    tcb_info_issuer_chain: tuple[x509.Certificate, ...]
    qe_identity: QeIdentity
    qe_identity_body: bytes
    qe_identity_signature: bytes
    qe_identity_issuer_chain: tuple[x509.Certificate, ...]
    pck_crl: x509.CertificateRevocationList
    pck_crl_issuer_chain: tuple[x509.Certificate, ...]
    root_ca_crl: x509.CertificateRevocationList

    @classmethod
    def from_json(cls, data: bytes | str) -> Collateral:
        """Load the ``dcap-qvl`` JSON collateral format, strictly.

        Raises:
            CollateralError: not JSON, a key missing, unknown or duplicated, a value of the
                wrong type or size, a body that is not valid TCB info / QE identity JSON.
        """
        if len(data) > MAX_COLLATERAL_BYTES:
            raise CollateralError(f"collateral larger than {MAX_COLLATERAL_BYTES} bytes")
        keys = {"pck_crl_issuer_chain", "root_ca_crl", "pck_crl", "tcb_info_issuer_chain",
                "tcb_info", "tcb_info_signature", "qe_identity_issuer_chain", "qe_identity",
                "qe_identity_signature"}  # fmt: skip
        obj = _keys(
            _loads_strict(data, "collateral"), keys, {"pck_certificate_chain"}, "collateral"
        )
        tcb_body = _field(obj, "tcb_info", str, "collateral").encode("utf-8", "surrogatepass")
        qe_body = _field(obj, "qe_identity", str, "collateral").encode("utf-8", "surrogatepass")
        return cls(
            tcb_info=TcbInfo.from_json(tcb_body),
            tcb_info_body=tcb_body,
            tcb_info_signature=_hex(obj, "tcb_info_signature", 64, "collateral"),
            tcb_info_issuer_chain=_chain(obj, "tcb_info_issuer_chain"),
            qe_identity=QeIdentity.from_json(qe_body),
            qe_identity_body=qe_body,
            qe_identity_signature=_hex(obj, "qe_identity_signature", 64, "collateral"),
            qe_identity_issuer_chain=_chain(obj, "qe_identity_issuer_chain"),
            pck_crl=_crl(obj, "pck_crl"),
            pck_crl_issuer_chain=_chain(obj, "pck_crl_issuer_chain"),
            root_ca_crl=_crl(obj, "root_ca_crl"),
        )
