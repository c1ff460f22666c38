#!/usr/bin/env bash
# One prepared run of vaelab's GPU path on a CUDA machine that has PyTorch but not vaelab's tracking
# and sweep packages (they come as wheels), from the repository root:
#   OUT=/some/folder bash scripts/gpu-check.sh
# Steps, each under its own timeout, each going on past a failed one, all under one deadline:
#   install   the carried wheels into a --target folder; vaelab from this checkout on PYTHONPATH
#   bench     the bench's one-epoch rows (vs the canonical example) and stacked-sweep rows on the device
#   fmnist    experiments/fmnist_nll.yaml trained and IWAE-evaluated (k=5000, all test images), beside:
#   tests     pytest -m gpu tests/test_gpu.py
# Writes to $OUT: install.log bench.log RESULTS.md fmnist_nll.log test-gpu.log summary.txt.
# Settings (environment): PY (python3), DEVICE (cuda), TINY (0; 1 = tiny sizes, for a CPU rehearsal:
# scripts/gpu-rehearse.sh), WHEELHOUSE (.wheelhouse), DATA (.gpu-data/fashion-mnist), DEADLINE_S (450).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
WHEELHOUSE=${WHEELHOUSE:-.wheelhouse}
DATA=$(cd "${DATA:-.gpu-data/fashion-mnist}" 2>/dev/null && pwd || echo "${DATA:-.gpu-data/fashion-mnist}")
DEADLINE_S=${DEADLINE_S:-450}
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/vaelab-gpu-check.XXXXXX)
START=$(date +%s)
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
declare -A RC SECS

left() { echo $((DEADLINE_S - ($(date +%s) - START))); }
# cap SECONDS: the step's own limit, or what the deadline leaves (less a reserve for the summary)
cap() { local l; l=$(($(left) - 15)); if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi; }
# step NAME LIMIT LOG CMD...: run CMD under `timeout`, record its exit code and wall seconds
step() {
  local name=$1 limit=$2 log=$3 t0 rc
  shift 3
  if [ "$limit" -lt 5 ]; then
    echo "$name: skipped, the deadline is too near" >>"$log"; RC[$name]=skipped; SECS[$name]=0; return
  fi
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" >>"$log"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  RC[$name]=$rc; SECS[$name]=$(($(date +%s) - t0))
  echo "== $name: exit $rc after ${SECS[$name]}s" >>"$log"
}

# ---- install ----------------------------------------------------------------------------------------------
step install "$(cap 60)" "$OUT/install.log" "$PY" -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target "$WORK/site" "$WHEELHOUSE"/*.whl
export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - >>"$OUT/install.log" 2>&1 <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| available", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("mlflow", "optuna", "sqlalchemy", "alembic", "cmaes", "google.protobuf", "pydantic"):
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '?')} from {module.__file__}")
import vaelab.runner, vaelab.sweeps.coordinator, vaelab.tracking  # noqa: E401,F401  (the modules each step imports)
print("vaelab imports: ok")
EOF
"$PY" -m vaelab keys >/dev/null 2>>"$OUT/install.log" && echo "python -m vaelab: ok" >>"$OUT/install.log"

# ---- bench: the one-epoch rows and the stacked-sweep rows on the device -------------------------------------
cat >"$WORK/bench_rows.py" <<'EOF'
"""The GPU rows of `make bench`, sized for one short run: vaelab's epoch against the canonical PyTorch
VAE example (fp32 eager, and compile + bf16) and a stacked beta sweep, on all 60,000 images.
RESULTS.md is rewritten after each part, so a run stopped early keeps what it measured."""
import dataclasses, sys, tempfile
from pathlib import Path

import torch

import bench.__main__ as bench

out, data, device, tiny = Path(sys.argv[1]), Path(sys.argv[2]), torch.device(sys.argv[3]), sys.argv[4] == "1"
settings = dataclasses.replace(bench.QUICK if tiny else bench.FULL, reps=2 if tiny else 3, data_root=data)
command = f"scripts/gpu-check.sh (bench rows on {device.type}{', tiny' if tiny else ''})"
fast = ["train.compile=true", "train.precision=bf16"]
epochs, sweeps, iwae = [], [], []
with tempfile.TemporaryDirectory(prefix="vaelab-bench-tv-") as tv:
    root = bench.torchvision_root(data, Path(tv))
    iwae += bench.iwae_rows(device, settings)
    for label, overrides in (("default (fp32)", []), ("compile + bf16", fast)):
        epochs += bench.epoch_rows(device, settings, root, [(label, overrides)])
        bench.write_results(out, settings, epochs, sweeps, None, command, iwae)
    for overrides, row in (([], epochs[0]), (fast, epochs[-1])):
        sweeps.append(bench.sweep_row(device, settings, row["baseline s/epoch"], row["vaelab s/epoch"], overrides))
        bench.write_results(out, settings, epochs, sweeps, None, command, iwae)
print(f"wrote {out}")
EOF
step bench "$(cap 150)" "$OUT/bench.log" "$PY" "$WORK/bench_rows.py" "$OUT/RESULTS.md" "$DATA" "$DEVICE" "$TINY"

# ---- fmnist_nll (in the background) beside the GPU tests ---------------------------------------------------
TINY_SETS=()
if [ "$TINY" = 1 ]; then
  TINY_SETS=(--set data.subset=3000 --set train.epochs=2 --set eval.iw_samples=50 --set eval.iw_images=500
             --set eval.tsne_points=100)
fi
cat >"$WORK/fmnist_metrics.py" <<'EOF'
"""What the fmnist_nll run recorded, from its MLflow store: the numbers to compare with the paper."""
import sys

from mlflow.tracking import MlflowClient

client = MlflowClient(sys.argv[1])
experiment = client.get_experiment_by_name("fmnist_nll")
runs = client.search_runs([experiment.experiment_id]) if experiment else []
for run in runs:
    m = run.data.metrics
    epochs = [x.value for x in client.get_metric_history(run.info.run_id, "time/epoch_s")]
    print(f"fmnist_nll run {run.info.run_id} {run.info.status} on {run.data.tags.get('vaelab.device')}")
    for key in ("test/nll_iw", "test/nll_iw_se", "test/elbo", "test/kl", "test/active_units", "best/val/elbo",
                "train/best_epoch", "train/epochs_run", "time/train_s", "time/eval_s", "time/eval/iwae_s"):
        if key in m:
            print(f"  {key:<18} {m[key]:.4f}")
    if epochs:
        print(f"  s/epoch            median {sorted(epochs)[len(epochs) // 2]:.3f}, first {epochs[0]:.3f}")
    print(f"  iwae settings      {run.data.tags.get('vaelab.eval.iwae')}")
    print("  paper (Exemplar VAE, Gaussian prior, k=5000): 228.70 +- 0.15 nats")
EOF
fmnist() {
  step fmnist "$1" "$OUT/fmnist_nll.log" "$PY" -m vaelab train experiments/fmnist_nll.yaml \
    --set "data.root=$DATA" --set "train.device=$DEVICE" "${TINY_SETS[@]}" \
    --tracking-uri "sqlite:///$WORK/runs/mlflow.db"
  "$PY" "$WORK/fmnist_metrics.py" "sqlite:///$WORK/runs/mlflow.db" >>"$OUT/fmnist_nll.log" 2>&1
  echo "${RC[fmnist]} ${SECS[fmnist]}" >"$WORK/fmnist.done"
}
fmnist "$(cap 300)" &
FMNIST_PID=$!

TEST_ARGS=(-m gpu tests/test_gpu.py -v -p no:cacheprovider --durations=0)
"$PY" -c "import pytest_timeout" 2>/dev/null && TEST_ARGS+=(--timeout 150)
if [ "$DEVICE" = cpu ]; then export VAELAB_TEST_GPU_DEVICE=cpu; fi
step tests "$(cap 240)" "$OUT/test-gpu.log" "$PY" -m pytest "${TEST_ARGS[@]}"
wait "$FMNIST_PID"
if [ -f "$WORK/fmnist.done" ]; then
  read -r RC[fmnist] SECS[fmnist] <"$WORK/fmnist.done"
else
  RC[fmnist]=lost; SECS[fmnist]=0
fi

# ---- summary ----------------------------------------------------------------------------------------------
{
  echo "vaelab GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
  grep -m1 '^python ' "$OUT/install.log" || echo "python/torch: see install.log"
  echo "device $DEVICE, tiny $TINY, total $(($(date +%s) - START)) s of a ${DEADLINE_S} s deadline"
  for name in install bench fmnist tests; do
    printf '%-8s exit %-8s %5s s\n' "$name" "${RC[$name]:-not run}" "${SECS[$name]:-0}"
  done
  log="$OUT/test-gpu.log"
  echo "-- tests: $(grep -cE '::.* PASSED' "$log") passed, $(grep -cE '::.* (FAILED|ERROR)' "$log") failed" \
    "($(grep -cE '::.* SKIPPED' "$log") skipped) of the tests that got to run"
  grep -E '^(FAILED|ERROR) |(passed|failed|error)[^=]* in [0-9.]+s' "$log" | tail -20
  case "${RC[tests]:-}" in 124|137)
    grep -E '^tests/.*::' "$log" | grep -vE ' (PASSED|FAILED|ERROR|SKIPPED)' | tail -1 | cut -d' ' -f1 |
      sed 's/^/stopped at the deadline during: /';;
  esac
  echo "-- bench:";  grep -E '^  (epoch|sweep), ' "$OUT/bench.log"
  echo "-- fmnist_nll:"; sed -n '/^fmnist_nll run/,$p' "$OUT/fmnist_nll.log"
  echo "-- compile fallbacks (train.compile warnings) in any log:"
  grep -h 'train.compile: compiling the step failed' "$OUT"/*.log | sort | uniq -c | head -5
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
rm -rf "$WORK"
