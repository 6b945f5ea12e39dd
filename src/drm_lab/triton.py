"""Triton's own HTTP client against the gateway, in a process of its own.

``tritonclient[http]`` runs on gevent, which patches the standard library when it is
imported: it must never share a process with trio. The tests and the benchmark run this
module as ``python -m drm_lab.triton MODE URL ...`` and read one JSON document from its
standard output:

- ``roundtrip URL``: health, metadata, and the ``pair`` model (two inputs, two outputs,
  one int64: :func:`drm_lab.models.two_by_two_model`) with binary data on inputs and
  outputs, in JSON, and with no outputs named; the outputs, the response parameters, and
  the status and message of a request for an unknown model.
- ``bench URL MODEL SECONDS CLIENTS``: ``CLIENTS`` greenlets, each with its own
  connection, sending the model's inputs (zeros, batch 1, binary data) for ``SECONDS``;
  the latencies of each request (seconds).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np


def _outputs(result: Any, names: list[str]) -> dict[str, Any]:
    return {name: result.as_numpy(name).tolist() for name in names}


def roundtrip(url: str) -> dict[str, Any]:
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    client = http.InferenceServerClient(url=url.removeprefix("http://"))
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.array([2, -3], dtype=np.int64)
    doc: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("pair"),
        "metadata": client.get_model_metadata("pair"),
        "server": client.get_server_metadata(),
    }
    modes = (("binary", True), ("json", False), ("default", None), ("scheduling", True))
    for mode, binary in modes:
        inputs = [
            http.InferInput("a", list(a.shape), "FP32"),
            http.InferInput("b", list(b.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(a, binary_data=bool(binary))
        inputs[1].set_data_from_numpy(b, binary_data=bool(binary))
        outputs = (
            None
            if binary is None
            else [http.InferRequestedOutput(n, binary_data=binary) for n in ("y", "k")]
        )
        # "scheduling": the parameters tritonclient adds when its caller sets them.
        scheduling = {"priority": 1, "timeout": 5_000_000} if mode == "scheduling" else {}
        result = client.infer("pair", inputs, outputs=outputs, request_id=mode, **scheduling)
        response = result.get_response()
        doc[mode] = {
            "outputs": _outputs(result, ["y", "k"]),
            "dtypes": [str(result.as_numpy(n).dtype) for n in ("y", "k")],
            "parameters": response.get("parameters"),
            "id": response.get("id"),
        }
    try:
        client.infer("nope", inputs)
    except InferenceServerException as exc:
        doc["unknown_model"] = {"status": exc.status(), "message": exc.message()}
    client.close()
    return doc


def bench(url: str, model: str, seconds: float, clients: int) -> dict[str, Any]:
    import gevent
    import tritonclient.http as http

    probe = http.InferenceServerClient(url=url.removeprefix("http://"))
    metadata = probe.get_model_metadata(model)
    probe.close()
    dtypes = {"FP32": np.float32, "INT64": np.int64, "UINT8": np.uint8}
    arrays = [
        (m["name"], m["datatype"], np.zeros([1 if d == -1 else d for d in m["shape"]],
                                            dtype=dtypes[m["datatype"]]))
        for m in metadata["inputs"]
    ]  # fmt: skip
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    def worker() -> None:
        client = http.InferenceServerClient(url=url.removeprefix("http://"))
        inputs = []
        for name, datatype, array in arrays:
            tensor = http.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        while time.monotonic() < deadline:
            started = time.monotonic()
            client.infer(model, inputs)
            latencies.append(time.monotonic() - started)
        client.close()

    started = time.monotonic()
    gevent.joinall([gevent.spawn(worker) for _ in range(clients)], raise_error=True)
    return {"latencies": latencies, "elapsed": time.monotonic() - started}


def main(argv: list[str]) -> int:
    mode, url, *rest = argv
    if mode == "roundtrip":
        doc = roundtrip(url)
    else:
        model, seconds, clients = rest
        doc = bench(url, model, float(seconds), int(clients))
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
