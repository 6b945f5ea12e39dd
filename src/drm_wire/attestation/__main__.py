"""Entry point: ``python -m drm_wire.attestation inspect FILE ...`` (see :mod:`.cli`)."""

from __future__ import annotations

import sys

import structlog

from drm_wire.attestation.cli import main

if __name__ == "__main__":
    # Logs (e.g. insecure_simulation_used) go to stderr so --json output stays parseable.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    sys.exit(main())
