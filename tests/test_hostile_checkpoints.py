"""Checkpoint folders that lie or are broken: copied folders with other weights, malformed run.json and
metrics.json, a spec.yaml that does not fit the weights, pickled files. Each is one line and exit 2, and
nothing is written into the run the folder names. Real runs in a real SQLite MLflow store."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import make_idx_folder, run_vaelab, tiny_run
from vaelab.checkpoint import load_checkpoint, save_checkpoint
from vaelab.cli import main
from vaelab.errors import CheckpointError
from vaelab.models.build import build_model
from vaelab.registry import image_shape
from vaelab.runner import run
from vaelab.spec import load_spec
from vaelab.tracking import Tracker

DIGEST_TAG = "vaelab.checkpoint.sha256"
NOT_FINITE_TAG = "vaelab.eval.not_finite"
IWAE_SMALL = ["--set", "eval.iw_samples=3", "--set", "eval.iw_images=50"]


@dataclass
class Logged:
    uri: str
    run_id: str
    checkpoint: Path  # the run's own checkpoint folder (its artifact), never modified by a test


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Logged:
    root = tmp_path_factory.mktemp("hostile")
    spec = tiny_run(make_idx_folder(root / "mnist-files"),
                    eval={"batch_size": 500, "tsne_points": 0, "iw_samples": 5, "figures": False})
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    outcome = run(spec, "hostile", Tracker(uri), show_progress=False)
    assert outcome.checkpoint_dir is not None
    return Logged(uri, outcome.run_id, outcome.checkpoint_dir)


@pytest.fixture
def copied(logged: Logged, tmp_path: Path) -> Path:
    """A copy of the run's checkpoint folder: its run.json still names the run."""
    return Path(shutil.copytree(logged.checkpoint, tmp_path / "copy"))


def _recorded(logged: Logged):
    data = MlflowClient(logged.uri).get_run(logged.run_id).data
    return dict(data.metrics), dict(data.tags)


def _evaluate(logged: Logged, target: Path | str, *extra: str) -> int:
    return main(["evaluate", str(target), *IWAE_SMALL, "--metrics", "iwae", "--tracking-uri", logged.uri,
                 "--no-progress", *extra])


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1 and err[0].startswith("vaelab: error: "), err
    return err[0]


def _other_weights(folder: Path) -> None:
    state = torch.load(folder / "model.pt", weights_only=True)
    generator = torch.Generator().manual_seed(1)
    torch.save({k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() else v)
                for k, v in state.items()}, folder / "model.pt")


def test_a_run_records_the_digest_of_the_weights_it_logged(logged: Logged, copied: Path):
    _, tags = _recorded(logged)
    on_disk = json.loads((logged.checkpoint / "run.json").read_text())["weights_sha256"]
    assert tags[DIGEST_TAG] == on_disk == load_checkpoint(logged.checkpoint).digest
    _other_weights(copied)
    assert load_checkpoint(copied).digest != tags[DIGEST_TAG]


def test_a_copied_folder_with_other_weights_is_refused_and_the_run_is_unchanged(logged: Logged, copied: Path,
                                                                                   capsys):
    _other_weights(copied)
    before = _recorded(logged)
    assert _evaluate(logged, copied) == 2
    line = _one_error_line(capsys)
    assert f"are not those run {logged.run_id} logged" in line and "nothing was written" in line
    assert len(re.findall(r"sha256 [0-9a-f]{16}", line)) == 2  # both digests named
    assert _recorded(logged) == before
    # The run's own weights, copied anywhere, still evaluate into it.
    shutil.copyfile(logged.checkpoint / "model.pt", copied / "model.pt")
    assert _evaluate(logged, copied, "--set", "eval.iw_samples=2") == 0
    assert "test/nll_iw_k2_n50" in _recorded(logged)[0]


def test_a_run_logged_before_digests_is_checked_against_its_own_artifact(logged: Logged, copied: Path, capsys):
    client = MlflowClient(logged.uri)
    digest = client.get_run(logged.run_id).data.tags[DIGEST_TAG]
    client.delete_tag(logged.run_id, DIGEST_TAG)  # as a run from before this check was made
    try:
        _other_weights(copied)
        before = _recorded(logged)
        assert _evaluate(logged, copied) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and "warning: run" in err[0] and "records no checkpoint digest" in err[0], err
        assert "its checkpoint artifact" in err[1] and "are not those run" in err[1]
        assert _recorded(logged) == before
    finally:
        client.set_tag(logged.run_id, DIGEST_TAG, digest)


def test_a_non_finite_metric_is_not_logged_and_the_reason_is_recorded(logged: Logged, tmp_path: Path, capsys):
    """A finished run whose own logged weights give NaN: `vaelab evaluate` on it by its run id."""
    spec = load_spec(logged.checkpoint / "spec.yaml").base
    model = build_model(spec, image_shape(spec.data))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    tracker = Tracker(logged.uri)
    tracked = tracker.open_run("hostile", "nan-weights")
    save_checkpoint(tmp_path / "up" / "checkpoint", model, spec, "hostile", {}, run_id=tracked.run_id)
    tracked.log_artifacts(tmp_path / "up")
    tracked.end()
    assert main(["evaluate", tracked.run_id, *IWAE_SMALL, "--metrics", "elbo,iwae", "--tracking-uri", logged.uri,
                 "--no-progress"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "not finite" in line]
    assert len(err) == 1 and "test/nll_iw_k3_n50 = nan" in err[0], err
    data = MlflowClient(logged.uri).get_run(tracked.run_id).data
    assert not [k for k in data.metrics if k.startswith("test/")], data.metrics  # every test/ value was NaN
    assert "time/eval/iwae_k3_n50_s" in data.metrics  # what was finite is still logged
    assert "test/nll_iw_k3_n50 = nan (iwae)" in data.tags[NOT_FINITE_TAG]
    assert "test/elbo = nan (elbo)" in data.tags[NOT_FINITE_TAG]


@pytest.mark.parametrize("name, content, says", [
    ("run.json", "{not json", "run.json: not JSON"),
    ("run.json", "[]", "run.json: expected a JSON object, got a list"),
    ("run.json", '"x"', "run.json: expected a JSON object, got a string"),
    ("run.json", '{"run_id": 5}', "run.json: run_id: expected the MLflow run id as a string, got a number"),
    ("run.json", '{"experiment": "e"}', "run.json: run_id: expected the MLflow run id as a string, got null"),
    ("run.json", b"\xff\xfe\x00", "run.json: not JSON (not UTF-8 text)"),
    ("metrics.json", "", "metrics.json: not JSON"),
    ("metrics.json", "[1, 2]", "metrics.json: expected a JSON object, got a list"),
    ("metrics.json", '{"test/elbo": {"a": 1}}', "metrics.json: test/elbo: expected a number, got an object"),
])
def test_malformed_json_in_a_checkpoint_is_one_line(logged: Logged, copied: Path, capsys, name, content, says):
    path = copied / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    before = _recorded(logged)
    assert _evaluate(logged, copied) == 2
    assert says in _one_error_line(capsys)
    assert _recorded(logged) == before




def test_the_cli_says_a_malformed_run_json_in_one_line_without_a_traceback(copied: Path, tmp_path: Path):
    (copied / "run.json").write_text("[]")
    done = run_vaelab(tmp_path, "sample", str(copied), "--n", "4", "--out", str(tmp_path / "s.png"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"vaelab: error: {copied / 'run.json'}: expected a JSON object, "
                                                "got a list"]


def test_a_spec_that_does_not_fit_names_the_tensor_and_both_shapes(copied: Path):
    text = (copied / "spec.yaml").read_text()
    z_dim = load_spec(copied / "spec.yaml").base.model.z_dim
    (copied / "spec.yaml").write_text(text.replace(f"z_dim: {z_dim}", f"z_dim: {z_dim + 1}"))
    with pytest.raises(CheckpointError, match="do not match spec.yaml") as caught:
        load_checkpoint(copied)
    found = re.search(r"(\S+) is (\[[\d, ]*\]) in model.pt but (\[[\d, ]*\]) for spec.yaml", str(caught.value))
    assert found, caught.value
    key, in_file, for_spec = found.groups()
    state = torch.load(copied / "model.pt", weights_only=True)
    spec = load_spec(copied / "spec.yaml").base
    wanted = build_model(spec, image_shape(spec.data)).state_dict()
    assert json.loads(in_file) == list(state[key].shape) and json.loads(for_spec) == list(wanted[key].shape)
    assert in_file != for_spec


def test_missing_and_unexpected_tensors_are_named_and_counted(copied: Path):
    state = torch.load(copied / "model.pt", weights_only=True)
    gone = sorted(k for k in state if k.endswith(".bias"))
    for key in gone:
        del state[key]
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, copied / "model.pt")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(copied)
    message = str(caught.value)
    assert f"{len(gone)} missing (first: " in message and "1 unexpected (first: extra.weight)" in message
    assert any(f"(first: {key})" in message for key in gone)
    assert "\n" not in message


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vaelab-hostile-pwned",))


@pytest.mark.parametrize("write", [
    lambda path: torch.save({"x": Payload()}, path),
    lambda path: path.write_bytes(pickle.dumps({"x": Payload()})),
])
def test_a_pickled_checkpoint_is_refused_without_torch_inviting_weights_only_false(copied: Path, write, capsys):
    write(copied / "model.pt")
    assert main(["sample", str(copied), "--n", "4", "--out", str(copied / "s.png")]) == 2
    line = _one_error_line(capsys)
    assert "not a weights-only state dict" in line and "vaelab never unpickles" in line
    assert "weights_only" not in line and "False" not in line
    assert not Path("/tmp/vaelab-hostile-pwned").exists()
