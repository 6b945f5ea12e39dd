"""The policy tests use to accept an enclave on a simulated platform."""

from __future__ import annotations

from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.policy import Policy


def simulation_policy(platform: SimulatedPlatform, mr_enclave: bytes) -> Policy:
    """Accept ``mr_enclave`` from ``platform``'s simulated quotes, without collateral."""
    return Policy(
        mr_enclave=(mr_enclave,),
        isv_prod_id=0,
        accept_unknown_tcb_status=True,
        simulation_root=platform.root_certificate,
        simulation_root_path=str(platform.root_certificate_path),
    )
