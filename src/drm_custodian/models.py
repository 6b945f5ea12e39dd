"""The models a custodian lends, as it holds them: read once into memory, named, hashed.

:func:`read_model_file` reads each ``--upload`` before the daemon starts;
:class:`ModelFile` is what :mod:`drm_custodian.serve` hands to every enclave session,
which streams it to the enclave and commits to its SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from drm_wire.errors import ConfigError, LocalProtocolError
from drm_wire.limits import MAX_MODEL_BYTES
from drm_wire.tensors import check_name

__all__ = ["ModelFile", "read_model_file"]


@dataclass(frozen=True, slots=True, eq=False)
class ModelFile:
    """A model to lend, held in memory: its name on the wire, bytes and SHA-256."""

    name: str
    data: bytes = field(repr=False)
    sha256: bytes = field(repr=False)

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> ModelFile:
        """Raises: ValueError: empty, larger than ``MAX_MODEL_BYTES``, or a bad name."""
        if not data or len(data) > MAX_MODEL_BYTES:
            raise ValueError(f"a model must be 1 to {MAX_MODEL_BYTES} bytes")
        try:
            check_name(name)
        except LocalProtocolError as exc:
            raise ValueError(f"{name!r} is not a valid model name") from exc
        return cls(name, data, hashlib.sha256(data).digest())


def read_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Read a model into memory; its wire name is the file name without ``.onnx``.

    Blocking: call it before ``trio.run`` or in a worker thread.

    Raises:
        ConfigError: not a readable regular file, empty, or over ``MAX_MODEL_BYTES``.
    """
    file = Path(path)
    try:
        with file.open("rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError("not a regular file", path=str(file))
            if st.st_size > MAX_MODEL_BYTES:
                raise ConfigError(
                    f"{st.st_size} bytes: larger than the {MAX_MODEL_BYTES}-byte limit",
                    path=str(file),
                )
            data = handle.read(MAX_MODEL_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read model: {exc.strerror}", path=str(file)) from exc
    name = file.name.removesuffix(".onnx") or file.name
    try:
        return ModelFile.from_bytes(name, data)
    except ValueError as exc:
        raise ConfigError(str(exc), path=str(file)) from exc
