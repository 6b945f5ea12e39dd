"""The proof object of attestation: an enclave whose evidence verified and passed a policy.

Its own module so that the dependency runs one way: :mod:`.policy` makes the proof
(:meth:`Policy.check <drm_wire.attestation.policy.Policy.check>`, the only caller of the
private constructor) and :mod:`.identity` hands it out after verifying a certificate;
both import it from here, and this module imports neither.
"""

from __future__ import annotations

from typing import NoReturn, final

from drm_wire.attestation.collateral import TcbStatus
from drm_wire.attestation.verify import VerifiedQuote

__all__ = ["VerifiedEnclave"]

_FIELDS = (
    "mr_enclave",
    "mr_signer",
    "isv_prod_id",
    "isv_svn",
    "debug",
    "tcb_status",
    "advisory_ids",
    "simulated",
    "public_key_spki",
    "verified_quote",
)


@final
class VerifiedEnclave:
    """Proof that an enclave's evidence verified and satisfied a policy.

    Made only by :meth:`Policy.check <drm_wire.attestation.policy.Policy.check>` (and so
    by :func:`~.identity.verify_enclave_certificate`); calling the class raises
    ``TypeError``.
    Immutable.

    Attributes:
        mr_enclave, mr_signer: the enclave's measurements (32 bytes each).
        isv_prod_id, isv_svn: from the enclave's SIGSTRUCT.
        debug: the DEBUG attribute (only possible when the policy allowed it).
        tcb_status: Intel's verdict, or ``None`` when no collateral was used.
        advisory_ids: Intel security advisories (INTEL-SA-...) that apply at that verdict.
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
    advisory_ids: tuple[str, ...]
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
            "advisory_ids": verified.advisory_ids,
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
        status = self.tcb_status.value if self.tcb_status else "unknown"
        flags = "".join((" SIMULATED" if self.simulated else "", " DEBUG" if self.debug else ""))
        return (
            f"<VerifiedEnclave mr_enclave={self.mr_enclave.hex()[:16]}... "
            f"prod={self.isv_prod_id} svn={self.isv_svn} tcb={status}{flags}>"
        )
