"""How much memory a dataset's images may take, and so whether they are resident.

`data.memory_budget: auto` is half of what is free when the run starts: of the host's
available memory for a CPU run, of the GPU's free memory for a CUDA run (resident
images live there; the host only passes chunks through). The other half is left to
the model, its activations, evaluation and whatever else runs on the machine.
"""

from __future__ import annotations

import torch

AUTO_SHARE = 0.5


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def budget_bytes(memory_budget: int | str, device: torch.device) -> int:
    """data.memory_budget in bytes."""
    if memory_budget == "auto":
        return int(free_bytes(device) * AUTO_SHARE)
    return int(memory_budget)


def choose_storage(storage: str, needed: int, budget: int) -> str:
    """'resident' or 'stream' for images of `needed` bytes under `budget`."""
    if storage != "auto":
        return storage
    return "resident" if needed <= budget else "stream"


def show_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
