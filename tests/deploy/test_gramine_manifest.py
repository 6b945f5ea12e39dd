"""The Gramine manifest template, the Makefile's use of it, and the manifest lint, without Gramine.

The template is rendered as ``gramine-manifest`` would on this machine (see
``gramine_render``), for the release and the debug build, parsed as TOML, and linted with
every trusted file checked to exist. The lint is then fed one deliberately broken
manifest per rule and must name exactly that problem.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import pytest

from drm_enclave import manifest_lint
from drm_enclave.manifest_lint import Finding, lint_manifest
from drm_wire.errors import ConfigError
from tests.deploy.gramine_render import (
    MAKEFILE_DIR,
    TEMPLATE,
    defines,
    fake_gramine,
    make_env,
    render,
)

CA_INSIDE = "/opt/drm-enclave/custodian-ca.pem"
AGREED_ARGV = [
    "-m", "drm_enclave", "serve",
    "--config", "/etc/drm-enclave/enclave.toml",
    "--attestation", "gramine",
    "--custodian-ca", CA_INSIDE,
]  # fmt: skip
Doc = dict[str, Any]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The release and debug manifests, rendered once for this module."""
    root = tmp_path_factory.mktemp("gramine")
    ca = root / "custodian-ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nstand-in\n-----END CERTIFICATE-----\n")
    pkglibdir = fake_gramine(root / "pkglibdir")
    release = render(defines(ca), pkglibdir)
    debug = render(defines(ca, debug=True), pkglibdir)
    return {
        "root": root,
        "ca": ca,
        "pkglibdir": pkglibdir,
        "release_text": release,
        "release": tomllib.loads(release),
        "debug": tomllib.loads(debug),
    }


@pytest.fixture
def release(built: dict[str, Any]) -> Doc:
    doc: Doc = copy.deepcopy(built["release"])
    return doc


# --- the rendered manifest ------------------------------------------------------------------


def test_release_manifest_lints_clean_and_every_trusted_file_exists(
    built: dict[str, Any],
) -> None:
    assert lint_manifest(built["release"], check_files=True) == []


def test_argv_is_fixed_to_the_agreed_interface(release: Doc) -> None:
    entrypoint = os.path.realpath(sys.executable)
    assert release["libos"]["entrypoint"] == entrypoint
    assert release["loader"]["argv"] == [entrypoint, *AGREED_ARGV]
    assert "insecure__" not in "".join(release["loader"])


def test_release_settings(release: Doc) -> None:
    sgx, loader = release["sgx"], release["loader"]
    assert sgx["debug"] is False
    assert loader["log_level"] == "error"
    assert sgx["remote_attestation"] == "dcap"
    assert sgx["file_check_policy"] == "strict"
    assert (sgx["isvprodid"], sgx["isvsvn"]) == (1, 1)
    assert (sgx["enclave_size"], sgx["max_threads"], sgx["edmm_enable"]) == ("4G", 64, False)
    assert loader["env"]["ORT_DISABLE_TELEMETRY"] == "1"
    assert loader["env"]["OMP_NUM_THREADS"] == "1"
    assert all(isinstance(value, str) for value in loader["env"].values())  # no passthrough


def test_only_the_host_config_directory_is_unprotected(release: Doc) -> None:
    assert release["sgx"]["allowed_files"] == ["file:/etc/drm-enclave/"]
    mounts = release["fs"]["mounts"]
    assert {"path": "/etc/drm-enclave", "uri": "file:/etc/drm-enclave"} in mounts
    assert {"type": "tmpfs", "path": "/tmp"} in mounts


def test_code_and_the_ca_are_measured(release: Doc, built: dict[str, Any]) -> None:
    trusted = release["sgx"]["trusted_files"]
    site_packages = defines(built["ca"])["site_packages"]
    assert f"file:{built['ca']}" in trusted
    assert f"file:{site_packages}/" in trusted
    assert f"file:{os.path.realpath(sys.executable)}" in trusted
    assert f"file:{built['pkglibdir'] / 'runtime' / 'glibc'}/" in trusted
    assert release["loader"]["env"]["PYTHONPATH"] == site_packages
    assert manifest_lint.host_path(release, CA_INSIDE) == f"file:{built['ca']}"
    # The interpreter's own stdlib is measured; the host's *-packages directories are not.
    assert not [uri for uri in trusted if uri.rstrip("/").endswith("-packages")
                and uri != f"file:{site_packages}/"]  # fmt: skip


def test_debug_build_differs_only_in_debug_and_log_level(built: dict[str, Any]) -> None:
    debug, release = copy.deepcopy(built["debug"]), copy.deepcopy(built["release"])
    assert (debug["sgx"].pop("debug"), release["sgx"].pop("debug")) == (True, False)
    assert (debug["loader"].pop("log_level"), release["loader"].pop("log_level")) == (
        "debug",
        "error",
    )
    assert debug == release


def test_debug_build_passes_the_lint_only_as_a_debug_build(built: dict[str, Any]) -> None:
    assert lint_manifest(built["debug"], allow_debug=True) == []
    assert lint_manifest(built["debug"]) == [
        Finding("debug", "sgx.debug = true in a release manifest")
    ]


def test_variables_reach_the_manifest(built: dict[str, Any]) -> None:
    variables = defines(built["ca"], isvprodid="7", isvsvn="3", enclave_size="8G",
                        max_threads="32")  # fmt: skip
    sgx = tomllib.loads(render(variables, built["pkglibdir"]))["sgx"]
    assert (sgx["isvprodid"], sgx["isvsvn"], sgx["enclave_size"], sgx["max_threads"]) == (
        7,
        3,
        "8G",
        32,
    )


def test_debug_must_be_0_or_1(built: dict[str, Any]) -> None:
    variables = defines(built["ca"])
    variables["debug"] = "yes"
    with pytest.raises(jinja2.UndefinedError, match="has no attribute 'yes'"):
        render(variables, built["pkglibdir"])


def _template_variables() -> set[str]:
    env = make_env(Path("/nonexistent"))
    source = TEMPLATE.read_text(encoding="utf-8")
    names = jinja2.meta.find_undeclared_variables(env.parse(source))
    return names - set(env.globals)


@pytest.mark.parametrize("name", sorted(_template_variables()))
def test_every_variable_is_required(built: dict[str, Any], name: str) -> None:
    variables = defines(built["ca"])
    del variables[name]
    # The first use of entrypoint is ldd(entrypoint), which fails in Gramine's ldd too.
    error = TypeError if name == "entrypoint" else jinja2.UndefinedError
    with pytest.raises(error, match="StrictUndefined" if name == "entrypoint" else name):
        render(variables, built["pkglibdir"])


# --- the Makefile (dry runs: nothing is executed) ----------------------------------------------

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", str(MAKEFILE_DIR),
         f"PYTHON={sys.executable}", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def _defines_passed(output: str) -> dict[str, str]:
    return dict(re.findall(r"-D(\w+)=(\S*)", output))


@needs_make
def test_makefile_passes_exactly_the_template_variables() -> None:
    done = _make("drm_enclave.manifest")
    assert done.returncode == 0, done.stderr
    assert set(_defines_passed(done.stdout)) == _template_variables()


@needs_make
def test_makefile_release_build_lints_as_release_and_writes_the_policy() -> None:
    done = _make("all")
    assert done.returncode == 0, done.stderr
    passed = _defines_passed(done.stdout)
    assert (passed["debug"], passed["log_level"]) == ("0", "error")
    assert "-m drm_enclave.manifest_lint  drm_enclave.manifest.tmp" in done.stdout
    assert "gramine-sgx-sigstruct-view --output-format=json drm_enclave.sig" in done.stdout
    assert "-m drm_enclave measure --sigstruct drm_enclave.sigstruct.json" in done.stdout
    assert "--accept-tcb-status UpToDate --out drm_enclave.policy.toml" in done.stdout


@needs_make
def test_makefile_debug_switch() -> None:
    done = _make("all", "SGX_DEBUG=1")
    assert done.returncode == 0, done.stderr
    passed = _defines_passed(done.stdout)
    assert (passed["debug"], passed["log_level"]) == ("1", "debug")
    assert "-m drm_enclave.manifest_lint --allow-debug drm_enclave.manifest.tmp" in done.stdout
    assert "measure --sigstruct" not in done.stdout  # no policy for a debug enclave


@needs_make
def test_makefile_refuses_other_debug_values() -> None:
    done = _make("all", "SGX_DEBUG=yes")
    assert done.returncode != 0
    assert 'SGX_DEBUG must be 0 or 1, not "yes"' in done.stderr


# --- one broken manifest per lint rule ------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return mutate


def _delete(path: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        del node[last]

    return mutate


def _argv(*extra: str, drop: str | None = None) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        argv = doc["loader"]["argv"]
        if drop is not None:
            index = argv.index(drop)
            del argv[index : index + 2]
        argv.extend(extra)

    return mutate


def _allow(uri: str) -> Callable[[Doc], None]:
    return lambda doc: doc["sgx"]["allowed_files"].append(uri)


BROKEN: dict[str, tuple[Callable[[Doc], None], list[Finding]]] = {
    "debug": (
        _set("sgx.debug", True),
        [Finding("debug", "sgx.debug = true in a release manifest")],
    ),
    "debug-not-bool": (
        _set("sgx.debug", "false"),
        [Finding("debug", "sgx.debug must be true or false")],
    ),
    "cmdline-argv": (
        _set("loader.insecure__use_cmdline_argv", True),
        [Finding("insecure", "insecure option loader.insecure__use_cmdline_argv")],
    ),
    "host-env": (
        _set("loader.insecure__use_host_env", True),
        [Finding("insecure", "insecure option loader.insecure__use_host_env")],
    ),
    "rpc-threads": (
        _set("sgx.insecure__rpc_thread_num", 4),
        [Finding("insecure", "insecure option sgx.insecure__rpc_thread_num")],
    ),
    "fs-keys": (
        _set("fs.insecure__keys", {"default": "00" * 16}),
        [Finding("insecure", "insecure option fs.insecure__keys")],
    ),
    "nested-insecure": (
        lambda doc: doc["fs"]["mounts"][0].update(insecure__x=1),
        [Finding("insecure", "insecure option fs.mounts[0].insecure__x")],
    ),
    "no-attestation": (
        _delete("sgx.remote_attestation"),
        [Finding("remote_attestation", 'sgx.remote_attestation must be "dcap" (missing)')],
    ),
    "attestation-none": (
        _set("sgx.remote_attestation", "none"),
        [Finding("remote_attestation", "sgx.remote_attestation must be \"dcap\" (got 'none')")],
    ),
    "file-check-policy": (
        _set("sgx.file_check_policy", "allow_all_but_log"),
        [
            Finding(
                "file_check_policy",
                "sgx.file_check_policy must be \"strict\", not 'allow_all_but_log'",
            )
        ],
    ),
    "isvprodid-too-big": (
        _set("sgx.isvprodid", 65536),
        [Finding("isv", "sgx.isvprodid must be an integer 0..65535")],
    ),
    "isvsvn-string": (
        _set("sgx.isvsvn", "1"),
        [Finding("isv", "sgx.isvsvn must be an integer 0..65535")],
    ),
    "no-argv": (
        _delete("loader.argv"),
        [Finding("argv", "loader.argv is missing: arguments must be fixed in the manifest")],
    ),
    "argv-src-file": (
        _set("loader.argv_src_file", "file:argv"),
        [Finding("argv", "loader.argv_src_file is set: arguments must be in loader.argv")],
    ),
    "argv-not-strings": (
        _set("loader.argv", ["python3", 1]),
        [Finding("argv", "loader.argv must be a list of strings")],
    ),
    "argv-other-program": (
        _set("loader.argv", ["python3", "-c", "print()"]),
        [Finding("argv", 'loader.argv must run "-m drm_enclave serve"')],
    ),
    "argv-simulated": (
        _argv("--attestation", "simulated"),
        [Finding("argv", "loader.argv must pass --attestation gramine")],
    ),
    "argv-auto-with-equals": (
        _argv("--attestation=auto"),
        [Finding("argv", "loader.argv must pass --attestation gramine")],
    ),
    "argv-no-ca": (
        _argv(drop="--custodian-ca"),
        [Finding("argv", "loader.argv must pass --custodian-ca")],
    ),
    "argv-simulation-dir": (
        _argv("--simulation-dir", "/tmp/sim"),
        [Finding("argv", "loader.argv must not pass --simulation-dir")],
    ),
    "inputs-pccs-ca-unmounted": (
        _argv("--pccs-ca", "/opt/intel/sgx-dcap-pccs/ssl_key/file.crt"),
        [
            Finding(
                "inputs",
                "--pccs-ca /opt/intel/sgx-dcap-pccs/ssl_key/file.crt is not under "
                "any fs.mounts path",
            )
        ],
    ),
    "inputs-config-not-allowed": (
        _set("sgx.allowed_files", []),
        [
            Finding(
                "inputs",
                "--config /etc/drm-enclave/enclave.toml (host "
                "file:/etc/drm-enclave/enclave.toml) is neither a trusted nor an allowed file",
            )
        ],
    ),
    "inputs-license-in-tmpfs": (
        _argv("--license", "/tmp/borrower.license.json"),
        [Finding("inputs", "--license /tmp/borrower.license.json is not under any fs.mounts path")],
    ),
    "env-src-file": (
        _set("loader.env_src_file", "file:env"),
        [Finding("env", "loader.env_src_file is set: variables must be in loader.env")],
    ),
    "env-passthrough": (
        _set("loader.env.LD_PRELOAD", {"passthrough": True}),
        [Finding("env", "loader.env.LD_PRELOAD passes the host's value through")],
    ),
    "no-telemetry-switch": (
        _delete("loader.env.ORT_DISABLE_TELEMETRY"),
        [Finding("env", 'loader.env.ORT_DISABLE_TELEMETRY must be "1"')],
    ),
    "telemetry-on": (
        _set("loader.env.ORT_DISABLE_TELEMETRY", "0"),
        [Finding("env", 'loader.env.ORT_DISABLE_TELEMETRY must be "1"')],
    ),
    "telemetry-passthrough": (
        _set("loader.env.ORT_DISABLE_TELEMETRY", {"passthrough": True}),
        [
            Finding("env", "loader.env.ORT_DISABLE_TELEMETRY passes the host's value through"),
            Finding("env", 'loader.env.ORT_DISABLE_TELEMETRY must be "1"'),
        ],
    ),
    "no-omp-threads": (
        _delete("loader.env.OMP_NUM_THREADS"),
        [Finding("env", "loader.env.OMP_NUM_THREADS must be a positive integer")],
    ),
    "omp-threads-zero": (
        _set("loader.env.OMP_NUM_THREADS", "0"),
        [Finding("env", "loader.env.OMP_NUM_THREADS must be a positive integer")],
    ),
    "allowed-py": (
        _allow("file:/srv/evil.py"),
        [Finding("allowed_files", "sgx.allowed_files entry 'file:/srv/evil.py' is code")],
    ),
    "allowed-versioned-so": (
        _allow("file:/srv/libevil.so.1"),
        [Finding("allowed_files", "sgx.allowed_files entry 'file:/srv/libevil.so.1' is code")],
    ),
    "allowed-pth": (
        _allow("file:/srv/hook.pth"),
        [Finding("allowed_files", "sgx.allowed_files entry 'file:/srv/hook.pth' is code")],
    ),
    "allowed-not-a-file": (
        _allow("dev:/dev/sgx_enclave"),
        [Finding("files", "sgx.allowed_files entry 'dev:/dev/sgx_enclave' is not a file: URI")],
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_lint_rule(release: Doc, name: str) -> None:
    mutate, expected = BROKEN[name]
    mutate(release)
    assert lint_manifest(release, check_files=False) == expected


def test_allowed_files_covering_the_packages(release: Doc) -> None:
    site_packages = release["loader"]["env"]["PYTHONPATH"]
    parent = str(Path(site_packages).parent)
    _allow(f"file:{parent}/")(release)
    assert lint_manifest(release, check_files=False) == [
        Finding("allowed_files",
                f"sgx.allowed_files entry 'file:{parent}/' covers trusted file:{site_packages}/")
    ]  # fmt: skip


def test_allowed_files_covering_the_python_runtime(release: Doc) -> None:
    entrypoint = release["libos"]["entrypoint"]
    _allow(f"file:{entrypoint}")(release)
    assert lint_manifest(release, check_files=False) == [
        Finding("allowed_files",
                f"sgx.allowed_files entry 'file:{entrypoint}' covers trusted file:{entrypoint}")
    ]  # fmt: skip


def test_allowed_files_covering_the_ca(release: Doc, built: dict[str, Any]) -> None:
    directory = f"file:{built['ca'].parent}/"
    _allow(directory)(release)
    assert lint_manifest(release, check_files=False) == [
        Finding("allowed_files",
                f"sgx.allowed_files entry '{directory}' covers the custodian CA file:{built['ca']}")
    ]  # fmt: skip


def test_allowed_directory_holding_code(release: Doc, tmp_path: Path) -> None:
    (tmp_path / "conf" / "plugins").mkdir(parents=True)
    (tmp_path / "conf" / "enclave.toml").write_text("")
    (tmp_path / "conf" / "plugins" / "hook.py").write_text("")
    _allow(f"file:{tmp_path / 'conf'}/")(release)
    assert lint_manifest(release) == [
        Finding("allowed_files", f"sgx.allowed_files entry 'file:{tmp_path / 'conf'}/' contains "
                f"code ({tmp_path / 'conf' / 'plugins' / 'hook.py'})")
    ]  # fmt: skip


def test_ca_must_be_trusted(release: Doc, built: dict[str, Any]) -> None:
    release["sgx"]["trusted_files"].remove(f"file:{built['ca']}")
    assert lint_manifest(release, check_files=False) == [
        Finding("custodian_ca", f"custodian CA file:{built['ca']} is not a trusted file")
    ]


@pytest.mark.parametrize("inside", ["/elsewhere/ca.pem", "/tmp/ca.pem"])
def test_ca_must_come_from_a_host_mount(release: Doc, inside: str) -> None:
    argv = release["loader"]["argv"]
    argv[argv.index("--custodian-ca") + 1] = inside
    assert lint_manifest(release, check_files=False) == [
        Finding("custodian_ca", f"--custodian-ca {inside} is not under any fs.mounts path")
    ]


def test_trusted_files_must_exist(release: Doc, tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    release["sgx"]["trusted_files"] += [
        f"file:{tmp_path}/missing.so",
        f"file:{tmp_path}/missing/",
        f"file:{tmp_path}/lib",
    ]
    assert lint_manifest(release) == [
        Finding("trusted_files", f"trusted file file:{tmp_path}/missing.so does not exist"),
        Finding("trusted_files", f"trusted directory file:{tmp_path}/missing/ does not exist"),
        Finding(
            "trusted_files", f'trusted file:{tmp_path}/lib is a directory: end its URI with "/"'
        ),
    ]


def test_relative_uris_resolve_against_the_root(release: Doc, built: dict[str, Any]) -> None:
    release["sgx"]["trusted_files"].append("file:custodian-ca.pem")
    assert lint_manifest(release, root=built["root"]) == []
    assert lint_manifest(release, root=built["root"] / "pkglibdir") == [
        Finding("trusted_files", "trusted file file:custodian-ca.pem does not exist")
    ]


def test_signed_manifest_form_is_understood(release: Doc) -> None:
    """``gramine-sgx-sign`` rewrites trusted files as ``{uri, sha256}`` tables."""
    release["sgx"]["trusted_files"] = [
        {"uri": uri, "sha256": "00" * 32} for uri in release["sgx"]["trusted_files"]
    ]
    assert lint_manifest(release) == []


def test_every_problem_is_reported_at_once(release: Doc) -> None:
    for mutate in (BROKEN["debug"][0], BROKEN["host-env"][0], BROKEN["no-attestation"][0]):
        mutate(release)
    assert [finding.rule for finding in lint_manifest(release)] == [
        "insecure",
        "debug",
        "remote_attestation",
    ]


# --- the command line --------------------------------------------------------------------------


def _lint_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "drm_enclave.manifest_lint", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_cli_accepts_the_release_manifest(built: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "drm_enclave.manifest"
    path.write_text(built["release_text"], encoding="utf-8")
    done = _lint_cli(str(path))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_cli_refuses_a_debug_manifest_unless_told(built: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "drm_enclave.manifest"
    path.write_text(built["release_text"].replace("sgx.debug = false", "sgx.debug = true"))
    done = _lint_cli(str(path))
    assert (done.returncode, done.stderr) == (
        1,
        f"{path}: debug: sgx.debug = true in a release manifest\n",
    )
    assert _lint_cli("--allow-debug", str(path)).returncode == 0


def test_cli_refuses_what_is_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "drm_enclave.manifest"
    path.write_bytes(b"sgx.debug = \n")
    done = _lint_cli(str(path))
    assert done.returncode == 2
    assert done.stderr.startswith(f"{path}: manifest is not TOML: ")


def test_load_manifest_refuses_oversized_and_missing_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest_lint, "MAX_MANIFEST_BYTES", 1024)
    path = tmp_path / "big.manifest"
    path.write_bytes(b"#" * 1025)
    with pytest.raises(ConfigError) as caught:
        manifest_lint.load_manifest(path)
    assert str(caught.value) == f"the manifest is larger than 1024 bytes (in {path})"
    with pytest.raises(ConfigError) as caught:
        manifest_lint.load_manifest(tmp_path)
    assert str(caught.value) == f"the manifest is not a regular file (in {tmp_path})"
    with pytest.raises(ConfigError) as caught:
        manifest_lint.load_manifest(tmp_path / "absent")
    assert str(caught.value) == (
        f"cannot read the manifest: No such file or directory (in {tmp_path / 'absent'})"
    )


# --- the host's enclave.toml against the manifest --------------------------------------------

DEPLOYED_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "config" / "enclave.toml"


def _deployed_config(**changes: object) -> dict[str, Any]:
    """deploy/config/enclave.toml with its commented PCCS lines in force, then ``changes``
    (``None`` removes a key)."""
    text = DEPLOYED_CONFIG.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^# (pccs_(?:url|ca) = )", r"\1", text)
    config: dict[str, Any] = tomllib.loads(text)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def test_the_deployed_config_files_are_readable_inside_the_enclave(release: Doc) -> None:
    config = _deployed_config()
    assert config["pccs_ca"] == "/etc/drm-enclave/pccs-ca.pem"
    assert manifest_lint.lint_enclave_config(release, config) == []
    assert manifest_lint.readable(release, "/etc/drm-enclave/pccs-ca.pem") is None
    assert manifest_lint.readable(release, CA_INSIDE) is None
    # Relative to the directory of --config, as the enclave resolves it.
    relative = _deployed_config(pccs_ca="pccs-ca.pem", license="sub/borrower.license.json")
    assert manifest_lint.lint_enclave_config(release, relative) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pccs_ca": "/opt/intel/sgx-dcap-pccs/ssl_key/file.crt"},
         "pccs_ca = '/opt/intel/sgx-dcap-pccs/ssl_key/file.crt': "
         "/opt/intel/sgx-dcap-pccs/ssl_key/file.crt is not under any fs.mounts path inside the "
         "enclave (put it under the allowed /etc/drm-enclave/)"),
        ({"pccs_ca": "../pccs-ca.pem"},
         "pccs_ca = '../pccs-ca.pem': /etc/drm-enclave/../pccs-ca.pem is not under any "
         "fs.mounts path inside the enclave (put it under the allowed /etc/drm-enclave/)"),
        ({"license": "/tmp/borrower.license.json"},
         "license = '/tmp/borrower.license.json': /tmp/borrower.license.json is not under any "
         "fs.mounts path inside the enclave (put it under the allowed /etc/drm-enclave/)"),
        ({"pccs_ca": 7}, "pccs_ca must be a path"),
        ({"pccs_ca": None},
         "pccs_url without pccs_ca: the enclave has no system trust store, so it cannot verify "
         "the PCCS; give the PCCS's CA (Intel's PCS: the CA that issued its certificate) as "
         "pccs_ca"),
    ],
)  # fmt: skip
def test_enclave_config_files_the_enclave_cannot_read(
    release: Doc, changes: dict[str, object], message: str
) -> None:
    config = _deployed_config(**changes)
    assert manifest_lint.lint_enclave_config(release, config) == [
        Finding("enclave_config", message)
    ]


def test_the_pccs_ca_the_manifest_fixes_wins_over_the_config(release: Doc) -> None:
    """A --pccs-ca in loader.argv overrides the file's key, so only the flag is checked."""
    _argv("--pccs-ca", "/etc/drm-enclave/pccs-ca.pem")(release)
    config = _deployed_config(pccs_ca="/opt/elsewhere.pem")
    assert manifest_lint.lint_enclave_config(release, config) == []
    assert lint_manifest(release, check_files=False) == []


def test_cli_checks_an_enclave_config(built: dict[str, Any], tmp_path: Path) -> None:
    manifest = tmp_path / "drm_enclave.manifest"
    manifest.write_text(built["release_text"], encoding="utf-8")
    config = tmp_path / "enclave.toml"
    config.write_text('license = "borrower.license.json"\npccs_url = "https://localhost:8081"\n'
                      'pccs_ca = "/opt/intel/pccs.crt"\n')  # fmt: skip
    done = _lint_cli("--enclave-config", str(config), str(manifest))
    assert (done.returncode, done.stderr) == (
        1,
        f"{manifest}: enclave_config: pccs_ca = '/opt/intel/pccs.crt': /opt/intel/pccs.crt is "
        "not under any fs.mounts path inside the enclave (put it under the allowed "
        "/etc/drm-enclave/)\n",
    )
    config.write_text('license = "borrower.license.json"\npccs_ca = "pccs-ca.pem"\n')
    assert _lint_cli("--enclave-config", str(config), str(manifest)).returncode == 0
    config.write_bytes(b"license = \n")
    done = _lint_cli("--enclave-config", str(config), str(manifest))
    assert done.returncode == 2
    assert "enclave config is not TOML" in done.stderr
