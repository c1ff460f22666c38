"""The GPU path: each fast path on CUDA against its eager fp32 twin on the same GPU,
with the same seeds — train.compile (CUDA graphs), bf16, stacked training (vmap), a conv
model at 64 px, IWAE on CUDA against the CPU, streaming from the disk cache through
pinned memory, resume after a SIGKILL, and two sweep workers sharing one GPU. Real
files, real MLflow stores, real subprocesses.

`make test-gpu` (pytest -m gpu); the whole module skips without CUDA. To rehearse the
tests' logic on a machine without one, `VAELAB_TEST_GPU_DEVICE=cpu` runs them on the
CPU (each fast path against the CPU's eager fp32 twin), at the same tiny sizes.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

DEVICE_NAME = os.environ.get("VAELAB_TEST_GPU_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
if DEVICE_NAME not in ("cpu", "cuda") or (DEVICE_NAME == "cuda" and not torch.cuda.is_available()):
    pytest.skip("no CUDA device (VAELAB_TEST_GPU_DEVICE=cpu rehearses these tests on the CPU)",
                allow_module_level=True)

from mlflow.tracking import MlflowClient  # noqa: E402  (after the skip: the module needs a device first)

from tests.conftest import REPO, make_idx_folder, make_pictures, tiny_run  # noqa: E402
from tests.test_sweep import GRID, assert_each_point_once, child_runs, make_sweep, write_spec  # noqa: E402
from vaelab.data import load_data  # noqa: E402
from vaelab.data.store import DiskImages  # noqa: E402
from vaelab.evaluation.estimators import importance_weighted_nll  # noqa: E402
from vaelab.evaluation.evaluators import EVALUATORS, EvalContext  # noqa: E402
from vaelab.evaluation.stage import evaluate  # noqa: E402
from vaelab.runner import run as tracked_run  # noqa: E402
from vaelab.spec import RunSpec, load_spec, with_values  # noqa: E402
from vaelab.sweeps.queue import WORKER  # noqa: E402
from vaelab.tracking import Tracker  # noqa: E402
from vaelab.training import fit, fit_stack, init_model  # noqa: E402
from vaelab.training.step import batch_terms  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = torch.device(DEVICE_NAME)
CPU = torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"
# 240 tiny training images (216 after the validation split): batches of 72 divide them, so a compiled
# step sees one shape and compiles once (dynamic=False recompiles for a short last batch).
EVEN_BATCH = 72
MEMBERS = [{"loss.beta": 1.0, "train.seed": 1, "train.lr": 1e-3},
           {"loss.beta": 4.0, "train.seed": 2, "train.lr": 3e-3},
           {"loss.beta": 0.5, "train.seed": 3, "train.lr": 1e-3}]
HISTORY_KEYS = ("train/loss", "train/recon", "train/kl", "val/loss", "val/elbo")


def on_device(root: Path, **sections) -> RunSpec:
    """tiny_run on the device under test, patience off (early stopping never cuts a comparison short)."""
    train = {"epochs": 2, "batch_size": 64, "device": DEVICE_NAME, "patience": None, **sections.pop("train", {})}
    return tiny_run(root, train=train, **sections)


def assert_histories_close(mine: list[dict], theirs: list[dict], rel: float, abs_: float = 0.0) -> None:
    assert len(mine) == len(theirs)
    for epoch, (a, b) in enumerate(zip(mine, theirs, strict=True), start=1):
        for key in HISTORY_KEYS:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=abs_), (epoch, key)


def max_weight_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in
               zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@contextlib.contextmanager
def compiled_and_graphed():
    """Warnings recorded, the inductor counters cleared and the cudagraphs log on (shown with a
    failing test's output: why a CUDA graph was skipped). Yields the list of warnings."""
    from torch._dynamo.utils import counters

    counters.clear()
    try:
        torch._logging.set_logs(cudagraphs=True)
    except (TypeError, ValueError):  # a torch without that log: the counter alone says a graph was skipped
        pass
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch._logging.set_logs()


def assert_stayed_compiled(caught: list[warnings.WarningMessage]) -> None:
    """No fallback to eager (MaybeCompiled warns when compiling or running the compiled step fails),
    and on CUDA (mode reduce-overhead) every compiled step replayed as a CUDA graph, none skipped."""
    from torch._dynamo.utils import counters

    fallbacks = [str(w.message) for w in caught if "train.compile" in str(w.message)]
    assert not fallbacks, fallbacks
    if ON_GPU:
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def subprocess_env() -> dict[str, str]:
    """The environment of a `python -m vaelab` child: this repo first, then the caller's PYTHONPATH
    (on a GPU machine that is where the carried wheels are), no tracking URI from outside."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


# ---- (b) bf16 against fp32 --------------------------------------------------------------------------------
def test_bf16_matches_fp32_loosely(mnist_root: Path):
    fp32_run = on_device(mnist_root)
    bf16_run = with_values(fp32_run, {"train.precision": "bf16"})
    data = load_data(fp32_run.data, DEVICE)
    model = init_model(fp32_run, data.shape, DEVICE)
    x, y = data.train.x[:64], data.train.y[:64]
    noise = torch.randn((64, model.z_dim), generator=torch.Generator(DEVICE).manual_seed(0), device=DEVICE)
    with torch.no_grad():
        exact = batch_terms(model, model.likelihood, x, y, noise)
        rounded = batch_terms(model, model.likelihood, x, y, noise, bf16=True)
    # bf16 keeps 8 bits of mantissa (~0.4% per matmul); the log-densities are summed in fp32, so one
    # batch's mean reconstruction term agrees to about 1%. KL is small at init: absolute slack too.
    assert float(rounded[0].mean()) == pytest.approx(float(exact[0].mean()), rel=1e-2)
    assert float(rounded[1].sum(1).mean()) == pytest.approx(float(exact[1].sum(1).mean()), rel=5e-2, abs=5e-2)
    fp32 = fit(fp32_run, model, data, show_progress=False)
    bf16_model = init_model(bf16_run, data.shape, DEVICE)
    bf16 = fit(bf16_run, bf16_model, data, show_progress=False)
    # Two epochs of Adam on bf16 gradients drift from fp32 by rounding only: losses within 3%.
    assert_histories_close(bf16.history, fp32.history, rel=3e-2, abs_=0.5)
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())  # weights stay fp32 under autocast


# ---- (c) a stack of K runs against the same runs one at a time ------------------------------------------
@pytest.mark.parametrize("sections", [
    {},
    {"model": {"arch": "conv", "z_dim": 4, "channels": (8, 16), "hidden": (32,)},
     "data": {"binarize": "dynamic", "augment": True}},
], ids=["mlp", "conv-binarized-augmented"])
def test_stacked_members_follow_their_single_runs(mnist_root: Path, sections, monkeypatch: pytest.MonkeyPatch):
    # cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa), with other algorithms for the
    # stack's grouped convolutions than for single ones: compare in full fp32, as the MLP does.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    base = on_device(mnist_root, train={"epochs": 3}, **sections)
    runs = [with_values(base, values) for values in MEMBERS]
    data = load_data(base.data, DEVICE)
    singles = []
    for r in runs:
        model = init_model(r, data.shape, DEVICE)
        singles.append((model, fit(r, model, data, show_progress=False)))
    models = [init_model(r, data.shape, DEVICE) for r in runs]
    results = fit_stack(runs, models, data, show_progress=False)
    for model, member, (single_model, single) in zip(models, results, singles, strict=True):
        assert member.error is None
        # A batched matmul (vmap) sums in another order than K single ones: rounding, amplified over
        # three epochs of Adam, stays well under 0.1%; another member's numbers differ by far more.
        assert_histories_close(member.result.history, single.history, rel=1e-3, abs_=1e-2)
        assert max_weight_gap(model, single_model) < 1e-2


# ---- (e) IWAE on the device against the CPU, on the same weights --------------------------------------------
IW_K = 200


def test_iwae_on_the_device_agrees_with_the_cpu(mnist_root: Path):
    cpu_run = tiny_run(mnist_root, train={"epochs": 3, "batch_size": 32, "device": "cpu", "patience": None})
    cpu_data = load_data(cpu_run.data, CPU)
    cpu_model = init_model(cpu_run, cpu_data.shape, CPU)
    result = fit(cpu_run, cpu_model, cpu_data, show_progress=False)
    device_model = copy.deepcopy(cpu_model).to(DEVICE)
    x = cpu_data.test.x[:]
    # The same weights compute the same posterior and decoder on both devices (fp32, to rounding).
    with torch.inference_mode():
        for a, b in zip(cpu_model.eval().encode(x), device_model.eval().encode(x.to(DEVICE)), strict=True):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4)
    # The estimates use each device's own random numbers, so they agree statistically, image by image:
    # the mean of the paired differences lies within 4 standard errors of 0 (a wrong term in the
    # estimator on one device, such as a log k or a log q off, shifts every image the same way).
    cpu_nll = importance_weighted_nll(cpu_model, x, cpu_model.likelihood, IW_K, torch.Generator().manual_seed(1))
    device_gen = torch.Generator(DEVICE).manual_seed(1 if ON_GPU else 2)  # CPU rehearsal: other draws
    device_nll = importance_weighted_nll(device_model, x.to(DEVICE), device_model.likelihood, IW_K, device_gen)
    diff = device_nll.cpu().double() - cpu_nll.double()
    four_se = 4 * float(diff.std()) / math.sqrt(len(diff)) + 1e-3
    assert abs(float(diff.mean())) <= four_se, diff

    # The evaluation stage on the device gives the direct estimate with the stage's own seeded noise.
    device_data = load_data(cpu_run.data, DEVICE)
    all_images = with_values(cpu_run, {"eval.iw_samples": IW_K, "eval.iw_images": None, "eval.iw_capped": False,
                                       "train.device": DEVICE_NAME})
    context = EvalContext(device_model, device_data, all_images, result.epochs_run)
    out = evaluate(context, [EVALUATORS["iwae"]], show_progress=False)
    direct = importance_weighted_nll(device_model, device_data.test.x, device_model.likelihood, IW_K,
                                     context.generator(), y=device_data.test.y)
    assert out.metrics["test/nll_iw"] == pytest.approx(float(direct.double().mean()), rel=1e-6)
    assert abs(out.metrics["test/nll_iw"] - float(cpu_nll.double().mean())) <= four_se


# ---- (f) streamed from the disk cache (pinned on CUDA) against resident ------------------------------------
def test_streamed_batches_and_training_equal_resident(mnist_root: Path, tmp_path: Path):
    resident_run = on_device(mnist_root, data={"binarize": "dynamic", "storage": "resident",
                                               "cache_dir": str(tmp_path / "cache")})
    streamed_run = with_values(resident_run, {"data.storage": "stream"})
    resident = load_data(resident_run.data, DEVICE)
    streamed = load_data(streamed_run.data, DEVICE)
    assert (resident.storage, streamed.storage) == ("resident", "stream")
    assert isinstance(streamed.train.x, DiskImages) and streamed.train.x.device.type == DEVICE.type
    if ON_GPU:  # host buffers are page-locked, so the copies to the GPU can run asynchronously
        assert streamed.train.x.read(np.arange(8), pin=True).is_pinned()
    order = torch.randperm(len(resident.train), generator=torch.Generator().manual_seed(0))
    pairs = zip(resident.train.x.shuffled(order, 64), streamed.train.x.shuffled(order, 64), strict=True)
    for (index_a, a), (index_b, b) in pairs:
        assert torch.equal(index_a, index_b) and torch.equal(a, b) and b.device == a.device
    for role in ("val", "test"):  # binarised once on the device, then spilled to the cache and read back
        assert torch.equal(getattr(resident, role).x[:], getattr(streamed, role).x[:])
    first = fit(resident_run, init_model(resident_run, resident.shape, DEVICE), resident, show_progress=False)
    second = fit(streamed_run, init_model(streamed_run, streamed.shape, DEVICE), streamed, show_progress=False)
    # The same batches in the same order through the same kernels: the same numbers.
    assert_histories_close(second.history, first.history, rel=1e-6)


# ---- (d) a conv model at 64 px trains and evaluates --------------------------------------------------------
def test_conv_at_64px_trains_and_evaluates(tmp_path: Path, tracking_uri: str):
    make_pictures(tmp_path / "pics", 120)
    spec = load_spec(REPO / "experiments" / "landscapes_example.yaml", [
        f"data.root={tmp_path / 'pics'}", f"data.cache_dir={tmp_path / 'cache'}", f"train.device={DEVICE_NAME}",
        "train.epochs=2", "train.batch_size=16", "eval.iw_samples=20", "eval.tsne_points=20"])
    assert spec.base.data.image_size == 64 and spec.base.model.arch == "conv"
    outcome = tracked_run(spec.base, "gpu_conv64", Tracker(tracking_uri), show_progress=False)
    record = MlflowClient(tracking_uri).get_run(outcome.run_id)
    assert record.info.status == "FINISHED"
    assert record.data.tags["vaelab.device"].startswith(DEVICE.type)
    for key in ("test/elbo", "test/nll_iw"):
        assert math.isfinite(outcome.metrics[key]), key
    assert (outcome.checkpoint_dir / "model.pt").is_file()


# ---- (h) two local sweep workers share one device ---------------------------------------------------------
def test_two_workers_on_one_device_finish_each_point_once(tmp_path: Path, mnist_root: Path):
    path = write_spec(tmp_path, mnist_root, GRID, train={"epochs": 2, "batch_size": 64, "device": DEVICE_NAME,
                                                         "patience": None})
    done = subprocess.Popen([sys.executable, "-m", "vaelab", "sweep", str(path), "--workers", "2", "--no-progress"],
                            cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    output = done.communicate(timeout=240)[0]
    assert done.returncode == 0, output
    assert "4 complete" in output
    sweep = make_sweep(tmp_path, path)
    assert_each_point_once(sweep, tmp_path)
    # The worker processes ran the trials, not the command itself, and every run says it ran on the device.
    assert done.pid not in {int(t.user_attrs[WORKER].rsplit(":", 1)[1]) for t in sweep.trials()}
    children, _ = child_runs(tmp_path, "sweep_demo")
    assert {r.data.tags["vaelab.device"].split(":")[0] for r in children} == {DEVICE.type}


# ---- (g) a run killed after its first saved epoch resumes to the numbers of an uninterrupted one ----------
RESUME_EPOCHS = 30 if ON_GPU else 12


def write_resume_spec(folder: Path, root: Path) -> Path:
    spec = {"name": "resume_demo", "base": {
        "data": {"dataset": "mnist", "root": str(root), "download": False},
        "model": {"z_dim": 4, "hidden": [64]},
        "train": {"epochs": RESUME_EPOCHS, "batch_size": 32, "patience": None, "device": DEVICE_NAME, "seed": 3},
        "eval": {"figures": False, "iw_samples": 5, "probe": False},
    }}
    path = folder / "resume_demo.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def start_training(cwd: Path, spec: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vaelab", "train", str(spec), "--no-progress"], cwd=cwd,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def saved_epoch(cwd: Path, proc: subprocess.Popen, at_least: int) -> int:
    """Wait until the run's resume state holds epoch `at_least` or later."""
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed: " + proc.communicate()[1][-2000:])
        for state in (cwd / "runs" / "resume" / "resume_demo").glob("*/state.pt"):
            try:
                epoch = torch.load(state, weights_only=True, map_location="cpu")["epoch"]
            except (OSError, EOFError, RuntimeError, KeyError):
                continue  # being written
            if epoch >= at_least:
                return epoch
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("no resume state was saved in 180 s")


def the_run(cwd: Path):
    client = MlflowClient(f"sqlite:///{cwd / 'runs' / 'mlflow.db'}")
    [record] = client.search_runs([client.get_experiment_by_name("resume_demo").experiment_id])
    return client, record


def test_sigkill_after_the_first_saved_epoch_resumes_to_the_uninterrupted_numbers(tmp_path: Path):
    root = make_idx_folder(tmp_path / "idx", n_train=3000, n_test=300)
    spec = write_resume_spec(tmp_path, root)
    first = start_training(tmp_path, spec)
    saved = saved_epoch(tmp_path, first, 1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    _, killed = the_run(tmp_path)
    assert killed.info.status == "RUNNING"
    again = start_training(tmp_path, spec)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr[-3000:]
    client, record = the_run(tmp_path)
    assert record.info.run_id == killed.info.run_id and record.info.status == "FINISHED"
    assert int(record.data.tags["vaelab.resumed_from_epoch"]) >= saved
    expected = tracked_run(load_spec(spec).base, "resume_demo",
                           Tracker(f"sqlite:///{tmp_path / 'reference' / 'mlflow.db'}"), show_progress=False)
    # Replayed epochs redo the same kernels on the same device from the saved generators: equal up to
    # rounding (1e-6 relative; 1e-5 on CUDA, where another process may pick other cuBLAS kernels).
    rel = 1e-5 if ON_GPU else 1e-6
    history = {m.step: m.value for m in client.get_metric_history(record.info.run_id, "val/loss")}
    assert sorted(history) == list(range(1, RESUME_EPOCHS + 1))
    for epoch, metrics in enumerate(expected.history, start=1):
        assert history[epoch] == pytest.approx(metrics["val/loss"], rel=rel), epoch
    for key in ("test/elbo", "test/recon", "test/kl", "test/nll_iw"):
        assert record.data.metrics[key] == pytest.approx(expected.metrics[key], rel=rel), key


# ---- (a) train.compile (CUDA graphs on a GPU) against eager -------------------------------------------------
def test_compiled_step_trains_like_the_eager_one(mnist_root: Path):
    eager_run = on_device(mnist_root, train={"batch_size": EVEN_BATCH})
    compiled_run = with_values(eager_run, {"train.compile": True})
    data = load_data(eager_run.data, DEVICE)
    eager_model = init_model(eager_run, data.shape, DEVICE)
    eager = fit(eager_run, eager_model, data, show_progress=False)
    compiled_model = init_model(compiled_run, data.shape, DEVICE)
    with compiled_and_graphed() as caught:
        compiled = fit(compiled_run, compiled_model, data, show_progress=False)
    assert_stayed_compiled(caught)
    # Triton's fused kernels sum in another order than eager's: rounding, over two epochs of Adam.
    assert_histories_close(compiled.history, eager.history, rel=1e-3 if ON_GPU else 1e-4)
    assert max_weight_gap(compiled_model, eager_model) < 1e-2


def test_compiled_bf16_stack_follows_its_eager_single_runs(mnist_root: Path):
    base = on_device(mnist_root, train={"batch_size": EVEN_BATCH})
    fast = with_values(base, {"train.compile": True, "train.precision": "bf16"})
    runs = [with_values(base, values) for values in MEMBERS[:2]]
    data = load_data(base.data, DEVICE)
    singles = []
    for r in runs:
        model = init_model(r, data.shape, DEVICE)
        singles.append(fit(r, model, data, show_progress=False))
    fast_runs = [with_values(fast, values) for values in MEMBERS[:2]]
    models = [init_model(r, data.shape, DEVICE) for r in fast_runs]
    with compiled_and_graphed() as caught:
        results = fit_stack(fast_runs, models, data, show_progress=False)
    assert_stayed_compiled(caught)
    for member, single in zip(results, singles, strict=True):
        assert member.error is None
        # The stack's fastest form (compiled, bf16) against plain fp32 single runs: bf16's tolerance.
        assert_histories_close(member.result.history, single.history, rel=3e-2, abs_=0.5)
