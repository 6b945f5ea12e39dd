"""Configuration files for the daemons' ``serve`` commands: flat TOML, and flags win.

Theory of operation
-------------------
A daemon declares the options its ``serve`` command takes once, through a
:class:`ConfigSchema` over its argparse sub-parser. Each option is an ordinary argparse
option (its ``type`` converter and ``choices`` are the validation rules), declared with
the TOML type a file must give and its default. argparse itself gets ``SUPPRESS`` as the
default, so the parsed namespace holds only the flags really given on the command line;
:meth:`ConfigSchema.resolve` then fills each key, in this order of precedence::

    command-line flag  >  configuration file  >  default

so a Gramine manifest that fixes ``--attestation gramine --custodian-ca X`` in its argv
cannot be overridden by a host-provided file. A value from the file goes through the same
converter and the same choices as the flag: the rules exist once.

The file (:func:`load_config`): at most :data:`MAX_CONFIG_BYTES`, a regular file, UTF-8,
TOML, flat. Keys are the long flags with dashes turned into underscores (``--admin-port``
is ``admin_port``); a repeatable flag is an array. Relative paths resolve against the
file's directory, so a file and what it names move together. Anything else (an unknown
key, a wrong type, a bad value, a key twice, a table other than those a daemon declares
with :meth:`ConfigSchema.add_table`, such as the custodian's ``[models.NAME]``) stops
start-up with a :class:`~drm_wire.errors.ConfigError` naming the file, the key and what
is allowed; the daemons exit with their usage-error status.
"""

from __future__ import annotations

import argparse
import enum
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from drm_wire.errors import ConfigError
from drm_wire.toml_text import parse_toml_text

__all__ = [
    "MAX_CONFIG_BYTES",
    "ConfigSchema",
    "Kind",
    "Origin",
    "load_config",
    "parse_toml",
    "read_bounded",
    "read_toml",
]

#: A daemon's configuration is a dozen short lines; anything near this is not one.
MAX_CONFIG_BYTES: Final = 64 * 1024


class Kind(enum.Enum):
    """The TOML type an option takes in a file; the value is how errors name it."""

    STRING = "a string"
    INTEGER = "an integer"
    PATH = "a path (a string)"
    PATHS = "an array of paths (strings)"


class Origin(enum.Enum):
    """Where a resolved value came from (``check-config`` shows it)."""

    FLAG = "command line"
    FILE = "config file"
    DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class _Option:
    action: argparse.Action
    kind: Kind
    default: object
    required: bool


def read_bounded(path: Path, *, max_bytes: int, what: str) -> bytes:
    """Read a small file that crossed a trust boundary, refusing anything unexpected.

    The file is opened without blocking (a FIFO cannot hang start-up) and must be a
    regular file of at most ``max_bytes`` bytes. ``what`` names it in errors ("the
    config file", "the license", ...).

    Raises:
        ConfigError: unreadable, not a regular file, or too large; naming ``path``.
    """
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", path=where) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{what} is not a regular file", path=where)
        raw = b""
        while len(raw) <= max_bytes and (chunk := os.read(fd, max_bytes + 1 - len(raw))):
            raw += chunk
    except OSError as exc:
        raise ConfigError(f"cannot read {what}: {exc.strerror}", path=where) from exc
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise ConfigError(f"{what} is larger than {max_bytes} bytes", path=where)
    return raw


def read_toml(path: Path, *, max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    """Read one TOML document, refusing what no configuration file looks like.

    The file goes through :func:`read_bounded`, then :func:`parse_toml`.

    Raises:
        ConfigError: unreadable, not a regular file, too large, or see :func:`parse_toml`.
    """
    return parse_toml(read_bounded(path, max_bytes=max_bytes, what="the config file"), str(path))


def parse_toml(raw: bytes, where: str) -> dict[str, Any]:
    """Parse the bytes of a configuration file (``where`` names it in errors).

    Raises:
        ConfigError: not UTF-8, not TOML (a key given twice included), nested too deeply
            to parse, or an integer too long to convert.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"the config file is not UTF-8 text (byte {exc.start})", path=where
        ) from None
    return parse_toml_text(text, where)


def load_config(path: Path, schema: ConfigSchema) -> dict[str, object]:
    """Read a configuration file and check and convert every key it sets.

    Returns:
        The converted values by key (only the keys the file sets).

    Raises:
        ConfigError: see :func:`read_toml`, plus unknown keys, wrong types and bad values.
    """
    document = read_toml(path)
    base = path.absolute().parent
    return {key: schema.convert(key, value, path, base) for key, value in document.items()}


class ConfigSchema:
    """The options of one ``serve``-like command, settable by flag or by config file.

    Args:
        parser: the command's argparse sub-parser; ``--config`` is added to it.
        config_required: ``--config`` must be given (``check-config``).
    """

    def __init__(self, parser: argparse.ArgumentParser, *, config_required: bool = False) -> None:
        self.parser = parser
        self._options: dict[str, _Option] = {}
        self._tables: dict[str, Callable[[object, str], object]] = {}
        parser.add_argument(
            "--config",
            type=Path,
            required=config_required,
            metavar="FILE.toml",
            help="read options from this TOML file (keys: the long options with _ for -); "
            "options given on the command line win over the file",
        )

    def add(
        self,
        flag: str,
        kind: Kind,
        *,
        help: str,
        default: object = None,
        required: bool = False,
        type: Callable[[str], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add ``flag`` to the parser, and its key (``flag`` without ``--``, ``_`` for ``-``).

        Args:
            flag: the long option, e.g. ``--admin-port``.
            kind: the TOML type a file gives; ``PATHS`` makes the flag repeatable.
            help: the help text; the default or "required" is appended.
            default: used when neither the command line nor the file gives a value; a
                string goes through ``type`` as argparse does with string defaults.
            required: no default: the value must come from one or the other.
            type: the argparse converter (and validator), used for file values too.
            kwargs: passed to ``add_argument`` (``metavar``, ``choices``).
        """
        if kind is Kind.PATH and type is None:
            type = Path
        if kind is Kind.PATHS:
            kwargs["action"] = "append"
            type = type or Path
        note = "required, here or in --config" if required else f"default: {_show(default)}"
        if type is not None:
            kwargs["type"] = type
        action = self.parser.add_argument(
            flag, default=argparse.SUPPRESS, help=f"{help} ({note})", **kwargs
        )
        if isinstance(default, str) and type is not None:
            default = type(default)
        self._options[action.dest] = _Option(action, kind, default, required)

    def add_table(self, key: str, convert: Callable[[object, str], object]) -> None:
        """Allow the table ``key`` in the file (no flag): ``convert(value, file)`` checks
        and converts it (raising :class:`ConfigError`); absent, the key resolves to
        ``None``."""
        self._tables[key] = convert

    def flag(self, key: str) -> str:
        """The long option of ``key``."""
        return str(self._options[key].action.option_strings[-1])

    def resolve(self, args: argparse.Namespace) -> argparse.Namespace:
        """Merge the flags given, the ``--config`` file and the defaults (in that order).

        Returns:
            A namespace with every key set, plus ``origins``: key -> :class:`Origin`.

        Raises:
            ConfigError: a bad file, or a required value given by neither.
        """
        config: Path | None = getattr(args, "config", None)
        from_file = load_config(config, self) if config is not None else {}
        merged = argparse.Namespace(**vars(args))
        origins: dict[str, Origin] = {}
        for key, option in self._options.items():
            if key in vars(args):
                origins[key] = Origin.FLAG
            elif key in from_file:
                setattr(merged, key, from_file[key])
                origins[key] = Origin.FILE
            elif option.required:
                where = f"set {key} in {config}" if config else f"set {key} in a --config file"
                raise ConfigError(f"missing: give {self.flag(key)}, or {where}", key=key)
            else:
                setattr(merged, key, option.default)
                origins[key] = Origin.DEFAULT
        for key in self._tables:
            setattr(merged, key, from_file.get(key))
            origins[key] = Origin.FILE if key in from_file else Origin.DEFAULT
        merged.origins = origins
        return merged

    @staticmethod
    def summary(resolved: argparse.Namespace, show: Callable[[object], object] = str) -> list[str]:
        """What ``check-config`` prints of a :meth:`resolve` result: each value and where
        it came from, shown by ``show`` (a daemon knows how its values read best)."""
        lines = [f"configuration OK: {resolved.config}"]
        for key, origin in resolved.origins.items():
            lines.append(f"  {key} = {show(getattr(resolved, key))}  ({origin.value})")
        return lines

    def convert(self, key: str, value: object, path: Path, base: Path) -> object:
        """Check one file value's type and convert it as its flag would be.

        Raises:
            ConfigError: an unknown key, a wrong type or a value the flag would refuse.
        """
        where = str(path)
        if key in self._tables:
            return self._tables[key](value, where)
        option = self._options.get(key)
        if option is None:
            allowed = ", ".join([*self._options, *self._tables])
            raise ConfigError(f"unknown key; allowed: {allowed}", path=where, key=key)
        kind = option.kind
        texts: list[str]
        if kind is Kind.INTEGER:
            if not isinstance(value, int) or isinstance(value, bool):
                raise _wrong_type(kind, value, where, key)
            texts = [str(value)]
        elif kind is Kind.PATHS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise _wrong_type(kind, value, where, key)
            if not value:
                raise ConfigError("must name at least one path", path=where, key=key)
            texts = value
        elif not isinstance(value, str):
            raise _wrong_type(kind, value, where, key)
        else:
            texts = [value]
        if kind in (Kind.PATH, Kind.PATHS):
            if any(not text for text in texts):
                raise ConfigError("a path must not be empty", path=where, key=key)
            if any("\0" in text for text in texts):  # argv cannot hold one; TOML can
                raise ConfigError("a path must not contain NUL", path=where, key=key)
            texts = [str(base / text) for text in texts]
        converted = [_apply(option.action, text, where, key) for text in texts]
        return converted if kind is Kind.PATHS else converted[0]


def _apply(action: argparse.Action, text: str, where: str, key: str) -> object:
    """The flag's own conversion and choices, with argparse's errors as ConfigError."""
    convert = action.type
    try:
        value = text if convert is None else convert(text)  # type: ignore[operator]
    except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
        raise ConfigError(str(exc) or "invalid value", path=where, key=key) from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"must be one of: {choices}; got {text!r}", path=where, key=key)
    return value


def _wrong_type(kind: Kind, value: object, where: str, key: str) -> ConfigError:
    return ConfigError(f"must be {kind.value}, not {_toml_type(value)}", path=where, key=key)


_TOML_TYPES: Final[Mapping[type, str]] = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def _toml_type(value: object) -> str:
    return _TOML_TYPES.get(type(value), "a date or time")


def _show(default: object) -> str:
    return "none" if default is None else str(default)
