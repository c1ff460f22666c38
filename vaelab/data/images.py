"""Single image files as model inputs: any size or mode, centre-cropped to the
model's aspect ratio and resized to its (C, H, W)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vaelab.data.mnist_family import DataError


def load_image(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """(1, C, H, W) float tensor in [0, 1]."""
    channels, height, width = shape
    try:
        with Image.open(path) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
            # Centre crop to the target aspect ratio, then resize (no distortion).
            src_w, src_h = image.size
            scale = min(src_w / width, src_h / height)
            crop_w, crop_h = round(width * scale), round(height * scale)
            left, top = (src_w - crop_w) // 2, (src_h - crop_h) // 2
            image = image.crop((left, top, left + crop_w, top + crop_h))
            image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: cannot read as an image ({err})") from None
    tensor = torch.from_numpy(array)
    tensor = tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1)
    return tensor.unsqueeze(0)
