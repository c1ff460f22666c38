"""A dataset larger than data.memory_budget trains from the disk cache without being
loaded: measured as the resident memory a fresh process gains by loading it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import REPO

PROBE = r"""
import json, sys
import psutil, torch
import vaelab.data.assemble, vaelab.data.sources.image_folder  # code is not data: imported before measuring
from vaelab.data import load_data
from vaelab.spec import parse_spec, with_values
from vaelab.training import fit, init_model

root, cache, storage, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data_spec = {"dataset": "image_folder", "root": root, "cache_dir": cache, "image_size": 64, "storage": storage,
             "memory_budget": budget}
run = parse_spec({"name": "m", "base": {"data": data_spec, "model": {"hidden": [16], "z_dim": 4},
                                       "loss": {"likelihood": "gaussian"},
                                       "train": {"epochs": 1, "device": "cpu", "batch_size": 64},
                                       "eval": {"batch_size": 64}}}).base
model = init_model(run, (3, 64, 64), torch.device("cpu"))
before = psutil.Process().memory_info().rss
data = load_data(run.data, torch.device("cpu"), show_progress=False)
held = psutil.Process().memory_info().rss - before
result = fit(run, model, data, show_progress=False)
print(json.dumps({"storage": data.storage, "held": held, "bytes": data.train.x.nbytes + data.val.x.nbytes
                  + data.test.x.nbytes, "val_loss": result.history[-1]["val/loss"]}))
"""


def probe(root: Path, cache: Path, storage: str, budget: int) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(root), str(cache), storage, str(budget)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_set_larger_than_the_budget_is_streamed_not_loaded(tmp_path: Path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 1000), ("test", 200)):
        (tmp_path / "pics" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                tmp_path / "pics" / split / f"{i}.png")
    budget = 4 * 10**6  # the images are 14.7 MB as bytes (59 MB as floats)
    resident = probe(tmp_path / "pics", tmp_path / "cache", "resident", budget)  # decodes the cache, too
    streamed = probe(tmp_path / "pics", tmp_path / "cache", "auto", budget)
    assert resident["bytes"] == streamed["bytes"] == 1200 * 64 * 64 * 3
    assert (resident["storage"], streamed["storage"]) == ("resident", "stream")
    # Resident, the process holds the bytes (not floats); streamed, it holds less than the budget.
    assert 0.9 * resident["bytes"] < resident["held"] < 2 * resident["bytes"]
    assert streamed["held"] < budget, streamed
    assert streamed["val_loss"] == resident["val_loss"]
