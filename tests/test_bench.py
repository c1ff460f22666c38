"""`make bench` runs end to end (its quick mode, on real Fashion-MNIST) and writes
a results page whose numbers are consistent; speed itself is measured, not tested."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, fashion_mnist_dir


# A minute and a half of CPU: in `make test-slow` (which CI runs), so `make test` keeps its 10 minutes.
@pytest.mark.slow
@pytest.mark.skipif(fashion_mnist_dir() is None, reason="needs the Fashion-MNIST IDX files (dataset-fashion-mnist)")
def test_quick_bench_writes_results_with_every_workload(tmp_path: Path):
    out = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--devices", "cpu", "--out", str(out),
                           "--data", str(fashion_mnist_dir())],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    for heading in ("## One epoch", "## Sweep throughput", "## IWAE evaluation throughput",
                    "## Data: resident and streamed", "## Disentanglement: dSprites epochs and metrics",
                    "## Tracking and figures overhead"):
        assert heading in text
    rows = [line for line in text.splitlines() if line.startswith("| cpu ")]
    # The epoch table comes first: default, compile, bf16, compile + bf16; then the two sweep rows, then IWAE.
    epoch_rows, sweep_rows, iwae_rows, dis_rows = rows[:4], rows[4:6], rows[6:8], rows[8:]
    assert len(epoch_rows) == 4 and len(sweep_rows) == 2
    assert [row.split("|")[2].strip() for row in iwae_rows] == ["mlp (bernoulli)", "conv (gaussian)"]
    for row in epoch_rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        mine, base, speedup, my_loss, base_loss = map(float, cells[2:7])
        assert speedup == pytest.approx(base / mine, rel=0.02)
        # Same model, data and epochs: both sides reach the same test -ELBO.
        assert my_loss == pytest.approx(base_loss, rel=0.05)
    assert re.search(r"\| cpu +\| default +\| +4 \|", text)  # the 4-configuration stack
    # dSprites: an epoch per objective, then each metric (DCI with both estimators), scaled to reference sizes.
    names = [row.split("|")[2].strip() for row in dis_rows]
    assert names[:4] == ["beta_vae", "beta_tcvae", "factorvae (discriminator 6 x 1000)", "dip_vae_i"]
    assert names[4:] == ["beta_vae", "factor_vae", "mig", "sap", "dci (gbt)", "dci (random_forest)",
                         "modularity_explicitness"]
    for row in dis_rows[4:]:
        seconds, scaled = map(float, row.strip("|").split("|")[-2:])
        assert scaled == pytest.approx(seconds / 0.01, rel=0.02)


def test_bench_refuses_a_missing_data_folder(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--data", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no Fashion-MNIST IDX files" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
