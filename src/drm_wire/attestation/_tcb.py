"""Step 6 of quote verification: judge the platform with Intel's collateral.

Runs only after the quote's own signatures verified (steps 1-5 in :mod:`.verify`), in this
order, each step trusting only what the previous ones established:

a. the TCB info and QE identity signing chains end at the *same* root as the PCK chain,
   and their signatures cover the exact body bytes; both bodies are within their
   issueDate..nextUpdate window at ``now``;
b. the CRLs: the root CA CRL is signed by that root, the PCK CRL by the CA that issued the
   PCK leaf (the intermediate of the quote's verified chain) and its issuer chain verifies;
   both are current; neither lists the PCK leaf, the PCK CA or the TCB signing certificate;
c. the QE report matches Intel's QE identity (MRSIGNER, ISVPRODID, masked MISCSELECT and
   attributes), and its ISVSVN selects a QE TCB level;
d. the PCK leaf's FMSPC and PCE-ID match the TCB info, and the first TCB level whose 16
   component SVNs and PCESVN are all <= the platform's gives the platform status;
e. the two statuses converge as in Intel's QVL: an out-of-date QE makes an otherwise
   current platform ``OutOfDate`` (or ``OutOfDateConfigurationNeeded``).

``Revoked`` at either level raises :class:`RevokedError`: it is never acceptable, so it is
not left to policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from drm_wire.attestation._pck import (
    PckExtension,
    Root,
    VerifiedChain,
    ecdsa_ok,
    spki_der,
    strict_signature_bits,
    verify_chain,
)
from drm_wire.attestation.collateral import Collateral, QeIdentity, TcbInfo, TcbStatus
from drm_wire.attestation.errors import (
    CertificateChainError,
    CertificateValidityError,
    CollateralError,
    CollateralExpiredError,
    CollateralSignatureError,
    QeIdentityError,
    RevokedError,
    TcbLevelError,
)
from drm_wire.attestation.qe_identity import check_qe_identity
from drm_wire.attestation.quote import Quote, ReportBody


def _signer(
    certs: Sequence[x509.Certificate],
    root: bytes,
    roots: tuple[Root, ...],
    now: datetime,
    what: str,
    *,
    leaf_ca: bool = False,
) -> x509.Certificate:
    """Verify a collateral signing chain up to ``root``; return its first certificate."""
    try:
        chain = verify_chain(certs, roots, now=now, what=what, leaf_ca=leaf_ca)
    except CertificateValidityError as exc:
        raise CollateralExpiredError(str(exc)) from exc
    except CertificateChainError as exc:
        raise CollateralSignatureError(str(exc)) from exc
    if spki_der(chain.certs[-1]) != root:
        raise CollateralSignatureError(f"{what}: ends at another root than the PCK chain")
    return chain.certs[0]


def _body_signed(cert: x509.Certificate, signature: bytes, body: bytes, what: str) -> None:
    key = cert.public_key()  # parsed and checked in Collateral.from_json
    if not isinstance(key, ec.EllipticCurvePublicKey) or not ecdsa_ok(key, signature, body):
        raise CollateralSignatureError(f"{what}: signature does not verify")


def _current(issued: datetime, next_update: datetime | None, now: datetime, what: str) -> None:
    if next_update is None or not issued <= now <= next_update:
        raise CollateralExpiredError(f"{what}: not current at {now:%Y-%m-%dT%H:%M:%SZ}")


def _crl_ok(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, now: datetime, what: str
) -> None:
    if crl.issuer != issuer.subject:
        raise CollateralError(f"{what}: issued by another CA than expected")
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not strict_signature_bits(crl):
        raise CollateralSignatureError(f"{what}: signature is not strict DER")
    if not crl.is_signature_valid(key):
        raise CollateralSignatureError(f"{what}: signature does not verify")
    _current(crl.last_update_utc, crl.next_update_utc, now, what)


def _not_revoked(crl: x509.CertificateRevocationList, cert: x509.Certificate, what: str) -> None:
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise RevokedError(f"{what} is revoked")


def _check_crls(chain: VerifiedChain, collateral: Collateral, roots: tuple[Root, ...],
                tcb_signer: x509.Certificate, now: datetime) -> None:  # fmt: skip
    root, pck_ca, leaf = chain.certs[-1], chain.certs[1], chain.certs[0]
    crl_signer = _signer(
        collateral.pck_crl_issuer_chain, spki_der(root), roots, now, "PCK CRL chain", leaf_ca=True
    )
    if spki_der(crl_signer) != spki_der(pck_ca):
        raise CollateralError("PCK CRL chain: not the CA that issued the PCK certificate")
    _crl_ok(collateral.root_ca_crl, root, now, "root CA CRL")
    _crl_ok(collateral.pck_crl, pck_ca, now, "PCK CRL")
    _not_revoked(collateral.pck_crl, leaf, "PCK certificate")
    _not_revoked(collateral.root_ca_crl, pck_ca, "PCK CA certificate")
    _not_revoked(collateral.root_ca_crl, tcb_signer, "TCB signing certificate")


def _qe_status(qe: ReportBody, identity: QeIdentity) -> tuple[TcbStatus, tuple[str, ...]]:
    check_qe_identity(qe, identity, what="the collateral's QE identity")
    for level in identity.tcb_levels:
        if qe.isv_svn >= level.isvsvn:
            if level.status is TcbStatus.REVOKED:
                raise RevokedError("Quoting Enclave TCB level is revoked")
            return level.status, level.advisory_ids
    raise QeIdentityError(f"QE ISVSVN {qe.isv_svn} is below every QE identity level")


def _platform_status(pck: PckExtension, info: TcbInfo) -> tuple[TcbStatus, tuple[str, ...]]:
    if pck.fmspc != info.fmspc or pck.pce_id != info.pce_id:
        raise TcbLevelError("TCB info is for another platform (FMSPC or PCE-ID differ)")
    for level in info.tcb_levels:
        if pck.pcesvn >= level.pcesvn and all(
            have >= need
            for have, need in zip(pck.tcb_components, level.sgx_components, strict=True)
        ):
            if level.status is TcbStatus.REVOKED:
                raise RevokedError("platform TCB level is revoked")
            return level.status, level.advisory_ids
    raise TcbLevelError("platform TCB is below every TCB level")


def _converge(platform: TcbStatus, qe: TcbStatus) -> TcbStatus:
    """Intel QVL ``convergeTcbStatusWithQeTcbStatus``: an old QE drags the platform down."""
    if qe is TcbStatus.OUT_OF_DATE:
        if platform in (TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED):
            return TcbStatus.OUT_OF_DATE
        if platform in (
            TcbStatus.CONFIGURATION_NEEDED,
            TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED,
        ):
            return TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED
    return platform


def evaluate(
    quote: Quote,
    chain: VerifiedChain,
    pck: PckExtension | None,
    collateral: Collateral,
    roots: tuple[Root, ...],
    now: datetime,
) -> tuple[TcbStatus, tuple[str, ...]]:
    """Run checks a-e above; return the converged status and the advisory ids."""
    if pck is None:
        raise TcbLevelError("PCK certificate has no SGX extension; cannot match a TCB level")
    if len(chain.certs) != 3:
        # Intel's PKI: the PCK CRL covers the leaf, the root CA CRL covers the PCK CA.
        raise CertificateChainError("PCK chain: need exactly leaf, PCK CA and root")
    root = spki_der(chain.certs[-1])
    tcb_signer = _signer(collateral.tcb_info_issuer_chain, root, roots, now, "TCB info chain")
    _body_signed(tcb_signer, collateral.tcb_info_signature, collateral.tcb_info_body, "TCB info")
    qe_signer = _signer(collateral.qe_identity_issuer_chain, root, roots, now, "QE identity chain")
    _body_signed(
        qe_signer, collateral.qe_identity_signature, collateral.qe_identity_body, "QE identity"
    )
    info, identity = collateral.tcb_info, collateral.qe_identity
    _current(info.issue_date, info.next_update, now, "TCB info")
    _current(identity.issue_date, identity.next_update, now, "QE identity")
    _check_crls(chain, collateral, roots, tcb_signer, now)
    if qe_signer.serial_number != tcb_signer.serial_number:
        _not_revoked(collateral.root_ca_crl, qe_signer, "QE identity signing certificate")
    qe_status, qe_advisories = _qe_status(quote.qe_report, identity)
    platform, advisories = _platform_status(pck, info)
    merged = tuple(dict.fromkeys(advisories + qe_advisories))
    return _converge(platform, qe_status), merged
