"""The roles of the shared stack's PostgreSQL, each allowed only what its job needs.

- `vaelab_admin`: the superuser, used only by `vaelab services` itself, to set up roles and databases.
  It logs in only through the server's Unix socket, inside the data folder (mode 0700): its password
  is useless from another machine, and it is kept in `admin-pgpass`, which no worker gets.
- `vaelab`: the workers' role (the `pgpass` file they copy). It owns the `optuna` database (Optuna
  makes its tables there) and nothing else: no SUPERUSER, CREATEROLE, CREATEDB or REPLICATION, no
  membership in `pg_execute_server_program` / `pg_read_server_files`, no CONNECT to any other database.
- `vaelab_mlflow`: the MLflow server's role: owns `mlflow` and `mlflow_auth`, reaches nothing else.

A services folder made by an older vaelab, where `vaelab` was the bootstrap superuser, is changed on start:
that superuser is renamed `vaelab_admin`, and a new, unprivileged `vaelab` role with the same password
takes over the Optuna database, so the workers' pgpass files keep working.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vaelab.errors import UsageError

ADMIN = "vaelab_admin"
WORKER = "vaelab"
MLFLOW = "vaelab_mlflow"
# database -> the role that owns it (and is the only one, beside the admin, that may connect)
OWNERS = {"optuna": WORKER, "mlflow": MLFLOW, "mlflow_auth": MLFLOW}
_LIMITED = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT"


@dataclass(frozen=True)
class Passwords:
    admin: str
    worker: str
    mlflow: str

    def of(self, role: str) -> str:
        return {ADMIN: self.admin, WORKER: self.worker, MLFLOW: self.mlflow}[role]


def hba_rules() -> str:
    """pg_hba.conf: every client gives a password (scram-sha-256); over the network, each role reaches only
    its own databases, and the superuser none (it logs in through the data folder's socket alone)."""
    lines = ["local all all scram-sha-256"]
    for role in (WORKER, MLFLOW):
        databases = ",".join(db for db, owner in OWNERS.items() if owner == role)
        lines.append(f"host {databases} {role} all scram-sha-256")
    return "\n".join(lines) + "\n"


@contextmanager
def connect(socket_dir: Path, port: int, user: str, password: str, dbname: str = "postgres") -> Iterator[Any]:
    import psycopg

    with psycopg.connect(host=str(socket_dir), port=port, user=user, password=password, dbname=dbname,
                         connect_timeout=10, autocommit=True) as conn:
        yield conn


def _password_refused(err: Exception) -> bool:
    return "password authentication failed" in str(err)


def provision(socket_dir: Path, port: int, passwords: Passwords) -> bool:
    """Roles, databases and privileges as the module says, made or corrected as the admin; an older
    stack's roles migrated first. Returns True when it migrated one."""
    import psycopg

    migrated = False
    try:
        with connect(socket_dir, port, ADMIN, passwords.admin):
            pass
    except psycopg.OperationalError as err:
        if not _password_refused(err) and f'role "{ADMIN}" does not exist' not in str(err):
            raise
        _migrate(socket_dir, port, passwords)
        migrated = True
    with connect(socket_dir, port, ADMIN, passwords.admin) as conn:
        _roles(conn, passwords)
        _databases(conn)
    for database, owner in OWNERS.items():
        with connect(socket_dir, port, ADMIN, passwords.admin, database) as conn:
            _hand_over(conn, owner)
    return migrated


def _migrate(socket_dir: Path, port: int, passwords: Passwords) -> None:
    """An older stack: `vaelab` is the bootstrap superuser (with the workers' password). A short-lived
    second superuser renames it to the admin (a role cannot rename itself) and is dropped again."""
    import psycopg
    from psycopg import sql

    helper, helper_password = "vaelab_migrate", secrets.token_urlsafe(24)
    try:
        with connect(socket_dir, port, WORKER, passwords.worker) as conn:
            is_super = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0]
            if not is_super:
                raise UsageError(f"services: the database has no role {ADMIN} and {WORKER!r} is not its "
                                 "superuser; this folder was not made by vaelab services")
            conn.execute(f"DROP ROLE IF EXISTS {helper}")
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(helper), sql.Literal(helper_password)))
    except psycopg.OperationalError as err:
        raise UsageError(f"services: cannot log in to the database as {ADMIN} or as {WORKER} with the "
                         f"passwords in this services folder ({str(err).strip().splitlines()[-1][:200]})") from None
    with connect(socket_dir, port, helper, helper_password) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} RENAME TO {}").format(sql.Identifier(WORKER), sql.Identifier(ADMIN)))
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(ADMIN),
                                                                 sql.Literal(passwords.admin)))
    with connect(socket_dir, port, ADMIN, passwords.admin) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(helper)))
    print(f"services: database roles migrated: the old superuser is now {ADMIN} (services only); "
          f"{WORKER} (the workers' pgpass) has no privilege beyond the Optuna database", flush=True)


def _roles(conn: Any, passwords: Passwords) -> None:
    from psycopg import sql

    have = {row[0] for row in conn.execute("SELECT rolname FROM pg_roles").fetchall()}
    for role in (WORKER, MLFLOW):
        verb = "ALTER" if role in have else "CREATE"
        conn.execute(sql.SQL(f"{verb} ROLE {{}} {_LIMITED} PASSWORD {{}}").format(
            sql.Identifier(role), sql.Literal(passwords.of(role))))
        # A role of an older stack may have been granted the built-in roles that reach the server's files.
        for powerful in ("pg_execute_server_program", "pg_read_server_files", "pg_write_server_files"):
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(powerful), sql.Identifier(role)))


def _databases(conn: Any) -> None:
    from psycopg import sql

    have = {row[0] for row in conn.execute("SELECT datname FROM pg_database").fetchall()}
    for database, owner in OWNERS.items():
        if database in have:
            conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(database),
                                                                        sql.Identifier(owner)))
        else:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database),
                                                                      sql.Identifier(owner)))
    for database in (*OWNERS, "postgres"):  # no one else may connect (PUBLIC has CONNECT by default)
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))


def _hand_over(conn: Any, owner: str) -> None:
    """Everything in the database's own schemas goes to its owner role (an older stack made it all as the
    superuser), so the owner needs nothing more than ownership."""
    from psycopg import sql

    kinds = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE"}
    rows = conn.execute(
        "SELECT c.relkind, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%' "
        "AND c.relkind IN ('r', 'p', 'v', 'm', 'S') AND pg_get_userbyid(c.relowner) <> %s "
        # a sequence owned by a column moves with its table
        "AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid "
        "AND d.deptype IN ('a', 'i')))", (owner,)).fetchall()
    for kind, schema, name in rows:
        conn.execute(sql.SQL(f"ALTER {kinds[kind]} {{}}.{{}} OWNER TO {{}}").format(
            sql.Identifier(schema), sql.Identifier(name), sql.Identifier(owner)))
    types = conn.execute(
        "SELECT n.nspname, t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND t.typtype IN ('e', 'd', 'c') "
        "AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.reltype = t.oid) "
        "AND pg_get_userbyid(t.typowner) <> %s", (owner,)).fetchall()
    for schema, name in types:
        conn.execute(sql.SQL("ALTER TYPE {}.{} OWNER TO {}").format(sql.Identifier(schema), sql.Identifier(name),
                                                                   sql.Identifier(owner)))
