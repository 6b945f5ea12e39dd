"""Simulated MRENCLAVE and MRSIGNER: digests of what Gramine would measure and sign.

On SGX, MRENCLAVE covers the Gramine manifest, whose ``sgx.trusted_files`` hash every file
of the application, including the enclave's pinned configuration (the custodian CA
certificate). The simulated measurement mirrors that, so a modified enclave gets a
different MRENCLAVE in simulation too (README, *Simulation mode*): SHA-256, domain-separated, over

* every installed file of the measured packages (``drm_enclave`` and ``drm_wire`` by
  default, located with importlib), in sorted relative-path order, skipping ``__pycache__``
  directories and ``.pyc`` files (byte-code is a cache of the sources, not code of its own);
* the pinned custodian CA certificate bytes.

Every variable-length item is length-prefixed, so no two different inputs share an
encoding (moving bytes between a file name and its contents changes the digest).

MRSIGNER on SGX is the hash of the enclave signing key's modulus. Simulation has no
enclave signing key, so :data:`SIMULATION_MR_SIGNER` is a fixed, documented value that says
"simulated build" in any policy file; :func:`simulated_mr_signer` derives a distinct one
from a public key for deployments that want per-signer identities in simulation.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from drm_wire.errors import ConfigError

__all__ = [
    "MEASURED_PACKAGES",
    "SIMULATION_MR_SIGNER",
    "default_package_roots",
    "simulated_mr_enclave",
    "simulated_mr_signer",
]

#: The packages whose code is the enclave.
MEASURED_PACKAGES: Final = ("drm_enclave", "drm_wire")
_ENCLAVE_DOMAIN: Final = b"drm-wire simulated MRENCLAVE v1\0"
_SIGNER_DOMAIN: Final = b"drm-wire simulated MRSIGNER v1\0"
#: MRSIGNER of every simulated build that names no signing key.
SIMULATION_MR_SIGNER: Final = hashlib.sha256(_SIGNER_DOMAIN + b"fixed simulation signer").digest()


def default_package_roots(names: tuple[str, ...] = MEASURED_PACKAGES) -> dict[str, Path]:
    """Where the measured packages are installed, found with importlib (no import).

    Raises:
        ConfigError: a package is not installed, or is not a directory package.
    """
    roots: dict[str, Path] = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec else []
        if len(locations) != 1:
            raise ConfigError(f"cannot locate the installed package {name!r}", key=name)
        roots[name] = Path(locations[0])
    return roots


def _files(root: Path) -> Iterator[tuple[str, Path]]:
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if "__pycache__" in relative.parts or path.suffix == ".pyc" or not path.is_file():
            continue
        found.append((relative.as_posix(), path))
    yield from sorted(found)


def _item(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def simulated_mr_enclave(
    *,
    custodian_ca: bytes,
    package_roots: Mapping[str, Path] | None = None,
) -> bytes:
    """The simulated MRENCLAVE (32 bytes) of an enclave with this code and CA.

    Args:
        custodian_ca: the pinned custodian CA certificate, exactly as the enclave reads it.
        package_roots: package name -> directory; default :func:`default_package_roots`.
            Tests pass a copied tree.

    Raises:
        ConfigError: a package root is missing (from :func:`default_package_roots`).
        OSError: a file cannot be read.
    """
    roots = default_package_roots() if package_roots is None else package_roots
    digest = hashlib.sha256(_ENCLAVE_DOMAIN)
    for name in sorted(roots):
        digest.update(b"P" + _item(name.encode()))
        for relative, path in _files(Path(roots[name])):
            digest.update(b"F" + _item(relative.encode()) + _item(path.read_bytes()))
    digest.update(b"C" + _item(custodian_ca))
    return digest.digest()


def simulated_mr_signer(public_key: PublicKeyTypes | None = None) -> bytes:
    """A simulated MRSIGNER: :data:`SIMULATION_MR_SIGNER`, or one derived from a key.

    The key form hashes the SubjectPublicKeyInfo DER under a domain tag, so it can never
    collide with the fixed value or with a real SGX MRSIGNER computed over a modulus.
    """
    if public_key is None:
        return SIMULATION_MR_SIGNER
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(_SIGNER_DOMAIN + b"key\0" + spki).digest()
