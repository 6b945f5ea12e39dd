"""Verify a peer's RA-TLS certificate against a policy; the answer is a proof object.

This is the one entry point the TLS layer needs: its verify hook gets the peer certificate
DER and calls :func:`verify_enclave_certificate` (or the callable from
:func:`make_certificate_verifier`). Steps, each failing with its own
:class:`~drm_wire.errors.AttestationError` subclass:

1. :func:`~.ratls.parse_ratls_certificate`: tolerant DER, the quote extension(s), and the
   key binding (``pubkey-hash`` claim and report data), which is never optional;
2. :func:`~.verify.verify_quote` on every carried quote, with the trust anchors the policy
   names (Intel's root; the simulation root only if the policy file says so);
3. :meth:`.policy.Policy.check`: TCB status, attributes, product id, SVN, measurements.

Only then does a :class:`VerifiedEnclave` exist (it has no public constructor); a
function that needs an attested peer takes one, so the signature says so and an
unverified certificate cannot reach it by mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, NoReturn, final

from drm_wire.attestation.collateral import Collateral, TcbStatus
from drm_wire.attestation.ratls import parse_ratls_certificate
from drm_wire.attestation.verify import VerifiedQuote, verify_quote

if TYPE_CHECKING:
    from drm_wire.attestation.policy import Policy

__all__ = ["VerifiedEnclave", "make_certificate_verifier", "verify_enclave_certificate"]

_FIELDS = (
    "mr_enclave",
    "mr_signer",
    "isv_prod_id",
    "isv_svn",
    "debug",
    "tcb_status",
    "simulated",
    "public_key_spki",
    "verified_quote",
)


@final
class VerifiedEnclave:
    """Proof that an enclave's evidence verified and satisfied a policy.

    Made only by :meth:`Policy.check <drm_wire.attestation.policy.Policy.check>` (and so
    by :func:`verify_enclave_certificate`); calling the class raises ``TypeError``.
    Immutable.

    Attributes:
        mr_enclave, mr_signer: the enclave's measurements (32 bytes each).
        isv_prod_id, isv_svn: from the enclave's SIGSTRUCT.
        debug: the DEBUG attribute (only possible when the policy allowed it).
        tcb_status: Intel's verdict, or ``None`` when no collateral was used.
        simulated: the quote chains to the simulation root: no security at all.
        public_key_spki: the bound TLS key (SubjectPublicKeyInfo DER), or ``None`` when a
            bare quote was checked.
        verified_quote: the underlying :class:`~.verify.VerifiedQuote`.
    """

    __slots__ = _FIELDS
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    debug: bool
    tcb_status: TcbStatus | None
    simulated: bool
    public_key_spki: bytes | None
    verified_quote: VerifiedQuote

    def __init__(self) -> None:
        raise TypeError("VerifiedEnclave is made only by verification (Policy.check)")

    @classmethod
    def _create(cls, verified: VerifiedQuote, public_key_spki: bytes | None) -> VerifiedEnclave:
        body = verified.quote.body
        self = object.__new__(cls)
        values = {
            "mr_enclave": body.mr_enclave,
            "mr_signer": body.mr_signer,
            "isv_prod_id": body.isv_prod_id,
            "isv_svn": body.isv_svn,
            "debug": body.debug,
            "tcb_status": verified.tcb_status,
            "simulated": verified.simulated,
            "public_key_spki": public_key_spki,
            "verified_quote": verified,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)
        return self

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("VerifiedEnclave is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("VerifiedEnclave is immutable")

    def __repr__(self) -> str:
        status = self.tcb_status.value if self.tcb_status else "no-collateral"
        flags = "".join((" SIMULATED" if self.simulated else "", " DEBUG" if self.debug else ""))
        return (
            f"<VerifiedEnclave mr_enclave={self.mr_enclave.hex()[:16]}... "
            f"prod={self.isv_prod_id} svn={self.isv_svn} tcb={status}{flags}>"
        )


def verify_enclave_certificate(
    der: bytes,
    policy: Policy,
    *,
    collateral: Collateral | None = None,
    now: datetime,
) -> VerifiedEnclave:
    """Verify an RA-TLS certificate (DER or PEM) and check it against ``policy``.

    Every quote the certificate carries is verified and checked (Gramine >= 1.8 certs carry
    two, which differ only in report data); the TCG one is reported.

    Args:
        der: the peer certificate, as the TLS layer hands it over.
        policy: what to accept; also names the trust anchors.
        collateral: Intel collateral for a TCB status; without it the policy must say
            ``accept_without_collateral = true``.
        now: when certificates and collateral must be valid (timezone-aware).

    Raises:
        AttestationError: a subclass naming the failed check (see the module docstring).
        ValueError: ``now`` is naive (a bug in the caller).
    """
    evidence = parse_ratls_certificate(der)
    trust = policy.trust_anchors()
    results = [
        policy.check(
            verify_quote(quote, trust=trust, collateral=collateral, now=now),
            public_key_spki=evidence.spki_der,
        )
        for quote in evidence.quotes
    ]
    return results[0]


def make_certificate_verifier(
    policy: Policy,
    *,
    collateral: Collateral | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Callable[[bytes], VerifiedEnclave]:
    """A ``(peer certificate DER) -> VerifiedEnclave`` hook for the TLS layer.

    ``clock`` is called once per verification so long-lived servers use the current time.
    """

    def verify(der: bytes) -> VerifiedEnclave:
        return verify_enclave_certificate(der, policy, collateral=collateral, now=clock())

    return verify
