"""`make bench-hostile`: hostile and careless inputs tried against the real `vaelab` commands, written to
bench/HOSTILE.md. Each probe runs the CLI in its own process beside a tracking store that already holds a
finished run; it counts as refused when the command exits 2 with exactly one line on stderr and no
traceback. Its wall time and peak memory are measured, since a bad input must cost what the input costs.
At the end the store must hold what it held before: nothing recorded lost. With root and PostgreSQL's
server binaries, the shared stack is probed too, with a worker's credentials."""

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
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
VAELAB = [sys.executable, "-m", "vaelab"]


@dataclass
class Outcome:
    kind: str
    probe: str
    code: int
    lines: int
    seconds: float
    peak_mb: float
    refused: bool
    said: str


def _run(argv: list[str], cwd: Path, timeout: float = 120) -> tuple[int, str, float, float]:
    """Exit code, stderr, wall seconds and peak RSS (MB) of one command."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": ""},
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return -1, f"hung: killed after {timeout:.0f} s", time.monotonic() - started, 0.0
    seconds = time.monotonic() - started
    # The largest peak of any probe so far (getrusage keeps the maximum over all reaped children).
    return proc.returncode, err, seconds, _children_peak_mb()


def _children_peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _bomb_yaml(levels: int, width: int = 9) -> str:
    """A billion-laughs value in flow style: a list whose items anchor `levels` lists, each of `width`
    aliases of the one before (width ** levels strings once expanded)."""
    items = [f"&l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        items.append(f"&l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "[" + ", ".join(items) + "]"


def _png_header_bomb(path: Path, side: int) -> None:
    """A PNG whose header claims side x side pixels of zeros, a few hundred kB on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\0" * (side + 1)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


class Bench:
    def __init__(self, root: Path):
        self.root = root
        sys.path.insert(0, str(REPO))
        from tests.conftest import make_idx_folder

        self.data = make_idx_folder(root / "data", n_train=256, n_test=64)
        self.outcomes: list[Outcome] = []

    def run_body(self, **changes: dict) -> dict:
        """The `base:` of a small, valid run, with sections changed."""
        body: dict = {"data": {"dataset": "mnist", "root": str(self.data), "download": False},
                      "model": {"z_dim": 2, "hidden": [16]},
                      "train": {"epochs": 1, "batch_size": 64, "device": "cpu", "patience": None},
                      "eval": {"figures": False, "iw_samples": 0, "probe": False}}
        for section, values in changes.items():
            body.setdefault(section, {}).update(values)
        return body

    def base(self, name: str = "hostile", **changes: dict) -> dict:
        return {"name": name, "base": self.run_body(**changes)}

    def spec_file(self, name: str, text: str) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(text)
        return path

    def probe(self, kind: str, name: str, argv: list[str]) -> None:
        code, err, seconds, peak = _run(argv, self.root)
        lines = [line.replace(str(self.root), "<tmp>") for line in err.strip().splitlines() if line.strip()]
        refused = code == 2 and len(lines) == 1 and "Traceback" not in err
        self.outcomes.append(Outcome(kind, name, code, len(lines), seconds, peak, refused,
                                     (lines[-1] if lines else "")[:160]))
        print(f"{'refused' if refused else 'NOT REFUSED'}: {kind} / {name} ({seconds:.1f} s) {lines[-1:]}",
              flush=True)

    # ---- what a finished run leaves, to check nothing recorded is lost -------------------------------------
    def train_one(self) -> Path:
        spec = self.spec_file("good", yaml.safe_dump(self.base()))
        done = subprocess.run([*VAELAB, "train", str(spec), "--no-progress"], cwd=self.root, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": ""})
        if done.returncode != 0:
            raise SystemExit(f"bench-hostile: the reference run failed:\n{done.stderr[-2000:]}")
        return next(self.root.glob("runs/artifacts/**/checkpoint/model.pt")).parent

    def store_snapshot(self) -> list[tuple]:
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{self.root / 'runs' / 'mlflow.db'}")
        rows = []
        for experiment in client.search_experiments():
            for run in client.search_runs([experiment.experiment_id]):
                rows.append((run.info.run_id, run.info.status, tuple(sorted(run.data.metrics.items()))))
        return sorted(rows)

    # ---- the probes ----------------------------------------------------------------------------------------
    def specs(self) -> None:
        bomb = _bomb_yaml(9)
        for key, text in (("description", f"description: {bomb}\n"),
                          ("model.hidden", f"base: {{model: {{z_dim: 2, hidden: {bomb}}}}}\n"),
                          ("loss.beta", f"base: {{loss: {{beta: {bomb}}}}}\n")):
            path = self.spec_file("bomb", "name: bomb\n" + text)
            self.probe("spec", f"alias bomb 9x9 in `{key}`", [*VAELAB, "train", str(path), "--dry-run"])
        grid = {"name": "huge", "base": self.run_body(),
                "search": {"kind": "grid", "seeds": list(range(10)), "params": {
                    "loss.beta": [0.1 * (i + 1) for i in range(10)], "model.z_dim": list(range(1, 11)),
                    "train.lr": [1e-4 * (i + 1) for i in range(10)], "train.batch_size": list(range(16, 26)),
                    "model.hidden": [[16 + i] for i in range(10)], "train.epochs": list(range(1, 11)),
                    "loss.free_bits": [0.1 * i for i in range(10)], "eval.tsne_points": list(range(100, 110))}}}
        path = self.spec_file("huge", yaml.safe_dump(grid))
        self.probe("spec", "grid of 10^8 points", [*VAELAB, "sweep", str(path), "--dry-run"])
        path = self.spec_file("newline", yaml.safe_dump(self.base(name="abc\n")))
        self.probe("spec", "name with a trailing newline", [*VAELAB, "train", str(path), "--dry-run"])
        path = self.spec_file("pyobj", "name: x\ndescription: !!python/object/apply:os.system ['id']\n")
        self.probe("spec", "a python object tag", [*VAELAB, "train", str(path), "--dry-run"])
        path = self.spec_file("typo", yaml.safe_dump(self.base(train={"epoch": 3})))
        self.probe("spec", "a mistyped key", [*VAELAB, "train", str(path), "--dry-run"])
        good = self.root / "good.yaml"
        self.probe("cli", "--set with a non-number", [*VAELAB, "train", str(good), "--set", "model.z_dim=abc",
                                                      "--dry-run"])

    def data_probes(self) -> None:
        from tests.conftest import make_pictures

        pictures = self.root / "pictures"
        make_pictures(pictures, 24)
        (pictures / "day" / "broken.png").symlink_to(pictures / "day" / "gone.png")  # skipped with a warning
        blocker = self.root / "a-file"
        blocker.write_text("x")
        folder = {"dataset": "image_folder", "root": str(pictures), "image_size": 16, "channels": 3,
                  "cache_dir": str(blocker / "cache")}
        path = self.spec_file("cachedir", yaml.safe_dump(self.base(data=folder, loss={"likelihood": "gaussian"})))
        self.probe("data", "data.cache_dir under a file (an image folder)", [*VAELAB, "train", str(path),
                                                                            "--no-progress"])
        path = self.spec_file("noroot", yaml.safe_dump(self.base(data={"root": str(self.root / "nowhere")})))
        self.probe("data", "data.root that does not exist", [*VAELAB, "train", str(path), "--no-progress"])

    def checkpoints(self, good: Path) -> None:
        fifo = self.root / "pipe.png"
        os.mkfifo(fifo)
        self.probe("checkpoint", "reconstruct a FIFO named .png", [*VAELAB, "reconstruct", str(good), str(fifo)])
        bomb = self.root / "bomb.png"
        _png_header_bomb(bomb, 20000)
        self.probe("checkpoint", "reconstruct a 400-megapixel PNG bomb",
                   [*VAELAB, "reconstruct", str(good), str(bomb)])
        for name, change in [("run.json that is a list", lambda f: (f / "run.json").write_text("[]")),
                             ("metrics.json that is not JSON", lambda f: (f / "metrics.json").write_text("{")),
                             ("a pickled model.pt", lambda f: _pickled(f / "model.pt")),
                             ("spec.yaml that does not fit the weights", lambda f: _other_z_dim(f / "spec.yaml"))]:
            folder = self._copy(good, name)
            change(folder)
            self.probe("checkpoint", name, [*VAELAB, "sample", str(folder), "--n", "4",
                                            "--out", str(self.root / "s.png")])
        folder = self._copy(good, "other weights")
        _other_weights(folder / "model.pt")
        self.probe("checkpoint", "evaluate a copied folder holding other weights",
                   [*VAELAB, "evaluate", str(folder), "--set", "eval.iw_samples=3"])

    def _copy(self, good: Path, name: str) -> Path:
        folder = self.root / "copies" / name.replace(" ", "_").replace(".", "_")
        shutil.copytree(good, folder)
        return folder

    def stack(self) -> None:
        """A worker's credentials against `vaelab services`: each attack refused by the database."""
        if os.geteuid() != 0 or not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
            print("stack probes skipped: they need root and PostgreSQL's server binaries")
            return
        import psycopg

        services = self.root / "stack"
        services.mkdir()
        services.chmod(0o755)
        ports = [_free_port(), _free_port()]
        log = services / "out.log"
        proc = subprocess.Popen([*VAELAB, "services", "--dir", str(services / "services"), "--pg-port", str(ports[0]),
                                 "--mlflow-port", str(ports[1]), "--only", "postgres"], cwd=services,
                                stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            started = time.monotonic()
            while "Ctrl-C stops the services" not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() - started > 120:
                    raise SystemExit(f"bench-hostile: services did not start:\n{log.read_text()[-2000:]}")
                time.sleep(0.3)
            password = (services / "services" / "pgpass").read_text().split(":")[-1].strip()
            attacks = [("optuna", "COPY (SELECT 1) TO PROGRAM 'id'"), ("optuna", "SELECT pg_read_file('/etc/shadow')"),
                       ("optuna", "CREATE ROLE intruder LOGIN"), ("optuna", "CREATE DATABASE elsewhere"),
                       ("optuna", "GRANT pg_execute_server_program TO vaelab"), ("mlflow", "SELECT 1"),
                       ("postgres", "SELECT 1")]
            for database, attack in attacks:
                started = time.monotonic()
                try:
                    with psycopg.connect(host="127.0.0.1", port=ports[0], user="vaelab", password=password,
                                         dbname=database, autocommit=True, connect_timeout=10) as conn:
                        conn.execute(attack)
                    refused, said = False, "ran"
                except psycopg.Error as err:
                    refused, said = True, str(err).strip().splitlines()[0]
                self.outcomes.append(Outcome("stack", f"worker role: `{attack}` on {database}", 0, 1,
                                             time.monotonic() - started, 0.0, refused, said[:160]))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pickled(path: Path) -> None:
    import torch

    torch.save({"weights": os.system}, path)  # a pickle that would call a function if it were unpickled


def _other_z_dim(path: Path) -> None:
    spec = yaml.safe_load(path.read_text())
    (spec["base"] if "base" in spec else spec)["model"]["z_dim"] = 7
    path.write_text(yaml.safe_dump(spec))


def _other_weights(path: Path) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    torch.save({k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "HOSTILE.md")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="vaelab-bench-hostile-"))
    root.chmod(0o755)
    try:
        bench = Bench(root)
        good = bench.train_one()
        before = bench.store_snapshot()
        steps: list[Callable[[], None]] = [bench.specs, bench.data_probes, lambda: bench.checkpoints(good), bench.stack]
        for step in steps:
            step()
        kept = bench.store_snapshot() == before
    finally:
        shutil.rmtree(root, ignore_errors=True)
    outcomes = bench.outcomes
    refused = sum(o.refused for o in outcomes)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    rows = ["| kind | probe | exit | stderr lines | s | refused | what it said |", "|---|---|---:|---:|---:|---|---|"]
    for o in outcomes:
        said = o.said.replace("|", "\\|").replace("`", "'")
        rows.append(f"| {o.kind} | {o.probe} | {o.code} | {o.lines} | {o.seconds:.1f} | "
                    f"{'yes' if o.refused else '**no**'} | {said} |")
    args.out.write_text("\n".join([
        "# Hostile inputs",
        "",
        f"`make bench-hostile` on {datetime.date.today()} ({machine}): each probe runs a real `vaelab` command "
        "beside a tracking store holding one finished run. A probe is refused when the command exits 2 with one "
        "line on stderr and no traceback (stack probes: when the database refuses a worker's credentials). "
        "Seconds include starting Python and importing torch (about 2 s).",
        "",
        f"**{refused} of {len(outcomes)} probes refused; the finished run's record "
        f"{'unchanged' if kept else 'CHANGED'} afterwards.** Peak memory of any probe process: "
        f"{max(o.peak_mb for o in outcomes):.0f} MB.",
        "",
        *rows,
        "",
    ]))
    print(f"{refused} of {len(outcomes)} refused; store {'unchanged' if kept else 'CHANGED'}; wrote {args.out}")
    return 0 if refused == len(outcomes) and kept else 1


if __name__ == "__main__":
    sys.exit(main())
