"""drm_daemon.sd_notify: the environment as sd_notify(3) reads it, the datagrams, the pings."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import trio
import trio.testing

from drm_daemon.sd_notify import MAX_STATUS_CHARS, Notifier


@pytest.fixture
def abstract() -> Iterator[tuple[str, socket.socket]]:
    """A listening datagram socket in the abstract namespace, as ``@name``."""
    name = f"@drm-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name[1:])
        sock.settimeout(5)
        yield name, sock


def test_outside_systemd_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("x")  # nothing to send to, nothing raised
    notifier.stopping()


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "500000"}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4242"}, 0.5),  # our pid below
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "4243"}, None),  # another process's
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_from_the_environment(
    env: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@x", **env}, pid=4242)
    assert notifier.watchdog_interval == interval


def test_no_watchdog_without_a_socket() -> None:
    assert Notifier.from_environment({"WATCHDOG_USEC": "500000"}).watchdog_interval is None


def test_watchdog_pid_defaults_to_this_process() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environment(env).watchdog_interval == 1.0


def test_unsupported_addresses_are_ignored() -> None:
    with structlog.testing.capture_logs() as logs:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert logs[0]["event"] == "sd_notify_unsupported_address"


def test_messages_to_an_abstract_socket(abstract: tuple[str, socket.socket]) -> None:
    name, sock = abstract
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": name})
    notifier.status("dialing custodian 127.0.0.1:7000")
    notifier.ready("serving\n1 model(s)\ton 127.0.0.1:9924")  # one line, whatever it holds
    notifier.stopping()
    notifier.notify("WATCHDOG=1")
    assert [sock.recv(4096) for _ in range(4)] == [
        b"STATUS=dialing custodian 127.0.0.1:7000",
        b"READY=1\nSTATUS=serving 1 model(s) on 127.0.0.1:9924",
        b"STOPPING=1",
        b"WATCHDOG=1",
    ]
    notifier.status("x" * 1000)
    assert sock.recv(4096) == b"STATUS=" + b"x" * MAX_STATUS_CHARS


def test_messages_to_a_socket_path() -> None:
    with tempfile.TemporaryDirectory(prefix="sd") as directory:  # short: sun_path is small
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5)
            Notifier(path).ready()
            assert sock.recv(4096) == b"READY=1"


def test_a_missing_or_full_socket_never_raises_and_logs_once() -> None:
    notifier = Notifier(f"@drm-test-nobody-{secrets.token_hex(8)}")
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            notifier.notify("WATCHDOG=1")
    assert [e["event"] for e in logs] == ["sd_notify_failed"]
    assert logs[0]["message"] == "WATCHDOG=1"


async def test_watchdog_returns_at_once_without_an_interval() -> None:
    with trio.fail_after(1):
        await Notifier("@x").watchdog()


async def test_watchdog_pings_every_half_interval_from_the_loop(
    abstract: tuple[str, socket.socket], autojump_clock: trio.testing.MockClock
) -> None:
    name, sock = abstract
    sock.setblocking(False)
    notifier = Notifier(name, watchdog_interval=2.0)
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.watchdog)
        start = trio.current_time()
        while len(times) < 4:
            await trio.lowlevel.wait_readable(sock)
            assert sock.recv(4096) == b"WATCHDOG=1"
            times.append(trio.current_time() - start)
        nursery.cancel_scope.cancel()
    assert times == [0.0, 1.0, 2.0, 3.0]
