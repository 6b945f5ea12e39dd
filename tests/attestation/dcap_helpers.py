"""Real DCAP test data, and a small test PKI that makes quotes and collateral like Intel's.

The real Intel-signed quote and collateral (``tests/data/sgx/``) anchor the tests. For the
cases real data cannot show (a revoked PCK certificate, an untrusted root, a wrong issuer, a
quote signed by another key, other TCB levels), :class:`TestPki` builds the same structures
with locally generated P-256 keys: root -> PCK CA -> PCK leaf (with an SGX extension), a TCB
signing certificate, CRLs, TCB info and QE identity JSON signed like Intel's.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from drm_wire.attestation.qe_identity import INTEL_QE_IDENTITY, PinnedQeIdentity
from drm_wire.attestation.quote import (
    ATTRIBUTE_INIT,
    ATTRIBUTE_MODE64BIT,
    QuoteHeader,
    ReportBody,
    build_quote,
)
from drm_wire.attestation.verify import TrustAnchors

DATA = Path(__file__).resolve().parent.parent / "data"
QUOTE_PATH = DATA / "sgx" / "dcap_v3_quote.bin"
COLLATERAL_PATH = DATA / "sgx" / "dcap_v3_quote_collateral.json"

#: Inside every validity window of the real collateral (TCB info and QE identity
#: 2025-06-19..2025-07-19, PCK CRL 2025-06-19..2025-07-19, root CRL to 2026-04-03).
REAL_NOW = datetime(2025, 7, 1, tzinfo=UTC)
#: "now" for the test PKI below.
SIM_NOW = datetime(2026, 1, 1, tzinfo=UTC)

QE_MRSIGNER = bytes(range(32))
FMSPC = bytes.fromhex("00906ed50000")
PCE_ID = bytes(2)
PLATFORM_SVNS = (5, 5, 2, 2, 255, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0)
PLATFORM_PCESVN = 11
QE_AUTH = bytes(range(32))
#: The test PKI's Quoting Enclave: Intel's attributes and masks, a test MRSIGNER.
TEST_QE_IDENTITY = PinnedQeIdentity(
    mrsigner=QE_MRSIGNER,
    isvprodid=1,
    miscselect=0,
    miscselect_mask=0xFFFFFFFF,
    attributes=INTEL_QE_IDENTITY.attributes,
    attributes_mask=INTEL_QE_IDENTITY.attributes_mask,
)


def real_quote() -> bytes:
    return QUOTE_PATH.read_bytes()


def real_collateral_text() -> str:
    return COLLATERAL_PATH.read_text()


def pem_of(der: bytes) -> bytes:
    lines = base64.encodebytes(der).split()
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


def raw_signature(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    """ECDSA P-256/SHA-256 signature as r||s, the quote and collateral form."""
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


# --- a tiny DER writer for the SGX extension ---------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _der(0x06, bytes(out))


def _int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def sgx_extension(fmspc: bytes, svns: tuple[int, ...], pcesvn: int, pce_id: bytes) -> bytes:
    """DER of Intel's SGX extension, in the layout real PCK certificates use."""
    base = "1.2.840.113741.1.13.1"
    tcb = [_der(0x30, _oid(f"{base}.2.{i + 1}") + _int(svn)) for i, svn in enumerate(svns)]
    tcb.append(_der(0x30, _oid(f"{base}.2.17") + _int(pcesvn)))
    tcb.append(_der(0x30, _oid(f"{base}.2.18") + _der(0x04, bytes(svns))))
    items = [
        _der(0x30, _oid(f"{base}.1") + _der(0x04, bytes(16))),
        _der(0x30, _oid(f"{base}.2") + _der(0x30, b"".join(tcb))),
        _der(0x30, _oid(f"{base}.3") + _der(0x04, pce_id)),
        _der(0x30, _oid(f"{base}.4") + _der(0x04, fmspc)),
        _der(0x30, _oid(f"{base}.5") + _der(0x0A, b"\x00")),
    ]
    return _der(0x30, b"".join(items))


# --- the test PKI ---------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool | None,
    path_length: int | None = None,
    not_before: datetime = datetime(2025, 1, 1, tzinfo=UTC),
    not_after: datetime = datetime(2030, 1, 1, tzinfo=UTC),
    extra: bytes | None = None,
    key_usage: x509.KeyUsage | None = None,
) -> x509.Certificate:
    """A certificate for ``key``, signed by ``issuer`` (or self-signed when ``None``)."""
    issuer_name, signer = (_name(cn), key) if issuer is None else (issuer[0].subject, issuer[1])
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if ca is not None:
        constraints = x509.BasicConstraints(ca=ca, path_length=path_length if ca else None)
        builder = builder.add_extension(constraints, critical=True)
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    if extra is not None:
        oid = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, extra), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _date(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class TestPki:
    """Root, PCK CA, PCK leaf, TCB signer and attestation key, all local."""

    __test__ = False  # not a pytest class

    root_key: ec.EllipticCurvePrivateKey = field(default_factory=_key)
    ca_key: ec.EllipticCurvePrivateKey = field(default_factory=_key)
    leaf_key: ec.EllipticCurvePrivateKey = field(default_factory=_key)
    tcb_key: ec.EllipticCurvePrivateKey = field(default_factory=_key)
    att_key: ec.EllipticCurvePrivateKey = field(default_factory=_key)
    svns: tuple[int, ...] = PLATFORM_SVNS
    pcesvn: int = PLATFORM_PCESVN
    leaf_ca: bool = False

    def __post_init__(self) -> None:
        self.root = make_cert("Test SGX Root CA", self.root_key, None, ca=True, path_length=1)
        self.ca = make_cert(
            "Test PCK CA", self.ca_key, (self.root, self.root_key), ca=True, path_length=0
        )
        ext = sgx_extension(FMSPC, self.svns, self.pcesvn, PCE_ID)
        self.leaf = make_cert(
            "Test PCK Certificate",
            self.leaf_key,
            (self.ca, self.ca_key),
            ca=self.leaf_ca,
            extra=ext,
        )
        self.tcb = make_cert("Test TCB Signing", self.tcb_key, (self.root, self.root_key), ca=False)

    def trust(self) -> TrustAnchors:
        """Test-only trust anchors: this root as a simulation root, with the test QE pinned."""
        return TrustAnchors(simulation_root=self.root, simulation_qe_identity=TEST_QE_IDENTITY)

    def as_intel(self) -> TrustAnchors:
        """Test-only trust anchors: this root in place of Intel's, with the test QE pinned."""
        return TrustAnchors(
            intel_root_public_key=self.root_key.public_key(), intel_qe_identity=TEST_QE_IDENTITY
        )

    def chain_pem(self, *certs: x509.Certificate) -> bytes:
        chosen = certs or (self.leaf, self.ca, self.root)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chosen) + b"\0"

    def qe_report(self, *, isv_svn: int = 8, auth: bytes = QE_AUTH, **kw: Any) -> ReportBody:
        binding = hashlib.sha256(raw_public(self.att_key) + auth).digest() + bytes(32)
        fields: dict[str, Any] = {
            "cpu_svn": bytes(16),
            "misc_select": 0,
            "isv_ext_prod_id": bytes(16),
            "attributes_flags": 0x11,
            "attributes_xfrm": 0,
            "mr_enclave": bytes(32),
            "mr_signer": QE_MRSIGNER,
            "config_id": bytes(64),
            "isv_prod_id": 1,
            "isv_svn": isv_svn,
            "config_svn": 0,
            "isv_family_id": bytes(16),
            "report_data": binding,
        }
        fields.update(kw)
        return ReportBody(**fields)

    def quote(
        self,
        *,
        version: int = 3,
        report_data: bytes = b"\x42" * 64,
        quote_signer: ec.EllipticCurvePrivateKey | None = None,
        qe_signer: ec.EllipticCurvePrivateKey | None = None,
        qe_report: ReportBody | None = None,
        auth: bytes = QE_AUTH,
        chain: bytes | None = None,
        vendor: bytes = b"\x01" * 16,
    ) -> bytes:
        """A quote in Intel's format, signed by this PKI (overridable for hostile cases)."""
        header = QuoteHeader(
            version=version,
            attestation_key_type=2,
            tee_type=0,
            qe_svn=8,
            pce_svn=11,
            qe_vendor_id=vendor,
            user_data=bytes(20),
        )
        body = ReportBody(
            cpu_svn=bytes(16),
            misc_select=0,
            isv_ext_prod_id=bytes(16),
            attributes_flags=ATTRIBUTE_INIT | ATTRIBUTE_MODE64BIT,
            attributes_xfrm=3,
            mr_enclave=b"\xee" * 32,
            mr_signer=b"\x55" * 32,
            config_id=bytes(64),
            isv_prod_id=7,
            isv_svn=2,
            config_svn=0,
            isv_family_id=bytes(16),
            report_data=report_data,
        )
        qe = qe_report or self.qe_report(auth=auth)
        return build_quote(
            header=header,
            body=body,
            signature=raw_signature(
                quote_signer or self.att_key, header.to_bytes() + body.to_bytes()
            ),
            attestation_key=raw_public(self.att_key),
            qe_report=qe,
            qe_report_signature=raw_signature(qe_signer or self.leaf_key, qe.to_bytes()),
            qe_auth_data=auth,
            pck_chain_pem=self.chain_pem() if chain is None else chain,
        )

    def crl(
        self, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], revoked: tuple[int, ...]
    ) -> str:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer[0].subject)
            .last_update(SIM_NOW - timedelta(days=10))
            .next_update(SIM_NOW + timedelta(days=20))
        )
        for serial in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(serial)
            builder = builder.add_revoked_certificate(entry.revocation_date(SIM_NOW).build())
        return (
            builder.sign(issuer[1], hashes.SHA256()).public_bytes(serialization.Encoding.DER).hex()
        )

    def collateral(
        self,
        *,
        tcb_levels: Sequence[tuple[tuple[int, ...], int, str]] | None = None,
        qe_levels: Sequence[tuple[int, str]] | None = None,
        revoke_leaf: bool = False,
        revoke_ca: bool = False,
        fmspc: bytes = FMSPC,
        mrsigner: bytes = QE_MRSIGNER,
        issue: datetime = SIM_NOW - timedelta(days=5),
        next_update: datetime = SIM_NOW + timedelta(days=25),
        tcb_signer: ec.EllipticCurvePrivateKey | None = None,
        evaluation_number: int = 17,
    ) -> str:
        """Collateral JSON in the dcap-qvl layout, signed by this PKI."""
        levels = tcb_levels or [(self.svns, self.pcesvn, "UpToDate")]
        tcb_info = {
            "id": "SGX",
            "version": 3,
            "issueDate": _date(issue),
            "nextUpdate": _date(next_update),
            "fmspc": fmspc.hex().upper(),
            "pceId": PCE_ID.hex(),
            "tcbType": 0,
            "tcbEvaluationDataNumber": evaluation_number,
            "tcbLevels": [
                {
                    "tcb": {"sgxtcbcomponents": [{"svn": s} for s in svns], "pcesvn": pce},
                    "tcbDate": "2025-01-01T00:00:00Z",
                    "tcbStatus": status,
                    "advisoryIDs": [f"TEST-SA-{i}"],
                }
                for i, (svns, pce, status) in enumerate(levels)
            ],
        }
        qe_identity = {
            "id": "QE",
            "version": 2,
            "issueDate": _date(issue),
            "nextUpdate": _date(next_update),
            "tcbEvaluationDataNumber": evaluation_number,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": mrsigner.hex().upper(),
            "isvprodid": 1,
            "tcbLevels": [
                {"tcb": {"isvsvn": svn}, "tcbDate": "2025-01-01T00:00:00Z", "tcbStatus": status}
                for svn, status in (qe_levels or [(8, "UpToDate"), (2, "OutOfDate")])
            ],
        }
        tcb_body, qe_body = json.dumps(tcb_info), json.dumps(qe_identity)
        signer = tcb_signer or self.tcb_key
        tcb_chain = (
            self.tcb.public_bytes(serialization.Encoding.PEM)
            + self.root.public_bytes(serialization.Encoding.PEM)
        ).decode()
        ca_chain = (
            self.ca.public_bytes(serialization.Encoding.PEM)
            + self.root.public_bytes(serialization.Encoding.PEM)
        ).decode()
        return json.dumps(
            {
                "pck_crl_issuer_chain": ca_chain,
                "root_ca_crl": self.crl(
                    (self.root, self.root_key), (self.ca.serial_number,) if revoke_ca else ()
                ),
                "pck_crl": self.crl(
                    (self.ca, self.ca_key), (self.leaf.serial_number,) if revoke_leaf else ()
                ),
                "tcb_info_issuer_chain": tcb_chain,
                "tcb_info": tcb_body,
                "tcb_info_signature": raw_signature(signer, tcb_body.encode()).hex(),
                "qe_identity_issuer_chain": tcb_chain,
                "qe_identity": qe_body,
                "qe_identity_signature": raw_signature(signer, qe_body.encode()).hex(),
            }
        )
