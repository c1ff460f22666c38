"""A shared database that goes away (a restart, a failover, a dropped connection) costs a sweep time, not
trials: RetryingStorage retries every call through the outage and lets the request's own errors through.
(`make test-cluster` restarts a real PostgreSQL under running workers; these pin the rules.)"""

from __future__ import annotations

import logging
import time

import optuna
import pytest
import sqlalchemy.exc
from optuna.storages import InMemoryStorage

from vaelab.errors import SweepError
from vaelab.sweeps.storage import RetryingStorage, _transient


def outage(times: int):
    """An Optuna storage whose reads of trials fail `times` times as a restarting PostgreSQL's do."""

    class Restarting(InMemoryStorage):
        failures = times

        def get_all_trials(self, *args, **kwargs):
            if Restarting.failures > 0:
                Restarting.failures -= 1
                raise sqlalchemy.exc.OperationalError(
                    "SELECT trials", {}, Exception("terminating connection due to administrator command"))
            return super().get_all_trials(*args, **kwargs)

    return Restarting()


def test_calls_are_retried_through_an_outage_and_both_ends_are_said(caplog, monkeypatch):
    monkeypatch.setattr("vaelab.sweeps.storage.time.sleep", lambda s: None)
    storage = RetryingStorage(outage(3), "postgresql://vaelab@db:5432/optuna", retry_s=60)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({"x": 1.0})
    with caplog.at_level(logging.WARNING, logger="vaelab.sweeps.storage"):
        assert len(study.get_trials()) == 1
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert "retrying for up to 60 s" in said[0] and "terminating connection" in said[0]
    assert "reachable again" in said[1]


def test_an_outage_longer_than_the_budget_is_one_error_naming_the_storage(monkeypatch):
    clock = iter(range(0, 10_000, 7))
    monkeypatch.setattr("vaelab.sweeps.storage.time.monotonic", lambda: next(clock))
    monkeypatch.setattr("vaelab.sweeps.storage.time.sleep", lambda s: None)
    storage = RetryingStorage(outage(10**6), "postgresql://vaelab@db:5432/optuna", retry_s=30)
    study = optuna.create_study(storage=storage, study_name="s")
    with pytest.raises(SweepError, match=r"Optuna storage postgresql://vaelab@db:5432/optuna: unreachable for"):
        study.get_trials()


def test_errors_of_the_request_itself_are_not_retried():
    storage = RetryingStorage(outage(0), "postgresql://vaelab@db/optuna", retry_s=60)
    with pytest.raises(KeyError):  # no such study: the answer, not an outage
        storage.get_study_id_from_name("missing")
    refused = sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("duplicate key"))
    assert not _transient(refused)
    assert _transient(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection")))


def test_writes_whose_reply_is_always_lost_land_once(postgres_url: str):
    """Every COMMIT of a write reaches a real PostgreSQL and its reply is cut (tests/cluster/faultproxy.py):
    each write is found by its receipt, none is made twice, and no claim is taken for lost."""
    from optuna.storages import RDBStorage, _CachedStorage
    from optuna.trial import TrialState

    from tests.test_storage_faults import Proxy
    from vaelab.sweeps.queue import DIED, HEARTBEAT, REAPER, WORKER
    from vaelab.sweeps.storage import transition_trial

    direct = optuna.create_study(storage=postgres_url, study_name="s")  # Optuna's tables, read past the proxy
    proxy = Proxy(postgres_url, "--cut-reply", "1", "--cut-reply-to", "COMMIT", "--cut-reply-after", "INSERT", "UPDATE")
    try:
        rdb = RDBStorage(proxy.url, engine_kwargs={"pool_pre_ping": True})
        storage = RetryingStorage(_CachedStorage(rdb), "postgresql://db/optuna", retry_s=30, rdb=rdb)
        study = optuna.load_study(study_name="s", storage=storage)
        for x in (1.0, 2.0, 3.0):
            study.enqueue_trial({"x": x})
        first, second, third = (t._trial_id for t in direct.get_trials())
        assert transition_trial(storage, first, TrialState.RUNNING, {WORKER: "here:1"}, stamp=HEARTBEAT)
        assert not transition_trial(storage, first, TrialState.RUNNING, {WORKER: "there:2"}, stamp=HEARTBEAT)
        assert storage.set_trial_state_values(first, TrialState.COMPLETE, [0.5])
        assert transition_trial(storage, second, TrialState.FAIL, {DIED: "gone", REAPER: "here:1"})
        asked = storage.create_new_trial(study._study_id)  # as Study.ask makes one: RUNNING, no template
    finally:
        proxy.stop()
    assert int(proxy.said.split(", ")[2].split()[0]) >= 6, proxy.said
    trials = direct.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING, TrialState.RUNNING]
    assert trials[0].value == 0.5 and trials[0].user_attrs[WORKER] == "here:1"
    assert abs(trials[0].user_attrs[HEARTBEAT] - time.time()) < 60
    assert trials[1].user_attrs == {DIED: "gone", REAPER: "here:1"}
    assert third == trials[2]._trial_id and asked == trials[3]._trial_id
