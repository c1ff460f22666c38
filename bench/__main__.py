"""`make bench`: vaelab against the canonical PyTorch VAE example, measured side
by side in one process (epochs interleaved, so drift in machine speed hits both),
and written to bench/RESULTS.md.

Workloads: one epoch on CPU (and on CUDA when there is a GPU), a stacked
beta sweep in model-epochs per second, IWAE throughput, data resident and streamed,
dSprites epochs per objective and the disentanglement metrics' cost, and the share
of a 10-epoch tracked run spent on tracking and figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench import data as data_bench
from bench import disentanglement as dis_bench
from bench.baseline import Baseline, torchvision_root
from vaelab.data import ImageData, Split, load_data
from vaelab.data.store import ResidentImages
from vaelab.runner import run as tracked_run
from vaelab.spec import RunSpec, load_spec, with_values
from vaelab.tracking import Tracker
from vaelab.training import fit, fit_stack, init_model

REPO = Path(__file__).resolve().parent.parent
SPEC = REPO / "experiments" / "examples_baseline.yaml"
FASHION = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Settings:
    reps: int  # timed epochs per side
    n_train: int | None  # None: all 60,000 training images
    n_test: int | None
    sweep_configs: int
    sweep_epochs: int
    tracked_epochs: int
    iw_samples: int
    iw_k: int = 1000
    iw_images: int = 64
    data_root: Path = FASHION


FULL = Settings(reps=5, n_train=None, n_test=None, sweep_configs=32, sweep_epochs=2, tracked_epochs=10,
                iw_samples=100)
QUICK = Settings(reps=2, n_train=2048, n_test=512, sweep_configs=4, sweep_epochs=2, tracked_epochs=2,
                 iw_samples=10, iw_k=20, iw_images=8)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _run_spec(device: torch.device, settings: Settings, overrides: list[str]) -> RunSpec:
    fixed = [f"train.device={device.type}", "train.patience=null", f"data.root={settings.data_root}"]
    return load_spec(SPEC, [*fixed, *overrides]).base


def _baseline_images(run: RunSpec, device: torch.device, settings: Settings) -> ImageData:
    """vaelab's own loader, re-cut to the baseline's images: the whole official
    training split to train on, the test split for the per-epoch evaluation."""
    data = load_data(run.data, device)
    every = slice(None)
    train = Split(ResidentImages(torch.cat([data.train.x.raw(every), data.val.x.raw(every)])[: settings.n_train]),
                  torch.cat([data.train.y, data.val.y])[: settings.n_train])
    test = Split(data.test.x.first(settings.n_test or len(data.test)), data.test.y[: settings.n_test])
    return ImageData(train=train, val=test, test=test, shape=data.shape, class_names=data.class_names,
                     description=data.description)


def epoch_rows(device: torch.device, settings: Settings, root: Path, variants: list[tuple[str, list[str]]]):
    """Per variant: both sides train `reps` epochs; after each vaelab epoch (train
    pass + evaluation pass) the baseline runs one, so both see the same machine."""
    rows = []
    for label, overrides in variants:
        run = _run_spec(device, settings, [f"train.epochs={settings.reps}", *overrides])
        data = _baseline_images(run, device, settings)
        baseline = Baseline(root, device, seed=run.train.seed, n_train=settings.n_train, n_test=settings.n_test)
        model = init_model(run, data.shape, device)
        ours, theirs, their_loss = [], [], []
        mark = [_now(device)]

        def interleave(_epoch: int, _metrics: dict, mark=mark, ours=ours, theirs=theirs, their_loss=their_loss,
                       baseline=baseline) -> None:
            ours.append(_now(device) - mark[0])
            # The example as written: vaelab's fit flushes subnormals to zero for the process; not here.
            torch.set_flush_denormal(False)
            seconds, loss = baseline.epoch()
            torch.set_flush_denormal(True)
            theirs.append(seconds)
            their_loss.append(loss)
            mark[0] = _now(device)

        result = fit(run, model, data, callbacks=[interleave], show_progress=False)
        mine, base = statistics.median(ours), statistics.median(theirs)
        rows.append({"device": device.type, "vaelab": label, "vaelab s/epoch": mine, "baseline s/epoch": base,
                     "speed-up": base / mine, "vaelab test -ELBO": result.history[-1]["val/elbo"],
                     "baseline test -ELBO": their_loss[-1], "epochs": settings.reps})
        print(f"  epoch, {device.type}, {label}: vaelab {mine:.3f} s, baseline {base:.3f} s "
              f"({base / mine:.1f}x)", flush=True)
    return rows


def sweep_row(device: torch.device, settings: Settings, baseline_s: float, single_s: float,
              overrides: list[str]) -> dict:
    """`sweep_configs` betas trained as one stack; the baseline runs them one after another.
    The rate is that of the stack's last epoch (the first one also pays for compiling)."""
    run = _run_spec(device, settings, [f"train.epochs={settings.sweep_epochs}", *overrides])
    betas = np.geomspace(0.1, 10.0, settings.sweep_configs)
    runs = [with_values(run, {"loss.beta": float(b)}) for b in betas]
    data = _baseline_images(run, device, settings)
    models = [init_model(r, data.shape, device) for r in runs]
    stamps = [_now(device)]
    callbacks = [[lambda _e, _m: stamps.append(_now(device))]] + [[] for _ in runs[1:]]
    members = fit_stack(runs, models, data, callbacks=callbacks, show_progress=False)
    failed = [m.error for m in members if m.error is not None]
    if failed:
        raise RuntimeError(f"a stacked member failed: {failed[0]}")
    rate = len(runs) / (stamps[-1] - stamps[-2])
    label = " ".join(overrides) or "default"
    print(f"  sweep, {device.type}, {label}: {len(runs)} stacked, {rate:.2f} model-epochs/s", flush=True)
    return {"device": device.type, "settings": label, "configs": len(runs), "epochs": settings.sweep_epochs,
            "first epoch s": stamps[1] - stamps[0], "last epoch s": stamps[-1] - stamps[-2],
            "stacked model-epochs/s": rate, "vaelab one at a time": 1 / single_s,
            "baseline one at a time": 1 / baseline_s, "vs baseline": rate * baseline_s,
            "vs vaelab one at a time": rate * single_s}


def tracking_row(settings: Settings, system_metrics: bool = True) -> dict:
    """A `vaelab train`-path run into a fresh SQLite store, split into where its time went."""
    overrides = [f"train.epochs={settings.tracked_epochs}", f"eval.iw_samples={settings.iw_samples}",
                 f"train.system_metrics={'true' if system_metrics else 'false'}"]
    if settings.n_train is not None:
        overrides.append(f"data.subset={settings.n_train}")
    run = _run_spec(torch.device("cpu"), settings, overrides)
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-") as tmp:
        tracker = Tracker(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
        started = time.perf_counter()
        outcome = tracked_run(run, "bench", tracker, show_progress=False)
        total = time.perf_counter() - started
    m = outcome.metrics
    # Tracking = MLflow writes (run, params, per-epoch metrics, LoggedModel) + checkpoint and its upload.
    # Figure drawing is reported beside it: it is a run's output, switched off by eval.figures=false.
    tracking = m["time/tracking_s"] + m["time/upload_s"]
    print(f"  tracking: {tracking:.2f} s, figures {m['time/figures_s']:.2f} s of {total:.1f} s", flush=True)
    return {"system metrics": "on (every 10 s)" if system_metrics else "off",
            "epochs": settings.tracked_epochs, "run wall s": total, "train s": m["time/train_s"],
            "test eval s": m["time/eval_s"], "MLflow writes s": m["time/tracking_s"],
            "checkpoint+upload s": m["time/upload_s"], "figures s": m["time/figures_s"],
            "tracking share": tracking / total,
            "figures share": m["time/figures_s"] / total}


READING = """## Reading the numbers

- The speed-up column compares wall time per epoch on the same machine in the same
  process; both sides train on the same 60,000 images and evaluate 10,000 per epoch.
  On a shared machine absolute seconds drift between runs (here by 10-20%); the ratios,
  measured side by side, move less.
- On a CPU, vaelab's epoch is bound by five 128x784x400 matrix products per step; the
  rest (fused Adam, the loss, indexing) is what remains to shave. The baseline's extra
  cost is mostly its DataLoader (`ToTensor` per image) and per-step host syncs.
- A stack is worth most where one small model leaves the device idle (a GPU); on two
  CPU cores the stack's batched matmuls are as compute-bound as one model's.
"""


def iwae_rows(device: torch.device, settings: Settings) -> list[dict]:
    """Test images per second of the importance-weighted NLL at k = 1000 (the literature's heavy
    evaluation), for the MLP and the conv decoder, on untrained weights (the cost does not depend on them)."""
    from vaelab.evaluation.estimators import importance_weighted_nll

    rows = []
    for arch, likelihood in (("mlp", "bernoulli"), ("conv", "gaussian")):
        run = _run_spec(device, settings, [f"model.arch={arch}", f"loss.likelihood={likelihood}"])
        model = init_model(run, (1, 28, 28), device).eval()
        x = torch.rand(settings.iw_images, 1, 28, 28, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        importance_weighted_nll(model, x[:2], model.likelihood, settings.iw_k, generator)  # warm-up
        started = _now(device)
        importance_weighted_nll(model, x, model.likelihood, settings.iw_k, generator)
        seconds = _now(device) - started
        rows.append({"device": device.type, "decoder": f"{arch} ({likelihood})", "k": settings.iw_k,
                     "test images/s": len(x) / seconds, "decoder passes/s": len(x) * settings.iw_k / seconds,
                     "10,000 test images (min)": 10_000 / (len(x) / seconds) / 60})
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _table(rows: list[dict]) -> str:
    return pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g")


def _data_lines(data: tuple[dict, list[dict]] | None, settings: data_bench.DataSettings) -> list[str]:
    if data is None:
        return []
    decode, sides = data
    return [
        "## Data: resident and streamed",
        "",
        f"A generated folder of {decode['images']} RGB pictures (160x128 PNG and JPEG, decoded to "
        f"{data_bench.SIZE}x{data_bench.SIZE}) is decoded into vaelab's uint8 cache from cold, "
        f"{decode['workers']} processes: **{decode['images/s']:.0f} images/s** ({decode['seconds']:.1f} s). "
        f"Then an MLP VAE trains {settings.epochs} epochs on it in a process of its own: with the images "
        f"resident, and with data.memory_budget = {settings.budget_mb} MB, smaller than the images, so "
        "`data.storage: auto` streams them from the cache. s/epoch is the median epoch of a process, the "
        f"faster of {settings.processes} processes per side, run alternately. RSS held by the data = the "
        "process's resident memory after loading the data less before; peak RSS while training includes "
        "torch, the model, its optimiser and its batches (the two rows differ by what resident images cost).",
        "",
        _table(sides),
        "",
    ]


def write_results(path: Path, settings: Settings, epochs: list[dict], sweeps: list[dict], tracking: list[dict] | None,
                  command: str, iwae: list[dict] | None = None, data: tuple[dict, list[dict]] | None = None,
                  data_settings: data_bench.DataSettings = data_bench.FULL,
                  disentanglement: list[str] | None = None) -> None:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines = [
        "# vaelab benchmark results",
        "",
        f"- Command: `{command}` ({datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, commit {_commit()})",
        f"- Machine: {_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), GPU: {gpu}",
        "- Model on both sides: MLP 784-400-20, Bernoulli/BCE, beta 1, batch 128, Adam 1e-3, Fashion-MNIST.",
        f"- Data: {settings.n_train or 60000} training images per epoch, then a pass over "
        f"{settings.n_test or 10000} test images (both sides).",
        "- Baseline: the canonical PyTorch VAE example's way (torchvision dataset + `ToTensor` + DataLoader, "
        "eager loop, one `.item()` per step), in `bench/baseline.py`.",
        "",
        "## One epoch",
        "",
        f"Median of {settings.reps} epochs per side; the sides alternate epoch by epoch. Test -ELBO (nats per "
        "image, lower is better) after the last epoch shows both reach the same quality.",
        "",
        _table(epochs),
        "",
        "## Sweep throughput",
        "",
        f"{settings.sweep_configs} beta values (0.1 to 10, geometric) trained as one stacked model "
        "(`search.stack`) for two epochs, against running one configuration after another (1 / seconds per "
        "epoch of the matching row above). Model-epochs per second of the stack's second epoch (the first "
        "also compiles), higher is better.",
        "",
        _table(sweeps),
        "",
    ]
    if iwae:
        lines += [
            "## IWAE evaluation throughput",
            "",
            f"`importance_weighted_nll` at k = {settings.iw_k} over {settings.iw_images} test-sized images "
            "(inference mode, decoder batches of 16,384 rows, no host sync inside), untrained weights. The last "
            "column is what the whole test split would take: why the default evaluation uses k = 100 on 1000 "
            "seeded test images, and `vaelab evaluate` is there for the heavy numbers.",
            "",
            _table(iwae),
            "",
        ]
    lines += _data_lines(data, data_settings)
    lines += disentanglement or []
    if tracking is not None:
        lines += [
            "## Tracking and figures overhead",
            "",
            f"`examples_baseline` for {settings.tracked_epochs} epochs through the `vaelab train` code path "
            f"(eval.iw_samples={settings.iw_samples}) into a fresh SQLite MLflow store, as logged by the run "
            "itself. Tracking = MLflow writes (run, params, per-epoch metrics, the LoggedModel: time/tracking_s) "
            "+ writing the checkpoint and uploading it with the figures (time/upload_s); its share of the whole "
            "run is what the 5 % tracking budget is about. Drawing the figures (time/figures_s) is shown beside "
            "it: it is the run's output, not its bookkeeping, and `eval.figures: false` switches it off.",
            "",
            "The two rows differ only in `train.system_metrics` (MLflow's sampler of CPU, memory and, through "
            "NVML, GPU): its cost is the difference in train seconds.",
            "",
            _table(tracking),
            "",
        ]
    path.write_text("\n".join(lines) + "\n" + READING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the bench runs, not speed")
    parser.add_argument("--devices", default="auto", help="cpu, cuda, or auto (cpu, plus cuda when present)")
    parser.add_argument("--data", type=Path, default=FASHION, help="folder with the Fashion-MNIST IDX files")
    args = parser.parse_args(argv)
    settings = dataclasses.replace(QUICK if args.quick else FULL, data_root=args.data)
    if args.devices == "auto":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = args.devices.split(",")
    if "cuda" in devices and not torch.cuda.is_available():
        print("bench: --devices asks for cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if not any((args.data / f"train-images-idx3-ubyte{ext}").exists() for ext in ("", ".gz")):
        print(f"bench: no Fashion-MNIST IDX files in {args.data} (apt-get install dataset-fashion-mnist)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-tv-") as tv:
        root = torchvision_root(args.data, Path(tv))
        epochs, sweeps, iwae = [], [], []
        for name in devices:
            device = torch.device(name)
            iwae += iwae_rows(device, settings)
            variants = [("default (fp32)", []), ("train.compile=true", ["train.compile=true"]),
                        ("train.precision=bf16", ["train.precision=bf16"]),
                        ("compile + bf16", ["train.compile=true", "train.precision=bf16"])]
            rows = epoch_rows(device, settings, root, variants)
            epochs += rows
            # The stack as it comes, and with its step compiled (CUDA graphs on a GPU) in bf16.
            fast = ["train.compile=true", "train.precision=bf16"]
            for overrides, row in (([], rows[0]), (fast, rows[-1])):
                sweeps.append(sweep_row(device, settings, row["baseline s/epoch"], row["vaelab s/epoch"],
                                        overrides))
    dis_settings = dis_bench.QUICK if args.quick else dis_bench.FULL
    dis_epochs, dis_metrics = [], []
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-grid-") as grid:
        cache = None if args.quick else Path(grid)  # the full grid is 3 GB: quick mode renders on demand
        for name in devices:
            dis_epochs += dis_bench.epoch_rows(torch.device(name), dis_settings)
            dis_metrics += dis_bench.metric_rows(torch.device(name), dis_settings, cache)
    dis_lines = dis_bench.lines(dis_epochs, dis_bench.render_rate(dis_settings), dis_metrics, dis_settings, _table)
    # System metrics sample in a thread beside training: their cost shows in the train seconds, on against off.
    tracking = [tracking_row(settings, system_metrics=True), tracking_row(settings, system_metrics=False)]
    data_settings = data_bench.QUICK if args.quick else data_bench.FULL
    with tempfile.TemporaryDirectory(prefix="vaelab-bench-data-") as tmp:
        data = data_bench.data_rows(data_settings, Path(tmp), devices[-1])
    command = "make bench" if not argv else "python -m bench " + " ".join(argv)
    write_results(args.out, settings, epochs, sweeps, tracking, command, iwae, data, data_settings, dis_lines)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
