"""A `vaelab worker` inside a Slurm task: the warning before the time limit, preemption, and the requeue
(submitit's handling is the model: checkpoint on the warning, then `scontrol requeue` the task itself).

`TaskStop.install()` listens, in a worker that a vaelab job script started (it exports VAELAB_SLURM_TASK=1;
an `salloc` or `srun` session keeps a plain worker's handling), for:
- USR1, the warning the job array asks for (`--signal=B:USR1@S`, vaelab.sweeps.slurm): the time limit is
  near. The trial under way stops after its epoch under way (every member of a stack; one whose training
  has not begun yet, after its first epoch), its state saved and its MLflow run KILLED and resumable; its
  point goes back to the queue at once; the worker claims nothing new and then requeues its own task
  (`scontrol requeue JOB_TASK`), whose next life resumes the same run from that epoch. A trial that is
  past training (evaluation) finishes first.
- TERM: preemption (Slurm requeues a `--requeue` task itself and sends TERM, then KILL after KillWait,
  30 s by default, or a preemption's GraceTime, often 0), `scontrol requeue`, a time limit reached, or
  scancel. It stops at once (a KeyboardInterrupt, as a plain worker's TERM): the run ends KILLED, the point
  goes back, and the run resumes from the state saved at the last epoch's end; the worker does not requeue
  the task (Slurm does, or was asked not to). Waiting for the epoch would be cut short by the KILL. The one
  exception is a TERM while an epoch's results are being recorded (its metrics logged, its state saved):
  it stops once they are, a moment later, so that no epoch is logged and then trained again on resume.
A task killed outright (KILL) is the lease's: its trial is re-queued after --grace-s (vaelab.sweeps.queue).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from types import FrameType

WARNING = signal.SIGUSR1


TASK_ENV = "VAELAB_SLURM_TASK"  # exported "1" by the job scripts vaelab writes and ships


def slurm_task(env: Mapping[str, str] = os.environ) -> str | None:
    """This process's Slurm task as `scontrol` names it (ARRAYJOB_TASK for an array task), or None
    where no vaelab job script started it (outside Slurm, or an salloc / srun session)."""
    if env.get(TASK_ENV) != "1":
        return None
    array, index = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and index:
        return f"{array}_{index}"
    return env.get("SLURM_JOB_ID") or None


def _say(line: str) -> None:
    # os.write, not print: a handler that prints while the main thread prints to the same stream raises
    # "reentrant call"; one write of a whole line cannot interleave.
    # A log that cannot be written (closed, full) must not turn a signal into a crash of the worker.
    try:
        os.write(sys.stderr.fileno(), f"vaelab: {time.strftime('%H:%M:%S')} {line}\n".encode())
    except (OSError, ValueError):
        pass


def _recording_epoch() -> bool:
    """Whether the main thread is recording a member's epoch (its metrics logged, callbacks, its state saved:
    vaelab.training.session.recording_epoch). Looked up, not imported, as in _request_stop."""
    session = sys.modules.get("vaelab.training.session")
    return session is not None and session.recording()


def _request_stop() -> bool:
    """Ask the training under way (if any) to stop after its epoch; False if none is under way or a stop
    was asked already. Looked up, not imported: a worker that has not trained yet need not pay for torch."""
    session = sys.modules.get("vaelab.training.session")
    return session is not None and session.request_stop()


class TaskStop:
    """The stop Slurm asked this worker for, once it has: `asked()` says why (else None), `requeue` whether
    the worker requeues its task when its trials are handed back, `at` when (time.time())."""

    def __init__(self, task: str):
        self.task = task
        self.reason: str | None = None
        self.requeue = False
        self.at: float | None = None

    @classmethod
    def install(cls, env: Mapping[str, str] = os.environ) -> TaskStop | None:
        """Listen for Slurm's signals when this process runs inside a Slurm task; None elsewhere."""
        task = slurm_task(env)
        if task is None:
            return None
        stop = cls(task)
        signal.signal(WARNING, stop.on_warning)
        signal.signal(signal.SIGTERM, stop.on_term)
        return stop

    def asked(self) -> str | None:
        return self.reason

    def _ask(self, reason: str) -> None:
        if self.reason is None:
            self.reason, self.at = reason, time.time()

    def on_warning(self, _signum: int, _frame: FrameType | None) -> None:
        if self.requeue:  # said once; Slurm may warn again
            return
        self._ask(f"Slurm task {self.task}: time limit near (USR1)")
        self.requeue = True
        training = _request_stop()
        _say(f"Slurm task {self.task}: the time limit is near (USR1): "
             + ("finishing this epoch, then handing the trial back and requeueing the task" if training else
                "claiming no new trial; the task requeues once its trials are handed back"))

    def on_term(self, _signum: int, _frame: FrameType | None) -> None:
        self._ask(f"Slurm task {self.task}: stopped by TERM (preempted, requeued, cancelled or out of time)")
        if _recording_epoch():  # an epoch logged but not saved would be trained and logged again
            _request_stop()
            _say(f"Slurm task {self.task}: TERM: stopping once this epoch's results are saved")
            return
        _say(f"Slurm task {self.task}: TERM: stopping now; the run resumes after its last saved epoch")
        raise KeyboardInterrupt("stopped by SIGTERM")

    def requeue_task(self) -> bool:
        """`scontrol requeue` this task: its next life starts the worker again, which resumes the runs handed
        back. Slurm's TERM to this task that follows is expected and ignored from here on."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(WARNING, signal.SIG_IGN)
        try:
            done = subprocess.run(["scontrol", "requeue", self.task], capture_output=True, text=True, timeout=60)
            said = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
            failed = said[-1] if done.returncode else None
        except (OSError, subprocess.TimeoutExpired) as err:
            failed = f"{type(err).__name__}: {err}"
        if failed:
            _say(f"Slurm task {self.task}: could not requeue it ({failed}); its points wait in the queue for "
                 "another worker")
            return False
        _say(f"Slurm task {self.task}: requeued (scontrol requeue); its next start resumes the runs handed back")
        return True
