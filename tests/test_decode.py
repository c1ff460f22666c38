"""vaelab.data.decode on the image files researchers really have: rotated photos, grey,
16-bit, transparent, palette, CMYK and 1-bit images, bombs, truncated and fake files,
folders with symlink loops; every file is made here with PIL and numpy."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vaelab.data.decode import EXTENSIONS, decode_image, decode_many, walk_images
from vaelab.errors import DataError

WARNING = re.compile(r"^vaelab: warning: skipping (?P<name>.+): (?P<reason>.+)$")
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def warnings_in(text: str) -> list[re.Match[str]]:
    lines = [line for line in text.splitlines() if line.startswith("vaelab:")]
    matches = [WARNING.match(line) for line in lines]
    assert all(matches), lines
    return [m for m in matches if m is not None]


def thirds(width: int = 60, height: int = 20) -> Image.Image:
    """Red, green and blue vertical thirds."""
    array = np.zeros((height, width, 3), np.uint8)
    for i, colour in enumerate((RED, GREEN, BLUE)):
        array[:, i * width // 3:(i + 1) * width // 3] = colour
    return Image.fromarray(array)


def save(image: Image.Image, path: Path, **params) -> Path:
    image.save(path, **params)
    return path


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def assert_colour(pixels: np.ndarray, colour: tuple[int, ...], tol: int = 0) -> None:
    """Every pixel of `pixels` (C, H, W) is `colour`, within `tol`."""
    expected = np.array(colour, dtype=np.int64)[:, None, None]
    assert np.abs(pixels.astype(np.int64) - expected).max() <= tol, pixels.reshape(len(colour), -1).T[:4]


# --- output shape ------------------------------------------------------------------------------------------------


def test_extensions_are_lower_case_suffixes():
    assert isinstance(EXTENSIONS, frozenset)
    assert {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == EXTENSIONS


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resize", ["crop", "stretch"])
def test_output_is_uint8_chw_contiguous(tmp_path, channels, resize):
    path = save(thirds(61, 23), tmp_path / "x.png")
    out = decode_image(path, channels, 16, resize)
    assert out is not None
    assert out.shape == (channels, 16, 16) and out.dtype == np.uint8
    assert out.flags.c_contiguous and out.flags.writeable


def test_crop_keeps_the_centre_and_stretch_keeps_everything(tmp_path):
    path = save(thirds(), tmp_path / "x.png")
    assert_colour(decode_image(path, 3, 8, "crop"), GREEN)
    stretched = decode_image(path, 3, 12, "stretch")
    assert_colour(stretched[:, :, :3], RED)
    assert_colour(stretched[:, :, 5:7], GREEN)
    assert_colour(stretched[:, :, -3:], BLUE)


def test_tall_image_crops_its_middle(tmp_path):
    path = save(thirds().transpose(Image.Transpose.ROTATE_90), tmp_path / "tall.png")  # 20 wide, 60 high
    assert_colour(decode_image(path, 3, 8, "crop"), GREEN)


def test_upscaling_a_small_image_works(tmp_path):
    path = save(Image.new("RGB", (3, 2), (10, 20, 30)), tmp_path / "small.png")
    assert_colour(decode_image(path, 3, 32, "crop"), (10, 20, 30))


def test_bad_arguments_raise_data_error(tmp_path):
    path = save(thirds(), tmp_path / "x.png")
    for kwargs in ({"channels": 2}, {"size": 0}, {"resize": "zoom"}):
        args = {"channels": 3, "size": 8, "resize": "crop"} | kwargs
        with pytest.raises(DataError):
            decode_image(path, **args)


# --- orientation and modes ---------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    # 40 wide, 20 high: left half red, right half blue. Orientation 6 = shown rotated 90 degrees clockwise,
    # so the displayed image is 20 wide, 40 high, red on top.
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20], array[:, 20:] = RED, BLUE
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode_image(save(image, tmp_path / "rotated.jpg", exif=exif, quality=95), 3, 16, "stretch")
    plain = decode_image(save(image, tmp_path / "plain.jpg", quality=95), 3, 16, "stretch")
    assert_colour(plain[:, :, :5], RED, tol=40)
    assert_colour(plain[:, :, -5:], BLUE, tol=40)
    assert_colour(rotated[:, :5, :], RED, tol=40)
    assert_colour(rotated[:, -5:, :], BLUE, tol=40)


def test_rgb_exact_and_to_grey_with_pils_luma(tmp_path):
    colour = (10, 200, 30)
    path = save(Image.new("RGB", (20, 10), colour), tmp_path / "x.png")
    assert_colour(decode_image(path, 3, 8, "crop"), colour)
    luma = Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0))
    assert_colour(decode_image(path, 1, 8, "crop"), (luma,))


def test_grey_is_replicated_to_three_channels(tmp_path):
    path = save(Image.new("L", (10, 10), 77), tmp_path / "grey.png")
    assert_colour(decode_image(path, 3, 8, "crop"), (77, 77, 77))
    assert_colour(decode_image(path, 1, 8, "crop"), (77,))


def half_transparent(mode: str, opaque: tuple[int, ...]) -> Image.Image:
    """Left half `opaque`, right half fully transparent with a black (or colour) underneath."""
    image = Image.new(mode, (16, 8), (0,) * len(mode))
    image.paste(Image.new(mode, (8, 8), opaque), (0, 0))
    return image


@pytest.mark.parametrize(("mode", "opaque", "rgb"), [
    ("RGBA", (255, 0, 0, 255), RED),
    ("LA", (60, 255), (60, 60, 60)),
])
def test_alpha_is_composited_on_white(tmp_path, mode, opaque, rgb):
    image = half_transparent(mode, opaque)
    out = decode_image(save(image, tmp_path / "a.png"), 3, 8, "stretch")
    assert_colour(out[:, :, :3], rgb)
    assert_colour(out[:, :, -3:], WHITE)
    grey = decode_image(save(image, tmp_path / "b.png"), 1, 8, "stretch")
    assert_colour(grey[:, :, -3:], (255,))


def test_half_alpha_blends_with_white(tmp_path):
    path = save(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), tmp_path / "half.png")
    assert_colour(decode_image(path, 3, 4, "crop"), (127, 127, 127), tol=1)


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (16, 8), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)  # index 0 black, 1 green
    image.paste(1, (0, 0, 8, 8))
    if transparent:
        image.info["transparency"] = 0
    return image


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_transparency_is_white(tmp_path, suffix):
    path = save(palette_image(True), tmp_path / f"p{suffix}", transparency=0)
    assert Image.open(path).mode == "P"
    out = decode_image(path, 3, 8, "stretch")
    assert_colour(out[:, :, :3], GREEN)
    assert_colour(out[:, :, -3:], WHITE)


def test_palette_without_transparency_keeps_its_colours(tmp_path):
    path = save(palette_image(False), tmp_path / "p.png")
    out = decode_image(path, 3, 8, "stretch")
    assert_colour(out[:, :, :3], GREEN)
    assert_colour(out[:, :, -3:], (0, 0, 0))


def test_grey_with_a_transparent_value_is_white_there(tmp_path):
    image = Image.new("L", (16, 8), 0)
    image.paste(90, (0, 0, 8, 8))
    out = decode_image(save(image, tmp_path / "t.png", transparency=0), 1, 8, "stretch")
    assert_colour(out[:, :, :3], (90,))
    assert_colour(out[:, :, -3:], (255,))


def test_cmyk(tmp_path):
    image = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # white
    image.paste((0, 255, 255, 0), (0, 0, 8, 8))  # red
    out = decode_image(save(image, tmp_path / "c.tif"), 3, 8, "stretch")
    assert_colour(out[:, :, :3], RED)
    assert_colour(out[:, :, -3:], WHITE)
    jpeg = save(image, tmp_path / "c.jpg", quality=95)
    assert Image.open(jpeg).mode == "CMYK"
    out = decode_image(jpeg, 3, 8, "stretch")
    assert_colour(out[:, :, :2], RED, tol=40)
    assert_colour(out[:, :, -2:], WHITE, tol=40)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.zeros((8, 24), np.uint16)
    values[:, :8], values[:, 8:16] = 65535, 32768  # right third stays 0
    path = save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode in ("I;16", "I")
    out = decode_image(path, 1, 12, "stretch")
    assert_colour(out[:, :, :3], (255,))
    assert_colour(out[:, :, 5:7], (128,), tol=1)
    assert_colour(out[:, :, -3:], (0,))
    assert_colour(decode_image(path, 3, 12, "stretch")[:, :, :3], WHITE)


def test_32_bit_integer_tiff_is_taken_as_16_bit(tmp_path):
    values = np.full((8, 16), 32768, np.int32)
    values[:, 8:] = 1 << 20  # beyond 16 bits: clipped to white, not wrapped
    path = save(Image.fromarray(values), tmp_path / "int.tif")
    assert Image.open(path).mode == "I"
    out = decode_image(path, 1, 8, "stretch")
    assert_colour(out[:, :, :3], (128,), tol=1)
    assert_colour(out[:, :, -3:], (255,))


def test_float_image_in_unit_range(tmp_path):
    path = save(Image.fromarray(np.full((8, 8), 0.5, np.float32)), tmp_path / "f.tif")
    assert Image.open(path).mode == "F"
    assert_colour(decode_image(path, 1, 4, "crop"), (128,), tol=1)


def test_one_bit_image(tmp_path):
    image = Image.new("1", (16, 8), 0)
    image.paste(1, (0, 0, 8, 8))
    out = decode_image(save(image, tmp_path / "bits.png"), 3, 8, "stretch")
    assert_colour(out[:, :, :3], WHITE)
    assert_colour(out[:, :, -3:], (0, 0, 0))


def test_large_jpeg_drafts_to_the_same_picture(tmp_path):
    # JPEGs decode at a reduced scale; the picture must be the same as a full decode.
    image = thirds(1200, 800)
    path = save(image, tmp_path / "big.jpg", quality=95)
    full = Image.open(path).convert("RGB").crop((200, 0, 1000, 800))
    reference = np.asarray(full.resize((16, 16), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    out = decode_image(path, 3, 16, "crop")
    assert np.abs(out.astype(int) - reference).max() <= 8


# --- files that are not usable ------------------------------------------------------------------------------------


def test_decompression_bomb_is_skipped_before_decoding(tmp_path, capsys, monkeypatch):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or original(self))
    assert decode_image(path, 3, 8, "crop", max_pixels=5000) is None
    assert loads == []
    [warning] = warnings_in(capsys.readouterr().err)
    assert warning["name"] == str(path) and "10000 pixels" in warning["reason"]
    assert decode_image(path, 3, 8, "crop", max_pixels=10000) is not None  # at the limit is fine
    assert loads  # the spy sees decoding


def test_default_limit_is_pils_and_its_bomb_error_is_caught(tmp_path, capsys, monkeypatch):
    path = save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # PIL warns above this
    assert decode_image(path, 3, 8, "crop") is None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises DecompressionBombError above twice this
    assert decode_image(path, 3, 8, "crop", max_pixels=10**9) is None
    assert len(warnings_in(capsys.readouterr().err)) == 2


def noise(width: int = 64, height: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_skipped(tmp_path, capsys, fmt):
    data = encoded(noise(), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    assert decode_image(path, 3, 8, "crop") is None
    [warning] = warnings_in(capsys.readouterr().err)
    assert warning["name"] == str(path)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_unusable_files_are_skipped_with_one_line_each(tmp_path, capsys):
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    paths = [tmp_path / "text.png", tmp_path / "empty.jpg", tmp_path / "missing.png", tmp_path / "folder.png"]
    for path in paths:
        assert decode_image(path, 3, 8, "crop") is None
    warnings = warnings_in(capsys.readouterr().err)
    assert [w["name"] for w in warnings] == [str(p) for p in paths]
    reasons = [w["reason"] for w in warnings]
    assert reasons[1] == "empty file" and reasons[2] == "no such file"


def test_a_name_with_a_newline_stays_one_line(tmp_path, capsys):
    assert decode_image(b"junk", 3, 8, "crop", name="bad\nname.png") is None
    [warning] = warnings_in(capsys.readouterr().err)
    assert warning["name"] == "bad\\nname.png"


# --- bytes --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", ".png"), ("JPEG", ".jpg")])
def test_bytes_decode_like_the_file(tmp_path, fmt, suffix):
    data = encoded(thirds(), fmt)
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    assert np.array_equal(decode_image(data, 3, 12, "stretch"), decode_image(path, 3, 12, "stretch"))


def test_bad_bytes_are_named(capsys):
    assert decode_image(b"", 3, 8, "crop") is None
    assert decode_image(b"GIF89a garbage", 3, 8, "crop", name="row 7") is None
    names = [w["name"] for w in warnings_in(capsys.readouterr().err)]
    assert names == ["<bytes>", "row 7"]


# --- walk_images --------------------------------------------------------------------------------------------------


def test_walk_images_nested_hidden_loops_and_others(tmp_path):
    root = tmp_path / ".cache" / "pets"  # a hidden folder above the root does not matter
    for name in ("cats/a.png", "cats/sub/b.JPG", "dogs/c.jpeg", ".git/x.png", "dogs/.DS_Store", ".hidden.png",
                 "readme.txt", "labels.csv", "dogs/.thumbs/d.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    os.symlink(root, root / "loop")
    os.symlink(root / "cats", root / "dogs" / "up")  # the same folder by a second path: listed once
    os.symlink(root / "gone.png", root / "broken.png")  # broken: listed, so decoding names it
    images, others = walk_images(root)
    assert images == [root / "broken.png", root / "cats/a.png", root / "cats/sub/b.JPG", root / "dogs/c.jpeg"]
    assert others == [root / "labels.csv", root / "readme.txt"]


def test_walk_images_follows_symlinked_folders(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "e.webp").write_bytes(b"x")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "linked")
    os.symlink(root, outside / "back")  # a loop through two folders
    assert walk_images(root) == ([root / "linked" / "e.webp"], [])


def test_walk_images_skips_an_unreadable_subfolder_with_a_warning(tmp_path, capsys, monkeypatch):
    for name in ("a/1.png", "b/2.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    scandir = os.scandir

    def refusing(path):
        if Path(path) == tmp_path / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    assert walk_images(tmp_path) == ([tmp_path / "a" / "1.png"], [])
    [warning] = warnings_in(capsys.readouterr().err)
    assert warning["name"] == str(tmp_path / "b") and warning["reason"] == "permission denied"


def test_walk_images_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        walk_images(tmp_path / "nope")


# --- decode_many --------------------------------------------------------------------------------------------------


def colour_files(folder: Path, n: int, bad: int | None = None) -> list[Path]:
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        if i == bad:
            path.write_text("not an image")
        else:
            save(Image.new("RGB", (10 + i, 12), (i * 9, 255 - i * 9, (i * 37) % 256)), path)
        paths.append(path)
    return paths


def test_decode_many_keeps_order_in_processes_and_in_process(tmp_path, capsys):
    paths = colour_files(tmp_path, 24, bad=9)
    pooled = list(decode_many(paths, 3, 8, "crop", workers=2))
    local = list(decode_many(paths, 3, 8, "crop", workers=1))
    assert len(pooled) == len(local) == 24
    assert pooled[9] is None and local[9] is None
    for i, (a, b) in enumerate(zip(pooled, local, strict=True)):
        if i != 9:
            assert np.array_equal(a, b)
            assert_colour(a, (i * 9, 255 - i * 9, (i * 37) % 256))
    names = [w["name"] for w in warnings_in(capsys.readouterr().err)]
    assert names == [str(paths[9]), str(paths[9])]  # printed by this process, once per call


def test_decode_many_bytes_and_names_in_processes(capsys):
    sources = [encoded(Image.new("L", (9, 9), v), "PNG") for v in (10, 20)] + [b"junk", encoded(thirds(), "JPEG")]
    names = ["one", "two", "three", "four"]
    out = list(decode_many(sources, 1, 4, "crop", names=names, workers=2))
    assert_colour(out[0], (10,))
    assert_colour(out[1], (20,))
    assert out[2] is None and out[3] is not None
    assert [w["name"] for w in warnings_in(capsys.readouterr().err)] == ["three"]


def test_decode_many_after_torch_is_imported(tmp_path):
    torch = pytest.importorskip("torch")
    torch.ones(64, 64) @ torch.ones(64, 64)  # intra-op threads are running: a forked worker could hang
    paths = colour_files(tmp_path, 6)
    out = list(decode_many(paths, 3, 4, "stretch", workers=2))
    assert all(a is not None for a in out)
    assert np.array_equal(out[5], decode_image(paths[5], 3, 4, "stretch"))


def test_decode_many_streams_and_stops_early(tmp_path):
    paths = colour_files(tmp_path, 40)
    results = decode_many(paths, 3, 4, "crop", workers=2)
    first = next(results)
    assert_colour(first, (0, 255, 0))
    results.close()  # stops the pool without decoding the rest


def test_decode_many_checks_arguments_at_once(tmp_path):
    with pytest.raises(ValueError, match="2 names for 1 sources"):
        decode_many([tmp_path / "a.png"], 3, 8, "crop", names=["a", "b"])
    with pytest.raises(DataError):
        decode_many([tmp_path / "a.png"], 3, 8, "squash")
    with pytest.raises(DataError):
        decode_many([tmp_path / "a.png"], 3, 8, "crop", workers=0)
    assert list(decode_many([], 3, 8, "crop", workers=4)) == []


def test_module_imports_no_torch():
    # Loaded as a file, so the package's own __init__ (which may import torch) is not involved.
    source = Path(__file__).resolve().parents[1] / "vaelab" / "data" / "decode.py"
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('decode_alone', {str(source)!r}); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


class _KillsItsWorker:
    """A source whose unpickling ends the worker process at once, as a crash or the OOM killer would."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_dying_worker_raises_instead_of_hanging(tmp_path):
    paths = colour_files(tmp_path, 4)
    sources = [*paths[:2], _KillsItsWorker(), *paths[2:]]
    with pytest.raises(DataError, match="ended abruptly"):
        list(decode_many(sources, 3, 4, "crop", names=[str(i) for i in range(5)], workers=2))
