"""``nox -s demo`` (``python demo/run.py``): the whole lending story on one machine, narrated.

The demo runs the real programs as separate processes in a temporary directory, printing
each command before it runs it (so the transcript teaches the commands) and the programs'
real output under it:

1. the model owner initialises the custodian and measures the enclave build (its policy);
2. an untrained COVID-Net-shaped model and a synthetic chest X-ray are generated;
3. the custodian starts with 3 inferences; the enclave starts in simulation mode, is
   attested by the custodian, and receives the model;
4. the consumer queries three times (2, 1, 0 left); the fourth query waits;
5. the operator supplies 5 inferences with ``curl`` on the admin API; the query completes;
6. the ledger shows 4 served; the custodian stops; the next query is refused because the
   custodian is unreachable.

After every command the demo checks that what happened is what the narration says; on the
first deviation it prints what was expected and what happened, stops every program it
started and exits 1. Every wait is bounded (``--timeout``). Ctrl-C stops everything too
(exit 130). The temporary directory is removed at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Final, NoReturn

from covidnet import DEFAULT_WEIGHTS_MB
from story import INTRO, STEPS, Demo

from drm_lab.processes import Deviation
from drm_lab.transcript import TAIL, Shell
from drm_wire.net.address import port_argument

EXIT_OK: Final = 0
EXIT_DEVIATION: Final = 1
EXIT_INTERRUPTED: Final = 130


_port = port_argument(zero=True)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.0 < value <= 3600.0:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600 seconds")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python demo/run.py",
        description="Run the model DRM story end to end on this machine, narrated. "
        "Exit status: 0 every step behaved as described, 1 one did not, 130 interrupted.",
    )
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory instead of removing it")  # fmt: skip
    parser.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                        help="the longest any one wait may take (default 60)")  # fmt: skip
    parser.add_argument("--weights-mb", type=float, default=DEFAULT_WEIGHTS_MB, metavar="MB",
                        help=f"the model's weights (default {DEFAULT_WEIGHTS_MB:g})")  # fmt: skip
    for name, what in (("custodian-port", "the custodian's enclave link"),
                       ("admin-port", "the custodian's admin API"),
                       ("consumer-port", "the enclave's consumer port")):  # fmt: skip
        parser.add_argument(f"--{name}", type=_port, default=0, metavar="PORT",
                            help=f"{what} (default 0: any free port)")  # fmt: skip
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; the exit status."""
    args = _parser().parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="drm-demo-"))
    shell = Shell(workdir, sys.stdout)
    demo = Demo(
        shell,
        args.timeout,
        args.weights_mb,
        (args.custodian_port, args.admin_port, args.consumer_port),
    )
    signal.signal(signal.SIGTERM, _interrupt)
    shell.say(INTRO)
    shell.say(f"Work directory (every command runs there): {workdir}")
    shell.say(f'"python" below is {sys.executable}')
    status = EXIT_OK
    try:
        demo.run()
    except Deviation as exc:
        shell.say()
        shell.say(f"DEMO FAILED in step {demo.step}/{STEPS}: {demo.title}")
        shell.say(f"  expected: {exc.expected}")
        shell.say(f"  happened: {exc.happened}")
        if exc.output:
            shell.say("  its last lines:")
            shell.show_output(exc.output[-TAIL:])
        status = EXIT_DEVIATION
    except KeyboardInterrupt:
        shell.say()
        shell.say("Interrupted: stopping every program the demo started.")
        status = EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip this
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shell.close()
    if status == EXIT_OK:
        shell.say()
        shell.say("Demo complete: every step behaved as described.")
    if args.keep:
        shell.say(f"The work directory is kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
        if status == EXIT_DEVIATION:
            shell.say("(run with --keep to keep the work directory for a closer look)")
    return status


if __name__ == "__main__":
    sys.exit(main())
