"""TLS 1.3 ``SSL.Context`` builders and the peer-verification hook.

How a peer is judged
--------------------
OpenSSL calls the verify callback once per certificate of the peer's chain, from the
root down to the leaf (depth 0), passing its own opinion in ``ok``. We decide with two
independent inputs:

* **chain trust** (``ca_certificates``, or the system store for a client given nothing
  else): OpenSSL's ``ok`` must be true at every depth. This is how an ordinary
  CA-issued certificate (the custodian's) is accepted.
* **a verifier** (:data:`PeerVerifier`): called once per handshake with the DER of the
  depth-0 certificate. It returns a proof object or raises. An RA-TLS certificate is
  self-signed, so OpenSSL reports ``X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT`` (18) with
  ``ok=0``; when no chain trust is configured, ``ok`` is ignored and the verifier alone
  decides (it checks the quote, which is what binds the key).

The callback is per ``Context`` but the result is per connection, so each connection
carries a :class:`_PeerCheck` as its pyOpenSSL app data. The verifier's exception cannot
cross the C callback, so it is parked there and re-raised, chained, by
:class:`~drm_wire.net.tls.TLSStream` once ``do_handshake`` fails. Returning false from
the callback makes OpenSSL abort the handshake with an alert, so a rejected peer never
gets to send or receive a single application byte.

Session resumption is disabled on both sides: a resumed session skips certificate
verification, so it would skip the verifier too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from OpenSSL import SSL, crypto

__all__ = ["PeerVerifier", "client_context", "server_context"]

#: Judges a peer by the DER bytes of its leaf certificate: returns a proof object (kept
#: as :attr:`TLSStream.peer_identity`) or raises to fail the handshake. Without
#: ``ca_certificates`` it is the only judge (OpenSSL's opinion, expiry included, is
#: ignored), so it must check everything that matters. It runs synchronously inside
#: OpenSSL's callback, so it blocks the event loop while it runs and cannot await.
PeerVerifier: TypeAlias = Callable[[bytes], object]

#: Private keys pyOpenSSL accepts from cryptography (P-256/P-384 are what we use).
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_VerifyCallback: TypeAlias = Callable[[SSL.Connection, crypto.X509, int, int, int], bool]


class _PeerCheck:
    """What the verify callback learned about the peer during one handshake.

    Attributes:
        identity: the verifier's proof object, once it accepted the peer.
        error: the exception the verifier raised, if it refused the peer.
        chain_error: ``(errno, depth)`` of OpenSSL's chain failure, if that refused it.
        ran: whether the verifier already ran (OpenSSL may revisit depth 0).
    """

    __slots__ = ("chain_error", "error", "identity", "ran")

    def __init__(self) -> None:
        self.identity: object = None
        self.error: Exception | None = None
        self.chain_error: tuple[int, int] | None = None
        self.ran = False


def _make_verify_callback(verifier: PeerVerifier | None, *, trust_chain: bool) -> _VerifyCallback:
    """Build the callback for ``Context.set_verify``; see the module docstring."""

    def callback(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        check = conn.get_app_data()
        if not isinstance(check, _PeerCheck):
            return False  # not a TLSStream connection: nowhere to put the result, fail closed
        if trust_chain and not ok:
            check.chain_error = (errno, depth)
            return False
        if depth > 0 or verifier is None:
            return True  # intermediates: the chain (if any) was checked; the leaf decides
        if check.ran:
            return check.error is None
        check.ran = True
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        try:
            check.identity = verifier(der)
        except Exception as exc:  # noqa: BLE001 - parked here, re-raised chained by TLSStream
            check.error = exc
            return False
        return True

    return callback


def _base_context(
    certificate: x509.Certificate | None, private_key: PrivateKey | None
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if (certificate is None) != (private_key is None):
        raise ValueError("certificate and private_key must be given together")
    if certificate is not None and private_key is not None:
        ctx.use_certificate(certificate)
        ctx.use_privatekey(private_key)
        ctx.check_privatekey()
    return ctx


def _trust(ctx: SSL.Context, ca_certificates: Sequence[x509.Certificate]) -> None:
    store = ctx.get_cert_store()
    if store is None:  # pragma: no cover - OpenSSL always has a store
        raise RuntimeError("OpenSSL context has no certificate store")
    for ca in ca_certificates:
        store.add_cert(crypto.X509.from_cryptography(ca))


def client_context(
    *,
    certificate: x509.Certificate | None = None,
    private_key: PrivateKey | None = None,
    verifier: PeerVerifier | None = None,
    ca_certificates: Sequence[x509.Certificate] | None = None,
) -> SSL.Context:
    """Build a TLS 1.3 client context that always verifies the server.

    Args:
        certificate: our client certificate, for servers that require one.
        private_key: the key for ``certificate``.
        verifier: judges the server's leaf certificate (RA-TLS attestation); its proof
            becomes :attr:`TLSStream.peer_identity`.
        ca_certificates: trust exactly these CAs for the server's chain (pinning).
            With neither this nor ``verifier``, the system trust store is used, so a
            default client is never an unauthenticated one.

    Returns:
        A context for :class:`~drm_wire.net.tls.TLSStream` (client side).

    Raises:
        ValueError: only one of ``certificate`` and ``private_key`` was given.
        OpenSSL.SSL.Error: the key does not match the certificate.
    """
    ctx = _base_context(certificate, private_key)
    trust_chain = ca_certificates is not None or verifier is None
    if ca_certificates is not None:
        _trust(ctx, ca_certificates)
    elif verifier is None:
        ctx.set_default_verify_paths()
    ctx.set_verify(SSL.VERIFY_PEER, _make_verify_callback(verifier, trust_chain=trust_chain))
    return ctx


def server_context(
    *,
    certificate: x509.Certificate,
    private_key: PrivateKey,
    verifier: PeerVerifier | None = None,
    require_client_certificate: bool = False,
    ca_certificates: Sequence[x509.Certificate] | None = None,
) -> SSL.Context:
    """Build a TLS 1.3 server context, optionally verifying client certificates.

    A client certificate is checked whenever one is presented and a ``verifier`` or
    ``ca_certificates`` is given; ``require_client_certificate`` additionally refuses
    clients that present none (mutual TLS, the enclave-custodian link).

    Args:
        certificate: the server certificate (RA-TLS or CA-issued).
        private_key: its key.
        verifier: judges the client's leaf certificate; proof in ``peer_identity``.
        require_client_certificate: fail the handshake of a client without a certificate.
        ca_certificates: trust exactly these CAs for client chains.

    Returns:
        A context for :class:`~drm_wire.net.tls.TLSStream` (server side).

    Raises:
        ValueError: a client certificate is required but nothing could verify it.
        OpenSSL.SSL.Error: the key does not match the certificate.
    """
    ctx = _base_context(certificate, private_key)
    if ca_certificates is not None:
        _trust(ctx, ca_certificates)
        for ca in ca_certificates:
            ctx.add_client_ca(ca)
    if verifier is None and ca_certificates is None:
        if require_client_certificate:
            raise ValueError("require_client_certificate needs a verifier or ca_certificates")
        ctx.set_verify(SSL.VERIFY_NONE)
        return ctx
    mode = SSL.VERIFY_PEER
    if require_client_certificate:
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    callback = _make_verify_callback(verifier, trust_chain=ca_certificates is not None)
    ctx.set_verify(mode, callback)
    return ctx


def sni_name(server_hostname: str | None) -> bytes | None:
    """Return the SNI value for ``server_hostname``, or ``None`` for none/an IP literal.

    RFC 6066 forbids IP addresses in SNI, and our peers are often dialled by address.
    """
    if not server_hostname:
        return None
    try:
        ipaddress.ip_address(server_hostname)
    except ValueError:
        return server_hostname.encode("idna")
    return None
