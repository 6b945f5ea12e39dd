"""TOML text to a document, with every way it can fail as a :class:`ConfigError`.

The policy files (:mod:`drm_wire.attestation.policy`) and the daemons' config files
(:mod:`drm_daemon.config_file`) are both TOML written by someone we do not trust to be
careful: ``tomllib`` raises more than ``TOMLDecodeError`` on hostile text (deep nesting
exhausts the recursion limit; an integer past Python's digit cap fails in ``int()``), so
this is the one place that maps all of it.
"""

from __future__ import annotations

import sys
import tomllib
from typing import Any

from drm_wire.errors import ConfigError

__all__ = ["parse_toml_text"]


def parse_toml_text(text: str, path: str | None) -> dict[str, Any]:
    """Parse ``text``; ``path`` names the file in errors.

    Raises:
        ConfigError: not TOML (a key given twice included), nested too deeply to parse, or
            an integer too long to convert.
    """
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from None
    except RecursionError:
        raise ConfigError("not valid TOML: nested too deeply", path=path) from None
    except ValueError:  # int(): Python's cap on decimal digits (4300 by default)
        raise ConfigError(
            f"not valid TOML: an integer has more than {sys.get_int_max_str_digits()} digits",
            path=path,
        ) from None
