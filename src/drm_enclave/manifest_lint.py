"""Lint a rendered Gramine manifest of the enclave: refuse settings that void its attestation.

MRENCLAVE proves which manifest the enclave was built from, not that the manifest is safe.
A manifest that takes its arguments or environment from the host, lets the host replace
code or the pinned custodian CA (``sgx.allowed_files`` are neither hashed nor protected),
runs a debug enclave, or cannot produce DCAP quotes, is measured just as faithfully as a
good one. This lint runs before signing (``gramine/Makefile``) and in the tests, and
reports every problem it finds, each as a :class:`Finding` with a stable rule name::

    python -m drm_enclave.manifest_lint [--allow-debug] [--no-file-check] \
        [--enclave-config /etc/drm-enclave/enclave.toml] drm_enclave.manifest

The rules: ``debug`` (``sgx.debug`` only in a debug build), ``insecure`` (any
``insecure__`` key), ``remote_attestation`` (``"dcap"``), ``file_check_policy``
(``"strict"``), ``isv`` (product id and SVN in range), ``argv`` (fixed in
``loader.argv``: ``-m drm_enclave serve --attestation gramine --custodian-ca ...``),
``env`` (no host variables; ``ORT_DISABLE_TELEMETRY=1``, ``OMP_NUM_THREADS``),
``custodian_ca`` (the CA is mounted from a trusted file), ``inputs`` (every other file
``loader.argv`` names, ``--config`` and any ``--license`` or ``--pccs-ca``, can be read
inside: mounted from the host and a trusted or allowed file), ``allowed_files`` (no code,
no trusted file, no CA), ``files`` (``file:`` URIs) and ``trusted_files`` (they exist).

With ``--enclave-config FILE`` (the host's ``enclave.toml``, which the enclave reads at
``--config``), rule ``enclave_config`` checks the files it names the same way: the
license and the PCCS's CA (``pccs_ca``). Both are host data, not code: a host that swaps
the license gets a refusal from the custodian, and one that swaps the PCCS's CA can at most
keep the enclave from stapling, since no collateral is trusted before it verifies to the
pinned root (docs/production.md, *The enclave staples its own*). So they belong in the
allowed ``/etc/drm-enclave/``, as the config does, not in the measurement. A ``pccs_url``
without a ``pccs_ca`` is reported too: the enclave sees no system trust store (only what
the manifest mounts), so it could verify no PCCS.

Exit status: 0 clean, 1 findings, 2 unreadable or not TOML. It reads the rendered
manifest and the signed ``.manifest.sgx`` alike (trusted files as strings or as
``{uri, sha256}`` tables).
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from drm_daemon.config_file import MAX_CONFIG_BYTES, read_bounded
from drm_wire.errors import ConfigError

__all__ = [
    "MAX_MANIFEST_BYTES",
    "Finding",
    "argv_option",
    "host_path",
    "lint_enclave_config",
    "lint_file",
    "lint_manifest",
    "load_enclave_config",
    "load_manifest",
    "main",
    "readable",
    "trusted_entries",
]

#: A signed manifest lists one ``{uri, sha256}`` line per trusted file: the Python runtime,
#: the libraries and the packages are some tens of thousands of files, a few MB of TOML.
MAX_MANIFEST_BYTES: Final = 32 * 1024 * 1024
#: What the host may never hand the enclave unmeasured: Python sources and bytecode,
#: shared objects, and ``.pth`` files (which site.py executes).
_CODE_SUFFIXES: Final = (".py", ".pyc", ".pyo", ".so", ".pth")
_ARGV_COMMAND: Final = ("-m", "drm_enclave", "serve")
#: Files ``drm_enclave serve`` reads, by flag (``--custodian-ca`` has its own rule).
_INPUT_FLAGS: Final = ("--config", "--license", "--pccs-ca")
#: The config file's keys that name files the enclave reads (``custodian_ca`` is fixed
#: in ``loader.argv``, which wins over the file).
_CONFIG_FILE_KEYS: Final = ("license", "pccs_ca")
#: How many files of an allowed directory the lint looks at for code.
_MAX_ALLOWED_WALK: Final = 10_000


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem: ``rule`` is a stable name, ``message`` says what and where."""

    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


def load_manifest(path: Path) -> dict[str, Any]:
    """Read and parse a manifest, refusing anything larger than :data:`MAX_MANIFEST_BYTES`.

    Raises:
        ConfigError: unreadable, too large, not UTF-8 or not TOML.
    """
    raw = read_bounded(path, max_bytes=MAX_MANIFEST_BYTES, what="the manifest")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"manifest is not TOML: {exc}", path=str(path)) from exc


def load_enclave_config(path: Path) -> dict[str, Any]:
    """Read the host's ``enclave.toml`` (bounded as the enclave reads it).

    Raises:
        ConfigError: unreadable, too large, not UTF-8 or not TOML.
    """
    raw = read_bounded(path, max_bytes=MAX_CONFIG_BYTES, what="the enclave config")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"enclave config is not TOML: {exc}", path=str(path)) from exc


def lint_file(path: Path, *, allow_debug: bool = False, check_files: bool = True) -> list[Finding]:
    """:func:`lint_manifest` on a file; relative ``file:`` URIs resolve against the cwd.

    Raises:
        ConfigError: as :func:`load_manifest`.
    """
    return lint_manifest(
        load_manifest(path), allow_debug=allow_debug, check_files=check_files, root=Path.cwd()
    )


def lint_manifest(
    manifest: Mapping[str, Any],
    *,
    allow_debug: bool = False,
    check_files: bool = True,
    root: Path | None = None,
) -> list[Finding]:
    """Every insecure or inconsistent setting of a parsed manifest, in a stable order.

    Args:
        manifest: the parsed TOML.
        allow_debug: accept ``sgx.debug = true`` (the debug build only).
        check_files: look at the files here (the environment the manifest was rendered
            for): every trusted file must exist, directories be named with a final
            ``/``, and allowed directories hold no code.
        root: what relative ``file:`` URIs are relative to (Gramine: the cwd).
    """
    base = root or Path.cwd()
    findings = list(_insecure_keys(manifest))
    sgx, loader = _table(manifest, "sgx"), _table(manifest, "loader")
    debug = sgx.get("debug", False)
    if type(debug) is not bool:
        findings.append(Finding("debug", "sgx.debug must be true or false"))
    elif debug and not allow_debug:
        findings.append(Finding("debug", "sgx.debug = true in a release manifest"))
    attestation = sgx.get("remote_attestation")
    if attestation != "dcap":
        got = "missing" if attestation is None else f"got {attestation!r}"
        findings.append(
            Finding("remote_attestation", f'sgx.remote_attestation must be "dcap" ({got})')
        )
    policy = sgx.get("file_check_policy", "strict")
    if policy != "strict":
        findings.append(
            Finding("file_check_policy", f'sgx.file_check_policy must be "strict", not {policy!r}')
        )
    for key in ("isvprodid", "isvsvn"):
        value = sgx.get(key, 0)
        if type(value) is not int or not 0 <= value <= 0xFFFF:
            findings.append(Finding("isv", f"sgx.{key} must be an integer 0..65535"))
    findings += _argv_findings(loader)
    findings += _env_findings(loader)
    trusted, bad_trusted = _uris(sgx.get("trusted_files", []), "sgx.trusted_files")
    allowed, bad_allowed = _uris(sgx.get("allowed_files", []), "sgx.allowed_files")
    findings += bad_trusted + bad_allowed
    ca, ca_findings = _custodian_ca(manifest, loader, trusted, base)
    findings += ca_findings
    findings += _input_findings(manifest, loader)
    findings += _allowed_findings(allowed, trusted, ca, base, check_files=check_files)
    if check_files:
        findings += _missing_trusted(trusted, base)
    return findings


# --- the rules ---------------------------------------------------------------------------


def _insecure_keys(node: Any, prefix: str = "") -> Iterator[Finding]:
    """Every key named ``insecure__*``, at any depth (Gramine's marker for unsafe options)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if key.startswith("insecure__"):
                yield Finding("insecure", f"insecure option {path}")
            yield from _insecure_keys(value, f"{path}.")
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _insecure_keys(item, f"{prefix.removesuffix('.')}[{index}].")


def _argv_findings(loader: Mapping[str, Any]) -> list[Finding]:
    if "argv_src_file" in loader:
        return [Finding("argv", "loader.argv_src_file is set: arguments must be in loader.argv")]
    argv = loader.get("argv")
    if argv is None:
        return [Finding("argv", "loader.argv is missing: arguments must be fixed in the manifest")]
    if not isinstance(argv, list) or not all(isinstance(arg, str) for arg in argv):
        return [Finding("argv", "loader.argv must be a list of strings")]
    if tuple(argv[1:4]) != _ARGV_COMMAND:
        return [Finding("argv", 'loader.argv must run "-m drm_enclave serve"')]
    findings = []
    if argv_option(argv, "--attestation") != "gramine":
        findings.append(Finding("argv", "loader.argv must pass --attestation gramine"))
    if argv_option(argv, "--custodian-ca") is None:
        findings.append(Finding("argv", "loader.argv must pass --custodian-ca"))
    if argv_option(argv, "--simulation-dir") is not None:
        findings.append(Finding("argv", "loader.argv must not pass --simulation-dir"))
    return findings


def argv_option(argv: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``argv`` (argparse's rule)."""
    value = None
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def _env_findings(loader: Mapping[str, Any]) -> list[Finding]:
    findings = []
    if "env_src_file" in loader:
        findings.append(
            Finding("env", "loader.env_src_file is set: variables must be in loader.env")
        )
    env = loader.get("env", {})
    if not isinstance(env, Mapping):
        return [*findings, Finding("env", "loader.env must be a table")]
    values: dict[str, str] = {}
    for name, spec in env.items():
        if isinstance(spec, Mapping) and spec.get("passthrough"):
            findings.append(Finding("env", f"loader.env.{name} passes the host's value through"))
        value = spec.get("value") if isinstance(spec, Mapping) else spec
        if isinstance(value, str):
            values[name] = value
    if values.get("ORT_DISABLE_TELEMETRY") != "1":
        findings.append(Finding("env", 'loader.env.ORT_DISABLE_TELEMETRY must be "1"'))
    threads = values.get("OMP_NUM_THREADS", "")
    if not (threads.isascii() and threads.isdigit() and int(threads) > 0):
        findings.append(Finding("env", "loader.env.OMP_NUM_THREADS must be a positive integer"))
    return findings


def _custodian_ca(
    manifest: Mapping[str, Any], loader: Mapping[str, Any], trusted: list[str], base: Path
) -> tuple[str | None, list[Finding]]:
    """The CA's host ``file:`` URI, and a finding if it is not mounted or not trusted."""
    argv = loader.get("argv")
    if not isinstance(argv, list) or not all(isinstance(arg, str) for arg in argv):
        return None, []
    inside = argv_option(argv, "--custodian-ca")
    if inside is None:
        return None, []
    uri = host_path(manifest, inside)
    if uri is None:
        message = f"--custodian-ca {inside} is not under any fs.mounts path"
        return None, [Finding("custodian_ca", message)]
    if _resolve(uri, base) not in {_resolve(entry, base) for entry in trusted}:
        return uri, [Finding("custodian_ca", f"custodian CA {uri} is not a trusted file")]
    return uri, []


def _argv(loader: Mapping[str, Any]) -> list[str] | None:
    argv = loader.get("argv")
    if not isinstance(argv, list) or not all(isinstance(arg, str) for arg in argv):
        return None
    return argv


def _input_findings(manifest: Mapping[str, Any], loader: Mapping[str, Any]) -> list[Finding]:
    argv = _argv(loader)
    findings = []
    for flag in _INPUT_FLAGS:
        inside = None if argv is None else argv_option(argv, flag)
        if inside is not None and (why := readable(manifest, inside)) is not None:
            findings.append(Finding("inputs", f"{flag} {inside} {why}"))
    return findings


def readable(manifest: Mapping[str, Any], inside: str) -> str | None:
    """Why the enclave cannot read the in-enclave path ``inside`` (``None``: it can).

    Under ``sgx.file_check_policy = "strict"`` a host file opens only if a ``fs.mounts``
    entry maps it in and ``sgx.trusted_files`` or ``sgx.allowed_files`` lists it (or a
    directory above it). Relative paths are not resolved here (give absolute ones).
    """
    uri = host_path(manifest, inside)
    if uri is None:
        return "is not under any fs.mounts path"
    sgx = _table(manifest, "sgx")
    target = PurePosixPath(os.path.normpath(uri.removeprefix("file:")))
    for key in ("trusted_files", "allowed_files"):
        entries, _ = _uris(sgx.get(key, []), key)
        for entry in entries:
            listed = PurePosixPath(os.path.normpath(entry.removeprefix("file:")))
            if target == listed or (entry.endswith("/") and listed in target.parents):
                return None
    return f"(host {uri}) is neither a trusted nor an allowed file"


def lint_enclave_config(manifest: Mapping[str, Any], config: Mapping[str, Any]) -> list[Finding]:
    """Rule ``enclave_config``: the files the host's ``enclave.toml`` names (``license``,
    ``pccs_ca``) must be readable inside the enclave, and a ``pccs_url`` needs a
    ``pccs_ca`` (the module's docstring says why). Keys that ``loader.argv`` sets are
    skipped (the flag wins); relative paths resolve against the directory of
    ``--config``, as the enclave resolves them."""
    argv = _argv(_table(manifest, "loader")) or []
    config_path = argv_option(argv, "--config")
    directory = PurePosixPath(config_path).parent if config_path else PurePosixPath("/")
    findings = []
    for key in _CONFIG_FILE_KEYS:
        value = config.get(key)
        if value is None or argv_option(argv, "--" + key.replace("_", "-")) is not None:
            continue
        if not isinstance(value, str):
            findings.append(Finding("enclave_config", f"{key} must be a path"))
            continue
        inside = str(directory / value)
        if (why := readable(manifest, inside)) is not None:
            findings.append(
                Finding("enclave_config", f"{key} = {value!r}: {inside} {why} inside the "
                        "enclave (put it under the allowed /etc/drm-enclave/)")
            )  # fmt: skip
    has_ca = config.get("pccs_ca") is not None or argv_option(argv, "--pccs-ca") is not None
    has_url = config.get("pccs_url") is not None or argv_option(argv, "--pccs-url") is not None
    if has_url and not has_ca:
        findings.append(
            Finding("enclave_config", "pccs_url without pccs_ca: the enclave has no system "
                    "trust store, so it cannot verify the PCCS; give the PCCS's CA (Intel's "
                    "PCS: the CA that issued its certificate) as pccs_ca")
        )  # fmt: skip
    return findings


def _allowed_findings(
    allowed: list[str], trusted: list[str], ca: str | None, base: Path, *, check_files: bool
) -> list[Finding]:
    findings = []
    for uri in allowed:
        where = f"sgx.allowed_files entry {uri!r}"
        path = _resolve(uri, base)
        if path.name.endswith(_CODE_SUFFIXES) or ".so." in path.name:
            findings.append(Finding("allowed_files", f"{where} is code"))
        elif ca is not None and _overlaps(path, _resolve(ca, base)):
            findings.append(Finding("allowed_files", f"{where} covers the custodian CA {ca}"))
        elif clash := next((t for t in trusted if _overlaps(path, _resolve(t, base))), None):
            findings.append(Finding("allowed_files", f"{where} covers trusted {clash}"))
        elif check_files and (code := _code_inside(Path(path))) is not None:
            findings.append(Finding("allowed_files", f"{where} contains code ({code})"))
    return findings


def _code_inside(directory: Path) -> str | None:
    """The first code file under ``directory`` as it is here (bounded: a config directory
    is small; anything larger than the bound is reported as if it held code)."""
    if not directory.is_dir():
        return None
    seen = 0
    for parent, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            seen += 1
            if name.endswith(_CODE_SUFFIXES) or ".so." in name:
                return os.path.join(parent, name)
            if seen > _MAX_ALLOWED_WALK:
                return f"more than {_MAX_ALLOWED_WALK} files"
    return None


def _missing_trusted(trusted: list[str], base: Path) -> list[Finding]:
    findings = []
    for uri in trusted:
        path = Path(_resolve(uri, base))
        if uri.endswith("/"):
            if not path.is_dir():
                findings.append(Finding("trusted_files", f"trusted directory {uri} does not exist"))
        elif path.is_dir():
            findings.append(
                Finding("trusted_files", f'trusted {uri} is a directory: end its URI with "/"')
            )
        elif not path.is_file():
            findings.append(Finding("trusted_files", f"trusted file {uri} does not exist"))
    return findings


# --- helpers ------------------------------------------------------------------------------


def trusted_entries(manifest: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """``(uri, sha256 or None)`` of each well-formed ``sgx.trusted_files`` entry."""
    entries = _table(manifest, "sgx").get("trusted_files", [])
    result: list[tuple[str, str | None]] = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, str):
            result.append((entry, None))
        elif isinstance(entry, Mapping) and isinstance(entry.get("uri"), str):
            digest = entry.get("sha256")
            result.append((entry["uri"], digest if isinstance(digest, str) else None))
    return result


def host_path(manifest: Mapping[str, Any], inside: str) -> str | None:
    """The host ``file:`` URI that the in-enclave path ``inside`` reads, through ``fs.mounts``.

    The deepest enclosing mount wins; ``None`` when no host-backed mount covers it.
    """
    mounts = _table(manifest, "fs").get("mounts", [])
    target = PurePosixPath(os.path.normpath(inside))
    best: tuple[int, str] | None = None
    for mount in mounts if isinstance(mounts, list) else []:
        if not isinstance(mount, Mapping) or mount.get("type", "chroot") != "chroot":
            continue
        path, uri = mount.get("path"), mount.get("uri")
        if not isinstance(path, str) or not isinstance(uri, str) or not uri.startswith("file:"):
            continue
        point = PurePosixPath(os.path.normpath(path))
        if target != point and point not in target.parents:
            continue
        if best is None or len(point.parts) > best[0]:
            rest = target.relative_to(point)
            host = uri.removeprefix("file:").rstrip("/") or "/"
            joined = host if rest == PurePosixPath() else f"{host.rstrip('/')}/{rest}"
            best = (len(point.parts), f"file:{joined}")
    return None if best is None else best[1]


def _table(node: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = node.get(key, {})
    return value if isinstance(value, Mapping) else {}


def _uris(entries: Any, where: str) -> tuple[list[str], list[Finding]]:
    if not isinstance(entries, list):
        return [], [Finding("files", f"{where} must be a list")]
    uris, findings = [], []
    for entry in entries:
        uri = entry.get("uri") if isinstance(entry, Mapping) else entry
        if isinstance(uri, str) and uri.startswith("file:"):
            uris.append(uri)
        else:
            findings.append(Finding("files", f"{where} entry {uri!r} is not a file: URI"))
    return uris, findings


def _resolve(uri: str, base: Path) -> PurePosixPath:
    path = uri.removeprefix("file:")
    return PurePosixPath(os.path.normpath(os.path.join(base, path)))


def _overlaps(first: PurePosixPath, second: PurePosixPath) -> bool:
    return first == second or first in second.parents or second in first.parents


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; prints one finding per line on stderr."""
    parser = argparse.ArgumentParser(
        prog="python -m drm_enclave.manifest_lint",
        description="Refuse a Gramine manifest of the enclave with insecure settings.",
    )
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--allow-debug", action="store_true",
                        help="accept sgx.debug = true (debug builds only)")  # fmt: skip
    parser.add_argument("--no-file-check", dest="check_files", action="store_false",
                        help="do not require the trusted files to exist here")  # fmt: skip
    parser.add_argument("--enclave-config", type=Path, metavar="FILE",
                        help="also check that the files this enclave.toml names can be "
                        "read inside the enclave")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        findings = lint_file(args.manifest, allow_debug=args.allow_debug,
                             check_files=args.check_files)  # fmt: skip
        if args.enclave_config is not None:
            config = load_enclave_config(args.enclave_config)
            findings += lint_enclave_config(load_manifest(args.manifest), config)
    except ConfigError as exc:
        print(f"{args.manifest}: {exc}", file=sys.stderr)
        return 2
    for finding in findings:
        print(f"{args.manifest}: {finding}", file=sys.stderr)
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
