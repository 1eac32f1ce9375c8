"""The sampler: every mode and padding, fill values, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import stnkit
from stnkit import sample, warp
from stnkit.transforms import Affine, normalised_pixel_centres

from conftest import smooth_images

MODES = ["bilinear", "nearest", "bicubic"]
PADDINGS = ["zeros", "border", "reflection", "fill"]


def identity_grid(batch, size, dtype=torch.float32):
    return Affine().grid(Affine().identity(batch, dtype=dtype), size)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_identity_every_mode_and_padding(mode, padding_mode):
    x = torch.rand(2, 3, 9, 11)
    y = sample(x, identity_grid(2, (9, 11)), mode=mode, padding_mode=padding_mode, fill_value=0.3)
    torch.testing.assert_close(y, x, atol=2e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_matches_grid_sample_reference(mode, padding_mode):
    x = torch.rand(2, 2, 8, 10)
    grid = torch.rand(2, 5, 7, 2) * 2.6 - 1.3
    ref = F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    torch.testing.assert_close(sample(x, grid, mode, padding_mode), ref)


@pytest.mark.parametrize("mode", MODES)
def test_fill_reads_constant_outside_per_channel(mode):
    x = torch.rand(2, 4, 6, 6)
    fill = [0.1, 0.2, 0.3, 0.4]
    outside = torch.full((2, 3, 3, 2), 5.0)
    y = sample(x, outside, mode=mode, padding_mode="fill", fill_value=fill)
    torch.testing.assert_close(y, torch.tensor(fill).view(1, 4, 1, 1).expand_as(y))
    # Scalar fill, any channel count.
    y = sample(torch.rand(1, 7, 5, 5), outside[:1], mode=mode, padding_mode="fill", fill_value=-1.5)
    torch.testing.assert_close(y, torch.full_like(y, -1.5))


def test_fill_blends_at_the_border_like_constant_padding():
    # Bilinear half a pixel past the left edge: halfway between the edge pixel and the fill value.
    x = torch.ones(1, 1, 4, 4)
    ys, xs = normalised_pixel_centres((4, 4))
    grid = torch.stack((torch.full((4,), -1.0), ys), -1).view(1, 4, 1, 2)
    y = sample(x, grid, padding_mode="fill", fill_value=3.0)
    torch.testing.assert_close(y, torch.full_like(y, 2.0))


def test_bilinear_stays_in_input_range():
    x = torch.rand(4, 1, 12, 12)
    theta = Affine().identity(4) + 0.3 * torch.randn(4, 6)
    for padding in ("zeros", "border", "reflection"):
        y = warp(x, theta, "affine", padding_mode=padding)
        assert y.min() >= 0 and y.max() <= 1


def test_shared_grid_broadcasts_over_batch():
    x = torch.rand(5, 1, 6, 6)
    y = sample(x, identity_grid(1, (4, 4)))
    assert y.shape == (5, 1, 4, 4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_gradcheck_input_and_theta(mode, padding_mode):
    x = smooth_images(2, 2, 6, 7, dtype=torch.float64).requires_grad_()
    theta = (Affine().identity(2, dtype=torch.float64) + 0.2 * torch.randn(2, 6, dtype=torch.float64)).requires_grad_()

    def fn(x_, theta_):
        return warp(x_, theta_, "affine", out_size=(5, 4), mode=mode, padding_mode=padding_mode, fill_value=[0.2, 0.7])

    if mode == "nearest":
        # Nearest sampling is piecewise constant in theta: check the input gradient only.
        assert torch.autograd.gradcheck(lambda x_: fn(x_, theta.detach()), (x,))
    else:
        assert torch.autograd.gradcheck(fn, (x, theta))


def test_enum_options_are_accepted():
    x = torch.rand(1, 1, 4, 4)
    y = sample(x, identity_grid(1, (4, 4)), stnkit.InterpolationMode.BICUBIC, stnkit.PaddingMode.REFLECTION)
    torch.testing.assert_close(y, x, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: warp(torch.rand(2, 8, 8), Affine().identity(2), "affine"), ValueError, r"\(N, C, H, W\), got 3 dimensions"),
        (lambda: warp(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), Affine().identity(2), "affine"), TypeError, "floating-point.*uint8"),
        (lambda: warp(torch.rand(2, 1, 8, 8), Affine().identity(3), "affine"), ValueError, "batch mismatch: x has 2 images but theta has 3"),
        (lambda: warp(torch.rand(2, 1, 8, 8), torch.zeros(2, 5), "affine"), ValueError, r"\(B, 6\), got \(2, 5\)"),
        (lambda: warp(torch.rand(1, 1, 8, 8), torch.tensor([[1.0, 0, 0, 0, float("inf"), 0]]), "affine"), ValueError, "NaN or Inf"),
        (lambda: warp(torch.rand(1, 1, 8, 8), Affine().identity(1), "affine", mode="cubic"), ValueError, "unknown mode 'cubic'; expected one of 'bilinear', 'nearest', 'bicubic'"),
        (lambda: warp(torch.rand(1, 1, 8, 8), Affine().identity(1), "affine", padding_mode="wrap"), ValueError, "unknown padding_mode 'wrap'"),
        (lambda: warp(torch.rand(1, 3, 8, 8), Affine().identity(1), "affine", padding_mode="fill", fill_value=[1.0, 2.0]), ValueError, "one value per channel \\(3\\)"),
        (lambda: sample(torch.rand(1, 1, 8, 8), torch.rand(1, 4, 4, 3)), ValueError, r"\(N, H_out, W_out, 2\)"),
        (lambda: sample(torch.rand(2, 1, 8, 8), torch.rand(3, 4, 4, 2)), ValueError, "batch mismatch"),
        (lambda: warp(torch.rand(1, 1, 8, 8), Affine().identity(1), "affine", out_size=(4, -1)), ValueError, "positive"),
        (lambda: warp(torch.rand(1, 1, 8, 8), Affine().identity(1), "nope"), ValueError, "unknown transform"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_compile_warp():
    fn = torch.compile(lambda x, t: warp(x, t, "affine", padding_mode="fill", fill_value=0.5), backend="eager")
    x, theta = torch.rand(2, 1, 8, 8), Affine().identity(2) + 0.1
    torch.testing.assert_close(fn(x, theta), warp(x, theta, "affine", padding_mode="fill", fill_value=0.5))
