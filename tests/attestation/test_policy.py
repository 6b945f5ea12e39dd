"""Policy files: strict parsing (every bad key or value names itself and the file), a
lossless round trip, and Gramine's acceptance rules, each refusal with its own class."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from drm_wire.attestation.collateral import TcbStatus
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.attestation.policy import (
    DebugEnclaveError,
    EnclaveAttributesError,
    MeasurementMismatchError,
    Policy,
    ProductIdMismatchError,
    SignerMismatchError,
    SimulationRefusedError,
    SvnTooLowError,
    TcbStatusError,
)
from drm_wire.attestation.quote import (
    ATTRIBUTE_DEBUG,
    ATTRIBUTE_EINITTOKEN_KEY,
    ATTRIBUTE_INIT,
    ATTRIBUTE_MODE64BIT,
    ATTRIBUTE_PROVISION_KEY,
)
from drm_wire.attestation.verify import VerifiedQuote, verify_quote
from drm_wire.errors import ConfigError

DATA = Path(__file__).parent.parent / "data" / "policy"
MR_ENCLAVE = bytes.fromhex("aa" * 32)
MR_SIGNER = bytes.fromhex("bb" * 32)
NOW = datetime.now(UTC)
HEX_E, HEX_S = MR_ENCLAVE.hex(), MR_SIGNER.hex()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.create(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def policy(platform: SimulatedPlatform) -> Policy:
    return Policy(
        mr_enclave=(MR_ENCLAVE,),
        mr_signer=MR_SIGNER,
        isv_prod_id=5,
        min_isv_svn=2,
        accept_unknown_tcb_status=True,
        simulation_root=platform.root_certificate,
        simulation_root_path="sim-root.pem",
    )


def _verified(platform: SimulatedPlatform, **kw: object) -> VerifiedQuote:
    fields: dict[str, object] = {
        "mr_enclave": MR_ENCLAVE, "mr_signer": MR_SIGNER, "isv_prod_id": 5, "isv_svn": 2,
    } | kw  # fmt: skip
    quote = platform.quote(b"", **fields)  # type: ignore[arg-type]
    return verify_quote(quote, trust=platform.trust_anchors(), now=NOW)


# --- files -----------------------------------------------------------------------------


def test_example_file_parses_every_key() -> None:
    policy = Policy.load(DATA / "example.toml")
    assert len(policy.mr_enclave) == 2
    assert policy.mr_signer is not None
    assert policy.isv_prod_id == 0
    assert policy.tcb_statuses == {TcbStatus.UP_TO_DATE, TcbStatus.SW_HARDENING_NEEDED}
    assert policy.attributes_mask_flags == 0xFFFFFFFFFFFFFFFD
    assert policy.misc_mask == 0xFFFFFFFF
    assert policy.simulation_root is None
    assert Policy.from_toml(policy.to_toml()) == policy


def test_round_trip_with_simulation_root(platform: SimulatedPlatform, tmp_path: Path) -> None:
    (tmp_path / "sim-root.pem").write_bytes(platform.root_certificate_path.read_bytes())
    policy = Policy(mr_signer=MR_SIGNER, isv_prod_id=1,
                    tcb_statuses=frozenset({TcbStatus.UP_TO_DATE, TcbStatus.OUT_OF_DATE}),
                    accept_unknown_tcb_status=True, simulation_root=platform.root_certificate,
                    simulation_root_path="sim-root.pem")  # fmt: skip
    policy.write(tmp_path / "policy.toml")
    loaded = Policy.load(tmp_path / "policy.toml")
    assert loaded == policy
    assert loaded.source == str(tmp_path / "policy.toml")
    with pytest.raises(ValueError, match="simulation_root_path"):
        replace(policy, simulation_root_path=None).to_toml()


GOOD = f'[enclave]\nmr_enclave = ["{HEX_E}"]\nisv_prod_id = 0\n'


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (GOOD + "mr_enclav = []\n", "enclave.mr_enclav", "unknown key"),
        (GOOD + "[extra]\n", "extra", "unknown key"),
        (GOOD + "[simulation]\nroot = 'x'\n", "simulation.root", "unknown key"),
        ('[enclave]\nmr_enclave = ["zz"]\nisv_prod_id = 0\n', "enclave.mr_enclave", "hex"),
        ('[enclave]\nmr_enclave = ["abcd"]\nisv_prod_id = 0\n', "enclave.mr_enclave", "32 bytes"),
        (f'[enclave]\nmr_enclave = "{HEX_E}"\nisv_prod_id = 0\n', "enclave.mr_enclave", "list"),
        (f'[enclave]\nmr_signer = "{HEX_E}00"\nisv_prod_id = 0\n', "enclave.mr_signer", "32 bytes"),
        ("[enclave]\nmr_signer = 5\nisv_prod_id = 0\n", "enclave.mr_signer", "must be str"),
        (f'[enclave]\nmr_enclave = ["{HEX_E}"]\nisv_prod_id = "0"\n', "enclave.isv_prod_id", "int"),
        (
            f'[enclave]\nmr_enclave = ["{HEX_E}"]\nisv_prod_id = true\n',
            "enclave.isv_prod_id",
            "int",
        ),
        (f'[enclave]\nmr_enclave = ["{HEX_E}"]\n', "enclave.isv_prod_id", "missing"),
        (GOOD.replace("0\n", "70000\n"), "isv_prod_id", "0..65535"),
        (GOOD + "min_isv_svn = -1\n", "min_isv_svn", "0..65535"),
        (GOOD + "allow_debug = 1\n", "enclave.allow_debug", "bool"),
        ("[enclave]\nisv_prod_id = 0\n", "enclave", "at least one"),
        ("# empty\n", "enclave", "missing table"),
        ("isv_prod_id = 0\n", "isv_prod_id", "unknown key"),
        ("enclave = 5\n", "enclave", "must be a table"),
        (GOOD + 'tcb_statuses = ["Revoked"]\n', "tcb_statuses", "never"),
        (GOOD + 'tcb_statuses = ["Fine"]\n', "enclave.tcb_statuses", "unknown TCB status"),
        (GOOD + "tcb_statuses = []\n", "tcb_statuses", "accepts nothing"),
        (GOOD + 'attributes_mask_flags = "0x1"\n', "attributes_mask_flags", "needs"),
        (
            GOOD + 'attributes_flags = "4"\nattributes_mask_flags = "0xg"\n',
            "attributes_mask_flags",
            "hex",
        ),
        (GOOD + 'misc_select = "0x1"\nmisc_mask = "0x1ffffffff"\n', "misc_mask", "32 bits"),
        (GOOD + "attributes_xfrm = 3\n", "enclave.attributes_xfrm", "must be str"),
        (GOOD + "[simulation]\ntrust_root = 'nope.pem'\n", "simulation.trust_root", "cannot read"),
        (
            GOOD + "accept_without_collateral = true\n",
            "enclave.accept_without_collateral",
            "removed: it skipped the Quoting Enclave check",
        ),
        (
            GOOD + "accept_without_collateral = false\n",
            "enclave.accept_without_collateral",
            "accept_unknown_tcb_status",
        ),
        (GOOD + "accept_unknown_tcb_status = 1\n", "enclave.accept_unknown_tcb_status", "bool"),
        (
            GOOD + "[simulation]\ntrust_root = 'example.toml'\n",
            "simulation.trust_root",
            "not a PEM",
        ),
        ("[enclave\n", None, "not valid TOML"),
        # Found by fuzzing (tests/fuzz): the parser's own recursion and int conversion.
        (GOOD + "isv_svn = " + "[" * 1_000 + "]" * 1_000 + "\n", None, "nested too deeply"),
        (GOOD + "misc_select = " + "{a = " * 1_000 + "1" + "}" * 1_000, None, "nested too"),
        (GOOD + "min_isv_svn = " + "9" * 4_301 + "\n", None, "more than 4300 digits"),
    ],
)
def test_bad_policy_names_key_and_file(text: str, key: str | None, message: str) -> None:
    source = DATA / "under-test.toml"
    with pytest.raises(ConfigError, match=message) as info:
        Policy.from_toml(text, path=source)
    assert type(info.value) is ConfigError
    assert info.value.path == str(source)
    if key is not None:
        assert info.value.key is not None
        assert info.value.key.endswith(key)
        assert key in str(info.value)
        assert str(source) in str(info.value)


def test_unreadable_policy_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy") as info:
        Policy.load(tmp_path / "missing.toml")
    assert info.value.path == str(tmp_path / "missing.toml")


# --- rules -----------------------------------------------------------------------------


def test_an_unknown_tcb_status_is_accepted_only_loudly(
    platform: SimulatedPlatform, policy: Policy
) -> None:
    verified = _verified(platform)
    with capture_logs() as logs:
        enclave = policy.check(verified)
    assert enclave.tcb_status is None
    assert enclave.advisory_ids == ()
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("tcb_status_unknown_accepted", "warning")
    ]
    strict = replace(policy, accept_unknown_tcb_status=False)
    with capture_logs() as logs, pytest.raises(TcbStatusError, match="--pccs-url"):
        strict.check(verified)
    assert logs == []
    assert "accept_unknown_tcb_status = true" in policy.to_toml()
    assert "accept_unknown_tcb_status" not in strict.to_toml()


def test_accepts_the_right_enclave(platform: SimulatedPlatform, policy: Policy) -> None:
    enclave = policy.check(_verified(platform), public_key_spki=b"spki")
    assert (enclave.mr_enclave, enclave.mr_signer) == (MR_ENCLAVE, MR_SIGNER)
    assert (enclave.isv_prod_id, enclave.isv_svn, enclave.debug) == (5, 2, False)
    assert enclave.simulated
    assert enclave.tcb_status is None
    assert enclave.public_key_spki == b"spki"
    assert policy.check(_verified(platform, isv_svn=9)).isv_svn == 9
    signer_only = replace(policy, mr_enclave=())
    assert signer_only.check(_verified(platform, mr_enclave=bytes(32))).mr_enclave == bytes(32)
    enclave_only = replace(policy, mr_signer=None)
    assert enclave_only.check(_verified(platform, mr_signer=bytes(32))).mr_signer == bytes(32)


BASE_FLAGS = ATTRIBUTE_INIT | ATTRIBUTE_MODE64BIT

REFUSALS: list[tuple[str, dict[str, object], dict[str, object], type[Exception]]] = [
    ("wrong MRENCLAVE", {"mr_enclave": bytes(32)}, {}, MeasurementMismatchError),
    ("wrong MRSIGNER", {"mr_signer": bytes(32)}, {}, SignerMismatchError),
    ("debug bit", {"debug": True}, {}, DebugEnclaveError),
    ("low SVN", {"isv_svn": 1}, {}, SvnTooLowError),
    ("product id", {"isv_prod_id": 6}, {}, ProductIdMismatchError),
    ("no INIT", {"attributes_flags": ATTRIBUTE_MODE64BIT}, {}, EnclaveAttributesError),
    ("no MODE64BIT", {"attributes_flags": ATTRIBUTE_INIT}, {}, EnclaveAttributesError),
    ("PROVISION_KEY", {"attributes_flags": BASE_FLAGS | ATTRIBUTE_PROVISION_KEY}, {},
     EnclaveAttributesError),
    ("EINITTOKEN_KEY", {"attributes_flags": BASE_FLAGS | ATTRIBUTE_EINITTOKEN_KEY}, {},
     EnclaveAttributesError),
    ("flags mask", {}, {"attributes_flags": 0x6, "attributes_mask_flags": 0xFF},
     EnclaveAttributesError),
    ("xfrm mask", {}, {"attributes_xfrm": 0x7}, EnclaveAttributesError),
    ("misc mask", {}, {"misc_select": 0x1, "misc_mask": 0x1}, EnclaveAttributesError),
    ("no collateral", {}, {"accept_unknown_tcb_status": False}, TcbStatusError),
    ("simulation not trusted", {}, {"simulation_root": None, "simulation_root_path": None},
     SimulationRefusedError),
    ("debug allowed but wrong MRENCLAVE", {"debug": True, "mr_enclave": bytes(32)},
     {"allow_debug": True}, MeasurementMismatchError),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "quote_kw", "policy_kw", "expected"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_policy_refuses(
    name: str,
    quote_kw: dict[str, object],
    policy_kw: dict[str, object],
    expected: type[Exception],
    platform: SimulatedPlatform,
    policy: Policy,
) -> None:
    checked = replace(policy, **policy_kw)  # type: ignore[arg-type]
    with pytest.raises(expected) as info:
        checked.check(_verified(platform, **quote_kw))
    assert type(info.value) is expected


def test_blindai_style_masks_accept(platform: SimulatedPlatform, policy: Policy) -> None:
    masked = replace(
        policy,
        allow_debug=True,
        attributes_flags=0x4,  # INIT implied
        attributes_mask_flags=0xFFFFFFFFFFFFFFFD,  # ignore DEBUG
        attributes_xfrm=0x3,
        attributes_mask_xfrm=0xFFFFFFFFFFFFFF1B,
        misc_select=0,
        misc_mask=0xFFFFFFFF,
    )
    assert masked.check(_verified(platform, debug=True)).debug
    assert masked.check(_verified(platform)).debug is False
    assert ATTRIBUTE_DEBUG & 0xFFFFFFFFFFFFFFFD == 0


def test_debug_allowed(platform: SimulatedPlatform, policy: Policy) -> None:
    assert replace(policy, allow_debug=True).check(_verified(platform, debug=True)).debug


def test_a_path_to_a_device_is_refused_without_reading_it() -> None:
    """Seen while writing the policy's fuzz harness: ``/dev/zero`` was read until memory
    ran out."""
    text = GOOD + "[simulation]\ntrust_root = '/dev/zero'\n"
    with pytest.raises(ConfigError, match="not a regular file") as info:
        Policy.from_toml(text, path=DATA / "under-test.toml")
    assert info.value.key == "simulation.trust_root"
    with pytest.raises(ConfigError, match=r"cannot read policy.*not a regular file"):
        Policy.load("/dev/zero")
