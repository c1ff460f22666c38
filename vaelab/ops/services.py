"""`vaelab services`: the shared stack a lab's workers use — a PostgreSQL server (the Optuna storage and
MLflow's backend store) and an MLflow tracking server with MLflow's basic authentication and proxied
artifacts — bound to one chosen interface, in the foreground until Ctrl-C or SIGTERM.

Least privilege: the workers' database role owns the Optuna database and nothing else, the MLflow server
has a role of its own, and the superuser is used by this command alone, through the data folder's socket
(`vaelab.ops.pg_roles`). Started as root, neither server runs as root or with root's group: PostgreSQL as
`postgres`, MLflow as `vaelab-mlflow` (`vaelab.ops.server_user`). Both stop when this command dies, even by
kill -9, and a next start ends any that outlived it.

Secrets never travel on a command line or into output: each role's password sits in a libpq pgpass file
and the MLflow password in an MLflow credentials file, all mode 0600 in the services folder, and the child
processes get them through files and their environment. Every connection needs a password
(scram-sha-256 for PostgreSQL, HTTP basic auth for MLflow). Neither service encrypts its traffic here:
basic auth sends the password with every request, readable to anyone on the path, so listen beyond
loopback only on a network you trust (a cluster's private network), or put TLS in front (a reverse
proxy for MLflow, PostgreSQL's ssl settings). Workers copy two files (`pgpass`, `mlflow-credentials`) and
export the URLs printed here.
"""

from __future__ import annotations

import configparser
import io
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vaelab.errors import UsageError
from vaelab.ops import pg_roles
from vaelab.ops.serve import check_port_free, stop_group
from vaelab.ops.server_user import (
    ServerUser,
    check_reachable,
    die_with_parent,
    first_blocked,
    forget,
    reap_leftovers,
    record,
    system_user,
)

MLFLOW_USER = "vaelab"  # the MLflow basic-auth account in the credentials file
DATABASES = tuple(pg_roles.OWNERS)
PASSWORD_ENV = "VAELAB_DB_PASSWORD"  # the workers' database password, when a lab sets it itself
MLFLOW_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"  # MLflow's own name for the first admin's password
MLFLOW_SYSTEM_USER = "vaelab-mlflow"  # the account the MLflow server runs as when services start as root
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Layout:
    """Where one stack keeps its state, and where it listens."""

    folder: Path
    host: str
    pg_port: int
    mlflow_port: int

    @property
    def pgpass(self) -> Path:
        """The workers' database credentials (role `vaelab`): the file the README has them copy."""
        return self.folder / "pgpass"

    @property
    def mlflow_pgpass(self) -> Path:
        """The MLflow server's database credentials (role `vaelab_mlflow`)."""
        return self.folder / "mlflow-pgpass"

    @property
    def admin_pgpass(self) -> Path:
        """The database superuser's credentials: `vaelab services` alone reads them; no worker gets them."""
        return self.folder / "admin-pgpass"

    @property
    def credentials(self) -> Path:
        return self.folder / "mlflow-credentials"

    @property
    def pgdata(self) -> Path:
        return self.folder / "postgres"

    @property
    def artifacts(self) -> Path:
        return self.folder / "artifacts"

    @property
    def mlflow_home(self) -> Path:
        return self.folder / "mlflow-home"

    @property
    def auth_config(self) -> Path:
        return self.folder / "basic_auth.ini"

    @property
    def pids(self) -> Path:
        """The servers this stack started, so a next start can end any that outlived a killed one."""
        return self.folder / "pids.json"

    def db_url(self, database: str, user: str = pg_roles.WORKER) -> str:
        """A database's URL, without a password (libpq reads it from PGPASSFILE)."""
        return f"postgresql://{user}@{_url_host(self.host)}:{self.pg_port}/{database}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{_url_host(self.host)}:{self.mlflow_port}"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):  # listening on every interface: workers use the machine's name
        host = socket.getfqdn()
    return f"[{host}]" if ":" in host else host


def _write_secret(path: Path, text: str, owner: ServerUser | None = None) -> None:
    """A file only its owner can read: written to a new 0600 file beside it, then moved into place (a file
    that was there with wider permissions never holds the secret). A file that already says `text` is left
    as it is: a running server reads it as its own user (restarting PostgreSQL alone must not take the MLflow
    server's pgpass away from it)."""
    try:
        if path.is_file() and path.read_text() == text and path.stat().st_mode & 0o077 == 0:
            return
    except OSError:
        pass
    fresh = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    if owner is not None:
        owner.own(fresh)
    os.replace(fresh, path)


def _pgpass_line(role: str, password: str) -> str:
    # Any host name and port: workers reach the database by whatever name or proxy they use.
    return f"*:*:*:{role}:{password}\n"


def ensure_secrets(layout: Layout) -> tuple[pg_roles.Passwords, str]:
    """The database roles' passwords and the MLflow password: those kept in the services folder, else the
    environment's (the workers' role and MLflow), else new random ones, written there (pgpass and MLflow
    credentials formats, mode 0600). Once the stack exists its passwords are the ones it was made with: an
    environment asking for others is refused."""
    layout.folder.mkdir(parents=True, exist_ok=True)
    kept_db, kept_mlflow = _pgpass_password(layout.pgpass, pg_roles.WORKER), _credentials_password(layout.credentials)
    for kept, name in ((kept_db, PASSWORD_ENV), (kept_mlflow, MLFLOW_PASSWORD_ENV)):
        wanted = os.environ.get(name)
        if kept and wanted and wanted != kept:
            raise UsageError(f"{name}: the stack in {layout.folder} was made with another password; change it "
                             "in the service itself, or unset the variable")
    db_password = kept_db or os.environ.get(PASSWORD_ENV) or secrets.token_urlsafe(24)
    mlflow_password = kept_mlflow or os.environ.get(MLFLOW_PASSWORD_ENV) or secrets.token_urlsafe(24)
    for bad in (":", "\\", "\n"):
        if bad in db_password:
            raise UsageError(f"{PASSWORD_ENV}: a pgpass file cannot hold {bad!r}; choose a password without it")
    passwords = pg_roles.Passwords(
        admin=_pgpass_password(layout.admin_pgpass, pg_roles.ADMIN) or secrets.token_urlsafe(24),
        worker=db_password,
        mlflow=_pgpass_password(layout.mlflow_pgpass, pg_roles.MLFLOW) or secrets.token_urlsafe(24))
    _write_secret(layout.pgpass, _pgpass_line(pg_roles.WORKER, passwords.worker))
    _write_secret(layout.admin_pgpass, _pgpass_line(pg_roles.ADMIN, passwords.admin))
    _write_secret(layout.mlflow_pgpass, _pgpass_line(pg_roles.MLFLOW, passwords.mlflow))
    config = configparser.ConfigParser()
    config["mlflow"] = {"mlflow_tracking_username": MLFLOW_USER, "mlflow_tracking_password": mlflow_password}
    text = io.StringIO()
    config.write(text)
    _write_secret(layout.credentials, text.getvalue())
    return passwords, mlflow_password


def _pgpass_password(path: Path, role: str) -> str | None:
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 5 and fields[3] == role:
            return fields[4]
    return None


def _credentials_password(path: Path) -> str | None:
    if not path.is_file():
        return None
    config = configparser.ConfigParser()
    config.read(path)
    return config.get("mlflow", "mlflow_tracking_password", fallback=None)


# ---- who the servers run as ----------------------------------------------------------------------------

def _postgres_user() -> ServerUser | None:
    """PostgreSQL refuses to run as root: as root, the server runs as the `postgres` system user (with its
    own groups, not root's)."""
    if os.geteuid() != 0:
        return None
    try:
        return ServerUser.named("postgres")
    except KeyError:
        raise UsageError("services: PostgreSQL cannot run as root and there is no `postgres` user "
                         "(Debian's postgresql package makes it)") from None


def _mlflow_user() -> ServerUser | None:
    """As root, the MLflow server runs as a system user of its own, never as root."""
    return system_user(MLFLOW_SYSTEM_USER) if os.geteuid() == 0 else None


def _check_reachable(layout: Layout, which: tuple[str, ...], pg_user: ServerUser | None,
                     mlflow_user: ServerUser | None) -> None:
    """Before anything starts: each server's user can reach the services folder, and the MLflow server's
    user the Python that runs it."""
    if pg_user is not None and "postgres" in which:
        check_reachable(pg_user, layout.folder, "database server", "--dir")
    if mlflow_user is not None and "mlflow" in which:
        check_reachable(mlflow_user, layout.folder, "MLflow server", "--dir")
        # The interpreter's real home (a venv's python is a link to it) and the installed packages.
        for path in (Path(sys.executable).resolve().parent, Path(sys.base_prefix), Path(__file__).parent):
            blocked = first_blocked(mlflow_user, path)
            if blocked is not None:
                raise UsageError(f"services: the MLflow server runs as the user {mlflow_user.name!r}, which "
                                 f"cannot enter {blocked} on the way to vaelab's Python ({path}); install vaelab "
                                 f"where other users can read it, or `chmod o+x {blocked}`")


# ---- PostgreSQL ------------------------------------------------------------------------------------------

def postgres_bin() -> Path:
    """The folder of Debian's newest PostgreSQL server binaries (or the first on PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("postgres")
    if on_path:
        return Path(on_path).parent
    raise UsageError("services: no PostgreSQL server found (Debian: apt-get install postgresql)")


def init_postgres(layout: Layout, admin_password: str, user: ServerUser | None) -> None:
    """A new database cluster in the services folder (once), its bootstrap superuser the admin role."""
    if (layout.pgdata / "PG_VERSION").is_file():
        return
    layout.pgdata.mkdir(parents=True, exist_ok=True)
    pwfile = layout.folder / ".initdb-password"
    _write_secret(pwfile, admin_password + "\n", owner=user)
    try:
        if user:
            user.own(layout.pgdata)
        os.chmod(layout.pgdata, 0o700)
        subprocess.run([str(postgres_bin() / "initdb"), "-D", str(layout.pgdata), "-U", pg_roles.ADMIN, "-A",
                        "scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-instructions"],
                       check=True, capture_output=True, text=True, **(user.popen_kwargs() if user else {}))
    except subprocess.CalledProcessError as err:
        raise UsageError(f"services: initdb failed: {(err.stderr or err.stdout).strip().splitlines()[-1]}") \
            from None
    finally:
        pwfile.unlink(missing_ok=True)


def write_hba(layout: Layout, user: ServerUser | None) -> None:
    """Who may connect from where, rewritten on every start (so an older stack's open rules go)."""
    path = layout.pgdata / "pg_hba.conf"
    fresh = path.with_name("pg_hba.conf.new")
    fresh.write_text(pg_roles.hba_rules())
    fresh.chmod(0o600)
    if user:
        user.own(fresh)
    os.replace(fresh, path)


def postgres_command(layout: Layout) -> list[str]:
    return [str(postgres_bin() / "postgres"), "-D", str(layout.pgdata), "-c", f"listen_addresses={layout.host}",
            "-c", f"port={layout.pg_port}", "-c", f"unix_socket_directories={layout.pgdata}",
            "-c", "max_connections=200", "-c", "password_encryption=scram-sha-256"]


# ---- MLflow ----------------------------------------------------------------------------------------------

def write_auth_config(layout: Layout, user: ServerUser | None) -> None:
    """MLflow's basic-auth settings: the vaelab user as the admin, users in the auth database (reached as
    the MLflow server's own role), credential checks cached for a minute (each check is a PBKDF2 hash:
    without the cache, workers' per-epoch writes spend most of a small server's CPU on it)."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "READ",
        "database_uri": layout.db_url("mlflow_auth", pg_roles.MLFLOW),
        "admin_username": MLFLOW_USER,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "auth_cache_ttl_seconds": "60",
    }
    text = io.StringIO()
    config.write(text)
    _write_secret(layout.auth_config, text.getvalue(), owner=user)


def mlflow_command(layout: Layout, workers: int, names: tuple[str, ...] = ()) -> list[str]:
    """The server's command line (no secret on it). It answers requests addressed to its own address, to
    loopback and to `names` (the DNS names workers use), on any port (a proxy may sit in between): MLflow's
    guard against DNS rebinding stays on."""
    own = [layout.host] if layout.host not in ("0.0.0.0", "::") else [socket.gethostname(), socket.getfqdn()]
    hosts = ",".join(dict.fromkeys(h for name in (*own, "localhost", "127.0.0.1", *names)
                                   for h in (name, f"{name}:*")))
    return [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", layout.host,
            "--port", str(layout.mlflow_port), "--workers", str(workers),
            "--backend-store-uri", layout.db_url("mlflow", pg_roles.MLFLOW), "--serve-artifacts",
            "--artifacts-destination", layout.artifacts.resolve().as_uri(), "--allowed-hosts", hosts]


def _flask_secret(layout: Layout) -> str:
    """The key MLflow's auth app signs its CSRF tokens with: one per stack, kept across restarts (the same
    for all its server workers)."""
    path = layout.folder / "flask-secret"
    if not path.is_file():
        _write_secret(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def mlflow_env(layout: Layout, mlflow_password: str) -> dict[str, str]:
    return {"MLFLOW_FLASK_SERVER_SECRET_KEY": _flask_secret(layout),
            "PGPASSFILE": str(layout.mlflow_pgpass.resolve()), "HOME": str(layout.mlflow_home.resolve()),
            "MLFLOW_AUTH_CONFIG_PATH": str(layout.auth_config.resolve()), MLFLOW_PASSWORD_ENV: mlflow_password,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _prepare_mlflow_files(layout: Layout, user: ServerUser | None) -> None:
    """The folders and the one credentials file the MLflow server needs, owned by the user it runs as."""
    for folder in (layout.artifacts, layout.mlflow_home):
        folder.mkdir(parents=True, exist_ok=True)
    if user is not None:
        user.own(layout.mlflow_pgpass, layout.mlflow_home)
        for path in [layout.artifacts, *layout.artifacts.rglob("*")]:  # an older stack's artifacts were root's
            os.lchown(path, user.uid, user.gid)


# ---- running them ----------------------------------------------------------------------------------------

def _answers(host: str, port: int) -> bool:
    host = "127.0.0.1" if host == "0.0.0.0" else "::1" if host == "::" else host
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return lines[-1][:300] if lines else "no output"


def _wait_ready(proc: subprocess.Popen, host: str, port: int, what: str, log_path: Path) -> None:
    started = time.monotonic()
    while not _answers(host, port):
        if proc.poll() is not None:
            raise UsageError(f"services: {what} exited with code {proc.returncode} before it answered "
                             f"({log_path}: {_log_tail(log_path)})")
        if time.monotonic() - started > READY_TIMEOUT_S:
            raise UsageError(f"services: {what} did not answer on {host}:{port} within "
                             f"{READY_TIMEOUT_S:.0f} s")
        time.sleep(0.2)


def _start(layout: Layout, name: str, command: list[str], user: ServerUser | None, stop_signal: int,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """A server in a process group of its own, as `user`, that stops when this process dies (even by
    kill -9), and is recorded so a next start can end it should it outlive us anyway."""
    with open(layout.folder / f"{name}.log", "a") as log_file:
        proc = subprocess.Popen(command, start_new_session=True, stdout=log_file, stderr=log_file, env=env,
                                cwd=layout.folder, preexec_fn=die_with_parent(stop_signal),
                                **(user.popen_kwargs() if user else {}))
    record(layout.pids, name, proc)
    return proc


def run_services(layout: Layout, which: tuple[str, ...] = ("postgres", "mlflow"), workers: int = 2,
                 names: tuple[str, ...] = ()) -> int:
    """Start the chosen services, say how workers reach them, and keep them up until stopped.
    A service that exits on its own ends the others and the command (exit 1)."""
    pg_user = _postgres_user() if "postgres" in which else None
    mlflow_user = _mlflow_user() if "mlflow" in which else None
    layout.folder.mkdir(parents=True, exist_ok=True)
    _check_reachable(layout, which, pg_user, mlflow_user)
    ended = reap_leftovers(layout.pids)
    if ended:
        print(f"services: ended what an earlier start left running: {', '.join(ended)}", flush=True)
    for name, port, flag in (("postgres", layout.pg_port, "--pg-port"), ("mlflow", layout.mlflow_port,
                                                                           "--mlflow-port")):
        if name in which:
            check_port_free(layout.host, port, flag)
    passwords, mlflow_password = ensure_secrets(layout)
    procs: dict[str, subprocess.Popen] = {}
    try:
        if "postgres" in which:
            init_postgres(layout, passwords.admin, pg_user)
            write_hba(layout, pg_user)
            procs["postgres"] = _start(layout, "postgres", postgres_command(layout), pg_user, signal.SIGINT)
            _wait_ready(procs["postgres"], layout.host, layout.pg_port, "PostgreSQL",
                        layout.folder / "postgres.log")
            pg_roles.provision(layout.pgdata, layout.pg_port, passwords)
            print(f"PostgreSQL: ready on {_url_host(layout.host)}:{layout.pg_port} (data in {layout.pgdata}, log "
                  f"{layout.folder / 'postgres.log'}; workers log in as {pg_roles.WORKER}, which owns the "
                  f"optuna database and nothing else)", flush=True)
        if "mlflow" in which:
            write_auth_config(layout, mlflow_user)
            _prepare_mlflow_files(layout, mlflow_user)
            procs["mlflow"] = _start(layout, "mlflow", mlflow_command(layout, workers, names), mlflow_user,
                                     signal.SIGTERM, env={**os.environ, **mlflow_env(layout, mlflow_password)})
            _wait_ready(procs["mlflow"], layout.host, layout.mlflow_port, "MLflow server",
                        layout.folder / "mlflow.log")
            print(f"MLflow server: ready on {layout.tracking_uri} (basic auth; artifacts in {layout.artifacts}, "
                  f"log {layout.folder / 'mlflow.log'})", flush=True)
        print(_how_to_connect(layout), flush=True)
        while True:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    print(f"vaelab: error: {name} exited with code {proc.returncode}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (vaelab.cli turns it into KeyboardInterrupt)
        print("\nservices: stopped", file=sys.stderr)
        return 0
    finally:
        for name, proc in reversed(list(procs.items())):  # the MLflow server before the database it writes to
            # PostgreSQL's fast shutdown (SIGINT) ends its sessions cleanly; SIGTERM would wait for every client.
            stop_group(proc, signal.SIGINT if name == "postgres" else signal.SIGTERM)
            forget(layout.pids, name)


def _how_to_connect(layout: Layout) -> str:
    return "\n".join([
        "On each worker machine (the passwords are in the two files, never in these lines):",
        f"  copy {layout.pgpass} to ~/.pgpass (or export PGPASSFILE=<its path>), mode 0600",
        f"  copy {layout.credentials} to ~/.mlflow/credentials, mode 0600",
        f"  export VAELAB_STORAGE={layout.db_url('optuna')}",
        f"  export MLFLOW_TRACKING_URI={layout.tracking_uri}",
        "  vaelab worker experiments/<name>.yaml",
        f"Keep {layout.admin_pgpass.name} and {layout.mlflow_pgpass.name} on this machine: they are the database's "
        "superuser and the MLflow server's own role.",
        "Ctrl-C stops the services.",
    ])
