"""``python -m drm_enclave``: see :mod:`drm_enclave.cli`."""

from __future__ import annotations

import sys

from drm_daemon.logs import configure_logging

from .cli import main

if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
