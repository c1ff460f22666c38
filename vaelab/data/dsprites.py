"""dSprites (Matthey et al. 2017; Higgins et al. 2017): binary 64x64 sprites from five ground-truth factors.

The grid is shape 3 (square, ellipse, heart) x scale 6 (linspace(0.5, 1, 6)) x orientation 40
(linspace(0, 2 pi, 40), so index 39 is index 0 again) x pos_x 32 x pos_y 32 (linspace(0, 1, 32)):
737,280 images, row r holding the factors `np.unravel_index(r, FACTOR_SIZES)` (row-major; pos_y varies
fastest). That is the order of the official `dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz`
(github.com/deepmind/dsprites-dataset), whose `latents_classes` carry a constant colour column first.

Images come from that file (`read_npz`: only its `imgs` array and, as a check, `latents_classes` are read;
its pickled `metadata` is never loaded) or from `render`, a deterministic numpy renderer that needs no
download. The renderer's geometry was fitted to the official pixels published with the data set (the
320 native 64x64 frames of the repository's dsprites.gif: scale, orientation and position traversals
of all three shapes), on a continuous image plane where pixel (row i, column j) covers
[j, j + 1) x [i, i + 1) and is on iff its centre (j + 0.5, i + 0.5) lies in the shape:

- position: the sprite centre is (16 + 32 pos_x, 16 + 32 pos_y) pixels, i.e. it covers the middle
  half of the image, 32/31 px per position step; pos_x moves along the column axis (rightwards),
  pos_y along the row axis (downwards, see below);
- scale multiplies the shape's size about that centre; at scale 1 the square's side is 19.2 px
  (0.3 of the image), the ellipse's semi-axes are 12.77 and 7.21 px (horizontal at orientation 0), and
  the heart is the classic parametric heart curve (x = 16 sin^3 t, y = 13 cos t - 5 cos 2t - 2 cos 3t
  - cos 4t, a 200-gon) scaled to about 19.2 x 19.15 px, lobes up and point down at orientation 0;
- orientation turns the shape counterclockwise on screen about the sprite centre by the angle.

On the published frames the renderer is off by 8 pixels in all (46 square frames), 8 (46 ellipse
frames) and 24 (174 heart frames, position traversals included): single pixels whose centres lie
within 0.004 px of a shape's edge.

What the frames cannot settle: they carry no labels, so their factor values are read off the order of
the traversals (each runs from index 0 upwards, as the scale traversals visibly do). The pos_x axis is
fixed independently by the data set's notebook (its pos_x = 0 density is a stripe at the left edge,
centred on column 15.5); pos_y = 0 at the top and the counterclockwise sense of rotation rest on that
reading (and match the y-down screen of LOVE, which drew the data set). If a traversal ran downwards,
pos_y would run bottom to top (index k here is 31 - k there) or the rotation would be clockwise.

`DSprites` is the ground-truth factor data the disentanglement metrics take (`factor_sizes`,
`factor_names`, `sample_factors`, `images`), and `grid_images` streams the whole grid in row order
as uint8 0/255 chunks for a cache writer, so the grid is never one float array.
"""

from __future__ import annotations

import functools
import math
import os
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vaelab.errors import DataError

__all__ = ["FACTOR_NAMES", "FACTOR_SIZES", "NPZ_NAME", "IMAGE_SIZE", "SHAPES", "DSprites", "factor_values",
           "grid_images", "read_npz", "render"]

FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
FACTOR_SIZES = (3, 6, 40, 32, 32)
NPZ_NAME = "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
# Names the renderer's geometry in cache files: a change to `render` must change it.
RENDER_VERSION = "render-v1"
IMAGE_SIZE = 64
SHAPES = ("square", "ellipse", "heart")

# ---- geometry at scale 1, in pixels (fitted to the official frames; see the module docstring) ----------
_POS_LOW = 16.0  # sprite centre at position value 0
_POS_SPAN = 32.0  # ... and at value 1: _POS_LOW + _POS_SPAN
_SQUARE_HALF = 9.6  # half the square's side
_ELLIPSE_A = 12.77  # semi-axis along the sprite's own x axis (horizontal at orientation 0)
_ELLIPSE_B = 7.21
_HEART_SX = 0.6  # heart curve x (-16..16) -> pixels: 19.2 px wide
_HEART_SY = 0.662  # heart curve y (-17..11.92) -> pixels: 19.15 px tall
_HEART_DY = -1.44  # where the curve's origin sits below the sprite centre (negative: above)
_HEART_VERTICES = 200  # the curve as a polygon with this many vertices
_WINDOW_CHUNK = 2048  # images rendered per vectorised step (bounds the temporaries to ~100 MB)
_NPZ_CHECK_ROWS = 4096  # latents_classes rows compared with the row-major grid


# ---- factors ------------------------------------------------------------------------------------------
def _check_sizes(factor_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in factor_sizes)
    if len(sizes) != len(FACTOR_NAMES) or min(sizes) < 1 or sizes[0] > len(SHAPES):
        raise ValueError(f"factor_sizes must be 5 positive sizes with at most {len(SHAPES)} shapes, not {sizes}")
    return sizes


def factor_values(factor_sizes: Sequence[int] = FACTOR_SIZES) -> tuple[np.ndarray, ...]:
    """The value of every factor index: shape ids, scales, angles (radians), pos_x and pos_y in [0, 1].

    For the official sizes these are the file's latents_values: scale linspace(0.5, 1, 6), orientation
    linspace(0, 2 pi, 40), positions linspace(0, 1, 32). Smaller sizes (tests) span the same ranges.
    """
    n_shape, n_scale, n_angle, n_x, n_y = _check_sizes(factor_sizes)
    return (np.arange(n_shape), np.linspace(0.5, 1.0, n_scale), np.linspace(0.0, 2 * np.pi, n_angle),
            np.linspace(0.0, 1.0, n_x), np.linspace(0.0, 1.0, n_y))


def _as_factors(factors: Any, sizes: tuple[int, ...]) -> np.ndarray:
    """(n, 5) int64 factor indices, checked against sizes (ValueError otherwise)."""
    array = np.asarray(factors)
    if array.ndim == 1 and array.size == len(sizes):
        array = array[None]
    if array.ndim != 2 or array.shape[1] != len(sizes):
        raise ValueError(f"factors must be (n, {len(sizes)}) indices, not shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise ValueError("factors must be integer indices")
    array = array.astype(np.int64)
    if array.size and ((array < 0).any() or (array >= np.array(sizes)).any()):
        raise ValueError(f"factor indices out of range for sizes {sizes}")
    return array


# ---- the renderer -------------------------------------------------------------------------------------
def _heart_polygon() -> tuple[np.ndarray, np.ndarray]:
    t = 2 * np.pi * np.arange(_HEART_VERTICES) / _HEART_VERTICES
    x = _HEART_SX * 16 * np.sin(t) ** 3
    y = -_HEART_SY * (13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) + _HEART_DY
    return x, y


def _pseudo_angle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A cheap stand-in for atan2(y, x): increasing with the angle, from -1 (straight up, y < 0) to 3."""
    total = np.abs(x) + np.abs(y)
    ratio = y / np.where(total > 0, total, 1.0)
    return np.where(x >= 0, ratio, 2.0 - ratio)


@functools.cache
def _heart_edges() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The heart polygon as edges sorted by direction from the sprite centre: (start angles, nx, ny, c).

    The polygon is star-shaped about the centre (every ray from it leaves the heart once), so a point
    is in the heart iff it is on the inner side, nx u + ny v <= c, of the one edge its direction meets.
    """
    x, y = _heart_polygon()
    angle = _pseudo_angle(x, y)
    order = np.argsort(angle, kind="stable")
    ax, ay, angle = x[order], y[order], angle[order]
    if (np.diff(angle) <= 0).any():
        raise AssertionError("the heart polygon must be star-shaped about the sprite centre")
    bx, by = np.roll(ax, -1), np.roll(ay, -1)
    nx, ny = by - ay, ax - bx  # a normal of edge a -> b
    c = nx * ax + ny * ay
    flip = np.where(c < 0, -1.0, 1.0)  # orient the normals so that the centre (0, 0) is inside: 0 <= c
    return angle, nx * flip, ny * flip, c * flip


@functools.cache
def _reach(shape: int) -> float:
    """The farthest a shape's pixels reach from the sprite centre, at scale 1."""
    if shape == 0:
        return _SQUARE_HALF * math.sqrt(2)
    if shape == 1:
        return _ELLIPSE_A
    x, y = _heart_polygon()
    return float(np.hypot(x, y).max())


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether points (u, v) in the sprite's own frame (pixels at scale 1, v down) are in the shape."""
    if shape == 0:
        return (np.abs(u) <= _SQUARE_HALF) & (np.abs(v) <= _SQUARE_HALF)
    if shape == 1:
        return (u * u) * (1 / _ELLIPSE_A**2) + (v * v) * (1 / _ELLIPSE_B**2) <= 1.0
    starts, nx, ny, c = _heart_edges()
    edge = np.searchsorted(starts, _pseudo_angle(u, v), side="right") - 1  # -1: the edge that wraps round
    return nx[edge] * u + ny[edge] * v <= c[edge]


def _window(centres: np.ndarray, half: int) -> np.ndarray:
    """First pixel of each sprite's (2 half + 1)-wide window, kept on the canvas."""
    width = min(2 * half + 1, IMAGE_SIZE)
    return (np.floor(centres).astype(np.int64) - half).clip(0, IMAGE_SIZE - width)


def _draw(out: np.ndarray, shape: int, scale: np.ndarray, angle: np.ndarray, cx: np.ndarray,
          cy: np.ndarray) -> None:
    """Render sprites of one shape into out (n, 64, 64), evaluating only a window around each."""
    half = math.ceil(_reach(shape) * float(scale.max()) + 0.5)
    width = min(2 * half + 1, IMAGE_SIZE)
    col0, row0 = _window(cx, half), _window(cy, half)
    offsets = np.arange(width)
    dx = (col0[:, None] + offsets + 0.5 - cx[:, None])[:, None, :]  # (n, 1, w): pixel centre - sprite centre
    dy = (row0[:, None] + offsets + 0.5 - cy[:, None])[:, :, None]  # (n, w, 1)
    cos = (np.cos(angle) / scale)[:, None, None]
    sin = (np.sin(angle) / scale)[:, None, None]
    # Image -> sprite frame: undo a counterclockwise-on-screen turn (y points down), then the scale.
    u = dx * cos - dy * sin
    v = dx * sin + dy * cos
    mask = _inside(shape, u, v)
    images = np.arange(len(out))[:, None, None]
    out[images, row0[:, None, None] + offsets[None, :, None], col0[:, None, None] + offsets[None, None, :]] = mask


def render(factors: Any, factor_sizes: Sequence[int] = FACTOR_SIZES) -> np.ndarray:
    """(n, 64, 64) uint8 images of 0/1 for (n, 5) factor indices (shape, scale, orientation, pos_x, pos_y).

    Deterministic, and each image depends on its own factors only (not on the rest of the batch).
    Axes: pos_x moves the sprite along the column axis (image x, rightwards, as in the official data),
    pos_y along the row axis (downwards); orientation turns the shape counterclockwise on screen. (The
    module docstring says which of these the official frames settle.)
    """
    sizes = _check_sizes(factor_sizes)
    index = _as_factors(factors, sizes)
    out = np.zeros((len(index), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    _, scales, angles, xs, ys = factor_values(sizes)
    for start in range(0, len(index), _WINDOW_CHUNK):
        part = index[start:start + _WINDOW_CHUNK]
        for shape in np.unique(part[:, 0]):
            rows = np.flatnonzero(part[:, 0] == shape)
            f = part[rows]
            block = np.zeros((len(rows), IMAGE_SIZE, IMAGE_SIZE), np.uint8)
            _draw(block, int(shape), scales[f[:, 1]], angles[f[:, 2]], _POS_LOW + _POS_SPAN * xs[f[:, 3]],
                  _POS_LOW + _POS_SPAN * ys[f[:, 4]])
            out[start + rows] = block
    return out


# ---- the official file --------------------------------------------------------------------------------
_READ_ERRORS = (zipfile.BadZipFile, ValueError, OSError, KeyError, EOFError, zlib.error)


def _check_classes(path: str, classes: np.ndarray, sizes: tuple[int, ...]) -> None:
    """latents_classes, if the file has them, must be the row-major grid (checked on a sample of rows)."""
    n = int(np.prod(sizes))
    if classes.ndim != 2 or len(classes) != n or classes.shape[1] not in (len(sizes), len(sizes) + 1):
        raise DataError(f"{path}: latents_classes has shape {classes.shape}, not ({n}, {len(sizes) + 1})")
    rows = np.unique(np.linspace(0, n - 1, min(n, _NPZ_CHECK_ROWS)).astype(np.int64))
    sample = classes[rows]
    if sample.shape[1] == len(sizes) + 1:  # the official file's constant colour column
        if (sample[:, 0] != 0).any():
            raise DataError(f"{path}: latents_classes colour column is not all 0; not the dSprites grid")
        sample = sample[:, 1:]
    expected = np.stack(np.unravel_index(rows, sizes), axis=1)
    if not np.array_equal(sample, expected):
        raise DataError(f"{path}: rows are not in dSprites order (latents_classes do not match the row-major grid)")


def _load_imgs(path: str, sizes: tuple[int, ...]) -> np.ndarray:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"PK\x03\x04":
        raise DataError(f"{path}: not an npz (zip) archive")
    # allow_pickle=False: no member is ever unpickled (reading an object array raises instead).
    with np.load(path, allow_pickle=False) as archive:
        if "imgs" not in archive.files:
            raise DataError(f"{path}: no 'imgs' array in the archive (has {sorted(archive.files)})")
        imgs = archive["imgs"]
        n = int(np.prod(sizes))
        if imgs.dtype != np.uint8 or imgs.shape != (n, IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{path}: imgs is {imgs.dtype} {imgs.shape}, not uint8 ({n}, {IMAGE_SIZE}, {IMAGE_SIZE})")
        if "latents_classes" in archive.files:
            _check_classes(path, archive["latents_classes"], sizes)
    return imgs


def read_npz(path: str | os.PathLike[str], factor_sizes: Sequence[int] = FACTOR_SIZES) -> np.ndarray:
    """The images of a dSprites npz archive: (N, 64, 64) uint8 of 0/1, in row-major factor order.

    Reads the `imgs` member only (plus `latents_classes`, if present, to check the row order on a
    sample of rows); the pickled `metadata` member is never loaded. A missing, truncated, corrupt or
    wrong file raises DataError, one line naming the path.
    """
    sizes = _check_sizes(factor_sizes)
    name = os.fspath(path)
    try:
        imgs = _load_imgs(name, sizes)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: no such file (download {NPZ_NAME} from github.com/deepmind/dsprites-dataset)") \
            from None
    except _READ_ERRORS as err:
        raise DataError(f"{name}: cannot read the dSprites npz archive ({type(err).__name__}: {err})") from None
    if imgs.size and imgs.max() > 1:
        raise DataError(f"{name}: imgs holds values other than 0 and 1; not dSprites")
    return imgs


# ---- the factor data set ------------------------------------------------------------------------------
class DSprites:
    """dSprites as ground-truth factor data: factors -> images, from the official file or rendered.

    `DSprites(path)` serves the npz's images (all held in memory, 3 GB as bytes); `DSprites()` renders
    each requested image on demand (no file, no full grid). factor_sizes other than the official ones
    (tests) are for the renderer only.
    """

    factor_names: tuple[str, ...] = FACTOR_NAMES

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 factor_sizes: Sequence[int] = FACTOR_SIZES) -> None:
        self.factor_sizes: tuple[int, ...] = _check_sizes(factor_sizes)
        self.path = None if path is None else os.fspath(path)
        self._imgs = None if path is None else read_npz(path, self.factor_sizes)

    @property
    def num_images(self) -> int:
        return int(np.prod(self.factor_sizes))

    def sample_factors(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 5) int64 factor indices drawn uniformly over the grid."""
        return rng.integers(0, self.factor_sizes, size=(int(n), len(self.factor_sizes)), dtype=np.int64)

    def index(self, factors: Any) -> np.ndarray:
        """(n,) int64 grid rows of (n, 5) factor indices (row-major, pos_y fastest)."""
        f = _as_factors(factors, self.factor_sizes)
        return np.ravel_multi_index(tuple(f.T), self.factor_sizes).astype(np.int64)

    def factors_at(self, rows: Any) -> np.ndarray:
        """(n, 5) int64 factor indices of grid rows (the inverse of `index`)."""
        r = np.asarray(rows, dtype=np.int64).reshape(-1)
        if r.size and (r.min() < 0 or r.max() >= self.num_images):
            raise ValueError(f"grid rows out of range 0..{self.num_images - 1}")
        return np.stack(np.unravel_index(r, self.factor_sizes), axis=1).astype(np.int64)

    def binary_images(self, factors: Any) -> np.ndarray:
        """(n, 64, 64) uint8 images of 0/1."""
        if self._imgs is None:
            return render(factors, self.factor_sizes)
        return self._imgs[self.index(factors)]

    def images(self, factors: Any) -> np.ndarray:
        """(n, 1, 64, 64) float32 images in {0, 1}."""
        return self.binary_images(factors)[:, None].astype(np.float32)

    def use_grid_cache(self, folder: str | os.PathLike[str], show_progress: bool = False) -> str:
        """Serve images from the whole rendered grid, written once to `folder` (3 GB of 0/1 bytes for the
        official grid) and memory-mapped, instead of rendering each request: worth it when the metrics ask
        for more images than the grid holds (disentanglement_lib's sizes ask for about 2.2 million). The
        file is written under a temporary name and renamed, so a killed render leaves no partial grid.
        Returns the file's path; a DSprites reading the official npz keeps it and returns its path."""
        if self.path is not None:
            return self.path
        from vaelab import progress

        sizes = "x".join(map(str, self.factor_sizes))
        target = Path(folder).expanduser() / f"dsprites-grid-{RENDER_VERSION}-{sizes}.u8"
        expected = self.num_images * IMAGE_SIZE * IMAGE_SIZE
        if not target.is_file() or target.stat().st_size != expected:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as out, progress.bar(self.num_images, "dsprites: rendering the grid once", "img",
                                                          show=show_progress, delay=1.0, count=True) as bar:
                    for start in range(0, self.num_images, 8192):
                        stop = min(start + 8192, self.num_images)
                        out.write(render(self.factors_at(np.arange(start, stop)), self.factor_sizes).tobytes())
                        bar.update(stop - start)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        self._imgs = np.memmap(target, dtype=np.uint8, mode="r", shape=(self.num_images, IMAGE_SIZE, IMAGE_SIZE))
        return str(target)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, 64, 64) uint8 images of 0/1 of grid rows start..stop-1."""
        if self._imgs is not None:
            return self._imgs[start:stop]
        return render(self.factors_at(np.arange(start, stop)), self.factor_sizes)


def grid_images(source: DSprites | str | os.PathLike[str] | None = None, chunk: int = 4096, *,
                factor_sizes: Sequence[int] = FACTOR_SIZES) -> Iterator[np.ndarray]:
    """The whole grid in row order as (chunk, 1, 64, 64) uint8 arrays of 0/255 (the last may be shorter).

    source: a `DSprites`, the path of the official npz, or None to render. Bytes 0/255 are the floats
    0/1 of `DSprites.images`; the grid is never held as one float array (12 GB as float32).
    factor_sizes applies when source is a path or None.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, not {chunk}")
    data = source if isinstance(source, DSprites) else DSprites(source, factor_sizes=factor_sizes)
    for start in range(0, data.num_images, chunk):
        part = data.rows(start, min(start + chunk, data.num_images))
        yield (part * np.uint8(255))[:, None]
