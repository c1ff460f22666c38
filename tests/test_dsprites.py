"""dSprites: the factor grid, the procedural renderer's factor semantics, the npz reader and grid streaming.

Hand-checked geometry (vaelab/data/dsprites.py): the sprite centre is (16 + 32 pos_x, 16 + 32 pos_y) on a
plane where pixel (row i, col j) is on iff its centre (j + 0.5, i + 0.5) is in the shape; the square's
side is 19.2 scale. So the scale-1 square at position (0, 0) covers [6.4, 25.6]^2: rows and columns
6..25, a 20 x 20 block (as in the official frames).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from vaelab.data import dsprites
from vaelab.data.dsprites import (
    FACTOR_NAMES,
    FACTOR_SIZES,
    NPZ_NAME,
    DSprites,
    factor_values,
    grid_images,
    read_npz,
    render,
)
from vaelab.errors import DataError

SQUARE, ELLIPSE, HEART = 0, 1, 2
TINY = (3, 2, 3, 2, 2)  # a patched grid: 72 rows
SMALL = (3, 1, 2, 2, 2)  # the fake npz files' grid: 24 rows


def one(shape: int, scale: int, orientation: int, x: int, y: int) -> np.ndarray:
    return render([(shape, scale, orientation, x, y)])[0]


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    """(row, column) centre of mass, in pixel indices."""
    rows, cols = np.nonzero(img)
    return float(rows.mean()), float(cols.mean())


def grid_factors(sizes: tuple[int, ...]) -> np.ndarray:
    return np.stack(np.unravel_index(np.arange(int(np.prod(sizes))), sizes), axis=1)


# ---- the grid ------------------------------------------------------------------------------------------
def test_constants_and_factor_values():
    assert FACTOR_NAMES == ("shape", "scale", "orientation", "pos_x", "pos_y")
    assert FACTOR_SIZES == (3, 6, 40, 32, 32) and int(np.prod(FACTOR_SIZES)) == 737_280
    assert NPZ_NAME == "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz"
    shapes, scales, angles, xs, ys = factor_values()
    assert list(shapes) == [0, 1, 2]
    np.testing.assert_allclose(scales, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert len(angles) == 40 and angles[0] == 0 and angles[-1] == pytest.approx(2 * np.pi)
    np.testing.assert_allclose(angles[1], 0.16110732, atol=1e-8)  # the file's metadata value
    np.testing.assert_allclose(xs[[0, 1, 31]], [0.0, 0.03225806, 1.0], atol=1e-8)
    np.testing.assert_array_equal(xs, ys)


def test_index_is_row_major_and_inverts():
    data = DSprites()
    assert data.factor_sizes == FACTOR_SIZES and data.factor_names == FACTOR_NAMES
    tuples = [(0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 1, 0), (0, 0, 1, 0, 0), (0, 1, 0, 0, 0),
              (1, 0, 0, 0, 0), (2, 5, 39, 31, 31)]
    np.testing.assert_array_equal(data.index(tuples), [0, 1, 32, 1024, 40960, 245760, 737279])
    assert data.index(tuples).dtype == np.int64
    rng = np.random.default_rng(1)
    factors = data.sample_factors(500, rng)
    rows = data.index(factors)
    np.testing.assert_array_equal(rows, np.ravel_multi_index(tuple(factors.T), FACTOR_SIZES))
    np.testing.assert_array_equal(data.factors_at(rows), factors)
    for bad in ([(3, 0, 0, 0, 0)], [(0, 6, 0, 0, 0)], [(0, 0, 0, 0, -1)], [(0, 0, 0, 0)], [(0.5, 0, 0, 0, 0)]):
        with pytest.raises(ValueError):
            data.index(bad)
    with pytest.raises(ValueError):
        data.factors_at([737280])


def test_sample_factors_uniform_in_range_and_seeded():
    data = DSprites()
    factors = data.sample_factors(20_000, np.random.default_rng(0))
    assert factors.shape == (20_000, 5) and factors.dtype == np.int64
    assert (factors >= 0).all() and (factors < np.array(FACTOR_SIZES)).all()
    for f, size in enumerate(FACTOR_SIZES):  # every value drawn, roughly equally often
        counts = np.bincount(factors[:, f], minlength=size)
        assert counts.min() > 0.6 * 20_000 / size and counts.max() < 1.4 * 20_000 / size
    np.testing.assert_array_equal(factors, data.sample_factors(20_000, np.random.default_rng(0)))
    assert data.sample_factors(0, np.random.default_rng(0)).shape == (0, 5)


# ---- the renderer: values, determinism -------------------------------------------------------------------
def test_render_is_binary_deterministic_and_per_image():
    data = DSprites()
    factors = data.sample_factors(300, np.random.default_rng(2))
    imgs = render(factors)
    assert imgs.shape == (300, 64, 64) and imgs.dtype == np.uint8
    assert set(np.unique(imgs)) == {0, 1}
    assert (imgs.reshape(300, -1).sum(axis=1) > 0).all()
    np.testing.assert_array_equal(imgs, render(factors))
    alone = np.concatenate([render(factors[i:i + 1]) for i in range(40)])  # no dependence on the batch
    np.testing.assert_array_equal(imgs[:40], alone)
    floats = data.images(factors[:10])
    assert floats.shape == (10, 1, 64, 64) and floats.dtype == np.float32
    assert set(np.unique(floats)) <= {0.0, 1.0}
    np.testing.assert_array_equal(floats[:, 0], imgs[:10].astype(np.float32))
    assert render(np.zeros((0, 5), np.int64)).shape == (0, 64, 64)


def test_sprites_stay_off_the_border():
    # "no pixel ever goes out of the boundary": extreme positions, largest scale, every orientation.
    factors = [(s, 5, o, x, y) for s in range(3) for o in range(40) for x in (0, 31) for y in (0, 31)]
    imgs = render(factors)
    assert not imgs[:, :2].any() and not imgs[:, -2:].any()
    assert not imgs[:, :, :2].any() and not imgs[:, :, -2:].any()


# ---- factor semantics ---------------------------------------------------------------------------------
def test_hand_checked_square_pixels():
    expected = np.zeros((64, 64), np.uint8)
    expected[6:26, 6:26] = 1  # side 19.2 about (16, 16): [6.4, 25.6]
    np.testing.assert_array_equal(one(SQUARE, 5, 0, 0, 0), expected)
    expected = np.zeros((64, 64), np.uint8)
    expected[11:21, 11:21] = 1  # scale 0.5: side 9.6 about (16, 16): [11.2, 20.8]
    np.testing.assert_array_equal(one(SQUARE, 0, 0, 0, 0), expected)
    expected = np.zeros((64, 64), np.uint8)
    expected[38:58, 6:26] = 1  # pos_y 31 (value 1): centre row 48, [38.4, 57.6]; columns unchanged
    np.testing.assert_array_equal(one(SQUARE, 5, 0, 0, 31), expected)


def test_shapes_differ():
    for scale, orientation, x, y in [(0, 0, 0, 0), (5, 0, 15, 15), (3, 7, 20, 9)]:
        imgs = render([(s, scale, orientation, x, y) for s in range(3)]).astype(int)
        for a, b in [(0, 1), (0, 2), (1, 2)]:
            assert np.abs(imgs[a] - imgs[b]).sum() >= 20, (scale, orientation, x, y, a, b)


def test_larger_scale_more_pixels():
    for shape in range(3):
        for orientation, x, y in [(0, 0, 0), (7, 15, 15), (23, 31, 4)]:
            counts = render([(shape, s, orientation, x, y) for s in range(6)]).reshape(6, -1).sum(axis=1)
            assert (np.diff(counts) > 0).all(), (shape, orientation, x, y, counts)
    # The square's area goes with scale^2 (20^2 px at scale 1, 10^2 at 0.5).
    square = render([(SQUARE, s, 0, 0, 0) for s in range(6)]).reshape(6, -1).sum(axis=1)
    np.testing.assert_array_equal(square, [100, 144, 196, 256, 324, 400])


@pytest.mark.parametrize("shape,orientation", [(SQUARE, 0), (ELLIPSE, 5), (HEART, 13)])
def test_position_moves_centre_of_mass(shape, orientation):
    # pos_x moves the sprite right along the column axis, pos_y down along the row axis, 32/31 px a step:
    # the centre covers the middle half of the image (16..48), not 8..56.
    step = 32 / 31
    for axis in ("x", "y"):
        factors = [(shape, 5, orientation, k, 7) if axis == "x" else (shape, 5, orientation, 7, k) for k in range(32)]
        coms = np.array([centre_of_mass(img) for img in render(factors)])
        moving, fixed = (coms[:, 1], coms[:, 0]) if axis == "x" else (coms[:, 0], coms[:, 1])
        steps = np.diff(moving)
        assert (steps > 0).all() and (steps < 2.2).all(), (axis, steps)
        assert moving[-1] - moving[0] == pytest.approx(32, abs=0.6)
        assert steps.mean() == pytest.approx(step, abs=0.03)
        assert fixed.max() - fixed.min() < 0.6


def test_square_centre_range():
    first, last = one(SQUARE, 5, 0, 0, 0), one(SQUARE, 5, 0, 31, 31)
    assert centre_of_mass(first) == (15.5, 15.5)  # pixel indices: continuous centre 16
    assert centre_of_mass(last) == (47.5, 47.5)  # continuous centre 48


def test_rotation_symmetries():
    def diff(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, int]:
        imgs = render([a, b]).astype(int)
        return int(np.abs(imgs[0] - imgs[1]).sum()), int(imgs[0].sum())

    for x, y in [(0, 0), (15, 15), (31, 8)]:
        # Orientation 10 is 92.3 degrees: the square (90-degree symmetric) barely changes, the heart does.
        changed, area = diff((SQUARE, 5, 0, x, y), (SQUARE, 5, 10, x, y))
        assert changed <= 0.1 * area
        changed, area = diff((HEART, 5, 0, x, y), (HEART, 5, 10, x, y))
        assert changed >= 0.3 * area
        # Orientation 20 is 184.6 degrees: the ellipse (180-degree symmetric) barely changes, the heart does.
        changed, area = diff((ELLIPSE, 5, 0, x, y), (ELLIPSE, 5, 20, x, y))
        assert changed <= 0.1 * area
        changed, area = diff((HEART, 5, 0, x, y), (HEART, 5, 20, x, y))
        assert changed >= 0.5 * area
        for shape in range(3):  # orientation 39 is 2 pi: the grid's last angle is its first again
            assert diff((shape, 5, 0, x, y), (shape, 5, 39, x, y))[0] <= 2
            assert diff((shape, 5, 0, x, y), (shape, 5, 1, x, y))[0] > 0


def test_orientation_turns_counterclockwise():
    # The heart's lobes are up at orientation 0 (centre of mass above the sprite centre, left-right
    # symmetric); a quarter turn counterclockwise on screen (orientation 10, 92.3 degrees) puts them left.
    row, col = centre_of_mass(one(HEART, 5, 0, 15, 15))
    centre = 16 + 32 * 15 / 31 - 0.5  # pixel-index coordinates
    assert row < centre - 1 and col == pytest.approx(centre, abs=0.05)
    heart = one(HEART, 5, 0, 0, 15)  # centre x = 16: column j mirrors to 31 - j
    np.testing.assert_array_equal(heart[:, :32], heart[:, 31::-1])
    row, col = centre_of_mass(one(HEART, 5, 10, 15, 15))
    assert col < centre - 1 and abs(row - centre) < 0.5
    row, col = centre_of_mass(one(HEART, 5, 30, 15, 15))  # three quarters: lobes right
    assert col > centre + 1
    # The ellipse is horizontal at orientation 0 (as in the official frames) and upright after a quarter turn.
    rows, cols = np.nonzero(one(ELLIPSE, 5, 0, 0, 0))
    assert np.ptp(cols) > 1.6 * np.ptp(rows)
    rows, cols = np.nonzero(one(ELLIPSE, 5, 10, 0, 0))
    assert np.ptp(rows) > 1.6 * np.ptp(cols)
    # A small counterclockwise turn lifts the ellipse's right end: its top row lies right of the centre.
    img = one(ELLIPSE, 5, 1, 0, 0)
    top = np.nonzero(img.any(axis=1))[0][0]
    assert np.nonzero(img[top])[0].mean() > 15.5


# ---- the npz reader -----------------------------------------------------------------------------------
UNPICKLED: list[str] = []


def _detonate(tag: str) -> None:
    UNPICKLED.append(tag)
    raise RuntimeError(f"{tag} was unpickled")


class Bomb:
    """Unpickling this records it and raises."""

    def __reduce__(self):
        return (_detonate, ("metadata",))


def classes_for(sizes: tuple[int, ...]) -> np.ndarray:
    factors = grid_factors(sizes)
    return np.concatenate([np.zeros((len(factors), 1), np.int64), factors], axis=1)  # colour column first


def write_npz(path, sizes=SMALL, **overrides):
    arrays = {"imgs": render(grid_factors(sizes), sizes), "latents_classes": classes_for(sizes),
              "latents_values": classes_for(sizes).astype(np.float64),
              "metadata": np.array(Bomb(), dtype=object)}
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})  # saving pickles the metadata
    return arrays


def test_read_npz_never_unpickles_metadata(tmp_path):
    path = tmp_path / NPZ_NAME
    arrays = write_npz(path)
    UNPICKLED.clear()
    with np.load(path, allow_pickle=True) as archive, pytest.raises(RuntimeError):
        archive["metadata"]  # the bomb works: loading the metadata would run it
    assert UNPICKLED == ["metadata"]
    UNPICKLED.clear()
    imgs = read_npz(path, SMALL)
    assert imgs.dtype == np.uint8 and imgs.shape == (24, 64, 64)
    np.testing.assert_array_equal(imgs, arrays["imgs"])
    data = DSprites(path, factor_sizes=SMALL)
    factors = grid_factors(SMALL)[[5, 0, 23]]
    np.testing.assert_array_equal(data.images(factors), arrays["imgs"][[5, 0, 23]][:, None].astype(np.float32))
    assert list(grid_images(data, chunk=100))[0].shape == (24, 1, 64, 64)
    assert UNPICKLED == []


def test_read_npz_pickled_imgs_is_an_error_not_an_unpickle(tmp_path):
    path = tmp_path / "objects.npz"
    write_npz(path, imgs=np.array([Bomb()], dtype=object))
    UNPICKLED.clear()
    with pytest.raises(DataError, match="objects.npz"):
        read_npz(path, SMALL)
    assert UNPICKLED == []


def test_read_npz_without_classes(tmp_path):
    path = tmp_path / "plain.npz"
    arrays = write_npz(path, latents_classes=None, metadata=None)
    np.testing.assert_array_equal(read_npz(path, SMALL), arrays["imgs"])


def assert_data_error(path, match: str, sizes=SMALL) -> None:
    with pytest.raises(DataError) as caught:
        read_npz(path, sizes)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message, message
    assert match in message, message


def test_read_npz_bad_files(tmp_path):
    good = tmp_path / "good.npz"
    write_npz(good)
    blob = good.read_bytes()

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(blob[: len(blob) // 2])
    assert_data_error(truncated, "cannot read")

    text = tmp_path / "text.npz"
    text.write_text("not a zip\nat all\n")
    assert_data_error(text, "not an npz")

    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert_data_error(empty, "not an npz")

    other_zip = tmp_path / "other.npz"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "hello")
    assert_data_error(other_zip, "no 'imgs'")

    no_imgs = tmp_path / "no_imgs.npz"
    write_npz(no_imgs, imgs=None)
    assert_data_error(no_imgs, "no 'imgs'")

    assert_data_error(tmp_path / "missing.npz", "no such file")
    assert_data_error(tmp_path, "cannot read")  # a folder


def test_read_npz_corrupt_member(tmp_path):
    path = tmp_path / "corrupt.npz"
    arrays = {"imgs": render(grid_factors(SMALL), SMALL), "latents_classes": classes_for(SMALL)}
    np.savez_compressed(path, **arrays)
    blob = bytearray(path.read_bytes())
    middle = len(blob) // 3
    blob[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(blob))
    assert_data_error(path, "cannot read")


def test_read_npz_wrong_contents(tmp_path):
    wrong_rows = tmp_path / "rows.npz"
    write_npz(wrong_rows)
    assert_data_error(wrong_rows, "not uint8 (737280, 64, 64)", sizes=FACTOR_SIZES)

    shuffled = tmp_path / "shuffled.npz"
    classes = classes_for(SMALL)
    write_npz(shuffled, latents_classes=classes[::-1].copy())
    assert_data_error(shuffled, "not in dSprites order")

    coloured = tmp_path / "coloured.npz"
    classes = classes_for(SMALL)
    classes[:, 0] = 1
    write_npz(coloured, latents_classes=classes)
    assert_data_error(coloured, "colour")

    bytes255 = tmp_path / "bytes255.npz"
    write_npz(bytes255, imgs=render(grid_factors(SMALL), SMALL) * np.uint8(255))
    assert_data_error(bytes255, "other than 0 and 1")

    floats = tmp_path / "floats.npz"
    write_npz(floats, imgs=render(grid_factors(SMALL), SMALL).astype(np.float32))
    assert_data_error(floats, "float32")

    small_images = tmp_path / "small.npz"
    write_npz(small_images, imgs=np.zeros((24, 32, 32), np.uint8))
    assert_data_error(small_images, "(24, 32, 32)")


# ---- streaming the grid -------------------------------------------------------------------------------
def test_grid_images_rendered_cover_the_grid_in_order():
    chunks = list(grid_images(None, chunk=10, factor_sizes=TINY))
    assert [len(c) for c in chunks] == [10] * 7 + [2]
    for c in chunks:
        assert c.dtype == np.uint8 and c.shape[1:] == (1, 64, 64)
        assert set(np.unique(c)) == {0, 255}
    stream = np.concatenate(chunks)[:, 0]
    expected = render(grid_factors(TINY), TINY) * np.uint8(255)
    np.testing.assert_array_equal(stream, expected)
    upright = stream[grid_factors(TINY)[:, 2] == 0]  # (angles 0, pi, 2 pi repeat the square and ellipse)
    assert len({img.tobytes() for img in upright}) == 24  # each shape, scale and position its own image
    # The same rows as the factor data serves them: bytes 0/255 are its floats 0/1.
    data = DSprites(factor_sizes=TINY)
    rows = np.array([0, 1, 2, 17, 71])
    np.testing.assert_array_equal(stream[rows] / 255, data.images(data.factors_at(rows))[:, 0])
    np.testing.assert_array_equal(data.index(data.factors_at(rows)), rows)


def test_grid_images_from_npz(tmp_path):
    path = tmp_path / NPZ_NAME
    arrays = write_npz(path)
    UNPICKLED.clear()
    chunks = list(grid_images(path, chunk=7, factor_sizes=SMALL))
    assert [len(c) for c in chunks] == [7, 7, 7, 3]
    np.testing.assert_array_equal(np.concatenate(chunks)[:, 0], arrays["imgs"] * np.uint8(255))
    assert UNPICKLED == []
    with pytest.raises(ValueError):
        next(grid_images(None, chunk=0, factor_sizes=TINY))


def test_full_grid_rows_match_render():
    # The official-size stream, spot-checked: its first chunk and the rows about a shape boundary.
    data = DSprites()
    first = next(grid_images(None, chunk=64))
    assert first.shape == (64, 1, 64, 64)
    np.testing.assert_array_equal(first[:, 0] // 255, render(data.factors_at(np.arange(64))))
    rows = np.arange(245_760 - 3, 245_760 + 3)
    np.testing.assert_array_equal(data.rows(rows[0], rows[-1] + 1), render(data.factors_at(rows)))
    assert list(data.factors_at(rows)[:, 0]) == [0, 0, 0, 1, 1, 1]
    assert dsprites.IMAGE_SIZE == 64


def test_the_grid_cache_serves_the_rendered_images_and_is_written_once(tmp_path):
    rendered = DSprites(factor_sizes=TINY)
    cached = DSprites(factor_sizes=TINY)
    path = Path(cached.use_grid_cache(tmp_path))
    assert path.stat().st_size == 72 * 64 * 64
    factors = rendered.sample_factors(50, np.random.default_rng(0))
    np.testing.assert_array_equal(cached.images(factors), rendered.images(factors))
    stamp = path.stat().st_mtime_ns
    assert DSprites(factor_sizes=TINY).use_grid_cache(tmp_path) == str(path) and path.stat().st_mtime_ns == stamp
    path.write_bytes(b"\0" * 100)  # a file of the wrong size is rendered afresh
    again = DSprites(factor_sizes=TINY)
    again.use_grid_cache(tmp_path)
    np.testing.assert_array_equal(again.images(factors), rendered.images(factors))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
