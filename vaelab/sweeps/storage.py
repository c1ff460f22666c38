"""Where a study lives: an Optuna RDB storage (PostgreSQL, MySQL, SQLite) named by a
URL, or a journal file under studies/<name>/ that local processes share."""

from __future__ import annotations

import random
import time
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

from vaelab.errors import SweepError
from vaelab.spec import Spec
from vaelab.tracking import without_credentials

__all__ = ["STUDIES_DIR", "SweepError", "open_storage", "storage_url", "study_dir"]

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDIES_DIR = Path("studies")


def study_dir(name: str, root: Path = STUDIES_DIR) -> Path:
    """studies/<name>/ (resolved); refuses a name that would leave `root`."""
    folder = (root / name).resolve()
    if folder.parent != root.resolve():  # names are validated; this is the last line of defence
        raise SweepError(f"study name {name!r} escapes {root}/")
    return folder


def storage_url(spec: Spec, url: str | None) -> str | None:
    """The RDB URL a sweep uses: `--storage`, else the spec's search.storage, else None (a journal)."""
    return url or (spec.search.storage if spec.search is not None else None)


def open_storage(spec: Spec, url: str | None, root: Path = STUDIES_DIR) -> BaseStorage:
    """`url` (or search.storage) as an Optuna RDB URL, else a journal file under
    studies/<name>/ that several local processes can share (SQLite cannot)."""
    url = storage_url(spec, url)
    if url:
        if url.split(":", 1)[0].split("+", 1)[0] not in ("postgresql", "mysql", "sqlite"):
            raise SweepError(f"--storage: expected an RDB URL (postgresql://, mysql://, sqlite:///), "
                             f"got {without_credentials(url)!r}")
        return _open_rdb(url)
    folder = study_dir(spec.name, root)
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / "optuna.journal")
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def _open_rdb(url: str, attempts: int = 8) -> RDBStorage:
    """Optuna creates its tables on first use; workers that start together on an empty
    database race to create them, and the losers get a unique violation or an "already
    exists" for a table or an enum type (PostgreSQL's DDL takes no lock on an object that
    does not exist yet). The winner has committed by then, so a loser that tries again
    finds the tables."""
    for attempt in range(attempts):
        try:
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            if not _lost_schema_race(err):
                raise SweepError(f"--storage {without_credentials(url)}: cannot connect ({_first_line(err)})") from None
            if attempt == attempts - 1:
                raise SweepError(f"--storage {without_credentials(url)}: cannot create Optuna's tables "
                                 f"({_first_line(err)})") from None
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
        except Exception as err:
            raise SweepError(f"--storage {without_credentials(url)}: cannot connect ({_first_line(err)})") from None
    raise AssertionError("unreachable")


# PostgreSQL's duplicate_object (an enum type such as studydirection) and duplicate_table.
_ALREADY_EXISTS = {"42710", "42P07"}


def _lost_schema_race(err: sqlalchemy.exc.DBAPIError) -> bool:
    """Another worker created one of Optuna's tables or types first: a unique violation,
    or PostgreSQL saying the object already exists."""
    if isinstance(err, sqlalchemy.exc.IntegrityError):
        return True
    return getattr(err.orig, "sqlstate", None) in _ALREADY_EXISTS


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__
