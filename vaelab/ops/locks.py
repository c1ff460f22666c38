"""Every lock the sweep takes, in one place: a file lock (flock) for processes on one
machine, and a lock held in the study's database for workers on several machines."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy
import sqlalchemy.exc
import sqlalchemy.pool

log = logging.getLogger(__name__)


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing), held for the block; the kernel
    drops it if the process dies."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def database_lock(url: str, name: str) -> Iterator[None]:
    """A lock that lives in the study's database, so workers on different machines
    take turns: a PostgreSQL advisory lock or MySQL's GET_LOCK on a connection of its
    own (the server drops it if the worker dies), or a lock file beside a SQLite file."""
    address = sqlalchemy.engine.make_url(url)
    if address.get_backend_name() == "sqlite":
        if not address.database or address.database == ":memory:":
            yield
            return
        with file_lock(f"{address.database}.{_slug(name)}.vaelab-lock"):
            yield
        return
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    postgres = address.get_backend_name() == "postgresql"
    key: int | str = int.from_bytes(digest, "big", signed=True) if postgres else f"vaelab-{digest.hex()}"
    take, give = (("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)") if postgres
                  else ("SELECT GET_LOCK(:key, -1)", "SELECT RELEASE_LOCK(:key)"))  # mysql: names <= 64 chars
    engine = sqlalchemy.create_engine(address, poolclass=sqlalchemy.pool.NullPool)
    try:
        connection = _locked_connection(engine, take, key)
        try:
            yield
        finally:
            try:
                connection.execute(sqlalchemy.text(give), {"key": key})
                connection.commit()
            except sqlalchemy.exc.OperationalError as err:
                # The connection went (a bad network, a restart): the server let the lock go with it.
                log.warning("lock %r: its connection was lost (%s); the server released it", name,
                            str(err).splitlines()[0][:200])
            finally:
                connection.close()
    finally:
        engine.dispose()


def _locked_connection(engine: sqlalchemy.Engine, take: str, key: int | str, attempts: int = 6):
    """A connection holding the lock; a connection cut while it waits for the lock is made again."""
    for attempt in range(attempts):
        connection = None
        try:
            connection = engine.connect()
            connection.execute(sqlalchemy.text(take), {"key": key})
            connection.commit()
            return connection
        except sqlalchemy.exc.OperationalError:
            if connection is not None:
                connection.close()
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.2, 0.6) * (attempt + 1))
    raise AssertionError("unreachable")


@contextmanager
def study_lock(url: str | None, folder: Path, name: str) -> Iterator[None]:
    """The lock that serialises setting a study up: `database_lock` on an RDB storage,
    else a file lock in the study's folder (a journal's own lock guards each write,
    not a read-then-write)."""
    if url:
        with database_lock(url, name):
            yield
        return
    with file_lock(folder / f"{_slug(name)}.lock"):
        yield


def _slug(name: str) -> str:
    """A lock's file name from its purpose: "vaelab prepare demo" -> "prepare" (one per
    purpose, so a long final evaluation does not hold up a new worker's prepare)."""
    words = name.split()
    return "-".join(words[1:-1]) if len(words) > 2 else "lock"
