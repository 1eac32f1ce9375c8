"""Tests for the thin-plate spline family (stnkit.transforms.tps)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import stnkit.transforms.tps as tps_module
from stnkit.transforms import Affine, ThinPlateSpline, get_transform, normalised_pixel_centres


def pixel_centre_points(out_size, dtype=torch.float64) -> torch.Tensor:
    """Output pixel centres ``(1, H*W, 2)`` in row-major order, ``(x, y)``."""
    ys, xs = normalised_pixel_centres(out_size, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1).reshape(1, -1, 2)


def random_theta(tps: ThinPlateSpline, batch: int = 2, scale: float = 0.1, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tps.num_params, generator=generator, dtype=torch.float64) * scale).to(dtype)


# ----------------------------------------------------------------- smoke
class TestSmoke:
    def test_sizes_and_identity(self):
        tps = ThinPlateSpline((3, 5))
        assert tps.name == "thin_plate_spline"
        assert tps.num_params == 30
        theta = tps.identity(4, dtype=torch.float64)
        assert theta.shape == (4, 30) and theta.dtype == torch.float64 and not theta.any()
        assert tps.grid(theta, (7, 6)).shape == (4, 7, 6, 2)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_identity_grid_is_exact(self, dtype):
        tps = ThinPlateSpline((4, 4))
        grid = tps.grid(tps.identity(2, dtype=dtype), (5, 7))
        ys, xs = normalised_pixel_centres((5, 7), dtype=dtype)
        assert grid.dtype == dtype
        assert torch.equal(grid[..., 0], xs.expand(2, 5, 7))
        assert torch.equal(grid[..., 1], ys.view(5, 1).expand(2, 5, 7))

    def test_control_points_lattice(self):
        points = ThinPlateSpline((2, 3)).control_points(dtype=torch.float64)
        expected = [[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]]
        assert points.tolist() == expected

    def test_non_contiguous_theta(self):
        transform = ThinPlateSpline((4, 4))
        theta = (torch.randn(transform.num_params, 2, dtype=torch.float64) * 0.1).T  # (2, 32), not contiguous
        assert not theta.is_contiguous()
        torch.testing.assert_close(transform.grid(theta, (5, 6)), transform.grid(theta.contiguous(), (5, 6)))
        torch.testing.assert_close(transform.inverse(theta), transform.inverse(theta.contiguous()))

    def test_config_round_trip(self):
        tps = ThinPlateSpline((3, 5), regularisation=0.25)
        config = json.loads(json.dumps(tps.config()))
        assert config == {"name": "thin_plate_spline", "grid_size": [3, 5], "regularisation": 0.25}
        assert get_transform(config) == tps
        assert get_transform("tps") == ThinPlateSpline()
        assert "grid_size" in repr(tps)


# ------------------------------------------------------------ behaviour
class TestInterpolation:
    def test_control_points_map_to_their_targets(self):
        tps = ThinPlateSpline((4, 5))
        theta = random_theta(tps, scale=0.2)
        control = tps.control_points(dtype=torch.float64).unsqueeze(0)
        mapped = tps.transform_points(theta, control)
        torch.testing.assert_close(mapped, control + theta.view(2, -1, 2), atol=1e-10, rtol=0)

    def test_grid_hits_targets_where_pixel_centres_are_control_points(self):
        # A 5x5 lattice has points at -0.5 and 0.5, which are pixel centres 1 and 4 of a 6-pixel axis.
        tps = ThinPlateSpline((5, 5))
        theta = random_theta(tps, scale=0.2)
        grid = tps.grid(theta, (6, 6))
        targets = tps.control_points(dtype=torch.float64).view(5, 5, 2) + theta.view(2, 5, 5, 2)
        for pixel, lattice in ((1, 1), (4, 3)):
            for pixel_x, lattice_x in ((1, 1), (4, 3)):
                torch.testing.assert_close(grid[:, pixel, pixel_x], targets[:, lattice, lattice_x], atol=1e-10, rtol=0)

    def test_grid_matches_transform_points(self):
        tps = ThinPlateSpline((3, 4))
        theta = random_theta(tps)
        grid = tps.grid(theta, (5, 6))
        points = tps.transform_points(theta, pixel_centre_points((5, 6)))
        torch.testing.assert_close(grid.reshape(2, -1, 2), points, atol=1e-12, rtol=0)

    def test_reproduces_affine_maps_exactly(self):
        tps = ThinPlateSpline((4, 4))
        affine = torch.tensor([[0.9, 0.2, 0.1, -0.15, 1.1, -0.05]], dtype=torch.float64)
        control = tps.control_points(dtype=torch.float64)
        matrix = affine.view(2, 3)
        offsets = control @ matrix[:, :2].T + matrix[:, 2] - control
        grid = tps.grid(offsets.reshape(1, -1), (9, 7))
        torch.testing.assert_close(grid, Affine().grid(affine, (9, 7)), atol=1e-10, rtol=0)

    def test_regularisation_smooths(self):
        theta = random_theta(ThinPlateSpline((4, 4)), scale=0.2)
        control = ThinPlateSpline((4, 4)).control_points(dtype=torch.float64).unsqueeze(0)
        targets = control + theta.view(2, -1, 2)
        errors = []
        for regularisation in (0.0, 0.1, 10.0):
            mapped = ThinPlateSpline((4, 4), regularisation).transform_points(theta, control)
            errors.append((mapped - targets).abs().max().item())
        assert errors[0] < 1e-10 < errors[1] < errors[2] < theta.abs().max().item() * 2

    def test_kernel_is_safe_at_zero(self):
        squared = torch.tensor([0.0, 1e-30, 0.5], dtype=torch.float64, requires_grad=True)
        values = tps_module.tps_kernel(squared)
        values.sum().backward()
        assert values[0].item() == 0.0 and torch.isfinite(values).all()
        assert torch.isfinite(squared.grad).all() and squared.grad[0].item() == 0.0

    def test_points_gradient_finite_at_control_points(self):
        tps = ThinPlateSpline((3, 3))
        theta = random_theta(tps, batch=1)
        points = tps.control_points(dtype=torch.float64).unsqueeze(0).requires_grad_(True)
        tps.transform_points(theta, points).sum().backward()
        assert torch.isfinite(points.grad).all()


# ----------------------------------------------------------------- caches
class TestCaching:
    def test_system_solved_once(self, monkeypatch):
        calls = []
        real_solve = tps_module.solve_tps_system

        def counting_solve(*args, **kwargs):
            calls.append(1)
            return real_solve(*args, **kwargs)

        monkeypatch.setattr(tps_module, "solve_tps_system", counting_solve)
        tps = ThinPlateSpline((4, 4))
        theta = random_theta(tps, dtype=torch.float32)
        for _ in range(3):
            tps.grid(theta, (8, 8))
        tps.grid(theta, (5, 9))
        tps.grid(theta.double(), (8, 8))
        tps.transform_points(theta, torch.zeros(1, 3, 2))
        tps.compose(theta, theta)
        assert len(calls) == 1

    def test_dtype_change_gets_its_own_entries(self):
        tps = ThinPlateSpline((3, 3))
        cpu = torch.device("cpu")
        first = tps._grid_operator((4, 5), cpu, torch.float32)
        assert tps._grid_operator((4, 5), cpu, torch.float32)[1] is first[1]
        solution = tps._solution(cpu, torch.float32)
        assert tps._solution(cpu, torch.float32) is solution
        other = tps._grid_operator((4, 5), cpu, torch.float64)
        assert other[1].dtype == torch.float64 and other[1] is not first[1]
        assert (cpu, torch.float64) in tps._solutions and (cpu, torch.float32) in tps._solutions

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_device_change_gets_its_own_entry(self):
        tps = ThinPlateSpline((3, 3))
        theta = random_theta(tps, dtype=torch.float32)
        tps.grid(theta, (4, 4))
        grid = tps.grid(theta.cuda(), (4, 4))
        assert grid.device.type == "cuda"
        assert {key[0].type for key in tps._solutions} >= {"cpu", "cuda"}
        torch.testing.assert_close(grid.cpu(), tps.grid(theta, (4, 4)))

    def test_size_cache_is_bounded(self):
        tps = ThinPlateSpline((2, 2))
        theta = tps.identity(1)
        for size in range(1, 20):
            tps.grid(theta, (size, size))
        assert len(tps._grid_operators) <= tps_module._MAX_CACHED_SIZES


# ---------------------------------------------------------------- dtypes
class TestPrecision:
    def test_bfloat16_autocast_cpu_gives_finite_float32_grid(self):
        tps = ThinPlateSpline((5, 5))
        theta = random_theta(tps, scale=0.3, dtype=torch.float32)
        reference = tps.grid(theta, (16, 12))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grid = tps.grid(theta, (16, 12))
            grid_from_bf16 = tps.grid(theta.bfloat16(), (16, 12))
            sampled = F.grid_sample(torch.rand(2, 1, 8, 8), grid, align_corners=False)
        assert grid.dtype == torch.float32 and grid_from_bf16.dtype == torch.float32
        assert torch.isfinite(grid_from_bf16).all() and torch.isfinite(sampled).all()
        torch.testing.assert_close(grid, reference)  # autocast did not touch the matmul
        torch.testing.assert_close(grid_from_bf16, reference, atol=1e-2, rtol=0)

    def test_half_theta_without_autocast_keeps_its_dtype(self):
        tps = ThinPlateSpline((4, 4))
        theta = random_theta(tps, dtype=torch.bfloat16)
        grid = tps.grid(theta, (6, 6))
        assert grid.dtype == torch.bfloat16 and torch.isfinite(grid).all()

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast is tested on CUDA only")
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_autocast_cuda(self, dtype):
        tps = ThinPlateSpline((8, 8))
        theta = random_theta(tps, scale=0.3, dtype=torch.float32).cuda()
        with torch.autocast("cuda", dtype=dtype):
            grid = tps.grid(theta.to(dtype), (64, 64))
        assert grid.dtype == torch.float32 and torch.isfinite(grid).all()


# ---------------------------------------------------------------- gradients
class TestGradients:
    def test_gradcheck_sampling_wrt_image_and_theta(self):
        tps = ThinPlateSpline((3, 3))
        theta = random_theta(tps, scale=0.15).requires_grad_(True)
        image = torch.rand(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)

        def warp(image, theta):
            return F.grid_sample(image, tps.grid(theta, (5, 4)), align_corners=False)

        assert torch.autograd.gradcheck(warp, (image, theta))

    def test_gradcheck_transform_points_wrt_points(self):
        tps = ThinPlateSpline((3, 3))
        theta = random_theta(tps, batch=1)
        # Include points exactly on control points, where U(r) is least regular.
        points = torch.cat((tps.control_points(dtype=torch.float64)[:3], torch.rand(4, 2, dtype=torch.float64)))
        points = points.unsqueeze(0).requires_grad_(True)
        assert torch.autograd.gradcheck(lambda p: tps.transform_points(theta, p), (points,))


# ---------------------------------------------------------- compose/inverse
class TestComposeInverse:
    def test_compose_law_at_control_points(self):
        tps = ThinPlateSpline((4, 4))
        first, second = random_theta(tps, seed=1), random_theta(tps, seed=2)
        control = tps.control_points(dtype=torch.float64).unsqueeze(0)
        composed = tps.compose(first, second)
        expected = tps.transform_points(first, control + second.view(2, -1, 2))
        torch.testing.assert_close(tps.transform_points(composed, control), expected, atol=1e-10, rtol=0)

    def test_compose_approximates_warping_twice(self):
        # Off the control points the composite is only approximated by a spline; the
        # error is second order in the warp size, so halving the warps quarters it.
        tps = ThinPlateSpline((4, 4))
        errors = []
        for scale in (0.05, 0.025):
            first, second = random_theta(tps, scale=scale, seed=1), random_theta(tps, scale=scale, seed=2)
            # The composed backward map is G_first evaluated at G_second(q).
            chained = tps.transform_points(first, tps.grid(second, (12, 12)).reshape(2, -1, 2))
            composed = tps.grid(tps.compose(first, second), (12, 12)).reshape(2, -1, 2)
            errors.append((chained - composed).abs().max().item())
        assert errors[0] < 0.03 and errors[1] < 0.35 * errors[0]

    def test_compose_with_identity_and_translations(self):
        tps = ThinPlateSpline((3, 3))
        theta = random_theta(tps)
        identity = tps.identity(1, dtype=torch.float64)
        torch.testing.assert_close(tps.compose(theta, identity), theta, atol=1e-12, rtol=0)
        torch.testing.assert_close(tps.compose(identity, theta), theta, atol=1e-12, rtol=0)
        shift = torch.tensor([0.1, -0.2], dtype=torch.float64).repeat(9).view(1, -1)
        torch.testing.assert_close(tps.compose(shift, shift), 2 * shift, atol=1e-12, rtol=0)

    def test_inverse_inverts_moderate_warps(self):
        tps = ThinPlateSpline((4, 4))
        between = []
        for scale in (0.05, 0.025):
            theta = random_theta(tps, scale=scale, seed=3)
            inverse = tps.inverse(theta)
            assert tps.compose(theta, inverse).abs().max() < 1e-10  # exact at the control points
            # Between control points: T(T_inverse(q)) ~ q, to second order in the warp size.
            dense = tps.transform_points(theta, tps.grid(inverse, (10, 10)).reshape(2, -1, 2))
            between.append((dense - pixel_centre_points((10, 10))).abs().max().item())
            assert tps.compose(inverse, theta).abs().max() < 0.02
        assert between[0] < 0.02 and between[1] < 0.35 * between[0]

    def test_inverse_of_translation_is_exact(self):
        tps = ThinPlateSpline((3, 4))
        shift = torch.tensor([0.3, -0.1], dtype=torch.float64).repeat(12).view(1, -1)
        torch.testing.assert_close(tps.inverse(shift), -shift, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ errors
class TestExceptions:
    @pytest.mark.parametrize(
        ("theta", "error", "message"),
        [
            (torch.zeros(2, 31), ValueError, r"shape \(B, 32\), got \(2, 31\)"),
            (torch.zeros(32), ValueError, r"shape \(B, 32\), got \(32,\)"),
            (torch.zeros(2, 32, dtype=torch.int64), TypeError, "floating-point"),
            (torch.full((1, 32), float("nan")), ValueError, "NaN"),
            ([0.0] * 32, TypeError, "torch.Tensor"),
        ],
    )
    def test_bad_theta(self, theta, error, message):
        with pytest.raises(error, match=message):
            ThinPlateSpline((4, 4)).grid(theta, (4, 4))

    @pytest.mark.parametrize(
        ("grid_size", "error", "message"),
        [
            ((1, 4), ValueError, "at least 2"),
            ((-3, 4), ValueError, "at least 2"),
            ((4,), ValueError, r"\(rows, columns\)"),
            ((4.0, 4), TypeError, "integers"),
            ("44", ValueError, r"\(rows, columns\)"),
        ],
    )
    def test_bad_grid_size(self, grid_size, error, message):
        with pytest.raises(error, match=message):
            ThinPlateSpline(grid_size)

    @pytest.mark.parametrize(
        ("value", "error"), [(-0.1, ValueError), (float("nan"), ValueError), ("0.1", TypeError), (True, TypeError)]
    )
    def test_bad_regularisation(self, value, error):
        with pytest.raises(error, match="regularisation"):
            ThinPlateSpline((3, 3), regularisation=value)

    def test_bad_out_size_points_and_batches(self):
        tps = ThinPlateSpline((2, 2))
        theta = tps.identity(2)
        with pytest.raises(ValueError, match="out_size"):
            tps.grid(theta, (0, 4))
        with pytest.raises(ValueError, match=r"points must have shape \(B, N, 2\)"):
            tps.transform_points(theta, torch.zeros(5, 2))
        with pytest.raises(ValueError, match="batch sizes differ"):
            tps.compose(theta, tps.identity(3))
        with pytest.raises(ValueError, match="iterations"):
            tps.inverse(theta, iterations=-1)


# ------------------------------------------------------------------ compile
@pytest.mark.slow
def test_compiled_grid_matches_eager():
    tps = ThinPlateSpline((4, 4))
    theta = random_theta(tps, dtype=torch.float32)
    compiled = torch.compile(tps.grid)
    torch.testing.assert_close(compiled(theta, (8, 9)), tps.grid(theta, (8, 9)))
    torch.testing.assert_close(compiled(2 * theta, (8, 9)), tps.grid(2 * theta, (8, 9)))
