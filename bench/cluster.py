"""`make bench-cluster`: many `vaelab worker` processes with tiny runs on the shared stack that
`vaelab services` starts (PostgreSQL + an MLflow server with basic auth, here on 127.0.0.1), written to
bench/CLUSTER.md: trials claimed per second, claim latency (one worker's winning look at the queue, reaping
included), and what went wrong: lock errors, deadlocks, duplicate points. Needs PostgreSQL's server
binaries (and root, or a user PostgreSQL may run as)."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
BAD_SIGNS = ("deadlock", "could not obtain lock", "LockNotAvailable", "Traceback", "SerializationFailure")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _idx_data(folder: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.conftest import make_idx_folder

    return make_idx_folder(folder, n_train=256, n_test=64)


def _spec(root: Path, data: Path, points: int) -> Path:
    body = {"name": "bench_cluster", "base": {
        "data": {"dataset": "mnist", "root": str(data), "download": False},
        "model": {"z_dim": 2, "hidden": [16]},
        "train": {"epochs": 1, "batch_size": 64, "device": "cpu", "patience": None},
        "eval": {"figures": False, "iw_samples": 0, "probe": False}},
        "search": {"kind": "grid", "params": {"loss.beta": [round(0.25 * (i + 1), 2) for i in range(points // 2)]},
                   "seeds": [0, 1]}}
    path = root / "bench_cluster.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _wait(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    started = time.monotonic()
    while text not in (log.read_text(errors="replace") if log.is_file() else ""):
        if proc.poll() is not None or time.monotonic() - started > timeout:
            raise SystemExit(f"bench-cluster: the services did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.3)


def measure(workers: int, points: int, root: Path) -> dict:
    import optuna

    pg_port, mlflow_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VAELAB_", "PG"))}
    env.update(PYTHONPATH=str(REPO), HOME=str(root / "home"))
    services_log = root / "services.log"
    services = subprocess.Popen([sys.executable, "-m", "vaelab", "services", "--dir", str(root / "services"),
                                 "--pg-port", str(pg_port), "--mlflow-port", str(mlflow_port), "--workers", "2"],
                                env=env, cwd=root, stdout=open(services_log, "wb"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait(services_log, "Ctrl-C stops the services", services)
        storage = f"postgresql://vaelab@127.0.0.1:{pg_port}/optuna"
        (root / "home" / ".mlflow").mkdir(parents=True, exist_ok=True)
        (root / "home" / ".mlflow" / "credentials").write_text((root / "services" / "mlflow-credentials").read_text())
        worker_env = {**env, "PGPASSFILE": str(root / "services" / "pgpass"), "VAELAB_STORAGE": storage,
                      "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
        spec = _spec(root, _idx_data(root / "data"), points)
        started = time.monotonic()
        logs = [root / f"worker{k}.log" for k in range(workers)]
        procs = [subprocess.Popen([sys.executable, "-m", "vaelab", "worker", str(spec), "--threads", "1", "--quiet"],
                                  env=worker_env, cwd=root, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
                 for log in logs]
        codes = [p.wait(timeout=1800) for p in procs]
        wall = time.monotonic() - started
        os.environ["PGPASSFILE"] = worker_env["PGPASSFILE"]
        study = optuna.load_study(study_name="bench_cluster", storage=storage)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        claims = np.array([t.user_attrs["claim_s"] for t in trials if "claim_s" in t.user_attrs])
        starts = sorted(t.datetime_start.timestamp() for t in complete if t.datetime_start)
        duplicates = sum(n - 1 for n in Counter(t.user_attrs.get("grid_point") for t in complete).values() if n > 1)
        text = "\n".join(log.read_text(errors="replace") for log in logs)
        return {"workers": workers, "grid points": points, "sweep wall s": wall,
                "workers exit 0": sum(c == 0 for c in codes), "complete": len(complete),
                "duplicates": duplicates, "lock errors / deadlocks / tracebacks": sum(text.count(s) for s in BAD_SIGNS),
                "claims per s (first to last claim)": (len(starts) - 1) / max(starts[-1] - starts[0], 1e-9),
                "claim p50 ms": 1000 * float(np.percentile(claims, 50)),
                "claim p99 ms": 1000 * float(np.percentile(claims, 99)), "claims timed": len(claims)}
    finally:
        os.killpg(services.pid, signal.SIGTERM)
        services.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--points", type=int, default=64)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "CLUSTER.md")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="vaelab-bench-cluster-"))
    root.chmod(0o755)  # PostgreSQL runs as the postgres user when this runs as root
    try:
        row = measure(args.workers, args.points, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(row)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.node()}"
    args.out.write_text("\n".join([
        "# Cluster load",
        "",
        f"`make bench-cluster` on {datetime.date.today()}: {args.workers} `vaelab worker` processes on one "
        f"machine ({machine}) share the stack `vaelab services` starts (PostgreSQL + MLflow server with basic "
        f"auth, on 127.0.0.1) and a grid of {args.points} tiny runs (1 epoch of 256 images each), so the "
        "queue, not training, is what is loaded. Claim latency is one worker's winning look at the queue "
        "(re-queueing dead trials included), from the trials' `claim_s` attribute; claims per second count "
        "trial starts from the first to the last.",
        "",
        pd.DataFrame([row]).to_markdown(index=False, floatfmt=".3g"),
        "",
    ]) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
