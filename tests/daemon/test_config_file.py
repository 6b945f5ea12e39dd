"""drm_daemon.config_file: precedence, path resolution, and every way a file is refused.

A toy command stands in for the daemons: its converters and choices are argparse's, as
the daemons' are, so these tests pin the shared behaviour once; the daemons' own test
files check their keys.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from drm_daemon.config_file import MAX_CONFIG_BYTES, ConfigSchema, Kind, Origin, read_toml
from drm_wire.errors import ConfigError

UNKNOWN = "unknown key; allowed: data_dir, model, host, port, mode"
PATHS = "must be an array of paths (strings)"


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 0-65535")
    return value


def _parser() -> tuple[argparse.ArgumentParser, ConfigSchema]:
    parser = argparse.ArgumentParser(prog="toy")
    schema = ConfigSchema(parser)
    schema.add("--data-dir", Kind.PATH, required=True, help="where")
    schema.add("--model", Kind.PATHS, default=[], help="models")
    schema.add("--host", Kind.STRING, default="127.0.0.1", help="address")
    schema.add("--port", Kind.INTEGER, type=_port, default=7000, help="port")
    schema.add("--mode", Kind.STRING, choices=("fast", "safe"), default="safe", help="mode")
    return parser, schema


def _resolve(*argv: str) -> argparse.Namespace:
    parser, schema = _parser()
    return schema.resolve(parser.parse_args(list(argv)))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path, *argv: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _resolve("--config", str(path), *argv)
    return str(caught.value)


def test_flag_beats_file_beats_default(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", 'data_dir = "data"\nport = 7100\nmode = "fast"\n')
    args = _resolve("--config", str(config), "--port", "7200")
    assert args.port == 7200  # flag over file
    assert args.mode == "fast"  # file over default
    assert args.host == "127.0.0.1"  # default
    assert args.data_dir == tmp_path / "data"
    assert args.origins == {
        "data_dir": Origin.FILE,
        "model": Origin.DEFAULT,
        "host": Origin.DEFAULT,
        "port": Origin.FLAG,
        "mode": Origin.FILE,
    }


def test_without_a_file_flags_and_defaults(tmp_path: Path) -> None:
    args = _resolve("--data-dir", "rel", "--model", "a.onnx", "--model", "b.onnx")
    assert args.data_dir == Path("rel")  # a flag's relative path: the working directory's
    assert args.model == [Path("a.onnx"), Path("b.onnx")]
    assert args.port == 7000
    assert args.config is None


def test_relative_paths_resolve_against_the_file_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    _write(
        tmp_path / "etc" / "c.toml",
        'data_dir = "/srv/data"\nmodel = ["m/a.onnx", "/opt/b.onnx", "../c.onnx"]\n',
    )
    cwd = Path.cwd()
    os.chdir(tmp_path)  # a relative --config path, from another working directory
    try:
        args = _resolve("--config", "etc/c.toml")
    finally:
        os.chdir(cwd)
    assert args.data_dir == Path("/srv/data")
    assert args.model == [
        tmp_path / "etc" / "m" / "a.onnx",
        Path("/opt/b.onnx"),
        tmp_path / "etc" / ".." / "c.onnx",
    ]


def test_a_repeated_flag_replaces_the_file_list(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", 'data_dir = "d"\nmodel = ["a.onnx", "b.onnx"]\n')
    args = _resolve("--config", str(config), "--model", "x.onnx")
    assert args.model == [Path("x.onnx")]


def test_an_empty_file_is_all_defaults(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", "# nothing here\n")
    args = _resolve("--config", str(config), "--data-dir", "d")
    assert (args.port, args.mode, args.model) == (7000, "safe", [])


def test_missing_required_says_where_to_give_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _resolve()
    assert str(caught.value) == (
        "missing: give --data-dir, or set data_dir in a --config file (at 'data_dir')"
    )
    config = _write(tmp_path / "c.toml", "port = 1\n")
    assert _error(config) == (
        f"missing: give --data-dir, or set data_dir in {config} (at 'data_dir')"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1", f"{UNKNOWN} (in {{f}} at 'bogus')"),
        ("config = 'x.toml'", f"{UNKNOWN} (in {{f}} at 'config')"),
        ("data-dir = 'x'", f"{UNKNOWN} (in {{f}} at 'data-dir')"),
        ("[server]\nport = 1", f"{UNKNOWN} (in {{f}} at 'server')"),
        ("port = '7000'", "must be an integer, not a string (in {f} at 'port')"),
        ("port = true", "must be an integer, not a boolean (in {f} at 'port')"),
        ("port = 7000.0", "must be an integer, not a float (in {f} at 'port')"),
        ("port = 1979-05-27", "must be an integer, not a date or time (in {f} at 'port')"),
        ("port = [7000]", "must be an integer, not an array (in {f} at 'port')"),
        ("port = 70000", "must be 0-65535 (in {f} at 'port')"),
        ("port = -1", "must be 0-65535 (in {f} at 'port')"),
        ("host = 1", "must be a string, not an integer (in {f} at 'host')"),
        ("host = {a = 1}", "must be a string, not a table (in {f} at 'host')"),
        ("mode = 'quick'", "must be one of: fast, safe; got 'quick' (in {f} at 'mode')"),
        ("data_dir = 5", "must be a path (a string), not an integer (in {f} at 'data_dir')"),
        ("data_dir = ''", "a path must not be empty (in {f} at 'data_dir')"),
        ("model = 'a.onnx'", f"{PATHS}, not a string (in {{f}} at 'model')"),
        ("model = ['a.onnx', 1]", f"{PATHS}, not an array (in {{f}} at 'model')"),
        ("model = []", "must name at least one path (in {f} at 'model')"),
        ("model = ['']", "a path must not be empty (in {f} at 'model')"),
        ('data_dir = "a\\u0000b"', "a path must not contain NUL (in {f} at 'data_dir')"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key_the_file_and_what_is_allowed(
    tmp_path: Path, text: str, message: str
) -> None:
    required = "" if text.startswith("data_dir") else 'data_dir = "d"\n'
    config = _write(tmp_path / "c.toml", f"{required}{text}\n")
    assert _error(config) == message.format(f=config)


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", "port = 1\nport = 2\n")
    assert _error(config) == (
        f"not valid TOML: Cannot overwrite a value (at line 2, column 9) (in {config})"
    )


def test_not_toml(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", "port 7000\n")
    assert _error(config) == (
        f"not valid TOML: Expected '=' after a key in a key/value pair (at line 1, column 6) "
        f"(in {config})"
    )


def test_not_utf8(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b'host = "caf\xe9"\n')
    assert _error(config) == f"the config file is not UTF-8 text (byte 11) (in {config})"


def test_a_file_over_the_cap_is_refused_unparsed(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b"#" * MAX_CONFIG_BYTES + b"\n")
    assert (
        _error(config) == f"the config file is larger than {MAX_CONFIG_BYTES} bytes (in {config})"
    )
    config.write_bytes(b"#" * (MAX_CONFIG_BYTES - 1) + b"\n")  # at the cap: fine
    assert read_toml(config) == {}


@pytest.mark.parametrize(
    "value",
    ["[" * 30_000 + "]" * 30_000, "{a = " * 10_000 + "1" + "}" * 10_000],
    ids=["arrays", "inline-tables"],
)
def test_deep_nesting_is_an_error_not_a_crash(tmp_path: Path, value: str) -> None:
    config = _write(tmp_path / "c.toml", f"host = {value}\n")
    assert _error(config) == f"not valid TOML: nested too deeply (in {config})"


def test_deep_tables_are_unknown_keys(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", "[" + ".".join(["a"] * 2000) + "]\n")
    assert _error(config).startswith("unknown key; allowed: ")


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert (
        _error(missing) == f"cannot read the config file: No such file or directory (in {missing})"
    )
    assert _error(tmp_path) == f"the config file is not a regular file (in {tmp_path})"
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # nobody writes: opening it must not hang start-up
    assert _error(fifo) == f"the config file is not a regular file (in {fifo})"


def test_read_toml_takes_its_own_cap(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.toml", "a = 1\n")
    assert read_toml(config, max_bytes=6) == {"a": 1}
    with pytest.raises(ConfigError, match=r"larger than 5 bytes"):
        read_toml(config, max_bytes=5)


def test_help_shows_defaults_and_required(capsys: pytest.CaptureFixture[str]) -> None:
    parser, _ = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "where (required, here or in --config)" in text
    assert "port (default: 7000)" in text
    assert "options given on the command line win over the file" in text
