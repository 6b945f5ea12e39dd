"""The protocol core does no I/O: importing it must not pull in trio, sockets or OpenSSL."""

from __future__ import annotations

import subprocess
import sys

SANS_IO_MODULES = [
    "drm_wire.errors",
    "drm_wire.limits",
    "drm_wire.codec",
    "drm_wire.framing",
    "drm_wire.tensors",
    "drm_wire.messages",
    "drm_wire.protocol",
]
FORBIDDEN = ["trio", "OpenSSL", "socket", "ssl", "selectors", "asyncio", "structlog"]


def test_core_imports_no_io_library_in_a_fresh_interpreter() -> None:
    code = (
        "import sys\n"
        f"for name in {SANS_IO_MODULES!r}: __import__(name)\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""
