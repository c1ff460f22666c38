"""Stacked training (several runs as one model) against single runs of the same
configurations, with real data; the sweep through real MLflow stores and a real Optuna journal."""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from tests.conftest import tiny_run
from tests.test_sweep import child_runs, make_sweep, run_whole_sweep, write_spec
from vaelab.checks import SpecError
from vaelab.data import load_data
from vaelab.runlog import MemoryRuns
from vaelab.runner import run as run_single
from vaelab.runner import run_stack
from vaelab.search import parse_search
from vaelab.spec import RunSpec, with_values
from vaelab.training import NonFiniteLossError, StackedAdam, fit, fit_stack, init_model, stack_blocker

CPU = torch.device("cpu")
MEMBERS = [{"loss.beta": 1.0, "train.seed": 1, "train.lr": 1e-3},
           {"loss.beta": 4.0, "train.seed": 2, "train.lr": 3e-3},
           {"loss.beta": 0.5, "train.seed": 3, "train.lr": 1e-3}]


def _members(base: RunSpec) -> list[RunSpec]:
    return [with_values(base, values) for values in MEMBERS]


def _single(run: RunSpec, data):
    model = init_model(run, data.shape, CPU)
    return model, fit(run, model, data, show_progress=False)


def _assert_follows_single(stacked_model, stacked_result, single_model, single_result):
    assert stacked_result.best_epoch == single_result.best_epoch
    assert stacked_result.stopped_early == single_result.stopped_early
    assert len(stacked_result.history) == len(single_result.history)
    for mine, theirs in zip(stacked_result.history, single_result.history, strict=True):
        for key in ("train/loss", "train/kl", "val/loss", "val/elbo", "val/mse"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-3), key
    # Weights agree to a few Adam steps (1e-3 each): Adam divides by the gradient's scale, so a
    # rounding-level gradient can become a full step. Another member's or seed's weights differ by ~0.05.
    for (name, a), b in zip(stacked_model.state_dict().items(), single_model.state_dict().values(), strict=True):
        assert (a.float() - b.float()).abs().max() < 1e-2, name


@pytest.mark.parametrize("sections", [
    {},
    {"model": {"arch": "conv", "z_dim": 4, "channels": (8, 16), "hidden": (32,)},
     "data": {"binarize": "dynamic", "augment": True}},
    {"loss": {"kl_schedule": "linear", "warmup_epochs": 2.0, "free_bits": 0.1}},
    {"train": {"compile": True}},
], ids=["mlp", "conv-binarized-augmented", "warmup-free-bits", "compiled"])
def test_stacked_members_follow_their_single_runs(mnist_root: Path, sections):
    base = tiny_run(mnist_root, train={"epochs": 3, "batch_size": 64, "device": "cpu", "patience": 1})
    for name, changes in sections.items():
        base = dataclasses.replace(base, **{name: dataclasses.replace(getattr(base, name), **changes)})
    runs = _members(base)
    data = load_data(base.data, CPU)
    singles = [_single(r, data) for r in runs]
    models = [init_model(r, data.shape, CPU) for r in runs]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # with train.compile, a fallback to eager fails the test
        results = fit_stack(runs, models, data, show_progress=False)
    for model, member, (single_model, single_result) in zip(models, results, singles, strict=True):
        assert member.error is None
        _assert_follows_single(model, member.result, single_model, single_result)


def test_a_diverging_member_fails_alone(mnist_root: Path):
    runs = _members(tiny_run(mnist_root))
    data = load_data(runs[0].data, CPU)
    models = [init_model(r, data.shape, CPU) for r in runs]
    with torch.no_grad():  # poison the middle member: its NaNs must not reach the others
        next(models[1].parameters()).fill_(float("nan"))
    results = fit_stack(runs, models, data, show_progress=False)
    assert isinstance(results[1].error, NonFiniteLossError)
    assert results[1].result.history == []
    for i in (0, 2):
        assert results[i].error is None
        _assert_follows_single(models[i], results[i].result, *_single(runs[i], data))


def test_stacks_refuse_runs_that_differ_in_more_than_beta_seed_and_lr(mnist_root: Path):
    base = tiny_run(mnist_root)
    other = with_values(base, {"model.z_dim": 8})
    data = load_data(base.data, CPU)
    models = [init_model(r, data.shape, CPU) for r in (base, other)]
    with pytest.raises(ValueError, match="differ only in loss.beta, train.seed, train.lr"):
        fit_stack([base, other], models, data, show_progress=False)
    assert stack_blocker(with_values(base, {"loss.likelihood": "gaussian_learned"}))
    assert stack_blocker(with_values(base, {"train.figure_every": 1}))
    assert stack_blocker(base) is None


def test_stacked_adam_is_adam_per_member():
    torch.manual_seed(0)
    singles = [torch.randn(5, 3, requires_grad=True) for _ in range(2)]
    stacked = torch.stack([s.detach().clone() for s in singles]).requires_grad_()
    lrs = [1e-3, 5e-2]
    reference = [torch.optim.Adam([s], lr=lr) for s, lr in zip(singles, lrs, strict=True)]
    mine = StackedAdam([stacked], torch.tensor(lrs))
    for _ in range(20):
        grads = [torch.randn(5, 3) for _ in singles]
        for s, g, opt in zip(singles, grads, reference, strict=True):
            s.grad = g.clone()
            opt.step()
        stacked.grad = torch.stack(grads)
        mine.step()
    for i, s in enumerate(singles):
        assert torch.allclose(stacked[i], s, atol=1e-6)


def test_run_stack_records_one_complete_run_per_member(mnist_root: Path, tmp_path: Path):
    base = tiny_run(mnist_root, eval={"batch_size": 500, "tsne_points": 40, "iw_samples": 5})
    runs = _members(base)[:2]
    logs = MemoryRuns(tmp_path / "runs")  # what each member records; the MLflow run log is test_runlog's
    outcomes = run_stack(runs, "stacked", logs, show_progress=False)
    single = run_single(runs[1], "single", logs, show_progress=False)
    for run, outcome in zip(runs, outcomes, strict=True):
        record = logs.runs[outcome.run_id]
        assert record.status == "FINISHED"
        assert record.params["loss.beta"] == str(run.loss.beta)
        assert record.tags["vaelab.stacked"] == "2"
        assert len(record.history("val/loss")) == outcome.epochs_run
        figures = {p.name for p in (record.folder / "figures").iterdir()}
        assert {"reconstructions.png", "samples.png", "tsne.png"} <= figures
        assert (outcome.checkpoint_dir / "model.pt").is_file()
    # The stacked member and the single run of the same configuration agree on the test split.
    for key in ("test/elbo", "test/recon", "test/kl"):
        assert outcomes[1].metrics[key] == pytest.approx(single.metrics[key], rel=1e-3), key


def test_stacked_sweep_runs_each_point_once_in_stacks(tmp_path: Path, mnist_root: Path):
    grid = {"kind": "grid", "params": {"loss.beta": [0.5, 2.0], "model.z_dim": [2, 3]}, "seeds": [0, 1],
            "stack": 3}
    path = write_spec(tmp_path, mnist_root, grid)
    sweep, parent = run_whole_sweep(tmp_path, path, 8)
    children, _ = child_runs(tmp_path, "sweep_demo")
    # z_dim splits the grid into two groups of 4; stacks of at most 3 make 3 + 1 per group.
    sizes = Counter((r.data.params["model.z_dim"], r.data.tags.get("vaelab.stacked", "1")) for r in children)
    assert sizes == Counter({("2", "3"): 3, ("2", "1"): 1, ("3", "3"): 3, ("3", "1"): 1})
    for trial in sweep.trials():
        assert trial.state == TrialState.COMPLETE
        run = next(r for r in children if r.info.run_id == trial.user_attrs["mlflow_run_id"])
        assert trial.value == pytest.approx(run.data.metrics["best/val/loss"])
    assert make_sweep(tmp_path, path).work(parent) == 0


def test_search_stack_is_validated():
    with pytest.raises(SpecError, match="search.stack"):
        parse_search({"kind": "grid", "params": {"loss.beta": [1.0]}, "stack": 0}, RunSpec())
    with pytest.raises(SpecError, match="search.stack"):
        parse_search({"kind": "optuna", "n_trials": 2, "params": {"loss.beta": {"low": 0.1, "high": 1}},
                      "stack": 4}, RunSpec())
