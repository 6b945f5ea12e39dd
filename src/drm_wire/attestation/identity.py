"""Verify a peer's RA-TLS certificate against a policy; the answer is a proof object.

This is the one entry point the TLS layer needs: its verify hook gets the peer certificate
DER and calls :func:`verify_enclave_certificate` (or the callable from
:func:`make_certificate_verifier`). Steps, each failing with its own
:class:`~drm_wire.errors.AttestationError` subclass:

1. :func:`~.ratls_cert.parse_ratls_certificate`: tolerant DER, the quote extension(s), and the
   key binding (``pubkey-hash`` claim and report data), which is never optional;
2. :func:`~.verify.verify_quote` on every carried quote, with the trust anchors the policy
   names (Intel's root; the simulation root only if the policy file says so);
3. :meth:`.policy.Policy.check`: TCB status, attributes, product id, SVN, measurements.

Only then does a :class:`~.verified_enclave.VerifiedEnclave` exist (it has no public
constructor); a function that needs an attested peer takes one, so the signature says so
and an unverified certificate cannot reach it by mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.collateral_source import CollateralSource, with_stapled
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.ratls_cert import parse_ratls_certificate
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.attestation.verify import verify_quote

__all__ = ["make_certificate_verifier", "verify_enclave_certificate"]


def verify_enclave_certificate(
    der: bytes,
    policy: Policy,
    *,
    collateral: Collateral | CollateralSource | None = None,
    now: datetime,
) -> VerifiedEnclave:
    """Verify an RA-TLS certificate (DER or PEM) and check it against ``policy``.

    Every quote the certificate carries is verified and checked (Gramine >= 1.8 certs carry
    two, which differ only in report data); the TCG one is reported.

    Args:
        der: the peer certificate, as the TLS layer hands it over.
        policy: what to accept; also names the trust anchors.
        collateral: Intel collateral for a TCB status, used with any the certificate
            staples (the newest valid one decides); without either the policy must say
            ``accept_unknown_tcb_status = true`` (the QE is checked either way).
        now: when certificates and collateral must be valid (timezone-aware).

    Raises:
        AttestationError: a subclass naming the failed check (see the module docstring).
        ValueError: ``now`` is naive (a bug in the caller).
    """
    evidence = parse_ratls_certificate(der)
    trust = policy.trust_anchors()
    source = with_stapled(collateral, evidence.stapled_collateral)
    results = [
        policy.check(
            verify_quote(quote, trust=trust, collateral=source, now=now),
            public_key_spki=evidence.spki_der,
        )
        for quote in evidence.quotes
    ]
    return results[0]


def make_certificate_verifier(
    policy: Policy,
    *,
    collateral: Collateral | CollateralSource | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Callable[[bytes], VerifiedEnclave]:
    """A ``(peer certificate DER) -> VerifiedEnclave`` hook for the TLS layer.

    ``clock`` is called once per verification so long-lived servers use the current time.
    """

    def verify(der: bytes) -> VerifiedEnclave:
        return verify_enclave_certificate(der, policy, collateral=collateral, now=clock())

    return verify
