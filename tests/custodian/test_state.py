"""The custodian's state directory: what init makes, and how load refuses bad state."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from drm_custodian._state_pki import key_pem, make_ca, make_server_cert
from drm_custodian.ledger import Ledger
from drm_custodian.state import (
    InitResult,
    LicenseRejected,
    StateExistsError,
    init_state_dir,
    load_state_dir,
)
from drm_custodian.state_lock import LOCK_FILE, StateLockedError, lock_state_dir
from drm_wire.errors import ConfigError


@pytest.fixture
async def made(tmp_path: Path) -> InitResult:
    return await init_state_dir(tmp_path / "state")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _license_file(made: InitResult) -> Path:
    return made.path / "licenses" / f"{made.license.license_id}.json"


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


async def test_init_makes_every_file_with_its_mode(made: InitResult) -> None:
    root = made.path
    assert _mode(root) == 0o700
    expected = {
        "ca.pem": 0o644,
        "ca.key": 0o600,
        "server.pem": 0o644,
        "server.key": 0o600,
        "admin.token": 0o600,
        "ledger.sqlite": 0o600,
        "state.json": 0o644,
        "licenses": 0o700,
        "handoff": 0o700,
        "custodian.lock": 0o600,
    }
    for name, mode in expected.items():
        assert _mode(root / name) == mode, name
    assert _mode(_license_file(made)) == 0o600
    assert _mode(made.license_path) == 0o600
    assert made.license_path.parent == root / "handoff"


async def test_a_directory_made_with_p384_keys_still_loads(made: InitResult) -> None:
    # Before P-256, init made P-384 keys signed with SHA-384: those directories stay valid.
    now = dt.datetime.now(dt.UTC)
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP384R1()),
        ec.generate_private_key(ec.SECP384R1()),
    )
    ca = make_ca(ca_key, now)
    server = make_server_cert(server_key, ca_key, ca, "localhost", now)
    pems = {
        "ca.pem": ca.public_bytes(serialization.Encoding.PEM),
        "ca.key": key_pem(ca_key),
        "server.pem": server.public_bytes(serialization.Encoding.PEM),
        "server.key": key_pem(server_key),
    }
    for name, data in pems.items():
        (made.path / name).write_bytes(data)
    state = load_state_dir(made.path)
    assert state.ca_cert == ca
    assert state.server_cert == server


async def test_certificates_are_as_specified(made: InitResult) -> None:
    ca = x509.load_pem_x509_certificate((made.path / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((made.path / "server.pem").read_bytes())
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (constraints.ca, constraints.path_length) == (True, 0)
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert ca_key.curve.name == "secp256r1"  # fast handshakes: see _state_pki
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)
    assert isinstance(server.signature_hash_algorithm, hashes.SHA256)
    ca.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


@pytest.mark.parametrize(
    ("hostname", "dns", "ips"),
    [
        ("custodian.example.com", ["custodian.example.com"], []),
        ("192.0.2.7", [], [ipaddress.ip_address("192.0.2.7")]),
    ],
)
async def test_other_hostnames_get_only_their_own_san(
    tmp_path: Path, hostname: str, dns: list[str], ips: list[object]
) -> None:
    made = await init_state_dir(tmp_path / "s", hostname=hostname)
    server = x509.load_pem_x509_certificate((made.path / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == dns
    assert san.get_values_for_type(x509.IPAddress) == ips
    assert load_state_dir(made.path).hostname == hostname


async def test_token_is_32_random_bytes_base64url(made: InitResult) -> None:
    text = (made.path / "admin.token").read_text()
    assert text.endswith("\n")
    assert len(base64.urlsafe_b64decode(text.strip() + "=")) == 32
    assert load_state_dir(made.path).admin_token == text.strip()


async def test_license_secret_is_only_in_the_handoff_file(made: InitResult) -> None:
    given = json.loads(made.license_path.read_text())
    assert given["borrower"] == "borrower"
    assert given["license_id"] == made.license.license_id
    secret = given["secret"]
    kept = json.loads(_license_file(made).read_text())
    assert kept["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    for path in made.path.rglob("*"):
        if path.is_file() and path != made.license_path:
            assert secret.encode() not in path.read_bytes(), path

    state = load_state_dir(made.path)
    assert state.verify_license(made.license.license_id, secret) == made.license
    assert state.borrowers == {"borrower"}
    assert state.pending_handoff == (made.license_path,)
    with pytest.raises(LicenseRejected):
        state.verify_license(made.license.license_id, secret[:-1] + "x")
    with pytest.raises(LicenseRejected):
        state.verify_license("lic_" + "0" * 32, secret)


async def test_load_round_trip_and_repr_hides_the_token(made: InitResult) -> None:
    state = load_state_dir(made.path)
    assert state.server_key_path == made.path / "server.key"
    assert state.ledger_path == made.ledger_path
    assert state.admin_token not in repr(state)
    ledger = await Ledger.open(state.ledger_path)
    try:
        assert (await ledger.balance("borrower")).supplied == 0
    finally:
        await ledger.aclose()


async def test_second_init_refuses_and_changes_nothing(made: InitResult) -> None:
    before = _tree_digest(made.path)
    with pytest.raises(StateExistsError, match="refusing to replace keys") as info:
        await init_state_dir(made.path)
    assert "ca.key" in info.value.existing
    assert _tree_digest(made.path) == before


async def test_init_into_an_existing_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir(mode=0o700)
    made = await init_state_dir(tmp_path / "s")
    load_state_dir(made.path)


async def test_init_refuses_when_any_single_state_file_exists(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir(mode=0o700)
    (root / "server.key").write_bytes(b"someone's key")
    with pytest.raises(StateExistsError) as info:
        await init_state_dir(root)
    assert info.value.existing == ["server.key"]
    assert sorted(p.name for p in root.iterdir()) == ["server.key"]
    assert (root / "server.key").read_bytes() == b"someone's key"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"hostname": "bad host"}, "hostname"),
        ({"hostname": "-x.example"}, "hostname"),
        ({"borrower": "../escape"}, "borrower"),
        ({"borrower": ""}, "borrower"),
    ],
)
async def test_init_refuses_bad_names(tmp_path: Path, kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        await init_state_dir(tmp_path / "s", **kwargs)
    assert info.value.key == key
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "name",
    ["state.json", "ca.pem", "ca.key", "server.pem", "server.key", "admin.token", "ledger.sqlite"],
)
async def test_missing_file_is_named(made: InitResult, name: str) -> None:
    (made.path / name).unlink()
    with pytest.raises(ConfigError, match="missing") as info:
        load_state_dir(made.path)
    assert info.value.path == str(made.path / name)


@pytest.mark.parametrize(
    ("name", "mode"),
    [("server.key", 0o644), ("ca.key", 0o640), ("admin.token", 0o604), ("ca.pem", 0o664)],
)
async def test_loose_permissions_are_refused_like_ssh(
    made: InitResult, name: str, mode: int
) -> None:
    os.chmod(made.path / name, mode)
    with pytest.raises(ConfigError, match="too open") as info:
        load_state_dir(made.path)
    assert info.value.path == str(made.path / name)
    assert f"{mode:04o}" in str(info.value)


async def test_loose_license_and_directory_permissions(made: InitResult) -> None:
    os.chmod(_license_file(made), 0o644)
    with pytest.raises(ConfigError, match="too open") as info:
        load_state_dir(made.path)
    assert info.value.path == str(_license_file(made))
    os.chmod(_license_file(made), 0o600)
    os.chmod(made.path, 0o777)
    with pytest.raises(ConfigError, match="writable by group or others") as info:
        load_state_dir(made.path)
    assert info.value.path == str(made.path)


async def test_symlinked_secret_is_refused(made: InitResult, tmp_path: Path) -> None:
    token = made.path / "admin.token"
    elsewhere = tmp_path / "token-elsewhere"
    elsewhere.write_bytes(token.read_bytes())
    token.unlink()
    token.symlink_to(elsewhere)
    with pytest.raises(ConfigError) as info:
        load_state_dir(made.path)
    assert info.value.path == str(token)


def _overwrite(path: Path, data: bytes) -> None:
    mode = _mode(path)
    path.write_bytes(data)
    os.chmod(path, mode)


async def test_tampered_files_are_named(made: InitResult, tmp_path: Path) -> None:
    root = made.path
    other = await init_state_dir(tmp_path / "other")
    pristine = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    cases = [
        ("ca.pem", b"-----BEGIN CERTIFICATE-----\ngarbage\n", "not a valid PEM"),
        ("ca.pem", (root / "server.pem").read_bytes(), "not a CA"),
        ("ca.key", (other.path / "ca.key").read_bytes(), "does not match"),
        ("server.pem", (other.path / "server.pem").read_bytes(), "not signed by ca.pem"),
        ("server.key", (root / "ca.key").read_bytes(), "does not match"),
        ("server.key", b"not a key", "not a valid"),
        ("admin.token", b"short\n", "32 bytes"),
        ("admin.token", b"A" * 43 + b"\xff\n", "32 bytes"),
        ("state.json", b"{", "not valid JSON"),
        (
            "state.json",
            json.dumps({"format": "drm-custodian-state", "version": 2}).encode(),
            "version 1",
        ),
    ]
    for name, data, message in cases:
        _overwrite(root / name, data)
        with pytest.raises(ConfigError, match=message) as info:
            load_state_dir(root)
        assert info.value.path == str(root / name), name
        _overwrite(root / name, pristine[name])
    load_state_dir(root)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ({"secret_sha256": "00"}, "secret_sha256"),
        ({"borrower": "bad name"}, "borrower"),
        ({"license_id": "lic_" + "1" * 32}, "license_id"),
        ({"format": "other"}, "format"),
        ({"max_instances": 0}, "max_instances"),
        ({"max_instances": 1001}, "max_instances"),
        ({"max_instances": True}, "max_instances"),
        ({"max_instances": 2.0}, "max_instances"),
        ({"max_instances": "3"}, "max_instances"),
        ({"max_instances": None}, "max_instances"),
    ],
)
async def test_tampered_license_record_is_named(
    made: InitResult, edit: dict[str, object], key: str
) -> None:
    path = _license_file(made)
    doc = json.loads(path.read_text())
    _overwrite(path, json.dumps({**doc, **edit}).encode())
    with pytest.raises(ConfigError) as info:
        load_state_dir(made.path)
    assert (info.value.path, info.value.key) == (str(path), key)


async def test_a_license_admits_one_instance_unless_its_record_says_more(
    made: InitResult,
) -> None:
    """I23: ``max_instances`` is optional in the record; absent means one, as before."""
    assert load_state_dir(made.path).licenses[made.license.license_id].max_instances == 1
    path = _license_file(made)
    doc = json.loads(path.read_text())
    _overwrite(path, json.dumps({**doc, "max_instances": 256}).encode())
    assert load_state_dir(made.path).licenses[made.license.license_id].max_instances == 256


async def test_no_license_is_refused(made: InitResult) -> None:
    _license_file(made).unlink()
    with pytest.raises(ConfigError, match="no license"):
        load_state_dir(made.path)


async def test_expired_server_certificate_is_named(made: InitResult) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=4 * 365)
    with pytest.raises(ConfigError, match="expired") as info:
        load_state_dir(made.path, now=later)
    assert info.value.path == str(made.path / "server.pem")


# --- the lock: one custodian per state directory (I16) ---------------------------------


async def test_the_state_lock_is_exclusive_names_its_holder_and_is_freed(
    made: InitResult,
) -> None:
    held = lock_state_dir(made.path)
    assert _mode(made.path / LOCK_FILE) == 0o600
    with pytest.raises(StateLockedError) as refused:
        lock_state_dir(made.path)  # another open file description: flock refuses it too
    assert refused.value.pid == os.getpid()
    assert str(refused.value) == (
        f"process {os.getpid()} already runs a custodian on this state directory; stop it "
        f"first (two custodians on one ledger would lend one license twice) (in {made.path})"
    )
    held.release()
    with lock_state_dir(made.path) as again:
        assert again.path == made.path / LOCK_FILE
    lock_state_dir(made.path).release()


async def test_a_lock_file_that_is_a_symlink_or_shared_is_refused(made: InitResult) -> None:
    target = made.path.parent / "elsewhere"
    target.write_text("")
    (made.path / LOCK_FILE).unlink()  # init left it, unlocked
    (made.path / LOCK_FILE).symlink_to(target)
    with pytest.raises(ConfigError, match="cannot open the lock file"):
        lock_state_dir(made.path)
    (made.path / LOCK_FILE).unlink()
    (made.path / LOCK_FILE).write_text("")
    os.chmod(made.path / LOCK_FILE, 0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        lock_state_dir(made.path)


async def test_a_garbled_lock_file_still_refuses_without_a_pid(made: InitResult) -> None:
    with lock_state_dir(made.path):
        (made.path / LOCK_FILE).write_text("not a pid")  # the holder's text, overwritten
        with pytest.raises(StateLockedError, match=r"^another process already runs") as refused:
            lock_state_dir(made.path)
        assert refused.value.pid is None


def _with_license_fields(made: InitResult, **fields: object) -> None:
    path = _license_file(made)
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"max_instances": 0}, "max_instances"),
        ({"max_instances": 1001}, "max_instances"),
        ({"max_instances": "2"}, "max_instances"),
        ({"max_instances": True}, "max_instances"),
        ({"models": []}, "models"),
        ({"models": "tiny"}, "models"),
        ({"models": ["tiny", "tiny"]}, "models"),
        ({"models": ["../tiny"]}, "models"),
        ({"models": [f"m{i}" for i in range(65)]}, "models"),
        ({"removed": 1}, "removed"),
    ],
)
async def test_hostile_license_record_fields_are_named(
    made: InitResult, fields: dict[str, object], key: str
) -> None:
    _with_license_fields(made, **fields)
    with pytest.raises(ConfigError, match="invalid license record") as caught:
        load_state_dir(made.path)
    assert caught.value.key == key


async def test_license_record_fields_load_and_a_removed_license_is_refused(
    made: InitResult,
) -> None:
    secret = json.loads((made.path / "handoff" / "borrower.license.json").read_text())["secret"]
    _with_license_fields(made, max_instances=4, models=["tiny", "big"])
    record = load_state_dir(made.path).verify_license(made.license.license_id, secret)
    assert (record.max_instances, record.models, record.removed) == (4, ("tiny", "big"), False)
    _with_license_fields(made, removed=True)
    state = load_state_dir(made.path)
    with pytest.raises(LicenseRejected):
        state.verify_license(made.license.license_id, secret)
    assert state.borrowers == frozenset()
    assert state.license_of("borrower") is not None


async def test_two_licenses_for_one_borrower_are_refused(made: InitResult) -> None:
    doc = json.loads(_license_file(made).read_text())
    other = "lic_" + "1" * 32
    doc["license_id"] = other
    path = made.path / "licenses" / f"{other}.json"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="a second license for borrower borrower"):
        load_state_dir(made.path)


async def test_a_record_rewrite_cut_short_leaves_the_old_record(made: InitResult) -> None:
    leftover = made.path / "licenses" / f".{made.license.license_id}.json.new"
    leftover.write_text("{tor")
    leftover.chmod(0o600)
    assert load_state_dir(made.path).licenses == {made.license.license_id: made.license}
