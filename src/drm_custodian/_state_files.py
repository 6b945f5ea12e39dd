"""Reading the custodian's state files the way ssh reads its keys.

Files are opened with ``O_NOFOLLOW`` and must be regular files owned by us; a secret file
with any group or other permission bit, or any file or directory writable by group or
others, is refused with a :class:`~drm_wire.errors.ConfigError` that names it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Final

from drm_wire.errors import ConfigError

#: Largest file read back: certificates and JSON here are a few hundred bytes each.
_MAX_FILE_BYTES: Final = 64 * 1024


def check_dir(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError("state directory does not exist", path=str(path)) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError("not a directory", path=str(path))
    check_owner_and_mode(path, st, secret=False)


def check_owner_and_mode(path: Path, st: os.stat_result, *, secret: bool) -> None:
    if st.st_uid != os.geteuid():
        raise ConfigError(f"owned by uid {st.st_uid}, not by us ({os.geteuid()})", path=str(path))
    mode = stat.S_IMODE(st.st_mode)
    if secret and mode & 0o077:
        raise ConfigError(
            f"permissions {mode:04o} are too open: a private file must not be readable by "
            "group or others (chmod 600)",
            path=str(path),
        )
    if mode & 0o022:
        raise ConfigError(
            f"permissions {mode:04o} are too open: writable by group or others",
            path=str(path),
        )


def check_file(path: Path, *, secret: bool) -> os.stat_result:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise ConfigError("missing", path=str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError("not a regular file (symlinks are refused)", path=str(path))
    check_owner_and_mode(path, st, secret=secret)
    return st


def read_checked(path: Path, *, secret: bool) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ConfigError("missing", path=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot open: {exc.strerror}", path=str(path)) from exc
    with os.fdopen(fd, "rb") as file:
        st = os.fstat(file.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("not a regular file", path=str(path))
        check_owner_and_mode(path, st, secret=secret)
        data = file.read(_MAX_FILE_BYTES + 1)
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigError(f"larger than {_MAX_FILE_BYTES} bytes", path=str(path))
    return data


def load_json(path: Path, *, secret: bool) -> dict[str, object]:
    try:
        doc = json.loads(read_checked(path, secret=secret))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid JSON: {exc}", path=str(path)) from exc
    if not isinstance(doc, dict):
        raise ConfigError("must hold a JSON object", path=str(path))
    return doc
