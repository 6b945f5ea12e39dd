"""Argument types shared by the daemons' command lines and config files.

argparse turns a ``ValueError`` from a type function into ``invalid <function name>
value``, which names our code rather than the mistake; these raise
``ArgumentTypeError`` with the accepted range instead, and the config-file loader
(:mod:`drm_daemon.config_file`) reports the same words with the file and key.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["bounded_integer"]


def bounded_integer(low: int, high: int, unit: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high`` (``unit`` names it)."""
    suffix = f" ({unit})" if unit else ""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a whole number: it must be from {low} to {high}{suffix}"
            ) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}{suffix}, not {value}")
        return value

    return convert
