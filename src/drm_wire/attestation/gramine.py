"""Gramine attestation backend: quotes from ``/dev/attestation``, and the enclave identity.

Inside ``gramine-sgx`` with ``sgx.remote_attestation = "dcap"``, Gramine's LibOS exposes
``/dev/attestation`` (Gramine's attestation documentation): write 64 bytes of report data to
``user_report_data``, then read ``quote`` for a fresh DCAP quote over them. That is all
:func:`~.ratls_cert.build_ratls_certificate` needs to reproduce Gramine's own
``ra_tls_create_key_and_crt_der`` in pure Python. (The PyPI ``gramine-ratls`` package wraps
that C function with ctypes; we do not need it, so it is not required.)

This cannot run here: there is no SGX hardware in development or CI, so the device is
tested against a fake directory (the root is a parameter) and the real path is exercised
only on SGX machines. The files are process-local and the device is not thread-safe, so
callers make the identity once at start-up.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Final, Literal

import structlog

from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.ratls_cert import QuoteProvider, RatlsCredentials, build_ratls_certificate
from drm_wire.errors import AttestationError, ConfigError

_log = structlog.get_logger(__name__)

__all__ = [
    "ATTESTATION_ROOT",
    "GramineQuoteProvider",
    "QuoteGenerationError",
    "SimulatedEnclave",
    "gramine_available",
    "make_enclave_identity",
]

ATTESTATION_ROOT: Final = Path("/dev/attestation")
_REPORT_DATA_BYTES: Final = 64
_MAX_QUOTE_READ: Final = 64 * 1024

Backend = Literal["auto", "gramine", "simulated"]


class QuoteGenerationError(AttestationError):
    """Our own enclave could not obtain a quote (device missing, I/O error, empty quote)."""

    check: ClassVar[str] = "quote_generation"


def gramine_available(root: Path = ATTESTATION_ROOT) -> bool:
    """Whether ``root`` offers DCAP quotes: ``quote`` exists and the type reads ``dcap``."""
    try:
        kind = (root / "attestation_type").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return False
    return kind == "dcap" and (root / "quote").exists()


class GramineQuoteProvider:
    """``(report_data) -> quote`` through Gramine's ``/dev/attestation`` files."""

    def __init__(self, root: Path = ATTESTATION_ROOT) -> None:
        self.root = root

    def __call__(self, report_data: bytes) -> bytes:
        """Write ``report_data`` (zero-padded to 64 bytes) and read the fresh quote.

        Raises:
            ValueError: ``report_data`` is longer than 64 bytes.
            QuoteGenerationError: the device failed or returned nothing.
        """
        if len(report_data) > _REPORT_DATA_BYTES:
            raise ValueError("report_data is at most 64 bytes")
        try:
            (self.root / "user_report_data").write_bytes(
                report_data.ljust(_REPORT_DATA_BYTES, b"\0")
            )
            with (self.root / "quote").open("rb") as handle:
                quote = handle.read(_MAX_QUOTE_READ)
        except OSError as exc:
            raise QuoteGenerationError(f"Gramine quote device failed: {exc.strerror}") from exc
        if not quote:
            raise QuoteGenerationError("Gramine returned an empty quote")
        return quote


class SimulatedEnclave:
    """What the simulated backend needs: an (insecure) platform and the measurements.

    ``collateral`` is the platform's own collateral bundle, stapled to the certificate so
    verifiers judge the simulated quote through the production path (``None`` when the
    platform was made by a release that issued none).
    """

    def __init__(
        self,
        platform: SimulatedPlatform,
        *,
        mr_enclave: bytes,
        mr_signer: bytes,
        isv_prod_id: int = 0,
        isv_svn: int = 0,
        debug: bool = False,
    ) -> None:
        self.provider: QuoteProvider = platform.quote_provider(
            mr_enclave=mr_enclave,
            mr_signer=mr_signer,
            isv_prod_id=isv_prod_id,
            isv_svn=isv_svn,
            debug=debug,
        )
        try:
            self.collateral: bytes | None = platform.collateral().encode()
        except ConfigError as exc:
            _log.warning("simulated_platform_issues_no_collateral", reason=str(exc))
            self.collateral = None


def make_enclave_identity(
    backend: Backend = "auto",
    *,
    attestation_root: Path = ATTESTATION_ROOT,
    simulation: SimulatedEnclave | None = None,
    stapled_collateral: bytes | None = None,
) -> RatlsCredentials:
    """A fresh P-384 key and its RA-TLS certificate from the chosen backend.

    ``"auto"`` uses Gramine when its device is there, else the simulation if one was given
    (an explicit opt-in, logged on every quote), else fails: an enclave never silently
    runs without attestation. ``stapled_collateral`` (a bundle) goes into the certificate;
    the simulated backend staples its platform's own.

    Raises:
        ConfigError: the backend is unknown or unavailable, or simulation was not given.
        QuoteGenerationError: the Gramine device failed.
    """
    provider: QuoteProvider
    if backend == "gramine" or (backend == "auto" and gramine_available(attestation_root)):
        if not gramine_available(attestation_root):
            raise ConfigError(
                "Gramine DCAP attestation is not available", path=str(attestation_root)
            )
        provider = GramineQuoteProvider(attestation_root)
    elif backend in ("simulated", "auto"):
        if simulation is None:
            raise ConfigError(
                "no SGX attestation here and no simulated platform configured", key="backend"
            )
        provider = simulation.provider
        stapled_collateral = stapled_collateral or simulation.collateral
    else:
        raise ConfigError(f"unknown attestation backend {backend!r}", key="backend")
    return build_ratls_certificate(provider, stapled_collateral=stapled_collateral)
