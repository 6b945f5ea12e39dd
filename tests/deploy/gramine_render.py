"""Render ``gramine/drm_enclave.manifest.template`` here, without Gramine installed.

``gramine-manifest`` renders with a Jinja2 environment built by
``graminelibos.gen_jinja_env.make_env``: ``StrictUndefined``, ``keep_trailing_newline``,
and the globals ``gramine`` (``libos``, ``pkglibdir``, ``runtimedir()``), ``python``
(sysconfig paths, ``get_sys_path(interpreter)``...), ``env`` and ``ldd(*executables)``.
The stand-ins below compute the same values the same way from the current interpreter;
only Gramine's own install directory is faked (:func:`fake_gramine`: an empty
``libsysdb.so`` and ``runtime/glibc/``), so that "every trusted file exists" can be
checked for real.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jinja2

TEMPLATE = Path(__file__).resolve().parents[2] / "gramine" / "drm_enclave.manifest.template"
MAKEFILE_DIR = TEMPLATE.parent


def python_get_sys_path(interpreter: Any, include_nonexisting: bool = False) -> Iterator[Path]:
    """``python.get_sys_path``: the interpreter's own ``sys.path``, asked of it as Gramine does."""
    script = "import sys; print('\\0'.join(path for path in sys.path if path), end='')"
    output = subprocess.check_output([os.fspath(interpreter), "-c", script])
    for raw in output.split(b"\0"):
        path = pathlib.Path(os.fsdecode(raw))
        if include_nonexisting or path.exists():
            yield path


def ldd(*executables: Any) -> list[str]:
    """``ldd``: the absolute paths of the libraries the executables link, each once, sorted.

    Parses ``ldd`` output as Gramine does: ``name => /path (addr)`` or ``/path (addr)``;
    the vdso has no file and is skipped.
    """
    output = subprocess.check_output(["ldd", *(os.fspath(e) for e in executables)], text=True)
    found = set()
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 3 and words[1] == "=>" and words[2].startswith("/"):
            found.add(words[2])
        elif len(words) >= 2 and words[0].startswith("/") and words[1].startswith("("):
            found.add(words[0])
    return sorted(found)


class Runtimedir:
    """``gramine.runtimedir``: callable, printable and joinable, like Gramine's."""

    def __init__(self, pkglibdir: Path) -> None:
        self.pkglibdir = pkglibdir

    def __call__(self, libc: str = "glibc") -> Path:
        return (self.pkglibdir / "runtime" / libc).resolve()

    def __str__(self) -> str:
        return str(self())

    def __truediv__(self, other: str) -> Path:
        return self() / other


def make_env(pkglibdir: Path) -> jinja2.Environment:
    """The environment ``gramine-manifest`` renders with, Gramine installed at ``pkglibdir``."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    paths = sysconfig.get_paths()
    env.globals["gramine"] = {
        "libos": pkglibdir / "libsysdb.so",
        "pkglibdir": pkglibdir,
        "runtimedir": Runtimedir(pkglibdir),
    }
    env.globals["python"] = {
        "stdlib": Path(paths["stdlib"]),
        "platstdlib": Path(paths["platstdlib"]),
        "purelib": Path(paths["purelib"]),
        "distlib": Path(
            sysconfig.get_path("stdlib", vars={"py_version_short": sys.version_info[0]})
        )
        / "dist-packages",
        "get_config_var": sysconfig.get_config_var,
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "get_path": sysconfig.get_path,
        "get_paths": sysconfig.get_paths,
        "implementation": sys.implementation,
        "get_sys_path": python_get_sys_path,
    }
    env.globals["env"] = os.environ
    env.globals["ldd"] = ldd
    env.globals["libc"] = "glibc"
    return env


def fake_gramine(directory: Path) -> Path:
    """A stand-in Gramine install (``pkglibdir``) with the files the manifest trusts."""
    (directory / "runtime" / "glibc").mkdir(parents=True)
    (directory / "runtime" / "glibc" / "libc.so.6").write_bytes(b"")
    (directory / "libsysdb.so").write_bytes(b"")
    return directory


def arch_libdir() -> str:
    """What the Makefile's ``/lib/$(CC -dumpmachine)`` gives on this machine."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    return f"/lib/{multiarch}"


def defines(custodian_ca: Path, *, debug: bool = False, **overrides: str) -> dict[str, str]:
    """The ``-D`` variables the Makefile passes, for this interpreter and a release build."""
    values = {
        "entrypoint": os.path.realpath(sys.executable),
        "arch_libdir": arch_libdir(),
        "site_packages": sysconfig.get_paths()["purelib"],
        "custodian_ca": str(custodian_ca),
        "debug": "1" if debug else "0",
        "log_level": "debug" if debug else "error",
        "isvprodid": "1",
        "isvsvn": "1",
        "enclave_size": "4G",
        "max_threads": "64",
    }
    values.update(overrides)
    return values


def render(variables: Mapping[str, str], pkglibdir: Path, template: Path = TEMPLATE) -> str:
    """Render like ``gramine-manifest -D...`` (raises ``jinja2.UndefinedError`` on a gap)."""
    env = make_env(pkglibdir)
    return env.from_string(template.read_text(encoding="utf-8")).render(**variables)
