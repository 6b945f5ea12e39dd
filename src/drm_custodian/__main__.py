"""``python -m drm_custodian``: configure logging once, then run the command line."""

from __future__ import annotations

from drm_custodian.cli import main
from drm_daemon.command import exit_with
from drm_daemon.logs import configure_logging


def run() -> None:
    configure_logging()
    exit_with(main)  # quietly, with status 141, when piped to a reader that left (| head)


if __name__ == "__main__":
    run()
