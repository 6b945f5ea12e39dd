"""``python -m drm_consumer``: see :mod:`drm_consumer.cli`."""

from __future__ import annotations

import sys

from drm_daemon.command import exit_with
from drm_daemon.logs import configure_logging

from .cli import main

if __name__ == "__main__":
    # Results go to standard output; library log lines (warnings only) to standard error.
    configure_logging(level="warning", stream=sys.stderr)
    exit_with(main)  # quietly, with status 141, when piped to a reader that left (| head)
