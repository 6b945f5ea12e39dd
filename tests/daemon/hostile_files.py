"""Configuration files every daemon must refuse as a usage error, with the message to give.

Each file is refused before any of its keys is looked at (it is not UTF-8, too large,
or not TOML), so one table serves every daemon's ``serve`` and ``check-config``; the key
used, ``log_level``, is one they all take anyway. ``tests/daemon/test_config_file.py``
pins each rule in detail; each daemon's ``test_config_file.py`` runs this table through
its own command line.
"""

from __future__ import annotations

import pytest

from drm_daemon.config_file import MAX_CONFIG_BYTES

#: ``(content, message)``; the daemon adds `` (in FILE)`` to the message.
HOSTILE_FILES = [
    pytest.param(
        b'log_level = "caf\xe9"\n', "the config file is not UTF-8 text (byte 16)", id="not-utf8"
    ),
    pytest.param(
        b"#" * (MAX_CONFIG_BYTES + 1),
        f"the config file is larger than {MAX_CONFIG_BYTES} bytes",
        id="huge",
    ),
    pytest.param(
        b'log_level = "info"\nlog_level = "debug"\n',
        "not valid TOML: Cannot overwrite a value (at line 2, column 20)",
        id="key-twice",
    ),
    pytest.param(
        b"log_level = " + b"[" * 20_000 + b"]" * 20_000,
        "not valid TOML: nested too deeply",
        id="deep-arrays",
    ),
    pytest.param(
        b"log_level = " + b"{a = " * 5_000 + b"1" + b"}" * 5_000,
        "not valid TOML: nested too deeply",
        id="deep-tables",
    ),
    pytest.param(
        b"log_level = " + b"9" * 4_301,
        "not valid TOML: an integer has more than 4300 digits",
        id="long-integer",
    ),
    pytest.param(
        b"log_level = " + b"[" * 1_000 + b"]" * 1_000,
        "not valid TOML: nested too deeply",
        id="nested-1000",
    ),
]
