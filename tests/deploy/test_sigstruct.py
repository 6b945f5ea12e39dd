"""``drm_enclave.sigstruct``: the hardware policy from ``gramine-sgx-sigstruct-view`` JSON.

The valid documents are hand-made in the tool's exact format (its ``--output-format=json``
of ``json.dump(..., indent=4)``); the values are arbitrary but recognisable:

* ``mr_enclave``: bytes 0x00..0x1f, as if the enclave hash were a counter;
* ``mr_signer``: SHA-256 of ``b"test signer modulus"`` (MRSIGNER is SHA-256 of the key's
  modulus);
* ``isv_prod_id`` 1 and ``isv_svn`` 3, what ``make ISVPRODID=1 ISVSVN=3`` would sign;
* verbose extras: flags 0x4 (MODE64BIT, no DEBUG), xfrm 0x3 (x87 + SSE), plausible
  masks, and a date.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from drm_enclave.sigstruct import (
    MAX_SIGSTRUCT_BYTES,
    SigstructView,
    check_ca_measured,
    hardware_policy,
    measure_sigstruct,
    parse_sigstruct_view,
)
from drm_wire.attestation.collateral import TcbStatus
from drm_wire.attestation.policy import Policy
from drm_wire.errors import ConfigError

MR_ENCLAVE = bytes(range(32))
MR_SIGNER = hashlib.sha256(b"test signer modulus").digest()
QUIET: dict[str, Any] = {
    "mr_signer": MR_SIGNER.hex(),
    "mr_enclave": MR_ENCLAVE.hex(),
    "isv_prod_id": 1,
    "isv_svn": 3,
    "debug_enclave": False,
}
VERBOSE: dict[str, Any] = {
    **QUIET,
    "attribute_flags": "0x4",
    "attribute_xfrms": "0x3",
    "misc_select": "0x0",
    "attribute_flags_mask": "0xfffffffffffffffd",
    "attribute_xfrm_mask": "0xfffffffffff9ff1b",
    "misc_mask": "0xffffffff",
    "date": "2025-01-31",
}
CA_INSIDE = "/opt/drm-enclave/custodian-ca.pem"


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=4).encode()


def _ca_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test custodian CA")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2045, 1, 1, tzinfo=datetime.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def ca_pem() -> bytes:
    return _ca_pem()


# --- parsing ---------------------------------------------------------------------------------


def test_quiet_output_parses() -> None:
    assert parse_sigstruct_view(_json(QUIET)) == SigstructView(
        mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER, isv_prod_id=1, isv_svn=3, debug_enclave=False
    )


def test_verbose_output_parses_to_the_same() -> None:
    assert parse_sigstruct_view(_json(VERBOSE)) == parse_sigstruct_view(_json(QUIET))


def _with(base: dict[str, Any], **changes: Any) -> bytes:
    doc = {**base, **changes}
    return _json({key: value for key, value in doc.items() if value is not _DROP})


_DROP = object()
HEX_ERROR = "must be 64 lower-case hex digits (at '{}')"
INT_ERROR = "must be an integer 0..65535 (at '{}')"

HOSTILE: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "not UTF-8 JSON"),
    "not-utf8": (b'{"mr_enclave": "\xff"}', "not UTF-8 JSON"),
    "truncated": (_json(QUIET)[:-2], "not UTF-8 JSON"),
    "nan": (_json(QUIET).replace(b'"isv_svn": 3', b'"isv_svn": NaN'), "not UTF-8 JSON"),
    "deep-nesting": (b"[" * 4000, "not UTF-8 JSON"),
    "oversized": (
        _json(QUIET) + b" " * MAX_SIGSTRUCT_BYTES,
        f"sigstruct JSON is larger than {MAX_SIGSTRUCT_BYTES} bytes",
    ),
    "array": (b"[]", "sigstruct JSON must be an object"),
    "duplicate-key": (
        _json(QUIET)[:-2] + b',\n    "mr_enclave": "00"\n}',
        "duplicate key (at 'mr_enclave')",
    ),
    "unknown-key": (_with(QUIET, tcb="UpToDate"), "unknown key (at 'tcb')"),
    "missing-key": (_with(QUIET, isv_svn=_DROP), "missing key (at 'isv_svn')"),
    "partly-verbose": (_with(QUIET, date="2025-01-31"), "missing key (at 'attribute_flags')"),
    "mr-enclave-short": (_with(QUIET, mr_enclave="00" * 31), HEX_ERROR.format("mr_enclave")),
    "mr-enclave-long": (_with(QUIET, mr_enclave="00" * 33), HEX_ERROR.format("mr_enclave")),
    "mr-enclave-upper": (
        _with(QUIET, mr_enclave=MR_ENCLAVE.hex().upper()),
        HEX_ERROR.format("mr_enclave"),
    ),
    "mr-signer-not-hex": (_with(QUIET, mr_signer="zz" * 32), HEX_ERROR.format("mr_signer")),
    "mr-signer-number": (_with(QUIET, mr_signer=7), HEX_ERROR.format("mr_signer")),
    "prod-id-negative": (_with(QUIET, isv_prod_id=-1), INT_ERROR.format("isv_prod_id")),
    "prod-id-too-big": (_with(QUIET, isv_prod_id=65536), INT_ERROR.format("isv_prod_id")),
    "prod-id-bool": (_with(QUIET, isv_prod_id=True), INT_ERROR.format("isv_prod_id")),
    "svn-float": (_with(QUIET, isv_svn=3.0), INT_ERROR.format("isv_svn")),
    "svn-string": (_with(QUIET, isv_svn="3"), INT_ERROR.format("isv_svn")),
    "debug-string": (
        _with(QUIET, debug_enclave="false"),
        "must be true or false (at 'debug_enclave')",
    ),
    "flags-no-prefix": (
        _with(VERBOSE, attribute_flags="4"),
        "must be a lower-case hex string like \"0x4\" (at 'attribute_flags')",
    ),
    "flags-too-long": (
        _with(VERBOSE, attribute_flags="0x" + "f" * 17),
        "must be a lower-case hex string like \"0x4\" (at 'attribute_flags')",
    ),
    "misc-mask-wide": (
        _with(VERBOSE, misc_mask="0x1ffffffff"),
        "must fit in 32 bits (at 'misc_mask')",
    ),
    "bad-date": (_with(VERBOSE, date="yesterday"), "must be a date like 2025-01-31 (at 'date')"),
    "debug-bit-disagrees": (
        _with(VERBOSE, attribute_flags="0x6"),
        "disagrees with the DEBUG bit of attribute_flags (at 'debug_enclave')",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_input_is_refused(name: str) -> None:
    raw, message = HOSTILE[name]
    with pytest.raises(ConfigError) as caught:
        parse_sigstruct_view(raw)
    assert str(caught.value) == message


def test_errors_name_the_file() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_sigstruct_view(_with(QUIET, isv_svn=_DROP), source="drm_enclave.sigstruct.json")
    assert str(caught.value) == "missing key (in drm_enclave.sigstruct.json at 'isv_svn')"


# --- the policy ------------------------------------------------------------------------------


def test_policy_pins_the_build(ca_pem: bytes) -> None:
    policy = hardware_policy(parse_sigstruct_view(_json(QUIET)), ca_pem)
    assert policy == Policy(
        mr_enclave=(MR_ENCLAVE,),
        mr_signer=MR_SIGNER,
        isv_prod_id=1,
        min_isv_svn=3,
        allow_debug=False,
        tcb_statuses=frozenset({TcbStatus.UP_TO_DATE}),
        accept_unknown_tcb_status=False,
    )
    assert policy.simulation_root is None  # Intel's root only
    assert Policy.from_toml(policy.to_toml()) == policy


def test_policy_with_more_tcb_statuses(ca_pem: bytes) -> None:
    statuses = (TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED)
    policy = hardware_policy(parse_sigstruct_view(_json(QUIET)), ca_pem, tcb_statuses=statuses)
    assert policy.tcb_statuses == frozenset(statuses)


@pytest.mark.parametrize(
    ("statuses", "message"),
    [
        ((TcbStatus.REVOKED,), "a Revoked TCB is never acceptable (at 'tcb_statuses')"),
        ((), "accepts nothing: no TCB status (at 'tcb_statuses')"),
    ],
)
def test_policy_refuses_meaningless_statuses(
    ca_pem: bytes, statuses: tuple[TcbStatus, ...], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        hardware_policy(parse_sigstruct_view(_json(QUIET)), ca_pem, tcb_statuses=statuses)
    assert str(caught.value) == message


def test_no_policy_for_a_debug_enclave(ca_pem: bytes) -> None:
    view = parse_sigstruct_view(_with(VERBOSE, debug_enclave=True, attribute_flags="0x6"))
    with pytest.raises(ConfigError) as caught:
        hardware_policy(view, ca_pem)
    assert str(caught.value) == (
        "debug enclave: its memory is readable by the host, so no policy may accept it "
        "(at 'debug_enclave')"
    )


def test_ca_must_be_a_certificate() -> None:
    with pytest.raises(ConfigError) as caught:
        hardware_policy(parse_sigstruct_view(_json(QUIET)), b"not a certificate")
    assert str(caught.value) == "the custodian CA is not a PEM certificate (at 'custodian_ca')"


# --- the CA the signed manifest measured ---------------------------------------------------


def _signed_manifest(ca_pem: bytes, *, digest: str | None = None) -> dict[str, Any]:
    entry: Any = {"uri": "file:/opt/drm-enclave/ca.pem",
                  "sha256": digest or hashlib.sha256(ca_pem).hexdigest()}  # fmt: skip
    return {
        "loader": {"argv": ["python3", "-m", "drm_enclave", "serve", "--custodian-ca", CA_INSIDE]},
        "fs": {"mounts": [{"path": CA_INSIDE, "uri": "file:/opt/drm-enclave/ca.pem"}]},
        "sgx": {"trusted_files": [{"uri": "file:/lib/", "sha256": "00" * 32}, entry]},
    }


def test_the_measured_ca_is_this_one(ca_pem: bytes) -> None:
    check_ca_measured(_signed_manifest(ca_pem), ca_pem)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("other-ca", "the enclave pins another custodian CA than this one "
                     "(file:/opt/drm-enclave/ca.pem) (at 'sgx.trusted_files')"),
        ("unsigned", "the signed manifest has no measured file for --custodian-ca "
                     f"{CA_INSIDE} (at 'sgx.trusted_files')"),
        ("unmounted", "the signed manifest has no measured file for --custodian-ca "
                      f"{CA_INSIDE} (at 'sgx.trusted_files')"),
        ("no-argv", "the signed manifest passes no --custodian-ca (at 'loader.argv')"),
    ],
)  # fmt: skip
def test_the_measured_ca_mismatches(ca_pem: bytes, change: str, message: str) -> None:
    manifest = _signed_manifest(ca_pem, digest="ab" * 32 if change == "other-ca" else None)
    if change == "unsigned":
        manifest["sgx"]["trusted_files"][1] = "file:/opt/drm-enclave/ca.pem"
    elif change == "unmounted":
        manifest["fs"]["mounts"] = []
    elif change == "no-argv":
        del manifest["loader"]["argv"]
    with pytest.raises(ConfigError) as caught:
        check_ca_measured(manifest, ca_pem)
    assert str(caught.value) == message


# --- measure_sigstruct and the command line -------------------------------------------------


def _files(tmp_path: Path, ca_pem: bytes) -> tuple[Path, Path, Path]:
    sigstruct, ca, manifest = (tmp_path / n for n in ("s.json", "ca.pem", "e.manifest.sgx"))
    sigstruct.write_bytes(_json(QUIET))
    ca.write_bytes(ca_pem)
    digest = hashlib.sha256(ca_pem).hexdigest()
    manifest.write_text(
        'loader.argv = ["python3", "-m", "drm_enclave", "serve", '
        f'"--custodian-ca", "{CA_INSIDE}"]\n'
        f'fs.mounts = [{{ path = "{CA_INSIDE}", uri = "file:{ca}" }}]\n'
        f'sgx.trusted_files = [{{ uri = "file:{ca}", sha256 = "{digest}" }}]\n'
    )
    return sigstruct, ca, manifest


def test_measure_prints_and_writes_the_policy(tmp_path: Path, ca_pem: bytes) -> None:
    sigstruct, ca, manifest = _files(tmp_path, ca_pem)
    out, policy_path = io.StringIO(), tmp_path / "policy.toml"
    policy = measure_sigstruct(sigstruct, ca, out, manifest=manifest, policy_path=policy_path)
    assert out.getvalue() == (
        f"MRENCLAVE {MR_ENCLAVE.hex()}\n"
        f"MRSIGNER  {MR_SIGNER.hex()}\n"
        "ISV_PROD_ID 1  ISV_SVN 3\n"
        f"policy written to {policy_path}\n"
    )
    assert Policy.load(policy_path) == policy


def test_measure_refuses_a_missing_file(tmp_path: Path, ca_pem: bytes) -> None:
    _, ca, _ = _files(tmp_path, ca_pem)
    with pytest.raises(ConfigError) as caught:
        measure_sigstruct(tmp_path / "absent.json", ca, io.StringIO())
    assert str(caught.value) == (
        f"cannot read the sigstruct JSON: No such file or directory (in {tmp_path / 'absent.json'})"
    )


def test_measure_writes_nothing_for_another_ca(tmp_path: Path, ca_pem: bytes) -> None:
    sigstruct, ca, manifest = _files(tmp_path, ca_pem)
    ca.write_bytes(_ca_pem())
    with pytest.raises(ConfigError, match="pins another custodian CA"):
        measure_sigstruct(sigstruct, ca, io.StringIO(), manifest=manifest,
                          policy_path=tmp_path / "policy.toml")  # fmt: skip
    assert not (tmp_path / "policy.toml").exists()


def test_command_line(tmp_path: Path, ca_pem: bytes) -> None:
    """``python -m drm_enclave measure --sigstruct`` (once cli.py exposes it)."""
    sigstruct, ca, manifest = _files(tmp_path, ca_pem)
    policy_path = tmp_path / "policy.toml"
    done = subprocess.run(
        [sys.executable, "-m", "drm_enclave", "measure", "--sigstruct", str(sigstruct),
         "--custodian-ca", str(ca), "--manifest", str(manifest),
         "--accept-tcb-status", "UpToDate", "--accept-tcb-status", "SWHardeningNeeded",
         "--out", str(policy_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if "unrecognized arguments" in done.stderr:
        pytest.skip("src/drm_enclave/cli.py does not expose measure --sigstruct yet")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"MRENCLAVE {MR_ENCLAVE.hex()}"
    assert Policy.load(policy_path).tcb_statuses == frozenset(
        {TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED}
    )
