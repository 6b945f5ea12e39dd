"""The simulated MRENCLAVE changes with any code file or the pinned CA, and ignores caches."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from drm_wire.attestation.measurement import (
    SIMULATION_MR_SIGNER,
    default_package_roots,
    simulated_mr_enclave,
    simulated_mr_signer,
)
from drm_wire.errors import ConfigError

CA = b"-----BEGIN CERTIFICATE-----\ncustodian CA\n-----END CERTIFICATE-----\n"


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    copied = {}
    for name, source in default_package_roots().items():
        copied[name] = tmp_path / name
        shutil.copytree(source, copied[name], ignore=shutil.ignore_patterns("__pycache__"))
    return copied


def test_default_roots_are_the_installed_packages() -> None:
    roots = default_package_roots()
    assert set(roots) == {"drm_enclave", "drm_wire"}
    assert (roots["drm_wire"] / "attestation" / "measurement.py").is_file()
    with pytest.raises(ConfigError, match="cannot locate") as info:
        default_package_roots(("no_such_package_here",))
    assert info.value.key == "no_such_package_here"


def test_digest_is_stable_and_32_bytes(roots: dict[str, Path]) -> None:
    first = simulated_mr_enclave(custodian_ca=CA, package_roots=roots)
    assert len(first) == 32
    assert (
        simulated_mr_enclave(custodian_ca=CA, package_roots=dict(reversed(roots.items()))) == first
    )


def test_any_change_changes_the_measurement(roots: dict[str, Path]) -> None:
    base = simulated_mr_enclave(custodian_ca=CA, package_roots=roots)
    seen = {base}
    code = roots["drm_wire"] / "errors.py"
    original = code.read_bytes()
    code.write_bytes(original + b"\n# patched\n")
    seen.add(simulated_mr_enclave(custodian_ca=CA, package_roots=roots))
    code.write_bytes(original)
    assert simulated_mr_enclave(custodian_ca=CA, package_roots=roots) == base
    seen.add(simulated_mr_enclave(custodian_ca=CA + b"\n", package_roots=roots))
    (roots["drm_enclave"] / "backdoor.py").write_text("evil = True\n")
    seen.add(simulated_mr_enclave(custodian_ca=CA, package_roots=roots))
    (roots["drm_enclave"] / "backdoor.py").rename(roots["drm_enclave"] / "backdoor2.py")
    seen.add(simulated_mr_enclave(custodian_ca=CA, package_roots=roots))
    assert len(seen) == 5


def test_caches_are_not_measured(roots: dict[str, Path]) -> None:
    base = simulated_mr_enclave(custodian_ca=CA, package_roots=roots)
    cache = roots["drm_wire"] / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "errors.cpython-311.pyc").write_bytes(b"bytecode")
    (roots["drm_wire"] / "stray.pyc").write_bytes(b"bytecode")
    assert simulated_mr_enclave(custodian_ca=CA, package_roots=roots) == base


def test_package_name_is_part_of_the_measurement(roots: dict[str, Path]) -> None:
    base = simulated_mr_enclave(custodian_ca=CA, package_roots=roots)
    renamed = {"other_name": roots["drm_wire"], "drm_enclave": roots["drm_enclave"]}
    assert simulated_mr_enclave(custodian_ca=CA, package_roots=renamed) != base


def test_default_roots_measure_the_installed_code() -> None:
    assert len(simulated_mr_enclave(custodian_ca=CA)) == 32


def test_simulated_signer() -> None:
    key_a = ec.generate_private_key(ec.SECP256R1()).public_key()
    key_b = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert simulated_mr_signer() == SIMULATION_MR_SIGNER
    assert len({simulated_mr_signer(), simulated_mr_signer(key_a), simulated_mr_signer(key_b)}) == 3
    assert simulated_mr_signer(key_a) == simulated_mr_signer(key_a)
