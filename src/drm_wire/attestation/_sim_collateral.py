"""INSECURE simulation: the simulated platform's SGX extension and its signed collateral.

A simulated platform (:mod:`.insecure_simulation`) is judged by the same code as a real
one, collateral included, so the demo and the end-to-end tests run the production path:
its PCK certificate carries Intel's SGX extension (FMSPC, PCE-ID, TCB SVNs), and it issues
TCB info, a QE identity (its own QE, :data:`~.qe_identity.SIMULATED_QE_IDENTITY`) and CRLs
in Intel's formats, signed by a TCB signing certificate under its own root. Nothing here
is trusted unless a verifier names that root explicitly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from pyasn1.codec.der import encoder
from pyasn1.type import namedtype, univ

from drm_wire.attestation._pck import SGX_EXTENSION_OID
from drm_wire.attestation.qe_identity import SIMULATED_QE_IDENTITY

#: The simulated platform's FMSPC: "SIMFMS" in ASCII, recognisable in any dump.
SIMULATED_FMSPC: Final = b"SIMFMS"
SIMULATED_PCE_ID: Final = bytes(2)
#: Its TCB: every CPU SVN component 1, PCESVN 1 (the quote header says the same).
SIMULATED_SVNS: Final = (1,) * 16
SIMULATED_PCESVN: Final = 1
SIMULATED_QE_SVN: Final = 1
#: How long issued TCB info and QE identity stay current (Intel's are a month, too).
COLLATERAL_VALIDITY: Final = timedelta(days=30)
_EVALUATION_DATA_NUMBER: Final = 1


class _Pair(univ.Sequence):  # type: ignore[misc]  # pyasn1 ships no types
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("id", univ.ObjectIdentifier()),
        namedtype.NamedType("value", univ.Any()),
    )


def _pair(arc: str, value: univ.Asn1Item | bytes) -> _Pair:
    pair = _Pair()
    pair["id"] = univ.ObjectIdentifier(f"{SGX_EXTENSION_OID.dotted_string}.{arc}")
    pair["value"] = univ.Any(value if isinstance(value, bytes) else encoder.encode(value))
    return pair


def _sequence(pairs: Sequence[_Pair]) -> bytes:
    outer = univ.SequenceOf(componentType=_Pair())
    for index, pair in enumerate(pairs):
        outer[index] = pair
    return bytes(encoder.encode(outer))


def sgx_extension() -> x509.UnrecognizedExtension:
    """Intel's SGX extension (OID 1.2.840.113741.1.13.1) for the simulated PCK leaf."""
    tcb = [_pair(f"2.{i + 1}", univ.Integer(svn)) for i, svn in enumerate(SIMULATED_SVNS)]
    tcb.append(_pair("2.17", univ.Integer(SIMULATED_PCESVN)))
    tcb.append(_pair("2.18", univ.OctetString(bytes(SIMULATED_SVNS))))
    value = _sequence(
        [
            _pair("1", univ.OctetString(bytes(16))),  # PPID
            _pair("2", _sequence(tcb)),
            _pair("3", univ.OctetString(SIMULATED_PCE_ID)),
            _pair("4", univ.OctetString(SIMULATED_FMSPC)),
            _pair("5", univ.Enumerated(0)),  # SGX type: standard
        ]
    )
    return x509.UnrecognizedExtension(SGX_EXTENSION_OID, value)


def crl(
    issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, start: datetime, end: datetime
) -> bytes:
    """An empty CRL (DER) of ``issuer``, current from ``start`` to ``end``."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(start)
        .next_update(end)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _date(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _signature(key: ec.EllipticCurvePrivateKey, body: str) -> str:
    r, s = decode_dss_signature(key.sign(body.encode(), ec.ECDSA(hashes.SHA256())))
    return (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()


def collateral_json(
    *,
    now: datetime,
    tcb_key: ec.EllipticCurvePrivateKey,
    tcb_chain: Sequence[x509.Certificate],
    pck_ca_chain: Sequence[x509.Certificate],
    root_crl: bytes,
    pck_crl: bytes,
) -> str:
    """The platform's collateral bundle, issued at ``now``, current for a month."""
    issue, next_update = now - timedelta(minutes=5), now + COLLATERAL_VALIDITY
    identity = SIMULATED_QE_IDENTITY
    level_date = "2026-01-01T00:00:00Z"
    tcb_info = {
        "id": "SGX",
        "version": 3,
        "issueDate": _date(issue),
        "nextUpdate": _date(next_update),
        "fmspc": SIMULATED_FMSPC.hex().upper(),
        "pceId": SIMULATED_PCE_ID.hex().upper(),
        "tcbType": 0,
        "tcbEvaluationDataNumber": _EVALUATION_DATA_NUMBER,
        "tcbLevels": [
            {
                "tcb": {
                    "sgxtcbcomponents": [{"svn": svn} for svn in SIMULATED_SVNS],
                    "pcesvn": SIMULATED_PCESVN,
                },
                "tcbDate": level_date,
                "tcbStatus": "UpToDate",
            }
        ],
    }
    qe_identity = {
        "id": "QE",
        "version": 2,
        "issueDate": _date(issue),
        "nextUpdate": _date(next_update),
        "tcbEvaluationDataNumber": _EVALUATION_DATA_NUMBER,
        "miscselect": f"{identity.miscselect:08X}",
        "miscselectMask": f"{identity.miscselect_mask:08X}",
        "attributes": identity.attributes.hex().upper(),
        "attributesMask": identity.attributes_mask.hex().upper(),
        "mrsigner": identity.mrsigner.hex().upper(),
        "isvprodid": identity.isvprodid,
        "tcbLevels": [
            {
                "tcb": {"isvsvn": SIMULATED_QE_SVN},
                "tcbDate": level_date,
                "tcbStatus": "UpToDate",
            }
        ],
    }
    tcb_body = json.dumps(tcb_info, separators=(",", ":"))
    qe_body = json.dumps(qe_identity, separators=(",", ":"))

    def pem(certs: Sequence[x509.Certificate]) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)

    return json.dumps(
        {
            "pck_crl_issuer_chain": pem(pck_ca_chain),
            "root_ca_crl": root_crl.hex(),
            "pck_crl": pck_crl.hex(),
            "tcb_info_issuer_chain": pem(tcb_chain),
            "tcb_info": tcb_body,
            "tcb_info_signature": _signature(tcb_key, tcb_body),
            "qe_identity_issuer_chain": pem(tcb_chain),
            "qe_identity": qe_body,
            "qe_identity_signature": _signature(tcb_key, qe_body),
        }
    )
