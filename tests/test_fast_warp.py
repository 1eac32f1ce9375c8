"""The fast no-grad full-resolution warp (stnkit.sampling.fast.warp_image) against stnkit.warp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stnkit import warp
from stnkit.sampling import fast
from stnkit.sampling.fast import opencv_available, warp_image
from stnkit.transforms import get_transform

from conftest import smooth_images

PADDINGS = ["zeros", "border", "reflection", "fill"]
THETAS = {
    "affine": [[0.9, 0.2, 0.1, -0.15, 1.1, 0.05]],
    "projective": [[0.9, 0.2, 0.1, -0.15, 1.1, 0.05, 0.2, -0.3]],
}
needs_opencv = pytest.mark.skipif(not opencv_available(), reason="OpenCV not installed")
OUT = (45, 61)
FILL = [0.2, 0.5, 0.9]


def image(channels=3):
    return smooth_images(1, channels, 40, 52)


def reference(x, theta, family, mode, padding_mode, fill=FILL):
    return warp(x, theta, family, OUT, mode, padding_mode, fill)[0].permute(1, 2, 0).numpy()


def close(out, ref, mode, atol):
    """Bilinear within ``atol`` everywhere; nearest may pick the other neighbour at a handful of ties."""
    diff = np.abs(np.asarray(out, dtype=np.float64) - ref)
    if mode == "bilinear":
        assert diff.max() <= atol, diff.max()
    else:
        assert (diff > atol).mean() < 0.005


@needs_opencv
@pytest.mark.parametrize("family", list(THETAS))
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_float_and_uint8_match_warp(family, mode, padding_mode):
    x = image()
    theta = torch.tensor(THETAS[family])
    ref = reference(x, theta, family, mode, padding_mode)
    array = x[0].permute(1, 2, 0).numpy()
    out = warp_image(array, theta=theta, transform=family, out_size=OUT, mode=mode, padding_mode=padding_mode, fill_value=FILL)
    assert out.dtype == np.float32 and out.shape == (*OUT, 3)
    # OpenCV quantises bilinear weights to 1/32 pixel: on smooth images that is well under 1e-2.
    close(out, ref, mode, atol=1e-2)
    as_uint8 = (array * 255).round().astype(np.uint8)
    fill_uint8 = [v * 255 for v in FILL]
    out8 = warp_image(
        as_uint8, theta=theta, transform=family, out_size=OUT, mode=mode, padding_mode=padding_mode, fill_value=fill_uint8
    )
    assert out8.dtype == np.uint8
    close(out8 / 255.0, ref, mode, atol=2.5 / 255 + 1e-2)


@needs_opencv
def test_pixel_matrix_is_to_pixels():
    x = image()
    family = get_transform("projective")
    theta = torch.tensor(THETAS["projective"])
    matrix = family.to_pixels(theta, x.shape[-2:], OUT)[0].numpy()
    out = warp_image(x[0].permute(1, 2, 0).numpy(), matrix, out_size=OUT)
    close(out, reference(x, theta, family, "bilinear", "zeros"), "bilinear", 1e-2)
    # a 2x3 affine matrix works too, and a grey image stays 2-D
    affine = get_transform("affine")
    theta = torch.tensor(THETAS["affine"])
    matrix = affine.to_pixels(theta, x.shape[-2:], OUT)[0, :2].numpy()
    grey = warp_image(x[0, 0].numpy(), matrix, out_size=OUT)
    assert grey.shape == OUT
    close(grey[..., None], reference(x[:, :1], theta, affine, "bilinear", "zeros", 0.0), "bilinear", 1e-2)


@needs_opencv
def test_tps_goes_through_remap():
    x = image()
    tps = get_transform({"name": "thin_plate_spline", "grid_size": [4, 4]})
    theta = 0.1 * torch.randn(1, tps.num_params, generator=torch.Generator().manual_seed(3))
    out = warp_image(x[0].permute(1, 2, 0).numpy(), theta=theta, transform=tps, out_size=OUT, padding_mode="border")
    close(out, reference(x, theta, tps, "bilinear", "border"), "bilinear", 1e-2)


@needs_opencv
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "fill"])
def test_beyond_the_horizon_is_not_mirrored(padding_mode):
    # OpenCV's warpPerspective would mirror points with w < 0 back into the image.
    x = image()
    theta = torch.tensor([[0.9, 0.2, 0.1, -0.15, 1.1, 0.05, 1.5, 0.0]])
    out = warp_image(x[0].permute(1, 2, 0).numpy(), theta=theta, transform="projective", out_size=OUT, padding_mode=padding_mode, fill_value=FILL)
    close(out, reference(x, theta, "projective", "bilinear", padding_mode), "bilinear", 1e-2)


@needs_opencv
def test_tensors_and_many_channels():
    x = smooth_images(1, 6, 40, 52)
    theta = torch.tensor(THETAS["affine"])
    fill = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    ref = warp(x, theta, "affine", OUT, padding_mode="fill", fill_value=fill)
    out = warp_image(x[0], theta=theta, transform="affine", out_size=OUT, padding_mode="fill", fill_value=fill)
    assert isinstance(out, torch.Tensor) and out.shape == (6, *OUT)
    assert (out - ref[0]).abs().max() < 1e-2
    out4 = warp_image(x, theta=theta, transform="affine", out_size=OUT, padding_mode="fill", fill_value=fill)
    assert out4.shape == (1, 6, *OUT)


@needs_opencv
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("family", list(THETAS))
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_planar_tensor_path_equals_the_array_path(dtype, channels, family, padding_mode):
    # Tensors are warped plane by plane (no interleaving copies); the result must not depend on the layout.
    # OpenCV 5's float32 kernels for 3 and 4+ channels differ from the 1-channel one by an ulp (values
    # ~2e-7 relative, and the source coordinates too, so a nearest-neighbour pick that sits exactly on
    # a rounding tie may flip to its neighbour). Floats are therefore compared to a few ulps of the
    # data's range (0..200), uint8 to one grey level, and nearest may flip at most 0.1% of pixels;
    # anything layout-dependent beyond that is a bug.
    atol = {np.uint8: 1, np.float32: 200 * 1e-6, np.float64: 200 * 1e-12}[dtype]
    array = (smooth_images(1, channels, 40, 52)[0].permute(1, 2, 0).numpy() * 200).astype(dtype)
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    theta = torch.tensor(THETAS[family])
    fill = [float(k + 1) for k in range(channels)]
    for mode in ("bilinear", "nearest", "bicubic"):
        options = dict(theta=theta, transform=family, out_size=OUT, mode=mode, padding_mode=padding_mode, fill_value=fill)
        from_array, from_tensor = warp_image(array, **options), warp_image(tensor, **options)
        assert from_tensor.dtype == tensor.dtype and from_tensor.shape == (channels, *OUT)
        got = from_tensor.numpy().transpose(1, 2, 0).astype(np.float64)
        want = from_array.reshape(*OUT, channels).astype(np.float64)
        differs = (np.abs(got - want) > atol).any(axis=-1)
        allowed = int(0.001 * differs.size) if mode == "nearest" else 0
        assert differs.sum() <= allowed, f"{mode}: {differs.sum()} pixels differ by more than {atol}"


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_torch_fallback_without_opencv(monkeypatch, dtype):
    monkeypatch.setattr(fast, "_cv2", lambda: None)
    x = image()
    theta = torch.tensor(THETAS["projective"])
    array = x[0].permute(1, 2, 0).numpy()
    if dtype == np.uint8:
        array = (array * 255).round().astype(np.uint8)
    out = warp_image(array, theta=theta, transform="projective", out_size=OUT, padding_mode="reflection")
    assert out.dtype == dtype
    ref = warp(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float(), theta, "projective", OUT, padding_mode="reflection")
    ref = ref[0].permute(1, 2, 0).numpy()
    if dtype == np.uint8:
        ref = np.clip(np.round(ref), 0, 255)
    np.testing.assert_allclose(out.astype(np.float64), ref, atol=1.0 if dtype == np.uint8 else 1e-5)
    with pytest.raises(RuntimeError, match="backend='opencv' needs OpenCV"):
        warp_image(array, theta=theta, transform="projective", backend="opencv")


def test_bad_arguments():
    array = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="either matrix"):
        warp_image(array)
    with pytest.raises(ValueError, match="needs transform"):
        warp_image(array, theta=torch.zeros(1, 6))
    with pytest.raises(ValueError, match="3x3"):
        warp_image(array, np.eye(4))
    with pytest.raises(ValueError, match="unknown padding_mode"):
        warp_image(array, np.eye(3), padding_mode="wrap")
    with pytest.raises(TypeError, match="numpy array or a torch.Tensor"):
        warp_image([[1, 2]], np.eye(3))
    with pytest.raises(ValueError, match="one value per channel"):
        warp_image(array, np.eye(3), padding_mode="fill", fill_value=[1, 2])
