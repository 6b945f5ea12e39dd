"""The state machine: every (link, state, sender, message) pair, versions and request ids."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from drm_wire import messages as m
from drm_wire.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from drm_wire.model.terms import Terms
from drm_wire.protocol import (
    CLOSED,
    NEED_DATA,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    TRANSITIONS,
    Connection,
    Link,
    Side,
    State,
    select_version,
    state_diagram,
)
from drm_wire.tensors import Tensor

from .helpers import decode_all, encode

DIGEST = b"\x01" * 32
TENSOR = Tensor.from_numpy("x", np.zeros(2, dtype=np.float32))
IN_FLIGHT = 1

#: One valid instance of every message type. Replies answer request IN_FLIGHT; requests
#: use a fresh id.
SAMPLES: dict[type[m.Message], m.Message] = {
    m.Hello: m.Hello(versions=SUPPORTED_VERSIONS, role=m.PeerRole.ENCLAVE, software="t"),
    m.Welcome: m.Welcome(version=PROTOCOL_VERSION, software="t"),
    m.Refusal: m.Refusal(
        code=ErrorCode.UNSUPPORTED_VERSION, message="no", supported_versions=SUPPORTED_VERSIONS
    ),
    m.Error: m.Error(code=ErrorCode.INTERNAL, message="bye"),
    m.ModelBegin: m.ModelBegin(name="model", size=10, sha256=DIGEST),
    m.ModelChunk: m.ModelChunk(offset=0, data=memoryview(b"0123456789")),
    m.ModelEnd: m.ModelEnd(name="model"),
    m.ModelLoaded: m.ModelLoaded(name="model", sha256=DIGEST),
    m.ModelKeep: m.ModelKeep(name="model", size=10, sha256=DIGEST, terms=Terms()),
    m.ModelLoadFailed: m.ModelLoadFailed(
        name="model", sha256=DIGEST, code=m.LoadFailure.TOO_LARGE, reason="over the limit"
    ),
    m.Grant: m.Grant(grant_id=1, units=3, granted_total=3),
    m.UsageReport: m.UsageReport(seq=1, served_total=1),
    m.UsageAck: m.UsageAck(seq=1, served_total=1),
    # connection_in sends block 1 on a custodian link: this one follows it.
    m.Block: m.Block(block_id=2, reason="unpaid"),
    m.BlockAck: m.BlockAck(block_id=1),
    m.Demand: m.Demand(seq=1, units=3, parked_requests=1, granted_total=0),
    m.Unblock: m.Unblock(),
    m.Heartbeat: m.Heartbeat(seq=1),
    m.Recall: m.Recall(recall_id=5, units=4),
    # A clean stop's return: final, answering no recall.
    m.Returned: m.Returned(
        recall_id=None, returned_total=2, served_total=1, requests_total=1, final=True
    ),
    m.ReturnAck: m.ReturnAck(recall_id=None, returned_total=2),
    m.InferenceRequest: m.InferenceRequest(request_id=2, model="model", inputs=(TENSOR,)),
    m.Waiting: m.Waiting(request_id=IN_FLIGHT, position=0),
    m.InferenceResult: m.InferenceResult(
        request_id=IN_FLIGHT, outputs=(TENSOR,), inferences_left=0
    ),
    m.ModelInfoRequest: m.ModelInfoRequest(request_id=3),
    m.ModelInfo: m.ModelInfo(
        request_id=IN_FLIGHT, models=(), inferences_left=0, state=m.EnclaveState.SERVING
    ),
}


def hello_for(link: Link) -> m.Hello:
    role = m.PeerRole.ENCLAVE if link is Link.CUSTODIAN else m.PeerRole.CONSUMER
    return m.Hello(versions=SUPPORTED_VERSIONS, role=role, software="t")


def deliver(connection: Connection, message: m.Message) -> m.Message:
    """Feed ``message`` to ``connection`` as if the peer sent it."""
    connection.receive_data(encode(message))
    received = connection.next_message()
    assert isinstance(received, m.Message)
    return received


def carry(connection: Connection, message: m.Message, sender: Side) -> None:
    if sender is connection.side:
        connection.send(message)
    else:
        deliver(connection, message)


def connection_in(link: Link, side: Side, state: State) -> Connection:
    """A connection of ``side`` on ``link``, driven to ``state`` by valid traffic."""
    connection = Connection(link, side)
    if state is State.AWAIT_HELLO:
        return connection
    carry(connection, hello_for(link), Side.CLIENT)
    if state is State.AWAIT_WELCOME:
        return connection
    carry(connection, m.Welcome(version=PROTOCOL_VERSION, software="t"), Side.SERVER)
    if link is Link.CUSTODIAN:
        carry(connection, m.Block(block_id=1, reason=""), Side.SERVER)  # for block_ack's sake
    if link is Link.CONSUMER:
        request = m.ModelInfoRequest(request_id=IN_FLIGHT)
        carry(connection, request, Side.CLIENT)
    if state is State.OPEN:
        return connection
    if state is State.RECEIVING_MODEL:
        carry(connection, SAMPLES[m.ModelBegin], Side.SERVER)
        return connection
    if state is State.STOPPING:
        carry(connection, SAMPLES[m.Returned], Side.CLIENT)
        return connection
    if state is State.CLOSED:
        carry(connection, SAMPLES[m.Error], Side.SERVER)
        return connection
    connection.send_failed()
    return connection


def reachable(link: Link, state: State) -> bool:
    custodian_only = (State.RECEIVING_MODEL, State.STOPPING)
    return not (link is Link.CONSUMER and state in custodian_only)


CASES = [
    (link, side, state, sender, cls)
    for link, side, state, sender in itertools.product(Link, Side, State, Side)
    if reachable(link, state)
    for cls in SAMPLES
]


def expected_allowed(
    link: Link, state: State, sender: Side, cls: type[m.Message], side: Side = Side.CLIENT
) -> bool:
    if cls is m.Error:
        return state not in (State.CLOSED, State.BROKEN)
    allowed = (link, state, sender, cls) in TRANSITIONS
    if cls is m.Hello and link is Link.CONSUMER:
        return False  # the sample hello announces an enclave; consumer links need a consumer
    if cls is m.Returned and state is State.RECEIVING_MODEL:
        return False  # the sample is final: not in the middle of a transfer
    if state is State.STOPPING and cls in (m.Grant, m.Recall) and sender is side:
        return False  # only those that crossed the final return; none sent after it
    return allowed


@pytest.mark.parametrize(
    ("link", "side", "state", "sender", "cls"),
    CASES,
    ids=[f"{c[0].value}-{c[1].value}-{c[2].value}-from_{c[3].value}-{c[4].TYPE}" for c in CASES],
)
def test_every_state_and_message(
    link: Link, side: Side, state: State, sender: Side, cls: type[m.Message]
) -> None:
    connection = connection_in(link, side, state)
    message = SAMPLES[cls]
    ours = sender is side
    if expected_allowed(link, state, sender, cls, side):
        carry(connection, message, sender)
        if cls is m.Error:
            assert connection.state is State.CLOSED
        elif cls is m.Returned:
            assert connection.state is State.STOPPING  # the sample is final
        else:
            assert connection.state is TRANSITIONS[(link, state, sender, cls)]
        return
    error = LocalProtocolError if ours else RemoteProtocolError
    with pytest.raises(error) as info:
        carry(connection, message, sender)
    assert info.value.state == state.value
    if not ours:
        assert connection.state is State.CLOSED


def test_transition_table_covers_both_links() -> None:
    links = {key[0] for key in TRANSITIONS}
    assert links == set(Link)
    assert "model_chunk" in state_diagram()


def test_version_selection() -> None:
    assert select_version(m.Hello(versions=(4, 7), role="consumer", software="x")) == 4  # type: ignore[arg-type]
    # Version 1 could not carry a model's terms; version 2 cannot report a model that fails
    # to load, skip a transfer, carry shared metadata nor return units; version 3 sends no
    # demand and acknowledges no block: such peers are refused.
    for old in (1, 2, 3):
        assert select_version(m.Hello(versions=(old,), role="consumer", software="x")) is None  # type: ignore[arg-type]
    assert select_version(m.Hello(versions=(7, 9), role="consumer", software="x")) is None  # type: ignore[arg-type]
    assert select_version(m.Hello(versions=(2, 3, 4), role="consumer", software="x")) == 4  # type: ignore[arg-type]
    assert SUPPORTED_VERSIONS == (PROTOCOL_VERSION,) == (4,)


def test_w12_unknown_version_in_welcome_is_refused() -> None:
    client = connection_in(Link.CONSUMER, Side.CLIENT, State.AWAIT_WELCOME)
    with pytest.raises(RemoteProtocolError, match="version 3 is not supported") as info:
        deliver(client, m.Welcome(version=3, software="t"))
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
    server = connection_in(Link.CONSUMER, Side.SERVER, State.AWAIT_WELCOME)
    with pytest.raises(LocalProtocolError):
        server.send(m.Welcome(version=1, software="t"))


def test_refusal_closes_the_connection() -> None:
    client = connection_in(Link.CUSTODIAN, Side.CLIENT, State.AWAIT_WELCOME)
    deliver(client, SAMPLES[m.Refusal])
    assert client.state is State.CLOSED


def test_w13_wrong_role_in_hello() -> None:
    server = Connection(Link.CUSTODIAN, Side.SERVER)
    with pytest.raises(RemoteProtocolError, match="consumer cannot open a custodian link"):
        deliver(server, hello_for(Link.CONSUMER))


def test_many_requests_in_flight_and_ids_are_tracked() -> None:
    client = connection_in(Link.CONSUMER, Side.CLIENT, State.OPEN)
    server = connection_in(Link.CONSUMER, Side.SERVER, State.OPEN)
    for request_id in range(10, 20):
        request = m.InferenceRequest(request_id=request_id, model="model", inputs=(TENSOR,))
        client.send(request)
        deliver(server, request)
    assert client.in_flight == server.in_flight == 11
    with pytest.raises(LocalProtocolError, match="already in flight"):
        client.send(m.InferenceRequest(request_id=10, model="model", inputs=(TENSOR,)))
    for request_id in reversed(range(10, 20)):
        reply = m.Error(code=ErrorCode.BUSY, message="", request_id=request_id)
        server.send(reply)
        deliver(client, reply)
    assert client.in_flight == server.in_flight == 1
    with pytest.raises(RemoteProtocolError, match="no request 15 is in flight"):
        deliver(client, m.Waiting(request_id=15, position=0))


def test_a_duplicate_request_id_from_the_peer_is_a_protocol_error() -> None:
    server = connection_in(Link.CONSUMER, Side.SERVER, State.OPEN)
    with pytest.raises(RemoteProtocolError, match="already in flight"):
        deliver(server, m.ModelInfoRequest(request_id=IN_FLIGHT))


def test_waiting_keeps_the_request_in_flight() -> None:
    client = connection_in(Link.CONSUMER, Side.CLIENT, State.OPEN)
    deliver(client, m.Waiting(request_id=IN_FLIGHT, position=3))
    assert client.in_flight == 1
    deliver(client, SAMPLES[m.ModelInfo])
    assert client.in_flight == 0


def test_only_the_enclave_answers_requests_with_errors() -> None:
    server = connection_in(Link.CONSUMER, Side.SERVER, State.OPEN)
    with pytest.raises(RemoteProtocolError, match="only the enclave"):
        deliver(server, m.Error(code=ErrorCode.BUSY, message="", request_id=IN_FLIGHT))


def test_send_failed_breaks_the_connection() -> None:
    client = connection_in(Link.CUSTODIAN, Side.CLIENT, State.OPEN)
    client.send_failed()
    assert client.state is State.BROKEN
    with pytest.raises(LocalProtocolError, match="connection is broken"):
        client.send(m.Heartbeat(seq=1))


def test_protocol_errors_carry_the_state_and_close() -> None:
    server = Connection(Link.CUSTODIAN, Side.SERVER)
    server.receive_data(b"\x00\x00\x00\x01\xc1")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_message()
    assert info.value.state == "await_hello"
    assert server.state is State.CLOSED
    reply = Connection.error_for(info.value)
    assert reply.code is ErrorCode.PROTOCOL_ERROR
    assert reply.request_id is None


def test_clean_eof_between_frames() -> None:
    client = connection_in(Link.CUSTODIAN, Side.CLIENT, State.OPEN)
    assert client.next_message() is NEED_DATA
    client.receive_data(b"")
    assert client.next_message() is CLOSED
    assert client.state is State.CLOSED


def test_last_words_can_follow_a_remote_protocol_error() -> None:
    server = Connection(Link.CUSTODIAN, Side.SERVER)
    server.receive_data(b"\x00\x00\x00\x01\xc1")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_message()
    with pytest.raises(LocalProtocolError):
        server.send(Connection.error_for(info.value))  # ordinary sends are refused
    (frame,) = server.send_error(Connection.error_for(info.value))
    (decoded,) = decode_all(bytes(frame))
    assert isinstance(decoded, m.Error)
    assert decoded.code is ErrorCode.PROTOCOL_ERROR
    assert "malformed header" in decoded.message
    with pytest.raises(LocalProtocolError, match="no request_id"):
        server.send_error(m.Error(code=ErrorCode.BUSY, message="", request_id=1))
    server.send_failed()
    with pytest.raises(LocalProtocolError, match="broken"):
        server.send_error(Connection.error_for(info.value))


# --- version 3: model_keep, model_load_failed and hello's held, in hostile orders ----------

HELD = m.HeldModel(name="model", sha256=DIGEST, terms_sha256=m.terms_digest(Terms()))


def test_model_load_failed_may_come_during_the_transfer_and_after_it() -> None:
    custodian = connection_in(Link.CUSTODIAN, Side.SERVER, State.RECEIVING_MODEL)
    states = []
    deliver(custodian, SAMPLES[m.ModelLoadFailed])  # refused at model_begin
    states.append(custodian.state)
    custodian.send(SAMPLES[m.ModelChunk])  # the custodian may still be sending
    custodian.send(SAMPLES[m.ModelEnd])
    custodian.send(SAMPLES[m.ModelKeep])
    deliver(custodian, SAMPLES[m.ModelLoadFailed])
    states.append(custodian.state)
    assert states == [State.RECEIVING_MODEL, State.OPEN]


@pytest.mark.parametrize(
    ("state", "sender", "message", "why"),
    [
        # model_keep is the custodian's, and never in the middle of a transfer.
        (State.RECEIVING_MODEL, Side.SERVER, SAMPLES[m.ModelKeep], "not allowed in state"),
        (State.OPEN, Side.CLIENT, SAMPLES[m.ModelKeep], "from the client is not allowed"),
        # model_load_failed is the enclave's.
        (State.OPEN, Side.SERVER, SAMPLES[m.ModelLoadFailed], "from the server is not allowed"),
        # An enclave that answers model_loaded before the transfer ended is still refused.
        (State.RECEIVING_MODEL, Side.CLIENT, SAMPLES[m.ModelLoaded], "not allowed in state"),
    ],
)
def test_version_3_messages_out_of_order_are_refused(
    state: State, sender: Side, message: m.Message, why: str
) -> None:
    other = Side.SERVER if sender is Side.CLIENT else Side.CLIENT
    receiver = connection_in(Link.CUSTODIAN, other, state)
    with pytest.raises(RemoteProtocolError, match=why) as info:
        deliver(receiver, message)
    assert info.value.state == state.value
    assert receiver.state is State.CLOSED
    sender_side = connection_in(Link.CUSTODIAN, sender, state)
    with pytest.raises(LocalProtocolError, match=why):
        sender_side.send(message)
    assert sender_side.state is state  # a refused send changes nothing


def test_only_an_enclave_says_which_models_it_holds() -> None:
    enclave_hello = m.Hello(
        versions=SUPPORTED_VERSIONS, role=m.PeerRole.ENCLAVE, software="t", held=(HELD,)
    )
    server = Connection(Link.CUSTODIAN, Side.SERVER)
    assert deliver(server, enclave_hello) == enclave_hello
    consumer = Connection(Link.CONSUMER, Side.SERVER)
    hello = m.Hello(versions=SUPPORTED_VERSIONS, role=m.PeerRole.CONSUMER, software="t", held=())
    with pytest.raises(RemoteProtocolError, match="only an enclave") as info:
        deliver(consumer, hello)
    assert info.value.field == "held"
    assert consumer.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="only an enclave"):
        Connection(Link.CONSUMER, Side.CLIENT).send(hello)


def test_a_hello_without_held_carries_no_such_key() -> None:
    # A version-2 custodian refuses unknown keys: an enclave that holds nothing must still
    # reach its version check and hear unsupported_version.
    header, _ = m.Hello(
        versions=SUPPORTED_VERSIONS, role=m.PeerRole.ENCLAVE, software="t"
    ).to_wire()
    assert "held" not in header


# --- returning units (version 3) ------------------------------------------------------


def _open_custodian_pair() -> tuple[Connection, Connection]:
    enclave = connection_in(Link.CUSTODIAN, Side.CLIENT, State.OPEN)
    custodian = connection_in(Link.CUSTODIAN, Side.SERVER, State.OPEN)
    return enclave, custodian


def _returned(recall_id: int | None, total: int = 1, *, final: bool = False) -> m.Returned:
    return m.Returned(
        recall_id=recall_id, returned_total=total, served_total=0, requests_total=0, final=final
    )


def test_a_recall_is_answered_once_by_its_returned() -> None:
    enclave, custodian = _open_custodian_pair()
    deliver(enclave, custodian_sent(custodian, m.Recall(recall_id=7, units=10)))
    answer = _returned(7, 4)
    enclave.send(answer)
    deliver(custodian, answer)
    assert (custodian.state, enclave.state) == (State.OPEN, State.OPEN)
    # Answered: the same answer again is refused on both sides, and the custodian closes.
    with pytest.raises(LocalProtocolError, match="no recall 7 is in flight"):
        enclave.send(answer)
    with pytest.raises(RemoteProtocolError, match="no recall 7 is in flight") as info:
        deliver(custodian, answer)
    assert info.value.field == "recall_id"
    assert custodian.state is State.CLOSED


def custodian_sent(custodian: Connection, message: m.Message) -> m.Message:
    custodian.send(message)
    return message


def test_a_returned_for_a_recall_never_sent_is_refused() -> None:
    _, custodian = _open_custodian_pair()
    with pytest.raises(RemoteProtocolError, match="no recall 3 is in flight"):
        deliver(custodian, _returned(3))


def test_a_recall_id_may_be_in_flight_once_and_recalls_are_bounded() -> None:
    enclave, custodian = _open_custodian_pair()
    custodian.send(m.Recall(recall_id=1, units=1))
    with pytest.raises(LocalProtocolError, match="recall 1 is already in flight"):
        custodian.send(m.Recall(recall_id=1, units=1))
    deliver(enclave, m.Recall(recall_id=1, units=1))
    with pytest.raises(RemoteProtocolError, match="already in flight"):
        deliver(enclave, m.Recall(recall_id=1, units=1))
    enclave, custodian = _open_custodian_pair()
    for recall_id in range(4):
        deliver(enclave, m.Recall(recall_id=recall_id, units=1))
    with pytest.raises(RemoteProtocolError, match="too many recalls") as info:
        deliver(enclave, m.Recall(recall_id=99, units=1))
    assert info.value.code is ErrorCode.LIMIT_EXCEEDED


def test_a_final_return_stops_the_link_and_grants_that_cross_it_still_arrive() -> None:
    enclave, custodian = _open_custodian_pair()
    final = _returned(None, 5, final=True)
    enclave.send(final)
    assert enclave.state is State.STOPPING
    # The custodian sent a grant and a recall before it read the final return.
    custodian.send(m.Grant(grant_id=9, units=3, granted_total=8))
    custodian.send(m.Recall(recall_id=2, units=3))
    deliver(enclave, m.Grant(grant_id=9, units=3, granted_total=8))
    deliver(enclave, m.Recall(recall_id=2, units=3))
    deliver(custodian, final)
    assert custodian.state is State.STOPPING
    # Once the custodian has it, it cannot grant any more, nor start a model.
    with pytest.raises(LocalProtocolError, match="grant from the server is not allowed"):
        custodian.send(m.Grant(grant_id=10, units=1, granted_total=9))
    with pytest.raises(LocalProtocolError, match="model_begin"):
        custodian.send(SAMPLES[m.ModelBegin])
    # The crossing grant and recall are answered by another final return, then acked.
    again = m.Returned(recall_id=2, returned_total=8, served_total=0, requests_total=0, final=True)
    enclave.send(again)
    deliver(custodian, again)
    custodian.send(m.ReturnAck(recall_id=2, returned_total=8))
    deliver(enclave, m.ReturnAck(recall_id=2, returned_total=8))
    assert enclave.state is custodian.state is State.STOPPING


@pytest.mark.parametrize(
    "after_stop",
    [
        m.UsageReport(seq=2, served_total=9),
        m.ModelLoaded(name="model", sha256=DIGEST),
        None,  # a non-final return, for a recall
    ],
)
def test_after_a_final_return_the_enclave_sends_no_usage_and_no_non_final_return(
    after_stop: m.Message | None,
) -> None:
    """Return then keep serving: a report after the final return is refused by the state
    machine on both ends (the enclave cannot send it; a custodian refuses it)."""
    _, custodian = _open_custodian_pair()
    custodian.send(m.Recall(recall_id=4, units=1))  # crosses the final return
    deliver(custodian, _returned(None, 5, final=True))
    message = after_stop if after_stop is not None else _returned(4, 6)
    with pytest.raises(RemoteProtocolError):
        deliver(custodian, message)
    assert custodian.state is State.CLOSED


def test_a_final_return_cannot_come_in_the_middle_of_a_model_transfer() -> None:
    custodian = connection_in(Link.CUSTODIAN, Side.SERVER, State.RECEIVING_MODEL)
    with pytest.raises(RemoteProtocolError, match="during a model transfer"):
        deliver(custodian, _returned(None, 1, final=True))


def test_a_non_final_return_may_answer_a_recall_during_a_transfer() -> None:
    custodian = connection_in(Link.CUSTODIAN, Side.SERVER, State.RECEIVING_MODEL)
    custodian.send(m.Recall(recall_id=1, units=2))
    deliver(custodian, _returned(1, 2))
    assert custodian.state is State.RECEIVING_MODEL


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"recall_id": None, "final": False}, "final"),  # unasked returns are final
        ({"final": 1}, "final"),  # types are exact: 1 is not a bool
        ({"returned_total": -1}, "returned_total"),
        ({"returned_total": 2**64 - 1}, "returned_total"),
        ({"served_total": 1, "requests_total": 2}, "requests_total"),
        ({"recall_id": "1"}, "recall_id"),
    ],
)
def test_hostile_returned_values_are_refused_at_decoding(
    fields: dict[str, object], field: str
) -> None:
    header = {
        "type": "returned",
        "recall_id": 1,
        "returned_total": 3,
        "served_total": 0,
        "requests_total": 0,
        "final": True,
        **fields,
    }
    _, custodian = _open_custodian_pair()
    custodian.send(m.Recall(recall_id=1, units=5))
    from drm_wire.framing import encode_frame

    custodian.receive_data(b"".join(bytes(b) for b in encode_frame(header, [])))
    with pytest.raises(RemoteProtocolError) as info:
        custodian.next_message()
    assert info.value.field == field
    assert custodian.state is State.CLOSED


def test_a_consumer_link_carries_no_return() -> None:
    server = connection_in(Link.CONSUMER, Side.SERVER, State.OPEN)
    with pytest.raises(RemoteProtocolError, match="returned from the client is not allowed"):
        deliver(server, _returned(None, 1, final=True))


# --- version 4: demand and block acknowledgement ---------------------------------------


def test_block_ids_grow_and_a_block_ack_must_name_a_block_sent() -> None:
    enclave = Connection(Link.CUSTODIAN, Side.CLIENT)
    custodian = Connection(Link.CUSTODIAN, Side.SERVER)
    welcome = m.Welcome(version=PROTOCOL_VERSION, software="t")
    for message, sender in ((hello_for(Link.CUSTODIAN), Side.CLIENT), (welcome, Side.SERVER)):
        carry(enclave, message, sender)
        carry(custodian, message, sender)
    # No block yet: an acknowledgement answers nothing, on either side.
    with pytest.raises(LocalProtocolError, match="block_ack 1 answers no block sent"):
        enclave.send(m.BlockAck(block_id=1))
    with pytest.raises(RemoteProtocolError, match="answers no block sent") as info:
        deliver(custodian, m.BlockAck(block_id=1))
    assert (info.value.field, custodian.state) == ("block_id", State.CLOSED)
    custodian = connection_in(Link.CUSTODIAN, Side.SERVER, State.OPEN)  # block 1 sent
    with pytest.raises(LocalProtocolError, match="block 1 does not follow block 1"):
        custodian.send(m.Block(block_id=1, reason="again"))
    custodian.send(m.Block(block_id=5, reason="later"))
    # Out of order: a block the custodian never sent.
    with pytest.raises(RemoteProtocolError, match="block_ack 6 answers no block sent"):
        deliver(custodian, m.BlockAck(block_id=6))
    # Duplicates and older ones are harmless.
    custodian = connection_in(Link.CUSTODIAN, Side.SERVER, State.OPEN)
    custodian.send(m.Block(block_id=5, reason="later"))
    for block_id in (5, 5, 1):
        deliver(custodian, m.BlockAck(block_id=block_id))
    assert custodian.state is State.OPEN
    enclave = connection_in(Link.CUSTODIAN, Side.CLIENT, State.OPEN)
    with pytest.raises(RemoteProtocolError, match="block 1 does not follow"):
        deliver(enclave, m.Block(block_id=1, reason="replayed"))


def test_a_block_ack_may_come_during_a_transfer_and_after_a_final_return() -> None:
    for state in (State.RECEIVING_MODEL, State.STOPPING):
        custodian = connection_in(Link.CUSTODIAN, Side.SERVER, state)
        deliver(custodian, m.BlockAck(block_id=1))
        assert custodian.state is state


def test_demand_seqs_grow_and_a_stopping_enclave_sends_none() -> None:
    custodian = connection_in(Link.CUSTODIAN, Side.SERVER, State.OPEN)
    deliver(custodian, m.Demand(seq=0, units=2, parked_requests=1, granted_total=0))
    deliver(custodian, m.Demand(seq=3, units=0, parked_requests=0, granted_total=5))
    for seq in (3, 1):
        with pytest.raises(RemoteProtocolError, match=f"demand {seq} does not follow demand 3"):
            deliver(custodian, m.Demand(seq=seq, units=1, parked_requests=1, granted_total=5))
        custodian = connection_in(Link.CUSTODIAN, Side.SERVER, State.OPEN)
        deliver(custodian, m.Demand(seq=3, units=0, parked_requests=0, granted_total=5))
    enclave = connection_in(Link.CUSTODIAN, Side.CLIENT, State.STOPPING)
    with pytest.raises(LocalProtocolError, match="demand from the client is not allowed"):
        enclave.send(m.Demand(seq=1, units=1, parked_requests=1, granted_total=0))
    consumer = connection_in(Link.CONSUMER, Side.SERVER, State.OPEN)
    with pytest.raises(RemoteProtocolError, match="not allowed"):
        deliver(consumer, m.Demand(seq=1, units=1, parked_requests=1, granted_total=0))
