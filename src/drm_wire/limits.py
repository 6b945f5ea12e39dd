"""Every limit a peer can run into, by name, with the reason for its value.

A value that crosses one of these is a :class:`~drm_wire.errors.RemoteProtocolError` (or a
``LocalProtocolError`` when we would send it), raised *before* memory is committed to it.
Each limit has a test at the limit and one past it (``tests/wire/test_limits.py``).
"""

from __future__ import annotations

from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB

# --- framing -------------------------------------------------------------------------

#: Size of the big-endian length prefix in front of every header.
PREFIX_BYTES: Final = 4

#: Largest msgpack header of one frame. Headers are metadata: the biggest real one is a
#: model-info reply listing a few models with their inputs and outputs (a few KiB). 64 KiB
#: leaves room for growth while keeping the cost of a hostile prefix trivial.
MAX_HEADER_BYTES: Final = 64 * KiB

#: Largest raw payload that may follow a header: one tensor request or result, or one model
#: chunk. 64 MiB fits a batch of 8 480x480x3 float32 images (22 MiB) or a 4096x4096 float32
#: output (64 MiB), which is as large as a single request to a CPU enclave sensibly gets;
#: bigger inputs belong in several requests.
MAX_PAYLOAD_BYTES: Final = 64 * MiB

# --- codec ---------------------------------------------------------------------------

#: Nesting of maps and arrays inside one header. Our deepest message is 4 levels
#: (message > list of models > model > list of inputs > input > shape); 8 gives slack
#: and keeps hostile recursion far away from Python's stack limit.
MAX_NESTING: Final = 8

#: Entries in any one map or array of a header. The largest legitimate list is a tensor
#: shape or the inputs of a model; 1,024 is far above both, and bounds the work a hostile
#: "2**32 entries" header can cause.
MAX_CONTAINER_LEN: Final = 1024

#: Length of any string in a header (names, error messages). Long enough for any error
#: text we write and any model or tensor name an exporter produces.
MAX_STR_LEN: Final = 4 * KiB

#: Length of any binary value inside a header (hashes, nonces). Bulk data never goes in a
#: header: it travels as the frame's raw payload.
MAX_BIN_LEN: Final = 1 * KiB

# --- tensors -------------------------------------------------------------------------

#: Rank of a tensor. ONNX models in practice use rank <= 6; 8 leaves room.
MAX_TENSOR_RANK: Final = 8

#: Elements in one tensor: the payload limit divided by the smallest itemsize (1 byte).
MAX_TENSOR_ELEMENTS: Final = MAX_PAYLOAD_BYTES

#: Tensors in one inference request or result. Models have a handful of inputs/outputs.
MAX_TENSORS: Final = 64

# --- model transfer ------------------------------------------------------------------

#: Size of one model chunk the custodian sends. 4 MiB amortises per-frame cost (about
#: 1 % of the transfer time at 1 GB/s) while keeping the enclave's extra buffer small.
MODEL_CHUNK_BYTES: Final = 4 * MiB

#: Largest model the enclave accepts. The enclave holds the whole model in memory, and an
#: SGX enclave is sized ahead of time; 2 GiB is protobuf's own hard limit for one ONNX file.
MAX_MODEL_BYTES: Final = 2 * 1024 * MiB - 1

# --- messages ------------------------------------------------------------------------

#: Largest request id, inference count or sequence number: unsigned 63-bit, so every value
#: fits SQLite's INTEGER and msgpack's int64 alike.
MAX_UINT: Final = 2**63 - 1

#: Most inferences one grant or supply may add. A million per call stops a typo (an extra
#: six zeros) from handing out effectively unlimited use; operators can call again.
MAX_GRANT_UNITS: Final = 1_000_000

#: Longest wait (seconds) a consumer may ask for when no inferences are left: one day.
MAX_WAIT_SECONDS: Final = 86_400.0

#: Models listed in one model-info reply.
MAX_MODELS: Final = 64

#: Shared model metadata (docs/links.md, Version 3): keys one model shares, a key's
#: length, and the UTF-8 bytes of one model's shared values together (they travel as
#: payload: a label list or a character dictionary outgrows a header string). 1 MiB
#: holds the 21,843 class names of ImageNet-21k several times over.
MAX_METADATA_KEYS: Final = 16
MAX_METADATA_KEY_LEN: Final = 128
MAX_METADATA_BYTES: Final = 1 * MiB

# --- timeouts (seconds) --------------------------------------------------------------

#: TLS handshake, RA-TLS verification included, which takes a small fraction of this
#: (``bench/attestation.py``); 10 s tolerates slow networks but not a stalled peer.
HANDSHAKE_TIMEOUT: Final = 10.0

#: Waiting for the first message (hello) after the handshake.
HELLO_TIMEOUT: Final = 10.0

#: Longest a frame may take to arrive once its first byte has (the consumer port). A
#: payload must also keep up :data:`MIN_TRANSFER_RATE` after :data:`RATE_GRACE`, so a 64 MiB
#: request is given its 30 s only at 2.2 MB/s or more.
FRAME_TIMEOUT: Final = 30.0

#: Slowest average rate (bytes/s) at which a frame may arrive, counted from its first byte
#: after :data:`RATE_GRACE`. A peer that trickles a byte now and then holds the memory it
#: sent and a connection slot; this makes it leave. 256 KiB/s is far below any link a
#: consumer sends tensors over.
MIN_TRANSFER_RATE: Final = 256 * KiB

#: Seconds of a frame before :data:`MIN_TRANSFER_RATE` applies (a round trip, a TCP window).
RATE_GRACE: Final = 5.0

#: Memory (bytes) for everything the consumer port has received and not yet answered: the
#: partial frames of every connection and the payloads of requests queued, parked or
#: running. Charged for bytes received, never announced. 256 MiB holds four full-size
#: requests or thousands of typical ones, and is what the enclave's size must leave room
#: for beyond its models (docs/production.md).
PAYLOAD_BUDGET_BYTES: Final = 256 * MiB

#: The most of :data:`PAYLOAD_BUDGET_BYTES` one connection may hold: one full-size frame
#: and a read beyond it, plus 8 MiB of further requests. No connection can take the
#: whole budget; one whose share is full is read no further until its requests end.
CONNECTION_SHARE_BYTES: Final = MAX_PAYLOAD_BYTES + 8 * MiB

#: Between heartbeats on the custodian link, and how many may be missed before the link is
#: declared dead. 3 missed 1-second beats bound the kill-switch delay of a silent partition.
HEARTBEAT_INTERVAL: Final = 1.0
HEARTBEAT_MISSES: Final = 3
