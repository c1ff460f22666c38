"""Training: one loop (loop.py) over members (member.py), driven by a stepper that is
a single model (single.py, eager or compiled: step.py) or a stack (stacked.py)."""

from vaelab.errors import NonFiniteLossError, RunPruned, RunStopped
from vaelab.training.loop import MemberResult, fit, fit_group, fit_stack
from vaelab.training.member import EpochCallback
from vaelab.training.result import RunResult
from vaelab.training.session import denormals_flushed, request_stop
from vaelab.training.setup import init_model, make_optimizer, resolve_device
from vaelab.training.stacked import STACKABLE_KEYS, StackedAdam, stack_blocker, stack_key

__all__ = ["NonFiniteLossError", "RunPruned", "RunStopped", "MemberResult", "fit", "fit_group", "fit_stack",
           "EpochCallback", "RunResult", "denormals_flushed", "request_stop", "init_model", "make_optimizer",
           "resolve_device", "STACKABLE_KEYS", "StackedAdam", "stack_blocker", "stack_key"]
