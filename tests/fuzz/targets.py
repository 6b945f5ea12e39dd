"""The fuzz targets: every decoder of untrusted bytes, with the errors each may raise.

Each :class:`Harness` is a function of one byte string and the seeds to start from. The
function feeds the bytes to a decoder and catches exactly the project's own errors that
decoder documents (:class:`RemoteProtocolError` for the wire, :class:`AttestationError`
for evidence, :class:`ConfigError` for files); anything else escapes, and that is a
finding. Where a decode succeeds, the result is used as the next layer would use it (a
tensor becomes a numpy array, a message is encoded again and must decode to itself), so a
value that passes validation but breaks its user is a finding too.

The same functions serve two callers: ``tests/fuzz/run.py`` drives them with atheris
(``nox -s fuzz``), and ``tests/fuzz/test_corpus.py`` replays every reproducer in
``tests/fuzz/corpus/<harness>/`` in the default test run, without atheris.

The first input bytes often pick a mode (which role, which state, which trust anchors),
so one harness covers a decoder in every way the daemons call it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from drm_wire import codec
from drm_wire import messages as m
from drm_wire.attestation import _der
from drm_wire.attestation._ratls_claims import _decode_claims, decode_tcg_evidence
from drm_wire.attestation.collateral import Collateral, QeIdentity, TcbInfo
from drm_wire.attestation.gramine import SimulatedEnclave, make_enclave_identity
from drm_wire.attestation.identity import verify_enclave_certificate
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.policy import Policy
from drm_wire.attestation.quote import parse_quote
from drm_wire.attestation.ratls_cert import _TCG_OID, parse_ratls_certificate
from drm_wire.attestation.verify import verify_quote
from drm_wire.errors import (
    AttestationError,
    ConfigError,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
)
from drm_wire.framing import Frame, FrameDecoder, encode_frame
from drm_wire.model.terms import Terms
from drm_wire.protocol import (
    CLOSED,
    SUPPORTED_VERSIONS,
    Closed,
    Connection,
    Link,
    NeedData,
    Side,
    State,
    select_version,
)
from drm_wire.tensors import DTYPES, Tensor, tensors_from_wire

__all__ = ["HARNESSES", "Harness"]

DATA: Final = Path(__file__).resolve().parents[1] / "data"

#: When the real evidence in tests/data is valid: the PCK chains (2022-11-26 to
#: 2029-11-26) and the collateral (2025-06-19 to 2025-07-19) alike.
NOW: Final = datetime(2025, 7, 1, tzinfo=UTC)
#: The protocol version the seeds speak: the newest this build does.
CURRENT: Final = SUPPORTED_VERSIONS[-1]


@dataclass(frozen=True, slots=True)
class Harness:
    """One fuzz target: ``run(data)`` must return normally for every ``data``."""

    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], Iterator[bytes]]
    #: Top-level packages whose code atheris instruments for coverage.
    instrument: tuple[str, ...] = ("drm_wire",)


def _split(data: bytes) -> tuple[bytes, bytes]:
    """A 2-byte big-endian length, that many bytes, and the rest."""
    if len(data) < 2:
        return b"", b""
    (size,) = struct.unpack_from(">H", data)
    return data[2 : 2 + size], data[2 + size :]


def _join(first: bytes, rest: bytes) -> bytes:
    return struct.pack(">H", len(first)) + first + rest


def _wire(message: m.Message) -> bytes:
    header, payload = message.to_wire()
    return b"".join(bytes(part) for part in encode_frame(header, payload))


# --- representative valid messages: the seeds of the wire harnesses ------------------


def _tensor(name: str, dtype: str, shape: tuple[int, ...]) -> Tensor:
    array = np.arange(int(np.prod(shape))).astype(DTYPES[dtype]).reshape(shape)
    return Tensor.from_numpy(name, array)


def sample_messages() -> list[m.Message]:
    """At least one valid message of every type, with the optional fields both ways."""
    digest = bytes(range(32))
    spec = m.TensorSpec(name="x", dtype="float32", shape=(None, 4))
    tensors = (_tensor("x", "float32", (2, 4)), _tensor("mask", "bool", (0, 3)))
    return [
        m.Hello(versions=(1,), role=m.PeerRole.CONSUMER, software="consumer/1"),
        m.Hello(
            versions=(1, 2),
            role=m.PeerRole.ENCLAVE,
            software="enclave/1",
            license="lic-1",
            instance_id="inst-1",
        ),
        m.Welcome(version=CURRENT, software="server/1"),
        m.Refusal(code=ErrorCode.UNSUPPORTED_VERSION, message="no", supported_versions=(1,)),
        m.Error(code=ErrorCode.BUSY, message="busy"),
        m.Error(code=ErrorCode.NO_INFERENCES, message="", request_id=1),
        m.ModelBegin(name="tiny", size=8, sha256=digest),
        m.ModelChunk(offset=0, data=memoryview(b"\x08\x01\x12\x04onnx")),
        m.ModelEnd(name="tiny"),
        m.ModelLoaded(name="tiny", sha256=digest),
        # Version 3: held models in the hello, model_keep, model_load_failed.
        m.Hello(
            versions=(CURRENT,),
            role=m.PeerRole.ENCLAVE,
            software="enclave/3",
            license="lic-1",
            instance_id="inst-1",
            held=(m.HeldModel(name="tiny", sha256=digest, terms_sha256=digest),),
        ),
        m.ModelKeep(name="tiny", size=8, sha256=digest, terms=Terms()),
        m.ModelLoadFailed(
            name="tiny", sha256=digest, code=m.LoadFailure.TOO_LARGE, reason="over 1 MiB"
        ),
        m.Grant(grant_id=1, units=5, granted_total=5),
        m.UsageReport(seq=1, served_total=3),
        m.UsageAck(seq=1, served_total=3),
        m.Block(block_id=1, reason="unpaid"),
        # Version 4: the demand signal and the block acknowledgement.
        m.BlockAck(block_id=1),
        m.Demand(seq=1, units=5, parked_requests=2, granted_total=10),
        m.Demand(seq=2, units=0, parked_requests=0, granted_total=15),
        m.Unblock(),
        m.Heartbeat(seq=7),
        m.Recall(recall_id=1, units=4),
        m.Returned(recall_id=1, returned_total=4, served_total=3, requests_total=3, final=False),
        m.Returned(recall_id=None, returned_total=6, served_total=3, requests_total=2, final=True),
        m.ReturnAck(recall_id=None, returned_total=6),
        m.InferenceRequest(request_id=1, model="tiny", inputs=tensors, wait=None),
        m.InferenceRequest(request_id=2, model="tiny", inputs=tensors[:1], wait=1.5),
        m.Waiting(request_id=1, position=1),
        m.InferenceResult(request_id=1, outputs=tensors, inferences_left=4),
        m.ModelInfoRequest(request_id=3),
        m.ModelInfo(
            request_id=3,
            models=(
                m.ModelDescription(name="tiny", sha256=digest, inputs=(spec,), outputs=(spec,)),
            ),
            inferences_left=4,
            state=m.EnclaveState.SERVING,
        ),
    ]


# --- frames ----------------------------------------------------------------------------


def _model_place(model: bytearray) -> Callable[[int, int], memoryview | None]:
    def place(offset: int, nbytes: int) -> memoryview | None:
        if offset >= 0 and offset + nbytes <= len(model):
            return memoryview(model)[offset : offset + nbytes]
        return None

    return place


def _feed(
    decoder: FrameDecoder | Connection, data: bytes, step: int, into_payload: bool
) -> Iterator[None]:
    """Feed ``data`` in slices of ``step``, yielding after each, as the channel does:
    through ``receive_data``, or straight into the payload buffer when one is due."""
    view = memoryview(data)
    while view:
        target = decoder.payload_buffer() if into_payload else None
        if target is not None:
            count = min(len(target), len(view), step)
            target[:count] = view[:count]
            decoder.payload_filled(count)
        else:
            count = min(len(view), step)
            decoder.receive_data(bytes(view[:count]))
        view = view[count:]
        yield


def frames(data: bytes) -> None:
    """FrameDecoder, in any slicing, with or without a payload sink; each frame decoded."""
    if len(data) < 2:
        return
    mode, step, data = data[0], data[1] or len(data), data[2:]
    decoder = FrameDecoder(m.payload_limit)
    if mode & 1:
        decoder.set_payload_sink(m.ModelChunk.payload_sink(_model_place(bytearray(64))))
    try:
        for _ in _feed(decoder, data, step, bool(mode & 2)):
            while (frame := decoder.next_frame()) is not None:
                with contextlib.suppress(RemoteProtocolError):
                    m.from_frame(frame)
        decoder.receive_data(b"")
        assert decoder.next_frame() is None  # every complete frame was taken
    except RemoteProtocolError:
        return


def _frames_seeds() -> Iterator[bytes]:
    stream = b"".join(_wire(message) for message in sample_messages())
    for mode in range(4):
        yield bytes([mode, 0]) + stream
        yield bytes([mode, 7]) + stream
    for message in sample_messages():
        yield bytes([1, 3]) + _wire(message)


# --- messages ----------------------------------------------------------------------------


def messages(data: bytes) -> None:
    """from_frame on any header map and payload; what decodes must encode to itself."""
    header_bytes, payload = _split(data)
    try:
        header = codec.unpack_header(header_bytes)
        message = m.from_frame(Frame(header, memoryview(payload)))
    except RemoteProtocolError:
        return
    _use(message)
    try:
        wire = _wire(message)
    except LocalProtocolError as exc:  # a header at the cap, plus the payload_len we add
        assert exc.code is ErrorCode.LIMIT_EXCEEDED, exc
        return
    decoder = FrameDecoder(m.payload_limit)
    decoder.receive_data(wire)
    frame = decoder.next_frame()
    assert frame is not None
    again = m.from_frame(frame)
    assert _normalise(again) == _normalise(message), (again, message)


def _use(message: m.Message) -> None:
    """What the daemons do with a message they accepted."""
    for tensor in getattr(message, "inputs", ()) + getattr(message, "outputs", ()):
        if isinstance(tensor, Tensor):
            array = tensor.to_numpy()
            assert array.shape == tensor.shape
    if isinstance(message, m.Hello):
        select_version(message)


def _normalise(value: object) -> object:
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, Tensor):
        return (value.name, value.dtype, value.shape, bytes(value.data))
    if isinstance(value, tuple):
        return tuple(_normalise(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return (
            type(value).__name__,
            *(_normalise(getattr(value, f)) for f in value.__dataclass_fields__),
        )
    return value


def _messages_seeds() -> Iterator[bytes]:
    for message in sample_messages():
        header, payload = message.to_wire()
        yield _join(codec.pack_header(header), b"".join(bytes(p) for p in payload))


# --- the sans-IO connection, in every state and role ------------------------------------


def _deliver(sender: Connection, receiver: Connection, message: m.Message) -> None:
    receiver.receive_data(b"".join(bytes(part) for part in sender.send(message)))
    got = receiver.next_message()
    assert type(got) is type(message), got


def _hello(link: Link) -> m.Hello:
    if link is Link.CUSTODIAN:
        return m.Hello(
            versions=SUPPORTED_VERSIONS,
            role=m.PeerRole.ENCLAVE,
            software="e",
            license="l",
            instance_id="i",
        )
    return m.Hello(versions=SUPPORTED_VERSIONS, role=m.PeerRole.CONSUMER, software="c")


def _setup(link: Link, target: str) -> tuple[Connection, Connection]:
    """A client and a server connection, driven together to the state named ``target``."""
    client, server = Connection(link, Side.CLIENT), Connection(link, Side.SERVER)
    if target == "await_hello":
        return client, server
    _deliver(client, server, _hello(link))
    if target == "await_welcome":
        return client, server
    if target == "closed":
        _deliver(
            server, client, m.Refusal(code=ErrorCode.BUSY, message="no", supported_versions=(1,))
        )
        return client, server
    _deliver(server, client, m.Welcome(version=CURRENT, software="s"))
    if target == "open":
        return client, server
    if target == "requests":  # consumer link: requests in flight, one of them waiting
        _deliver(client, server, m.ModelInfoRequest(request_id=1))
        _deliver(client, server, m.InferenceRequest(request_id=2, model="tiny", inputs=()))
        _deliver(server, client, m.Waiting(request_id=2, position=1))
        return client, server
    if target == "receiving_model":  # custodian link
        _deliver(server, client, m.ModelBegin(name="tiny", size=8, sha256=bytes(32)))
        return client, server
    if target == "broken":
        client.send_failed()
        server.send_failed()
        return client, server
    raise AssertionError(target)


_STATES: Final = ("await_hello", "await_welcome", "open", "closed", "broken")
#: (link, which side we are, the state to reach) for every combination there is.
SCENARIOS: Final = tuple(
    (link, side, state)
    for link in Link
    for side in Side
    for state in (
        *_STATES,
        "requests" if link is Link.CONSUMER else "receiving_model",
    )
)


def connection(data: bytes) -> None:
    """A Connection driven to a state, then fed the peer's bytes in any slicing."""
    if len(data) < 3:
        return
    link, side, state = SCENARIOS[data[0] % len(SCENARIOS)]
    step, into_payload, data = data[1] or len(data), bool(data[2] & 1), data[3:]
    client, server = _setup(link, state)
    conn = client if side is Side.CLIENT else server
    _drive(conn, data, step, into_payload, tell_peer=state != "broken")


def _drive(
    conn: Connection, data: bytes, step: int, into_payload: bool, *, tell_peer: bool
) -> None:
    """Feed ``data`` to ``conn`` in slices of ``step``; every event is used, and the only
    way out is the end of the input, a close, or a protocol error that closes ``conn``."""
    try:
        for _ in _feed(conn, data, step, into_payload):
            while not isinstance(event := conn.next_message(), NeedData):
                if isinstance(event, Closed):
                    return
                _use(event)
        conn.receive_data(b"")
        event = conn.next_message()
        assert event is CLOSED, event
        assert conn.state is State.CLOSED
    except RemoteProtocolError as exc:
        assert conn.state is State.CLOSED, conn
        if tell_peer:  # the peer is told why, as the channel does
            assert conn.send_error(conn.error_for(exc))
        assert exc.code in ErrorCode


def _connection_seeds() -> Iterator[bytes]:
    replies = {
        (Link.CONSUMER, Side.SERVER): [_hello(Link.CONSUMER), m.ModelInfoRequest(request_id=9)],
        (Link.CONSUMER, Side.CLIENT): [
            m.Welcome(version=CURRENT, software="s"),
            m.ModelInfo(request_id=1, models=(), inferences_left=0, state=m.EnclaveState.LOADING),
            m.Error(code=ErrorCode.BUSY, message="x", request_id=2),
        ],
        (Link.CUSTODIAN, Side.SERVER): [_hello(Link.CUSTODIAN), m.Heartbeat(seq=1)],
        (Link.CUSTODIAN, Side.CLIENT): [
            m.Welcome(version=CURRENT, software="s"),
            m.ModelChunk(offset=0, data=memoryview(b"12345678")),
            m.ModelEnd(name="tiny"),
            m.Grant(grant_id=1, units=2, granted_total=2),
        ],
    }
    everything = b"".join(_wire(message) for message in sample_messages())
    for index, (link, side, _state) in enumerate(SCENARIOS):
        stream = b"".join(_wire(message) for message in replies[(link, side)])
        yield bytes([index, 0, 0]) + stream
        yield bytes([index, 5, 1]) + stream
        yield bytes([index, 0, 1]) + everything


# --- the custodian link while stopping ------------------------------------------------------

#: (our side, whether a recall was in flight when the final return went): the connection
#: is in ``stopping`` (the enclave sent its final ``returned``, the custodian read it).
#: A harness of its own, so the ``connection`` reproducers keep their scenario numbers.
STOPPING_SCENARIOS: Final = tuple(
    (side, recall) for side in (Side.CLIENT, Side.SERVER) for recall in (False, True)
)


def _stopping(recall: bool) -> tuple[Connection, Connection]:
    """Enclave (client) and custodian (server) connections, both in ``stopping``; with
    ``recall``, the custodian's recall 1 was in flight and the final return answers it."""
    enclave, custodian = _setup(Link.CUSTODIAN, "open")
    if recall:
        _deliver(custodian, enclave, m.Recall(recall_id=1, units=2))
    final = m.Returned(
        recall_id=1 if recall else None,
        returned_total=5,
        served_total=3,
        requests_total=2,
        final=True,
    )
    _deliver(enclave, custodian, final)
    assert enclave.state is custodian.state is State.STOPPING
    return enclave, custodian


def connection_stopping(data: bytes) -> None:
    """The custodian link in ``stopping`` (a clean stop), fed the peer's bytes: what
    crossed the final return (a grant, a recall), acknowledgements, heartbeats, and
    anything else."""
    if len(data) < 3:
        return
    side, recall = STOPPING_SCENARIOS[data[0] % len(STOPPING_SCENARIOS)]
    step, into_payload, data = data[1] or len(data), bool(data[2] & 1), data[3:]
    enclave, custodian = _stopping(recall)
    conn = enclave if side is Side.CLIENT else custodian
    _drive(conn, data, step, into_payload, tell_peer=True)


def _connection_stopping_seeds() -> Iterator[bytes]:
    replies = {
        Side.CLIENT: [  # what the custodian sends an enclave that is stopping
            m.Grant(grant_id=7, units=2, granted_total=9),  # crossed the final return
            m.Recall(recall_id=2, units=1),
            m.ReturnAck(recall_id=None, returned_total=5),
            m.Heartbeat(seq=4),
            m.UsageAck(seq=1, served_total=3),
        ],
        Side.SERVER: [  # what an enclave that is stopping sends
            m.Heartbeat(seq=3),
            m.Returned(
                recall_id=None, returned_total=7, served_total=3, requests_total=2, final=True
            ),
            m.UsageReport(seq=2, served_total=4),  # refused: no report after the stop
        ],
    }
    everything = b"".join(_wire(message) for message in sample_messages())
    for index, (side, _recall) in enumerate(STOPPING_SCENARIOS):
        stream = b"".join(_wire(message) for message in replies[side])
        yield bytes([index, 0, 0]) + stream
        yield bytes([index, 3, 1]) + stream
        yield bytes([index, 0, 1]) + everything


# --- tensors -----------------------------------------------------------------------------


def tensors(data: bytes) -> None:
    """tensors_from_wire on any entries and payload; each tensor then used as numpy."""
    header_bytes, payload = _split(data)
    try:
        header = codec.unpack_header(header_bytes)
    except RemoteProtocolError:
        return
    try:
        decoded = tensors_from_wire(header.get("t"), memoryview(payload), "inputs")
    except LocalProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.LIMIT_EXCEEDED), exc
        return
    for tensor in decoded:
        array = tensor.to_numpy()
        assert array.shape == tensor.shape
        again = Tensor.from_numpy(tensor.name, array)
        assert _normalise(again) == _normalise(tensor)
    m.InferenceRequest(request_id=1, model="m", inputs=decoded)


def _tensors_seeds() -> Iterator[bytes]:
    groups = [
        (_tensor("x", "float32", (2, 3)),),
        tuple(_tensor(f"t{i}", dtype, (2,)) for i, dtype in enumerate(DTYPES)),
        (_tensor("empty", "int64", (0, 5)), _tensor("scalar", "uint8", ())),
    ]
    for group in groups:
        entries = [tensor.describe() for tensor in group]
        yield _join(codec.pack_header({"t": entries}), b"".join(bytes(t.data) for t in group))


# --- SGX quotes, RA-TLS certificates, their CBOR, collateral ----------------------------


_KEEP: list[tempfile.TemporaryDirectory[str]] = []


@functools.cache
def _simulation() -> tuple[SimulatedPlatform, bytes, bytes]:
    """A simulated platform (kept for the process), one of its quotes and an RA-TLS
    certificate from it."""
    directory = tempfile.TemporaryDirectory(prefix="fuzz-sim-")  # removed at exit
    _KEEP.append(directory)
    platform = SimulatedPlatform.create(directory.name)
    mr_enclave, mr_signer = bytes(range(32)), bytes(32)
    quote = platform.quote(bytes(64), mr_enclave=mr_enclave, mr_signer=mr_signer)
    enclave = SimulatedEnclave(platform, mr_enclave=mr_enclave, mr_signer=mr_signer)
    credentials = make_enclave_identity("simulated", simulation=enclave)
    return platform, quote, credentials.certificate_der


@functools.cache
def _collateral() -> Collateral:
    return Collateral.from_json((DATA / "sgx" / "dcap_v3_quote_collateral.json").read_bytes())


@functools.cache
def _policies() -> tuple[Policy, Policy]:
    """The real Gramine certificate's policy, and the simulated platform's."""
    platform, _quote, _cert = _simulation()
    gramine = Policy.load(DATA / "policy" / "gramine-debug.toml")
    simulated = Policy(
        mr_enclave=(bytes(range(32)),),
        isv_prod_id=0,
        accept_unknown_tcb_status=True,
        simulation_root=platform.root_certificate,
    )
    return gramine, simulated


def quote(data: bytes) -> None:
    """parse_quote, then verify_quote against Intel's root, collateral or a simulation root."""
    if not data:
        return
    mode, raw = data[0] % 4, data[1:]
    try:
        parse_quote(raw)
        if mode == 1:
            verify_quote(raw, now=NOW)
        elif mode == 2:
            verify_quote(raw, collateral=_collateral(), now=NOW)
        elif mode == 3:
            verify_quote(raw, trust=_simulation()[0].trust_anchors(), now=NOW)
    except AttestationError:
        return


def _real_quotes() -> Iterator[bytes]:
    yield (DATA / "sgx" / "dcap_v3_quote.bin").read_bytes()
    yield _simulation()[1]
    for der in _certificates():
        yield from parse_ratls_certificate(der).quotes


def _quote_seeds() -> Iterator[bytes]:
    for raw in _real_quotes():
        for mode in range(4):
            yield bytes([mode]) + raw


def _certificates() -> Iterator[bytes]:
    for path in sorted((DATA / "ratls").glob("*.pem")):
        yield _der.certificate_from_pem(path.read_bytes())
    yield _simulation()[2]


def ratls(data: bytes) -> None:
    """parse_ratls_certificate, then the whole verification a TLS handshake runs."""
    if not data:
        return
    mode, raw = data[0] % 3, data[1:]
    try:
        parse_ratls_certificate(raw)
        if mode:
            gramine, simulated = _policies()
            verify_enclave_certificate(raw, gramine if mode == 1 else simulated, now=NOW)
    except AttestationError:
        return


def _ratls_seeds() -> Iterator[bytes]:
    for der in _certificates():
        for mode in range(3):
            yield bytes([mode]) + der
    for path in sorted((DATA / "ratls").glob("*.pem")):
        yield bytes([1]) + path.read_bytes()


def cbor(data: bytes) -> None:
    """The TCG tagged-evidence extension's CBOR, and the claims map inside it."""
    if not data:
        return
    try:
        if data[0] & 1:
            _decode_claims(data[1:])
        else:
            decode_tcg_evidence(data[1:])
    except AttestationError:
        return


def _cbor_seeds() -> Iterator[bytes]:
    for der in _certificates():
        _spki, extensions = _der.certificate_parts(der)
        if _TCG_OID in extensions:
            value = extensions[_TCG_OID]
            yield b"\0" + value
            _quote, claims = decode_tcg_evidence(value)
            yield b"\1" + claims.raw


def collateral(data: bytes) -> None:
    """Collateral JSON (and its signed TCB info and QE identity bodies), then a verification
    of the real quote with what parsed."""
    if not data:
        return
    mode, raw = data[0] % 3, data[1:]
    try:
        if mode == 1:
            TcbInfo.from_json(raw)
        elif mode == 2:
            QeIdentity.from_json(raw)
        else:
            parsed = Collateral.from_json(raw)
            real = (DATA / "sgx" / "dcap_v3_quote.bin").read_bytes()
            verify_quote(real, collateral=parsed, now=NOW)
    except AttestationError:
        return


def _collateral_seeds() -> Iterator[bytes]:
    raw = (DATA / "sgx" / "dcap_v3_quote_collateral.json").read_bytes()
    yield b"\0" + raw
    document = json.loads(raw)
    yield b"\1" + document["tcb_info"].encode()
    yield b"\2" + document["qe_identity"].encode()


# --- policy and configuration files --------------------------------------------------


def policy(data: bytes) -> None:
    """Policy.from_toml; a policy that loads must write itself back to an equal one."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # Policy.load refuses it first (tests/attestation/test_policy.py)
    try:
        loaded = Policy.from_toml(text, path=DATA / "policy" / "fuzz.toml")
    except ConfigError:
        return
    if loaded.simulation_root is None:
        assert Policy.from_toml(loaded.to_toml()) == loaded


def _policy_seeds() -> Iterator[bytes]:
    for path in sorted((DATA / "policy").glob("*.toml")):
        yield path.read_bytes()


@functools.cache
def _schemas() -> tuple[Any, ...]:
    from drm_custodian.cli import serve_options as custodian_options
    from drm_enclave.cli import serve_options as enclave_options

    return tuple(
        options(argparse.ArgumentParser(prog=name))
        for name, options in (("custodian", custodian_options), ("enclave", enclave_options))
    )


def config(data: bytes) -> None:
    """A daemon's config file: parse_toml, then every key as custodian and enclave serve
    would convert it."""
    from drm_daemon.config_file import parse_toml

    path = Path("/etc/drm/fuzz.toml")
    try:
        document = parse_toml(data, str(path))
    except ConfigError:
        return
    for schema in _schemas():
        try:
            for key, value in document.items():
                schema.convert(key, value, path, path.parent)
        except ConfigError:
            continue


def _config_seeds() -> Iterator[bytes]:
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "deploy" / "config").glob("*.toml")):
        yield path.read_bytes()


HARNESSES: Final = {
    harness.name: harness
    for harness in (
        Harness("frames", frames, _frames_seeds),
        Harness("messages", messages, _messages_seeds),
        Harness("connection", connection, _connection_seeds),
        Harness("tensors", tensors, _tensors_seeds),
        Harness("quote", quote, _quote_seeds),
        Harness("ratls", ratls, _ratls_seeds),
        Harness("cbor", cbor, _cbor_seeds),
        Harness("collateral", collateral, _collateral_seeds),
        Harness("policy", policy, _policy_seeds, ("drm_wire", "tomllib")),
        Harness(
            "config",
            config,
            _config_seeds,
            ("drm_daemon", "drm_custodian", "drm_enclave", "tomllib"),
        ),
        Harness("connection_stopping", connection_stopping, _connection_stopping_seeds),
    )
}
