"""Read and write IDX files (the MNIST family's format), plain or gzipped.

We parse the bytes ourselves instead of going through torchvision's download
check: Debian's recompressed .gz files have other md5 sums than its table.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from vaelab.errors import IdxError

# IDX type codes (third byte of the magic number) -> numpy dtypes (big-endian).
_DTYPES: dict[int, str | type] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            blob = handle.read()
    except (OSError, EOFError) as err:
        raise IdxError(f"{path}: cannot read IDX file ({err})") from None
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] not in _DTYPES:
        raise IdxError(f"{path}: not an IDX file (bad magic number)")
    ndim = blob[3]
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise IdxError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", blob[4:header])
    dtype = np.dtype(_DTYPES[blob[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(blob) - header != expected:
        raise IdxError(f"{path}: IDX size mismatch: header says {shape}, file holds {len(blob) - header} data bytes")
    return np.frombuffer(blob, dtype=dtype, offset=header).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzipped when the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())
