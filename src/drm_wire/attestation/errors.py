"""The specific ways SGX evidence can fail to verify, one class per check.

Every class here derives from :class:`drm_wire.errors.AttestationError`, so callers that
only care *whether* evidence verified catch that one class; logs and tests use the
subclass to see *which* check refused it. What a remote peer is told is always the uniform
``ATTESTATION_FAILED`` code (see :class:`~drm_wire.errors.AttestationError`).

Each class carries a stable ``check`` name, meant as a structured log field. Messages are
short and never contain key material; quote bytes are not secret but are not echoed either.
"""

from __future__ import annotations

from typing import ClassVar

from drm_wire.errors import AttestationError

__all__ = [
    "AttestationError",
    "CertificateChainError",
    "CertificateValidityError",
    "CollateralError",
    "CollateralExpiredError",
    "CollateralSignatureError",
    "QeBindingError",
    "QeIdentityError",
    "QeReportSignatureError",
    "QuoteFormatError",
    "QuoteSignatureError",
    "RevokedError",
    "TcbLevelError",
    "UnsupportedQuoteError",
    "UntrustedRootError",
]


class QuoteFormatError(AttestationError):
    """The quote bytes are malformed: truncated, a length past the end, trailing bytes."""

    check: ClassVar[str] = "quote_format"


class UnsupportedQuoteError(AttestationError):
    """The quote is well formed but of a kind we refuse (TDX, version 5, P-384 key...)."""

    check: ClassVar[str] = "quote_kind"


class CertificateChainError(AttestationError):
    """A certificate chain (PCK, TCB signing) is malformed or does not chain up."""

    check: ClassVar[str] = "certificate_chain"


class UntrustedRootError(CertificateChainError):
    """A chain is internally consistent but ends at a root we were not told to trust."""

    check: ClassVar[str] = "trusted_root"


class CertificateValidityError(CertificateChainError):
    """A certificate in a chain is not yet valid, or has expired, at ``now``."""

    check: ClassVar[str] = "certificate_validity"


class QeReportSignatureError(AttestationError):
    """The Quoting Enclave's report is not signed by the PCK leaf key."""

    check: ClassVar[str] = "qe_report_signature"


class QeBindingError(AttestationError):
    """The QE report does not bind the attestation key (report_data hash mismatch)."""

    check: ClassVar[str] = "qe_binding"


class QuoteSignatureError(AttestationError):
    """The quote's header and body are not signed by the attestation key."""

    check: ClassVar[str] = "quote_signature"


class CollateralError(AttestationError):
    """Collateral (TCB info, QE identity, CRLs) is malformed or inconsistent."""

    check: ClassVar[str] = "collateral"


class CollateralSignatureError(CollateralError):
    """A collateral body or CRL is not signed by its issuer chain."""

    check: ClassVar[str] = "collateral_signature"


class CollateralExpiredError(CollateralError):
    """Collateral is outside its issueDate/nextUpdate window at ``now``."""

    check: ClassVar[str] = "collateral_expired"


class RevokedError(AttestationError):
    """A certificate of the PCK chain is on a CRL, or the TCB level is ``Revoked``."""

    check: ClassVar[str] = "revocation"


class QeIdentityError(AttestationError):
    """The Quoting Enclave is not the one Intel's QE identity describes."""

    check: ClassVar[str] = "qe_identity"


class TcbLevelError(AttestationError):
    """The platform's TCB could not be matched to any level of the TCB info."""

    check: ClassVar[str] = "tcb_level"
