"""Tests for the displacement-field family (stnkit.transforms.displacement)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from stnkit.transforms import DisplacementField, get_transform, normalised_pixel_centres


def identity_grid(out_size, dtype=torch.float64) -> torch.Tensor:
    """Output pixel centres ``(1, H, W, 2)``, ``(x, y)``."""
    ys, xs = normalised_pixel_centres(out_size, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1).unsqueeze(0)


def random_theta(field: DisplacementField, batch: int = 2, scale: float = 0.1, seed: int = 0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, field.num_params, generator=generator, dtype=torch.float64) * scale).to(dtype)


def jacobian_determinant(grid: torch.Tensor) -> torch.Tensor:
    """Forward-difference Jacobian determinant of a ``(B, H, W, 2)`` map, per pixel (pixel units ignored)."""
    along_x = (grid[:, :, 1:] - grid[:, :, :-1])[:, :-1]
    along_y = (grid[:, 1:] - grid[:, :-1])[:, :, :-1]
    return along_x[..., 0] * along_y[..., 1] - along_x[..., 1] * along_y[..., 0]


def plain_map(field: DisplacementField, theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """A plain field's backward map at arbitrary points ``(B, H, W, 2)``: ``q + u(q)``, ``u`` bicubic between nodes."""
    offsets = F.grid_sample(field.field(theta), points, mode="bicubic", padding_mode="border", align_corners=True)
    return points + offsets.permute(0, 2, 3, 1)


def chain(first_grid: torch.Tensor, second_grid: torch.Tensor) -> torch.Tensor:
    """``G_first(G_second(q))`` for dense grids, by bilinear resampling of ``G_first`` (border padding)."""
    channels_first = first_grid.permute(0, 3, 1, 2)
    resampled = F.grid_sample(channels_first, second_grid, align_corners=False, padding_mode="border")
    return resampled.permute(0, 2, 3, 1)


BOTH = pytest.mark.parametrize("diffeomorphic", [False, True], ids=["plain", "diffeomorphic"])


# ----------------------------------------------------------------- smoke
class TestSmoke:
    @BOTH
    def test_sizes_and_identity(self, diffeomorphic):
        field = DisplacementField((3, 5), diffeomorphic=diffeomorphic)
        assert field.name == "displacement_field" and field.num_params == 30
        theta = field.identity(4, dtype=torch.float64)
        assert theta.shape == (4, 30) and not theta.any()
        assert field.grid(theta, (7, 6)).shape == (4, 7, 6, 2)
        assert field.field(theta).shape == (4, 2, 3, 5)

    @BOTH
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_identity_grid_is_exact(self, diffeomorphic, dtype):
        field = DisplacementField((4, 4), diffeomorphic=diffeomorphic)
        grid = field.grid(field.identity(2, dtype=dtype), (5, 7))
        assert grid.dtype == dtype
        assert torch.equal(grid, identity_grid((5, 7), dtype).expand(2, -1, -1, -1))

    def test_non_contiguous_theta(self):
        transform = DisplacementField((4, 4))
        theta = (torch.randn(transform.num_params, 2, dtype=torch.float64) * 0.1).T  # (2, 32), not contiguous
        assert not theta.is_contiguous()
        torch.testing.assert_close(transform.grid(theta, (5, 6)), transform.grid(theta.contiguous(), (5, 6)))
        torch.testing.assert_close(transform.inverse(theta), transform.inverse(theta.contiguous()))

    def test_config_round_trip(self):
        field = DisplacementField((6, 4), diffeomorphic=True, integration_steps=5)
        config = json.loads(json.dumps(field.config()))
        assert config == {"name": "displacement_field", "grid_size": [6, 4], "diffeomorphic": True, "integration_steps": 5}
        assert get_transform(config) == field
        assert get_transform("displacement_field") == DisplacementField()
        assert field != DisplacementField((6, 4))

    def test_theta_layout(self):
        # x-offsets plane first, then y-offsets plane, each row-major over the nodes.
        field = DisplacementField((2, 3))
        nodes = field.nodes(dtype=torch.float64)
        assert nodes[0, 0].tolist() == [-1.0, -1.0] and nodes[-1, -1].tolist() == [1.0, 1.0]
        assert nodes[0, 1].tolist() == [0.0, -1.0]
        planes = field.field(torch.arange(12.0).view(1, 12))
        assert planes[0, 0].tolist() == [[0, 1, 2], [3, 4, 5]] and planes[0, 1, 1].tolist() == [9, 10, 11]


# ------------------------------------------------------------ behaviour
class TestUpsampling:
    def test_nodes_sit_on_the_edges(self):
        # Nodes of a 5-node axis are at -1, -0.5, 0, 0.5, 1; a 2-pixel axis has its
        # centres at -0.5 and 0.5, so they must read nodes 1 and 3 exactly.
        field = DisplacementField((5, 5))
        theta = random_theta(field, scale=0.3)
        displacement = field.displacement(theta, (2, 2))
        nodes = field.field(theta).permute(0, 2, 3, 1)  # (B, 5, 5, 2)
        expected = nodes[:, 1::2, 1::2]
        torch.testing.assert_close(displacement, expected, atol=1e-12, rtol=0)
        # A single output pixel sits at the centre node of a 3x3 lattice.
        centre = DisplacementField((3, 3))
        theta = random_theta(centre)
        torch.testing.assert_close(
            centre.displacement(theta, (1, 1))[:, 0, 0], centre.field(theta)[:, :, 1, 1], atol=1e-12, rtol=0
        )

    def test_constant_field_is_a_translation(self):
        field = DisplacementField((4, 6))
        theta = torch.cat((torch.full((1, 24), 0.3, dtype=torch.float64), torch.full((1, 24), -0.2, dtype=torch.float64)), dim=1)
        grid = field.grid(theta, (9, 11))
        expected = identity_grid((9, 11)) + torch.tensor([0.3, -0.2], dtype=torch.float64)
        torch.testing.assert_close(grid, expected, atol=1e-12, rtol=0)

    def test_upsampling_is_smooth(self):
        # No jumps: the step between neighbouring pixels stays of the order of the
        # steepest node-to-node slope (bicubic may overshoot it a little).
        field = DisplacementField((4, 4))
        theta = random_theta(field, scale=0.2)
        nodes = field.field(theta)
        node_step = max((nodes[..., 1:] - nodes[..., :-1]).abs().max(), (nodes[..., 1:, :] - nodes[..., :-1, :]).abs().max())
        pixels_per_node = 64 / 3
        displacement = field.displacement(theta, (64, 64))
        pixel_step = max(
            (displacement[:, 1:] - displacement[:, :-1]).abs().max(),
            (displacement[:, :, 1:] - displacement[:, :, :-1]).abs().max(),
        )
        assert pixel_step < 1.5 * node_step / pixels_per_node


class TestDiffeomorphic:
    def test_constant_velocity_is_the_same_translation(self):
        field = DisplacementField((3, 3), diffeomorphic=True)
        theta = torch.cat((torch.full((1, 9), 0.25), torch.full((1, 9), -0.5)), dim=1).double()  # exact in float32
        expected = identity_grid((6, 5)) + torch.tensor([0.25, -0.5], dtype=torch.float64)
        torch.testing.assert_close(field.grid(theta, (6, 5)), expected, atol=1e-12, rtol=0)

    def test_large_velocity_does_not_fold_where_plain_field_does(self):
        plain = DisplacementField((4, 4))
        smooth = DisplacementField((4, 4), diffeomorphic=True)
        theta = random_theta(plain, batch=8, scale=0.35)
        plain_det = jacobian_determinant(plain.grid(theta, (32, 32))).flatten(1).amin(1)
        smooth_det = jacobian_determinant(smooth.grid(theta, (32, 32))).flatten(1).amin(1)
        assert (plain_det < 0).all(), "the test field should be large enough to fold as a plain displacement"
        assert (smooth_det > 0).all()

    def test_small_velocity_is_close_to_the_displacement(self):
        # exp(v) = identity + v + O(v^2): for small v both modes nearly agree.
        theta = random_theta(DisplacementField((4, 4)), scale=0.01)
        plain = DisplacementField((4, 4)).grid(theta, (16, 16))
        smooth = DisplacementField((4, 4), diffeomorphic=True).grid(theta, (16, 16))
        assert (plain - smooth).abs().max() < 2e-3

    def test_zero_integration_steps_is_the_plain_field(self):
        theta = random_theta(DisplacementField((4, 4)))
        smooth = DisplacementField((4, 4), diffeomorphic=True, integration_steps=0).grid(theta, (8, 8))
        torch.testing.assert_close(smooth, DisplacementField((4, 4)).grid(theta, (8, 8)))


# ---------------------------------------------------------------- dtypes
class TestPrecision:
    @BOTH
    def test_bfloat16_autocast_cpu_gives_finite_float32_grid(self, diffeomorphic):
        field = DisplacementField((5, 5), diffeomorphic=diffeomorphic)
        theta = random_theta(field, scale=0.3, dtype=torch.float32)
        reference = field.grid(theta, (16, 12))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grid = field.grid(theta.bfloat16(), (16, 12))
            sampled = F.grid_sample(torch.rand(2, 1, 8, 8), grid, align_corners=False)
        assert grid.dtype == torch.float32 and torch.isfinite(grid).all() and torch.isfinite(sampled).all()
        torch.testing.assert_close(grid, reference, atol=1e-2, rtol=0)

    def test_half_theta_without_autocast_keeps_its_dtype(self):
        field = DisplacementField((4, 4), diffeomorphic=True)
        grid = field.grid(random_theta(field, dtype=torch.bfloat16), (6, 6))
        assert grid.dtype == torch.bfloat16 and torch.isfinite(grid).all()

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast is tested on CUDA only")
    @BOTH
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_autocast_cuda(self, diffeomorphic, dtype):
        field = DisplacementField((8, 8), diffeomorphic=diffeomorphic)
        theta = random_theta(field, scale=0.5, dtype=torch.float32).cuda()
        with torch.autocast("cuda", dtype=dtype):
            grid = field.grid(theta.to(dtype), (64, 64))
        assert grid.dtype == torch.float32 and torch.isfinite(grid).all()


# ---------------------------------------------------------------- gradients
class TestGradients:
    @pytest.mark.parametrize(
        "field",
        [DisplacementField((3, 4)), DisplacementField((3, 3), diffeomorphic=True, integration_steps=2)],
        ids=["plain", "diffeomorphic"],
    )
    def test_gradcheck_sampling_wrt_image_and_theta(self, field):
        theta = random_theta(field, scale=0.15).requires_grad_(True)
        image = torch.rand(2, 1, 6, 7, dtype=torch.float64, requires_grad=True)

        def warp(image, theta):
            return F.grid_sample(image, field.grid(theta, (5, 4)), align_corners=False)

        assert torch.autograd.gradcheck(warp, (image, theta))


# ---------------------------------------------------------- compose/inverse
class TestComposeInverse:
    def test_compose_law_at_nodes(self):
        field = DisplacementField((5, 5))
        first, second = random_theta(field, seed=1), random_theta(field, seed=2)
        composed = field.field(field.compose(first, second))
        # u(n_k) = second_k + u_first(n_k + second_k), with u_first bicubic between nodes.
        moved = field.nodes(dtype=torch.float64) + field.field(second).permute(0, 2, 3, 1)
        first_at_moved = F.grid_sample(
            field.field(first), moved, mode="bicubic", padding_mode="border", align_corners=True
        )
        torch.testing.assert_close(composed, field.field(second) + first_at_moved, atol=1e-12, rtol=0)

    def test_compose_approximates_warping_twice(self):
        # Off the nodes the composite is replaced by its bicubic interpolant; the error
        # is second order in the warp size, so halving the warps quarters it.
        field = DisplacementField((5, 5))
        errors = []
        for scale in (0.04, 0.02):
            first, second = random_theta(field, scale=scale, seed=1), random_theta(field, scale=scale, seed=2)
            chained = plain_map(field, first, field.grid(second, (48, 48)))
            composed = field.grid(field.compose(first, second), (48, 48))
            errors.append((chained - composed).abs().max().item())
        assert errors[0] < 0.03 and errors[1] < 0.35 * errors[0]

    @BOTH
    def test_compose_with_identity_and_translations(self, diffeomorphic):
        field = DisplacementField((3, 3), diffeomorphic=diffeomorphic)
        theta = random_theta(field)
        identity = field.identity(1, dtype=torch.float64)
        torch.testing.assert_close(field.compose(theta, identity), theta, atol=1e-12, rtol=0)
        torch.testing.assert_close(field.compose(identity, theta), theta, atol=1e-12, rtol=0)
        shift = torch.cat((torch.full((1, 9), 0.125), torch.full((1, 9), -0.25)), dim=1).double()
        torch.testing.assert_close(field.compose(shift, shift), 2 * shift, atol=1e-12, rtol=0)

    def test_plain_inverse_inverts_moderate_warps(self):
        field = DisplacementField((5, 5))
        between = []
        for scale in (0.04, 0.02):
            theta = random_theta(field, scale=scale, seed=3)
            inverse = field.inverse(theta)
            assert field.compose(theta, inverse).abs().max() < 1e-10  # exact at the nodes
            # Between nodes: T(T_inverse(q)) ~ q, to second order in the warp size.
            dense = plain_map(field, theta, field.grid(inverse, (48, 48)))
            between.append((dense - identity_grid((48, 48))).abs().max().item())
        assert between[0] < 0.025 and between[1] < 0.35 * between[0]

    def test_diffeomorphic_inverse_negates_and_inverts(self):
        field = DisplacementField((5, 5), diffeomorphic=True)
        theta = random_theta(field, scale=0.1, seed=3)
        inverse = field.inverse(theta)
        assert torch.equal(inverse, -theta)
        assert not field.compose(theta, inverse).any()
        dense = chain(field.grid(theta, (64, 64)), field.grid(inverse, (64, 64)))
        # Away from the border, where resampling the border does not distort the chain.
        assert (dense - identity_grid((64, 64)))[:, 8:-8, 8:-8].abs().max() < 1e-2


# ------------------------------------------------------------------ errors
class TestExceptions:
    @pytest.mark.parametrize(
        ("theta", "error", "message"),
        [
            (torch.zeros(2, 31), ValueError, r"shape \(B, 32\), got \(2, 31\)"),
            (torch.zeros(32), ValueError, r"shape \(B, 32\), got \(32,\)"),
            (torch.zeros(2, 32, dtype=torch.int32), TypeError, "floating-point"),
            (torch.full((1, 32), float("inf")), ValueError, "NaN or Inf"),
            (torch.full((1, 32), float("nan")), ValueError, "NaN"),
        ],
    )
    @BOTH
    def test_bad_theta(self, theta, error, message, diffeomorphic):
        with pytest.raises(error, match=message):
            DisplacementField((4, 4), diffeomorphic=diffeomorphic).grid(theta, (4, 4))

    @pytest.mark.parametrize(
        ("kwargs", "error", "message"),
        [
            ({"grid_size": (1, 4)}, ValueError, "at least 2"),
            ({"grid_size": (4, -1)}, ValueError, "at least 2"),
            ({"grid_size": (4, 4, 4)}, ValueError, r"\(rows, columns\)"),
            ({"grid_size": (4, 2.5)}, TypeError, "integers"),
            ({"diffeomorphic": 1}, TypeError, "diffeomorphic"),
            ({"integration_steps": -1}, ValueError, "integration_steps"),
            ({"integration_steps": 2.0}, TypeError, "integration_steps"),
        ],
    )
    def test_bad_construction(self, kwargs, error, message):
        with pytest.raises(error, match=message):
            DisplacementField(**kwargs)

    def test_bad_out_size_and_batches(self):
        field = DisplacementField((2, 2))
        theta = field.identity(2)
        with pytest.raises(ValueError, match="out_size"):
            field.grid(theta, (4, 0))
        with pytest.raises(TypeError, match="out_size"):
            field.grid(theta, (4.0, 4))
        with pytest.raises(ValueError, match="batch sizes differ"):
            field.compose(theta, field.identity(3))
        with pytest.raises(ValueError, match="iterations"):
            field.inverse(theta, iterations=-2)


# ------------------------------------------------------------------ compile
@pytest.mark.slow
@BOTH
def test_compiled_grid_matches_eager(diffeomorphic):
    field = DisplacementField((4, 4), diffeomorphic=diffeomorphic, integration_steps=3)
    theta = random_theta(field, dtype=torch.float32)
    compiled = torch.compile(field.grid)
    torch.testing.assert_close(compiled(theta, (8, 9)), field.grid(theta, (8, 9)))
