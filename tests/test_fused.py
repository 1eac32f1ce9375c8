"""The fused warp (stnkit.sampling.fused): values and gradients against the grid + grid_sample reference."""

from __future__ import annotations

import pytest
import torch

from stnkit import sample, warp
from stnkit.sampling import fused
from stnkit.sampling.fused import fused_applicable, fused_available, fused_warp
from stnkit.transforms import get_transform

from conftest import smooth_images

PADDINGS = ["zeros", "border", "reflection", "fill"]
FAMILIES = {
    "affine": torch.tensor([1.2, 0.25, 0.1, -0.2, 1.1, -0.15], dtype=torch.float64),
    "projective": torch.tensor([1.1, 0.2, 0.1, -0.2, 1.2, -0.1, 0.3, -0.25], dtype=torch.float64),
}
IMPLEMENTATIONS = [
    pytest.param("c", marks=pytest.mark.skipif(not fused_available(), reason="no C compiler: fused C kernel unavailable")),
    "torch",
]


def reference(x, theta, family, out_size, mode, padding_mode, fill):
    """The plain path: the family's grid, then the sampler (grid_sample)."""
    transform = get_transform(family)
    return sample(x, transform.grid(theta, out_size).to(x.dtype), mode, padding_mode, fill)


def params(family, batch, dtype, scale=0.15):
    generator = torch.Generator().manual_seed(batch)
    base = FAMILIES[family].to(dtype)
    return base + scale * torch.randn(batch, base.numel(), generator=generator, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_values_and_gradients_match_the_reference(implementation, family, mode, padding_mode):
    x = torch.rand(3, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    theta = params(family, 3, torch.float64).requires_grad_(True)
    fill = [0.3, 0.7]
    out_size = (7, 13)
    ref = reference(x, theta, family, out_size, mode, padding_mode, fill)
    out = fused_warp(x, theta, family, out_size, mode, padding_mode, fill, implementation=implementation)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, theta), grad)
    out_grads = torch.autograd.grad(out, (x, theta), grad)
    torch.testing.assert_close(out_grads[0], ref_grads[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out_grads[1], ref_grads[1], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_gradcheck_float64(implementation, family, padding_mode):
    x = smooth_images(2, 2, 6, 7, dtype=torch.float64).requires_grad_(True)
    theta = params(family, 2, torch.float64, scale=0.05).requires_grad_(True)

    def run(x, theta):
        return fused_warp(x, theta, family, (5, 6), "bilinear", padding_mode, [0.2, 0.9], implementation=implementation)

    assert torch.autograd.gradcheck(run, (x, theta), eps=1e-6, atol=1e-6)


@pytest.mark.skipif(not fused_available(), reason="no C compiler: fused C kernel unavailable")
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_float32_matches_the_reference(family, mode, padding_mode):
    x = smooth_images(4, 3, 20, 24)
    theta = params(family, 4, torch.float32)
    ref = reference(x, theta, family, (18, 26), mode, padding_mode, 0.25)
    out = fused_warp(x, theta, family, (18, 26), mode, padding_mode, 0.25, implementation="c")
    if mode == "bilinear":
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    else:
        # Nearest can round a point lying within float32 rounding of a pixel boundary either way.
        assert ((out - ref).abs() > 1e-5).float().mean() < 0.01


@pytest.mark.skipif(not fused_available(), reason="no C compiler: fused C kernel unavailable")
@pytest.mark.parametrize("shape", [(1, 3, 70, 90), (1, 1, 40, 50), (5, 1, 33, 17), (2, 4, 8, 2000)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threading_and_shapes(shape, threads, monkeypatch):
    # One image (channels or, with fewer channels than threads, rows split over threads), several images, long rows.
    monkeypatch.setattr(fused, "_VALUES_PER_THREAD", 1)  # thread even these small problems
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.rand(*shape, dtype=torch.float64, requires_grad=True)
        theta = params("affine", shape[0], torch.float64).requires_grad_(True)
        ref = reference(x, theta, "affine", shape[-2:], "bilinear", "zeros", 0.0)
        out = fused_warp(x, theta, "affine", None, implementation="c")
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        grad = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, (x, theta), grad, retain_graph=True)
        for a, b in zip(torch.autograd.grad(out, (x, theta), grad), ref_grads):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
        # theta only (the STN training case): no input gradient is computed
        out = fused_warp(x.detach(), theta, "affine", None, implementation="c")
        (g,) = torch.autograd.grad(out, theta, grad)
        torch.testing.assert_close(g, torch.autograd.grad(ref, theta, grad)[0], atol=1e-9, rtol=1e-9)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_shared_theta_and_other_families(implementation):
    x = torch.rand(4, 2, 10, 12, dtype=torch.float64)
    for family, theta in [
        ("affine", params("affine", 1, torch.float64)),
        ("similarity", torch.tensor([[0.1, 0.9, 0.05, -0.1]], dtype=torch.float64)),
        ("translation", torch.tensor([[0.2, -0.3]], dtype=torch.float64)),
        (get_transform({"name": "projective", "parametrisation": "corners"}), 0.1 * torch.randn(1, 8, dtype=torch.float64)),
    ]:
        theta = theta.clone().requires_grad_(True)
        ref = reference(x, theta, family, (8, 9), "bilinear", "border", 0.0)
        out = fused_warp(x, theta, family, (8, 9), padding_mode="border", implementation=implementation)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(
            torch.autograd.grad(out.sum(), theta)[0], torch.autograd.grad(ref.sum(), theta)[0], atol=1e-10, rtol=1e-10
        )


@pytest.mark.skipif(not fused_available(), reason="no C compiler: fused C kernel unavailable")
def test_beyond_the_horizon_reads_outside():
    # w <= 0 for part of the output: clamped like apply_matrix_to_grid, never mirrored back in.
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    theta = torch.tensor([[1.0, 0, 0, 0, 1, 0, 1.5, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = reference(x, theta, "projective", (16, 16), "bilinear", "zeros", 0.0)
    out = fused_warp(x, theta, "projective", implementation="c")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), theta)[0], torch.autograd.grad(ref.sum(), theta)[0])


def test_warp_dispatch():
    x = torch.rand(2, 1, 8, 8)
    theta = get_transform("affine").identity(2)
    assert fused_applicable(x, theta, "affine") == fused_available()
    assert not fused_applicable(x, theta, "affine", mode="bicubic")
    assert not fused_applicable(x, theta, "tps")
    assert not fused_applicable(x.half(), theta, "affine")
    assert not fused_applicable(x, theta, "affine", mode="no such mode")
    assert not fused_applicable(x, theta, "affine", padding_mode="fill", fill_value=torch.tensor(0.5, requires_grad=True))


def test_warp_errors_are_unchanged():
    x = torch.rand(2, 1, 8, 8)
    theta = get_transform("affine").identity(2)
    with pytest.raises(ValueError, match="unknown mode 'cubic'"):
        warp(x, theta, "affine", mode="cubic")
    with pytest.raises(ValueError, match="unknown padding_mode"):
        warp(x, theta, "affine", padding_mode="wrap")
    with pytest.raises(ValueError, match="fill_value must be a scalar or hold one value per channel"):
        warp(x, theta, "affine", padding_mode="fill", fill_value=[1.0, 2.0])


def test_environment_switch(monkeypatch):
    x = torch.rand(2, 1, 8, 8)
    theta = get_transform("affine").identity(2)
    monkeypatch.setenv("STNKIT_FUSED", "0")
    assert not fused_applicable(x, theta, "affine")
    torch.testing.assert_close(warp(x, theta, "affine"), x)
    monkeypatch.setenv("STNKIT_FUSED", "torch")
    assert fused_applicable(x, theta, "affine")
    out = warp(x, theta.requires_grad_(True), "affine")
    assert type(out.grad_fn).__name__.startswith("_FusedWarpTorch")
    torch.testing.assert_close(out, x)


def test_kernel_status_is_printable():
    assert isinstance(fused.kernel_status(), str)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_inputs_take_the_reference_path_when_fused_is_off(monkeypatch):
    # With the Triton kernels (the CUDA default) turned off, CUDA tensors fall back to
    # grid + grid_sample; the torch implementation of the fused warp agrees with it.
    monkeypatch.setenv("STNKIT_FUSED", "0")
    x = torch.rand(2, 3, 16, 16, device="cuda")
    theta = params("affine", 2, torch.float32).cuda()
    assert not fused_applicable(x, theta, "affine")
    out = fused_warp(x, theta, "affine", implementation="torch")
    torch.testing.assert_close(out, warp(x, theta, "affine"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_empty_batch_and_no_channels(implementation):
    x = torch.rand(0, 2, 5, 5, requires_grad=True)
    theta = torch.zeros(0, 6, requires_grad=True)
    out = fused_warp(x, theta, "affine", implementation=implementation)
    out.sum().backward()
    assert out.shape == (0, 2, 5, 5) and x.grad.shape == x.shape and theta.grad.shape == theta.shape
    x = torch.rand(2, 0, 5, 5)
    theta = get_transform("affine").identity(2).requires_grad_(True)
    out = fused_warp(x, theta, "affine", padding_mode="fill", fill_value=0.5, implementation=implementation)
    out.sum().backward()
    assert out.shape == (2, 0, 5, 5) and torch.equal(theta.grad, torch.zeros(2, 6))
