"""RA-TLS handshake benchmark: attested handshakes against plain TLS on the same stack.

Run with ``python bench/attestation.py`` (about 30 s on 2 cores). Every server runs in
one spawned process on 127.0.0.1, port 0 (one listener per variant); the client runs
here, so each side has a core. One handshake = TCP connect + TLS 1.3 handshake (peer
verification included) + a 1-byte ping/pong + close (close_notify both ways), one after
the other on a fresh connection each time, as a reconnecting peer does. Every figure is
the median of ``RUNS`` runs of ``HANDSHAKES`` handshakes, with [min-max]; the runs of
all variants are interleaved, so machine drift hits them alike. A ratio is computed per
run against the plain run next to it.

Variants (all on :class:`~drm_wire.net.tls.TLSStream`, TLS 1.3, no resumption):

* plain: ECDSA P-256 server certificate issued by a CA the client pins (OpenSSL chain
  verification), the ordinary TLS baseline; "mutual" adds a CA-issued client certificate
  the server requires and verifies.
* RA-TLS consumer -> enclave: :func:`~drm_wire.net.ratls_context.enclave_server_context`
  (P-384 RA-TLS certificate with two simulated quotes) and
  :func:`~drm_wire.net.ratls_context.consumer_client_context` (full RA-TLS verification in
  the verify callback).
* RA-TLS enclave -> custodian (mutual):
  :func:`~drm_wire.net.ratls_context.enclave_client_context` (pinned custodian CA, name
  checked) and :func:`~drm_wire.net.ratls_context.custodian_server_context` (the server
  verifies the enclave's RA-TLS client certificate).
* "no result cache": the same, with the verifier's result cache off, so every handshake
  parses the certificate and checks both quotes' signatures (the PCK chain cache stays on).
* "P-256 RA-TLS key": the consumer variant with a P-256 instead of the product's P-384
  key, to show how much of the gap is the curve (P-384 signing and verifying in the
  handshake) rather than attestation. Not a product configuration; no target.

* "cold PCCS fetch": what ``drm_consumer --pccs-url`` does against an enclave that staples
  nothing, with nothing cached: a handshake the production policy refuses (TCB status
  unknown), the platform's collateral fetched for both PCK CA types from a test PCCS on
  loopback (:mod:`drm_lab.pccs`, in the server process; a new HTTPS client each time, so
  a TLS connection to it too), then a handshake with a fresh verifier. Not targeted: it
  happens once per command, and a long-running verifier caches the collateral.

The verification table times :func:`~drm_wire.attestation.identity.verify_enclave_certificate`
in this process: cold (chain cache empty), with the chain cached, and a hit in the RA-TLS
result cache. Simulated quotes, no collateral.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import json
import logging
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path

import structlog
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL

from drm_lab.pccs import PccsBehaviour, running_pccs
from drm_wire.attestation.collateral import Collateral
from drm_wire.attestation.collateral_source import CollateralSet
from drm_wire.attestation.identity import verify_enclave_certificate
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.pccs import PccsClient
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.ratls_cert import (
    RatlsCredentials,
    build_ratls_certificate,
    parse_ratls_certificate,
    restaple,
)
from drm_wire.attestation.verify import clear_chain_cache
from drm_wire.errors import DrmError
from drm_wire.net.ratls_context import (
    VerificationCache,
    consumer_client_context,
    custodian_server_context,
    enclave_client_context,
    enclave_server_context,
    make_cached_certificate_verifier,
)
from drm_wire.net.tls import (
    PeerVerificationError,
    accept_tls,
    client_context,
    open_tls_client,
    server_context,
)

HOST = "127.0.0.1"
RUNS = 5
HANDSHAKES = 200
WARM_UP = 30
TARGET_RATIO = 0.6
MR_ENCLAVE = hashlib.sha256(b"bench enclave").digest()
MR_SIGNER = hashlib.sha256(b"bench signer").digest()
#: The simulated platform's FMSPC (what its PCK certificate names).
SIM_FMSPC = b"SIMFMS"

#: (name, server listener, what it shows); plain variants are the baselines.
VARIANTS: dict[str, tuple[str, str]] = {
    "plain": ("plain", "plain TLS, server auth (P-256, CA-issued)"),
    "ratls": ("ratls", "RA-TLS consumer -> enclave"),
    "ratls-nocache": ("ratls", "  same, no result cache"),
    "ratls-p256": ("ratls-p256", "  same, P-256 RA-TLS key (comparison only)"),
    "plain-mutual": ("plain-mutual", "plain TLS, mutual (P-256, CA-issued)"),
    "ratls-mutual": ("ratls-mutual", "RA-TLS enclave -> custodian (mutual)"),
    "ratls-mutual-nocache": ("ratls-mutual-nocache", "  same, no result cache"),
    "ratls-collateral": ("ratls", "RA-TLS consumer -> enclave, collateral held (bundle)"),
    "ratls-stapled": ("ratls-stapled", "RA-TLS consumer -> enclave, collateral stapled"),
    "ratls-pccs-cold": ("ratls", "RA-TLS consumer -> enclave, cold PCCS fetch (see above)"),
}
#: The product's configurations, which the target applies to.
TARGETED = ("ratls", "ratls-mutual", "ratls-collateral", "ratls-stapled")
BASELINE = {
    "ratls": "plain",
    "ratls-nocache": "plain",
    "ratls-p256": "plain",
    "ratls-mutual": "plain-mutual",
    "ratls-mutual-nocache": "plain-mutual",
    "ratls-collateral": "plain",
    "ratls-stapled": "plain",
    "ratls-pccs-cold": "plain",
}
#: Variants whose one "handshake" is a whole cold command, timed by :func:`_cold_fetches`.
COLD = ("ratls-pccs-cold",)


# --- key material (made here; PEM/DER travels to the server process) --------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], cn: str, usage: x509.ObjectIdentifier
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca[1], hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@dataclass(frozen=True)
class Material:
    """Everything both processes need, as bytes."""

    ca: bytes  # one CA for the plain variants and the custodian
    server: tuple[bytes, bytes]  # (cert PEM, key PEM): plain server and the custodian
    client: tuple[bytes, bytes]  # plain mutual client
    enclave: tuple[bytes, bytes]  # RA-TLS certificate and key (P-384, as the product)
    enclave_p256: tuple[bytes, bytes]  # the same with a P-256 key, to show the curve's cost
    enclave_stapled: tuple[bytes, bytes]  # the same key and quotes, its collateral stapled
    collateral: str  # the simulated platform's collateral bundle
    pccs_dir: str  # where the server process's test PCCS writes its CA
    simulation_root: bytes

    def strict_policy(self) -> Policy:
        """A production policy: a TCB verdict (UpToDate) is needed."""
        return replace(self.policy(), accept_unknown_tcb_status=False)

    def policy(self) -> Policy:
        return Policy(
            mr_enclave=(MR_ENCLAVE,),
            isv_prod_id=0,
            accept_unknown_tcb_status=True,
            simulation_root=x509.load_pem_x509_certificate(self.simulation_root),
        )

    @staticmethod
    def pair(pems: tuple[bytes, bytes]) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = serialization.load_pem_private_key(pems[1], password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return x509.load_pem_x509_certificate(pems[0]), key

    def enclave_credentials(self, *, p256: bool = False, stapled: bool = False) -> RatlsCredentials:
        pems = self.enclave_stapled if stapled else self.enclave_p256 if p256 else self.enclave
        cert, key = self.pair(pems)
        return RatlsCredentials(key, cert)

    def ca_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca)


def make_material(platform_dir: Path, pccs_dir: Path) -> tuple[Material, SimulatedPlatform]:
    sim = SimulatedPlatform.create(platform_dir)
    provider = sim.quote_provider(mr_enclave=MR_ENCLAVE, mr_signer=MR_SIGNER)
    enclave = build_ratls_certificate(provider)
    collateral = sim.collateral()
    stapled = build_ratls_certificate(
        provider, private_key=enclave.private_key, stapled_collateral=collateral.encode()
    )
    enclave_p256 = build_ratls_certificate(
        provider, private_key=ec.generate_private_key(ec.SECP256R1())
    )
    ca = _ca("bench-ca")
    material = Material(
        ca=ca[0].public_bytes(serialization.Encoding.PEM),
        server=_leaf(ca, "bench-server", ExtendedKeyUsageOID.SERVER_AUTH),
        client=_leaf(ca, "bench-client", ExtendedKeyUsageOID.CLIENT_AUTH),
        enclave=(enclave.certificate_pem, enclave.private_key_pem),
        enclave_p256=(enclave_p256.certificate_pem, enclave_p256.private_key_pem),
        enclave_stapled=(stapled.certificate_pem, stapled.private_key_pem),
        collateral=collateral,
        pccs_dir=str(pccs_dir),
        simulation_root=sim.root_certificate.public_bytes(serialization.Encoding.PEM),
    )
    return material, sim


# --- contexts ------------------------------------------------------------------------------


def server_contexts(material: Material) -> dict[str, SSL.Context]:
    cert, key = material.pair(material.server)
    policy = material.policy()
    uncached = make_cached_certificate_verifier(policy, cache=None)
    return {
        "plain": server_context(certificate=cert, private_key=key),
        "plain-mutual": server_context(
            certificate=cert,
            private_key=key,
            ca_certificates=[material.ca_certificate()],
            require_client_certificate=True,
        ),
        "ratls": enclave_server_context(material.enclave_credentials()),
        "ratls-p256": enclave_server_context(material.enclave_credentials(p256=True)),
        "ratls-stapled": enclave_server_context(material.enclave_credentials(stapled=True)),
        "ratls-mutual": custodian_server_context(cert, key, policy),
        "ratls-mutual-nocache": server_context(
            certificate=cert, private_key=key, verifier=uncached, require_client_certificate=True
        ),
    }


def client_contexts(material: Material) -> dict[str, SSL.Context]:
    ca = material.ca_certificate()
    policy = material.policy()
    enclave = material.enclave_credentials()
    cert, key = material.pair(material.client)
    mutual_ratls = enclave_client_context(enclave, ca, custodian_name=HOST)
    return {
        "plain": client_context(ca_certificates=[ca]),
        "ratls": consumer_client_context(policy),
        "ratls-nocache": client_context(
            verifier=make_cached_certificate_verifier(policy, cache=None)
        ),
        "ratls-p256": consumer_client_context(policy),
        "plain-mutual": client_context(certificate=cert, private_key=key, ca_certificates=[ca]),
        "ratls-mutual": mutual_ratls,
        "ratls-mutual-nocache": mutual_ratls,
        "ratls-collateral": consumer_client_context(
            material.strict_policy(),
            collateral=CollateralSet([Collateral.from_json(material.collateral)]),
        ),
        "ratls-stapled": consumer_client_context(material.strict_policy()),
        "ratls-pccs-cold": consumer_client_context(material.strict_policy()),
    }


# --- server process -----------------------------------------------------------------------


async def _serve(material: Material, pipe: Connection) -> None:
    contexts = server_contexts(material)
    ports: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        for name, ctx in contexts.items():
            listeners = await trio.open_tcp_listeners(0, host=HOST)
            ports[name] = listeners[0].socket.getsockname()[1]

            async def handler(tcp: trio.SocketStream, ctx: SSL.Context = ctx) -> None:
                try:
                    stream = await accept_tls(tcp, ctx)
                except (DrmError, trio.BrokenResourceError, trio.TooSlowError):
                    return
                async with stream:
                    with contextlib.suppress(trio.BrokenResourceError):
                        ping = await stream.receive_some(1)
                        if ping:
                            await stream.send_all(ping)

            nursery.start_soon(trio.serve_listeners, handler, listeners)
        behaviour = PccsBehaviour(bundle=json.loads(material.collateral))
        async with running_pccs(Path(material.pccs_dir), behaviour) as pccs:
            ports["pccs"] = int(pccs.url.rsplit(":", 1)[1])
            pipe.send(ports)
            await trio.sleep_forever()


def _quiet() -> None:
    """Warnings logged per handshake (insecure simulation, unknown TCB status on the
    variants without collateral) would time the terminal, not the handshake."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def server_main(material: Material, pipe: Connection) -> None:
    """Entry point of the spawned server process."""
    _quiet()
    trio.run(_serve, material, pipe)


# --- client -------------------------------------------------------------------------------


async def _handshakes(port: int, ctx: SSL.Context, count: int) -> float:
    """``count`` sequential connect + handshake + ping/pong + close; handshakes per second."""
    start = time.perf_counter()
    for _ in range(count):
        stream = await open_tls_client(HOST, port, ctx)
        await stream.send_all(b"p")
        if await stream.receive_some(1) != b"p":
            raise RuntimeError("bad pong")
        await stream.aclose()
    return count / (time.perf_counter() - start)


async def _cold_fetches(material: Material, port: int, pccs_port: int, count: int) -> float:
    """``count`` cold ``--pccs-url`` commands (see the module docstring); per second."""
    policy = material.strict_policy()
    url, ca = f"https://{HOST}:{pccs_port}", Path(material.pccs_dir) / "ca.pem"
    start = time.perf_counter()
    for _ in range(count):
        clear_chain_cache()
        try:
            await open_tls_client(HOST, port, consumer_client_context(policy))
        except PeerVerificationError:
            pass
        else:
            raise RuntimeError("an enclave without collateral was accepted")
        async with PccsClient(url, ca=ca) as pccs:
            fetched = [await pccs.fetch(SIM_FMSPC, ca=kind) for kind in ("processor", "platform")]
        ctx = consumer_client_context(policy, collateral=CollateralSet(fetched))
        stream = await open_tls_client(HOST, port, ctx)
        await stream.send_all(b"p")
        if await stream.receive_some(1) != b"p":
            raise RuntimeError("bad pong")
        await stream.aclose()
    return count / (time.perf_counter() - start)


async def run_clients(material: Material, ports: dict[str, int]) -> dict[str, list[float]]:
    contexts = client_contexts(material)
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}

    async def one(name: str, count: int) -> float:
        port = ports[VARIANTS[name][0]]
        if name in COLD:
            return await _cold_fetches(material, port, ports["pccs"], max(1, count // 10))
        return await _handshakes(port, contexts[name], count)

    for name in VARIANTS:  # warm-up: caches, allocator, the server's first handshakes
        await one(name, WARM_UP)
    for run in range(RUNS):
        order = list(VARIANTS) if run % 2 == 0 else list(VARIANTS)[::-1]
        for name in order:
            rates[name].append(await one(name, HANDSHAKES))
    return rates


def measure(material: Material) -> dict[str, list[float]]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=server_main, args=(material, child), daemon=True)
    server.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("server process did not report its ports")
        ports: dict[str, int] = parent.recv()
        return trio.run(run_clients, material, ports)
    finally:
        server.terminate()
        server.join(10)


# --- verification cost, in this process ----------------------------------------------------


def _per_call(work: Callable[[], object], calls: int) -> float:
    """Median over 5 batches of the mean time per call, in microseconds."""
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            work()
        batches.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(batches)


def verification_costs(material: Material) -> list[tuple[str, float]]:
    der = material.enclave_credentials().certificate_der
    policy = material.policy()
    now = datetime.datetime.now(datetime.UTC)

    def full() -> object:
        return verify_enclave_certificate(der, policy, now=now)

    def cold() -> object:
        clear_chain_cache()
        return full()

    cache = VerificationCache()
    cached = make_cached_certificate_verifier(policy, cache=cache)
    cached(der)
    stapled = material.enclave_credentials(stapled=True)
    bundle = parse_ratls_certificate(stapled.certificate_der).stapled_collateral
    assert bundle is not None
    custodian_ca = material.ca_certificate()

    def restapled() -> object:  # what the enclave does at each collateral refresh
        credentials = restaple(stapled, bundle)
        enclave_server_context(credentials)
        return enclave_client_context(credentials, custodian_ca)

    result = [
        ("verify_enclave_certificate, cold (chain cache empty)", _per_call(cold, 40)),
        ("verify_enclave_certificate, PCK chain cached", _per_call(full, 200)),
        (
            "RA-TLS result cache hit (policy + dates re-checked)",
            _per_call(lambda: cached(der), 2000),
        ),
        ("enclave re-staple: restaple + its two TLS contexts", _per_call(restapled, 20)),
    ]
    clear_chain_cache()
    return result


# --- report -------------------------------------------------------------------------------


def _fmt(values: list[float], spec: str) -> str:
    return f"{statistics.median(values):{spec}} [{min(values):{spec}}-{max(values):{spec}}]"


def main() -> int:
    _quiet()
    with tempfile.TemporaryDirectory() as tmp:
        material, _ = make_material(Path(tmp) / "platform", Path(tmp))
        costs = verification_costs(material)
        rates = measure(material)
    print()
    print(
        f"RA-TLS handshakes, {platform.python_implementation()} {platform.python_version()}, "
        f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}, {multiprocessing.cpu_count()} CPUs"
    )
    print(
        f"connect + TLS 1.3 handshake + 1-byte ping/pong + close, sequential; server in a "
        f"spawned process on {HOST}"
    )
    print(f"{RUNS} runs x {HANDSHAKES} handshakes, median [min-max]; ratio per run vs plain")
    print()
    width = max(len(text) for _, text in VARIANTS.values())
    print(f"| {'variant':<{width}} | {'handshakes/s':<21} | {'ratio vs plain':<18} |")
    print(f"| {'-' * width} | {'-' * 21} | {'-' * 18} |")
    failed = []
    for name, (_, text) in VARIANTS.items():
        ratio = ""
        base = BASELINE.get(name)
        if base is not None:
            ratios = [a / b for a, b in zip(rates[name], rates[base], strict=True)]
            ratio = _fmt(ratios, ".2f")
            if statistics.median(ratios) < TARGET_RATIO and name in TARGETED:
                failed.append(name)
        print(f"| {text:<{width}} | {_fmt(rates[name], '.0f'):<21} | {ratio:<18} |")
    print()
    print(f"| {'cost (simulated quotes, no verifier collateral)':<52} | {'per call':>10} |")
    print(f"| {'-' * 52} | {'-' * 10} |")
    for text, micros in costs:
        print(f"| {text:<52} | {micros / 1000:>7.3f} ms |")
    print()
    verdict = "met" if not failed else f"NOT met by {', '.join(failed)}"
    print(f"target: RA-TLS >= {TARGET_RATIO}x plain (with the result cache): {verdict}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
