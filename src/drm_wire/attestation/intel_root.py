"""The one key every genuine SGX DCAP quote chains up to: Intel's SGX Root CA.

We pin the root's *public key*, not its certificate bytes: a chain is trusted when its
self-signed top certificate carries exactly this key (and verifies under it). Pinning the
key, as Intel's own QVL does (``trustedRootCaPubKey``), keeps working if Intel re-issues the
root certificate with the same key.

Where it comes from: the "Intel SGX Root CA" certificate (subject ``CN=Intel SGX Root CA,
O=Intel Corporation, L=Santa Clara, ST=CA, C=US``, valid 2018-05-21 to 2049-12-31, serial
``22650CD65A9D3489F383B49552BF501B392706AC``),
published at https://certificates.trustedservices.intel.com/Intel_SGX_Provisioning_Certification_RootCA.cer
and the last certificate of every PCK chain and collateral issuer chain.

How to check it yourself::

    URL=https://certificates.trustedservices.intel.com
    curl -s $URL/Intel_SGX_Provisioning_Certification_RootCA.cer \
      | openssl x509 -inform DER -noout -fingerprint -sha256 -pubkey
    # certificate SHA-256: 44:A0:19:6B:2B:99:F8:89:B8:E1:49:E9:5B:80:7A:35:
    #                      0E:74:24:96:43:99:E8:85:A7:CB:B8:CC:FA:B6:74:D3
    # and the public key below, in PEM

``tests/attestation/test_verify.py`` asserts that the root in the real quote's PCK chain
(``tests/data/sgx/``) has this key and this certificate fingerprint.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

__all__ = [
    "INTEL_SGX_ROOT_CA_SHA256",
    "INTEL_SGX_ROOT_CA_SPKI_DER",
    "intel_root_public_key",
]

#: DER SubjectPublicKeyInfo of the Intel SGX Root CA key (ECDSA P-256).
INTEL_SGX_ROOT_CA_SPKI_DER: Final = bytes.fromhex(
    "3059301306072a8648ce3d020106082a8648ce3d03010703420004"
    "0ba9c4c0c0c86193a3fe23d6b02cda10a8bbd4e88e48b4458561a36e705525f5"
    "67918e2edc88e40d860bd0cc4ee26aacc988e505a953558c453f6b0904ae7394"
)

#: SHA-256 fingerprint of the root certificate's DER, for humans checking by hand.
INTEL_SGX_ROOT_CA_SHA256: Final = bytes.fromhex(
    "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"
)


def intel_root_public_key() -> ec.EllipticCurvePublicKey:
    """The pinned Intel SGX Root CA public key, as a ``cryptography`` key object."""
    key = load_der_public_key(INTEL_SGX_ROOT_CA_SPKI_DER)
    if not isinstance(key, ec.EllipticCurvePublicKey):  # pragma: no cover - constant above
        raise TypeError("pinned Intel root key is not an EC key")
    return key
