"""Settings every test process needs before any test module is imported."""

from __future__ import annotations

import os

# Keep onnxruntime from writing telemetry under the home directory during the tests
# (drm_enclave sets the same for the daemon; test helpers may import onnxruntime first).
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
