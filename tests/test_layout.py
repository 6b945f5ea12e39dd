"""Who imports whom: ``tests`` only from tests, and the lab never from a program that ships.

``tests`` is not installed: code outside it that imports it needs the repository root on
``sys.path``, and drags the test suite into a benchmark or the demo. What they share
lives in :mod:`drm_lab`, which is installed with the project. The daemons and the
consumer (``drm_custodian``, ``drm_enclave``, ``drm_consumer`` and their ``drm_wire``)
must not depend on that test tooling in turn.

Every ``.py`` file is parsed with :mod:`ast`, not imported, and every ``import`` and
``from ... import`` in it counts, those inside functions included; relative imports are
resolved against the file's package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parents[1]
SRC: Final = ROOT / "src"
#: Everything that is not the test suite.
OUTSIDE_TESTS: Final = (SRC, ROOT / "bench", ROOT / "demo", ROOT / "noxfile.py")
#: The packages of the programs that ship.
SHIPPED: Final = ("drm_custodian", "drm_enclave", "drm_consumer", "drm_wire")


def python_files(*roots: Path) -> Iterator[Path]:
    for root in roots:
        yield from [root] if root.is_file() else sorted(root.rglob("*.py"))


def _package(path: Path) -> list[str]:
    """The package a file's relative imports start from (none for a script)."""
    if not path.is_relative_to(SRC):
        return []
    return list(path.relative_to(SRC).parent.parts)


def imported_modules(source: str, package: list[str] | None = None) -> set[str]:
    """The absolute names of the modules ``source`` imports (``from m import x``: ``m``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package or []
            if node.level:
                base = base[: len(base) - (node.level - 1)]
                names.add(".".join([*base, *([node.module] if node.module else [])]))
            elif node.module is not None:
                names.add(node.module)
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def offenders(files: Iterator[Path], package: str) -> list[str]:
    found = []
    for path in files:
        source = path.read_text(encoding="utf-8")
        for name in sorted(imported_modules(source, _package(path))):
            if within(name, package):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize(
    ("source", "package", "expected"),
    [
        ("import tests", None, {"tests"}),
        ("import tests.models as m, os", None, {"tests.models", "os"}),
        ("from tests import models", None, {"tests"}),
        ("from tests.e2e.conftest import Deployment", None, {"tests.e2e.conftest"}),
        ("def f():\n    import tests.simulation\n", None, {"tests.simulation"}),
        ("from .runtime import x", ["drm_enclave"], {"drm_enclave.runtime"}),
        ("from .. import limits", ["drm_wire", "net"], {"drm_wire"}),
        ("from ..net import tls", ["drm_wire", "attestation"], {"drm_wire.net"}),
    ],
)
def test_every_kind_of_import_is_seen(
    source: str, package: list[str] | None, expected: set[str]
) -> None:
    assert imported_modules(source, package) == expected


def test_nothing_outside_the_tests_imports_them() -> None:
    scanned = {p.relative_to(ROOT).as_posix() for p in python_files(*OUTSIDE_TESTS)}
    assert {"noxfile.py", "bench/e2e.py", "demo/run.py", "src/drm_lab/processes.py"} <= scanned
    assert offenders(python_files(*OUTSIDE_TESTS), "tests") == []


@pytest.mark.parametrize("package", SHIPPED)
def test_no_shipped_program_imports_the_lab(package: str) -> None:
    assert (SRC / package / "__init__.py").is_file()
    assert offenders(python_files(SRC / package), "drm_lab") == []
