"""`vaelab services`: the shared stack a lab's workers use — a PostgreSQL server (the Optuna storage and
MLflow's backend store) and an MLflow tracking server with MLflow's basic authentication and proxied
artifacts — bound to one chosen interface, in the foreground until Ctrl-C or SIGTERM.

Secrets never travel on a command line or into output: the database password sits in a libpq pgpass
file and the MLflow password in an MLflow credentials file, both mode 0600 in the services folder, and
the child processes get them through files and their environment. Every connection needs a password
(scram-sha-256 for PostgreSQL, HTTP basic auth for MLflow). Neither service encrypts its traffic here:
basic auth sends the password with every request, readable to anyone on the path, so listen beyond
loopback only on a network you trust (a cluster's private network), or put TLS in front (a reverse
proxy for MLflow, PostgreSQL's ssl settings). Workers copy the two files (or set the environment
variables) and export the URLs printed here.
"""

from __future__ import annotations

import configparser
import io
import os
import pwd
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
from vaelab.serve import check_port_free, stop_group

DB_USER = "vaelab"
DATABASES = ("optuna", "mlflow", "mlflow_auth")
PASSWORD_ENV = "VAELAB_DB_PASSWORD"  # the database role's password, when a lab sets it itself
MLFLOW_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"  # MLflow's own name for the first admin's password
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
        return self.folder / "pgpass"

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
    def auth_config(self) -> Path:
        return self.folder / "basic_auth.ini"

    def db_url(self, database: str) -> str:
        """A database's URL, without a password (libpq reads it from PGPASSFILE)."""
        return f"postgresql://{DB_USER}@{_url_host(self.host)}:{self.pg_port}/{database}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{_url_host(self.host)}:{self.mlflow_port}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _write_secret(path: Path, text: str) -> None:
    """A file only its owner can read: written to a new 0600 file beside it, then moved into place (a file
    that was there with wider permissions never holds the secret)."""
    fresh = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(fresh, path)


def ensure_secrets(layout: Layout) -> tuple[str, str]:
    """The database and MLflow passwords: those kept in the services folder, else the environment's, else
    new random ones, written there (pgpass and MLflow credentials file formats, mode 0600). Once the stack
    exists its passwords are the ones it was made with: an environment asking for others is refused."""
    layout.folder.mkdir(parents=True, exist_ok=True)
    kept_db, kept_mlflow = _pgpass_password(layout.pgpass), _credentials_password(layout.credentials)
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
    # Any host name and port: workers reach the database by whatever name or proxy they use.
    _write_secret(layout.pgpass, f"*:*:*:{DB_USER}:{db_password}\n")
    config = configparser.ConfigParser()
    config["mlflow"] = {"mlflow_tracking_username": DB_USER, "mlflow_tracking_password": mlflow_password}
    text = io.StringIO()
    config.write(text)
    _write_secret(layout.credentials, text.getvalue())
    return db_password, mlflow_password


def _pgpass_password(path: Path) -> str | None:
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 5 and fields[3] == DB_USER:
            return fields[4]
    return None


def _credentials_password(path: Path) -> str | None:
    if not path.is_file():
        return None
    config = configparser.ConfigParser()
    config.read(path)
    return config.get("mlflow", "mlflow_tracking_password", fallback=None)


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


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, the server runs as the `postgres` system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise UsageError("services: PostgreSQL cannot run as root and there is no `postgres` user") from None
    return "postgres"


def init_postgres(layout: Layout, password: str) -> None:
    """A new database cluster in the services folder (once): the `vaelab` role with `password`, and every
    connection, local or remote, authenticated by scram-sha-256."""
    if (layout.pgdata / "PG_VERSION").is_file():
        return
    user = _server_user()
    layout.pgdata.mkdir(parents=True, exist_ok=True)
    pwfile = layout.folder / ".initdb-password"
    _write_secret(pwfile, password + "\n")
    try:
        if user:
            owner = pwd.getpwnam(user)
            for path in (layout.pgdata, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        os.chmod(layout.pgdata, 0o700)
        subprocess.run([str(postgres_bin() / "initdb"), "-D", str(layout.pgdata), "-U", DB_USER, "-A",
                        "scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-instructions"],
                       check=True, capture_output=True, text=True, user=user)
    except subprocess.CalledProcessError as err:
        raise UsageError(f"services: initdb failed: {(err.stderr or err.stdout).strip().splitlines()[-1]}") \
            from None
    finally:
        pwfile.unlink(missing_ok=True)
    with open(layout.pgdata / "pg_hba.conf", "w") as hba:
        # No trust and no peer: every client, on this machine or another, gives the password.
        hba.write("local all all scram-sha-256\nhost all all 0.0.0.0/0 scram-sha-256\n"
                  "host all all ::/0 scram-sha-256\n")


def postgres_command(layout: Layout) -> list[str]:
    return [str(postgres_bin() / "postgres"), "-D", str(layout.pgdata), "-c", f"listen_addresses={layout.host}",
            "-c", f"port={layout.pg_port}", "-c", f"unix_socket_directories={layout.pgdata}",
            "-c", "max_connections=200", "-c", "password_encryption=scram-sha-256"]


def create_databases(layout: Layout, password: str) -> None:
    """The Optuna, MLflow and MLflow-auth databases, if missing, owned by the vaelab role."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(host=layout.host, port=layout.pg_port, user=DB_USER, password=password,
                         dbname="postgres", connect_timeout=10, autocommit=True) as conn:
        have = {row[0] for row in conn.execute("SELECT datname FROM pg_database").fetchall()}
        for name in DATABASES:
            if name not in have:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


# ---- MLflow ----------------------------------------------------------------------------------------------

def write_auth_config(layout: Layout) -> None:
    """MLflow's basic-auth settings: the vaelab user as the admin, users in the auth database, credential
    checks cached for a minute (each check is a PBKDF2 hash: without the cache, workers' per-epoch writes
    spend most of a small server's CPU on it)."""
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": "READ",
        "database_uri": layout.db_url("mlflow_auth"),
        "admin_username": DB_USER,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
        "auth_cache_ttl_seconds": "60",
    }
    text = io.StringIO()
    config.write(text)
    _write_secret(layout.auth_config, text.getvalue())


def mlflow_command(layout: Layout, workers: int, names: tuple[str, ...] = ()) -> list[str]:
    """The server's command line (no secret on it). It answers requests addressed to its own address, to
    loopback and to `names` (the DNS names workers use), on any port (a proxy may sit in between): MLflow's
    guard against DNS rebinding stays on."""
    hosts = ",".join(dict.fromkeys(h for name in (layout.host, "localhost", "127.0.0.1", *names)
                                   for h in (name, f"{name}:*")))
    return [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", layout.host,
            "--port", str(layout.mlflow_port), "--workers", str(workers),
            "--backend-store-uri", layout.db_url("mlflow"), "--serve-artifacts",
            "--artifacts-destination", layout.artifacts.resolve().as_uri(), "--allowed-hosts", hosts]


def _flask_secret(layout: Layout) -> str:
    """The key MLflow's auth app signs its CSRF tokens with: one per stack, kept across restarts (the same
    for all its server workers)."""
    path = layout.folder / "flask-secret"
    if not path.is_file():
        _write_secret(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def mlflow_env(layout: Layout, mlflow_password: str) -> dict[str, str]:
    return {"MLFLOW_FLASK_SERVER_SECRET_KEY": _flask_secret(layout), "PGPASSFILE": str(layout.pgpass.resolve()),
            "MLFLOW_AUTH_CONFIG_PATH": str(layout.auth_config.resolve()), MLFLOW_PASSWORD_ENV: mlflow_password,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


# ---- running them ----------------------------------------------------------------------------------------

def _answers(host: str, port: int) -> bool:
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


def run_services(layout: Layout, which: tuple[str, ...] = ("postgres", "mlflow"), workers: int = 2,
                 names: tuple[str, ...] = ()) -> int:
    """Start the chosen services, say how workers reach them, and keep them up until stopped.
    A service that exits on its own ends the others and the command (exit 1)."""
    for name, port in (("postgres", layout.pg_port), ("mlflow", layout.mlflow_port)):
        if name in which:
            check_port_free(layout.host, port)
    db_password, mlflow_password = ensure_secrets(layout)
    layout.artifacts.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    try:
        if "postgres" in which:
            init_postgres(layout, db_password)
            log_path = layout.folder / "postgres.log"
            with open(log_path, "a") as log_file:
                procs["postgres"] = subprocess.Popen(postgres_command(layout), start_new_session=True,
                                                     user=_server_user(), stdout=log_file, stderr=log_file)
            _wait_ready(procs["postgres"], layout.host, layout.pg_port, "PostgreSQL", log_path)
            create_databases(layout, db_password)
            print(f"PostgreSQL: ready on {layout.host}:{layout.pg_port} (data in {layout.pgdata}, log "
                  f"{layout.folder / 'postgres.log'})", flush=True)
        if "mlflow" in which:
            write_auth_config(layout)
            log_path = layout.folder / "mlflow.log"
            with open(log_path, "a") as log_file:
                procs["mlflow"] = subprocess.Popen(mlflow_command(layout, workers, names), start_new_session=True,
                                                   env={**os.environ, **mlflow_env(layout, mlflow_password)},
                                                   stdout=log_file, stderr=log_file)
            _wait_ready(procs["mlflow"], layout.host, layout.mlflow_port, "MLflow server", log_path)
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


def _how_to_connect(layout: Layout) -> str:
    return "\n".join([
        "On each worker machine (the passwords are in the two files, never in these lines):",
        f"  copy {layout.pgpass} to ~/.pgpass (or export PGPASSFILE=<its path>), mode 0600",
        f"  copy {layout.credentials} to ~/.mlflow/credentials, mode 0600",
        f"  export VAELAB_STORAGE={layout.db_url('optuna')}",
        f"  export MLFLOW_TRACKING_URI={layout.tracking_uri}",
        "  vaelab worker experiments/<name>.yaml",
        "Ctrl-C stops the services.",
    ])
