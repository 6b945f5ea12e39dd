"""The protocol core does no I/O: importing it must not pull in trio, sockets or OpenSSL.

And the wire package as a whole stands below the programs: no ``drm_wire`` module imports
the daemons' plumbing (``drm_daemon``) or a program's package.
"""

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
ABOVE_THE_WIRE = ["drm_daemon", "drm_enclave", "drm_custodian", "drm_consumer"]


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.strip()


def test_core_imports_no_io_library_in_a_fresh_interpreter() -> None:
    code = (
        "import sys\n"
        f"for name in {SANS_IO_MODULES!r}: __import__(name)\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    assert _run(code) == ""


def test_no_wire_module_imports_a_program_or_the_daemon_plumbing() -> None:
    code = (
        "import pkgutil, sys, drm_wire\n"
        "names = [m.name for m in pkgutil.walk_packages(drm_wire.__path__, 'drm_wire.')\n"
        "         if not m.name.endswith('.__main__')]\n"
        "for name in names: __import__(name)\n"
        f"loaded = [m for m in {ABOVE_THE_WIRE!r} if m in sys.modules]\n"
        "print(len(names), ','.join(loaded), sep='|')\n"
    )
    count, loaded = _run(code).split("|")
    assert int(count) > len(SANS_IO_MODULES)  # the walk found the whole package
    assert loaded == ""
