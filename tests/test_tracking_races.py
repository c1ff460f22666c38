"""Two workers that log the same data to one store at the same moment (a local sweep's workers share
runs/mlflow.db): MLflow looks the dataset up, then inserts it if it is missing, so both can miss it and the
second insert breaks the unique key. vaelab's run log tries again and links the dataset the other added.
The interleaving is made exactly, on a real SQLite store: the other worker's insert lands between this one's
look-up and its insert."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import event

from vaelab.tracking.writer import MlflowRunLog

RECORD = {"name": "mnist-train", "digest": "0123abcd", "source": "/data/mnist", "context": "train",
          "profile": {"images": 240}}


def racing_store(tmp_path: Path) -> tuple[MlflowClient, MlflowClient, str, str]:
    """Our client and the other worker's, each with its own engine (MLflow caches a store per URI: the same file
    is named two ways), and a run of each in one experiment."""
    ours = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    theirs = MlflowClient(f"sqlite:///{tmp_path / '.' / 'mlflow.db'}".replace("/mlflow.db", "/./mlflow.db"))
    assert ours._tracking_client.store is not theirs._tracking_client.store
    experiment = ours.create_experiment("race")
    return ours, theirs, ours.create_run(experiment).info.run_id, theirs.create_run(experiment).info.run_id


def insert_theirs_first(client: MlflowClient, theirs: MlflowClient, their_run: str) -> list[str]:
    """Before our first INSERT INTO datasets, the other worker logs the same dataset and commits."""
    fired: list[str] = []

    @event.listens_for(client._tracking_client.store.engine, "before_cursor_execute")
    def interleave(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO DATASETS") and not fired:
            fired.append(statement)
            MlflowRunLog(theirs, their_run).log_datasets([RECORD])

    return fired


def test_a_dataset_logged_by_two_runs_at_once_is_linked_to_both(tmp_path: Path):
    client, theirs, our_run, their_run = racing_store(tmp_path)
    fired = insert_theirs_first(client, theirs, their_run)
    MlflowRunLog(client, our_run).log_datasets([RECORD])
    assert fired, "the race was not staged: MLflow no longer inserts datasets this way"
    for run_id in (our_run, their_run):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("mnist-train", "0123abcd")]


def test_without_the_retry_the_staged_race_breaks_the_unique_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The staging above is a real race: with one try, MLflow's own error comes through."""
    monkeypatch.setattr("vaelab.tracking.writer.DATASET_RACE_TRIES", 1)
    client, theirs, our_run, their_run = racing_store(tmp_path)
    insert_theirs_first(client, theirs, their_run)
    with pytest.raises(Exception, match="UNIQUE constraint failed|IntegrityError"):
        MlflowRunLog(client, our_run).log_datasets([RECORD])
