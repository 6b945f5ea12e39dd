"""The Quoting Enclave a trust anchor vouches for, and the one check every quote gets.

A quote is signed by an attestation key that the Quoting Enclave (QE) vouches for in its
report, and that report is signed by the platform's PCK key. The PCK key only says "this
report came from *an* enclave on this CPU": on a host that controls launch (FLC), the
host can run its own "QE" with the PROVISION_KEY attribute, have it certified by the real
PCE, and sign quotes for any MRENCLAVE. What stops that is checking the QE report's
identity (MRSIGNER, ISVPRODID, and attributes and MISCSELECT under their masks) against
the QE the root's owner publishes. With collateral, that identity is the signed QE
identity it carries (:mod:`._tcb`); without, it is the identity pinned here for the root
the PCK chain ended at. Either way the check always runs (threat A10 in docs/threat-model.md).

Where Intel's values come from: Intel's signed QE identity, served by the Provisioning
Certification Service API v4 ``GET /sgx/certification/v4/qe/identity`` (and by every
PCCS) as ``enclaveIdentity`` with ``id`` "QE": ``mrsigner`` 8C4F5775...57BFF,
``isvprodid`` 1, ``attributes`` 11000000000000000000000000000000 under ``attributesMask``
FBFFFFFFFFFFFFFF0000000000000000, ``miscselect`` 00000000 under ``miscselectMask``
FFFFFFFF. ``tests/attestation/test_qe_identity.py`` checks these against the Intel-signed
QE identity in ``tests/data/sgx/`` so a typo here cannot pass.

The simulated platform (:mod:`.insecure_simulation`) has its own QE, with its own pinned
identity below; it is checked the same way against quotes that chain to a simulation root.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, Protocol

from drm_wire.attestation.errors import QeIdentityError
from drm_wire.attestation.quote import ReportBody

__all__ = [
    "INTEL_QE_IDENTITY",
    "SIMULATED_QE_IDENTITY",
    "PinnedQeIdentity",
    "QeIdentityFields",
    "check_qe_identity",
]


class QeIdentityFields(Protocol):
    """What a QE report is compared with: a pinned identity or a signed one from collateral."""

    @property
    def mrsigner(self) -> bytes: ...
    @property
    def isvprodid(self) -> int: ...
    @property
    def miscselect(self) -> int: ...
    @property
    def miscselect_mask(self) -> int: ...
    @property
    def attributes(self) -> bytes: ...
    @property
    def attributes_mask(self) -> bytes: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PinnedQeIdentity:
    """A Quoting Enclave's identity as QE identity JSON spells it (attributes: flags then
    XFRM, 8 bytes each, little-endian as in the report)."""

    mrsigner: bytes
    isvprodid: int
    miscselect: int
    miscselect_mask: int
    attributes: bytes
    attributes_mask: bytes

    def __post_init__(self) -> None:
        if len(self.mrsigner) != 32 or len(self.attributes) != 16:
            raise ValueError("mrsigner is 32 bytes, attributes 16")
        if len(self.attributes_mask) != 16:
            raise ValueError("attributes_mask is 16 bytes")


#: Intel's DCAP Quoting Enclave (see the module docstring for the source).
INTEL_QE_IDENTITY: Final = PinnedQeIdentity(
    mrsigner=bytes.fromhex("8C4F5775D796503E96137F77C68A829A0056AC8DED70140B081B094490C57BFF"),
    isvprodid=1,
    miscselect=0x00000000,
    miscselect_mask=0xFFFFFFFF,
    attributes=bytes.fromhex("11000000000000000000000000000000"),
    attributes_mask=bytes.fromhex("FBFFFFFFFFFFFFFF0000000000000000"),
)

#: MRENCLAVE and MRSIGNER of the simulated platform's QE: readable names, hashed.
SIMULATED_QE_MR_ENCLAVE: Final = hashlib.sha256(b"drm-wire simulated quoting enclave").digest()
SIMULATED_QE_MR_SIGNER: Final = hashlib.sha256(
    b"drm-wire simulated quoting enclave signer"
).digest()

#: The simulated platform's QE: INIT | MODE64BIT, XFRM 0x3, MISCSELECT 0, product 1. The
#: masks are Intel's, so the same bits matter (MODE64BIT and XFRM are ignored).
SIMULATED_QE_IDENTITY: Final = PinnedQeIdentity(
    mrsigner=SIMULATED_QE_MR_SIGNER,
    isvprodid=1,
    miscselect=0,
    miscselect_mask=0xFFFFFFFF,
    attributes=bytes.fromhex("05000000000000000300000000000000"),
    attributes_mask=INTEL_QE_IDENTITY.attributes_mask,
)


def check_qe_identity(qe: ReportBody, identity: QeIdentityFields, *, what: str) -> None:
    """Require that the QE report is the QE ``identity`` describes.

    Raises:
        QeIdentityError: MRSIGNER, ISVPRODID, masked MISCSELECT or masked attributes differ.
    """
    attributes = qe.attributes_flags.to_bytes(8, "little") + qe.attributes_xfrm.to_bytes(
        8, "little"
    )
    if qe.mr_signer != identity.mrsigner:
        signer = qe.mr_signer.hex()
        raise QeIdentityError(f"Quoting Enclave MRSIGNER {signer} does not match {what}")
    if qe.isv_prod_id != identity.isvprodid:
        raise QeIdentityError(f"Quoting Enclave ISVPRODID {qe.isv_prod_id} does not match {what}")
    mask = identity.miscselect_mask
    if qe.misc_select & mask != identity.miscselect & mask:
        raise QeIdentityError(f"Quoting Enclave MISCSELECT does not match {what}")
    if any(
        (a & m) != (b & m)
        for a, b, m in zip(attributes, identity.attributes, identity.attributes_mask, strict=True)
    ):
        raise QeIdentityError(f"Quoting Enclave attributes {attributes.hex()} do not match {what}")
