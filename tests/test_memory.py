"""Memory and cost at real image sizes (issue 25): the pre-flight check estimates every phase on the
meta device and refuses before a weight is built; evaluators and figures hold rows within a byte
budget, with the numbers of small images unchanged; the IWAE cap binds on tiny test sets; figures
are sized for screens, stored once, and a conditional model's samples come a row per class."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_idx_folder, tiny_run
from vaelab import figures, preflight
from vaelab.data import load_data
from vaelab.errors import ConfigError
from vaelab.evaluation.estimators import DRAW_ROWS, importance_weighted_nll, latent_means, split_terms
from vaelab.evaluation.evaluators import EVALUATORS
from vaelab.evaluation.record import Facts, settle
from vaelab.figures import SCREEN_PX, SMALL, THUMBNAIL_PX, figure_passes
from vaelab.models.build import build_model
from vaelab.models.footprint import FLOOR_BYTES, Footprint, attach, footprint, measure
from vaelab.runlog import MemoryRuns
from vaelab.runner import run
from vaelab.spec import RunSpec, with_values

CPU = torch.device("cpu")
GB = 2**30


def spec_for(**sections) -> RunSpec:
    run_spec = RunSpec()
    for name, changes in sections.items():
        run_spec = dataclasses.replace(run_spec, **{name: dataclasses.replace(getattr(run_spec, name), **changes)})
    return run_spec


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


# --- pre-flight ---------------------------------------------------------------------------------


def test_an_oversized_mlp_at_512_px_is_refused_in_seconds_with_nothing_allocated():
    # 512x512 RGB into a 4096-unit layer and back: about 6.4e9 parameters, 26 GB of weights alone.
    huge = spec_for(model={"arch": "mlp", "hidden": (4096,)}, train={"batch_size": 16})
    before, started = _rss(), time.perf_counter()
    with pytest.raises(ConfigError) as err:
        preflight.check([huge], (3, 512, 512), 49, 6, CPU)
    assert time.perf_counter() - started < 20
    assert _rss() - before < 300 * 2**20  # nothing of the model was built
    line = str(err.value)
    assert "\n" not in line
    assert "in training" in line and "model.hidden=[4096]" in line and "train.batch_size=16" in line
    assert "vaelab refuses above 80 % of it" in line and "lower model.hidden" in line


def test_a_run_too_large_for_memory_is_refused_before_its_model_is_built(tmp_path: Path, monkeypatch):
    import vaelab.runner.group as group

    spec = tiny_run(make_idx_folder(tmp_path / "mnist"), model={"arch": "conv"})
    built = []
    monkeypatch.setattr(group, "init_model", lambda *a, **k: built.append(a))  # records, builds nothing
    monkeypatch.setattr(preflight, "available_bytes", lambda device: 64 * 2**20)  # a 64 MB machine
    logs = MemoryRuns(tmp_path / "runs")
    with pytest.raises(ConfigError, match=r"needs about [\d,]+ MB in \w+ .* but cpu has 64 MB available; vaelab "
                                          r"refuses above 80 % of it: lower "):
        run(spec, "refused", logs, show_progress=False)
    assert built == [] and logs.runs == {}  # no model, no run opened


def test_the_training_estimate_uses_the_training_split_when_it_is_smaller_than_a_batch():
    conv = spec_for(model={"arch": "conv"}, train={"batch_size": 128})
    small = preflight.check([conv], (3, 64, 64), 49, 6, CPU)
    exact = preflight.check([with_values(conv, {"train.batch_size": 49})], (3, 64, 64), 49, 6, CPU)
    assert small.activation_mb == pytest.approx(exact.activation_mb)
    stacked = preflight.check([conv] * 3, (3, 64, 64), 49, 6, CPU)  # a stack holds K batches and K models
    assert stacked.activation_mb == pytest.approx(3 * exact.activation_mb)
    assert stacked.phases[0].bytes == pytest.approx(3 * exact.phases[0].bytes)


def test_every_phase_is_in_the_estimate_and_its_line():
    conv = spec_for(model={"arch": "conv"}, loss={"likelihood": "gaussian_learned"}, train={"batch_size": 16})
    flight = preflight.check([conv], (3, 512, 512), 49, 6, CPU, available=64 * GB)
    names = [p.name for p in flight.phases]
    assert names == ["training", "evaluation", "figures"]
    assert flight.phases[1].detail in EVALUATORS
    assert flight.line.startswith(f"pre-flight: peak about {flight.peak_mb / 1024:.1f} GB (")
    assert "training " in flight.line and "evaluation " in flight.line and "figures " in flight.line
    assert flight.line.endswith("parameters") and "of 64.0 GB available on cpu" in flight.line
    # Evaluation and figures hold rows within the budget: their peaks stay near training's, not the 18 GB
    # the unchunked IWAE estimate reached at this size.
    assert flight.peak.bytes < 4 * GB
    off = preflight.check([with_values(conv, {"eval.figures": False, "eval.iw_samples": 0})], (3, 512, 512), 49, 6,
                          CPU, available=64 * GB)
    assert [p.name for p in off.phases] == ["training", "evaluation"] and off.phases[1].detail != "iwae"


def test_a_small_machine_chunks_evaluation_finer_instead_of_refusing():
    """Evaluation's budget shrinks to the room a machine has (its numbers do not depend on the chunks): a
    default conv at 28 px fits 3 GB, and its evaluation stays within what is left beside the process."""
    conv = spec_for(model={"arch": "conv"})
    roomy = preflight.check([conv], (1, 28, 28), 50_000, 10_000, CPU, available=64 * GB)
    small = preflight.check([conv], (1, 28, 28), 50_000, 10_000, CPU, available=3 * GB)
    assert small.footprint.budget < roomy.footprint.budget == FLOOR_BYTES
    assert small.peak_mb * preflight.MB <= preflight.LIMIT * 3 * GB


def test_the_weights_count_four_times_in_training_not_seven():
    """Weights, gradients and Adam's two moments: a weight-heavy model's training is about 4 x its weights
    (not refused at half of what it really needs)."""
    mlp = spec_for(model={"hidden": (4096,)}, train={"batch_size": 2})
    flight = preflight.check([mlp], (3, 64, 64), 1000, 100, CPU, available=64 * GB)
    weights = flight.n_params * 4
    assert 3.9 * weights < flight.phases[0].bytes < 5.2 * weights


def test_the_estimate_is_printed_before_training_and_logged(tmp_path: Path, capsys):
    from vaelab import progress

    spec = tiny_run(make_idx_folder(tmp_path / "mnist"), eval={"figures": False, "iw_samples": 5,
                                                                "tsne_points": 0})
    logs = MemoryRuns(tmp_path / "runs")
    progress.use_bars(False)
    try:
        outcome = run(spec, "said", logs, show_progress=True)
    finally:
        progress.use_bars(True)
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("pre-flight: peak about")]
    assert len(said) == 1 and err.index(said[0]) < err.index("epoch 1")
    assert logs.runs[outcome.run_id].tags["vaelab.preflight"] == said[0]


# --- evaluation within a byte budget -------------------------------------------------------------


def _conv(shape: tuple[int, int, int], **model) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(spec_for(model={"arch": "conv", "z_dim": 4, **model}), shape)


def test_iwae_numbers_do_not_depend_on_how_many_rows_memory_holds():
    model = _conv((1, 28, 28), channels=(8, 16))
    x = torch.rand(40, 1, 28, 28)
    full = importance_weighted_nll(model, x, model.likelihood, 30, torch.Generator().manual_seed(3))
    chunked = importance_weighted_nll(model, x, model.likelihood, 30, torch.Generator().manual_seed(3), budget=7)
    # The same draws, decoded 7 rows at a time instead of 1,200: equal up to float32 sums.
    assert torch.allclose(full, chunked, rtol=1e-6, atol=0)


def _peak_rss_during(fn) -> float:
    """Bytes the process's peak resident set grows by while fn runs (Linux: VmHWM reset first)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = _rss()
    fn()
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
    return peak - before


def test_evaluation_peaks_follow_the_budget_not_the_image_size():
    model = _conv((3, 128, 128))
    x = torch.rand(128, 3, 128, 128)
    rows = measure(model)
    # A budget of 48 MB: 128 px rows are a few MB each, so an estimate holds a handful of them at once.
    attach(model, Footprint(rows, 48 * 2**20))
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        iwae = _peak_rss_during(lambda: importance_weighted_nll(model, x[:24], model.likelihood, 20, generator))
        means = _peak_rss_during(lambda: latent_means(model, x, 1000))
    # Unchunked: 24 images x 20 samples are 480 decoder rows (over 1 GB), and 128 images encoded at once.
    assert iwae < 200 * 2**20, iwae
    assert means < 120 * 2**20, means
    assert footprint(model).rows("decode", DRAW_ROWS) * rows.decode <= 48 * 2**20


def test_small_images_keep_their_batches(tmp_path: Path):
    mlp = build_model(spec_for(model={"z_dim": 4, "hidden": (32,)}), (1, 28, 28))
    conv = _conv((1, 28, 28))
    for model in (mlp, conv):
        found = footprint(model)
        assert found.budget == FLOOR_BYTES
        assert found.rows("forward", 1000) == 1000  # eval.batch_size's 1000 images, as before
        assert found.rows("decode", DRAW_ROWS) == DRAW_ROWS  # the IWAE estimate's 16,384 rows, as before
    data = load_data(tiny_run(make_idx_folder(tmp_path / "mnist")).data, CPU)
    split_terms(mlp, data.test, mlp.likelihood, 1.0, 1000, torch.Generator().manual_seed(0))  # runs as one batch


# --- the IWAE cap on tiny test sets ---------------------------------------------------------------


def _repro(**evals) -> RunSpec:
    """The issue's 512 px run: 49 training and 6 test images, batch 16, 2 epochs, default evaluation."""
    return spec_for(data={"dataset": "image_folder", "image_size": 512, "channels": 3}, model={"arch": "conv"},
                    loss={"likelihood": "gaussian_learned"}, train={"epochs": 2, "batch_size": 16}, eval=evals)


def _settled(run_spec: RunSpec, n_train: int, n_test: int, epochs: int):
    facts = Facts(run_spec, n_train, n_test, epochs, False, figure_passes(run_spec, n_train, n_test, epochs))
    return facts, settle(facts, [(e, e.turned_off(run_spec)) for e in EVALUATORS.values()])


def test_iwae_lowers_k_when_the_test_images_cannot_go_lower():
    facts, rows = _settled(_repro(probe=False), 49, 6, 2)  # the pictures have no labels: no probe
    iwae = next((e, s) for e, s, _ in rows if e.name == "iwae")
    evaluator, settings = iwae
    assert settings["images"] == 6 and settings["k_asked"] == 100 and 2 <= settings["k"] < 100
    assert "lowered from 100" in evaluator.words(settings) and evaluator.suffix(settings) == f"_k{settings['k']}"
    assert "fewer samples each" in evaluator.plan(_repro())
    # The default evaluation as a whole, figures included, costs no more image passes than training.
    spent = sum(e.passes(s) for e, s, _ in rows if s is not None) + facts.spent
    assert spent <= facts.training_passes(2)


def test_iwae_is_skipped_with_its_reason_when_k_would_fall_too_low():
    _, rows = _settled(_repro(), 4, 6, 1)  # 12 training passes cannot buy 6 images x 2 samples
    [(settings, reason)] = [(s, r) for e, s, r in rows if e.name == "iwae"]
    assert settings is None and "below 2" in reason and "eval.iw_capped=false" in reason
    _, uncapped = _settled(_repro(iw_capped=False), 4, 6, 1)
    assert next(s for e, s, _ in uncapped if e.name == "iwae")["k"] == 100  # as asked


def test_the_cost_lists_each_evaluator_the_run_will_run_and_the_figures(tmp_path: Path):
    from vaelab.cost import evaluation_cost, seconds_per_epoch

    folder = tmp_path / "pictures" / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(60):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"im{i:03d}.png")
    spec = with_values(_repro(probe=False), {"data.root": str(tmp_path / "pictures"), "data.image_size": 64,
                                  "data.cache_dir": str(tmp_path / "cache"), "train.device": "cpu"})
    cost = evaluation_cost(spec)
    # Every evaluator the run will run (no probe: turned off), and the figures, are costed.
    assert set(cost.seconds) == {"elbo", "latents", "iwae", "figures"}
    assert seconds_per_epoch(spec) > 0


# --- figures ------------------------------------------------------------------------------------------


def test_grid_figures_fit_a_screen_and_small_images_look_as_before(tmp_path: Path):
    large = _conv((3, 512, 512), channels=(4, 4, 4, 4, 4, 4))
    figures.write_samples(large, large.likelihood, tmp_path / "large.png", n=64)
    pairs = torch.rand(8, 3, 512, 512)
    figures.write_interpolation(large, large.likelihood, pairs, tmp_path / "interpolation.png")
    for name in ("large.png", "interpolation.png"):
        with Image.open(tmp_path / name) as image:
            assert max(image.size) <= SCREEN_PX, (name, image.size)
    small = build_model(spec_for(model={"z_dim": 4, "hidden": (32,)}), (1, 28, 28))
    figures.write_samples(small, small.likelihood, tmp_path / "small.png", n=64)
    with Image.open(tmp_path / "small.png") as image:
        assert image.size == (8 * (56 + 2) + 2,) * 2  # 28 px tiles enlarged to 56, as before


def test_each_figure_is_stored_once_with_a_thumbnail_for_the_compare_view(tmp_path: Path):
    folder = tmp_path / "pictures" / "train"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray((rng.random((128, 128, 3)) * 255).astype(np.uint8)).save(folder / f"im{i:03d}.png")
    spec = spec_for(data={"dataset": "image_folder", "root": str(tmp_path / "pictures"), "image_size": 128,
                          "channels": 3, "cache_dir": str(tmp_path / "cache")},
                    model={"arch": "conv", "z_dim": 4, "channels": (4, 8)},
                    train={"epochs": 10, "batch_size": 32, "device": "cpu", "patience": None},
                    eval={"iw_samples": 0, "tsne_points": 0})
    logs = MemoryRuns(tmp_path / "runs")
    outcome = run(spec, "once", logs, show_progress=False)
    root = logs.runs[outcome.run_id].folder
    with Image.open(root / "figures" / "samples.png") as full, Image.open(root / "samples.png") as thumb:
        assert max(full.size) > THUMBNAIL_PX >= max(thumb.size)
    assert (root / "samples.png").stat().st_size < (root / "figures" / "samples.png").stat().st_size / 2


def test_small_figures_when_the_full_ones_would_cost_more_than_training():
    assert figures.figure_plan(_repro(), 49, 6, 2) == SMALL  # 512 px, 98 training steps
    assert figures.figure_plan(_repro(), 60_000, 10_000, 1) != SMALL  # a real training set


def test_a_conditional_models_samples_come_a_row_per_class(tmp_path: Path):
    model = build_model(spec_for(model={"z_dim": 4, "hidden": (32,), "conditional": True}), (1, 28, 28),
                        n_classes=10)
    footprint(model)  # measured now, on the meta device, before decode is watched
    seen = []
    decode = model.decode
    model.decode = lambda z, y=None: seen.append(y.clone()) or decode(z, y)  # records the labels asked for
    names = tuple(f"class {c}" for c in range(10))
    figures.write_samples(model, model.likelihood, tmp_path / "rows.png", n=60, class_names=names)
    assert torch.equal(torch.cat(seen), torch.arange(10).repeat_interleave(6))  # 6 of each class, row by row
    with Image.open(tmp_path / "rows.png") as image:
        width, height = image.size
    assert width > 6 * 58 and height >= 10 * 58  # the labels' margin beside 10 rows of 6 tiles
    seen.clear()
    figures.write_samples(model, model.likelihood, tmp_path / "three.png", n=16, seed=0, label=3)
    assert torch.equal(torch.cat(seen), torch.full((16,), 3))
    with pytest.raises(Exception, match="has 10 classes"):
        figures.write_samples(model, model.likelihood, tmp_path / "x.png", label=12)


def test_class_names_are_drawn_as_written_not_as_formulas(tmp_path: Path):
    """Class names are a user's text (folder names, a dataset's column): `$\\frac{1}$` is a name, not mathtext
    that fails to parse and takes the figure (and `vaelab sample`) down with it."""
    model = build_model(spec_for(model={"z_dim": 2, "hidden": (16,), "conditional": True}), (1, 28, 28),
                        n_classes=3)
    names = ("$\\frac{1}$", "cost $5 and $6", "plain")
    assert figures.write_samples(model, model.likelihood, tmp_path / "rows.png", n=6, class_names=names).is_file()
    figures.write_tsne(torch.randn(30, 2), torch.arange(30) % 3, tmp_path / "tsne.png", class_names=names)
    assert (tmp_path / "tsne.png").is_file()
