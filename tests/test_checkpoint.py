from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_run
from vaelab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vaelab.models.build import build_model


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    spec = tiny_run(tmp_path)
    torch.manual_seed(0)
    model = build_model(spec, (1, 28, 28))
    return save_checkpoint(tmp_path / "ckpt", model, spec, "demo", {"test/elbo": 123.0})


def test_round_trip(checkpoint_dir: Path):
    loaded = load_checkpoint(checkpoint_dir)
    torch.manual_seed(0)
    original = build_model(loaded.run_spec, (1, 28, 28))
    for key, value in original.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key])
    assert loaded.metrics == {"test/elbo": 123.0}
    assert not loaded.model.training


class Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vaelab-pwned",))


def test_pickled_code_is_refused(checkpoint_dir: Path):
    torch.save({"x": Payload()}, checkpoint_dir / "model.pt")
    with pytest.raises(CheckpointError, match="cannot load weights safely"):
        load_checkpoint(checkpoint_dir)
    assert not Path("/tmp/vaelab-pwned").exists()


def test_truncated_checkpoint_is_a_clear_error(checkpoint_dir: Path):
    blob = (checkpoint_dir / "model.pt").read_bytes()
    (checkpoint_dir / "model.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="model.pt"):
        load_checkpoint(checkpoint_dir)


def test_weights_that_do_not_match_the_spec(checkpoint_dir: Path):
    text = (checkpoint_dir / "spec.yaml").read_text().replace("z_dim: 4", "z_dim: 5")
    (checkpoint_dir / "spec.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="do not match spec.yaml"):
        load_checkpoint(checkpoint_dir)


def test_missing_parts(checkpoint_dir: Path, tmp_path: Path):
    (checkpoint_dir / "spec.yaml").unlink()
    with pytest.raises(CheckpointError, match="missing spec.yaml"):
        load_checkpoint(checkpoint_dir)
    shutil.rmtree(checkpoint_dir)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(checkpoint_dir)


def test_checkpoints_from_before_conditional_models_still_load(checkpoint_dir: Path):
    state = torch.load(checkpoint_dir / "model.pt", weights_only=True)
    del state["n_classes"]  # what vaelab wrote before model.conditional existed
    torch.save(state, checkpoint_dir / "model.pt")
    assert load_checkpoint(checkpoint_dir).model.num_classes == 0


def test_class_names_that_would_drive_a_terminal_are_not_recorded(tmp_path: Path):
    """Class names come from folder names and dataset columns and are echoed to terminals (`vaelab sample`,
    errors): names with control characters (an escape sequence) are left out; the model takes indices."""
    spec = tiny_run(tmp_path)
    model = build_model(spec, (1, 28, 28))
    plain = save_checkpoint(tmp_path / "plain", model, spec, "demo", {}, run_id="r1", classes=("cat", "dog"))
    assert load_checkpoint(plain).classes == ("cat", "dog")
    hostile = save_checkpoint(tmp_path / "hostile", model, spec, "demo", {}, run_id="r1",
                              classes=("cat", "\x1b]0;owned\x07dog"))
    assert load_checkpoint(hostile).classes == ()
