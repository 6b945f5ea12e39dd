"""Verify an SGX DCAP quote up to a trust anchor; the result is a proof object.

Theory of operation. A quote is a chain of signatures, and each check below is only
meaningful once the one before it has passed, so they run in this order and stop at the
first failure, each with its own :class:`~drm_wire.errors.AttestationError` subclass:

1. **Parse** (:func:`~drm_wire.attestation.quote.parse_quote`): v3 or SGX v4, ECDSA P-256
   attestation key, PCK chain certification data; every length bounded.
2. **PCK chain** from the quote up to a trusted root: the pinned Intel SGX Root CA key, or
   a simulation root the caller passed explicitly. Nothing else anchors trust. Signature
   results are cached (:mod:`._pck`); dates are checked against ``now`` on every call.
3. **QE report signature** by the PCK leaf key: Intel's key for this CPU vouches for the
   Quoting Enclave's report.
4. **QE binding**: the QE report's data is SHA-256(attestation key || QE auth data), so the
   QE vouches for the attestation key.
5. **Quote signature** by the attestation key over header + body: the QE vouches for the
   application enclave's report (MRENCLAVE, report data...).
6. **QE identity**, always: the Quoting Enclave's report is the QE its root's owner
   publishes (:mod:`.qe_identity`). With collateral, against the signed QE identity it
   carries (step 7); without, against the identity pinned in :class:`TrustAnchors` for the
   root the chain ended at (Intel's QE for Intel's root, the simulated QE for a simulation
   root). A quote from any other QE is refused, whatever the policy says.
7. **Collateral**, when given (:mod:`._tcb`): signed TCB info and QE identity, CRLs, dates;
   the QE is that QE at an acceptable ISVSVN; the platform's TCB (from the PCK leaf's SGX
   extension) is matched to a TCB level, giving :class:`TcbStatus`. ``Revoked`` is an error.

Policy (which MRENCLAVE, debug or not, which TCB statuses) is *not* decided here; that is
the caller's job with the :class:`VerifiedQuote` this returns.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final, final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from drm_wire.attestation import _tcb
from drm_wire.attestation._pck import (
    CHAIN_CACHE,
    PckExtension,
    Root,
    VerifiedChain,
    ecdsa_ok,
    parse_sgx_extension,
    pck_ca_type,
    spki_der,
    verify_chain,
    x509_errors,
)
from drm_wire.attestation.collateral import Collateral, TcbStatus
from drm_wire.attestation.collateral_source import CollateralSource, newest_first
from drm_wire.attestation.errors import (
    CertificateChainError,
    CollateralError,
    QeBindingError,
    QeReportSignatureError,
    QuoteSignatureError,
    UnsupportedQuoteError,
)
from drm_wire.attestation.intel_root import intel_root_public_key
from drm_wire.attestation.qe_identity import (
    INTEL_QE_IDENTITY,
    SIMULATED_QE_IDENTITY,
    PinnedQeIdentity,
    check_qe_identity,
)
from drm_wire.attestation.quote import INTEL_QE_VENDOR_ID, Quote, ReportBody, parse_quote

__all__ = [
    "Collateral",
    "TcbStatus",
    "TrustAnchors",
    "VerifiedQuote",
    "clear_chain_cache",
    "collateral_window",
    "verify_quote",
]

_TOKEN: Final = object()  # only this module can make a VerifiedQuote


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustAnchors:
    """The roots a quote's certificate chains may end at.

    By default only Intel's SGX Root CA key (pinned in :mod:`.intel_root`) is trusted. A
    simulation root is trusted only when passed here explicitly, and a quote that chains
    to it comes back with ``VerifiedQuote.simulated`` set, so policy can still refuse it.

    Each root comes with the Quoting Enclave it vouches for, checked against every quote
    that has no collateral (step 6 of the module docstring).

    Attributes:
        intel_root_public_key: the pinned Intel root key; override only in tests.
        intel_qe_identity: Intel's QE; override only in tests, with the root key.
        simulation_root: a locally made root for simulated quotes, or ``None``.
        simulation_qe_identity: the simulated platform's QE (tests may override it).
    """

    intel_root_public_key: ec.EllipticCurvePublicKey = field(default_factory=intel_root_public_key)
    intel_qe_identity: PinnedQeIdentity = INTEL_QE_IDENTITY
    simulation_root: x509.Certificate | None = None
    simulation_qe_identity: PinnedQeIdentity = SIMULATED_QE_IDENTITY

    @classmethod
    def with_simulation_root(cls, path: str | Path) -> TrustAnchors:
        """Trust Intel's root and the simulation root certificate in the PEM file ``path``.

        Raises:
            OSError: the file cannot be read.
            ValueError: it holds no PEM certificate.
        """
        return cls(simulation_root=x509.load_pem_x509_certificate(Path(path).read_bytes()))

    @property
    def roots(self) -> tuple[Root, ...]:
        """(SPKI DER, is-simulation) for each trusted root; also the chain cache key."""
        intel = self.intel_root_public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        roots: tuple[Root, ...] = ((intel, False),)
        if self.simulation_root is not None:
            roots += ((spki_der(self.simulation_root), True),)
        return roots


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedQuote:
    """Proof that a quote verified; only :func:`verify_quote` can make one.

    Require this type where a function needs a verified enclave, as in cryptography's
    style: holding one means steps 1-5 (and 6, if ``tcb_status`` is set) passed.

    Attributes:
        quote: the parsed quote; ``quote.body`` is the enclave's report.
        tcb_status: Intel's verdict from the collateral; ``None`` without collateral.
        simulated: the chain ended at the explicitly trusted simulation root.
        pck_fmspc, pck_cpusvn, pck_pcesvn: from the PCK leaf's SGX extension, if present.
        advisory_ids: Intel security advisories that apply at this TCB level.
        collateral_window: see the field's comment.
    """

    quote: Quote
    tcb_status: TcbStatus | None
    simulated: bool
    pck_fmspc: bytes | None
    pck_cpusvn: bytes | None
    pck_pcesvn: int | None
    advisory_ids: tuple[str, ...]
    _token: InitVar[object]
    #: When the verdict stays what it is for these bytes and this collateral: the used
    #: collateral's validity window, or ``None`` (no collateral, or older candidates were
    #: passed over, so a later ``now`` might choose differently). For result caches.
    collateral_window: tuple[datetime, datetime] | None = None

    def __post_init__(self, _token: object) -> None:
        if _token is not _TOKEN:
            raise TypeError("VerifiedQuote is made only by verify_quote()")

    @property
    def report(self) -> ReportBody:
        """The application enclave's report body (MRENCLAVE, MRSIGNER, report data...)."""
        return self.quote.body


def clear_chain_cache() -> None:
    """Forget every cached chain verification (tests; after rotating trust anchors)."""
    CHAIN_CACHE.clear()


def _p256_key(xy: bytes) -> ec.EllipticCurvePublicKey:
    """The attestation key from its raw X||Y form; raises if it is not a P-256 point."""
    numbers = ec.EllipticCurvePublicNumbers(
        int.from_bytes(xy[:32], "big"), int.from_bytes(xy[32:], "big"), ec.SECP256R1()
    )
    try:
        return numbers.public_key()
    except ValueError as exc:
        raise QuoteSignatureError("attestation key is not a P-256 point") from exc


def collateral_window(collateral: Collateral) -> tuple[datetime, datetime]:
    """When every part of ``collateral`` (bodies, CRLs, issuer chains) is current."""
    crls = (collateral.pck_crl, collateral.root_ca_crl)
    certs = (*collateral.tcb_info_issuer_chain, *collateral.qe_identity_issuer_chain,
             *collateral.pck_crl_issuer_chain)  # fmt: skip
    starts = [collateral.tcb_info.issue_date, collateral.qe_identity.issue_date]
    starts += [c.last_update_utc for c in crls] + [c.not_valid_before_utc for c in certs]
    ends = [collateral.tcb_info.next_update, collateral.qe_identity.next_update]
    ends += [c.next_update_utc for c in crls if c.next_update_utc is not None]
    ends += [c.not_valid_after_utc for c in certs]
    return max(starts), min(ends)


def _evaluate_newest(
    quote: Quote,
    chain: VerifiedChain,
    pck: PckExtension | None,
    candidates: Sequence[Collateral],
    trust: TrustAnchors,
    now: datetime,
) -> tuple[TcbStatus, tuple[str, ...], tuple[datetime, datetime] | None]:
    """Judge with the first candidate that verifies; a verdict it gives is final."""
    first_error: CollateralError | None = None
    for candidate in candidates:
        try:
            status, advisories = _tcb.evaluate(quote, chain, pck, candidate, trust.roots, now)
        except CollateralError as exc:  # forged, expired, for another CA: try the next
            first_error = first_error or exc
            continue
        return status, advisories, None if first_error is not None else collateral_window(candidate)
    assert first_error is not None  # candidates is not empty
    raise first_error


def verify_quote(
    data: bytes | Quote,
    *,
    trust: TrustAnchors = TrustAnchors(),  # immutable; pins Intel's key
    collateral: Collateral | CollateralSource | None = None,
    now: datetime,
) -> VerifiedQuote:
    """Verify a quote's signatures up to a trust anchor, and its TCB given collateral.

    Args:
        data: the quote bytes, or a parsed :class:`Quote` (re-parsed from ``raw``, so a
            hand-made ``Quote`` cannot smuggle in fields that differ from its bytes).
        trust: the roots to accept; Intel's only, unless a simulation root is given.
        collateral: Intel's TCB info, QE identity and CRLs, or a
            :class:`~.collateral_source.CollateralSource` offering candidates for the
            platform's FMSPC (the newest that verifies is used; see that module). Without
            it (or with a source that has none for this FMSPC) ``tcb_status`` is ``None``,
            nothing about revocation or TCB currency is known, and the QE is checked
            against the identity pinned for its root.
        now: the time at which certificates, CRLs and collateral must be valid (aware).

    Returns:
        A :class:`VerifiedQuote`.

    Raises:
        QuoteFormatError, UnsupportedQuoteError: step 1.
        CertificateChainError (UntrustedRootError, CertificateValidityError): step 2.
        QeReportSignatureError, QeBindingError, QuoteSignatureError: steps 3-5.
        QeIdentityError: step 6.
        CollateralError (CollateralSignatureError, CollateralExpiredError), RevokedError,
            QeIdentityError, TcbLevelError: step 7.
        ValueError: ``now`` is a naive datetime (a bug in the caller).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    quote = parse_quote(data.raw if isinstance(data, Quote) else data)
    chain = verify_chain(quote.pck_chain_pem, trust.roots, now=now, what="PCK chain")
    if not chain.simulated and quote.header.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise UnsupportedQuoteError("Intel-rooted quote from a non-Intel Quoting Enclave")
    with x509_errors(CertificateChainError, "PCK chain"):
        leaf_key = chain.certs[0].public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or leaf_key.curve.name != "secp256r1":
        raise CertificateChainError("PCK chain: leaf key is not ECDSA P-256")
    if not ecdsa_ok(leaf_key, quote.qe_report_signature, quote.qe_report_raw):
        raise QeReportSignatureError("QE report signature does not verify with the PCK key")
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest()
    report_data = quote.qe_report.report_data
    if not hmac.compare_digest(report_data[:32], binding) or any(report_data[32:]):
        raise QeBindingError("QE report data does not bind the attestation key")
    if not ecdsa_ok(_p256_key(quote.attestation_key), quote.signature, quote.signed_bytes):
        raise QuoteSignatureError("quote signature does not verify with the attestation key")
    pck = parse_sgx_extension(chain.certs[0])
    status: TcbStatus | None = None
    advisories: tuple[str, ...] = ()
    candidates: Sequence[Collateral] = ()
    if isinstance(collateral, Collateral):
        candidates = (collateral,)
    elif collateral is not None and pck is not None:
        offered = collateral.candidates(pck.fmspc, pck_ca_type(chain.certs[0]))
        candidates = newest_first(offered)
    window: tuple[datetime, datetime] | None = None
    if candidates:
        status, advisories, window = _evaluate_newest(quote, chain, pck, candidates, trust, now)
    elif chain.simulated:
        pinned, owner = trust.simulation_qe_identity, "the simulated platform's"
        check_qe_identity(quote.qe_report, pinned, what=f"{owner} pinned QE identity")
    else:
        pinned, owner = trust.intel_qe_identity, "Intel's"
        check_qe_identity(quote.qe_report, pinned, what=f"{owner} pinned QE identity")
    return VerifiedQuote(
        quote=quote,
        tcb_status=status,
        simulated=chain.simulated,
        pck_fmspc=pck.fmspc if pck else None,
        pck_cpusvn=pck.cpusvn if pck else None,
        pck_pcesvn=pck.pcesvn if pck else None,
        advisory_ids=advisories,
        _token=_TOKEN,
        collateral_window=window,
    )
