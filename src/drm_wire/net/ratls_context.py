"""RA-TLS in the TLS handshake: the four ``SSL.Context`` factories of the product.

Each factory is a thin composition of :func:`~drm_wire.net.tls.client_context` /
:func:`~drm_wire.net.tls.server_context` with a verifier; the verifier runs inside
OpenSSL's certificate-verify callback, so a refused peer fails the handshake before a
single application byte moves, and its proof object is what the connection's user reads
afterwards with :meth:`TLSStream.peer_identity_as <drm_wire.net.tls.TLSStream.peer_identity_as>`:

==========================  ===========  =================================  ==================
factory                     side         we present                         peer proof
==========================  ===========  =================================  ==================
enclave_server_context      enclave      RA-TLS cert (P-384); no client     none
                                         certificate requested
consumer_client_context     consumer     nothing                            VerifiedEnclave
enclave_client_context      enclave      RA-TLS cert as client cert         VerifiedCustodian
custodian_server_context    custodian    its CA-issued cert; *requires* a   VerifiedEnclave
                                         client certificate
==========================  ===========  =================================  ==================

The custodian's certificate (enclave side)
------------------------------------------
Ordinary X.509: OpenSSL verifies the chain up to the pinned custodian CA and nothing else
(not the system store), with OpenSSL's ``ssl_server`` purpose. On top of that the leaf
must carry ``extendedKeyUsage`` with ``serverAuth`` (a certificate the same CA issued
for another purpose, or for no stated purpose, is not a custodian), and, when the
enclave's measured configuration names the custodian (``custodian_name``), a
subjectAltName entry equal to that name: a DNS name (exact, case-insensitive, no
wildcards, no fallback to the common name) or an IP address. The name check is opt-in
because the trust decision is the CA pin: the CA is dedicated to the custodian and is a
trusted (measured) file of the enclave, so every ``serverAuth`` certificate it issued *is*
the custodian; a name only adds something when that CA issues server certificates to more
than one party, and it is only worth checking if it too comes from the measured
configuration (the address the host hands the enclave is attacker-controlled). Only the
leaf is sent by the custodian, so its certificate must be issued directly by the pinned
CA.

What repeated handshakes do not redo
------------------------------------
Verifying an RA-TLS certificate (:func:`~drm_wire.attestation.identity.verify_enclave_certificate`)
is parse the certificate and its quotes, verify the PCK chain, two ECDSA signatures per
quote, then the policy. Two caches keep a reconnecting enclave cheap:

* the PCK chain cache of :mod:`drm_wire.attestation.verify` (keyed by chain bytes and
  trust roots; dates re-checked on every call): every enclave of one platform shares its
  chain, so a *new* certificate from a known platform skips the chain signatures;
* :class:`VerificationCache`, here: the *same* certificate again (a reconnect of the same
  enclave process) skips parsing and every signature. The key is the exact certificate
  DER plus the trust roots the signatures were checked against. The value holds what
  cannot change for those bytes: the bound key and the ``VerifiedQuote`` of each carried
  quote, plus the validity window of its PCK chain. Everything that
  depends on time or on the caller is re-applied on every hit: the window against the
  clock (the same check ``verify_quote`` makes), and :meth:`Policy.check
  <drm_wire.attestation.policy.Policy.check>`, so the same cache serves any policy and a
  stricter policy takes effect at once. Only certificates that passed every check are
  stored (a refused peer cannot fill the cache), and the LRU is bounded. A cache hit
  proves nothing about the key holder: TLS itself makes the peer prove possession of the
  certificate's key in every handshake.

With collateral the TCB verdict depends on the collateral (CRLs, TCB info) and on its
validity at ``now``. Stapled collateral is part of the certificate's bytes, so the key
already names it; the stored window is narrowed to the window in which the collateral
that judged it is current, and a hit outside it re-verifies (and so fails closed once
the collateral expired). A verifier given its own collateral source keeps a private
cache keyed also by the source's generation (a PCCS cache counts its refreshes), so new
collateral takes effect at once. A verdict reached after passing over newer candidates is
not stored: a later ``now`` could choose differently.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import InitVar, dataclass
from datetime import UTC, datetime
from typing import Final, final

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL

from drm_wire._lru import LruCache
from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.collateral_source import CollateralSource, with_stapled
from drm_wire.attestation.errors import CertificateChainError, CertificateValidityError
from drm_wire.attestation.identity import make_certificate_verifier
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.ratls_cert import (
    RatlsCredentials,
    RatlsEvidence,
    parse_ratls_certificate,
)
from drm_wire.attestation.verified_enclave import VerifiedEnclave
from drm_wire.attestation.verify import VerifiedQuote, verify_quote
from drm_wire.errors import DrmError
from drm_wire.net._tls_context import PrivateKey, client_context, server_context

__all__ = [
    "VERIFICATION_CACHE",
    "CustodianCertificateError",
    "VerificationCache",
    "VerifiedCustodian",
    "consumer_client_context",
    "custodian_server_context",
    "enclave_client_context",
    "enclave_server_context",
    "make_cached_certificate_verifier",
]

#: Verified RA-TLS certificates remembered. One entry per live enclave process (each has
#: its own key and certificate; an entry with its parsed quotes is ~25 KiB); a custodian
#: or a consumer talks to a handful, so 128 (~3 MiB at most) is plenty.
VERIFICATION_CACHE_SIZE: Final = 128

#: (certificate DER, trust roots as ``TrustAnchors.roots`` spells them, generation of the
#: verifier's own collateral source: 0 without one).
_Key = tuple[bytes, tuple[tuple[bytes, bool], ...], int]
#: A custodian name, parsed: an IP address or a lower-case A-label DNS name.
_Name = ipaddress.IPv4Address | ipaddress.IPv6Address | str


class CustodianCertificateError(DrmError):
    """The custodian's certificate chains to the pinned CA but is not a custodian's.

    It has no extended key usage, or one without ``serverAuth`` (OpenSSL's purpose check
    refuses that first), or it does not name the configured custodian.
    """


@final
@dataclass(frozen=True, slots=True)
class VerifiedCustodian:
    """Proof that the server chained to the pinned custodian CA and passed the checks.

    Made only by the verifier of :func:`enclave_client_context`.

    Attributes:
        certificate: the custodian's leaf certificate.
        name: the name it was checked against, or ``None`` when no name was configured.
    """

    certificate: x509.Certificate
    name: str | None
    _token: InitVar[object]

    def __post_init__(self, _token: object) -> None:
        if _token is not _TOKEN:
            raise TypeError("VerifiedCustodian is made only by verification")


_TOKEN: Final = object()


@dataclass(frozen=True, slots=True)
class _Verified:
    """What one certificate's signatures established; independent of time and policy."""

    spki_der: bytes
    #: (verified quote, start, end of the window in which its PCK chain, and the collateral
    #: that judged it, are valid), TCG first.
    quotes: tuple[tuple[VerifiedQuote, datetime, datetime], ...]
    #: False when the verdict could change within the window (older collateral passed over).
    cacheable: bool = True


class VerificationCache(LruCache[_Key, _Verified]):
    """A bounded, thread-safe LRU of RA-TLS certificates whose signatures verified.

    See the module docstring for what is cached and what is re-checked on every hit.

    Attributes:
        hits, misses: lookups since the last :meth:`clear` (for tests and benchmarks).
    """

    def __init__(self, size: int = VERIFICATION_CACHE_SIZE) -> None:
        super().__init__(size)


VERIFICATION_CACHE: Final = VerificationCache()


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _chain_window(verified: VerifiedQuote) -> tuple[datetime, datetime]:
    """When every certificate of the quote's PCK chain is valid (``verify_quote`` checked it)."""
    try:
        certs = x509.load_pem_x509_certificates(verified.quote.pck_chain_pem.removesuffix(b"\0"))
        return (
            max(c.not_valid_before_utc for c in certs),
            min(c.not_valid_after_utc for c in certs),
        )
    except (ValueError, UserWarning) as exc:  # pragma: no cover - verify_quote loaded it
        raise CertificateChainError("PCK chain: malformed or unsupported X.509 data") from exc


def _verify_all(
    evidence: RatlsEvidence,
    policy: Policy,
    now: datetime,
    collateral: Collateral | CollateralSource | None,
) -> _Verified:
    """The expensive part of ``verify_enclave_certificate``: every quote, with collateral."""
    trust = policy.trust_anchors()
    source = with_stapled(collateral, evidence.stapled_collateral)
    quotes = []
    cacheable = True
    for quote in evidence.quotes:
        verified = verify_quote(quote, trust=trust, collateral=source, now=now)
        start, end = _chain_window(verified)
        if verified.tcb_status is not None:
            window = verified.collateral_window
            if window is None:
                cacheable = False
            else:
                start, end = max(start, window[0]), min(end, window[1])
        quotes.append((verified, start, end))
    return _Verified(evidence.spki_der, tuple(quotes), cacheable)


def _current(entry: _Verified, now: datetime) -> bool:
    return all(start <= now <= end for _, start, end in entry.quotes)


def _generation(collateral: Collateral | CollateralSource | None) -> int | None:
    """0 for nothing or a fixed source, a counter for one that changes, None if unknown."""
    if collateral is None or isinstance(collateral, Collateral):
        return 0
    generation = getattr(collateral, "generation", None)
    return generation if isinstance(generation, int) else None


def _accept(entry: _Verified, policy: Policy, now: datetime) -> VerifiedEnclave:
    """The time- and policy-dependent part, re-applied on every handshake."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    results = []
    for verified, start, end in entry.quotes:
        if not start <= now <= end:
            raise CertificateValidityError(f"PCK chain: not valid at {now:%Y-%m-%d}")
        results.append(policy.check(verified, public_key_spki=entry.spki_der))
    return results[0]


def make_cached_certificate_verifier(
    policy: Policy,
    *,
    collateral: Collateral | CollateralSource | None = None,
    clock: Callable[[], datetime] | None = None,
    cache: VerificationCache | None = VERIFICATION_CACHE,
) -> Callable[[bytes], VerifiedEnclave]:
    """Like :func:`~drm_wire.attestation.identity.make_certificate_verifier`, with a cache.

    Accepts and refuses exactly what ``verify_enclave_certificate`` does, with the same
    exceptions; a certificate seen before skips the signature work (module docstring).

    Args:
        policy: what to accept; also names the trust anchors.
        collateral: Intel collateral, or a source of it; with it, verified certificates
            are kept in a cache private to this verifier, keyed by the source's generation.
        clock: the current time, read once per verification (default: the system clock).
        cache: where verified certificates are kept (when no ``collateral`` is given);
            ``None`` disables caching.

    Returns:
        A :data:`~drm_wire.net.tls.PeerVerifier` whose proof is a ``VerifiedEnclave``.
    """
    now_fn = clock if clock is not None else _utc_now
    if cache is None or _generation(collateral) is None:
        return make_certificate_verifier(policy, collateral=collateral, clock=now_fn)
    if collateral is not None:
        cache = VerificationCache()  # the verdicts depend on this verifier's collateral
    store = cache
    roots = policy.trust_anchors().roots

    def verify(der: bytes) -> VerifiedEnclave:
        now = now_fn()
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        key = (bytes(der), roots, _generation(collateral) or 0)
        entry = store.get(key)
        if entry is not None and _current(entry, now):
            return _accept(entry, policy, now)
        entry = _verify_all(parse_ratls_certificate(key[0]), policy, now, collateral)
        result = _accept(entry, policy, now)
        if entry.cacheable:
            store.put(key, entry)  # only once everything passed
        return result

    return verify


def _parse_name(name: str) -> _Name:
    """``custodian_name`` as an IP address, or as the ASCII form a certificate carries."""
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        pass
    try:
        ascii_name = name.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValueError(f"custodian_name {name!r} is not a valid host name") from exc
    if not ascii_name or "*" in ascii_name:
        raise ValueError(f"custodian_name {name!r} is not a valid host name")
    return ascii_name


def _names(cert: x509.Certificate, wanted: _Name) -> bool:
    """Whether the subjectAltName of ``cert`` carries ``wanted`` (exact; no wildcards)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if isinstance(wanted, str):
        return any(
            dns.rstrip(".").lower() == wanted for dns in san.get_values_for_type(x509.DNSName)
        )
    return wanted in san.get_values_for_type(x509.IPAddress)


def _custodian_verifier(name: str | None) -> Callable[[bytes], VerifiedCustodian]:
    """Runs at depth 0 after OpenSSL accepted the chain up to the pinned CA."""
    wanted = None if name is None else _parse_name(name)

    def verify(der: bytes) -> VerifiedCustodian:
        try:
            cert = x509.load_der_x509_certificate(der)
            usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise CustodianCertificateError("custodian certificate has no EKU") from None
        except (ValueError, TypeError, UserWarning) as exc:
            raise CustodianCertificateError("custodian certificate does not parse") from exc
        if ExtendedKeyUsageOID.SERVER_AUTH not in usage:
            raise CustodianCertificateError("custodian certificate is not for serverAuth")
        if wanted is not None and not _names(cert, wanted):
            raise CustodianCertificateError(f"custodian certificate does not name {name!r}")
        return VerifiedCustodian(cert, name, _TOKEN)

    return verify


# --- the four contexts ---------------------------------------------------------------


def enclave_server_context(credentials: RatlsCredentials) -> SSL.Context:
    """The enclave's consumer-facing server: presents its RA-TLS certificate.

    No client certificate is requested; consumers are identified inside the protocol.

    Raises:
        AttestationError: ``credentials`` is not an RA-TLS certificate (a subclass of
            ``CertificateFormatError``/``KeyBindingError``): no peer would accept it.
        OpenSSL.SSL.Error: the key does not match the certificate.
    """
    parse_ratls_certificate(credentials.certificate_der)
    return server_context(certificate=credentials.certificate, private_key=credentials.private_key)


def consumer_client_context(
    policy: Policy,
    *,
    collateral: Collateral | CollateralSource | None = None,
    clock: Callable[[], datetime] | None = None,
) -> SSL.Context:
    """The consumer: accepts the enclave only if its RA-TLS certificate satisfies ``policy``.

    After the handshake, ``stream.peer_identity_as(VerifiedEnclave)`` is the proof. Any
    failure (unparsable evidence, untrusted root, policy) fails the handshake with
    :class:`~drm_wire.net.tls.PeerVerificationError`, whose cause names the check.

    Args:
        policy: the consumer's policy file, loaded.
        collateral: Intel collateral for a TCB verdict (bypasses the result cache).
        clock: the current time, read once per handshake (default: the system clock).
    """
    verifier = make_cached_certificate_verifier(policy, collateral=collateral, clock=clock)
    return client_context(verifier=verifier)


def enclave_client_context(
    credentials: RatlsCredentials,
    custodian_ca: x509.Certificate,
    *,
    custodian_name: str | None = None,
) -> SSL.Context:
    """The enclave dialling its custodian: RA-TLS client certificate, pinned custodian CA.

    The server is accepted only if its chain verifies up to ``custodian_ca`` (only that
    CA: never the system store), its leaf is for ``serverAuth`` and, if ``custodian_name``
    is given, names it (see "The custodian's certificate" in the module docstring). A
    refused custodian fails the handshake before our certificate is sent. Afterwards,
    ``stream.peer_identity_as(VerifiedCustodian)`` is the proof.

    Args:
        credentials: our RA-TLS key and certificate.
        custodian_ca: the pinned custodian CA (a trusted file of the enclave).
        custodian_name: DNS name or IP address the custodian's certificate must carry in
            its subjectAltName; take it from the measured configuration.

    Raises:
        ValueError: ``custodian_ca`` is not a CA certificate (a leaf pinned by mistake), or
            ``custodian_name`` is not a host name or IP address.
        AttestationError: ``credentials`` is not an RA-TLS certificate.
        OpenSSL.SSL.Error: the key does not match the certificate.
    """
    try:
        constraints = custodian_ca.extensions.get_extension_for_class(x509.BasicConstraints)
        is_ca = constraints.value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError("custodian_ca is not a CA certificate (basicConstraints CA:TRUE)")
    parse_ratls_certificate(credentials.certificate_der)
    return client_context(
        certificate=credentials.certificate,
        private_key=credentials.private_key,
        ca_certificates=[custodian_ca],
        verifier=_custodian_verifier(custodian_name),
    )


def custodian_server_context(
    certificate: x509.Certificate,
    private_key: PrivateKey,
    policy: Policy,
    *,
    collateral: Collateral | CollateralSource | None = None,
    clock: Callable[[], datetime] | None = None,
) -> SSL.Context:
    """The custodian: requires a client certificate and verifies it as RA-TLS.

    A client without a certificate, or whose RA-TLS certificate does not satisfy
    ``policy``, fails the handshake (before any application byte is read). Afterwards,
    ``stream.peer_identity_as(VerifiedEnclave)`` is the enclave's proof; its
    ``public_key_spki`` identifies this enclave instance.

    Args:
        certificate: the custodian's certificate, issued by the custodian CA.
        private_key: its key.
        policy: the enclaves the custodian serves.
        collateral: Intel collateral for a TCB verdict (bypasses the result cache).
        clock: the current time, read once per handshake (default: the system clock).

    Raises:
        OpenSSL.SSL.Error: the key does not match the certificate.
    """
    verifier = make_cached_certificate_verifier(policy, collateral=collateral, clock=clock)
    return server_context(
        certificate=certificate,
        private_key=private_key,
        verifier=verifier,
        require_client_certificate=True,
    )
