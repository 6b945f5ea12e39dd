"""The custodian checks each model and its lending terms as the enclave will, before it
starts (I14, Q13): ``check-config`` and ``serve`` refuse, naming the model and why."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest

from drm_custodian.cli import EXIT_CONFIG, EXIT_OK, main
from drm_custodian.models import ModelFile, inspect_model, read_model_file, terms_file_for
from drm_lab import models
from drm_wire.attestation.insecure_simulation import SimulatedPlatform
from drm_wire.errors import ConfigError
from drm_wire.limits import MAX_METADATA_BYTES
from drm_wire.messages import ModelBegin
from drm_wire.model.terms import Terms, Unit
from tests.simulation import simulation_policy

MR_ENCLAVE = hashlib.sha256(b"drm custodian model tests: enclave").digest()
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


@dataclass(frozen=True)
class Files:
    state: Path
    policy: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("custodian-models")
    state = root / "state"
    assert main(["init", "--state-dir", str(state)], stdout=io.StringIO()) == 0
    platform = SimulatedPlatform.create(root / "platform")
    simulation_policy(platform, MR_ENCLAVE).write(root / "policy.toml")
    return Files(state, root / "policy.toml")


def _check(files: Files, config: Path, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    argv = ["check-config", "--config", str(config), "--state-dir", str(files.state),
            "--policy", str(files.policy), *extra]  # fmt: skip
    status = main(argv, stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _config(tmp_path: Path, model: Path, tables: str = "") -> Path:
    return _write(tmp_path / "c.toml", f'upload = ["{model}"]\n{tables}')


def _model(tmp_path: Path, name: str = "tiny", data: bytes | None = None) -> Path:
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(models.tiny_model() if data is None else data)
    return path


def test_terms_in_the_config_file_are_checked_and_shown(files: Files, tmp_path: Path) -> None:
    model = _model(tmp_path)
    config = _config(
        tmp_path, model, "[models.tiny]\nmax_batch = 16\ninputs = {x = [[1, 16], 4]}\n"
    )
    status, out, err = _check(files, config)
    assert (status, err) == (EXIT_OK, "")
    assert "  models = tiny (unit=item max_batch=16 x=[1..16]x4)  (config file)" in out
    assert "    terms: unit=item max_batch=16 x=[1..16]x4; largest request costs 16" in out


def test_a_terms_file_next_to_the_model_is_read(files: Files, tmp_path: Path) -> None:
    model = _model(tmp_path)
    _write(terms_file_for(model), 'unit = "request"\n[inputs]\nx = [[1, 8], 4]\n')
    assert terms_file_for(model) == tmp_path / "tiny.terms.toml"
    status, out, _ = _check(files, _config(tmp_path, model))
    assert status == EXIT_OK
    assert "    terms: unit=request max_batch=64 x=[1..8]x4; largest request costs 1" in out


def test_terms_given_twice_are_refused(files: Files, tmp_path: Path) -> None:
    model = _model(tmp_path)
    _write(terms_file_for(model), "max_batch = 8\n")
    config = _config(tmp_path, model, "[models.tiny]\nmax_batch = 4\n")
    status, _, err = _check(files, config)
    assert status == EXIT_CONFIG
    assert "terms for model 'tiny' are given twice" in err


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        (
            '[models.tiny]\nunit = "request"\n',
            "model 'tiny': its terms do not fit it: input 'x' dim 0 is dynamic and unbounded: "
            'unit = "request" needs a bound for every dynamic dim',
        ),
        (
            "[models.tiny]\ninputs = {x = [[1, 16], 5]}\n",
            "model 'tiny': its terms do not fit it: input 'x' dim 1 is fixed at 4 by the model",
        ),
        (
            "[models.tiny]\ninputs = {images = [1, 3]}\n",
            "model 'tiny': its terms do not fit it: inputs names input 'images'",
        ),
        ("[models.other]\nmax_batch = 2\n", "[models] names model(s) not uploaded: other"),
        ("[models.tiny]\nmax_batch = 0\n", "max_batch must be an integer from 1"),
        ("[models.tiny]\ncost = 2\n", "unknown key 'cost' in terms"),
        ("[models]\ntiny = 3\n", "must be a table of lending terms"),
        (
            "[models.tiny]\nmax_batch = 500\n",
            "model 'tiny': its largest request costs 500 inferences, more than the lease of "
            "100 an enclave may hold",
        ),
    ],
)
def test_bad_terms_stop_start_up_naming_the_model(
    files: Files, tmp_path: Path, tables: str, message: str
) -> None:
    config = _config(tmp_path, _model(tmp_path), tables)
    for command in ("check-config", "serve"):
        out, err = io.StringIO(), io.StringIO()
        argv = [command, "--config", str(config), "--state-dir", str(files.state),
                "--policy", str(files.policy), "--lease", "100"]  # fmt: skip
        assert main(argv, stdout=out, stderr=err) == EXIT_CONFIG
        assert message in err.getvalue()


def test_terms_over_the_lease_stop_start_up(tmp_path: Path) -> None:
    """Q13: a request costing more than a lease could never be granted in one piece."""
    model = ModelFile.from_bytes("tiny", models.tiny_model(), Terms(max_batch=65))
    with pytest.raises(ConfigError, match="largest request costs 65 inferences, more than"):
        inspect_model(model, lease=64)
    checked, pricing = inspect_model(model, lease=65)
    assert (checked.max_cost, pricing.max_cost) == (65, 65)


@pytest.mark.parametrize(("lease", "max_batch"), [(10, 5), (1, 1), (129, 64), (1000, 64)])
def test_the_default_batch_is_lowered_to_half_a_small_lease(lease: int, max_batch: int) -> None:
    model = ModelFile.from_bytes("tiny", models.tiny_model())
    checked, pricing = inspect_model(model, lease=lease)
    # What the enclave is sent: the default stays implicit when it fits half the lease.
    assert checked.terms == (Terms() if max_batch == 64 else Terms(max_batch=max_batch))
    assert pricing.max_cost == checked.max_cost == max_batch


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (PNG, "model 'picture': the enclave would refuse it"),
        (models.external_data_model(), "model 'picture': the enclave would refuse it: "),
        (models.custom_domain_model(), "model 'picture': the enclave would refuse it: "),
        (models.string_io_model(), "has type tensor(string), which the wire lacks"),
    ],
)
def test_a_model_the_enclave_would_refuse_stops_start_up(
    files: Files, tmp_path: Path, data: bytes, message: str
) -> None:
    """Before, a PNG given as --upload was found out only by the enclave."""
    status, _, err = _check(files, _config(tmp_path, _model(tmp_path, "picture", data)))
    assert status == EXIT_CONFIG
    assert message in err


def test_request_terms_with_bounds_load(tmp_path: Path) -> None:
    path = _model(tmp_path)
    _write(terms_file_for(path), 'unit = "request"\nmax_batch = 4\n')
    model = read_model_file(path)
    assert model.terms == Terms(unit=Unit.REQUEST, max_batch=4)
    _, pricing = inspect_model(model, lease=1000)
    assert pricing.max_cost == 1


def test_only_the_metadata_the_terms_share_is_sent() -> None:
    """An unlisted key never leaves the custodian in a message: only the shared entries
    are read into the model file, and the ``model_begin`` made from it carries those."""
    data = models.with_metadata(
        models.tiny_model(), {"labels": "cat\ndog\nbird", "owner_notes": "keep me secret"}
    )
    model = ModelFile.from_bytes("tiny", data, Terms(share_metadata=("labels",)))
    checked, _ = inspect_model(model)
    assert checked.metadata == (("labels", "cat\ndog\nbird"),)
    header, payload = ModelBegin(
        name="tiny", size=len(data), sha256=checked.sha256, terms=checked.terms,
        metadata=checked.metadata,
    ).to_wire()  # fmt: skip
    sent = repr(header).encode() + b"".join(bytes(p) for p in payload)
    assert b"keep me secret" not in sent
    assert b"owner_notes" not in sent
    unshared, _ = inspect_model(ModelFile.from_bytes("tiny", data))
    assert unshared.metadata == ()


def test_sharing_a_key_the_model_lacks_stops_start_up() -> None:
    data = models.with_metadata(models.tiny_model(), {"labels": "a"})
    model = ModelFile.from_bytes("tiny", data, Terms(share_metadata=("vocab",)))
    with pytest.raises(ConfigError, match="share metadata 'vocab', which the model does not"):
        inspect_model(model)
    huge = models.with_metadata(models.tiny_model(), {"labels": "x" * (MAX_METADATA_BYTES + 1)})
    model = ModelFile.from_bytes("tiny", huge, Terms(share_metadata=("labels",)))
    with pytest.raises(ConfigError, match="its shared metadata cannot travel"):
        inspect_model(model)
