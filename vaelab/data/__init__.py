"""Data sets as uint8 images on the training device, or streamed from a disk cache.

`load_data(data_spec, device)` is the one entry: the source `data.dataset` names
(`vaelab.data.sources`, one module each) reads its parts, and `vaelab.data.assemble` does what
every source shares (held-out splits, subset, binarisation, placement). This package imports
no torch at module level, so source records and split sizes serve spec checks and `--dry-run`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaelab.data.model import ImageData, Split, SplitInfo
from vaelab.data.splits import seeded_split
from vaelab.errors import DataError

if TYPE_CHECKING:
    import torch

__all__ = ["DataError", "ImageData", "Split", "SplitInfo", "load_data", "seeded_split"]


def load_data(spec: Any, device: torch.device, show_progress: bool = True) -> ImageData:
    """The data set a data spec names (any source), with its seeded held-out splits, on `device`."""
    from vaelab.data.assemble import load_data as assembled  # imports torch

    return assembled(spec, device, show_progress)
