"""Hostile data inputs: dangling symlinks and files that vanish from an image folder, a
data.cache_dir that cannot be written, and `vaelab reconstruct` on a FIFO, a folder or a
decompression bomb. Each is one warning or one line, never a traceback, a hang or a decode
of a billion pixels."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import REPO, make_pictures
from tests.test_checkpoint import checkpoint_dir  # noqa: F401 (a fixture: a tiny model's checkpoint folder)
from tests.test_cli import vaelab
from tests.test_image_folder import data_spec
from vaelab.data import load_data
from vaelab.data.cache import CachedSplit
from vaelab.data.image_folder import cache_split, class_names, list_split
from vaelab.data.images import load_image
from vaelab.errors import DataError


def warned(err: str, path: Path) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"vaelab: warning: skipping {path}: ")]


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A real greyscale PNG of width x height black pixels: tens of KB on disk, width*height bytes decoded."""
    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then the row's pixels
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


# --- image folders ---------------------------------------------------------------------------------------------


def test_a_dangling_symlink_in_a_folder_is_skipped_with_a_warning(tmp_path: Path, capsys):
    make_pictures(tmp_path / "pics", 12)
    broken = tmp_path / "pics" / "day" / "broken.png"
    broken.symlink_to("missing.png")
    data = load_data(data_spec(tmp_path / "pics", tmp_path), torch.device("cpu"))
    assert len(data.train) + len(data.val) + len(data.test) == 12
    [line] = warned(capsys.readouterr().err, broken)
    assert "broken symlink" in line and "missing.png" in line


def test_files_gone_after_listing_are_skipped_not_a_crash(tmp_path: Path, capsys):
    make_pictures(tmp_path / "pics", 12)
    outside = tmp_path / "target.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(outside)
    linked = tmp_path / "pics" / "day" / "linked.png"
    linked.symlink_to(outside)
    split = list_split(tmp_path / "pics")
    gone = tmp_path / "pics" / "night" / "img001.png"
    swapped = tmp_path / "pics" / "night" / "img003.jpg"
    assert {gone, swapped, linked} <= set(split.files)
    # Between the walk and the decode: a file deleted, a symlink's target deleted, a file turned into a FIFO.
    gone.unlink()
    outside.unlink()
    swapped.unlink()
    os.mkfifo(swapped)
    result: list[CachedSplit] = []
    spec = data_spec(tmp_path / "pics", tmp_path, decode_workers=1)
    worker = threading.Thread(target=lambda: result.append(cache_split(split, class_names({"train": split}), spec,
                                                                       progress=False)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():  # a regression opened the FIFO: a writer's EOF lets it go before failing
        os.close(os.open(swapped, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("decoding waited on a FIFO")
    [cached] = result
    assert cached.count == 13 - 3 and cached.skipped == 3
    err = capsys.readouterr().err
    assert warned(err, gone) and warned(err, linked) and "named pipe" in warned(err, swapped)[0]


@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_a_cache_dir_that_cannot_be_written_is_one_line_before_decoding(tmp_path: Path, capsys, where: str):
    make_pictures(tmp_path / "pics", 8)
    (tmp_path / "pics" / "day" / "junk.png").write_text("not an image")
    (tmp_path / "file").write_text("a regular file")
    cache = tmp_path / "file" / "cache" if where == "under a file" else tmp_path / "file"
    spec = data_spec(tmp_path / "pics", tmp_path, cache_dir=str(cache))
    with pytest.raises(DataError) as err:
        load_data(spec, torch.device("cpu"))
    message = str(err.value)
    assert message.startswith(f"data.cache_dir: cannot write to {cache} (") and "file, not a folder" in message
    assert "\n" not in message
    assert "junk.png" not in capsys.readouterr().err  # nothing was decoded: its warning never came
    assert (tmp_path / "file").read_text() == "a regular file"


# --- vaelab reconstruct ----------------------------------------------------------------------------------------


def test_reconstruct_refuses_a_fifo_at_once(tmp_path: Path, checkpoint_dir: Path):  # noqa: F811
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    started = time.monotonic()
    # A timeout, not a hang, if opening the FIFO ever waits for a writer again.
    done = vaelab(tmp_path, "reconstruct", str(checkpoint_dir), str(fifo), "--out", str(tmp_path / "o.png"),
                  timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"vaelab: error: {fifo}: cannot read as an image (a named pipe (FIFO), not an image file)"]
    assert time.monotonic() - started < 60 and not (tmp_path / "o.png").exists()


def test_load_image_refuses_bombs_from_their_header(tmp_path: Path):
    # 144 megapixels (over PIL's limit, under its error) and 400 megapixels: measured in a fresh
    # process, whose peak memory shows whether any of those pixels were decoded.
    bombs = [bomb_png(tmp_path / "144mp.png", 12_000, 12_000), bomb_png(tmp_path / "400mp.png", 20_000, 20_000)]
    script = f"""
import json, resource, time
from vaelab.data.images import load_image
from vaelab.errors import DataError
before, started, messages = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic(), []
for path in {[str(b) for b in bombs]!r}:
    try:
        load_image(path, (3, 32, 32))
    except DataError as err:
        messages.append(str(err))
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"messages": messages, "grown_kib": grown, "seconds": time.monotonic() - started}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(out["messages"]) == 2, out
    for path, message in zip(bombs, out["messages"], strict=True):
        assert message.startswith(f"{path}: cannot read as an image (") and "pixels" in message, message
    assert out["grown_kib"] < 64 * 1024, out  # decoding the smaller one alone takes 144 MB
    assert out["seconds"] < 10, out


def test_load_image_refuses_folders_and_missing_files_and_reads_real_ones(tmp_path: Path):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "dangling.png").symlink_to("nowhere.png")
    expected = {"folder.png": "a folder, not an image file", "missing.png": "no such file",
                "dangling.png": "a broken symlink (to nowhere.png)"}
    for name, reason in expected.items():
        with pytest.raises(DataError) as err:
            load_image(tmp_path / name, (1, 28, 28))
        assert str(err.value) == f"{tmp_path / name}: cannot read as an image ({reason})"
    Image.new("RGB", (90, 60), (255, 0, 0)).save(tmp_path / "red.png")
    x = load_image(tmp_path / "red.png", (3, 16, 16))
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 5, 5], torch.tensor([1.0, 0.0, 0.0]))
