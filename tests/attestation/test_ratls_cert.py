"""RA-TLS certificates: Gramine's format built exactly, real certificates parsed, and every
way the key binding or the evidence can be wrong refused with its own error class."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from OpenSSL import SSL

from drm_wire.attestation.errors import QuoteFormatError
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.quote import parse_quote
from drm_wire.attestation.ratls_cert import (
    LEGACY_QUOTE_OID,
    TCG_EVIDENCE_OID,
    CertificateFormatError,
    EvidenceMismatchError,
    KeyBindingError,
    build_ratls_certificate,
    encode_claims,
    encode_tcg_evidence,
    parse_ratls_certificate,
)

DATA = Path(__file__).parent.parent / "data" / "ratls"
MR_ENCLAVE = bytes.fromhex("11" * 32)
MR_SIGNER = bytes.fromhex("22" * 32)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("sim"))


def _quote(platform: SimulatedPlatform, report_data: bytes, **kw: object) -> bytes:
    fields: dict[str, object] = {"mr_enclave": MR_ENCLAVE, "mr_signer": MR_SIGNER} | kw
    return platform.quote(report_data, **fields)  # type: ignore[arg-type]


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _cert(
    key: CertificateIssuerPrivateKeyTypes, extensions: list[tuple[x509.ObjectIdentifier, bytes]]
) -> bytes:
    """A self-signed certificate with arbitrary (hostile) quote extensions."""
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "RATLS")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .serial_number(1)
        .not_valid_before(datetime(2001, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2030, 1, 1, tzinfo=UTC))
        .public_key(key.public_key())
    )
    for oid, value in extensions:
        builder = builder.add_extension(x509.UnrecognizedExtension(oid, value), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


def _rd(digest: bytes) -> bytes:
    return digest + bytes(32)


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


# --- real certificates -----------------------------------------------------------------


def test_real_gramine_cert_is_refused_by_cryptography_but_parses_here() -> None:
    pem = (DATA / "gramine-cert.pem").read_bytes()
    with pytest.raises(ValueError, match="ExtraData"):
        x509.load_pem_x509_certificate(pem)  # the explicit-NULL pitfall
    evidence = parse_ratls_certificate(pem)
    assert evidence.legacy_carrier == "gramine-legacy"
    assert evidence.tcg_quote is not None
    assert evidence.legacy_quote is not None
    assert evidence.tcg_quote != evidence.legacy_quote
    assert evidence.claims is not None
    assert evidence.claims.hash_alg == 1
    assert isinstance(evidence.public_key.curve, ec.SECP384R1)
    assert len(evidence.spki_der) == 120
    spki_hash = hashlib.sha256(evidence.spki_der).digest()
    assert parse_quote(evidence.legacy_quote).body.report_data == _rd(spki_hash)
    tcg_rd = parse_quote(evidence.tcg_quote).body.report_data
    assert tcg_rd == _rd(hashlib.sha256(evidence.claims.raw).digest())
    assert evidence.claims.pubkey_hash == spki_hash
    assert evidence.quote == evidence.tcg_quote


def test_real_gramine_cert_der_and_trusted_certificate_label() -> None:
    pem = (DATA / "gramine-cert.pem").read_bytes()
    der = base64.b64decode(b"".join(pem.splitlines()[1:-1]))
    trusted = pem.replace(b"CERTIFICATE-----", b"TRUSTED CERTIFICATE-----")
    # OpenSSL's TRUSTED CERTIFICATE appends an X509_CERT_AUX SEQUENCE; accepted and dropped.
    with_aux = base64.encodebytes(der + bytes.fromhex("3003 0101ff".replace(" ", "")))
    aux_pem = (
        b"-----BEGIN TRUSTED CERTIFICATE-----\n" + with_aux + b"-----END TRUSTED CERTIFICATE-----\n"
    )
    parsed = [parse_ratls_certificate(x) for x in (pem, der, trusted, aux_pem)]
    assert len({p.spki_der for p in parsed}) == 1
    assert len({p.quotes for p in parsed}) == 1


def test_other_producers_follow_the_interoperable_format() -> None:
    for name in ("rats-tls-cert.pem", "intel-sgxsdk-cert.pem"):  # transcription check
        cert = x509.load_pem_x509_certificate((DATA / name).read_bytes())
        cert.verify_directly_issued_by(cert)
    rats = parse_ratls_certificate((DATA / "rats-tls-cert.pem").read_bytes())
    assert rats.legacy_quote is None
    assert rats.tcg_quote is not None
    assert isinstance(rats.public_key.curve, ec.SECP256R1)
    assert rats.claims is not None
    assert rats.claims.other == ("key_0", "key_1")
    intel = parse_ratls_certificate((DATA / "intel-sgxsdk-cert.pem").read_bytes())
    assert intel.legacy_carrier == "intel-sgx-sdk"
    assert intel.legacy_quote == intel.tcg_quote  # Intel's SDK reuses the claims-bound quote


# --- what we build ---------------------------------------------------------------------


def test_built_certificate_matches_gramine_format(platform: SimulatedPlatform) -> None:
    seen: list[bytes] = []

    def provider(report_data: bytes) -> bytes:
        seen.append(report_data)
        return _quote(platform, report_data)

    creds = build_ratls_certificate(provider)
    cert = creds.certificate
    der = creds.certificate_der
    assert isinstance(creds.private_key.curve, ec.SECP384R1)
    assert cert.subject == cert.issuer
    assert [(a.oid, a.value) for a in cert.subject] == [
        (x509.NameOID.COMMON_NAME, "RATLS"),
        (x509.NameOID.ORGANIZATION_NAME, "GramineDevelopers"),
        (x509.NameOID.COUNTRY_NAME, "US"),
    ]
    real = (DATA / "gramine-cert.pem").read_bytes()
    real_der = base64.b64decode(b"".join(real.splitlines()[1:-1]))
    assert cert.subject.public_bytes() in real_der  # same string types as mbedTLS
    assert cert.serial_number == 1
    assert cert.not_valid_before_utc == datetime(2001, 1, 1, tzinfo=UTC)
    assert cert.not_valid_after_utc == datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256
    cert.verify_directly_issued_by(cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert not any(ext.critical for ext in cert.extensions)
    # Gramine's quirky legacy OID bytes, then OCTET STRING with a 2-byte length.
    assert bytes.fromhex("060b06092a864886f84d8a3906" + "0482") in der
    assert bytes.fromhex("0606678105050409" + "0482") in der
    spki = _spki(creds.private_key)
    claims = encode_claims(spki)
    assert claims == b"\xa1\x6bpubkey-hash\x58\x24\x82\x01\x58\x20" + hashlib.sha256(spki).digest()
    assert seen == [_rd(hashlib.sha256(spki).digest()), _rd(hashlib.sha256(claims).digest())]
    tcg = cert.extensions.get_extension_for_oid(TCG_EVIDENCE_OID).value.value  # type: ignore[attr-defined]
    assert tcg[:3] == b"\xd9\xea\x60"  # tag 60000
    evidence = parse_ratls_certificate(der)
    assert evidence.spki_der == spki


def test_credentials_load_into_pyopenssl(platform: SimulatedPlatform) -> None:
    creds = build_ratls_certificate(lambda rd: _quote(platform, rd))
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.use_certificate(creds.certificate)
    ctx.use_privatekey(creds.private_key)
    ctx.check_privatekey()
    assert serialization.load_pem_private_key(creds.private_key_pem, None).public_key() == (
        creds.private_key.public_key()
    )
    assert serialization.load_der_private_key(creds.private_key_der, None) is not None
    assert x509.load_pem_x509_certificate(creds.certificate_pem) == creds.certificate


def test_single_extension_certificates_parse(platform: SimulatedPlatform) -> None:
    only_tcg = build_ratls_certificate(lambda rd: _quote(platform, rd), legacy_extension=False)
    only_legacy = build_ratls_certificate(lambda rd: _quote(platform, rd), tcg_extension=False)
    assert parse_ratls_certificate(only_tcg.certificate_der).legacy_quote is None
    assert parse_ratls_certificate(only_legacy.certificate_der).tcg_quote is None
    p256 = build_ratls_certificate(
        lambda rd: _quote(platform, rd), private_key=ec.generate_private_key(ec.SECP256R1())
    )
    assert isinstance(parse_ratls_certificate(p256.certificate_der).public_key.curve, ec.SECP256R1)


def test_builder_refuses_bad_input(platform: SimulatedPlatform) -> None:
    with pytest.raises(ValueError, match="P-256 or P-384"):
        build_ratls_certificate(lambda rd: b"", private_key=ec.generate_private_key(ec.SECP521R1()))
    with pytest.raises(ValueError, match="at least one"):
        build_ratls_certificate(lambda rd: b"", legacy_extension=False, tcg_extension=False)
    with pytest.raises(CertificateFormatError) as info:
        build_ratls_certificate(lambda rd: bytes(9000))
    assert type(info.value) is CertificateFormatError


# --- hostile certificates ----------------------------------------------------------------


def _both(
    platform: SimulatedPlatform,
    key: ec.EllipticCurvePrivateKey,
    *,
    claims: bytes | None = None,
    tcg_rd: bytes | None = None,
    legacy_rd: bytes | None = None,
    tcg_kw: dict[str, object] | None = None,
) -> bytes:
    spki = _spki(key)
    claims = encode_claims(spki) if claims is None else claims
    tcg_quote = _quote(platform, tcg_rd or _rd(hashlib.sha256(claims).digest()), **(tcg_kw or {}))
    legacy = _quote(platform, legacy_rd or _rd(hashlib.sha256(spki).digest()))
    return _cert(
        key,
        [(LEGACY_QUOTE_OID, legacy), (TCG_EVIDENCE_OID, encode_tcg_evidence(tcg_quote, claims))],
    )


def _claims(entry: object, **extra: object) -> bytes:
    return cbor2.dumps({"pubkey-hash": cbor2.dumps(entry)} | extra)


def _hostile_cases(
    platform: SimulatedPlatform, key: ec.EllipticCurvePrivateKey
) -> Iterator[tuple[str, type[Exception], bytes]]:
    spki = _spki(key)
    digest = hashlib.sha256(spki).digest()
    other = _spki(ec.generate_private_key(ec.SECP384R1()))
    yield "legacy report_data not bound", KeyBindingError, _both(platform, key, legacy_rd=bytes(64))
    yield "tcg report_data not claims hash", KeyBindingError, _both(platform, key, tcg_rd=bytes(64))
    yield (
        "claims bind another key",
        KeyBindingError,
        _both(platform, key, claims=encode_claims(other)),
    )
    no_hash = cbor2.dumps({"nonce": b"x"})
    yield "claims without pubkey-hash", CertificateFormatError, _both(platform, key, claims=no_hash)
    yield (
        "unknown hash alg",
        CertificateFormatError,
        _both(platform, key, claims=_claims([2, digest])),
    )
    yield (
        "short hash",
        CertificateFormatError,
        _both(platform, key, claims=_claims([1, digest[:20]])),
    )
    yield (
        "bool alg id",
        CertificateFormatError,
        _both(platform, key, claims=_claims([True, digest])),
    )
    yield "entry not array", CertificateFormatError, _both(platform, key, claims=_claims({"a": 1}))
    bad_nonce = _claims([1, digest], nonce=5)
    yield "nonce not bytes", CertificateFormatError, _both(platform, key, claims=bad_nonce)
    yield "claims not map", CertificateFormatError, _both(platform, key, claims=cbor2.dumps([1]))
    yield (
        "extensions disagree",
        EvidenceMismatchError,
        _both(platform, key, tcg_kw={"mr_enclave": bytes(32)}),
    )
    legacy = _quote(platform, _rd(digest))
    tcg = _quote(platform, _rd(hashlib.sha256(encode_claims(spki)).digest()))
    good_evidence = encode_tcg_evidence(tcg, encode_claims(spki))
    bad_cbor = b"\xff" * 300
    yield (
        "invalid TCG, no fallback",
        CertificateFormatError,
        _cert(key, [(LEGACY_QUOTE_OID, legacy), (TCG_EVIDENCE_OID, bad_cbor)]),
    )
    wrong_tag = cbor2.dumps(cbor2.CBORTag(60001, [tcg, encode_claims(spki)]))
    yield "wrong CBOR tag", CertificateFormatError, _cert(key, [(TCG_EVIDENCE_OID, wrong_tag)])
    three = cbor2.dumps(cbor2.CBORTag(60000, [tcg, encode_claims(spki), b""]))
    yield "evidence not a pair", CertificateFormatError, _cert(key, [(TCG_EVIDENCE_OID, three)])
    trailing = good_evidence + b"\x00"
    yield (
        "evidence trailing byte",
        CertificateFormatError,
        _cert(key, [(TCG_EVIDENCE_OID, trailing)]),
    )
    yield (
        "extension too short",
        CertificateFormatError,
        _cert(key, [(LEGACY_QUOTE_OID, bytes(255))]),
    )
    long_value = legacy + bytes(8193 - len(legacy))
    yield "extension too long", CertificateFormatError, _cert(key, [(LEGACY_QUOTE_OID, long_value)])
    yield "truncated quote", QuoteFormatError, _cert(key, [(LEGACY_QUOTE_OID, legacy[:300])])
    yield "no quote extension", CertificateFormatError, _cert(key, [])
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    yield "RSA key", CertificateFormatError, _cert(rsa_key, [(LEGACY_QUOTE_OID, legacy)])
    ed_key = ed25519.Ed25519PrivateKey.generate()
    yield "Ed25519 key", CertificateFormatError, _cert(ed_key, [(LEGACY_QUOTE_OID, legacy)])
    p521 = ec.generate_private_key(ec.SECP521R1())
    yield "P-521 key", CertificateFormatError, _cert(p521, [(LEGACY_QUOTE_OID, legacy)])
    good = _both(platform, key)
    yield "truncated DER", CertificateFormatError, good[:-10]
    yield "trailing DER", CertificateFormatError, good + b"\x00"
    yield "empty input", CertificateFormatError, b""
    yield (
        "garbage PEM",
        CertificateFormatError,
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    )
    wrong_label = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    yield "wrong PEM label", CertificateFormatError, wrong_label
    yield "oversized input", CertificateFormatError, bytes(70_000)


@pytest.fixture(scope="module")
def hostile(platform: SimulatedPlatform) -> dict[str, tuple[type[Exception], bytes]]:
    key = ec.generate_private_key(ec.SECP384R1())
    return {name: (exc, data) for name, exc, data in _hostile_cases(platform, key)}


HOSTILE_NAMES = [
    "legacy report_data not bound", "tcg report_data not claims hash", "claims bind another key",
    "claims without pubkey-hash", "unknown hash alg", "short hash", "bool alg id",
    "entry not array", "nonce not bytes", "claims not map", "extensions disagree",
    "invalid TCG, no fallback", "wrong CBOR tag", "evidence not a pair", "evidence trailing byte",
    "extension too short", "extension too long", "truncated quote", "no quote extension", "RSA key",
    "Ed25519 key", "P-521 key", "truncated DER", "trailing DER", "empty input", "garbage PEM",
    "wrong PEM label", "oversized input",
]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_certificate_is_refused(
    name: str, hostile: dict[str, tuple[type[Exception], bytes]]
) -> None:
    expected, data = hostile[name]
    with pytest.raises(expected) as info:
        parse_ratls_certificate(data)
    assert type(info.value) is expected


def test_every_hostile_case_is_parametrized(hostile: dict[str, object]) -> None:
    assert sorted(hostile) == sorted(HOSTILE_NAMES)
