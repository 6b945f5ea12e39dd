"""The logging processors: secrets and bulk bytes never reach a log line."""

from __future__ import annotations

import io
import json

import structlog

from drm_daemon.logs import configure_logging, escape_control_characters, redact_secrets


def test_secret_keys_are_redacted_whatever_their_type() -> None:
    event = {"event": "x", "token": "abc", "private_key": b"k" * 48, "seq": 3, "data": None}
    out = redact_secrets(None, "info", dict(event))
    assert out["token"] == "<redacted>"
    assert out["private_key"] == "<redacted: 48 bytes>"
    assert out["seq"] == 3
    assert out["data"] is None


def test_bulk_binaries_are_redacted_and_digests_kept_as_hex() -> None:
    digest = bytes(range(32))
    out = redact_secrets(None, "info", {"sha256": digest, "blob": memoryview(b"m" * 65)})
    assert out["sha256"] == digest.hex()
    assert out["blob"] == "<redacted: 65 bytes>"


def test_control_characters_are_escaped() -> None:
    out = escape_control_characters(None, "info", {"model": 'a\n{"event": "forged"}\x1b[2J'})
    assert out["model"] == 'a\\x0a{"event": "forged"}\\x1b[2J'


def test_json_configuration_writes_one_redacted_line_per_event() -> None:
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    try:
        log = structlog.get_logger()
        log.info("grant_pushed", units=5, chunk=b"\x00" * 4096, reason="a\nb")
        log.debug("hidden")
    finally:
        structlog.reset_defaults()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "grant_pushed"
    assert record["units"] == 5
    assert record["chunk"] == "<redacted: 4096 bytes>"
    assert record["reason"] == "a\\x0ab"
    assert record["level"] == "info"


def test_a_logged_traceback_shows_no_frame_locals() -> None:
    """Locals are rendered after redact_secrets ran: a secret in a frame would print."""
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    try:
        log = structlog.get_logger()
        license_secret = "s3cret-license-value"
        try:
            raise ValueError("the failure's own message")
        except ValueError:
            log.exception("session_failed")
        del license_secret
    finally:
        structlog.reset_defaults()
    (line,) = stream.getvalue().splitlines()
    assert "s3cret" not in line
    record = json.loads(line)
    (trace,) = record["exception"]
    assert trace["exc_type"] == "ValueError"
    assert trace["frames"][-1]["name"] == "test_a_logged_traceback_shows_no_frame_locals"
    assert "locals" not in trace["frames"][-1]
