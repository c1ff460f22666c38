"""Where a study lives: an Optuna RDB storage (PostgreSQL, MySQL, SQLite) named by a
URL, or a journal file under studies/<name>/ that local processes share.

A database shared by workers on several machines restarts, fails over and drops connections; every
call a sweep makes to it is retried through such an outage (RetryingStorage) for up to
VAELAB_STORAGE_RETRY_S seconds (default 300), so a running trial keeps training instead of failing.

A write whose connection went while it was under way may have committed before its reply was lost. Such a
write is not simply sent again: each write that must not happen twice carries a receipt that a read can
find (a token on the trial it creates, the attributes a state change writes in its own transaction), and
after a lost connection RetryingStorage looks for the receipt first (`_retry`'s `settle`)."""

from __future__ import annotations

import copy
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, _CachedStorage
from optuna.storages._rdb import models
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

from vaelab.errors import SweepError, causes
from vaelab.spec import Spec
from vaelab.tracking import without_credentials

__all__ = ["STORAGE_ENV", "STUDIES_DIR", "RetryingStorage", "SweepError", "WriteInDoubt", "open_storage",
           "storage_url", "study_dir", "transition_trial"]

log = logging.getLogger(__name__)

optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDIES_DIR = Path("studies")
STORAGE_ENV = "VAELAB_STORAGE"  # the shared storage's URL, for workers that all use the same one
RETRY_ENV = "VAELAB_STORAGE_RETRY_S"
CONNECT_TIMEOUT_S = 10
WRITE_TOKEN = "vaelab.write_token"  # trial system attribute: the create_new_trial call that made the trial


def study_dir(name: str, root: Path = STUDIES_DIR) -> Path:
    """studies/<name>/ (resolved); refuses a name that would leave `root`."""
    folder = (root / name).resolve()
    if folder.parent != root.resolve():  # names are validated; this is the last line of defence
        raise SweepError(f"study name {name!r} escapes {root}/")
    return folder


def storage_url(spec: Spec, url: str | None) -> str | None:
    """The RDB URL a sweep uses: `--storage`, else $VAELAB_STORAGE, else the spec's search.storage, else
    None (a journal)."""
    return url or os.environ.get(STORAGE_ENV) or (spec.search.storage if spec.search is not None else None)


def open_storage(spec: Spec, url: str | None, root: Path = STUDIES_DIR) -> BaseStorage:
    """`url` (or search.storage) as an Optuna RDB URL, else a journal file under
    studies/<name>/ that several local processes can share (SQLite cannot)."""
    url = storage_url(spec, url)
    if url:
        if url.split(":", 1)[0].split("+", 1)[0] not in ("postgresql", "mysql", "sqlite"):
            raise SweepError(f"--storage: expected an RDB URL (postgresql://, mysql://, sqlite:///), "
                             f"got {without_credentials(url)!r}")
        rdb = _open_rdb(url)
        if url.startswith("sqlite"):  # one machine's file: its errors (a full disk) are not outages to wait out
            return rdb
        return RetryingStorage(_CachedStorage(rdb), without_credentials(url), rdb=rdb)  # type: ignore[abstract]  # forwarded below
    folder = study_dir(spec.name, root)
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / "optuna.journal")
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


def _open_rdb(url: str) -> RDBStorage:
    """Optuna creates its tables on first use; workers that start together on an empty
    database race to create them, and the losers get a unique violation or an "already
    exists" for a table or an enum type (PostgreSQL's DDL takes no lock on an object that
    does not exist yet). The winner has committed by then, so a loser that tries again
    finds the tables. A connection cut while it opens (a bad network, a restart under way: the
    server is there) is tried again for up to VAELAB_STORAGE_RETRY_S, as any call later is; a
    refused password, a missing database, a host that does not answer are said at once."""
    races, cuts, deadline = 0, 0, time.monotonic() + float(os.environ.get(RETRY_ENV, 300))
    while True:
        try:
            return RDBStorage(url, engine_kwargs=_engine_kwargs(url))
        except Exception as err:
            shown = without_credentials(url)
            if _cut_short(err) and time.monotonic() < deadline:
                cuts += 1
                if cuts == 1:
                    log.warning("Optuna storage %s: %s; trying again for up to %s s", shown, outage_reason(err),
                                os.environ.get(RETRY_ENV, 300))
                time.sleep(random.uniform(0.2, 0.6) * min(cuts, 5))
                continue
            if isinstance(err, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError)) \
                    and _lost_schema_race(err):
                races += 1
                if races >= 8:
                    raise SweepError(f"Optuna storage {shown}: cannot create Optuna's tables "
                                     f"({_first_line(err)})") from None
                time.sleep(random.uniform(0.05, 0.3) * races)
                continue
            raise SweepError(f"Optuna storage {shown}: {_db_reason(err)}") from None


def _engine_kwargs(url: str) -> dict[str, Any]:
    """A connection checked before each use (a database restart leaves dead ones in the pool), and a host
    that does not answer given up on after CONNECT_TIMEOUT_S instead of the TCP default of minutes."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    return kwargs


def _db_reason(err: BaseException) -> str:
    """Why a database refused a worker, in words that name no credential (the server's own message
    names the user at most)."""
    text = _first_line(getattr(err, "orig", None) or err)
    state = getattr(getattr(err, "orig", None), "sqlstate", None)
    if state == "42501" or "permission denied" in text:
        return f"the user may not create or change Optuna's tables ({text})"
    if "password authentication failed" in text or state == "28P01":
        return f"the password was refused ({text}); set it in ~/.pgpass or PGPASSFILE"
    if "no password supplied" in text:
        return "the server asks for a password and none was found (~/.pgpass or PGPASSFILE)"
    if "does not exist" in text and "database" in text:
        return f"no such database ({text})"
    return f"cannot connect ({text})"


# A connection that was there and went (or a server between restarts), as opposed to one never made.
_CUT_SHORT = ("server closed the connection unexpectedly", "connection reset", "terminating connection",
              "the database system is starting up", "the database system is shutting down", "consuming input failed",
              "eof detected", "ssl syscall error", "connection to server was lost")


def _cut_short(err: BaseException) -> bool:
    """True if `err`, or what caused it, is a connection cut short (not a refusal)."""
    return any(any(marker in str(c).lower() for marker in _CUT_SHORT)
               or getattr(c, "sqlstate", None) in ("57P01", "57P02", "57P03") for c in causes(err))


# Errors that mean "the database is not there right now", not "the request is wrong": a restart,
# a failover, a dropped connection, a network outage.
_TRANSIENT_SQLSTATES = {"57P01", "57P02", "57P03", "08000", "08001", "08003", "08004", "08006", "40001", "40P01"}


class WriteInDoubt(Exception):
    """The connection went while a write was under way: it may have committed, its reply lost."""


def _transient(err: BaseException) -> bool:
    return any(isinstance(c, WriteInDoubt) or (isinstance(c, sqlalchemy.exc.DBAPIError) and c.connection_invalidated)
               or isinstance(c, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
               or getattr(c, "sqlstate", None) in _TRANSIENT_SQLSTATES for c in causes(err))


def outage_reason(err: BaseException) -> str:
    """The database's own words for an outage (Optuna wraps them in a generic "error during the commit")."""
    cause = database_cause(err)
    return _first_line(cause.orig or cause if isinstance(cause, sqlalchemy.exc.DBAPIError) else cause)


def database_cause(err: BaseException) -> BaseException:
    """The database driver's error behind `err` (SQLAlchemy's), else `err`."""
    return next((c for c in causes(err) if isinstance(c, sqlalchemy.exc.SQLAlchemyError)), err)


class RetryingStorage(BaseStorage):
    """An Optuna storage whose every call is retried, with backoff, while the database is unreachable
    (restarting, failing over, the network down), for up to `retry_s` seconds of one outage; one warning
    says so, one line says when it is back. Errors of the request itself pass straight through.

    The writes that must not happen twice are settled by their receipts after a lost connection (see the
    module's doc): `create_new_trial` (a token in the trial's system attributes), `set_trial_state_values`
    (the state and values asked for; a claim of a WAITING trial has no receipt there: use `transition_trial`)
    and `transition_trial` (the state with its user attributes). Every other write is an upsert of the same
    value, harmless twice. `rdb`: the RDB storage under `inner`, for one-transaction state changes and the
    database's clock (without it, as for a test's in-memory storage, the writes go one after another and the
    clock is this machine's)."""

    def __init__(self, inner: BaseStorage, shown_url: str, retry_s: float | None = None,
                 rdb: RDBStorage | None = None):
        self._inner, self._shown, self._rdb = inner, shown_url, rdb
        self._retry_s = float(os.environ.get(RETRY_ENV, 300)) if retry_s is None else retry_s
        self.recovered_at: float | None = None  # monotonic time the last outage ended (TrialQueue.reap_dead)
        self._writing = threading.local()  # .active: this thread is inside a write that has a receipt
        if rdb is not None:
            sqlalchemy.event.listen(rdb.engine, "handle_error", self._lost_in_write)

    @property
    def inner(self) -> BaseStorage:
        """The storage without retries, for a call that is only worth making now (a heartbeat)."""
        return self._inner

    def _lost_in_write(self, ctx: sqlalchemy.engine.ExceptionContext) -> None:
        """Optuna tries a failed trial creation again by itself, blind to whether the first one committed
        before the connection went (a second trial): inside a write with a receipt, such a failure is raised
        to `_retry` instead, which looks for the receipt first. Pool pre-pings are the pool's own business."""
        if getattr(self._writing, "active", False) and not ctx.is_pre_ping \
                and (ctx.is_disconnect or _transient(ctx.sqlalchemy_exception or ctx.original_exception)):
            raise WriteInDoubt(_first_line(ctx.original_exception))

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._retry(lambda: getattr(self._inner, name)(*args, **kwargs))

    def _retry(self, send: Callable[[], Any], settle: Callable[[], Any] | None = None) -> Any:
        """`send()`, again through an outage. `settle`, for a write with a receipt: its result if the storage
        shows the write landed (its reply was lost), else None; after a failed try it is asked before the
        write is sent again."""
        started: float | None = None
        delay = 0.0  # one cut connection is made again at once; an outage is waited out with backoff
        in_doubt = False
        while True:
            try:
                result = settle() if in_doubt and settle is not None else None
                if result is None:
                    result = self._send(send, write=settle is not None)
            except Exception as err:
                if not _transient(err):
                    raise
                in_doubt = settle is not None
                now = time.monotonic()
                if started is None:
                    started = now
                    log.warning("Optuna storage %s: %s; retrying for up to %.0f s", self._shown,
                                outage_reason(err), self._retry_s)
                if now - started > self._retry_s:
                    raise SweepError(f"Optuna storage {self._shown}: unreachable for {now - started:.0f} s "
                                     f"({outage_reason(err)})") from None
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(max(delay * 2, 0.5), 10.0)
                continue
            if started is not None:
                self.recovered_at = time.monotonic()
                log.warning("Optuna storage %s: reachable again after %.0f s", self._shown,
                            self.recovered_at - started)
            return result

    def _send(self, send: Callable[[], Any], write: bool) -> Any:
        self._writing.active = write
        try:
            return send()
        finally:
            self._writing.active = False

    # ---- writes with receipts ----------------------------------------------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        token = uuid.uuid4().hex
        template = _with_token(template_trial, token)

        def made() -> int | None:
            trials = self._inner.get_all_trials(study_id, deepcopy=False)
            return next((t._trial_id for t in trials if t.system_attrs.get(WRITE_TOKEN) == token), None)

        return self._retry(lambda: self._inner.create_new_trial(study_id, template), made)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        def landed() -> bool | None:
            trial = self._inner.get_trial(trial_id)
            done = state != TrialState.RUNNING and trial.state == state \
                and (values is None or trial.values == list(values))
            return True if done else None

        return self._retry(lambda: self._inner.set_trial_state_values(trial_id, state, values), landed)

    def transition_trial(self, trial_id: int, state: TrialState, attrs: dict[str, Any],
                         stamp: str | None = None) -> bool:
        """Trial `trial_id` to `state` with the user attributes `attrs` (and `stamp`, if given, set to the
        database's clock) in one transaction, so that `attrs` are its receipt: they must say who made the
        change. As set_trial_state_values: RUNNING only from WAITING (False if another took it), a finished
        state only from an unfinished one (UpdateFinishedTrialError)."""
        def landed() -> bool | None:
            trial = self._inner.get_trial(trial_id)
            mine = trial.state == state and all(trial.user_attrs.get(k) == v for k, v in attrs.items())
            return True if mine else None

        rdb = self._rdb
        if rdb is None:
            stamped = {**attrs, stamp: time.time()} if stamp else attrs
            return self._retry(lambda: _one_after_another(self._inner, trial_id, state, stamped), landed)
        return self._retry(lambda: _in_one_transaction(rdb, trial_id, state, attrs, stamp), landed)

    # ---- the database's clock ----------------------------------------------------------------------
    def database_time(self, retry: bool = True) -> float:
        """Now, in seconds since the epoch, by the database server's clock: one clock for every worker's
        heartbeats and every reaper's judgement of them, whatever the workers' own clocks say. One try
        unless `retry`. Without an RDB (a test's in-memory storage): this machine's clock."""
        if self._rdb is None:
            return time.time()
        engine = self._rdb.engine

        def read() -> float:
            with engine.connect() as connection:
                return _database_now(connection)

        return self._retry(read) if retry else read()

    def __getattr__(self, name: str) -> Any:  # the backend's own extras (e.g. _CachedStorage's helpers)
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)


def transition_trial(storage: BaseStorage, trial_id: int, state: TrialState, attrs: dict[str, Any],
                     stamp: str | None = None, clock: Callable[[], float] = time.time) -> bool:
    """RetryingStorage.transition_trial on a shared database; on one machine's storage (a journal, whose
    writes cannot lose a reply) the same writes one after another, `stamp` set to `clock()`."""
    if isinstance(storage, RetryingStorage):
        return storage.transition_trial(trial_id, state, attrs, stamp)
    return _one_after_another(storage, trial_id, state, {**attrs, stamp: clock()} if stamp else attrs)


def _one_after_another(storage: BaseStorage, trial_id: int, state: TrialState, attrs: dict[str, Any]) -> bool:
    """A claim is taken before it is marked; a trial is marked before it is finished."""
    if state == TrialState.RUNNING:
        if not storage.set_trial_state_values(trial_id, state):
            return False
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)
        return True
    for key, value in attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    return storage.set_trial_state_values(trial_id, state)


def _in_one_transaction(rdb: RDBStorage, trial_id: int, state: TrialState, attrs: dict[str, Any],
                        stamp: str | None) -> bool:
    """RDBStorage.set_trial_state_values with user attributes written in the same transaction (Optuna's
    models, as its own method does)."""
    session = rdb.scoped_session()
    try:
        trial = models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        rdb.check_trial_is_updatable(trial_id, trial.state)
        if state == TrialState.RUNNING and trial.state != TrialState.WAITING:
            session.rollback()
            return False
        values = {**attrs, stamp: _database_now(session)} if stamp else attrs
        for key, value in values.items():
            rdb._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial_id, key, value)
        trial.state = state
        if state == TrialState.RUNNING:
            trial.datetime_start = datetime.now()
        if state.is_finished():
            trial.datetime_complete = datetime.now()
        session.commit()
        return True
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# The server's clock as seconds since the epoch, per dialect.
_NOW_SQL = {"postgresql": "SELECT EXTRACT(EPOCH FROM clock_timestamp())", "mysql": "SELECT UNIX_TIMESTAMP(NOW(6))",
            "sqlite": "SELECT (julianday('now') - 2440587.5) * 86400.0"}


def _database_now(connection: sqlalchemy.engine.Connection | sqlalchemy.orm.Session) -> float:
    dialect = connection.get_bind().dialect.name if isinstance(connection, sqlalchemy.orm.Session) \
        else connection.dialect.name
    return float(connection.execute(sqlalchemy.text(_NOW_SQL[dialect])).scalar_one())


def _with_token(template: FrozenTrial | None, token: str) -> FrozenTrial:
    """`template` (None: a new RUNNING trial, as Optuna makes one) with `token` in its system attributes."""
    if template is None:
        template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, values=None,
                               datetime_start=datetime.now(), datetime_complete=None, params={}, distributions={},
                               user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=-1)
    else:
        template = copy.copy(template)
    template.system_attrs = {**template.system_attrs, WRITE_TOKEN: token}
    return template


def _forward(name: str) -> Callable[..., Any]:
    def method(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, *args, **kwargs)

    method.__name__ = name
    return method


for _name in [n for n in vars(BaseStorage) if not n.startswith("_") and callable(getattr(BaseStorage, n))
              and n not in vars(RetryingStorage)]:
    setattr(RetryingStorage, _name, _forward(_name))
RetryingStorage.__abstractmethods__ = frozenset()


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
