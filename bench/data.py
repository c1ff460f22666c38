"""The bench's data section: a generated folder of 128x128 RGB pictures larger than a
memory budget, decoded into the cache, then trained on resident and streamed.

Each training side runs in a process of its own (`python -m bench.data --worker`), so
its memory is its own: the resident set size the data adds when it is loaded, the peak
resident set size while training (torch, model, optimiser and batches included) and, on
CUDA, the peak allocated device memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 128


@dataclass(frozen=True)
class DataSettings:
    images: int  # pictures in the generated folder (train + test)
    budget_mb: int  # data.memory_budget for the streamed side: smaller than the images
    epochs: int  # timed epochs per process (their median is its time)
    processes: int = 2  # processes per side, alternating; the faster one is reported


FULL = DataSettings(images=6000, budget_mb=64, epochs=3)
QUICK = DataSettings(images=480, budget_mb=4, epochs=2, processes=1)


def make_folder(root: Path, n: int, seed: int = 0) -> Path:
    """`train/` and `test/` (5:1) with two class folders of noisy pictures, PNG and JPEG."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for i in range(n):
        split = "test" if i % 6 == 0 else "train"
        label = ("warm", "cool")[i % 2]
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        small = np.clip(base.astype(np.int16) + rng.integers(-60, 61, (8, 8, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(small).resize((SIZE + 32, SIZE), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:06d}.{'jpg' if i % 3 == 0 else 'png'}")
    return root


def _data_spec(root: Path, cache: Path, storage: str, budget: int | str, workers: int | None):
    from vaelab.spec import parse_spec

    data = {"dataset": "image_folder", "root": str(root), "image_size": SIZE, "channels": 3, "cache_dir": str(cache),
            "storage": storage, "memory_budget": budget, "decode_workers": workers}
    return parse_spec({"name": "bench-data", "base": {"data": data}}).base.data


def decode_rate(root: Path, cache: Path) -> dict:
    """Images per second decoded (in one process per core) into the cache, from a cold cache."""
    from vaelab.data.image_folder import cache_split, class_names, list_split, split_folders

    spec = _data_spec(root, cache, "stream", "auto", None)
    listed = {role: list_split(folder) for role, folder in split_folders(root, spec.splits).items()}
    names = class_names(listed)
    started = time.perf_counter()
    count = sum(cache_split(split, names, spec).count for split in listed.values())
    seconds = time.perf_counter() - started
    return {"images": count, "seconds": seconds, "images/s": count / seconds, "workers": os.cpu_count()}


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(root: Path, cache: Path, storage: str, budget: int, epochs: int, device_name: str) -> dict:
    """One side: load the data as `storage` says, train `epochs` epochs, report times and memory."""
    import torch

    from vaelab.data import load_data
    from vaelab.spec import RunSpec, with_values
    from vaelab.training import fit, init_model

    device = torch.device(device_name)
    run = with_values(RunSpec(), {"data.dataset": "image_folder", "model.arch": "mlp", "model.hidden": (64,),
                                  "loss.likelihood": "gaussian", "train.epochs": epochs, "train.patience": None,
                                  "train.device": device_name, "data.image_size": SIZE,
                                  "eval.batch_size": 128})
    import vaelab.data.assemble  # noqa: F401  (code is not data: imported before measuring)
    import vaelab.data.sources.image_folder  # noqa: F401

    model = init_model(run, (3, SIZE, SIZE), device)
    unloaded = _rss_bytes()
    data = load_data(_data_spec(root, cache, storage, budget, None), device)
    held = _rss_bytes() - unloaded
    times: list[float] = []
    mark = [time.perf_counter()]

    def timed(_epoch: int, _metrics: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - mark[0])
        mark[0] = time.perf_counter()

    result = fit(run, model, data, callbacks=[timed], show_progress=False)
    peak = _peak_rss_bytes()
    return {"storage": data.storage, "train images": len(data.train), "image bytes": data.train.x.nbytes
            + data.val.x.nbytes + data.test.x.nbytes, "s/epoch": statistics.median(times),
            "RSS held by the data (MB)": max(0, held) / 1e6,
            "peak RSS while training (MB)": peak / 1e6,
            "peak device memory (MB)": (torch.cuda.max_memory_allocated(device) / 1e6
                                        if device.type == "cuda" else None),
            "val/loss": result.history[-1]["val/loss"]}


def _side(root: Path, cache: Path, storage: str, budget: int, epochs: int, device: str) -> dict:
    command = [sys.executable, "-m", "bench.data", "--worker", "--root", str(root), "--cache", str(cache),
               "--storage", storage, "--budget", str(budget), "--epochs", str(epochs), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench data worker failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def data_rows(settings: DataSettings, tmp: Path, device: str) -> tuple[dict, list[dict]]:
    """(decode row, [resident row, streamed row]) for a folder of `settings.images` pictures."""
    root = make_folder(tmp / "pictures", settings.images)
    cache = tmp / "cache"
    decode = decode_rate(root, cache)
    budget = settings.budget_mb * 10**6
    # Each side twice, alternating, keeping its faster process: drift of a shared machine hits both.
    runs: dict[str, list[dict]] = {"resident": [], "auto": []}
    for _ in range(settings.processes):
        for storage in runs:  # "auto" is over budget: it streams
            runs[storage].append(_side(root, cache, storage, budget, settings.epochs, device))
    resident, streamed = (min(rows, key=lambda row: row["s/epoch"]) for rows in runs.values())
    for row in (resident, streamed):
        row.update({"device": device, "budget (MB)": settings.budget_mb})
    streamed["slowdown vs resident"] = streamed["s/epoch"] / resident["s/epoch"]
    print(f"  data, {device}: decode {decode['images/s']:.0f} img/s; epoch resident {resident['s/epoch']:.2f} s, "
          f"streamed {streamed['s/epoch']:.2f} s ({streamed['slowdown vs resident']:.2f}x)", flush=True)
    return decode, [resident, streamed]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.data")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--root", type=Path)
    parser.add_argument("--cache", type=Path)
    parser.add_argument("--storage", default="auto")
    parser.add_argument("--budget", type=int, default=64 * 10**6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not args.worker:
        parser.error("run through `python -m bench`; --worker is one side of its data section")
    out = worker(args.root, args.cache, args.storage, args.budget, args.epochs, args.device)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

