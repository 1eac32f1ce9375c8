"""Tests of stnkit.data.images and stnkit.data.pairs: image loading, pair geometry, determinism."""

from __future__ import annotations

import warnings
import zlib

import cv2
import numpy as np
import pytest
import torch

from stnkit.data.images import (
    BUILTIN_SPLITS,
    builtin_photos,
    load_image,
    load_image_folder,
    to_gray_uint8,
)
from stnkit.data.pairs import (
    PhotometricRanges,
    WarpRanges,
    batch_pairs,
    homography_from_corners,
    homographynet_pair,
    make_benchmark_pairs,
    patch_corners,
    random_pair,
    transform_points,
)


# ------------------------------------------------------------------ fixtures
def smooth_image(height: int = 240, width: int = 320, seed: int = 0) -> np.ndarray:
    """A smooth but everywhere-textured uint8 image: bilinear resampling is nearly exact on it."""
    rng = np.random.default_rng(seed)
    noise = rng.random((height, width)).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), 4)
    blurred = (blurred - blurred.min()) / np.ptp(blurred)
    return np.round(blurred * 255).astype(np.uint8)


def interior_mask(matrix: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int], erode: int = 2) -> np.ndarray:
    """Pixels of the destination whose source lies well inside the source image."""
    ones = np.full(src_size, 255, np.uint8)
    mask = cv2.warpPerspective(ones, matrix, dst_size[::-1], flags=cv2.INTER_NEAREST) == 255
    kernel = np.ones((2 * erode + 1, 2 * erode + 1), np.uint8)
    return cv2.erode(mask.astype(np.uint8), kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0


@pytest.fixture(scope="module")
def heldout():
    return builtin_photos("heldout")


# ------------------------------------------------------------------ images
def test_builtin_photos_splits_are_disjoint_uint8_and_offline(heldout):
    train = builtin_photos("train")
    train_names = [name for name, _ in train]
    heldout_names = [name for name, _ in heldout]
    assert train_names == list(BUILTIN_SPLITS["train"])
    assert heldout_names == ["astronaut", "chelsea", "coffee", "coins", "rocket", "grass"]
    assert not set(train_names) & set(heldout_names)
    # The near-duplicate stereo views must not straddle the split.
    assert {"motorcycle_left", "motorcycle_right"} <= set(train_names)
    for _, image in train + heldout:
        assert image.dtype == np.uint8
        assert image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
        assert min(image.shape[:2]) >= 172


def test_builtin_photos_rejects_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        builtin_photos("test")


def test_load_image_reads_grey_rgb_rgba_and_16_bit(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB order
    cv2.imwrite(str(tmp_path / "grey.png"), grey)
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb[..., ::-1])  # OpenCV writes BGR
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([rgb[..., ::-1], np.full((3, 4), 255, np.uint8)]))
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((3, 4), 65535, np.uint16))

    assert np.array_equal(load_image(tmp_path / "grey.png"), grey)
    assert np.array_equal(load_image(tmp_path / "rgb.png"), rgb)
    assert np.array_equal(load_image(tmp_path / "rgba.png"), rgb)
    assert np.array_equal(load_image(tmp_path / "deep.png"), np.full((3, 4), 255, np.uint8))
    assert load_image(tmp_path / "rgb.png", grayscale=True).shape == (3, 4)


def test_load_image_errors_are_one_line_and_specific(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    cv2.imwrite(str(tmp_path / "good.png"), smooth_image(64, 64))
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])

    cases = {
        "notes.png": "not a readable image",
        "empty.png": "empty file",
        "truncated.png": "corrupt or truncated",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            load_image(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="is a directory"):
        load_image(tmp_path)


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but holds only a few bytes of data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return len(payload).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 8-bit grey
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_load_image_refuses_decompression_bombs_before_decoding(tmp_path):
    # 50000 x 50000 = 2.5 GP declared in a file of a few dozen bytes: must be
    # refused from the header alone (decoding would need 2.5 GB).
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_with_header_size(50_000, 50_000))
    with pytest.raises(ValueError, match=r"2500000000 pixels, above the limit of max_pixels=100000000"):
        load_image(bomb)
    # Between our limit and Pillow's hard one Pillow only warns: our check must refuse it, without the warning.
    large = tmp_path / "large.png"
    large.write_bytes(png_with_header_size(12_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"12000x10000 = 120000000 pixels, above the limit of max_pixels=100000000"):
            load_image(large)
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((20, 30), np.uint8))
    with pytest.raises(ValueError, match=r"30x20 = 600 pixels, above the limit of max_pixels=500"):
        load_image(small, max_pixels=500)
    assert load_image(small, max_pixels=600).shape == (20, 30)
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        load_image(small, max_pixels=0)


def test_load_image_folder(tmp_path):
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((5, 5), np.uint8))
    cv2.imwrite(str(tmp_path / "a.jpg"), np.zeros((6, 6, 3), np.uint8))
    (tmp_path / "readme.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path)
    with pytest.warns(UserWarning, match="broken.png"):
        images = load_image_folder(tmp_path, skip_unreadable=True)
    assert [name for name, _ in images] == ["a.jpg", "b.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(empty)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "nope")


def test_to_gray_uint8_accepts_floats_rgb_and_tensors():
    assert to_gray_uint8(np.full((2, 2), 1.0)).tolist() == [[255, 255], [255, 255]]
    assert to_gray_uint8(np.zeros((2, 2, 3), np.uint8)).shape == (2, 2)
    assert to_gray_uint8(torch.full((1, 1, 2, 3), 0.5)).tolist() == [[128] * 3] * 2
    with pytest.raises(ValueError, match=r"must have shape"):
        to_gray_uint8(np.zeros((2, 2, 5)))
    with pytest.raises(TypeError, match="numeric"):
        to_gray_uint8(np.zeros((2, 2), bool))


# ----------------------------------------------------------------- geometry
def test_patch_corners_and_homography_from_corners():
    corners = patch_corners((4, 8))
    assert corners.tolist() == [[-0.5, -0.5], [7.5, -0.5], [7.5, 3.5], [-0.5, 3.5]]
    rng = np.random.default_rng(0)
    dst = corners + rng.uniform(-1, 1, (4, 2))
    matrix = homography_from_corners(corners, dst)
    assert matrix.dtype == np.float64 and matrix[2, 2] == 1.0
    np.testing.assert_allclose(transform_points(matrix, corners), dst, atol=1e-12)
    collinear = np.array([[0.0, 0], [1, 0], [2, 0], [0, 1]])
    with pytest.raises(ValueError, match="degenerate"):
        homography_from_corners(collinear, collinear)


# ------------------------------------------------------------ HomographyNet
@pytest.mark.parametrize("affine_only", [False, True])
def test_homographynet_warp_of_input_matches_support(affine_only):
    image = smooth_image()
    for seed in range(4):
        pair = homographynet_pair(image, rho=32, rng=seed, affine_only=affine_only)
        H = pair.support_pix_from_input_pix
        aligned = cv2.warpPerspective(pair.input, H, (128, 128)).astype(np.float64)
        valid = interior_mask(H, (128, 128), (128, 128))
        assert valid.mean() > 0.3
        diff = np.abs(aligned - pair.support)[valid]
        assert diff.mean() < 0.6 and diff.max() <= 4, (seed, diff.mean(), diff.max())


def test_homographynet_true_matrix_beats_a_half_pixel_shift_on_a_photo(heldout):
    # On a real photo interpolation blurs fine detail, so compare against a nearby wrong answer.
    pair = homographynet_pair(heldout[0][1], rho=32, rng=3)
    H = pair.support_pix_from_input_pix

    def error(matrix):
        aligned = cv2.warpPerspective(pair.input, matrix, (128, 128)).astype(np.float64)
        return np.abs(aligned - pair.support)[interior_mask(H, (128, 128), (128, 128), erode=3)].mean()

    best = error(H)
    for dx, dy in [(0.5, 0), (-0.5, 0), (0, 0.5), (0, -0.5)]:
        shifted = np.array([[1.0, 0, dx], [0, 1, dy], [0, 0, 1]]) @ H
        assert best < error(shifted)


def test_homographynet_pair_fields_and_offsets():
    image = smooth_image()
    for rho in (8, 16, 32):
        pair = homographynet_pair(image, rho=rho, rng=rho)
        assert pair.input.dtype == np.uint8 and pair.input.shape == (128, 128)
        assert pair.support.dtype == np.uint8 and pair.support.shape == (128, 128)
        assert np.abs(pair.corner_offsets).max() <= rho + 1e-9
        mapped = transform_points(pair.support_pix_from_input_pix, patch_corners(128))
        np.testing.assert_allclose(mapped - patch_corners(128), pair.corner_offsets, atol=1e-9)
        # Patch at least rho from every border of the 320x240 image.
        x0, y0 = pair.origin
        assert rho <= x0 <= 320 - 128 - rho and rho <= y0 <= 240 - 128 - rho
        # The support is the untouched crop.
        resized = cv2.resize(image, (320, 240), interpolation=cv2.INTER_AREA) if image.shape != (240, 320) else image
        assert np.array_equal(pair.support, resized[y0 : y0 + 128, x0 : x0 + 128])


def test_homographynet_affine_variant_is_exactly_affine():
    image = smooth_image()
    for seed in range(20):
        pair = homographynet_pair(image, rho=32, rng=seed, affine_only=True)
        assert pair.support_pix_from_input_pix[2].tolist() == [0.0, 0.0, 1.0]
        assert np.abs(pair.corner_offsets).max() <= 32 + 1e-9
        tl, tr, br, bl = pair.corner_offsets
        np.testing.assert_allclose(tr + bl - tl, br, atol=1e-9)  # parallelogram


def test_homographynet_is_deterministic_from_the_seed(heldout):
    image = heldout[1][1]
    a, b = homographynet_pair(image, rng=7), homographynet_pair(image, rng=7)
    assert np.array_equal(a.input, b.input) and np.array_equal(a.support_pix_from_input_pix, b.support_pix_from_input_pix)
    c = homographynet_pair(image, rng=8)
    assert not np.array_equal(a.support_pix_from_input_pix, c.support_pix_from_input_pix)

    long = make_benchmark_pairs(heldout, 8, rho=16, seed=3)
    short = make_benchmark_pairs(heldout, 5, rho=16, seed=3)
    again = make_benchmark_pairs(heldout, 8, rho=16, seed=3)
    other = make_benchmark_pairs(heldout, 8, rho=16, seed=4)
    assert [p.name for p in long] == ["astronaut#0", "chelsea#1", "coffee#2", "coins#3", "rocket#4", "grass#5", "astronaut#6", "chelsea#7"]
    for x, y in zip(long, again):
        assert np.array_equal(x.input, y.input) and np.array_equal(x.corner_offsets, y.corner_offsets)
    for x, y in zip(long, short):  # a shorter run is a prefix of a longer one
        assert np.array_equal(x.corner_offsets, y.corner_offsets)
    assert not np.array_equal(long[0].corner_offsets, other[0].corner_offsets)


def test_homographynet_bad_arguments():
    image = smooth_image()
    with pytest.raises(ValueError, match="rho must be below patch / 2"):
        homographynet_pair(image, rho=64)
    with pytest.raises(ValueError, match="too small for patch=128 with rho=32"):
        homographynet_pair(image, size=(180, 320))
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        homographynet_pair(image, rho=-1)
    with pytest.raises(ValueError, match="non-empty list"):
        make_benchmark_pairs([], 3)
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        make_benchmark_pairs([image], -1)


# ------------------------------------------------------------ training pairs
@pytest.mark.parametrize("family", ["affine", "projective"])
def test_random_pair_matrix_ground_truth_aligns_input_to_support(family):
    image = smooth_image(300, 400, seed=1)
    ranges = WarpRanges(rotation=20, scale=(0.8, 1.25), shear=8, translation=0.15, corner=0.15)
    for seed in range(3):
        pair = random_pair(image, family, (96, 112), ranges, photometric=False, rng=seed)
        assert pair.input.shape == pair.support.shape == (96, 112)
        assert pair.input.dtype == np.float32 and 0 <= pair.input.min() and pair.input.max() <= 1
        H = pair.support_pix_from_input_pix
        if family == "affine":
            np.testing.assert_allclose(H[2], [0, 0, 1], atol=1e-12)
        aligned = cv2.warpPerspective(pair.input, H, (112, 96))
        valid = interior_mask(H, (96, 112), (96, 112))
        assert valid.mean() > 0.3
        assert np.abs(aligned - pair.support)[valid].mean() < 0.003  # < 1 grey level
        np.testing.assert_allclose(pair.input_pix_from_support_pix @ H, np.eye(3), atol=1e-9)


def test_random_pair_tps_ground_truth_is_the_backward_map():
    image = smooth_image(300, 400, seed=2)
    pair = random_pair(image, "tps", 64, WarpRanges(tps_offset=0.08, tps_grid=4), photometric=False, rng=0)
    assert pair.support_pix_from_input_pix is None
    assert pair.control_points_support_pix.shape == pair.control_points_input_pix.shape == (16, 2)
    assert pair.control_points_support_pix[0].tolist() == [-0.5, -0.5]  # normalised (-1, -1)
    assert pair.control_points_support_pix[-1].tolist() == [63.5, 63.5]
    dense = pair.input_pix_from_support_pix_map
    assert dense.shape == (64, 64, 2) and dense.dtype == np.float32
    # Resampling the input with the map reproduces the support where the map stays inside the input.
    aligned = cv2.remap(pair.input, dense[..., 0], dense[..., 1], cv2.INTER_LINEAR)
    inside = (dense[..., 0] >= 1) & (dense[..., 0] <= 62) & (dense[..., 1] >= 1) & (dense[..., 1] <= 62)
    assert inside.mean() > 0.3
    assert np.abs(aligned - pair.support)[inside].mean() < 0.003


def test_random_pair_tps_interpolates_control_points_and_reproduces_affine_maps():
    from stnkit.data.pairs import _tps_map  # the spline itself, to check it passes through the controls

    image = smooth_image(300, 400)
    pair = random_pair(image, "tps", 48, WarpRanges(tps_grid=3), photometric=False, rng=1)
    to_norm = np.array([2 / 48, 2 / 48])
    control = (pair.control_points_support_pix + 0.5) * to_norm - 1
    np.testing.assert_allclose(_tps_map(control, pair.control_points_input_pix, control), pair.control_points_input_pix, atol=1e-8)
    # Without control offsets a TPS pair is an affine pair: the dense map is affine.
    flat = random_pair(image, "tps", 48, WarpRanges(tps_offset=0.0), photometric=False, rng=2)
    ys, xs = np.mgrid[0:48, 0:48]
    design = np.stack([xs.ravel(), ys.ravel(), np.ones(48 * 48)], axis=1)
    target = flat.input_pix_from_support_pix_map.reshape(-1, 2)
    fit, *_ = np.linalg.lstsq(design, target, rcond=None)
    assert np.abs(design @ fit - target).max() < 1e-3


def test_random_pair_photometric_jitter_is_independent():
    image = smooth_image()
    still = WarpRanges(rotation=0, scale=(1, 1), shear=0, translation=0)
    clean = random_pair(image, "affine", 64, still, photometric=False, rng=0)
    np.testing.assert_allclose(clean.input, clean.support, atol=1e-6)
    strong = PhotometricRanges(brightness=0.2, contrast=0.3, noise=0.05, blur_probability=0.0)
    jittered = random_pair(image, "affine", 64, still, photometric=strong, rng=0)
    difference = jittered.input - jittered.support
    assert np.abs(difference).mean() > 0.01
    assert 0 <= jittered.input.min() and jittered.support.max() <= 1


def test_random_pair_validates_arguments():
    image = smooth_image()
    with pytest.raises(ValueError, match="family must be one of"):
        random_pair(image, "elastic")
    with pytest.raises(TypeError, match="ranges must be a WarpRanges"):
        random_pair(image, ranges={"rotation": 5})
    with pytest.raises(ValueError, match="corner must be below 0.5"):
        WarpRanges(corner=0.6)
    with pytest.raises(ValueError, match="scale must satisfy"):
        WarpRanges(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="contrast must be below 1"):
        PhotometricRanges(contrast=1.5)


@pytest.mark.parametrize("family", ["affine", "projective", "tps"])
def test_batch_pairs_shapes_dtypes_and_determinism(family, heldout):
    small = [(name, cv2.resize(image, (160, 120))) for name, image in heldout[:2]]
    batch = batch_pairs(small, 3, family, 32, rng=5)
    assert batch.input.shape == batch.support.shape == (3, 1, 32, 32)
    assert batch.input.dtype == torch.float32
    assert 0 <= float(batch.input.min()) and float(batch.input.max()) <= 1
    if family == "tps":
        assert batch.support_pix_from_input_pix is None
        assert batch.control_points_support_pix.shape == (16, 2)
        assert batch.control_points_input_pix.shape == (3, 16, 2)
        assert batch.input_pix_from_support_pix_map.shape == (3, 32, 32, 2)
    else:
        assert batch.support_pix_from_input_pix.shape == (3, 3, 3)
        assert batch.support_pix_from_input_pix.dtype == torch.float32
    again = batch_pairs(small, 3, family, 32, rng=5)
    assert torch.equal(batch.input, again.input) and torch.equal(batch.support, again.support)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        batch_pairs(small, 0)
