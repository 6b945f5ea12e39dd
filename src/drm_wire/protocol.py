"""The sans-IO protocol connection: framing, typed messages and the state machine.

Theory of operation. A :class:`Connection` is one side of one link. It never touches a
socket: the I/O layer feeds it bytes with :meth:`Connection.receive_data` and pulls
messages with :meth:`Connection.next_message`; to send, it calls :meth:`Connection.send`
and writes the returned buffers, in order, to the transport. If that write fails or is
cancelled, it must call :meth:`Connection.send_failed`: a half-sent frame leaves the byte
stream unusable, so the connection becomes ``BROKEN`` and refuses to send again (never
"maybe sent").

Both directions share one state. Every message moves the state according to
:data:`TRANSITIONS`, keyed by ``(link, state, sender side, message type)``; a key that is
not in the table is a protocol error naming the state and the message: a
:class:`LocalProtocolError` when we try to send it, a :class:`RemoteProtocolError` when the
peer does. Request ids are tracked on top of the table: a request id may be in flight only
once, and a reply must answer a request that is in flight.

::

    AWAIT_HELLO --hello(C)--> AWAIT_WELCOME --welcome(S)--> OPEN
                                            --refusal(S)--> CLOSED
    custodian link:  OPEN --model_begin(S)--> RECEIVING_MODEL --model_end(S)--> OPEN
    version 3:       OPEN --model_keep(S)--> OPEN (a model the hello said is held)
                     OPEN, RECEIVING_MODEL --model_load_failed(C)--> same state
                     OPEN --returned(C, final)--> STOPPING (a clean stop)
    version 4:       OPEN, RECEIVING_MODEL --demand(C), block_ack(C)--> same state
    any state:       error without request_id (either side) --> CLOSED

``python -m drm_wire.protocol`` prints the whole table as a Graphviz diagram.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .framing import Buffer, FrameDecoder, PayloadSink, encode_frame
from .messages import (
    Block,
    BlockAck,
    Demand,
    Error,
    Grant,
    Heartbeat,
    Hello,
    InferenceRequest,
    InferenceResult,
    Message,
    ModelBegin,
    ModelChunk,
    ModelEnd,
    ModelInfo,
    ModelInfoRequest,
    ModelKeep,
    ModelLoaded,
    ModelLoadFailed,
    Recall,
    Refusal,
    ReturnAck,
    Returned,
    Unblock,
    UsageAck,
    UsageReport,
    Waiting,
    Welcome,
    from_frame,
    payload_limit,
)

__all__ = [
    "MAX_RECALLS_IN_FLIGHT",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "TRANSITIONS",
    "Closed",
    "Connection",
    "Link",
    "NeedData",
    "Side",
    "State",
    "select_version",
]

#: The version this build speaks by preference.
PROTOCOL_VERSION: Final = 4
#: Every version this build can speak.
SUPPORTED_VERSIONS: Final = (4,)


class Link(Enum):
    """Which link a connection belongs to."""

    #: Enclave (client) to custodian (server), mutually attested.
    CUSTODIAN = "custodian"
    #: Consumer (client) to enclave (server).
    CONSUMER = "consumer"


class Side(Enum):
    """Which end of the link: the one that dialled, or the one that listened."""

    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    """Connection states, shared by both directions."""

    #: Nothing exchanged yet; the client must speak first.
    AWAIT_HELLO = "await_hello"
    #: Hello sent; the server must welcome or refuse.
    AWAIT_WELCOME = "await_welcome"
    #: Version agreed; the link's ordinary traffic flows.
    OPEN = "open"
    #: Custodian link only: a model transfer is under way.
    RECEIVING_MODEL = "receiving_model"
    #: Custodian link only (version 3): the enclave sent its final ``returned``; it sends
    #: nothing but heartbeats (and further final returns) from now on, and the
    #: custodian's grants and recalls that crossed it are answered by another return.
    STOPPING = "stopping"
    #: Refused, or closed by a connection-level error: nothing more may be sent.
    CLOSED = "closed"
    #: A send failed half-way; the byte stream is unusable.
    BROKEN = "broken"


class NeedData:
    """Sentinel type: more bytes are needed before the next message."""

    def __repr__(self) -> str:
        return "NEED_DATA"


class Closed:
    """Sentinel type: the peer closed its side cleanly, between frames."""

    def __repr__(self) -> str:
        return "CLOSED"


NEED_DATA: Final = NeedData()
#: Recalls the custodian may have unanswered on one link: it needs one at a time; a few
#: leave room for a recall that crosses an answer, and bound what a peer makes us track.
MAX_RECALLS_IN_FLIGHT: Final = 4
CLOSED: Final = Closed()

_C, _S = Side.CLIENT, Side.SERVER
_OPEN, _MODEL = State.OPEN, State.RECEIVING_MODEL


def _build_table() -> dict[tuple[Link, State, Side, type[Message]], State]:
    table: dict[tuple[Link, State, Side, type[Message]], State] = {}
    message: type[Message]
    for link in Link:
        table[(link, State.AWAIT_HELLO, _C, Hello)] = State.AWAIT_WELCOME
        table[(link, State.AWAIT_WELCOME, _S, Welcome)] = _OPEN
        table[(link, State.AWAIT_WELCOME, _S, Refusal)] = State.CLOSED
    custodian = Link.CUSTODIAN
    for state in (_OPEN, _MODEL):
        # Grants, acknowledgements, blocks and heartbeats flow during a transfer too:
        # a 2 GB model must not starve the heartbeat or delay a block.
        for message in (Grant, UsageAck, Block, Unblock, Heartbeat):
            table[(custodian, state, _S, message)] = state
        for message in (UsageReport, Heartbeat):
            table[(custodian, state, _C, message)] = state
    # Returning units (version 3). A recall may come during a transfer like a grant; its
    # answer too. A final return moves OPEN to STOPPING (in code: the table cannot see
    # ``final``); in STOPPING the custodian's messages that crossed it still arrive.
    for state in (_OPEN, _MODEL):
        table[(custodian, state, _S, Recall)] = state
        table[(custodian, state, _S, ReturnAck)] = state
        table[(custodian, state, _C, Returned)] = state
    stopping = State.STOPPING
    for message in (Grant, UsageAck, Block, Unblock, Heartbeat, Recall, ReturnAck):
        table[(custodian, stopping, _S, message)] = stopping
    for message in (Returned, Heartbeat):
        table[(custodian, stopping, _C, message)] = stopping
    # Demand and block acknowledgement (version 4): an enclave loading a model may have
    # requests parked already, and a block may come during a transfer. A stopping
    # enclave parks nothing (no demand), but acknowledges a block that crossed its stop.
    for state in (_OPEN, _MODEL):
        table[(custodian, state, _C, Demand)] = state
    for state in (_OPEN, _MODEL, stopping):
        table[(custodian, state, _C, BlockAck)] = state
    table[(custodian, _OPEN, _C, ModelLoaded)] = _OPEN
    table[(custodian, _OPEN, _S, ModelBegin)] = _MODEL
    table[(custodian, _MODEL, _S, ModelChunk)] = _MODEL
    table[(custodian, _MODEL, _S, ModelEnd)] = _OPEN
    _add_model_outcomes(table)
    consumer = Link.CONSUMER
    for message in (InferenceRequest, ModelInfoRequest):
        table[(consumer, _OPEN, _C, message)] = _OPEN
    for message in (Waiting, InferenceResult, ModelInfo):
        table[(consumer, _OPEN, _S, message)] = _OPEN
    return table


def _add_model_outcomes(table: dict[tuple[Link, State, Side, type[Message]], State]) -> None:
    """Version 3 (docs/links.md, "Version 3"): a model the enclave's hello says it holds
    is confirmed by ``model_keep`` instead of a transfer; and an enclave that cannot load
    a model says so with ``model_load_failed``, after ``model_end`` or ``model_keep``
    (``OPEN``) or as soon as ``model_begin`` announces what it cannot take (during the
    transfer, which the custodian then ends). Which model an answer belongs to is the
    custodian session's check: the table only orders the messages."""
    custodian = Link.CUSTODIAN
    table[(custodian, _OPEN, _S, ModelKeep)] = _OPEN
    for state in (_OPEN, _MODEL):
        table[(custodian, state, _C, ModelLoadFailed)] = state


#: ``(link, state, side that sends, message type) -> next state``. Anything absent is a
#: protocol error. Connection-level :class:`Error` messages are handled in code: allowed
#: in every state but ``CLOSED``/``BROKEN``, they lead to ``CLOSED``.
TRANSITIONS: Final = _build_table()

#: Messages that open a request, and those that answer one (``Waiting`` answers without
#: finishing it).
_REQUESTS: Final = (InferenceRequest, ModelInfoRequest)
#: What the custodian may no longer send once it has received a final return.
_NOT_AFTER_STOP: Final = (Grant, Recall)
_FINAL_REPLIES: Final = (InferenceResult, ModelInfo)


def select_version(hello: Hello) -> int | None:
    """The highest version both sides speak, or ``None`` when there is none."""
    common = set(hello.versions) & set(SUPPORTED_VERSIONS)
    return max(common) if common else None


class Connection:
    """One side of one link, without I/O.

    Args:
        link: which link this connection belongs to.
        side: whether we dialled (client) or listened (server).
        grow_payloads: grow received payloads as their bytes arrive (for an untrusted
            peer; see :class:`~drm_wire.framing.FrameDecoder`).
    """

    __slots__ = (
        "_block_id",
        "_decoder",
        "_demand_seq",
        "_in_flight",
        "_recalls",
        "link",
        "side",
        "state",
        "version",
    )

    def __init__(self, link: Link, side: Side, *, grow_payloads: bool = False) -> None:
        self.link = link
        self.side = side
        self.state = State.AWAIT_HELLO
        #: The agreed protocol version, once welcomed.
        self.version: int | None = None
        self._decoder = FrameDecoder(payload_limit, grow_payloads=grow_payloads)
        self._in_flight: set[int] = set()
        #: Recall ids sent by the custodian and not yet answered by a ``returned``.
        self._recalls: set[int] = set()
        #: The newest ``block_id`` the custodian sent (0: none yet), and the newest demand
        #: ``seq`` the enclave sent (-1: none yet): both only grow on a link.
        self._block_id = 0
        self._demand_seq = -1

    def __repr__(self) -> str:
        return (
            f"<Connection {self.link.value} {self.side.value} state={self.state.value} "
            f"in_flight={len(self._in_flight)}>"
        )

    @property
    def their_side(self) -> Side:
        return Side.SERVER if self.side is Side.CLIENT else Side.CLIENT

    @property
    def in_flight(self) -> int:
        """Requests sent (client) or received (server) and not yet answered."""
        return len(self._in_flight)

    # --- sending --------------------------------------------------------------------

    def send(self, message: Message) -> list[Buffer]:
        """Check ``message`` against the state machine and return the bytes to write.

        Raises:
            LocalProtocolError: the message is not allowed now; nothing changes.
        """
        self._advance(message, self.side, LocalProtocolError)
        header, payload = message.to_wire()
        return encode_frame(header, payload)

    def send_failed(self) -> None:
        """Declare that writing the last frame failed or was cancelled part-way."""
        self.state = State.BROKEN

    # --- receiving ------------------------------------------------------------------

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the transport; ``b""`` means the peer closed its side."""
        self._decoder.receive_data(data)

    def set_payload_sink(self, sink: PayloadSink | None) -> None:
        """See :meth:`FrameDecoder.set_payload_sink <drm_wire.framing.FrameDecoder>`."""
        self._decoder.set_payload_sink(sink)

    def payload_buffer(self) -> memoryview | None:
        """Where received payload bytes may go directly; see :meth:`payload_filled`.

        The unfilled rest of the payload being received (``None`` between payloads): fill
        its start and report the count with :meth:`payload_filled` instead of calling
        :meth:`receive_data`, which spares a copy of bulk payloads.
        """
        return self._decoder.payload_buffer()

    def payload_filled(self, nbytes: int) -> None:
        """Record ``nbytes`` written at the start of :meth:`payload_buffer`."""
        self._decoder.payload_filled(nbytes)

    @property
    def mid_frame(self) -> bool:
        """Whether part of a frame has been received but not all of it."""
        return self._decoder.mid_frame

    @property
    def held_bytes(self) -> int:
        """Memory held for frames not yet decoded (see ``FrameDecoder.held_bytes``)."""
        return self._decoder.held_bytes

    @property
    def payload_due(self) -> int:
        """Bytes still to arrive of the payload under way (0 between payloads)."""
        return self._decoder.payload_due

    @property
    def payload_received(self) -> int:
        """Bytes of the payload under way received so far (0 between payloads)."""
        return self._decoder.payload_received

    @property
    def payload_room(self) -> int:
        """Bytes :meth:`payload_buffer` offers now (see ``FrameDecoder.payload_room``)."""
        return self._decoder.payload_room

    def grow_payload(self, room: int) -> None:
        """Make room for ``room`` more bytes of a growing payload (see
        ``FrameDecoder.grow_payload``): charge them before."""
        self._decoder.grow_payload(room)

    def next_message(self) -> Message | NeedData | Closed:
        """The next message from the peer, ``NEED_DATA``, or ``CLOSED`` at a clean EOF.

        Raises:
            RemoteProtocolError: the peer broke the framing, a limit, a message's rules or
                the state machine, or closed the connection in the middle of a frame. The
                connection is then ``CLOSED``; send the peer the :class:`Error` built with
                :meth:`error_for` through :meth:`send_error` if the transport still
                works, then close it.
        """
        try:
            frame = self._decoder.next_frame()
            if frame is None:
                if not self._decoder.eof:
                    return NEED_DATA
                if self._decoder.mid_frame:
                    raise RemoteProtocolError("peer closed the connection in the middle of a frame")
                self.state = State.CLOSED
                return CLOSED
            message = from_frame(frame)
            self._advance(message, self.their_side, RemoteProtocolError)
        except RemoteProtocolError as exc:
            exc.state = exc.state or self.state.value
            self.state = State.CLOSED
            raise
        return message

    @staticmethod
    def error_for(exc: RemoteProtocolError) -> Error:
        """The connection-level error message that tells the peer what it did wrong."""
        return Error(code=exc.code, message=exc.message[:200])

    def send_error(self, error: Error) -> list[Buffer]:
        """Encode a connection-level error as our last words, and close.

        Unlike :meth:`send`, this works after the peer broke the protocol (the connection
        is already ``CLOSED`` then): telling the peer why is the one thing left to do.

        Raises:
            LocalProtocolError: the error answers a request (it would not be last words),
                or the byte stream is ``BROKEN`` (a frame would land mid-frame).
        """
        if error.request_id is not None:
            raise LocalProtocolError("last words are connection-level: no request_id")
        if self.state is State.BROKEN:
            raise LocalProtocolError("cannot send on a broken connection", state="broken")
        self.state = State.CLOSED
        header, payload = error.to_wire()
        return encode_frame(header, payload)

    # --- the state machine ----------------------------------------------------------

    def _advance(
        self,
        message: Message,
        sender: Side,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> None:
        state = self.state
        kind = type(message)
        if state is State.BROKEN or state is State.CLOSED:
            raise error(
                f"cannot carry {message.TYPE}: connection is {state.value}", state=state.value
            )
        if kind is Error:
            self._advance_error(message, sender, error)  # type: ignore[arg-type]
            return
        new_state = TRANSITIONS.get((self.link, state, sender, kind))
        if state is State.STOPPING and kind in _NOT_AFTER_STOP and self.side is sender:
            # Only crossing ones are carried: the custodian, once it has read the final
            # return, sends neither (the table cannot tell who has read it).
            new_state = None
        if new_state is None:
            raise error(
                f"{message.TYPE} from the {sender.value} is not allowed in state {state.value}",
                state=state.value,
                field="type",
            )
        if kind is Hello:
            self._check_hello(message, error)  # type: ignore[arg-type]
        elif kind is Welcome:
            self._check_welcome(message, error)  # type: ignore[arg-type]
        elif isinstance(message, _REQUESTS):
            self._open_request(message.request_id, error)
        elif isinstance(message, _FINAL_REPLIES):
            self._close_request(message.request_id, error)
        elif kind is Waiting:
            self._require_request(message.request_id, error)  # type: ignore[attr-defined]
        elif kind is Recall:
            self._open_recall(message, error)  # type: ignore[arg-type]
        elif kind is Returned:
            new_state = self._check_returned(message, new_state, error)  # type: ignore[arg-type]
        elif kind is Block:
            self._check_block(message, error)  # type: ignore[arg-type]
        elif kind is BlockAck:
            self._check_block_ack(message, error)  # type: ignore[arg-type]
        elif kind is Demand:
            self._check_demand(message, error)  # type: ignore[arg-type]
        self.state = new_state

    def _advance_error(
        self,
        message: Error,
        sender: Side,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> None:
        if message.request_id is None:
            self.state = State.CLOSED
            return
        if self.state is not State.OPEN or self.link is not Link.CONSUMER or sender is not _S:
            raise error(
                "only the enclave answers a request with an error",
                state=self.state.value,
                field="request_id",
            )
        self._close_request(message.request_id, error)

    def _check_hello(
        self, hello: Hello, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        expected = "enclave" if self.link is Link.CUSTODIAN else "consumer"
        if hello.role.value != expected:
            raise error(
                f"a {hello.role.value} cannot open a {self.link.value} link",
                field="role",
                state=self.state.value,
            )
        if hello.held is not None and self.link is not Link.CUSTODIAN:
            raise error(
                "only an enclave says which models it holds", field="held", state=self.state.value
            )

    def _check_welcome(
        self, welcome: Welcome, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        if welcome.version not in SUPPORTED_VERSIONS:
            raise error(
                f"version {welcome.version} is not supported",
                code=ErrorCode.UNSUPPORTED_VERSION,
                field="version",
                state=self.state.value,
            )
        self.version = welcome.version

    def _open_request(
        self, request_id: int, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        if request_id in self._in_flight:
            raise error(
                f"request id {request_id} is already in flight",
                field="request_id",
                state=self.state.value,
            )
        self._in_flight.add(request_id)

    def _open_recall(
        self, recall: Recall, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        if recall.recall_id in self._recalls:
            raise error(
                f"recall {recall.recall_id} is already in flight",
                field="recall_id",
                state=self.state.value,
            )
        if len(self._recalls) >= MAX_RECALLS_IN_FLIGHT:
            raise error(
                "too many recalls in flight",
                code=ErrorCode.LIMIT_EXCEEDED,
                field="recall_id",
                state=self.state.value,
            )
        self._recalls.add(recall.recall_id)

    def _check_returned(
        self,
        returned: Returned,
        new_state: State,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> State:
        """A return answers a recall in flight (or nobody's, when final); a final one
        stops the link, and cannot come in the middle of a model transfer."""
        if returned.recall_id is not None:
            if returned.recall_id not in self._recalls:
                raise error(
                    f"no recall {returned.recall_id} is in flight",
                    field="recall_id",
                    state=self.state.value,
                )
            self._recalls.discard(returned.recall_id)
        if not returned.final:
            if self.state is State.STOPPING:
                raise error(
                    "after a final return every return is final",
                    field="final",
                    state=self.state.value,
                )
            return new_state
        if self.state is State.RECEIVING_MODEL:
            raise error(
                "a final return cannot come during a model transfer",
                field="final",
                state=self.state.value,
            )
        return State.STOPPING

    def _check_block(
        self, block: Block, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        if block.block_id <= self._block_id:
            raise error(
                f"block {block.block_id} does not follow block {self._block_id}",
                field="block_id",
                state=self.state.value,
            )
        self._block_id = block.block_id

    def _check_block_ack(
        self, ack: BlockAck, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        """An acknowledgement names a block sent on this link; acknowledging one again, or
        an older one, is harmless (the custodian reads only the current block's)."""
        if ack.block_id > self._block_id:
            raise error(
                f"block_ack {ack.block_id} answers no block sent (newest: {self._block_id})",
                field="block_id",
                state=self.state.value,
            )

    def _check_demand(
        self, demand: Demand, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        if demand.seq <= self._demand_seq:
            raise error(
                f"demand {demand.seq} does not follow demand {self._demand_seq}",
                field="seq",
                state=self.state.value,
            )
        self._demand_seq = demand.seq

    def _require_request(
        self, request_id: int, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        if request_id not in self._in_flight:
            raise error(
                f"no request {request_id} is in flight", field="request_id", state=self.state.value
            )

    def _close_request(
        self, request_id: int, error: type[LocalProtocolError] | type[RemoteProtocolError]
    ) -> None:
        self._require_request(request_id, error)
        self._in_flight.discard(request_id)


def state_diagram() -> str:
    """The transition table as a Graphviz ``digraph``, generated so the docs cannot drift."""
    lines = ["digraph protocol {", "  rankdir=LR;"]
    for (link, state, side, message), target in sorted(
        TRANSITIONS.items(), key=lambda kv: (kv[0][0].value, kv[0][1].value, kv[0][3].TYPE)
    ):
        label = f"{message.TYPE} ({side.value[0].upper()})"
        lines.append(
            f'  "{link.value}:{state.value}" -> "{link.value}:{target.value}" [label="{label}"];'
        )
    lines.append("}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(state_diagram())
