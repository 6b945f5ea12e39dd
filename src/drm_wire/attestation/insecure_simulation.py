"""INSECURE simulated SGX platform: quotes in the real DCAP v3 layout, signed by local keys.

Everything here exists so the product can run, and be tested end to end, without SGX
hardware. A simulated quote proves nothing about the code that produced it: whoever holds
the files in the platform directory can sign any measurement. That is why

* the module name says so, and every :meth:`SimulatedPlatform.create`, ``load`` and
  ``quote`` logs ``insecure_simulation_used`` at warning level (structlog; not
  ``warnings.warn``, which the test suite turns into errors);
* the certificates are called SIMULATED and chain to a locally made root that a verifier
  accepts only when given it explicitly
  (``TrustAnchors(simulation_root=...)`` / ``[simulation] trust_root`` in a policy), and
  then marks the result ``simulated=True``;
* the Quoting Enclave vendor id is :data:`SIMULATED_QE_VENDOR_ID`, not Intel's.

The layout is bit-for-bit Intel's (Intel SGX ECDSA Quote Library API, appendix A), assembled by
:func:`~drm_wire.attestation.quote.build_quote`: header, report body, quote signature by
the attestation key over ``quote[0:432]``, attestation key X||Y, QE report whose
report_data binds SHA-256(attestation key || QE auth data), QE report signature by the
PCK-like leaf, QE auth data, certification data type 5 (PEM leaf || intermediate || root,
NUL-terminated). Directory layout: ``sim-root.pem``, ``sim-intermediate.pem``,
``sim-pck.pem``, ``sim-tcb-signing.pem``, the CRLs ``sim-root-ca.crl`` and
``sim-pck-ca.crl`` (public) and ``sim-pck.key``, ``sim-attestation.key``,
``sim-tcb-signing.key`` (mode 0600).

The platform also issues its own collateral (:meth:`SimulatedPlatform.collateral`, see
:mod:`._sim_collateral`): its PCK leaf carries Intel's SGX extension and a TCB signing
certificate under its root signs TCB info and a QE identity, so a simulated quote gets a
TCB verdict through the same code as a real one. The CRLs are signed once, at creation,
for the platform's whole validity, and the root and intermediate keys are still discarded.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, final

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from drm_wire.attestation import _sim_collateral
from drm_wire.attestation.qe_identity import SIMULATED_QE_MR_ENCLAVE, SIMULATED_QE_MR_SIGNER
from drm_wire.attestation.quote import (
    ATTESTATION_KEY_TYPE_ECDSA_P256,
    ATTRIBUTE_DEBUG,
    ATTRIBUTE_INIT,
    ATTRIBUTE_MODE64BIT,
    TEE_TYPE_SGX,
    QuoteHeader,
    ReportBody,
    build_quote,
)
from drm_wire.attestation.ratls_cert import QuoteProvider
from drm_wire.attestation.verify import TrustAnchors
from drm_wire.errors import ConfigError

__all__ = ["SIMULATED_QE_VENDOR_ID", "SimulatedPlatform"]

#: 16 bytes, deliberately readable: a simulated quote is recognisable in a hex dump.
SIMULATED_QE_VENDOR_ID: Final = b"DRM-SIMULATED-QE"
ROOT_FILE: Final = "sim-root.pem"
_INTERMEDIATE_FILE: Final = "sim-intermediate.pem"
_PCK_FILE: Final = "sim-pck.pem"
_PCK_KEY_FILE: Final = "sim-pck.key"
_ATTESTATION_KEY_FILE: Final = "sim-attestation.key"
_TCB_FILE: Final = "sim-tcb-signing.pem"
_TCB_KEY_FILE: Final = "sim-tcb-signing.key"
_ROOT_CRL_FILE: Final = "sim-root-ca.crl"
_PCK_CRL_FILE: Final = "sim-pck-ca.crl"
_QE_AUTH_DATA: Final = bytes(range(32))  # what Intel's QE puts there, for realism
_SIG: Final = ec.ECDSA(hashes.SHA256())

_log = structlog.get_logger(__name__)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "drm-wire INSECURE SIMULATION"),
        ]
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    path_length: int | None,
    ca: bool,
    not_before: datetime,
    not_after: datetime,
    extra: x509.UnrecognizedExtension | None = None,
) -> x509.Certificate:
    public = key.public_key()
    issuer_name = issuer[0].subject if issuer else _name(subject)
    signer = issuer[1] if issuer else key
    usage = dict.fromkeys(
        ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
         "encipher_only", "decipher_only"),
        False,
    )  # fmt: skip
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .public_key(public)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **usage),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )
    if extra is not None:
        builder = builder.add_extension(extra, critical=False)
    return builder.sign(signer, hashes.SHA256())


def _raw_signature(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, _SIG))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _report(
    *,
    flags: int,
    xfrm: int,
    misc_select: int,
    mr_enclave: bytes,
    mr_signer: bytes,
    isv_prod_id: int,
    isv_svn: int,
    report_data: bytes,
) -> ReportBody:
    return ReportBody(
        cpu_svn=bytes(16),
        misc_select=misc_select,
        isv_ext_prod_id=bytes(16),
        attributes_flags=flags,
        attributes_xfrm=xfrm,
        mr_enclave=mr_enclave,
        mr_signer=mr_signer,
        config_id=bytes(64),
        isv_prod_id=isv_prod_id,
        isv_svn=isv_svn,
        config_svn=0,
        isv_family_id=bytes(16),
        report_data=report_data,
    )


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@final
@dataclass(frozen=True, slots=True, eq=False)
class SimulatedPlatform:
    """A simulated SGX machine: a PCK-like chain and an attestation key, on disk.

    Make one with :meth:`create` or :meth:`load`, never directly.
    """

    directory: Path
    root_certificate: x509.Certificate
    intermediate_certificate: x509.Certificate
    pck_certificate: x509.Certificate
    _pck_key: ec.EllipticCurvePrivateKey
    _attestation_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(
        cls,
        directory: str | Path,
        *,
        now: datetime | None = None,
        valid_for: timedelta = timedelta(days=3650),
    ) -> SimulatedPlatform:
        """Generate root -> intermediate -> PCK leaf (P-256) and an attestation key.

        The root and intermediate private keys are discarded: nothing can issue another
        PCK certificate under this root, so only this directory can produce quotes.

        Raises:
            FileExistsError: the directory already holds a platform.
        """
        path = Path(directory)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        start = (now or datetime.now(UTC)) - timedelta(hours=1)
        validity: dict[str, Any] = {"not_before": start, "not_after": start + valid_for}
        root_key, mid_key, pck_key, att_key, tcb_key = (
            ec.generate_private_key(ec.SECP256R1()) for _ in range(5)
        )
        root = _certificate("SIMULATED SGX Root CA (INSECURE)", root_key, None,
                            path_length=1, ca=True, **validity)  # fmt: skip
        mid = _certificate("SIMULATED SGX PCK Platform CA (INSECURE)", mid_key, (root, root_key),
                           path_length=0, ca=True, **validity)  # fmt: skip
        pck = _certificate("SIMULATED SGX PCK Certificate (INSECURE)", pck_key, (mid, mid_key),
                           path_length=None, ca=False, **validity,
                           extra=_sim_collateral.sgx_extension())  # fmt: skip
        tcb = _certificate("SIMULATED SGX TCB Signing (INSECURE)", tcb_key, (root, root_key),
                           path_length=None, ca=False, **validity)  # fmt: skip
        pem = serialization.Encoding.PEM
        crl_window = (validity["not_before"], validity["not_after"])
        _write(path / _ROOT_CRL_FILE, _sim_collateral.crl(root, root_key, *crl_window),
               secret=False)  # fmt: skip
        _write(path / _PCK_CRL_FILE, _sim_collateral.crl(mid, mid_key, *crl_window),
               secret=False)  # fmt: skip
        _write(path / _TCB_KEY_FILE, _key_pem(tcb_key), secret=True)
        _write(path / _TCB_FILE, tcb.public_bytes(pem), secret=False)
        _write(path / _PCK_KEY_FILE, _key_pem(pck_key), secret=True)
        _write(path / _ATTESTATION_KEY_FILE, _key_pem(att_key), secret=True)
        _write(path / _PCK_FILE, pck.public_bytes(pem), secret=False)
        _write(path / _INTERMEDIATE_FILE, mid.public_bytes(pem), secret=False)
        _write(path / ROOT_FILE, root.public_bytes(pem), secret=False)
        _log.warning("insecure_simulation_used", action="create_platform", directory=str(path))
        return cls(path, root, mid, pck, pck_key, att_key)

    def collateral(self, *, now: datetime | None = None) -> str:
        """This platform's collateral bundle (TCB info, QE identity, CRLs), issued ``now``.

        It is in the bundle format verifiers read, signed under this platform's root, and
        current for :data:`~._sim_collateral.COLLATERAL_VALIDITY`.

        Raises:
            ConfigError: the platform was made by a release that issued no collateral (its
                directory has no TCB signing key): make a new one.
        """

        def read(name: str) -> bytes:
            try:
                return (self.directory / name).read_bytes()
            except OSError as exc:
                raise ConfigError(
                    "this simulated platform issues no collateral (made by an older release); "
                    "make a new simulation directory",
                    path=str(self.directory / name),
                ) from exc

        try:
            tcb_key = serialization.load_pem_private_key(read(_TCB_KEY_FILE), None)
            tcb = x509.load_pem_x509_certificate(read(_TCB_FILE))
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                "simulated TCB signing files do not parse", path=str(self.directory)
            ) from exc
        if not isinstance(tcb_key, ec.EllipticCurvePrivateKey):
            raise ConfigError(
                "simulated TCB signing key must be EC P-256", path=str(self.directory)
            )
        _log.warning("insecure_simulation_used", action="collateral", directory=str(self.directory))
        return _sim_collateral.collateral_json(
            now=now or datetime.now(UTC),
            tcb_key=tcb_key,
            tcb_chain=(tcb, self.root_certificate),
            pck_ca_chain=(self.intermediate_certificate, self.root_certificate),
            root_crl=read(_ROOT_CRL_FILE),
            pck_crl=read(_PCK_CRL_FILE),
        )

    @classmethod
    def load(cls, directory: str | Path) -> SimulatedPlatform:
        """Load a platform made by :meth:`create`.

        Raises:
            ConfigError: a file is missing or unreadable, or does not hold what it should.
        """
        path = Path(directory)

        def read(name: str) -> bytes:
            try:
                return (path / name).read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read simulated platform file: {exc.strerror}", path=str(path / name)
                ) from exc

        try:
            certs = [
                x509.load_pem_x509_certificate(read(n))
                for n in (ROOT_FILE, _INTERMEDIATE_FILE, _PCK_FILE)
            ]
            keys = [
                serialization.load_pem_private_key(read(n), None)
                for n in (_PCK_KEY_FILE, _ATTESTATION_KEY_FILE)
            ]
        except (ValueError, TypeError) as exc:
            raise ConfigError("simulated platform file does not parse", path=str(path)) from exc
        pck_key, att_key = keys
        if not (
            isinstance(pck_key, ec.EllipticCurvePrivateKey)
            and isinstance(att_key, ec.EllipticCurvePrivateKey)
        ):
            raise ConfigError("simulated platform keys must be EC P-256", path=str(path))
        if pck_key.public_key() != certs[2].public_key():
            raise ConfigError("sim-pck.key does not match sim-pck.pem", path=str(path))
        _log.warning("insecure_simulation_used", action="load_platform", directory=str(path))
        return cls(path, certs[0], certs[1], certs[2], pck_key, att_key)

    @property
    def root_certificate_path(self) -> Path:
        """The file a verifier is pointed at to trust this platform (and only then)."""
        return self.directory / ROOT_FILE

    def trust_anchors(self) -> TrustAnchors:
        """Intel's root plus this simulation root."""
        return TrustAnchors(simulation_root=self.root_certificate)

    def quote(
        self,
        report_data: bytes,
        *,
        mr_enclave: bytes,
        mr_signer: bytes,
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        debug: bool = False,
        attributes_xfrm: int = 0x3,
        misc_select: int = 0,
        qe_svn: int = _sim_collateral.SIMULATED_QE_SVN,
        pce_svn: int = _sim_collateral.SIMULATED_PCESVN,
        attributes_flags: int | None = None,
    ) -> bytes:
        """A v3 quote for an enclave with these measurements and ``report_data``.

        ``attributes_flags`` overrides the INIT | MODE64BIT (| DEBUG) a Gramine enclave has,
        for tests of attribute rules.

        Raises:
            ValueError: ``report_data`` longer than 64 bytes, or a field out of range.
        """
        if len(report_data) > 64:
            raise ValueError("report_data is at most 64 bytes")
        _log.warning("insecure_simulation_used", action="quote", mr_enclave=mr_enclave.hex())
        flags = ATTRIBUTE_INIT | ATTRIBUTE_MODE64BIT | (ATTRIBUTE_DEBUG if debug else 0)
        flags = flags if attributes_flags is None else attributes_flags
        body = _report(
            flags=flags,
            xfrm=attributes_xfrm,
            misc_select=misc_select,
            mr_enclave=mr_enclave,
            mr_signer=mr_signer,
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            report_data=report_data.ljust(64, b"\0"),
        )
        att_public = self._attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        qe_report = _report(
            flags=ATTRIBUTE_INIT | ATTRIBUTE_MODE64BIT,
            xfrm=0x3,
            misc_select=0,
            mr_enclave=SIMULATED_QE_MR_ENCLAVE,
            mr_signer=SIMULATED_QE_MR_SIGNER,
            isv_prod_id=1,
            isv_svn=qe_svn,
            report_data=hashlib.sha256(att_public + _QE_AUTH_DATA).digest() + bytes(32),
        )
        root_der = self.root_certificate.public_bytes(serialization.Encoding.DER)
        header = QuoteHeader(
            version=3,
            attestation_key_type=ATTESTATION_KEY_TYPE_ECDSA_P256,
            tee_type=TEE_TYPE_SGX,
            qe_svn=qe_svn,
            pce_svn=pce_svn,
            qe_vendor_id=SIMULATED_QE_VENDOR_ID,
            user_data=hashlib.sha256(root_der).digest()[:16] + bytes(4),
        )
        chain = b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in (self.pck_certificate, self.intermediate_certificate, self.root_certificate)
        )
        return build_quote(
            header=header,
            body=body,
            signature=_raw_signature(self._attestation_key, header.to_bytes() + body.to_bytes()),
            attestation_key=att_public,
            qe_report=qe_report,
            qe_report_signature=_raw_signature(self._pck_key, qe_report.to_bytes()),
            qe_auth_data=_QE_AUTH_DATA,
            pck_chain_pem=chain + b"\0",
        )

    def quote_provider(
        self,
        *,
        mr_enclave: bytes,
        mr_signer: bytes,
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        debug: bool = False,
    ) -> QuoteProvider:
        """A ``(report_data) -> quote`` callable for
        :func:`~.ratls_cert.build_ratls_certificate`."""
        return functools.partial(
            self.quote,
            mr_enclave=mr_enclave,
            mr_signer=mr_signer,
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            debug=debug,
        )

    def __repr__(self) -> str:
        return f"<SimulatedPlatform INSECURE {str(self.directory)!r}>"
