"""The enclave's model host: check a model's bytes, load them into onnxruntime, run it.

Theory of operation
-------------------
:func:`load_model` takes the model's bytes as they arrived from the custodian (see
:mod:`drm_enclave.model_receiver`) and, before onnxruntime sees them:

1. bounds the size (:data:`~drm_wire.limits.MAX_MODEL_BYTES`; empty is refused);
2. walks the protobuf wire format of the ``ModelProto`` (:func:`_scan_model`) and refuses
   any tensor stored as *external data* (M02: a ``location`` such as ``../secret`` would
   make onnxruntime open files: onnx CVE-2022-25882, CVE-2024-27318), wherever the tensor
   sits: initializers, sparse initializers, ``Constant``-style attributes, subgraphs of
   ``If``/``Loop``/``Scan``, model-local functions and training graphs;
3. refuses nodes from an operator domain onnxruntime's CPU build does not ship
   (:data:`ALLOWED_DOMAINS`) unless they call a function defined in the model itself (M03).
   No custom-op library is ever registered with onnxruntime, so such a node could only
   fail later; refusing it here gives a clear error.

Then it creates the session in memory (*Memory* below says how the weights get there),
with :func:`session_options` (M06): no optimised-model file, no profiling, and ORT's log
severity at FATAL, because its ERROR lines name the failing node (with ORT 1.32,
severity 3 still prints ``Name:'<node>'``). onnxruntime's telemetry is switched off
before it is imported (see the comment at the import: its on-disk event queue holds error
messages naming nodes).
Anything onnxruntime refuses becomes :class:`ModelError` ("invalid model: ...", M01) and
the process carries on with no model.

Graph optimisation is ``ORT_ENABLE_ALL``: every level works in memory, and on the
covidnet-like CNN it gave the fastest run and session creation (docs/production.md,
*Measurements behind the design*).

Why not the ``onnx`` package at runtime
--------------------------------------
``onnx.load_model_from_string`` would parse the whole model into Python-owned protobuf
objects: a second full copy of the weights (200 MB for the big model) only to read a few
enum fields, and a large native dependency (and its own CVE history) inside the enclave's
trusted computing base and measurement. The checks need three things from the wire format:
tags, varints and lengths. :func:`_scan_model` is that walk, about 100 lines, which
descends only into the messages that can hold tensors or nodes and skips everything else
(raw weights included) by length, so it costs microseconds even for 200 MB. ``onnx`` stays
a test and bench dependency; the tests check the walk against models built with it.

Inline or thread (:meth:`HostedModel.run_async`)
-----------------------------------------------
A run through ``trio.to_thread.run_sync`` pays a hop to a worker thread and back: several
times the whole inline path of a tiny model, and a few per cent of a CNN's run, which
inline would hold the event loop, and with it the custodian link, heartbeats and every
other consumer, for as long as it runs (``python bench/inference.py`` times each path;
docs/production.md, *Measurements behind the design*). So the policy: a run goes inline
when a run at least as large (in input bytes) was observed to take at most
:data:`INLINE_FAST` (0.5 ms), and through ``trio.to_thread.run_sync`` otherwise; one run
slower than :data:`INLINE_BUDGET` (1 ms) sends that size and larger back to the thread.
The loop is never stalled for more than one run past 1 ms, each new input size is first
measured off the loop, and small models stop paying the hop after their first request.
(The inline path's extra cost over ``run`` is its two trio checkpoint halves: cancel
is checked before the run, and the task yields after it so a pipelining consumer cannot
monopolise the loop.)

Memory: weights read in place, copied at most once
--------------------------------------------------
Handing onnxruntime the model as ``bytes`` costs three copies on top of the receiver's
buffer: the ``bytes`` object its Python API requires, the parsed protobuf (every
``raw_data`` is a ``std::string``) and the session's own tensors, so loading a large
model peaked at several times its size. So :func:`load_model` cuts the model with
:func:`~drm_wire.model.scan.split_weights`: onnxruntime parses a skeleton of a few KiB
in which each large raw initializer of the main graph is a placeholder, and receives the
weights through ``SessionOptions.add_external_initializers`` as numpy arrays over the
caller's buffer (no copy). onnxruntime copies them once into its own tensors while it
loads the skeleton and keeps no reference to them afterwards (its documented contract,
checked by this module's tests: the buffer is overwritten after loading and the outputs
do not change). A placeholder's data is marked external, at a location that is not a
path, and is replaced by name before onnxruntime could resolve it; a model that arrives
with external data of its own is still refused by the scan (M02).

That copy is the second copy of a large model, and onnxruntime 1.32 offers no way around
it for an initializer: ``add_external_initializers`` and
``add_external_initializers_from_files_in_memory`` both copy (documented, and seen at the
peak on the bench model); ``add_initializer`` would use our buffer
as is, but only for an initializer the model itself holds, and a placeholder without its
data fails onnxruntime's checks (no such file; wrong element count), while an ORT
in-memory address in the model is refused outright. Hence, for large models
(:data:`IN_PLACE_BYTES`), the weights that only feed ``MatMul`` or ``Gemm``
(:data:`~drm_wire.model.scan.FEED_OPS`) are declared as *graph inputs* of the skeleton
instead, and :class:`HostedModel` feeds them to every run as numpy arrays over the
caller's buffer, which onnxruntime reads in place (CPU tensors are not copied in). The
buffer is then the model's only copy: it lives as long as the :class:`HostedModel`. The
cost is what onnxruntime can no longer do with a constant weight: prepack it (already off
at that size, below) or fold it into a graph rewrite, which is why only MatMul/Gemm weights
qualify (a Conv weight, which layout and BatchNorm rewrites need constant, stays an
initializer). Only a read-only buffer is read for good (``bytes``, or the receiver's view:
the receiver keeps no reference to the mapping under it), so the bytes hashed are the
bytes run; a writable one (``bytearray``) takes the copying path.

On the 200 MB bench model (``python bench/e2e.py --only delivery``; figures in
docs/production.md, *Measurements behind the design*), feeding the weights in place takes
the peak from about two copies of the model to about one and ends the load far sooner,
while ``session.run`` of that model takes as long as before. Weights totalling
:data:`NO_PREPACK_BYTES` or more also switch off onnxruntime's weight prepacking, whose
packed copy of each MatMul weight adds to the peak.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any, Final, final

import numpy as np
import trio

# onnxruntime's Linux wheels (1.32) carry Microsoft 1DS telemetry. At import it opens a
# SQLite queue under ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ (plus a device id)
# and records events there for upload, including load and run error messages, which
# name the model's nodes (seen in that queue during this module's tests). The variable
# is read when onnxruntime is first imported, so it must be set before that import;
# load_model also turns events off through the API in case something imported
# onnxruntime earlier (that still leaves the file opened and one start-up event).
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from drm_wire.errors import DrmError, ErrorCode, LocalProtocolError
from drm_wire.limits import MAX_MODEL_BYTES
from drm_wire.messages import Metadata, ModelDescription
from drm_wire.model.scan import ALLOWED_DOMAINS, ModelError, _name, scan_model, split_weights
from drm_wire.model.signature import signature
from drm_wire.model.terms import OutsideTerms, Pricing, Terms, TermsError, resolve
from drm_wire.tensors import DTYPES, Tensor, check_name

__all__ = [
    "ALLOWED_DOMAINS",
    "INLINE_BUDGET",
    "INLINE_FAST",
    "IN_PLACE_BYTES",
    "NO_PREPACK_BYTES",
    "BadInputError",
    "HostedModel",
    "InferenceError",
    "ModelError",
    "load_model",
    "session_options",
]

#: A run observed to take at most this long (seconds) lets runs of that input size and
#: smaller go inline on the event loop.
INLINE_FAST: Final = 0.0005
#: A run that takes longer than this sends runs of that size and larger back to a thread.
INLINE_BUDGET: Final = 0.001

#: Split weights totalling at least this many bytes turn onnxruntime's weight prepacking
#: off: prepacking a MatMul weight allocates its packed copy while the original is still
#: there (+1 weight at peak: +64 MiB on the 200 MB bench model), and for a large model the
#: peak, which sizes the enclave, matters more than the gain of prepacking (none measured
#: at batch 1 on that model). Smaller models, the covidnet-like CNN included, keep it.
NO_PREPACK_BYTES: Final = 64 * 1024 * 1024

#: Split weights that only feed MatMul/Gemm (:data:`~drm_wire.model.scan.FEED_OPS`)
#: and total at least this many bytes are given to onnxruntime as graph inputs read in
#: place, fed to every run, rather than as initializers it copies: see *Memory*.
IN_PLACE_BYTES: Final = NO_PREPACK_BYTES

#: ORT's log severity: 4 = FATAL. At 3 (ERROR) a failed run still logs the node's name.
ORT_LOG_SEVERITY: Final = 4

#: Every exception class onnxruntime's native module raises, plus the wrapper's own.
_ORT_ERRORS: Final[tuple[type[Exception], ...]] = (
    *(v for v in vars(_ort_state).values() if isinstance(v, type) and issubclass(v, Exception)),
    RuntimeError,
    ValueError,
)
_ORT_STATUS: Final = re.compile(r"\[ONNXRuntimeError\] : \d+ : ([A-Z_]+) :")


#: A request's tensors do not match the model's inputs (M04) or are outside its terms
#: (I14). Raised before any quota is taken, so the request costs the consumer nothing.
#: Its ``code`` is :attr:`ErrorCode.BAD_REQUEST`; ``field`` names the input at fault.
BadInputError = OutsideTerms


class InferenceError(DrmError):
    """onnxruntime failed while running a request that passed :meth:`HostedModel.check_inputs`
    (for instance a dynamic dim the graph cannot reshape). No inference is counted."""

    code = ErrorCode.INFERENCE_FAILED


def _ort_category(exc: BaseException) -> str:
    match = _ORT_STATUS.search(str(exc))
    return match.group(1) if match else type(exc).__name__


# --- the session ----------------------------------------------------------------------


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """The only session options the enclave uses (M06)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = ""  # never write the optimised model anywhere
    options.enable_profiling = False  # no profile file, whose events name every node
    options.log_severity_level = ORT_LOG_SEVERITY
    options.log_verbosity_level = 0
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    # Bytes are always parsed as ONNX protobuf, never sniffed as the ORT flatbuffer format.
    options.add_session_config_entry("session.load_model_format", "ONNX")
    return options


def load_model(
    name: str,
    data: bytes | bytearray | memoryview,
    *,
    intra_op_threads: int = 1,
    sha256: bytes | None = None,
    terms: Terms | None = None,
    metadata: Metadata = (),
) -> HostedModel:
    """Check the model's bytes, then create an in-memory onnxruntime session for them.

    Args:
        name: the model's name (as in :class:`~drm_wire.messages.ModelBegin`).
        data: the serialized ``ModelProto``. Only read. Large weights are read in place:
            copied once by onnxruntime, or, for a large model in a read-only buffer, fed
            from ``data`` at every run, which the returned model then keeps alive (see
            *Memory*). A model without any goes to onnxruntime as ``bytes`` (a ``bytes``
            object as is, anything else copied once).
        intra_op_threads: onnxruntime's intra-op thread count (1 to 64).
        sha256: the model's SHA-256 when the caller has already checked it (the custodian
            link's :class:`~drm_enclave.model_receiver.ModelReceiver` does), to spare a
            second pass over the bytes; computed here otherwise.
        terms: the owner's lending terms, as they came with the model (``None``: the
            defaults of :class:`~drm_wire.model.terms.Terms`), resolved against the
            model's inputs.
        metadata: the entries of the model's metadata its owner shares, as they came
            with the model (:class:`~drm_wire.messages.ModelBegin`): shown to consumers
            in ``model_info``.

    Raises:
        ModelError: empty, too large, malformed, external data, an unregistered operator
            domain, an input or output the wire cannot carry, refused by onnxruntime, or
            terms that do not fit its inputs.
        LocalProtocolError: ``name`` is not a valid model name.
        ValueError: ``intra_op_threads`` out of range.
    """
    check_name(name)
    if type(intra_op_threads) is not int or not 1 <= intra_op_threads <= 64:
        raise ValueError("intra_op_threads must be an int from 1 to 64")
    view = memoryview(data).cast("B")
    if view.nbytes == 0:
        raise ModelError("empty")
    if view.nbytes > MAX_MODEL_BYTES:
        raise ModelError(f"{view.nbytes} bytes is over the limit of {MAX_MODEL_BYTES}")
    if sha256 is not None and (type(sha256) is not bytes or len(sha256) != 32):
        raise ValueError("sha256 must be 32 bytes")
    scan_model(view)
    if sha256 is None:
        sha256 = hashlib.sha256(view).digest()
    session, weights = _create_session(data, view, session_options(intra_op_threads))
    inputs, outputs = signature(session.get_inputs(), session.get_outputs(), skip=weights)
    terms = Terms() if terms is None else terms
    try:
        pricing = resolve(terms, inputs)
    except TermsError as exc:
        raise ModelError(f"its terms do not fit it: {exc.message}") from None
    description = ModelDescription(
        name=name, sha256=sha256, inputs=inputs, outputs=outputs, terms=pricing.as_terms(),
        metadata=metadata,
    )  # fmt: skip
    return HostedModel(session, description, pricing, terms, intra_op_threads, weights)


def _create_session(
    data: bytes | bytearray | memoryview, view: memoryview, options: ort.SessionOptions
) -> tuple[ort.InferenceSession, dict[str, np.ndarray[Any, Any]]]:
    """An onnxruntime session for a scanned model, its large weights read in place; and
    the weights it takes as inputs at every run (arrays over ``view``), if any.

    The weights :func:`split_weights` finds go to onnxruntime as external initializers:
    numpy arrays over ``view`` (no copy) that it copies once into its own tensors, while
    it parses only the skeleton. Neither ``view`` nor the arrays are referenced by the
    session afterwards (onnxruntime's ``AddExternalInitializers`` contract). Weights that
    :func:`split_weights` declares as graph inputs (:data:`IN_PLACE_BYTES`; a read-only
    ``view`` only) are returned instead, as arrays over ``view``: they keep the caller's
    buffer alive, as the model's only copy of them.
    """
    # Fed for good only from a buffer no one can write: what was hashed is what runs.
    split = split_weights(view, feed_bytes=IN_PLACE_BYTES if view.readonly else None)
    names: list[str] = []
    values: list[ort.OrtValue] = []
    weights: dict[str, np.ndarray[Any, Any]] = {}
    if split is None:
        model_bytes = data if type(data) is bytes else bytes(view)
    else:
        model_bytes = split.skeleton
        for weight in split.inputs:
            dtype = np.dtype(weight.feed_dtype)
            weights[weight.name] = np.frombuffer(
                view, dtype=dtype, count=weight.nbytes // dtype.itemsize, offset=weight.start
            ).reshape(weight.dims)
        for weight in split.weights:
            size = weight.itemsize
            array = np.frombuffer(
                view, dtype=np.dtype(f"<u{size}" if size > 1 else "u1"),
                count=(weight.end - weight.start) // size, offset=weight.start,
            ).reshape(weight.dims)  # fmt: skip
            names.append(weight.name)
            values.append(ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, weight.data_type))
        if names:
            options.add_external_initializers(names, values)
        if sum(w.nbytes for w in (*split.weights, *split.inputs)) >= NO_PREPACK_BYTES:
            options.add_session_config_entry("session.disable_prepacking", "1")
    ort.set_default_logger_severity(ORT_LOG_SEVERITY)  # the process-wide logger too
    ort.disable_telemetry_events()
    try:
        # enable_fallback=0: on a failure the wrapper would otherwise print the error
        # (node names included) to stdout and try again.
        session = ort.InferenceSession(
            model_bytes, options, providers=["CPUExecutionProvider"], enable_fallback=0
        )
    except _ORT_ERRORS as exc:
        # ORT's message names nodes and initializers (M06): keep only its status category,
        # and do not chain it into tracebacks that the log would print.
        raise ModelError(f"onnxruntime refused it ({_ort_category(exc)})") from None
    finally:
        del model_bytes, values
    # The wrapper keeps the bytes and the options it was given only to re-create the
    # session on a provider fallback, which is disabled: drop the bytes (a full copy of a
    # model without split weights) and the options (they point into the caller's buffer).
    session._model_bytes = None
    session._sess_options_initial = None
    return session, weights


@final
class HostedModel:
    """A loaded model: its description, input checks and runs. Made by :func:`load_model`.

    ``run`` may be called from several threads at once (onnxruntime sessions are
    thread-safe); ``run_async`` from trio tasks.
    """

    __slots__ = ("_description", "_inline_max", "_inputs", "_limiter", "_outputs", "_pricing",
                 "_session", "_terms", "_threads", "_weights")  # fmt: skip

    def __init__(
        self,
        session: ort.InferenceSession,
        description: ModelDescription,
        pricing: Pricing,
        terms: Terms,
        intra_op_threads: int,
        weights: dict[str, np.ndarray[Any, Any]] | None = None,
    ) -> None:
        self._session = session
        #: Weights the session takes as inputs, fed to every run (see *Memory*). They are
        #: not in the description, so a request naming one is refused as unknown.
        self._weights = weights or {}
        self._description = description
        self._inputs = {spec.name: spec for spec in description.inputs}
        self._outputs = [spec.name for spec in description.outputs]
        self._pricing = pricing
        self._terms = terms
        self._threads = intra_op_threads
        #: Largest total input size (bytes) known to run fast enough to stay inline.
        self._inline_max = -1
        self._limiter: trio.CapacityLimiter | None = None

    def __repr__(self) -> str:
        d = self._description
        return f"<HostedModel {d.name!r} sha256={d.sha256.hex()[:16]} inline<={self._inline_max}B>"

    @property
    def description(self) -> ModelDescription:
        """Name, SHA-256, inputs and outputs (``None`` for dynamic dims)."""
        return self._description

    @property
    def terms(self) -> Terms:
        """The terms as the custodian sent them (compared when a session is kept)."""
        return self._terms

    @property
    def pricing(self) -> Pricing:
        """The terms resolved against the inputs: what a request may be and costs."""
        return self._pricing

    @property
    def session_options(self) -> ort.SessionOptions:
        """The live session's options, for audits (M06)."""
        return self._session.get_session_options()

    def check_inputs(self, tensors: Sequence[Tensor]) -> int:
        """Check that ``tensors`` are exactly the model's inputs (M04), within its terms
        (I14), and return what the request costs under them (units of quota).

        Names (each input once, none unknown), dtypes, ranks, every dim within its range
        under the terms (a fixed dim exactly), and batch sizes agreeing across batched
        inputs. Dims sharing a symbolic name are not compared (see
        :mod:`drm_wire.model.signature`). Call this before taking quota: it raises
        before anything is spent.

        Raises:
            BadInputError: the first mismatch found.
        """
        return self._checked(tensors)[1]

    def _feeds(self, tensors: Sequence[Tensor]) -> dict[str, np.ndarray[Any, Any]]:
        return self._checked(tensors)[0]

    def _checked(self, tensors: Sequence[Tensor]) -> tuple[dict[str, np.ndarray[Any, Any]], int]:
        """The feeds for onnxruntime and the request's cost, every path checking the terms."""
        specs = self._inputs
        if len(tensors) != len(specs):
            raise BadInputError(
                f"the model takes {len(specs)} input(s) ({', '.join(map(_name, specs))}), "
                f"got {len(tensors)}",
                got=len(tensors),
            )
        feeds: dict[str, np.ndarray[Any, Any]] = {}
        for tensor in tensors:
            if type(tensor) is not Tensor:
                raise BadInputError("inputs must be Tensor values", got=type(tensor).__name__)
            name = tensor.name
            spec = specs.get(name)
            if spec is None or name in feeds:
                what = "unknown" if spec is None else "duplicate"
                raise BadInputError(f"{what} input {_name(name)}", field=name)
            if tensor.dtype != spec.dtype:
                raise BadInputError(
                    f"input {_name(name)} must be {spec.dtype}, got {tensor.dtype}",
                    field=name,
                    got=tensor.dtype,
                )
            shape = tensor.shape
            if len(shape) != len(spec.shape):
                raise BadInputError(
                    f"input {_name(name)} must have rank {len(spec.shape)}, got {len(shape)}",
                    field=name,
                    got=len(shape),
                )
            for axis, (dim, want) in enumerate(zip(shape, spec.shape, strict=True)):
                if want is not None and dim != want:
                    raise BadInputError(
                        f"input {_name(name)} dim {axis} must be {want}, got {dim}",
                        field=name,
                        got=dim,
                    )
            if tensor.data.nbytes != math.prod(shape) * DTYPES[tensor.dtype].itemsize:
                raise BadInputError(f"input {_name(name)} has the wrong byte length", field=name)
            feeds[name] = tensor.to_numpy()
        cost = self._pricing.check({tensor.name: tensor.shape for tensor in tensors})
        return feeds, cost

    def run(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """Check the inputs, run the model, return its outputs in model order.

        Inputs reach onnxruntime without a copy (``Tensor.to_numpy`` shares their bytes);
        outputs wrap onnxruntime's arrays without a copy.

        Raises:
            BadInputError: as :meth:`check_inputs`.
            InferenceError: onnxruntime failed to run the model on these inputs.
        """
        return self._run(self._feeds(tensors))

    def _run(self, feeds: dict[str, np.ndarray[Any, Any]]) -> tuple[Tensor, ...]:
        if self._weights:
            feeds = feeds | self._weights  # after _feeds: a request cannot name a weight
        try:
            arrays = self._session.run(self._outputs, feeds)
        except _ORT_ERRORS as exc:
            # Not chained: ORT's message names the failing node (M06).
            raise InferenceError(f"the model failed to run ({_ort_category(exc)})") from None
        outputs = []
        try:
            for spec, array in zip(self._description.outputs, arrays, strict=True):
                if array.flags.c_contiguous and array.dtype == DTYPES[spec.dtype] and array.size:
                    # What ORT returns: the declared dtype, C order. Wrap it without the
                    # dtype lookup and checks of Tensor.from_numpy, on every run's path.
                    data = memoryview(array).cast("B")
                    tensor = Tensor(name=spec.name, dtype=spec.dtype, shape=array.shape, data=data)
                else:
                    tensor = Tensor.from_numpy(spec.name, array)
                outputs.append(tensor)
        except LocalProtocolError as exc:  # e.g. an output over MAX_TENSOR_ELEMENTS
            raise InferenceError(f"an output cannot be sent: {exc.message}") from exc
        return tuple(outputs)

    def _timed_run(
        self, feeds: dict[str, np.ndarray[Any, Any]]
    ) -> tuple[tuple[Tensor, ...], float]:
        start = time.perf_counter()
        outputs = self._run(feeds)
        return outputs, time.perf_counter() - start

    def _observe(self, size: int, elapsed: float) -> None:
        if elapsed <= INLINE_FAST:
            self._inline_max = max(self._inline_max, size)
        elif elapsed > INLINE_BUDGET:
            self._inline_max = min(self._inline_max, size - 1)

    def runs_inline(self, tensors: Sequence[Tensor]) -> bool:
        """Whether a run of these inputs is known to be fast enough to stay on the loop
        (what :meth:`run_async` would decide; the inputs are not checked here)."""
        return sum(tensor.data.nbytes for tensor in tensors) <= self._inline_max

    def run_inline(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """:meth:`run` on the event loop, observed for the inline policy like
        :meth:`run_async`: for a caller that asked :meth:`runs_inline` first and has no
        schedule point to spare.

        Raises:
            BadInputError, InferenceError: as :meth:`run`.
        """
        feeds = self._feeds(tensors)
        outputs, elapsed = self._timed_run(feeds)
        self._observe(sum(array.nbytes for array in feeds.values()), elapsed)
        return outputs

    async def run_async(
        self, tensors: Sequence[Tensor], *, inline: bool | None = None
    ) -> tuple[Tensor, ...]:
        """:meth:`run` for trio: inline when this size is known to be fast, else in a thread.

        Args:
            tensors: as :meth:`run`.
            inline: force one path (benchmarks and tests); ``None`` lets the policy in the
                module docstring decide.

        Cancellation is checked only before the run starts. Once it has started the
        run completes and its outputs are returned (a thread run is not abandoned), so a
        started inference always ends with a result or an error, never "maybe ran".

        Raises:
            BadInputError, InferenceError: as :meth:`run`.
        """
        feeds = self._feeds(tensors)
        size = sum(array.nbytes for array in feeds.values())
        await trio.lowlevel.checkpoint_if_cancelled()
        if inline if inline is not None else size <= self._inline_max:
            outputs, elapsed = self._timed_run(feeds)
            self._observe(size, elapsed)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return outputs
        if self._limiter is None:
            # One run per core at a time: more would only contend for the same cores.
            self._limiter = trio.CapacityLimiter(max(1, (os.cpu_count() or 1) // self._threads))
        outputs, elapsed = await trio.to_thread.run_sync(
            self._timed_run, feeds, limiter=self._limiter
        )
        self._observe(size, elapsed)
        return outputs
