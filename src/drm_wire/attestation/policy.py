"""Attestation policy files (TOML): which enclaves a custodian or a consumer accepts.

One format for both roles, written by the enclave's ``measure`` command beside the signed
enclave, like BlindAI's ``manifest.toml``::

    [enclave]
    mr_enclave = ["<64 hex>", ...]    # any of these; optional
    mr_signer = "<64 hex>"            # optional; at least one of the two is required
    isv_prod_id = 0                   # required, must be equal
    min_isv_svn = 0                   # enclave's ISV SVN must be >= this
    allow_debug = false               # DEBUG enclaves leak their memory: never in production
    tcb_statuses = ["UpToDate"]       # accepted Intel verdicts (Revoked never)
    accept_unknown_tcb_status = false # INSECURE opt-in: accept a quote judged without
                                      # collateral (its QE is still checked); logged loudly
    attributes_flags = "0x4"          # optional BlindAI-style masks: (value & mask) must
    attributes_mask_flags = "0xfffffffffffffffd"   # equal (expected & mask); INIT is implied
    attributes_xfrm = "0x3"
    attributes_mask_xfrm = "0xffffffffffffff1b"
    misc_select = "0x0"
    misc_mask = "0xffffffff"

    [simulation]                      # only where simulated enclaves are (insecurely) trusted
    trust_root = "sim-root.pem"       # relative to this file

The Quoting Enclave is always checked (:mod:`.qe_identity`); no key skips that. The key
``accept_without_collateral`` of earlier releases did, and is refused with a message
naming what replaces it: collateral given to the verifier (``--collateral``/``--pccs-url``)
or, knowingly, ``accept_unknown_tcb_status``.

:meth:`Policy.check` applies Gramine's verifier rules (``ra_tls_verify_common.c``): TCB
status, then attributes (DEBUG refused unless allowed; INIT and MODE64BIT required;
PROVISION_KEY and EINITTOKEN_KEY refused), then product id, SVN and measurements. Unknown
keys, wrong types and bad values raise :class:`~drm_wire.errors.ConfigError` naming the
key and the file, so a typo never silently widens what is accepted.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, final

import structlog
from cryptography import x509

from drm_wire.attestation.collateral import TcbStatus
from drm_wire.attestation.quote import (
    ATTRIBUTE_DEBUG,
    ATTRIBUTE_EINITTOKEN_KEY,
    ATTRIBUTE_INIT,
    ATTRIBUTE_MODE64BIT,
    ATTRIBUTE_PROVISION_KEY,
)
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.attestation.verify import TrustAnchors, VerifiedQuote
from drm_wire.errors import AttestationError, ConfigError
from drm_wire.toml_text import parse_toml_text

__all__ = [
    "DebugEnclaveError",
    "EnclaveAttributesError",
    "MeasurementMismatchError",
    "Policy",
    "PolicyViolation",
    "ProductIdMismatchError",
    "SignerMismatchError",
    "SimulationRefusedError",
    "SvnTooLowError",
    "TcbStatusError",
]

#: A policy is a dozen lines, its simulation root one certificate; far below this.
MAX_POLICY_BYTES: Final = 64 * 1024

_U64: Final = (1 << 64) - 1
_U32: Final = (1 << 32) - 1
_ENCLAVE_KEYS: Final = frozenset(
    {"mr_enclave", "mr_signer", "isv_prod_id", "min_isv_svn", "allow_debug", "tcb_statuses",
     "accept_unknown_tcb_status", "attributes_flags", "attributes_mask_flags", "attributes_xfrm",
     "attributes_mask_xfrm", "misc_select", "misc_mask"}
)  # fmt: skip
#: (value key, mask key, width) of the optional masked comparisons, BlindAI style.
_MASKS: Final = (
    ("attributes_flags", "attributes_mask_flags", _U64),
    ("attributes_xfrm", "attributes_mask_xfrm", _U64),
    ("misc_select", "misc_mask", _U32),
)


class PolicyViolation(AttestationError):
    """The evidence verified, but the enclave is not one this policy accepts."""

    check: ClassVar[str] = "policy"


class SimulationRefusedError(PolicyViolation):
    """A simulated quote reached a policy that does not trust simulation."""

    check: ClassVar[str] = "simulation"


class TcbStatusError(PolicyViolation):
    """Intel's TCB verdict (or its absence, without collateral) is not accepted."""

    check: ClassVar[str] = "tcb_status"


class DebugEnclaveError(PolicyViolation):
    """The enclave runs in debug mode, and the policy does not allow it."""

    check: ClassVar[str] = "debug"


class EnclaveAttributesError(PolicyViolation):
    """Attributes Gramine refuses (no INIT/MODE64BIT, PROVISION_KEY...) or a mask mismatch."""

    check: ClassVar[str] = "attributes"


class ProductIdMismatchError(PolicyViolation):
    """ISV product id differs from the policy's."""

    check: ClassVar[str] = "isv_prod_id"


class SvnTooLowError(PolicyViolation):
    """ISV SVN is below the policy's minimum: an older, perhaps vulnerable, build."""

    check: ClassVar[str] = "isv_svn"


class MeasurementMismatchError(PolicyViolation):
    """MRENCLAVE is not in the policy's list: different code or configuration."""

    check: ClassVar[str] = "mr_enclave"


class SignerMismatchError(PolicyViolation):
    """MRSIGNER differs: the enclave was signed by someone else."""

    check: ClassVar[str] = "mr_signer"


@final
@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """What enclaves to accept. Build from a file with :meth:`load` / :meth:`from_toml`.

    Attributes:
        mr_enclave: accepted MRENCLAVE values; empty means any (then ``mr_signer`` is set).
        mr_signer: required MRSIGNER, or ``None`` for any (then ``mr_enclave`` is set).
        simulation_root: the simulation root certificate to trust, or ``None``.
        simulation_root_path: that file's path as written in the policy (for :meth:`to_toml`).
        source: the file this came from, for error messages.
        The other attributes are the ``[enclave]`` keys of the module docstring.
    """

    mr_enclave: tuple[bytes, ...] = ()
    mr_signer: bytes | None = None
    isv_prod_id: int
    min_isv_svn: int = 0
    allow_debug: bool = False
    tcb_statuses: frozenset[TcbStatus] = frozenset({TcbStatus.UP_TO_DATE})
    accept_unknown_tcb_status: bool = False
    attributes_flags: int | None = None
    attributes_mask_flags: int | None = None
    attributes_xfrm: int | None = None
    attributes_mask_xfrm: int | None = None
    misc_select: int | None = None
    misc_mask: int | None = None
    simulation_root: x509.Certificate | None = None
    simulation_root_path: str | None = None
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        def bad(message: str, key: str) -> ConfigError:
            return ConfigError(message, path=self.source, key=key)

        if not self.mr_enclave and self.mr_signer is None:
            raise bad("at least one of mr_enclave and mr_signer is required", "enclave")
        for value in (*self.mr_enclave, self.mr_signer or bytes(32)):
            if not isinstance(value, bytes) or len(value) != 32:
                raise bad("measurements are 32 bytes", "mr_enclave/mr_signer")
        for key, limit in (("isv_prod_id", 0xFFFF), ("min_isv_svn", 0xFFFF)):
            value = getattr(self, key)
            if type(value) is not int or not 0 <= value <= limit:
                raise bad(f"must be an integer 0..{limit}", key)
        if TcbStatus.REVOKED in self.tcb_statuses:
            raise bad("a Revoked TCB is never acceptable", "tcb_statuses")
        if not self.tcb_statuses:
            raise bad("accepts nothing: no TCB status", "tcb_statuses")
        if type(self.accept_unknown_tcb_status) is not bool:
            raise bad("must be a boolean", "accept_unknown_tcb_status")
        for value_key, mask_key, limit in _MASKS:
            value, mask = getattr(self, value_key), getattr(self, mask_key)
            if mask is not None and value is None:
                raise bad(f"{mask_key} needs {value_key}", mask_key)
            for key, item in ((value_key, value), (mask_key, mask)):
                if item is not None and (type(item) is not int or not 0 <= item <= limit):
                    raise bad(f"must fit in {limit.bit_length()} bits", key)

    # --- loading and writing ---------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy file.

        Raises:
            ConfigError: unreadable, not TOML, or an invalid key or value.
        """
        try:
            text = _read_small(Path(path), MAX_POLICY_BYTES).decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read policy: {exc}", path=str(path)) from exc
        return cls.from_toml(text, path=path)

    @classmethod
    def from_toml(cls, text: str, *, path: str | Path | None = None) -> Policy:
        """Parse policy TOML; ``path`` names the file and anchors relative paths.

        Raises:
            ConfigError: not TOML, an unknown key, a wrong type or a bad value.
        """
        source = None if path is None else str(path)
        document = parse_toml_text(text, source)
        top = _Table(document, "", source, {"enclave", "simulation"})
        enclave_data = document.get("enclave")
        if isinstance(enclave_data, dict) and _REMOVED_KEY in enclave_data:
            raise ConfigError(_REMOVED_MESSAGE, path=source, key=f"enclave.{_REMOVED_KEY}")
        enclave = top.table("enclave", _ENCLAVE_KEYS, required=True)
        mr_signer = enclave.get("mr_signer", str, None)
        values: dict[str, Any] = {
            "mr_enclave": tuple(
                enclave.hex32(v, "mr_enclave") for v in enclave.strings("mr_enclave")
            ),
            "mr_signer": None if mr_signer is None else enclave.hex32(mr_signer, "mr_signer"),
            "isv_prod_id": enclave.get("isv_prod_id", int),
            "min_isv_svn": enclave.get("min_isv_svn", int, 0),
            "allow_debug": enclave.get("allow_debug", bool, False),
            "accept_unknown_tcb_status": enclave.get("accept_unknown_tcb_status", bool, False),
        }
        if "tcb_statuses" in enclave.data:
            values["tcb_statuses"] = frozenset(
                enclave.status(n) for n in enclave.strings("tcb_statuses")
            )
        for value_key, mask_key, _ in _MASKS:
            for key in (value_key, mask_key):
                values[key] = enclave.hex_int(key)
        simulation = top.table("simulation", {"trust_root"}, required=False)
        root_path = simulation.get("trust_root", str, None)
        if root_path is not None:
            base = Path(path).parent if path is not None else Path()
            values["simulation_root"] = simulation.certificate(base / root_path, "trust_root")
            values["simulation_root_path"] = root_path
        return cls(source=source, **values)

    def to_toml(self) -> str:
        """The policy as TOML that :meth:`from_toml` reads back to an equal policy.

        Raises:
            ValueError: a simulation root is set but ``simulation_root_path`` is not.
        """
        lines = ["[enclave]"]
        if self.mr_enclave:
            lines.append(
                "mr_enclave = [" + ", ".join(f'"{m.hex()}"' for m in self.mr_enclave) + "]"
            )
        if self.mr_signer is not None:
            lines.append(f'mr_signer = "{self.mr_signer.hex()}"')
        lines += [
            f"isv_prod_id = {self.isv_prod_id}",
            f"min_isv_svn = {self.min_isv_svn}",
            f"allow_debug = {str(self.allow_debug).lower()}",
            "tcb_statuses = [" + ", ".join(f'"{s.value}"' for s in sorted(self.tcb_statuses)) + "]",
        ]
        if self.accept_unknown_tcb_status:
            lines.append("accept_unknown_tcb_status = true  # INSECURE: no TCB verdict needed")
        for value_key, mask_key, _ in _MASKS:
            for key in (value_key, mask_key):
                if (value := getattr(self, key)) is not None:
                    lines.append(f'{key} = "{value:#x}"')
        if self.simulation_root is not None:
            if self.simulation_root_path is None:
                raise ValueError("simulation_root_path is needed to write the policy")
            # A JSON string literal is a valid TOML basic string.
            lines += ["", "[simulation]", f"trust_root = {json.dumps(self.simulation_root_path)}"]
        return "\n".join(lines) + "\n"

    def write(self, path: str | Path) -> None:
        """Write :meth:`to_toml` to ``path`` (``trust_root`` stays relative to it)."""
        Path(path).write_text(self.to_toml(), encoding="utf-8")

    # --- checking --------------------------------------------------------------------

    def trust_anchors(self) -> TrustAnchors:
        """Intel's root, plus the simulation root if this policy trusts one."""
        return TrustAnchors(simulation_root=self.simulation_root)

    def check(
        self, verified: VerifiedQuote, *, public_key_spki: bytes | None = None
    ) -> VerifiedEnclave:
        """Apply the policy to a verified quote.

        Args:
            verified: from :func:`~drm_wire.attestation.verify.verify_quote`.
            public_key_spki: the TLS key the quote binds, recorded in the result.

        Raises:
            PolicyViolation: a subclass naming the rule that refused the enclave.
        """
        if verified.simulated and self.simulation_root is None:
            raise SimulationRefusedError("simulated quote, and this policy trusts no simulation")
        status = verified.tcb_status
        if status is None:
            if not self.accept_unknown_tcb_status:
                raise TcbStatusError(
                    "TCB status unknown: the verifier has no collateral for this platform "
                    "(give it --collateral FILE or --pccs-url URL, or use an enclave that "
                    "staples its collateral)"
                )
        elif status not in self.tcb_statuses:
            advisories = ", ".join(verified.advisory_ids) or "none"
            raise TcbStatusError(
                f"TCB status {status.value} is not accepted (advisories: {advisories})"
            )
        body = verified.quote.body
        if body.attributes_flags & ATTRIBUTE_DEBUG and not self.allow_debug:
            raise DebugEnclaveError("debug enclave refused")
        required = ATTRIBUTE_INIT | ATTRIBUTE_MODE64BIT
        if body.attributes_flags & required != required:
            raise EnclaveAttributesError("enclave lacks the INIT or MODE64BIT attribute")
        if body.attributes_flags & (ATTRIBUTE_PROVISION_KEY | ATTRIBUTE_EINITTOKEN_KEY):
            raise EnclaveAttributesError(
                "enclave has the PROVISION_KEY or EINITTOKEN_KEY attribute"
            )
        self._check_masks(body.attributes_flags, body.attributes_xfrm, body.misc_select)
        if body.isv_prod_id != self.isv_prod_id:
            raise ProductIdMismatchError(f"ISV product id {body.isv_prod_id} != {self.isv_prod_id}")
        if body.isv_svn < self.min_isv_svn:
            raise SvnTooLowError(f"ISV SVN {body.isv_svn} < {self.min_isv_svn}")
        if self.mr_enclave and body.mr_enclave not in self.mr_enclave:
            raise MeasurementMismatchError(f"MRENCLAVE {body.mr_enclave.hex()} not accepted")
        if self.mr_signer is not None and body.mr_signer != self.mr_signer:
            raise SignerMismatchError(f"MRSIGNER {body.mr_signer.hex()} not accepted")
        if status is None:
            _log.warning(
                "tcb_status_unknown_accepted",
                policy=self.source,
                mr_enclave=body.mr_enclave.hex(),
                note="INSECURE: accept_unknown_tcb_status; revocation and TCB not checked",
            )
        return VerifiedEnclave._create(verified, public_key_spki)

    def _check_masks(self, flags: int, xfrm: int, misc: int) -> None:
        actual = {"attributes_flags": flags, "attributes_xfrm": xfrm, "misc_select": misc}
        for value_key, mask_key, limit in _MASKS:
            expected = getattr(self, value_key)
            if expected is None:
                continue
            if value_key == "attributes_flags":
                expected |= ATTRIBUTE_INIT  # every launched enclave has it (BlindAI does this)
            mask = getattr(self, mask_key)
            mask = limit if mask is None else mask
            if actual[value_key] & mask != expected & mask:
                raise EnclaveAttributesError(f"{value_key} {actual[value_key]:#x} fails the mask")


_MISSING: Final = object()
_REMOVED_KEY: Final = "accept_without_collateral"
_REMOVED_MESSAGE: Final = (
    "accept_without_collateral was removed: it skipped the Quoting Enclave check. The QE "
    "is now always checked; for a TCB verdict give the verifier collateral "
    "(--collateral FILE or --pccs-url URL, or an enclave that staples it), or, knowingly "
    "and insecurely, set accept_unknown_tcb_status = true"
)
_log = structlog.get_logger(__name__)


def _read_small(path: Path, limit: int) -> bytes:
    """A regular file of at most ``limit`` bytes: what a policy or its root looks like.

    A path a policy names may be anything (``/dev/zero``, a FIFO); reading it whole would
    never end. Without blocking and with a bound, it ends at once.

    Raises:
        OSError: unreadable, not a regular file, or larger than ``limit``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data


class _Table:
    """Typed access to one TOML table; every failure names the key and the file."""

    def __init__(
        self, data: Mapping[str, Any], prefix: str, source: str | None, allowed: Set[str]
    ) -> None:
        self.data, self.prefix, self.source = data, prefix, source
        for key in data:
            if key not in allowed:
                raise self.fail("unknown key", key)

    def fail(self, message: str, key: str) -> ConfigError:
        return ConfigError(message, path=self.source, key=f"{self.prefix}{key}")

    def table(self, key: str, allowed: Set[str], *, required: bool) -> _Table:
        value = self.data.get(key)
        if value is None and required:
            raise self.fail("missing table", key)
        if value is not None and not isinstance(value, dict):
            raise self.fail("must be a table", key)
        return _Table(value or {}, f"{key}.", self.source, allowed)

    def get(self, key: str, kind: type[Any], default: Any = _MISSING) -> Any:
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.fail("missing key", key)
            return default
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(f"must be {kind.__name__}, not {type(value).__name__}", key)
        return value

    def strings(self, key: str) -> list[str]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail("must be a list of strings", key)
        return value

    def hex32(self, value: str, key: str) -> bytes:
        try:
            raw = bytes.fromhex(value)
        except ValueError as exc:
            raise self.fail("not hexadecimal", key) from exc
        if len(raw) != 32:
            raise self.fail(f"must be 32 bytes (64 hex digits), got {len(raw)}", key)
        return raw

    def hex_int(self, key: str) -> int | None:
        value = self.get(key, str, None)
        if value is None:
            return None
        digits = value.lower().removeprefix("0x")
        if not digits or any(c not in "0123456789abcdef" for c in digits):
            raise self.fail('must be a hex string like "0x4"', key)
        return int(digits, 16)

    def status(self, name: str) -> TcbStatus:
        try:
            return TcbStatus(name)
        except ValueError as exc:
            raise self.fail(f"unknown TCB status {name!r}", "tcb_statuses") from exc

    def certificate(self, path: Path, key: str) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(_read_small(path, MAX_POLICY_BYTES))
        except OSError as exc:
            raise self.fail(f"cannot read {path}: {exc.strerror}", key) from exc
        except ValueError as exc:
            raise self.fail(f"{path} is not a PEM certificate", key) from exc
