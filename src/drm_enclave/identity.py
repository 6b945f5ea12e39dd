"""Who the enclave is: its attested identity (RA-TLS credentials, measurements) and license.

On SGX (``--attestation gramine``) the quote comes from Gramine's ``/dev/attestation`` and
its MRENCLAVE/MRSIGNER are whatever the hardware measured. Everywhere else the enclave can
run in INSECURE SIMULATION (``--attestation simulated --simulation-dir DIR``): a
:class:`~drm_wire.attestation.insecure_simulation.SimulatedPlatform` in ``DIR`` signs a
quote whose MRENCLAVE is :func:`~drm_wire.attestation.measurement.simulated_mr_enclave`
over this build's code and the pinned custodian CA, and whose MRSIGNER is
:func:`~drm_wire.attestation.measurement.simulated_mr_signer`. A simulated quote proves
nothing; every use is logged loudly (here and by the platform itself).

:func:`simulation_policy` is what ``python -m drm_enclave measure`` writes: the policy
file the custodian and the consumers load to accept exactly this (simulated) build.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from drm_wire.attestation.gramine import (
    Backend,
    SimulatedEnclave,
    gramine_available,
    make_enclave_identity,
)
from drm_wire.attestation.insecure_simulation import ROOT_FILE, SimulatedPlatform
from drm_wire.attestation.measurement import simulated_mr_enclave, simulated_mr_signer
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.quote import parse_quote
from drm_wire.attestation.ratls_cert import RatlsCredentials, parse_ratls_certificate
from drm_wire.errors import ConfigError

__all__ = [
    "EnclaveIdentity",
    "License",
    "SimulatedMeasurement",
    "load_simulated_platform",
    "make_identity",
    "simulated_measurement",
    "simulation_policy",
    "warn_simulation",
]

#: ISV product id and SVN of the simulated build (what ``SimulatedEnclave`` defaults to).
SIMULATED_ISV_PROD_ID: Final = 0

_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SimulatedMeasurement:
    """MRENCLAVE and MRSIGNER of this build in simulation."""

    mr_enclave: bytes
    mr_signer: bytes


@dataclass(frozen=True, slots=True)
class EnclaveIdentity:
    """Our RA-TLS key and certificate, and what the quote in it says about us.

    Attributes:
        credentials: the key pair and RA-TLS certificate (fresh for each process).
        mr_enclave: the MRENCLAVE carried by our quote.
        simulated: True when the quote came from the INSECURE simulation.
        platform: the simulated platform that quoted, when simulated: it issues this
            platform's collateral, and its root is the one our quote chains to.
    """

    credentials: RatlsCredentials
    mr_enclave: bytes
    simulated: bool
    platform: SimulatedPlatform | None = None


@dataclass(frozen=True, slots=True)
class License:
    """The borrower's license as the custodian's ``init`` handed it over."""

    borrower: str
    license_id: str
    secret: str

    def hello_value(self) -> str:
        """``<license_id>:<secret>``, as ``hello.license`` carries it. Secret: never log it."""
        return f"{self.license_id}:{self.secret}"

    def __repr__(self) -> str:
        return f"License(borrower={self.borrower!r}, license_id={self.license_id!r})"


def simulated_measurement(custodian_ca_pem: bytes) -> SimulatedMeasurement:
    """This build's simulated MRENCLAVE (code + pinned CA) and MRSIGNER."""
    return SimulatedMeasurement(
        mr_enclave=simulated_mr_enclave(custodian_ca=custodian_ca_pem),
        mr_signer=simulated_mr_signer(),
    )


def load_simulated_platform(directory: Path) -> SimulatedPlatform:
    """Load the simulated platform in ``directory``, creating it on first use.

    Raises:
        ConfigError: the directory holds a damaged or partial platform.
    """
    if (directory / ROOT_FILE).exists():
        return SimulatedPlatform.load(directory)
    return SimulatedPlatform.create(directory)


def warn_simulation(**fields: object) -> None:
    """The loud warning every simulated start logs."""
    _log.warning(
        "insecure_simulation_mode",
        message="SIMULATION: this enclave's attestation is simulated and proves nothing; "
        "never trust it in production",
        **fields,
    )


def make_identity(
    backend: Backend,
    *,
    custodian_ca_pem: bytes,
    simulation_dir: Path | None,
    self_staple: bool = True,
) -> EnclaveIdentity:
    """Fresh RA-TLS credentials from the chosen attestation backend.

    ``"auto"`` uses Gramine when its device is present, else the simulation when a
    simulation directory was given, else fails (never silently unattested). A simulated
    certificate staples what its platform issues, unless ``self_staple`` is false (the
    collateral then comes from a PCCS, as on SGX: :mod:`drm_enclave.staple`).

    Raises:
        ConfigError: the backend is unavailable, or simulation was asked for without a
            directory, or the simulated platform is damaged.
        QuoteGenerationError: the Gramine device failed.
    """
    simulation: SimulatedEnclave | None = None
    platform: SimulatedPlatform | None = None
    if backend == "simulated" and simulation_dir is None:
        raise ConfigError("--attestation simulated needs --simulation-dir", key="simulation_dir")
    if backend != "gramine" and simulation_dir is not None:
        measurement = simulated_measurement(custodian_ca_pem)
        platform = load_simulated_platform(simulation_dir)
        simulation = SimulatedEnclave(
            platform,
            mr_enclave=measurement.mr_enclave,
            mr_signer=measurement.mr_signer,
            isv_prod_id=SIMULATED_ISV_PROD_ID,
        )
        if not self_staple:
            simulation.collateral = None
    credentials = make_enclave_identity(backend, simulation=simulation)
    quote = parse_quote(parse_ratls_certificate(credentials.certificate_der).quote)
    # "auto" with a simulation directory still prefers Gramine when its device is there.
    simulated = simulation is not None and not (backend == "auto" and gramine_available())
    if simulated:
        warn_simulation(mr_enclave=quote.body.mr_enclave.hex())
    return EnclaveIdentity(
        credentials, quote.body.mr_enclave, simulated, platform if simulated else None
    )


def simulation_policy(
    custodian_ca_pem: bytes, simulation_dir: Path, *, policy_path: Path | None
) -> Policy:
    """The policy that accepts this simulated build on the platform in ``simulation_dir``.

    The trust root is written relative to the policy file's directory (or as given, when
    there is no file), so the pair can be moved together.
    """
    measurement = simulated_measurement(custodian_ca_pem)
    platform = load_simulated_platform(simulation_dir)
    root_path = platform.root_certificate_path
    if policy_path is not None:
        written = os.path.relpath(root_path.resolve(), policy_path.resolve().parent)
    else:
        written = str(root_path)
    return Policy(
        mr_enclave=(measurement.mr_enclave,),
        mr_signer=measurement.mr_signer,
        isv_prod_id=SIMULATED_ISV_PROD_ID,
        allow_debug=False,
        simulation_root=platform.root_certificate,
        simulation_root_path=Path(written).as_posix(),
    )
