"""Workers on separate hosts and the faults a cluster has, on the stack `vaelab services` starts.

The services (PostgreSQL; an MLflow server with basic auth and proxied artifacts) run in one network
namespace, each worker in another, joined only by veth links (tests/cluster/netns.py): workers reach
the services over that network alone, with the credentials files `vaelab services` wrote. Each fault
test ends with every grid point FINISHED exactly once in MLflow and COMPLETE once in Optuna, and every
per-epoch metric of the finished runs present once. Root only (`make test-cluster`); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.cluster.netns import Network, can_make_namespaces, stop, wait_for_line
from tests.conftest import REPO, make_idx_folder
from tests.test_services import services_skip_reason

pytestmark = pytest.mark.cluster

EPOCHS = 10  # every test's sweep: 4 runs of 10 epochs, so their wall times compare
GRID = {"kind": "grid", "params": {"loss.beta": [0.5, 2.0]}, "seeds": [0, 1]}
TIMINGS: dict[str, float] = {}  # sweep wall seconds per test, printed at the end (the note's figures)


def _skip_reason() -> str | None:
    reason = can_make_namespaces()
    if reason:
        return reason
    return services_skip_reason()


class Stack:
    """The services host and two worker hosts of one test module, with what each host needs on disk."""

    def __init__(self, net: Network, root: Path):
        self.net, self.root = net, root
        self.services = root / "services"
        self.data = make_idx_folder(root / "data", n_train=3000, n_test=100)  # a few seconds an epoch
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("MLFLOW_", "VAELAB_", "PG")) and k not in ("HOME",)}
        self.env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", HOME=str(root / "svc-home"))
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}

    # ---- the services ------------------------------------------------------------------------------
    def start(self, which: str) -> None:
        log = self.root / f"{which}.log"
        port = ["--pg-port", "5432"] if which == "postgres" else ["--mlflow-port", "5000"]
        self.procs[which] = self.net.start(
            self.net.svc, [sys.executable, "-m", "vaelab", "services", "--only", which, "--host", self.net.svc_ip,
                           *port, "--dir", str(self.services), "--workers", "2"], self.env, self.root, log)
        ready = "PostgreSQL: ready" if which == "postgres" else "MLflow server: ready"
        wait_for_line(log, ready, self.procs[which], timeout=180, count=self.starts.get(which, 0) + 1)
        self.starts[which] = self.starts.get(which, 0) + 1  # a restart waits for its own ready line

    def kill(self, which: str, sig: int = signal.SIGKILL) -> None:
        """The service's process group (the server and its workers) goes, as when its machine fails."""
        stop(self.procs.pop(which), sig)

    @property
    def storage(self) -> str:
        return f"postgresql://vaelab@{self.net.svc_ip}:5432/optuna"

    @property
    def tracking(self) -> str:
        return f"http://{self.net.svc_ip}:5000"

    # ---- worker hosts ------------------------------------------------------------------------------
    def host_env(self, k: int, mlflow_password: str | None = None, db_password: str | None = None,
                 tracking: str | None = None, storage: str | None = None) -> tuple[dict[str, str], Path]:
        """Worker host k's environment and working folder: its own HOME holding the credentials files
        (or wrong ones), the shared URLs exported, its own runs/ (resume state is per machine)."""
        host = self.root / f"host{k}"
        home = host / "home"
        (home / ".mlflow").mkdir(parents=True, exist_ok=True)
        pgpass = (self.services / "pgpass").read_text()
        credentials = (self.services / "mlflow-credentials").read_text()
        # Any port: a worker may reach the database through a proxy.
        pgpass = "".join(":".join([line.split(":")[0], "*", *line.split(":")[2:4], db_password or line.split(":")[4]])
                         + "\n" for line in pgpass.splitlines())
        if mlflow_password is not None:
            credentials = "\n".join(f"mlflow_tracking_password = {mlflow_password}" if "password" in line
                                    else line for line in credentials.splitlines())
        for path, text in ((home / ".pgpass", pgpass), (home / ".mlflow" / "credentials", credentials)):
            path.write_text(text)
            path.chmod(0o600)
        env = {**self.env, "HOME": str(home), "VAELAB_STORAGE": storage or self.storage,
               "MLFLOW_TRACKING_URI": tracking or self.tracking}
        return env, host

    def spec(self, name: str, epochs: int = EPOCHS) -> Path:
        body = {"name": name, "base": {
            "data": {"dataset": "mnist", "root": str(self.data), "download": False},
            "model": {"z_dim": 3, "hidden": [64]},
            "train": {"epochs": epochs, "batch_size": 32, "device": "cpu", "patience": None},
            "eval": {"figures": False, "iw_samples": 0, "probe": False}}, "search": GRID}
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(body))
        return path

    def worker(self, k: int, spec: Path, *args: str, **env_changes) -> tuple[subprocess.Popen, Path]:
        env, host = self.host_env(k, **env_changes)
        log = host / f"worker-{spec.stem}.log"
        proc = self.net.start(self.net.workers[k], [sys.executable, "-m", "vaelab", "worker", str(spec),
                                                    "--threads", "1", *args], env, host, log)
        return proc, log

    def inspect(self, name: str) -> dict:
        env, _ = self.host_env(0)
        done = self.net.run(self.net.svc, [sys.executable, str(REPO / "tests" / "cluster" / "inspect_sweep.py"),
                                           name], env, self.root)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    def wait_until_training(self, name: str, k: int | None = None, timeout: float = 180) -> None:
        """Until a worker (host k's, if given) has saved the state of a trained epoch: its MLflow run is
        open and its trial mid-way. Read from the host's own disk (runs/resume/NAME/<run>/state.pt), which
        costs nothing, so no short trial slips past between two looks."""
        hosts = [k] if k is not None else list(range(len(self.net.workers)))
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if any(list((self.root / f"host{h}" / "runs" / "resume" / name).glob("*/state.pt")) for h in hosts):
                return
            time.sleep(0.2)
        raise AssertionError(f"no trial of {name} trained an epoch within {timeout} s")


def finish(workers: list[tuple[subprocess.Popen, Path]], timeout: float = 600) -> list[str]:
    outputs = []
    for proc, log in workers:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc, signal.SIGKILL)
        outputs.append(log.read_text(errors="replace"))
    assert [p.returncode for p, _ in workers] == [0] * len(workers), "\n\n".join(o[-4000:] for o in outputs)
    return outputs


def assert_each_point_finished_once(seen: dict, n_points: int = 4, epochs: int = EPOCHS) -> None:
    trials = seen["trials"]
    complete = Counter(t["point"] for t in trials if t["state"] == "COMPLETE")
    assert len(complete) == n_points and set(complete.values()) == {1}, trials
    finished = [r for r in seen["runs"] if r["status"] == "FINISHED"]
    assert Counter(r["point"] for r in finished) == Counter(dict.fromkeys(complete, 1)), seen["runs"]
    for run in finished:  # every per-epoch metric once, none missing
        for key, steps in run["steps"].items():
            assert sorted(steps) == list(range(1, epochs + 1)), (run["run"], key, steps)
    assert not [r for r in seen["runs"] if r["status"] == "RUNNING"], seen["runs"]


@pytest.fixture(scope="module")
def stack():
    reason = _skip_reason()
    if reason:
        pytest.skip(f"cluster tests: {reason}")
    root = Path(tempfile.mkdtemp(prefix="vaelab-cluster-"))
    root.chmod(0o755)  # the database server runs as the postgres user and must reach its data folder
    try:
        with Network(n_workers=2) as net:
            stack = Stack(net, root)
            stack.start("postgres")
            stack.start("mlflow")
            yield stack
            for name in list(stack.procs):
                stack.kill(name, signal.SIGTERM)
    finally:
        if TIMINGS:
            print("\ncluster sweep timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in TIMINGS.items()))
        shutil.rmtree(root, ignore_errors=True)


def test_workers_on_two_hosts_share_the_stack(stack: Stack):
    spec = stack.spec("hosts")
    started = time.monotonic()
    outputs = finish([stack.worker(k, spec) for k in range(2)])
    TIMINGS["no fault"] = time.monotonic() - started
    seen = stack.inspect("hosts")
    assert_each_point_finished_once(seen)
    assert {str(t["worker"]).split(":")[0] for t in seen["trials"]} <= set(stack.net.workers)
    assert sum(int(o.split(" ran ")[1].split()[0]) for o in outputs) == 4


@pytest.mark.parametrize("change, says", [
    ({"mlflow_password": "not-the-password"}, "refused the credentials"),
    ({"db_password": "not-the-password"}, "the password was refused"),
    ({"tracking": "https://{svc}:5000"}, "the TLS handshake failed"),
    ({"tracking": "http://{unused}:5000"}, "is unreachable"),
])
def test_a_worker_with_bad_credentials_or_address_is_refused_in_one_line(stack: Stack, change: dict, says: str):
    change = {k: v.format(svc=stack.net.svc_ip, unused=stack.net.unused_ip) for k, v in change.items()}
    name = f"refused_{abs(hash(says)) % 10**6}"
    proc, log = stack.worker(0, stack.spec(name), **change)
    proc.wait(timeout=180)
    output = log.read_text().strip()
    assert proc.returncode == 2, output
    assert output.count("\n") == 0 and says in output, output
    assert "not-the-password" not in output
    assert not stack.inspect(name)["study"]  # nothing recorded half-way


def test_a_database_user_without_privileges_is_refused_in_one_line(stack: Stack):
    # A role that may log in to a database of the stack but not create tables in it (PostgreSQL 15's
    # default for the public schema), as a lab's read-only account would be.
    # Set up as the stack's superuser, which logs in only through the socket in the data folder (the
    # workers' role may create no role or database); the new role gets its own pg_hba rule.
    env, host = stack.host_env(0)
    pgdata = stack.services / "postgres"
    with open(pgdata / "pg_hba.conf", "a") as hba:
        hba.write("host optuna_ro reader all scram-sha-256\n")
    setup = ["CREATE ROLE reader LOGIN PASSWORD 'reader-pw'", "CREATE DATABASE optuna_ro",
             "GRANT CONNECT ON DATABASE optuna_ro TO reader", "SELECT pg_reload_conf()"]
    admin = {**env, "PGPASSFILE": str(stack.services / "admin-pgpass")}
    done = stack.net.run(stack.net.svc, ["psql", "-h", str(pgdata), "-U", "vaelab_admin", "-d", "postgres", "-v",
                                         "ON_ERROR_STOP=1", *[a for sql in setup for a in ("-c", sql)]], admin, host)
    assert done.returncode == 0, done.stderr
    pgpass = Path(env["HOME"]) / ".pgpass"
    pgpass.write_text(pgpass.read_text() + f"{stack.net.svc_ip}:*:*:reader:reader-pw\n")
    spec = stack.spec("no_privileges")
    storage = f"postgresql://reader@{stack.net.svc_ip}:5432/optuna_ro"
    proc = stack.net.start(stack.net.workers[0], [sys.executable, "-m", "vaelab", "worker", str(spec)],
                           {**env, "VAELAB_STORAGE": storage}, host, host / "no_privileges.log")
    proc.wait(timeout=180)
    output = (host / "no_privileges.log").read_text().strip()
    assert proc.returncode == 2 and output.count("\n") == 0, output
    assert "may not create or change Optuna's tables" in output and "reader-pw" not in output, output


def test_the_mlflow_server_killed_and_back_30_s_later_costs_no_trial(stack: Stack):
    spec = stack.spec("mlflow_restart")
    started = time.monotonic()
    workers = [stack.worker(k, spec) for k in range(2)]
    stack.wait_until_training("mlflow_restart")
    stack.kill("mlflow")
    time.sleep(30)
    stack.start("mlflow")
    outputs = finish(workers)
    TIMINGS["MLflow server down 30 s"] = time.monotonic() - started
    assert any("tracking server unreachable, Retrying" in o for o in outputs), outputs  # it reached running trials
    assert_each_point_finished_once(stack.inspect("mlflow_restart"))


def test_postgresql_restarted_mid_sweep_costs_no_trial(stack: Stack):
    spec = stack.spec("pg_restart")
    started = time.monotonic()
    workers = [stack.worker(k, spec) for k in range(2)]
    stack.wait_until_training("pg_restart")
    stack.kill("postgres", signal.SIGTERM)  # a clean restart, as an upgrade or a failover does
    time.sleep(10)
    stack.start("postgres")
    outputs = finish(workers)
    TIMINGS["PostgreSQL restarted (10 s down)"] = time.monotonic() - started
    # The outage reached the running trials: their heartbeats, or the storage calls, waited it out.
    assert any("heartbeat not recorded" in o or ("Optuna storage" in o and "retrying" in o) for o in outputs), outputs
    assert_each_point_finished_once(stack.inspect("pg_restart"))


def test_a_worker_cut_off_past_the_grace_period_is_fenced(stack: Stack):
    spec = stack.spec("partition")
    timing = ("--heartbeat-s", "1", "--grace-s", "8")
    started = time.monotonic()
    workers = [stack.worker(k, spec, *timing) for k in range(2)]
    stack.wait_until_training("partition", k=0)
    stack.net.cut(0)
    time.sleep(25)  # host 1 re-queues host 0's trial after 8 s without a heartbeat, and runs it
    stack.net.mend(0)
    outputs = finish(workers)
    TIMINGS["worker cut off 25 s"] = time.monotonic() - started
    fenced = [line for line in outputs[0].splitlines() if "was taken from this worker" in line]
    assert len(fenced) == 1, outputs[0]
    seen = stack.inspect("partition")
    assert_each_point_finished_once(seen)
    reaped = [t for t in seen["trials"] if t["died"]]
    assert reaped, seen["trials"]
    runs = {r["run"]: r for r in seen["runs"]}
    for trial in reaped:  # the cut-off worker finished nothing in, and did not overwrite, the run it lost
        assert runs[trial["run"]]["status"] == "KILLED", runs[trial["run"]]


def test_latency_and_dropped_connections_on_the_way_to_both_services(stack: Stack):
    """100 ms more each way (200 ms round trips), and 5 % of requests cutting their connection, between the
    workers and both services, through tests/cluster/faultproxy.py in the services' namespace."""
    ip, proxy = stack.net.svc_ip, str(REPO / "tests" / "cluster" / "faultproxy.py")
    proxies = []
    for listen, to, seed in ((15432, 5432, 1), (15000, 5000, 2)):
        log = stack.root / f"proxy-{listen}.log"
        command = [sys.executable, proxy, "--listen", f"{ip}:{listen}", "--to", f"{ip}:{to}", "--delay", "0.1",
                   "--drop", "0.05", "--seed", str(seed)]
        proc = stack.net.start(stack.net.svc, command, stack.env, stack.root, log)
        wait_for_line(log, "proxy ready", proc, timeout=30)
        proxies.append((proc, log))
    spec = stack.spec("bad_network")
    started = time.monotonic()
    try:
        finish([stack.worker(k, spec, storage=f"postgresql://vaelab@{ip}:15432/optuna", tracking=f"http://{ip}:15000")
                for k in range(2)], timeout=900)
    finally:
        for proc, _ in proxies:
            stop(proc)
    TIMINGS["200 ms round trips, 5 % of requests cut"] = time.monotonic() - started
    said = [log.read_text().strip().splitlines()[-1] for _, log in proxies]
    print("\n" + "; ".join(said))
    assert all(int(line.split(", ")[1].split()[0]) > 0 for line in said), said  # both services lost connections
    assert_each_point_finished_once(stack.inspect("bad_network"))


def test_the_services_need_passwords_and_keep_them_out_of_sight(stack: Stack):
    # Last in the module: every worker's output and every restart's log is there to be read.
    modes = {p.name: p.stat().st_mode & 0o777 for p in stack.services.iterdir() if p.is_file()}
    assert modes["pgpass"] == modes["mlflow-credentials"] == 0o600
    secrets = [(stack.services / "pgpass").read_text().split(":")[-1].strip(),
               (stack.services / "mlflow-credentials").read_text().split("mlflow_tracking_password = ")[1].split()[0]]
    for proc_dir in Path("/proc").glob("[0-9]*"):  # no process of the stack has a secret on its command line
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        assert not [s for s in secrets if s in cmdline], cmdline
    logs = list(stack.root.rglob("*.log"))  # the services' own logs, the workers' output, the test's
    assert any(p.name == "mlflow.log" for p in logs) and any(p.name == "postgres.log" for p in logs), logs
    for log in logs:
        text = log.read_text(errors="replace")
        assert not [s for s in secrets if s in text], log
