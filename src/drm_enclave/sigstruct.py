"""The policy for a real SGX build, from what ``gramine-sgx-sigstruct-view`` says about it.

``gramine/Makefile`` signs the enclave, then runs::

    gramine-sgx-sigstruct-view --output-format=json drm_enclave.sig drm_enclave.sigstruct.json
    python3 -m drm_enclave measure --sigstruct drm_enclave.sigstruct.json \\
        --custodian-ca custodian-ca.pem --manifest drm_enclave.manifest.sgx --out policy.toml

The JSON has exactly these keys (Gramine's default, "quiet" output)::

    {"mr_signer": "<64 hex>", "mr_enclave": "<64 hex>", "isv_prod_id": 1, "isv_svn": 1,
     "debug_enclave": false}

and with ``--verbose`` also ``attribute_flags``, ``attribute_xfrms``, ``misc_select``,
``attribute_flags_mask``, ``attribute_xfrm_mask``, ``misc_mask`` (``"0x..."`` strings) and
``date`` (``"2025-01-31"``). Anything else (another key, a wrong type, upper-case or
short hex, a number out of range, a duplicate key, more than :data:`MAX_SIGSTRUCT_BYTES`)
is refused with a :class:`~drm_wire.errors.ConfigError` naming the key: the policy is
what every custodian and consumer trusts, so it is built only from a document shaped
exactly like the tool's output.

The policy (:func:`hardware_policy`) is the same TOML format ``measure`` writes for the
simulation, and pins everything the SIGSTRUCT fixes: MRENCLAVE (this exact code, manifest
and pinned CA) and MRSIGNER (this signing key), the ISV product id, the ISV SVN as the
minimum, no debug enclaves, Intel's root as the only trust anchor (no ``[simulation]``
table), and only the TCB statuses the builder accepts (default ``UpToDate``). A debug
build gets no policy at all: its memory can be read by the host, so it must never be
trusted.

The custodian CA is part of MRENCLAVE (a trusted file the manifest passes to
``--custodian-ca``); given the signed manifest of the same build, :func:`check_ca_measured`
checks that the CA file at hand is the one measured, so a policy is not written for a build
that pins another CA.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from cryptography import x509

from drm_daemon.config_file import read_bounded
from drm_wire.attestation.collateral import TcbStatus
from drm_wire.attestation.policy import Policy
from drm_wire.errors import ConfigError

from .manifest_lint import argv_option, host_path, load_manifest, trusted_entries

__all__ = [
    "MAX_SIGSTRUCT_BYTES",
    "SigstructView",
    "check_ca_measured",
    "hardware_policy",
    "measure_sigstruct",
    "parse_sigstruct_view",
]

#: The tool's JSON is about 300 bytes (600 verbose); refuse to read anything much larger.
MAX_SIGSTRUCT_BYTES: Final = 4096
_QUIET_KEYS: Final = frozenset({"mr_signer", "mr_enclave", "isv_prod_id", "isv_svn",
                                "debug_enclave"})  # fmt: skip
#: Verbose-only keys and the bit width of each hex value (``date`` is checked apart).
_VERBOSE_HEX: Final = {
    "attribute_flags": 64,
    "attribute_xfrms": 64,
    "misc_select": 32,
    "attribute_flags_mask": 64,
    "attribute_xfrm_mask": 64,
    "misc_mask": 32,
}
_VERBOSE_KEYS: Final = _QUIET_KEYS | _VERBOSE_HEX.keys() | {"date"}
_HEX256: Final = re.compile(r"[0-9a-f]{64}")
_HEX_INT: Final = re.compile(r"0x[0-9a-f]{1,16}")
#: Gramine prints the SIGSTRUCT's BCD date fields as plain integers, unpadded in older versions.
_DATE: Final = re.compile(r"[0-9]{1,5}-[0-9]{1,2}-[0-9]{1,2}")
#: SGX ATTRIBUTES.FLAGS bit 1: the enclave can be debugged.
_ATTRIBUTE_DEBUG: Final = 0x2


@dataclass(frozen=True, slots=True)
class SigstructView:
    """The validated fields of ``gramine-sgx-sigstruct-view --output-format=json``."""

    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    debug_enclave: bool


def parse_sigstruct_view(raw: bytes, *, source: str | None = None) -> SigstructView:
    """Validate the tool's JSON output (see the module docstring for the exact format).

    Raises:
        ConfigError: too large, not UTF-8 JSON, not exactly the tool's keys, or a bad value.
    """

    def bad(message: str, key: str | None = None) -> ConfigError:
        return ConfigError(message, path=source, key=key)

    if len(raw) > MAX_SIGSTRUCT_BYTES:
        raise bad(f"sigstruct JSON is larger than {MAX_SIGSTRUCT_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constant)  # fmt: skip
    except _DuplicateKey as exc:
        raise bad("duplicate key", str(exc)) from None
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        raise bad("not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise bad("sigstruct JSON must be an object")
    keys = doc.keys()
    if keys != _QUIET_KEYS and keys != _VERBOSE_KEYS:
        if unknown := sorted(keys - _VERBOSE_KEYS):
            raise bad("unknown key", unknown[0])
        expected = _QUIET_KEYS if keys <= _QUIET_KEYS else _VERBOSE_KEYS
        raise bad("missing key", sorted(expected - keys)[0])
    measurements = {}
    for key in ("mr_enclave", "mr_signer"):
        value = doc[key]
        if not isinstance(value, str) or not _HEX256.fullmatch(value):
            raise bad("must be 64 lower-case hex digits", key)
        measurements[key] = bytes.fromhex(value)
    numbers = {}
    for key in ("isv_prod_id", "isv_svn"):
        value = doc[key]
        if type(value) is not int or not 0 <= value <= 0xFFFF:
            raise bad("must be an integer 0..65535", key)
        numbers[key] = value
    debug = doc["debug_enclave"]
    if type(debug) is not bool:
        raise bad("must be true or false", "debug_enclave")
    if keys == _VERBOSE_KEYS:
        flags = _verbose_fields(doc, bad)
        if bool(flags & _ATTRIBUTE_DEBUG) != debug:
            raise bad("disagrees with the DEBUG bit of attribute_flags", "debug_enclave")
    return SigstructView(
        mr_enclave=measurements["mr_enclave"],
        mr_signer=measurements["mr_signer"],
        isv_prod_id=numbers["isv_prod_id"],
        isv_svn=numbers["isv_svn"],
        debug_enclave=debug,
    )


def _verbose_fields(doc: Mapping[str, Any], bad: Callable[..., ConfigError]) -> int:
    """Check the verbose-only fields; return ``attribute_flags``."""
    values = {}
    for key, bits in _VERBOSE_HEX.items():
        value = doc[key]
        if not isinstance(value, str) or not _HEX_INT.fullmatch(value):
            raise bad('must be a lower-case hex string like "0x4"', key)
        number = int(value, 16)
        if number >> bits:
            raise bad(f"must fit in {bits} bits", key)
        values[key] = number
    if not isinstance(doc["date"], str) or not _DATE.fullmatch(doc["date"]):
        raise bad("must be a date like 2025-01-31", "date")
    return values["attribute_flags"]


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def hardware_policy(
    view: SigstructView,
    custodian_ca_pem: bytes,
    *,
    tcb_statuses: Iterable[TcbStatus] = (TcbStatus.UP_TO_DATE,),
) -> Policy:
    """The policy that accepts exactly this signed build on genuine, up-to-date SGX.

    Raises:
        ConfigError: a debug enclave, a CA that is not a PEM certificate, or statuses the
            policy refuses (none, or Revoked).
    """
    if view.debug_enclave:
        raise ConfigError(
            "debug enclave: its memory is readable by the host, so no policy may accept it",
            key="debug_enclave",
        )
    _load_ca(custodian_ca_pem)
    return Policy(
        mr_enclave=(view.mr_enclave,),
        mr_signer=view.mr_signer,
        isv_prod_id=view.isv_prod_id,
        min_isv_svn=view.isv_svn,
        allow_debug=False,
        tcb_statuses=frozenset(tcb_statuses),
    )


def check_ca_measured(signed_manifest: Mapping[str, Any], custodian_ca_pem: bytes) -> None:
    """Require that the signed manifest measured exactly this CA as ``--custodian-ca``.

    Args:
        signed_manifest: the parsed ``.manifest.sgx`` (trusted files with their sha256).
        custodian_ca_pem: the CA the policy is being written for.

    Raises:
        ConfigError: the manifest passes no CA, or not through a trusted file, or the
            measured file's hash differs from this CA's.
    """
    loader = signed_manifest.get("loader", {})
    argv = loader.get("argv") if isinstance(loader, Mapping) else None
    inside = argv_option(argv, "--custodian-ca") if isinstance(argv, list) else None
    if not isinstance(inside, str):
        raise ConfigError("the signed manifest passes no --custodian-ca", key="loader.argv")
    uri = host_path(signed_manifest, inside)
    digests = [digest for entry, digest in trusted_entries(signed_manifest) if entry == uri]
    if uri is None or not digests or digests[0] is None:
        raise ConfigError(
            f"the signed manifest has no measured file for --custodian-ca {inside}",
            key="sgx.trusted_files",
        )
    if digests[0].lower() != hashlib.sha256(custodian_ca_pem).hexdigest():
        raise ConfigError(
            f"the enclave pins another custodian CA than this one ({uri})",
            key="sgx.trusted_files",
        )


def measure_sigstruct(
    sigstruct: Path,
    custodian_ca: Path,
    out: TextIO,
    *,
    manifest: Path | None = None,
    policy_path: Path | None = None,
    tcb_statuses: Iterable[TcbStatus] = (TcbStatus.UP_TO_DATE,),
) -> Policy:
    """``measure --sigstruct``: print the measurements and write the policy file.

    Raises:
        ConfigError: an unreadable or invalid input (the message names file and key).
    """
    raw = read_bounded(sigstruct, max_bytes=MAX_SIGSTRUCT_BYTES, what="the sigstruct JSON")
    view = parse_sigstruct_view(raw, source=str(sigstruct))
    ca_pem = read_bounded(custodian_ca, max_bytes=1024 * 1024, what="the custodian CA")
    policy = hardware_policy(view, ca_pem, tcb_statuses=tcb_statuses)
    if manifest is not None:
        check_ca_measured(load_manifest(manifest), ca_pem)
    print(f"MRENCLAVE {view.mr_enclave.hex()}", file=out)
    print(f"MRSIGNER  {view.mr_signer.hex()}", file=out)
    print(f"ISV_PROD_ID {view.isv_prod_id}  ISV_SVN {view.isv_svn}", file=out)
    if policy_path is not None:
        policy.write(policy_path)
        print(f"policy written to {policy_path}", file=out)
    return policy


def _load_ca(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError("the custodian CA is not a PEM certificate", key="custodian_ca") from exc
