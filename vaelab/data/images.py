"""Single image files as model inputs (`vaelab reconstruct`): decoded by the image-folder
decoder (`vaelab.data.decode`), so a file gets the same checks (a regular file, never a FIFO
or folder; the pixel limit, read from the header before any pixel is decoded) and the same
pixels (EXIF orientation, 16-bit, transparency on white, centre crop) as training data."""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab.data.decode import decode_file
from vaelab.errors import DataError


def load_image(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """(1, C, H, W) float tensor in [0, 1]; a one-line DataError for a file that cannot be used."""
    channels, height, width = shape
    if height != width:  # every dataset vaelab knows is square; the decoder makes square images
        raise DataError(f"a model of {height}x{width} images: only square images can be read into it")
    array = decode_file(path, channels, height, "crop")
    return (torch.from_numpy(array).float() / 255.0).unsqueeze(0)
