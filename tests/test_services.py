"""`vaelab services` as an attacker with a worker's credentials, and as a careless operator, would find it:
the workers' database role can do nothing beyond the Optuna database, neither server runs as root or with
root's group, a kill -9 of the command leaves no server behind, an unreachable folder is one line before
anything starts, and a services folder made by the older code (the workers' role its superuser) is
migrated on start. Real PostgreSQL and MLflow servers on loopback; root only (`make test-cluster`)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.netns import _descendants
from tests.conftest import REPO
from vaelab.errors import UsageError
from vaelab.ops.serve import check_port_free
from vaelab.ops.server_user import ServerUser, first_blocked
from vaelab.ops.services import Layout, _how_to_connect


def services_skip_reason() -> str | None:
    """Why `vaelab services` cannot run its servers here as their own users, or None."""
    if os.geteuid() != 0:
        return "needs root (the servers drop to their own users)"
    if not list(Path("/usr/lib/postgresql").glob("*/bin/postgres")):
        return "needs PostgreSQL's server binaries (apt-get install postgresql)"
    blocked = first_blocked(ServerUser.named("nobody"), Path(sys.executable).resolve().parent)
    if blocked is not None:
        return f"the MLflow server's user cannot reach this Python ({blocked} is closed; .ci/run opens it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Services:
    """One `vaelab services` command on loopback, in a folder the servers' users can reach."""

    def __init__(self, root: Path):
        self.root, self.folder = root, root / "services"
        self.pg_port, self.mlflow_port = _free_port(), _free_port()
        self.proc: subprocess.Popen | None = None
        self.log = root / "services.out"

    def start(self, *args: str, wait_for: str = "Ctrl-C stops the services") -> None:
        before = self.log.read_text(errors="replace").count(wait_for) if self.log.exists() else 0
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "VAELAB_", "PG"))}
        env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vaelab", "services", "--dir", str(self.folder), "--pg-port", str(self.pg_port),
             "--mlflow-port", str(self.mlflow_port), "--workers", "1", *args],
            cwd=self.root, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        while self.log.read_text(errors="replace").count(wait_for) == before:  # this start's own line
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() - started < 180, self.log.read_text()[-3000:]
            time.sleep(0.3)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(timeout=60)

    def connect(self, user: str, password_file: str, dbname: str):
        import psycopg

        password = (self.folder / password_file).read_text().split(":")[-1].strip()
        return psycopg.connect(host="127.0.0.1", port=self.pg_port, user=user, password=password, dbname=dbname,
                               connect_timeout=10, autocommit=True)


@pytest.fixture
def root() -> Iterator[Path]:
    reason = services_skip_reason()
    if reason:
        pytest.skip(f"services tests: {reason}")
    path = Path(tempfile.mkdtemp(prefix="vaelab-services-"))
    path.chmod(0o755)  # mkdtemp's 0700 would keep the servers' users out (a test below checks that refusal)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def services(root: Path) -> Iterator[Services]:
    stack = Services(root)
    yield stack
    stack.stop()


def _ids(pid: int) -> dict[str, list[int]]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: [int(x) for x in line.split(":")[1].split()]
            for line in status if line.startswith(("Uid:", "Gid:", "Groups:"))}


def _alive(pids: list[int]) -> dict[int, tuple[str, dict[str, list[int]]]]:
    """Each process of `pids` still running: its program and ids. A short-lived one (a PostgreSQL backend whose
    connection just closed) may end between the listing and the read: gone, it runs as no one."""
    alive = {}
    for pid in pids:
        try:
            alive[pid] = (Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(), _ids(pid))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return alive


@pytest.mark.cluster
def test_workers_role_reaches_only_optuna_and_no_server_is_root(services: Services):
    import psycopg

    services.start()
    with services.connect("vaelab", "pgpass", "optuna") as conn:
        assert conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                            "WHERE rolname = current_user").fetchone() == (False, False, False)
        conn.execute("CREATE TABLE made_by_a_worker (a int)")  # Optuna makes its own tables: that it may
        conn.execute("DROP TABLE made_by_a_worker")
        for attack in ["COPY (SELECT 1) TO PROGRAM 'id'", "COPY (SELECT 1) TO '/tmp/vaelab-owned'",
                       "SELECT pg_read_file('/etc/shadow')", "CREATE ROLE intruder LOGIN",
                       "CREATE DATABASE elsewhere", "GRANT pg_execute_server_program TO vaelab"]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(attack)
    for database in ("mlflow", "mlflow_auth", "postgres"):
        with pytest.raises(psycopg.OperationalError):
            services.connect("vaelab", "pgpass", database)
    with pytest.raises(psycopg.OperationalError):  # the superuser's password is useless over the network
        services.connect("vaelab_admin", "admin-pgpass", "postgres")

    assert services.proc is not None
    alive = _alive(_descendants(services.proc.pid))
    names = {pid: name for pid, (name, _) in alive.items()}
    assert any("postgres" in n for n in names.values()) and any("python" in n for n in names.values()), names
    for name, ids in alive.values():  # the servers and every process they started
        assert 0 not in ids["Uid"] + ids["Gid"] + ids["Groups"], (name, ids)


@pytest.mark.cluster
def test_kill_9_of_services_leaves_no_server_and_the_next_start_works(services: Services):
    import optuna

    services.start()
    os.environ["PGPASSFILE"] = str(services.folder / "pgpass")
    try:
        storage = f"postgresql://vaelab@127.0.0.1:{services.pg_port}/optuna"
        optuna.create_study(study_name="kept", storage=storage)
        services.stop(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (_listening(services.pg_port) or _listening(services.mlflow_port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _listening(services.pg_port) and not _listening(services.mlflow_port)
        services.start()
        assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["kept"]
    finally:
        os.environ.pop("PGPASSFILE", None)


@pytest.mark.cluster
def test_a_folder_the_servers_cannot_reach_is_one_line_before_anything_starts(root: Path):
    closed = root / "private"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vaelab", "services", "--dir", str(closed / "services"),
                           "--pg-port", str(_free_port()), "--mlflow-port", str(_free_port())],
                          capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(closed) in lines[0] and "chmod o+x" in lines[0], done.stderr
    assert time.monotonic() - started < 30
    assert not (closed / "services" / "postgres").exists()  # no cluster half-made


def _old_stack(folder: Path, port: int, password: str) -> None:
    """A services folder as the code before least privilege made it: `initdb -U vaelab` (the workers' role
    the bootstrap superuser), every host allowed by password, the databases owned by that role, an Optuna
    study in one."""
    import optuna
    import psycopg

    bin_dir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    pgdata = folder / "postgres"
    pgdata.mkdir(parents=True)
    shutil.chown(pgdata, "postgres", "postgres")
    pgdata.chmod(0o700)
    pwfile = folder / "pw"
    pwfile.write_text(password + "\n")
    shutil.chown(pwfile, "postgres")
    postgres = ServerUser.named("postgres").popen_kwargs()
    subprocess.run([str(bin_dir / "initdb"), "-D", str(pgdata), "-U", "vaelab", "-A", "scram-sha-256",
                    f"--pwfile={pwfile}"], check=True, capture_output=True, **postgres)
    pwfile.unlink()
    (pgdata / "pg_hba.conf").write_text("local all all scram-sha-256\nhost all all 0.0.0.0/0 scram-sha-256\n")
    (folder / "pgpass").write_text(f"*:*:*:vaelab:{password}\n")
    (folder / "pgpass").chmod(0o600)
    server = subprocess.Popen([str(bin_dir / "postgres"), "-D", str(pgdata), "-c", "listen_addresses=127.0.0.1",
                               "-c", f"port={port}", "-c", f"unix_socket_directories={pgdata}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **postgres)
    try:
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(0.5)
        with psycopg.connect(host="127.0.0.1", port=port, user="vaelab", password=password, dbname="postgres",
                             autocommit=True) as conn:
            for name in ("optuna", "mlflow", "mlflow_auth"):
                conn.execute(f"CREATE DATABASE {name}")
        storage = f"postgresql://vaelab:{password}@127.0.0.1:{port}/optuna"
        study = optuna.create_study(study_name="old", storage=storage)
        study.enqueue_trial({"x": 1.0})
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


@pytest.mark.cluster
def test_an_older_services_folder_is_migrated_to_the_new_roles(services: Services):
    import optuna

    _old_stack(services.folder, services.pg_port, "old-workers-password")
    services.start("--only", "postgres", wait_for="Ctrl-C stops the services")
    assert "roles migrated" in services.log.read_text()
    assert (services.folder / "pgpass").read_text().strip().endswith(":old-workers-password")  # workers' files hold
    with services.connect("vaelab", "pgpass", "optuna") as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (False,)
        # the study made by the superuser is the workers' role's now: it can write to its tables
        conn.execute("UPDATE studies SET study_name = study_name")
    storage = f"postgresql://vaelab:old-workers-password@127.0.0.1:{services.pg_port}/optuna"
    study = optuna.load_study(study_name="old", storage=storage)
    study.tell(study.ask(), 1.0)
    assert len(study.trials) == 1
    services.stop()
    services.start("--only", "postgres")  # a second start finds the new roles and changes nothing
    assert services.log.read_text().count("roles migrated") == 1


def test_a_taken_port_names_the_flag_that_chose_it():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(UsageError, match=f"^--pg-port {port}: .* pass another --pg-port$"):
            check_port_free("127.0.0.1", port, "--pg-port")


def test_listening_on_every_interface_prints_a_name_workers_can_use(tmp_path: Path):
    said = _how_to_connect(Layout(tmp_path, "0.0.0.0", 5432, 5000))
    assert "0.0.0.0" not in said and socket.getfqdn() in said
