"""What operators' logs hold after a whole lending session: structure, and no secrets.

One session with the three programs as real processes on loopback, lending the canary
model (:func:`drm_lab.models.canary_model`: the tiny model plus 32 random bytes drawn for
this test process). The model-level tests (``tests/enclave/test_model_host.py``,
``test_model_files.py``) check that loading and running it in-process leaves no trace in
ORT's output or on disk (M05, M06); this test extends that to the daemons' own logs
across the protocol, and adds the other secrets. The session: two inferences by the
consumer's command line with a recognisable input, a third that parks until the
operator supplies more over the admin API, the admin token rotated by hand (the
custodian stopped, ``admin.token`` replaced, the custodian started again) and calls with
the old and with a made-up token, block and unblock, an enclave the custodian refuses
(another simulated platform), a consumer that refuses the enclave (a policy for another
build), and ``drm-enclave-ready`` (the Gramine unit's readiness check) against the live
enclave. Then every line every process wrote is
checked:

* each line a daemon wrote (stderr and stdout, not a terminal) is one JSON object with a
  snake_case ``event``, a known ``level`` and an ISO 8601 UTC ``timestamp``, and every
  event name is a string literal in ``src/`` (a fixed vocabulary, nothing built at run
  time);
* no line of any process holds the canary (hex, base64, or a bytes repr), an admin token
  (the current one, the one rotated out, the wrong one presented), a PEM private-key
  marker, the key material of the state directory's keys (private scalar in hex or
  base64, any line of the PEM body), the license secret, or the consumer's input (its
  bytes in hex or base64, its values as printed decimals).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

import tests.e2e.conftest as e2e
from drm_lab import models
from drm_lab.admin import AdminApi
from drm_lab.processes import (
    LOOPBACK,
    STARTUP_TIMEOUT,
    CommandResult,
    Daemon,
    python_command,
    run_command,
    start_daemon,
)
from tests.e2e.conftest import Deployment

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT: Final = Path(__file__).resolve().parents[2]
READY_SCRIPT: Final = ROOT / "deploy" / "systemd" / "drm-enclave-ready"
EVENT_NAME: Final = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
LEVELS: Final = frozenset({"debug", "info", "warning", "error", "critical"})
#: A consumer input whose bytes and printed values cannot occur by chance.
SECRET_INPUT: Final = np.array([[31337.25, -27182.8125, 16180.33984375, 14142.13671875]], "f4")
WRONG_TOKEN: Final = "wrong-token-3f9c1d7e5a2b4c6d8e0f1a3b5c7d9e1f"


@pytest.fixture
def canary_deployment(tmp_path: Path) -> Iterator[Deployment]:
    """The e2e deployment, lending the canary model instead of the tiny one, and logging
    at debug level: per-request events must be as clean as the rest."""
    missing = e2e.daemons_missing()
    if missing is not None:
        pytest.skip(missing)
    daemons: list[Daemon] = []
    try:
        yield e2e.deploy(tmp_path, daemons, model_bytes=models.canary_model(), log_level="debug")
    finally:
        for daemon in reversed(daemons):
            daemon.stop()


# --- what must never appear -----------------------------------------------------------


def _encodings(secret: bytes) -> list[str]:
    """``secret`` as hex and as base64 at each of the three alignments in a longer stream."""
    forms = [secret.hex(), secret.hex().upper(), repr(secret)[2:-1]]
    for shift in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * shift + secret).decode()
            # Drop the characters that mix in the neighbours' bits and the padding.
            start = (shift * 4 + 2) // 3
            forms.append(text[start : start + (len(secret) * 4) // 3 - 2])
    return [f for f in forms if len(f) >= 16]


def _key_material(path: Path) -> list[str]:
    pem = path.read_bytes()
    key = load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    scalar = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
    body = [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]
    return _encodings(scalar) + body


def forbidden(deployment: Deployment) -> dict[str, list[str]]:
    """What no log line may contain, by what it is."""
    state = deployment.state_dir
    license_doc = json.loads(deployment.lab.license_path.read_text(encoding="utf-8"))
    token = (state / "admin.token").read_text(encoding="ascii").strip()
    values = [np.format_float_positional(v) for v in SECRET_INPUT.ravel()]
    return {
        "model canary": _encodings(models.CANARY),
        "admin token": [token, *ROTATED_OUT, WRONG_TOKEN],
        "private key marker": ["PRIVATE KEY"],
        "CA key": _key_material(state / "ca.key"),
        "server key": _key_material(state / "server.key"),
        "license secret": [license_doc["secret"]],
        "consumer input": [*_encodings(SECRET_INPUT.tobytes()), *values],
    }


def leaks(lines: list[str], secrets: dict[str, list[str]]) -> list[str]:
    return [
        f"{what}: {line[:300]}"
        for line in lines
        for what, forms in secrets.items()
        if any(form in line for form in forms)
    ]


def assert_scan_finds_planted_secrets(secrets: dict[str, list[str]]) -> None:
    """The scan is not vacuous: one planted form of each kind of secret is found."""
    planted = [
        json.dumps({"event": "x", "blob": base64.b64encode(b"ab" + models.CANARY).decode()}),
        f"token {secrets['admin token'][0]}",
        "-----BEGIN EC PRIVATE KEY-----",
        f"k={secrets['CA key'][0]}",
        f"k={secrets['server key'][-1]}",
        f"secret={secrets['license secret'][0]}",
        f"x={SECRET_INPUT.tobytes().hex()}",
        f"x=[{SECRET_INPUT[0, 0]}]",
    ]
    found = [f.split(":")[0] for f in leaks(planted, secrets)]
    assert found == [
        "model canary", "admin token", "private key marker", "CA key", "server key",
        "license secret", "consumer input", "consumer input",
    ]  # fmt: skip


# --- the log format -------------------------------------------------------------------


def malformed(daemon: Daemon) -> list[str]:
    """Every line of ``daemon``'s output that is not a well-formed JSON log event."""
    bad = []
    for entry in [*daemon.events, *map(_parse_stdout, daemon.stdout_lines)]:
        if "_raw" in entry:
            bad.append(f"not JSON: {entry['_raw'][:300]}")
            continue
        event, level, stamp = entry.get("event"), entry.get("level"), entry.get("timestamp")
        if not isinstance(event, str) or not EVENT_NAME.fullmatch(event):
            bad.append(f"event is not a snake_case name: {entry}")
        if level not in LEVELS:
            bad.append(f"level {level!r}: {entry}")
        if not isinstance(stamp, str) or dt.datetime.fromisoformat(stamp).utcoffset() is None:
            bad.append(f"timestamp {stamp!r} is not ISO 8601 with a zone: {entry}")
    return bad


def _parse_stdout(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {"_raw": line}
    return value if isinstance(value, dict) else {"_raw": line}


def all_lines(daemons: list[Daemon], commands: list[CommandResult]) -> list[str]:
    lines = []
    for daemon in daemons:
        lines += [e.get("_raw") or json.dumps(e) for e in daemon.events]
        lines += daemon.stdout_lines
    for result in commands:
        lines += result.stdout.splitlines() + result.stderr.splitlines()
    return lines


# --- the session ----------------------------------------------------------------------


def consumer_query(deployment: Deployment, *extra: str, policy: Path | None = None) -> list[str]:
    """``drm_consumer query`` of the secret input, as a consumer's script runs it."""
    return python_command(
        "drm_consumer", "query",
        "--address", deployment.consumer_host, "--port", str(deployment.consumer_port),
        "--policy", policy or deployment.policy_path,
        "--input", deployment.workdir / "input.npy", "--json", *extra,
    )  # fmt: skip


#: Tokens this process rotated out of a state directory (they must not be logged either).
ROTATED_OUT: list[str] = []


def rotate_admin_token(state_dir: Path) -> None:
    """The manual rotation: a new 32-byte token, written 0600 beside the old, renamed over it."""
    path = state_dir / "admin.token"
    ROTATED_OUT.append(path.read_text(encoding="ascii").strip())
    fresh = state_dir / "admin.token.new"
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    os.replace(fresh, path)


def refused_enclave(deployment: Deployment) -> Daemon:
    """An enclave on another simulated platform, which the custodian's policy refuses."""
    argv = list(deployment.enclave.argv)
    argv[argv.index("--simulation-dir") + 1] = str(deployment.workdir / "other-platform")
    argv[argv.index("--listen") + 1] = f"{LOOPBACK}:0"
    return start_daemon("refused-enclave", argv, cwd=deployment.workdir)


def test_a_lending_session_leaves_clean_logs(canary_deployment: Deployment) -> None:
    d = canary_deployment
    np.save(d.workdir / "input.npy", SECRET_INPUT)
    commands: list[CommandResult] = []
    for _ in range(e2e.INITIAL_INFERENCES):
        commands.append(run_command(consumer_query(d), cwd=d.workdir))
    left = [json.loads(c.stdout)["inferences_left"] for c in commands]
    assert left == list(reversed(range(e2e.INITIAL_INFERENCES)))

    # A third request parks until the operator supplies more.
    parked = start_daemon("consumer", consumer_query(d, "--wait", "60"), cwd=d.workdir)
    d.started.append(parked)
    parked.wait_for_line("No inferences left: waiting")
    supplied = d.admin.supply(2)
    assert supplied["supplied"] >= e2e.INITIAL_INFERENCES + 2
    assert parked.wait_exit(STARTUP_TIMEOUT) == 0, parked.log_text()

    # Rotate the admin token the only way the code allows (docs/production.md): stop the
    # custodian, replace admin.token (0600), start it again. The enclave fails closed
    # while it is gone and relinks; the old token is refused, and so is a made-up one.
    old_token, first_custodian = d.admin.token, d.custodian
    link_events = len(d.enclave.events)
    assert first_custodian.stop() == 0, first_custodian.log_text()
    d.enclave.wait_for("custodian_link_down", after=link_events)
    rotate_admin_token(d.state_dir)
    d.restart_custodian()
    d.enclave.wait_for("custodian_link_up", after=link_events)
    assert d.admin.token != old_token
    for token in (old_token, WRONG_TOKEN):
        stale = AdminApi(d.admin.host, d.admin.port, token, d.admin.ca_path)
        status, answer = stale.call("POST", "/supply_inferences", {"number_inferences": "5"})
        assert (status, answer.get("error")) == (401, "unauthorized")
    d.custodian.wait_for("admin_auth_failed", reason="mismatch")
    assert d.admin.usage()["supplied"] == supplied["supplied"]

    d.admin.block("log hygiene")
    d.enclave.wait_for("custodian_blocked")
    d.admin.unblock()
    d.enclave.wait_for("custodian_unblocked")

    # Attestation refused both ways: by the custodian, and by a consumer.
    refused = refused_enclave(d)
    d.started.append(refused)
    d.custodian.wait_for("enclave_refused")
    refused.stop()
    other_policy = ROOT / "tests" / "data" / "policy" / "gramine-debug.toml"
    refusal = subprocess.run(
        consumer_query(d, policy=other_policy),
        cwd=d.workdir, capture_output=True, text=True, timeout=STARTUP_TIMEOUT, check=False,
    )  # fmt: skip
    assert refusal.returncode == 3, refusal.stderr
    commands.append(CommandResult(refusal.args, 3, refusal.stdout, refusal.stderr))

    # The Gramine unit's readiness check, against the live enclave.
    config = d.workdir / "enclave.toml"
    config.write_text(f'listen = "{d.consumer_host}:{d.consumer_port}"\n', encoding="utf-8")
    ready = run_command(
        [sys.executable, str(READY_SCRIPT), "--config", str(config),
         "--policy", str(d.policy_path), "--site-packages", "", "--timeout", "30"],
        cwd=d.workdir,
    )  # fmt: skip
    assert ready.stdout == f"drm-enclave-ready: the enclave at {d.consumer_host}:" + (
        f"{d.consumer_port} is serving\n"
    )
    commands.append(ready)

    usage = d.admin.usage()
    assert usage["served"] == e2e.INITIAL_INFERENCES + 1
    for daemon in (d.enclave, d.custodian):
        assert daemon.stop() == 0, daemon.log_text()

    daemons = [first_custodian, d.custodian, d.enclave, refused]
    problems = [f"{daemon.name}: {bad}" for daemon in daemons for bad in malformed(daemon)]
    assert problems == []
    names = {e["event"] for daemon in daemons for e in daemon.events}
    # A stable vocabulary: each name is a literal in the source, never built at run time.
    source = "\n".join(
        p.read_text(encoding="utf-8")
        for p in (ROOT / "src").rglob("*.py")
        if "drm_lab" not in p.parts  # the lab waits for these names; the programs log them
    )
    assert sorted(n for n in names if f'"{n}"' not in source) == []
    assert {
        "custodian_listening", "enclave_serving", "custodian_link_up", "admin_supply",
        "admin_auth_failed", "custodian_blocked", "custodian_unblocked",
        "enclave_refused",
        # debug level (--log-level debug): per-request and per-report events
        "inference_served", "usage_reported", "parked_request_resumed", "admin_request",
    } <= names  # fmt: skip
    secrets = forbidden(d)
    assert_scan_finds_planted_secrets(secrets)
    parked_lines = [e.get("_raw") or json.dumps(e) for e in parked.events] + parked.stdout_lines
    found = leaks(all_lines(daemons, commands) + parked_lines, secrets)
    assert found == []
