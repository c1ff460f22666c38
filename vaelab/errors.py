"""vaelab's error hierarchy: what a failure means decides how it ends.

- `UserInputError` (exit 2): the user can fix it (a spec, a path, a checkpoint, a URL);
  nothing was recorded half-way.
- `RunFailure` (exit 1): a run started and failed (a non-finite loss); MLflow marks it FAILED.
- `RunStopped` (a KeyboardInterrupt, exit 130): stopped on request; MLflow marks it KILLED and
  the same command resumes it.
- `RunPruned`: a pruner ended the run on purpose; MLflow marks it KILLED, the sweep goes on.

Every class carries `exit_code` and `mlflow_status`, so the CLI and the tracker read them
instead of keeping lists of types.
"""

from __future__ import annotations

from collections.abc import Iterator


class VaelabError(Exception):
    """Base of vaelab's own errors."""

    exit_code = 1
    mlflow_status = "FAILED"


class UserInputError(VaelabError, ValueError):
    """Bad input: a spec, CLI argument, data set, checkpoint, storage URL or credential."""

    exit_code = 2

    def __init__(self, message: object = ""):
        # Always one line: control characters (a key with a newline in it) are escaped.
        super().__init__("".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(message)))


class SpecError(UserInputError):
    """A spec (or override) is invalid; the message names the dotted path."""


class UsageError(UserInputError):
    """Bad command-line input."""


class DataError(UserInputError):
    """Data cannot be found or read; the message says what to do."""


class IdxError(DataError):
    """An IDX file is missing, truncated or not IDX."""


class ConfigError(UserInputError):
    """A model does not fit the data shape."""


class CheckpointError(UserInputError):
    """A checkpoint is missing, incomplete, corrupt or does not match its spec."""


class ResumeError(UserInputError):
    """A saved training state cannot be used (unreadable, another version, another run)."""


class RunInProgress(UserInputError):
    """Another process holds this run's state lock."""


class SweepError(UserInputError):
    """A sweep cannot start (bad storage URL, no search section, a changed spec, ...)."""


class TrackingError(UserInputError):
    """The tracking store cannot be opened or written (a file where a folder should
    be, no permission, a full disk, a server that does not answer); the message says where."""


class ReportError(UserInputError):
    """A report cannot be made (no such experiment, no runs yet)."""


class RunFailure(VaelabError, RuntimeError):
    """A run that started could not finish."""


class NonFiniteLossError(RunFailure):
    """Training produced NaN or inf; the message is the failure reason."""


class RunPruned(VaelabError):
    """A pruner stopped the run early on purpose; recorded as KILLED, not FAILED."""

    mlflow_status = "KILLED"


class LeaseLost(VaelabError):
    """A sweep worker lost its claim on a trial (its heartbeats did not reach the storage within the grace
    period, and another worker re-queued the point): nothing more may be written to the trial's run, which
    now belongs to the one that re-queued it (it marked the run KILLED)."""

    mlflow_status = "KILLED"


class RunStopped(KeyboardInterrupt):
    """The run stopped cleanly between epochs because the user asked (Ctrl-C); it resumes."""

    exit_code = 130
    mlflow_status = "KILLED"


def causes(err: BaseException) -> Iterator[BaseException]:
    """`err`, then what caused it (its __cause__ or __context__), and so on, each once."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
