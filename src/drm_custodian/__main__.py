"""``python -m drm_custodian``: configure logging once, then run the command line."""

from __future__ import annotations

import sys

from drm_custodian.cli import main
from drm_daemon.logs import configure_logging


def run() -> None:
    configure_logging()
    sys.exit(main())


if __name__ == "__main__":
    run()
