"""Decoding researchers' own image files: robustly, in parallel, with progress.

Real folders hold rotated phone photos, greyscale and 16-bit scans, transparent
PNGs, CMYK JPEGs, truncated downloads and the odd text file named `.png`. Each
image becomes a uint8 array (channels, size, size); one that cannot be used is
skipped with one warning line, so a single bad file never stops a data set.

This module imports no torch: it runs in worker processes, where start-up time
and memory per worker matter.
"""

from __future__ import annotations

import contextlib
import io
import math
import multiprocessing
import os
import signal
import stat
import sys
import warnings
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vaelab.errors import DataError
from vaelab.progress import bar as progress_bar
from vaelab.progress import say

__all__ = ["EXTENSIONS", "decode_file", "decode_image", "decode_many", "walk_images"]

EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
RESIZES = ("crop", "stretch")

Source = str | os.PathLike[str] | bytes
Decoded = tuple[np.ndarray | None, str | None]  # (image, warning reason)

_HIGH_DEPTH = {"I", "I;16", "I;16L", "I;16B", "I;16N"}  # one channel, 16 (or 32) bits per pixel
_BAR_DELAY_S = 1.0  # a bar (or, in a log, its line) only when decoding takes longer than this
_CHUNK_MAX = 32  # images per worker task: few round trips, small results in flight


class _Skip(Exception):
    """An image that opens but must not be decoded (the reason is the message)."""


# --- one image ---------------------------------------------------------------------------------------------------


def decode_image(source: Source, channels: int, size: int, resize: str,
                 name: str | None = None, max_pixels: int | None = None) -> np.ndarray | None:
    """uint8 array (channels, size, size), or None after printing one warning line (unreadable,
    truncated, too large). `source` is a file path or the encoded bytes of an image file;
    `name` names it in warnings (defaults to the path, or '<bytes>'). resize: 'crop' = centre
    square crop then scale (no distortion); 'stretch' = scale to square. Bilinear resampling.

    max_pixels defaults to PIL's Image.MAX_IMAGE_PIXELS (None there: no limit); PIL's own hard
    limit, twice that, still applies."""
    _check_args(channels, size, resize)
    array, reason = _decode(source, channels, size, resize, max_pixels)
    if reason is not None:
        print(_warning_line(_name_of(source, name), reason), file=sys.stderr)
    return array


def decode_file(path: str | os.PathLike[str], channels: int, size: int, resize: str = "crop",
                max_pixels: int | None = None) -> np.ndarray:
    """One image file a user named (not one of a folder's many): decoded as decode_image does, with
    the same checks (a regular file, the pixel limit read from the header), but a file that cannot
    be used raises a one-line DataError instead of being skipped."""
    _check_args(channels, size, resize)
    array, reason = _decode(path, channels, size, resize, max_pixels)
    if array is None:
        raise DataError(f"{os.fspath(path)}: cannot read as an image ({reason})")
    return array


def _check_args(channels: int, size: int, resize: str) -> None:
    if channels not in (1, 3):
        raise DataError(f"channels={channels!r}: images decode to 1 (grey) or 3 (RGB) channels")
    if not isinstance(size, int | np.integer) or size < 1:
        raise DataError(f"image size={size!r}: must be a positive number of pixels")
    if resize not in RESIZES:
        raise DataError(f"resize={resize!r}: must be one of {', '.join(RESIZES)}")


def _decode(source: Source, channels: int, size: int, resize: str, max_pixels: int | None) -> Decoded:
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels  # read now: callers may change it
    try:
        with _open(source) as image:
            _check_pixels(image, limit)
            # JPEGs decode at 1/2, 1/4 or 1/8 scale when still >= 2x the target (as Image.thumbnail does).
            image.draft(None, (2 * size, 2 * size))
            image.load()
            array = _pixels(_oriented(image), channels, size, resize)
    except _Skip as skip:
        return None, str(skip)
    # Real files fail in many ways (OSError, SyntaxError, struct.error, ValueError, ...): one skip, not a crash.
    except Exception as err:
        return None, _reason(err)
    return array, None


@contextlib.contextmanager
def _open(source: Source) -> Iterator[Image.Image]:
    """`source` opened by PIL (header only): encoded bytes, or a file that passed `_checked_file`."""
    if isinstance(source, bytes | bytearray | memoryview):
        if not source:
            raise _Skip("empty file")
        with _quiet_open(io.BytesIO(source)) as image:
            yield image
        return
    # PIL does not close a file object it was given: this `with` does.
    with _checked_file(source) as file, _quiet_open(file) as image:
        yield image


def _checked_file(path: str | os.PathLike[str]) -> BinaryIO:
    """`path` opened for reading if it is a non-empty regular file.

    Opened without blocking, then checked by its open descriptor: a FIFO (which would wait for
    a writer forever) or a device (endless) is refused, even one swapped in after a folder was
    listed. (O_NONBLOCK changes nothing for reading a regular file.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if os.path.islink(path):
            raise _Skip(f"a broken symlink (to {os.readlink(path)})") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Skip(f"{_file_kind(info.st_mode)}, not an image file")
        if info.st_size == 0:
            raise _Skip("empty file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _quiet_open(source: BinaryIO) -> Image.Image:
    # Our own pixel limit replaces PIL's warning; PIL's DecompressionBombError (2x its limit) still raises.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def _check_pixels(image: Image.Image, limit: int | None) -> None:
    # The header gives the size: a decompression bomb is refused before its pixels are decoded.
    width, height = image.size
    if limit is not None and width * height > limit:
        raise _Skip(f"{width}x{height} = {width * height} pixels is more than the limit of {limit} "
                    "(a decompression bomb?)")


def _oriented(image: Image.Image) -> Image.Image:
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # broken EXIF metadata should not cost an image whose pixels are fine
        pass
    return image


def _pixels(image: Image.Image, channels: int, size: int, resize: str) -> np.ndarray:
    image = _converted(image, channels)
    if resize == "crop":  # crop first: resize(box=...) would blend in pixels from outside the square
        image = image.crop(_centre_square(image.size))
    image = image.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    array = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return np.array(array, dtype=np.uint8, order="C")  # a writable, C-contiguous copy


def _centre_square(image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = image_size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _converted(image: Image.Image, channels: int) -> Image.Image:
    """`image` in mode L (channels=1) or RGB (channels=3)."""
    target = "L" if channels == 1 else "RGB"
    if image.mode in _HIGH_DEPTH or image.mode == "F":
        image = _to_8_bit(image)
    elif image.has_transparency_data:
        image = _on_white(image)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # CMYK, P, 1, YCbCr, ...: PIL's conversions; L below is PIL's luma
    return image if image.mode == target else image.convert(target)


def _to_8_bit(image: Image.Image) -> Image.Image:
    # PIL's convert("L") clips these at 255; scale the full range instead.
    values = np.asarray(image)
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0  # float images are usually in [0, 1]
        grey = np.rint(np.clip(values * scale, 0, 255))
    else:  # 16-bit: 0..65535 -> 0..255 rounded (65535 -> 255, 32768 -> 128); a 32-bit 'I' is taken as 16-bit
        grey = (np.clip(values.astype(np.int64), 0, 65535) + 128) // 257
    return Image.fromarray(grey.astype(np.uint8))


def _on_white(image: Image.Image) -> Image.Image:
    # Transparent pixels hold arbitrary colours (often black): show them as white.
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


# --- warnings ----------------------------------------------------------------------------------------------------


def _name_of(source: Source, name: str | None) -> str:
    if name is not None:
        return name
    return "<bytes>" if isinstance(source, bytes | bytearray | memoryview) else str(os.fspath(source))


def _reason(err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(err, PermissionError):
        return "permission denied"
    if isinstance(err, UnidentifiedImageError):
        return "not an image file PIL can read"
    if isinstance(err, Image.DecompressionBombError):
        return f"too large to decode safely ({err})"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    if isinstance(err, OSError):  # PIL's "image file is truncated", "broken data stream", ...
        return f"truncated or corrupt image ({err})"
    return f"corrupt or unsupported image ({type(err).__name__}: {err})"


def _warning_line(name: str, reason: str) -> str:
    line = f"vaelab: warning: skipping {name}: {reason}"
    # One line, always: a file name may hold a newline.
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in line)


def _warn(name: str, reason: str) -> None:
    say(_warning_line(name, reason))  # clears and redraws any progress bar


# --- folders -----------------------------------------------------------------------------------------------------


def walk_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under `folder`, recursively, sorted; follows symlinked
    directories but never loops (a symlink loop is visited once); skips hidden files and
    folders (names starting with '.'). Image = suffix in EXTENSIONS (case-insensitive).

    A folder reached twice (a loop, or two links to one folder) is listed under the first path
    in sorted order. Broken symlinks count as files, so decoding names them; an unreadable
    subfolder is skipped with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    images: list[Path] = []
    others: list[Path] = []
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        directory = stack.pop()
        try:
            subfolders, files = _scan(directory, seen)
        except OSError as err:
            if directory == folder:
                raise DataError(f"{folder}: cannot read this folder ({err.strerror or err})") from err
            _warn(str(directory), _reason(err))
            continue
        stack.extend(reversed(subfolders))  # depth first, in sorted order: the first path to a folder wins
        for path in files:
            (images if path.suffix.lower() in EXTENSIONS else others).append(path)
    return sorted(images), sorted(others)


def _scan(directory: Path, seen: set[tuple[int, int]]) -> tuple[list[Path], list[Path]]:
    """(subfolders, files) directly in `directory`, sorted, hidden ones left out; nothing when
    `directory` was seen already (its device and inode, so a symlink loop ends)."""
    stat = os.stat(directory)
    if (stat.st_dev, stat.st_ino) in seen:
        return [], []
    seen.add((stat.st_dev, stat.st_ino))
    subfolders, files = [], []
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda entry: entry.name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subfolders.append(Path(entry.path))
            elif entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path)):
                files.append(Path(entry.path))  # fifos, sockets and devices are no images
    return subfolders, files


# --- many images -------------------------------------------------------------------------------------------------


def decode_many(sources: Sequence[Source], channels: int, size: int, resize: str,
                names: Sequence[str] | None = None, workers: int | None = None,
                desc: str = "decoding images", progress: bool = True) -> Iterator[np.ndarray | None]:
    """decode_image over `sources`, yielded IN ORDER, in `workers` processes (default: os.cpu_count();
    1 = in this process, no pool), with a progress bar (vaelab.progress: unit 'img', to stderr, shown once
    decoding takes over a second; in a log, one line when it ends). Memory stays bounded: a few chunks per
    worker are in flight, never a list of all decoded images. Warnings are printed here, in order, between bar updates.

    Arguments are checked at once; decoding starts when the first item is asked for, and a
    generator closed early stops its workers."""
    _check_args(channels, size, resize)
    if names is not None and len(names) != len(sources):
        raise ValueError(f"{len(names)} names for {len(sources)} sources")
    if workers is not None and workers < 1:
        raise DataError(f"workers={workers}: must be at least 1")
    labels = list(names) if names is not None else [_name_of(source, None) for source in sources]
    return _decode_many(sources, labels, (channels, size, resize), workers or os.cpu_count() or 1, desc, progress)


def _decode_many(sources: Sequence[Source], names: list[str], settings: tuple[int, int, str],
                 workers: int, desc: str, progress: bool) -> Iterator[np.ndarray | None]:
    results = _results(sources, settings, workers)
    try:
        with progress_bar(len(sources), desc, "img", show=progress, delay=_BAR_DELAY_S, count=True) as bar:
            for (array, reason), name in zip(results, names, strict=True):
                if reason is not None:
                    _warn(name, reason)
                bar.update(1)
                yield array
    finally:
        results.close()  # closed early: stop the workers now, not when garbage is collected


def _results(sources: Sequence[Source], settings: tuple[int, int, str], workers: int) -> Generator[Decoded, None, None]:
    chunk = max(1, min(_CHUNK_MAX, math.ceil(len(sources) / (4 * workers))))
    workers = min(workers, math.ceil(len(sources) / chunk))
    if workers <= 1:
        yield from (_decode(source, *settings, None) for source in sources)
        return
    # An executor, not multiprocessing.Pool: a worker that dies (out of memory, a crash in an image
    # library, a script without a __main__ guard) fails the futures instead of hanging the Pool.
    executor = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_ignore_sigint)
    finished = False
    try:
        pending: deque[Future[list[Decoded]]] = deque()
        for start in range(0, len(sources), chunk):
            part = [sources[i] for i in range(start, min(start + chunk, len(sources)))]
            pending.append(executor.submit(_decode_chunk, part, settings))
            if len(pending) >= 2 * workers:  # bounded: the rest is not sent until these are taken
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
        finished = True
    except BrokenProcessPool as err:  # seen by a result, or by a submit once a worker has died
        raise DataError("an image-decoding process ended abruptly (out of memory? a crash in an image library? "
                        "a script without an `if __name__ == '__main__':` guard?); fewer workers use less memory, "
                        "and one worker decodes in this process") from err
    finally:
        executor.shutdown(wait=finished, cancel_futures=True)  # closed early or failed: do not wait


def _decode_chunk(sources: Sequence[Source], settings: tuple[int, int, str]) -> list[Decoded]:
    return [_decode(source, *settings, None) for source in sources]


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the workers, which print no tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _context() -> multiprocessing.context.BaseContext:
    # Never fork: the caller may have imported torch (threads, CUDA). A fork server starts once per
    # process and imports this module (and whatever its package imports) once, so workers start
    # in milliseconds and share that memory; spawn where there is no fork server.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # not __main__: a user script is never re-run there
    return context
