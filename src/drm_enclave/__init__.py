"""The borrower's daemon: holds the model in enclave memory and enforces the quota."""

from __future__ import annotations

import os

# onnxruntime's Linux wheels queue telemetry events (which can name model nodes) in a
# file under the user's cache directory unless this is set before onnxruntime is first
# imported. Every module of this package may import onnxruntime, so the package sets it
# first; see drm_enclave.model_host for what was observed.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
