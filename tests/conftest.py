"""Shared fixtures: real Fashion-MNIST where installed, small IDX folders the
tests write, and real MLflow stores in temporary folders."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaelab.data.idx import write_idx
from vaelab.data.mnist_family import FILES, SOURCES, candidate_dirs
from vaelab.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker gets its share of the cores for torch's threads, and so do the vaelab
    processes its tests start (they inherit the environment): two workers each running every core fight over
    them. This runs before the test modules (and torch) are imported; an explicit OMP_NUM_THREADS stays."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def fashion_mnist_dir() -> Path | None:
    for folder in candidate_dirs(SOURCES["fashion_mnist"], REPO / "data"):
        if all((folder / f"{stem}.gz").is_file() or (folder / stem).is_file() for stem in FILES.values()):
            return folder
    return None


@pytest.fixture(scope="session")
def fmnist_root() -> Path:
    """The folder holding real Fashion-MNIST (`.ci/run` installs Debian's package)."""
    folder = fashion_mnist_dir()
    if folder is None:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return folder


def make_idx_folder(folder: Path, n_train: int = 240, n_test: int = 80, seed: int = 0, gz: bool = False) -> Path:
    """Small MNIST-like IDX files: a bright square per class at a class-dependent place."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 60).astype(np.uint8)
        for i, label in enumerate(labels):
            row, col = 2 + 2 * (label // 5) * 5, 2 + (label % 5) * 5
            images[i, row : row + 8, col : col + 5] = 230
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return folder


def make_pictures(folder: Path, n: int, seed: int = 0, size=(90, 60)) -> None:
    """Non-square RGB 'landscapes': a sky colour above a ground colour, per class."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = ("day", "night")[i % 2]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        sky = (80, 160, 240) if cls == "day" else (10, 10, 60)
        image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        horizon = int(rng.integers(20, 40))
        image[:horizon] = sky
        image[horizon:] = (40, int(rng.integers(90, 160)), 40)
        Image.fromarray(image).save(folder / cls / f"img{i:03d}.{'png' if i % 3 else 'jpg'}")


def save_hf_images(folder: Path, n_train: int = 40, n_test: int = 12, seed: int = 0) -> Path:
    """A Hugging Face DatasetDict of generated pictures ("image", "label" of two classes), saved to disk."""
    import io

    import datasets

    rng = np.random.default_rng(seed)

    def split(n: int):
        images, labels = [], [i % 2 for i in range(n)]
        for label in labels:
            colour = np.array(((20, 70, 200), (220, 190, 90))[label])
            pixels = np.clip(colour + rng.normal(0, 20, (24, 30, 3)), 0, 255).astype(np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="PNG")
            images.append({"bytes": out.getvalue(), "path": None})
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["sea", "sand"])})
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    datasets.DatasetDict({"train": split(n_train), "test": split(n_test)}).save_to_disk(str(folder))
    return folder


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    return make_idx_folder(tmp_path / "mnist-files")


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store, its schema made once per session: making it runs MLflow's migrations,
    seconds of small synced writes, so each test's store starts as a copy of this one."""
    from vaelab.tracking import MlflowRuns

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowRuns(f"sqlite:///{path}").create()  # a write makes a store; reading one that is not there is an error
    return path


@pytest.fixture
def tracking_uri(tmp_path: Path, empty_mlflow_store: Path) -> str:
    """A real MLflow store of the test's own, empty (a copy of `empty_mlflow_store`)."""
    (tmp_path / "store").mkdir()
    shutil.copyfile(empty_mlflow_store, tmp_path / "store" / "mlflow.db")
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def tiny_run(root: Path, dataset: str = "mnist", **sections) -> RunSpec:
    """A run spec small enough to train in a second or two on CPU."""
    base = RunSpec()
    data = dataclasses.replace(base.data, dataset=dataset, root=str(root), download=False, subset=None)
    model = dataclasses.replace(base.model, z_dim=4, hidden=(32,), channels=(8, 16))
    train = dataclasses.replace(base.train, epochs=2, batch_size=64, device="cpu")
    evals = dataclasses.replace(base.eval, batch_size=500, tsne_points=60, iw_samples=20)
    run = dataclasses.replace(base, data=data, model=model, train=train, eval=evals)
    for name, changes in sections.items():
        run = dataclasses.replace(run, **{name: dataclasses.replace(getattr(run, name), **changes)})
    return run


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """An empty database of its own on the test server, as a new team's would be: Optuna
    creates its tables on first use, and workers starting together race to do it."""
    server = os.environ.get("VAELAB_TEST_POSTGRES", "")
    if not server:
        pytest.skip("no PostgreSQL for tests (.ci/run starts one and sets VAELAB_TEST_POSTGRES)")
    import psycopg

    name = f"vaelab_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield server.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(autouse=True, scope="session")
def _quiet_mlflow():
    """What `vaelab` sets at its entry, for code the tests call directly."""
    from vaelab.tracking import quiet_mlflow

    quiet_mlflow()


@pytest.fixture
def hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No network and no ~/.cache: the hub is offline and every cache is under tmp_path.
    `datasets` reads these variables once, at import, so its config is patched as well."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = datasets.config
    monkeypatch.setattr(config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(config, "HF_CACHE_HOME", str(home))
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", home / "datasets")
    monkeypatch.setattr(config, "HF_MODULES_CACHE", home / "modules")
    monkeypatch.setattr(config, "DOWNLOADED_DATASETS_PATH", home / "datasets" / "downloads")
    monkeypatch.setattr(config, "EXTRACTED_DATASETS_PATH", home / "datasets" / "downloads" / "extracted")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    return home


@pytest.fixture
def sweep_cli(tmp_path: Path, monkeypatch, capsys):
    """`vaelab ARGS` in this process, in tmp_path, on tmp_path's MLflow store: (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"

    def call(*args: str) -> tuple[int, str, str]:
        from vaelab import cli

        code = cli.main([*args, "--tracking-uri", uri])
        out, err = capsys.readouterr()
        return code, out, err

    yield call
    for number, handler in handlers.items():
        signal.signal(number, handler)


def run_vaelab(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m vaelab ARGS` in its own process, in `cwd`, on the checkout's code, with no tracking URI
    from the environment (so it uses `cwd`'s runs/)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "vaelab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
