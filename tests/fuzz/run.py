"""Run the fuzz harnesses of :mod:`tests.fuzz.targets` with atheris, one process each.

Usage (from the repository root; ``nox -s fuzz -- ARGS`` installs atheris and runs this)::

    python -m tests.fuzz.run [INPUTS] [HARNESS ...]

``INPUTS`` (default 10,000) is how many inputs each harness runs; no harness names means
all of them. Each harness runs in a child process of its own (libFuzzer owns the process
it runs in), seeded from the harness's seeds and its reproducers in
``tests/fuzz/corpus/<harness>/``, instrumented over the project's packages, and it goes on
after a finding: a finding is any exception that escapes a harness, deduplicated by its
type and the line that raised it, and saved to ``.fuzz/<harness>/finding-*``. A libFuzzer
crash (a timeout, memory past ``-rss_limit_mb``) ends that harness; its artifact is
saved beside. What the fuzzer learns stays in ``.fuzz/<harness>/corpus`` for the next
run. At the end a table gives, per harness, the inputs run, the time and the findings;
the exit status is 1 if there was any.

Every finding, once fixed, goes into ``tests/fuzz/corpus/<harness>/`` as a regression
case: ``tests/fuzz/test_corpus.py`` replays them in the default test run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parents[2]
CORPUS: Final = Path(__file__).resolve().parent / "corpus"
OUT: Final = ROOT / ".fuzz"
#: The code atheris instruments for coverage: ours, and the pure-Python TOML parser.
PACKAGES: Final = ["drm_wire", "drm_daemon", "drm_custodian", "drm_enclave", "tomllib"]
#: libFuzzer's per-input timeout (seconds) and memory cap (MiB).
TIMEOUT: Final = 30
RSS_LIMIT_MB: Final = 2048
_RESULT: Final = "FUZZ-RESULT "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("what", nargs="*", metavar="[INPUTS] [HARNESS]",
                        help="inputs per harness (default 10000), then harness names")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    inputs = 10_000
    names = list(args.what)
    if names and names[0].isdigit():
        inputs = int(names.pop(0))
    if args.child:
        return _child(args.child, inputs)
    return _parent(names, inputs)


def _parent(names: list[str], inputs: int) -> int:
    from tests.fuzz.targets import HARNESSES  # without instrumentation: only the names

    unknown = sorted(set(names) - set(HARNESSES))
    if unknown:
        print(f"unknown harness {', '.join(unknown)}; known: {', '.join(HARNESSES)}")
        return 2
    results = []
    for name in names or list(HARNESSES):
        out = OUT / name
        out.mkdir(parents=True, exist_ok=True)
        print(f"fuzzing {name}: {inputs} inputs (log: {out / 'log.txt'})", flush=True)
        started = time.monotonic()
        with (out / "log.txt").open("w") as log:
            child = subprocess.run(
                [sys.executable, "-m", "tests.fuzz.run", "--child", name, str(inputs)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        result = _result(child.stdout) or {
            "harness": name,
            "inputs": None,
            "findings": [],
            "crash": f"exit status {child.returncode}; see {out / 'log.txt'}",
        }
        result["seconds"] = time.monotonic() - started
        results.append(result)
        _print_result(result)
    print()
    print(f"{'harness':<12} {'inputs':>10} {'seconds':>9} {'inputs/s':>9} {'findings':>9}")
    for result in results:
        ran = result["inputs"] or 0
        rate = ran / result["seconds"] if result["seconds"] else 0
        found = len(result["findings"]) + bool(result.get("crash"))
        seconds = result["seconds"]
        print(f"{result['harness']:<12} {ran:>10} {seconds:>9.1f} {rate:>9.0f} {found:>9}")
    failed = any(result["findings"] or result.get("crash") for result in results)
    return 1 if failed else 0


def _result(stdout: str) -> dict[str, Any] | None:
    for line in stdout.splitlines():
        if line.startswith(_RESULT):
            result: dict[str, Any] = json.loads(line[len(_RESULT) :])
            return result
    return None


def _print_result(result: dict[str, Any]) -> None:
    print(f"  {result['inputs'] or 0} inputs in {result['seconds']:.1f} s", flush=True)
    if result.get("crash"):
        print(f"  libFuzzer stopped: {result['crash']}")
    for finding in result["findings"]:
        print(f"  finding: {finding['signature']} ({finding['count']}x) -> {finding['path']}")


def _child(name: str, inputs: int) -> int:
    import atheris

    out = OUT / name
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    with atheris.instrument_imports(include=PACKAGES):
        from tests.fuzz.targets import HARNESSES

        harness = HARNESSES[name]
        seeds = list(harness.seeds())  # the lazy imports of some harnesses happen here
        regressions = sorted((CORPUS / name).glob("*")) if (CORPUS / name).is_dir() else []
        seeds += [path.read_bytes() for path in regressions]
        for seed in seeds:
            harness.run(seed)  # a seed that fails is a bug in the seeds: stop at once
    for seed in seeds:
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)
    findings: dict[str, dict[str, Any]] = {}
    count = 0

    def one_input(data: bytes) -> None:
        nonlocal count
        count += 1
        try:
            harness.run(data)
        except Exception as exc:  # every escape is a finding
            _record(findings, out, exc, data)
        if count >= inputs:
            line = {"harness": name, "inputs": count, "findings": list(findings.values())}
            sys.stdout.write(_RESULT + json.dumps(line) + "\n")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # libFuzzer has no way to stop after N inputs and say how many

    max_len = max(4096, 2 * max(len(seed) for seed in seeds))
    atheris.Setup(
        [
            sys.argv[0],
            str(corpus),
            f"-max_len={max_len}",
            f"-timeout={TIMEOUT}",
            f"-rss_limit_mb={RSS_LIMIT_MB}",
            f"-artifact_prefix={out}/",
        ],
        one_input,
    )
    atheris.Fuzz()
    return 0


def _record(findings: dict[str, dict[str, Any]], out: Path, exc: Exception, data: bytes) -> None:
    """Keep the first input of each kind of escape (its type and the line it came from)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    signature = f"{type(exc).__name__} at {where}"
    known = findings.get(signature)
    if known is not None:
        known["count"] += 1
        return
    path = out / f"finding-{hashlib.sha1(signature.encode()).hexdigest()[:12]}"
    path.write_bytes(data)
    findings[signature] = {"signature": signature, "count": 1, "path": str(path)}
    print(f"finding: {signature}", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
