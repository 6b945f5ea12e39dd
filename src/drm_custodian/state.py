"""The custodian's state directory: its keys, admin token, license hashes and ledger.

Layout (made by :func:`init_state_dir`, read back by :func:`load_state_dir`)::

    <state>/                  0700
      ca.pem                  0644  custodian CA (ECDSA P-256, CA:TRUE, pathlen 0); enclaves pin it
      ca.key                  0600  its key; only needed to issue a new server certificate
      server.pem              0644  TLS server certificate, signed by the CA (admin API and
                                    enclave link both present it)
      server.key              0600
      admin.token             0600  bearer token for the admin API (32 random bytes, base64url)
      licenses/<id>.json      0600  one per license: borrower, license id, SHA-256 of its secret
      ledger.sqlite           0600  the ledger (:mod:`drm_custodian.ledger`)
      handoff/                0700  what the operator must hand over, then delete:
        <borrower>.license.json     the borrower's license, *with* its secret
      state.json              0644  format version and hostname; written last, so its absence
                                    means an init that did not finish
      custodian.lock          0600  held (flock) by the one process that writes the state:
                                    ``serve``, or ``init`` while it runs (:mod:`.state_lock`)

Licenses: a license is ``(borrower, license_id, secret)``. The borrower's enclave presents
the id and the secret over the attested, mutually authenticated link; the custodian looks
the id up and compares SHA-256 digests in constant time (:meth:`CustodianState.verify_license`).
The custodian keeps only the digest, so a copy of its state directory (a backup, a leaked
disk) does not let anyone present the license. A fast hash is right here: the secret is
32 random bytes, so there is nothing for a slow KDF to protect against. The secret itself
exists in one place only, ``handoff/``, until the operator moves it to the borrower.

Safety rules, as ssh applies them to its keys: nothing is ever overwritten (every file is
created with ``O_EXCL``, and a second init refuses, naming what exists); files are opened
with ``O_NOFOLLOW`` and must be regular files owned by us; secret files with any group or
other permission bit, or anything writable by group or others, are refused with an error
that names the file. Everything read back is validated (certificates chain and match their
keys, the token decodes to 32 bytes), so a tampered or truncated file is a clear
:class:`~drm_wire.errors.ConfigError` rather than a failure deep inside TLS.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog
import trio
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from drm_custodian._state_files import check_dir, check_file, load_json, read_checked
from drm_custodian._state_pki import (
    CA_CURVES,
    CURVE,
    key_pem,
    make_ca,
    make_server_cert,
)
from drm_custodian.ledger import Ledger
from drm_custodian.state_lock import StateLock, lock_state_dir
from drm_wire.errors import ConfigError, DrmError

log = structlog.get_logger(__name__)

#: Version of the layout above; another version is refused, not guessed at.
STATE_VERSION: Final = 1
STATE_FORMAT: Final = "drm-custodian-state"
LICENSE_FORMAT: Final = "drm-license"

CA_CERT: Final = "ca.pem"
CA_KEY: Final = "ca.key"
SERVER_CERT: Final = "server.pem"
SERVER_KEY: Final = "server.key"
ADMIN_TOKEN: Final = "admin.token"  # noqa: S105 (a file name)
LICENSES: Final = "licenses"
LEDGER: Final = "ledger.sqlite"
HANDOFF: Final = "handoff"
STATE_FILE: Final = "state.json"
#: Every name init creates: if any exists, init refuses.
_OWNED: Final = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, ADMIN_TOKEN, LICENSES, LEDGER)
_OWNED_ALL: Final = (*_OWNED, HANDOFF, STATE_FILE)

#: Warn at load time when the server certificate expires sooner than this.
EXPIRY_WARNING: Final = dt.timedelta(days=30)
#: Licenses loaded; bounds the work of a directory someone filled with junk.
MAX_LICENSES: Final = 10_000
#: The most live enclave instances one license may admit (a license record's
#: ``max_instances``): a fleet behind one load balancer, not an unbounded registry.
MAX_INSTANCES_PER_LICENSE: Final = 256

_TOKEN_BYTES: Final = 32
#: ``secrets.token_urlsafe(32)``: 43 base64url characters, no padding.
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}", re.ASCII)
#: Borrower names appear in file names and logs: a conservative charset.
_BORROWER_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_LICENSE_ID_RE: Final = re.compile(r"lic_[0-9a-f]{32}", re.ASCII)
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}", re.ASCII)
_DNS_LABEL_RE: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)", re.ASCII)


class StateExistsError(ConfigError):
    """``init`` found state files already there; it changed nothing.

    Attributes:
        existing: the names that exist.
    """

    def __init__(self, path: Path, existing: list[str]) -> None:
        super().__init__(
            f"state directory already initialised ({', '.join(existing)} exist); "
            "refusing to replace keys",
            path=str(path),
        )
        self.existing = existing


class LicenseRejected(DrmError):
    """A presented license is unknown or its secret is wrong. Deliberately uninformative."""


@dataclass(frozen=True, slots=True)
class LicenseRecord:
    """What the custodian keeps of a license: never the secret, only its SHA-256."""

    borrower: str
    license_id: str
    secret_sha256: str = field(repr=False)
    #: How many enclave instances may hold this license on live links at once (the
    #: record's optional ``max_instances``; 1 when absent, as before it existed).
    max_instances: int = 1


@dataclass(frozen=True, slots=True)
class InitResult:
    """What :func:`init_state_dir` made."""

    path: Path
    hostname: str
    license: LicenseRecord
    #: The borrower's license file, with its secret: hand it over, then delete it.
    license_path: Path
    ca_cert_path: Path
    admin_token_path: Path
    ledger_path: Path


@dataclass(frozen=True, slots=True)
class CustodianState:
    """A validated state directory. Build it with :func:`load_state_dir`."""

    path: Path
    hostname: str
    ca_cert: x509.Certificate
    server_cert: x509.Certificate
    admin_token: str = field(repr=False)
    licenses: Mapping[str, LicenseRecord]
    #: Files still in ``handoff/``: secrets that should have left this machine.
    pending_handoff: tuple[Path, ...]

    @property
    def ca_cert_path(self) -> Path:
        return self.path / CA_CERT

    @property
    def server_cert_path(self) -> Path:
        return self.path / SERVER_CERT

    @property
    def server_key_path(self) -> Path:
        return self.path / SERVER_KEY

    @property
    def ledger_path(self) -> Path:
        return self.path / LEDGER

    @property
    def borrowers(self) -> frozenset[str]:
        return frozenset(record.borrower for record in self.licenses.values())

    def verify_license(self, license_id: str, secret: str) -> LicenseRecord:
        """Check a license an enclave presented; return its record.

        Raises:
            LicenseRejected: unknown id or wrong secret (the same error for both).
        """
        record = self.licenses.get(license_id) if isinstance(license_id, str) else None
        if not isinstance(secret, str) or len(secret) > 256:
            secret = ""
        presented = hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()
        # Compare even for an unknown id, so the time taken does not tell ids apart.
        expected = record.secret_sha256 if record is not None else "0" * 64
        if not hmac.compare_digest(presented, expected) or record is None:
            raise LicenseRejected("license refused")
        return record


# --- init --------------------------------------------------------------------------------


async def init_state_dir(
    path: str | os.PathLike[str],
    *,
    hostname: str = "localhost",
    borrower: str = "borrower",
    now: dt.datetime | None = None,
) -> InitResult:
    """Create a new state directory: CA, server certificate, token, license, ledger.

    Args:
        path: the directory; created 0700 if missing. It may exist, empty of state files.
        hostname: the name enclaves and operators dial; goes in the server certificate's SAN
            (``localhost`` also gets 127.0.0.1 and ::1). A DNS name or an IP literal.
        borrower: the first borrower's name (``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``).
        now: the certificates' start time (tests pin it).

    Raises:
        StateExistsError: any state file already exists; nothing was changed.
        ConfigError: bad hostname or borrower, or the directory is unusable.
        LedgerStorageError: the ledger could not be created. The keys are then already
            written but ``state.json`` is not, so load and init both refuse the directory:
            remove it and start again (nothing in it was ever used).
    """
    root = Path(path)
    _check_hostname(hostname)
    if not _BORROWER_RE.fullmatch(borrower):
        raise ConfigError("borrower must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}", key="borrower")
    now = now or dt.datetime.now(dt.UTC)
    lock = await trio.to_thread.run_sync(_prepare_and_lock, root)
    try:
        record = await trio.to_thread.run_sync(_write_keys, root, hostname, borrower, now)
        ledger = await Ledger.open(root / LEDGER)
        await ledger.aclose()
        await trio.to_thread.run_sync(_finish_init, root, hostname, now)
    finally:
        lock.release()
    log.info(
        "state_initialised",
        path=str(root),
        hostname=hostname,
        borrower=borrower,
        license_id=record.license_id,
    )
    return InitResult(
        path=root,
        hostname=hostname,
        license=record,
        license_path=root / HANDOFF / f"{borrower}.license.json",
        ca_cert_path=root / CA_CERT,
        admin_token_path=root / ADMIN_TOKEN,
        ledger_path=root / LEDGER,
    )


def _check_hostname(hostname: str) -> None:
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        labels = hostname.split(".")
        if len(hostname) > 253 or not all(_DNS_LABEL_RE.fullmatch(label) for label in labels):
            raise ConfigError(
                "hostname must be a DNS name or an IP address", key="hostname"
            ) from None


def _prepare_dir(root: Path) -> None:
    try:
        root.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError("not a directory", path=str(root)) from None
        existing = [name for name in _OWNED_ALL if os.path.lexists(root / name)]
        if existing:
            raise StateExistsError(root, existing) from None
        check_dir(root)
    except OSError as exc:
        raise ConfigError(f"cannot create state directory: {exc.strerror}", path=str(root)) from exc


def _prepare_and_lock(root: Path) -> StateLock:
    _prepare_dir(root)
    return lock_state_dir(root)


def _write_keys(root: Path, hostname: str, borrower: str, now: dt.datetime) -> LicenseRecord:
    ca_key = ec.generate_private_key(CURVE())
    ca_cert = make_ca(ca_key, now)
    server_key = ec.generate_private_key(CURVE())
    server_cert = make_server_cert(server_key, ca_key, ca_cert, hostname, now)
    secret = secrets.token_urlsafe(_TOKEN_BYTES)
    record = LicenseRecord(
        borrower=borrower,
        license_id=f"lic_{secrets.token_hex(16)}",
        secret_sha256=hashlib.sha256(secret.encode()).hexdigest(),
    )
    # Keys first: a crash part-way leaves a directory that init refuses and load rejects
    # (state.json missing), never one where a key was silently replaced.
    _create(root / CA_KEY, key_pem(ca_key), 0o600)
    _create(root / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _create(root / SERVER_KEY, key_pem(server_key), 0o600)
    _create(root / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _create(root / ADMIN_TOKEN, (secrets.token_urlsafe(_TOKEN_BYTES) + "\n").encode(), 0o600)
    for sub in (LICENSES, HANDOFF):
        (root / sub).mkdir(mode=0o700)
        os.chmod(root / sub, 0o700)
    kept = {
        "format": LICENSE_FORMAT,
        "version": 1,
        "borrower": borrower,
        "license_id": record.license_id,
        "secret_sha256": record.secret_sha256,
    }
    _create(root / LICENSES / f"{record.license_id}.json", _json(kept), 0o600)
    given = {
        "format": LICENSE_FORMAT,
        "version": 1,
        "borrower": borrower,
        "license_id": record.license_id,
        "secret": secret,
    }
    _create(root / HANDOFF / f"{borrower}.license.json", _json(given), 0o600)
    return record


def _finish_init(root: Path, hostname: str, now: dt.datetime) -> None:
    os.chmod(root / LEDGER, 0o600)
    doc = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "hostname": hostname,
        "created": now.isoformat(),
    }
    _create(root / STATE_FILE, _json(doc), 0o644)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json(doc: object) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file with exactly ``mode``; never replace an existing one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    except FileExistsError:
        raise StateExistsError(path.parent, [path.name]) from None
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (0644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


# --- load --------------------------------------------------------------------------------


def load_state_dir(
    path: str | os.PathLike[str], *, now: dt.datetime | None = None, warn_handoff: bool = True
) -> CustodianState:
    """Read and validate a state directory made by :func:`init_state_dir`.

    Blocking (a few small reads): call it before ``trio.run`` or in ``trio.to_thread``.

    Args:
        path: the state directory.
        now: the time certificates are checked against (tests pin it).
        warn_handoff: log ``state_handoff_pending`` if ``handoff/`` still holds a
            secret (the daemon does, at every start; the admin commands do not).

    Raises:
        ConfigError: a file is missing, has loose permissions, or fails validation; the
            error's ``path`` names the file.
    """
    root = Path(path)
    now = now or dt.datetime.now(dt.UTC)
    check_dir(root)
    doc = load_json(root / STATE_FILE, secret=False)
    if doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
        raise ConfigError(
            f"not a {STATE_FORMAT} version {STATE_VERSION} file", path=str(root / STATE_FILE)
        )
    hostname = doc.get("hostname")
    if not isinstance(hostname, str):
        raise ConfigError("hostname must be a string", path=str(root / STATE_FILE), key="hostname")

    ca_cert = _load_cert(root / CA_CERT)
    _check_ca(ca_cert, root / CA_CERT)
    _load_key(root / CA_KEY, ca_cert)
    server_cert = _load_cert(root / SERVER_CERT)
    try:
        server_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError("not signed by ca.pem", path=str(root / SERVER_CERT)) from exc
    _check_validity(server_cert, root / SERVER_CERT, now)
    _check_validity(ca_cert, root / CA_CERT, now)
    _load_key(root / SERVER_KEY, server_cert)
    token = _load_token(root / ADMIN_TOKEN)
    licenses = _load_licenses(root / LICENSES)
    check_file(root / LEDGER, secret=False)  # opened by the daemon with Ledger.open

    handoff = root / HANDOFF
    pending = tuple(sorted(handoff.iterdir())) if handoff.is_dir() else ()
    if pending and warn_handoff:
        log.warning(
            "state_handoff_pending",
            files=[p.name for p in pending],
            fix="hand each file to its borrower, then delete it from handoff/",
        )
    return CustodianState(
        path=root,
        hostname=hostname,
        ca_cert=ca_cert,
        server_cert=server_cert,
        admin_token=token,
        licenses=licenses,
        pending_handoff=pending,
    )


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(read_checked(path, secret=False))
    except ValueError as exc:
        raise ConfigError(f"not a valid PEM certificate: {exc}", path=str(path)) from exc


def _check_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ConfigError("not a CA certificate (no basicConstraints)", path=str(path)) from None
    public = cert.public_key()
    if not constraints.ca:
        raise ConfigError("not a CA certificate", path=str(path))
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in CA_CURVES:
        raise ConfigError("CA key is not ECDSA P-256 or P-384", path=str(path))
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError("CA certificate is not validly self-signed", path=str(path)) from exc


def _check_validity(cert: x509.Certificate, path: Path, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise ConfigError(f"not valid before {cert.not_valid_before_utc}", path=str(path))
    if now > cert.not_valid_after_utc:
        raise ConfigError(f"expired on {cert.not_valid_after_utc}", path=str(path))
    if cert.not_valid_after_utc - now < EXPIRY_WARNING:
        log.warning("state_cert_expiring", path=str(path), not_after=str(cert.not_valid_after_utc))


def _load_key(path: Path, cert: x509.Certificate) -> None:
    try:
        key = serialization.load_pem_private_key(read_checked(path, secret=True), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("not a valid unencrypted PEM private key", path=str(path)) from exc
    encoding, fmt = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(encoding, fmt) != cert.public_key().public_bytes(
        encoding, fmt
    ):
        raise ConfigError("private key does not match its certificate", path=str(path))


def _load_token(path: Path) -> str:
    text = read_checked(path, secret=True).decode("ascii", "replace").removesuffix("\n")
    valid = _TOKEN_RE.fullmatch(text) is not None
    if valid:
        try:
            valid = len(base64.urlsafe_b64decode(text + "=")) == _TOKEN_BYTES
        except binascii.Error:
            valid = False
    if not valid:
        raise ConfigError(
            "admin token must be 32 bytes in base64url (43 characters)", path=str(path)
        )
    return text


def _load_licenses(directory: Path) -> dict[str, LicenseRecord]:
    check_dir(directory)
    records: dict[str, LicenseRecord] = {}
    for count, entry in enumerate(sorted(directory.iterdir())):
        if count >= MAX_LICENSES:
            raise ConfigError(f"more than {MAX_LICENSES} licenses", path=str(directory))
        doc = load_json(entry, secret=True)
        borrower, license_id, digest = (
            doc.get(k) for k in ("borrower", "license_id", "secret_sha256")
        )
        checks = {
            "format": doc.get("format") == LICENSE_FORMAT and doc.get("version") == 1,
            "borrower": isinstance(borrower, str) and _BORROWER_RE.fullmatch(borrower),
            "license_id": isinstance(license_id, str)
            and _LICENSE_ID_RE.fullmatch(license_id)
            and entry.name == f"{license_id}.json",
            "secret_sha256": isinstance(digest, str) and _SHA256_RE.fullmatch(digest),
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError("invalid license record", path=str(entry), key=key)
        max_instances = doc.get("max_instances", 1)
        if type(max_instances) is not int or not 1 <= max_instances <= MAX_INSTANCES_PER_LICENSE:
            raise ConfigError(
                f"max_instances must be an integer from 1 to {MAX_INSTANCES_PER_LICENSE}",
                path=str(entry),
                key="max_instances",
            )
        records[str(license_id)] = LicenseRecord(
            str(borrower), str(license_id), str(digest), max_instances
        )
    if not records:
        raise ConfigError("no license", path=str(directory))
    return records
