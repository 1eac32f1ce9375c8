"""Property-based tests (hypothesis) over every transform family and the sampler.

Each property is checked on random members of each family drawn within the
documented, non-folding ranges (``_AMPLITUDE`` below), at random input and
output sizes and batch sizes from 1 to 256. ``max_examples`` is kept modest so
the whole file runs in well under a minute on one CPU core.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stnkit.sampling import sample, warp
from stnkit.transforms import (
    TRANSFORMS,
    Affine,
    DisplacementField,
    MatrixTransform,
    Projective,
    Rotation,
    ScaleTranslation,
    Similarity,
    ThinPlateSpline,
    Translation,
    normalised_pixel_centres,
)

# One instance per family (and per parametrisation), with the perturbation
# amplitude that keeps members inside the documented ranges (no folding).
FAMILIES = {
    "translation": (Translation(), 0.5),
    "rotation": (Rotation(), 0.5),
    "similarity": (Similarity(), 0.3),
    "scale_translation": (ScaleTranslation(), 0.3),
    "affine": (Affine(), 0.3),
    "projective": (Projective(), 0.2),
    "projective_corners": (Projective("corners"), 0.2),
    "thin_plate_spline": (ThinPlateSpline((3, 3)), 0.08),
    "displacement_field": (DisplacementField((4, 4)), 0.08),
}
MATRIX_FAMILIES = [name for name, (t, _) in FAMILIES.items() if isinstance(t, MatrixTransform)]
SPLINE_FAMILIES = [name for name, (t, _) in FAMILIES.items() if not isinstance(t, MatrixTransform)]

PROPERTY_SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes = st.tuples(st.integers(1, 24), st.integers(1, 24))
batches = st.sampled_from([1, 2, 5, 256])
seeds = st.integers(0, 2**31 - 1)


def draw_theta(name: str, batch: int, seed: int, dtype=torch.float64, scale: float = 1.0) -> torch.Tensor:
    """Identity plus a uniform perturbation of at most the family's amplitude (times ``scale``)."""
    transform, amplitude = FAMILIES[name]
    generator = torch.Generator().manual_seed(seed)
    noise = (torch.rand(batch, transform.num_params, generator=generator, dtype=torch.float64) * 2 - 1) * amplitude * scale
    if name == "projective":
        noise[:, 6:] *= 0.25  # perspective entries act on normalised coordinates: keep them small
    return (transform.identity(batch, dtype=torch.float64) + noise).to(dtype)


def identity_grid(size, dtype=torch.float64) -> torch.Tensor:
    ys, xs = normalised_pixel_centres(size, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1).unsqueeze(0)


def apply_matrix(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Map points ``(B, H, W, 2)`` through matrices ``(B, 3, 3)`` (homogeneous division)."""
    homogeneous = torch.cat((points, torch.ones_like(points[..., :1])), dim=-1)
    mapped = torch.einsum("bij,bhwj->bhwi", matrix, homogeneous)
    return mapped[..., :2] / mapped[..., 2:]


def test_every_registered_family_is_covered():
    covered = {transform.name for transform, _ in FAMILIES.values()}
    assert covered == set(TRANSFORMS)


# ----------------------------------------------------------------- grids
@pytest.mark.parametrize("name", list(FAMILIES))
@PROPERTY_SETTINGS
@given(out_size=sizes, batch=batches, seed=seeds)
def test_grid_is_finite_with_the_right_shape(name, out_size, batch, seed):
    transform, _ = FAMILIES[name]
    for dtype in (torch.float32, torch.float64):
        grid = transform.grid(draw_theta(name, batch, seed, dtype), out_size)
        assert grid.shape == (batch, *out_size, 2)
        assert grid.dtype == dtype
        assert torch.isfinite(grid).all()


@pytest.mark.parametrize("name", list(FAMILIES))
@PROPERTY_SETTINGS
@given(out_size=sizes, batch=batches)
def test_identity_grid_is_the_pixel_centres(name, out_size, batch):
    transform, _ = FAMILIES[name]
    grid = transform.grid(transform.identity(batch, dtype=torch.float64), out_size)
    torch.testing.assert_close(grid, identity_grid(out_size).expand(batch, -1, -1, -1), atol=1e-9, rtol=0)


# ------------------------------------------------------- compose / inverse
@pytest.mark.parametrize("name", list(FAMILIES))
@PROPERTY_SETTINGS
@given(batch=st.sampled_from([1, 3]), seed=seeds)
def test_identity_is_neutral_for_compose(name, batch, seed):
    transform, _ = FAMILIES[name]
    theta = draw_theta(name, batch, seed)
    identity = transform.identity(batch, dtype=torch.float64)
    size = (9, 11)
    # Compared as grids: parameters such as angles are only defined modulo 2 pi.
    tolerance = 1e-9 if name in MATRIX_FAMILIES else 2e-3
    for composed in (transform.compose(theta, identity), transform.compose(identity, theta)):
        torch.testing.assert_close(transform.grid(composed, size), transform.grid(theta, size), atol=tolerance, rtol=0)


@pytest.mark.parametrize("name", MATRIX_FAMILIES)
@PROPERTY_SETTINGS
@given(batch=st.sampled_from([1, 4]), seed_a=seeds, seed_b=seeds, out_size=sizes)
def test_compose_is_warp_after_warp_for_matrices(name, batch, seed_a, seed_b, out_size):
    # Convention: compose(first, second) is the backward map q -> M_first (M_second q).
    transform, _ = FAMILIES[name]
    first, second = draw_theta(name, batch, seed_a), draw_theta(name, batch, seed_b)
    expected = apply_matrix(transform.matrix(first), transform.grid(second, out_size))
    torch.testing.assert_close(transform.grid(transform.compose(first, second), out_size), expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", MATRIX_FAMILIES)
@PROPERTY_SETTINGS
@given(batch=st.sampled_from([1, 4]), seed_a=seeds, seed_b=seeds, seed_c=seeds)
def test_compose_is_associative_for_matrices(name, batch, seed_a, seed_b, seed_c):
    transform, _ = FAMILIES[name]
    a, b, c = (draw_theta(name, batch, s) for s in (seed_a, seed_b, seed_c))
    left = transform.compose(transform.compose(a, b), c)
    right = transform.compose(a, transform.compose(b, c))
    torch.testing.assert_close(transform.matrix(left), transform.matrix(right), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", list(FAMILIES))
@PROPERTY_SETTINGS
@given(batch=st.sampled_from([1, 3]), seed=seeds)
def test_inverse_undoes_the_warp(name, batch, seed):
    transform, _ = FAMILIES[name]
    size = (10, 8)
    # TPS and displacement inverses are approximate (documented: second order in
    # the warp size), so they are checked on smaller warps with a looser tolerance.
    exact = name in MATRIX_FAMILIES
    theta = draw_theta(name, batch, seed, scale=1.0 if exact else 0.5)
    inverse = transform.inverse(theta)
    tolerance = 1e-8 if exact else 0.02
    for composed in (transform.compose(theta, inverse), transform.compose(inverse, theta)):
        torch.testing.assert_close(
            transform.grid(composed, size), identity_grid(size).expand(batch, -1, -1, -1), atol=tolerance, rtol=0
        )
    if exact:
        torch.testing.assert_close(transform.matrix(transform.inverse(inverse)), transform.matrix(theta), atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------- to_pixels
@pytest.mark.parametrize("name", MATRIX_FAMILIES)
@PROPERTY_SETTINGS
@given(batch=st.sampled_from([1, 3]), seed=seeds, in_size=sizes, out_size=sizes)
def test_to_pixels_maps_output_pixel_centres_like_the_grid(name, batch, seed, in_size, out_size):
    transform, _ = FAMILIES[name]
    theta = draw_theta(name, batch, seed)
    matrix = transform.to_pixels(theta, in_size, out_size)
    rows, columns = torch.meshgrid(
        torch.arange(out_size[0], dtype=torch.float64), torch.arange(out_size[1], dtype=torch.float64), indexing="ij"
    )
    pixel_centres = torch.stack((columns, rows), dim=-1).unsqueeze(0).expand(batch, -1, -1, -1)
    through_pixels = apply_matrix(matrix, pixel_centres)
    # The grid in normalised units, converted to input pixels (centre of pixel 0 at 0).
    grid = transform.grid(theta, out_size)
    height, width = in_size
    grid_in_pixels = torch.stack(((grid[..., 0] + 1) * width / 2 - 0.5, (grid[..., 1] + 1) * height / 2 - 0.5), dim=-1)
    torch.testing.assert_close(through_pixels, grid_in_pixels, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(transform.matrix(transform.from_pixels(matrix, in_size, out_size)), transform.matrix(theta),
                               atol=1e-9, rtol=1e-9)


# --------------------------------------------------------------- sampler
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@PROPERTY_SETTINGS
@given(name=st.sampled_from(list(FAMILIES)), seed=seeds, batch=batches, in_size=sizes, out_size=sizes,
       spread=st.floats(0.0, 4.0), mode=st.sampled_from(["bilinear", "nearest"]))
def test_sampler_output_stays_in_the_input_range(padding_mode, name, seed, batch, in_size, out_size, spread, mode):
    # Bilinear and nearest are convex combinations of input pixels (and of 0 for
    # zero padding), so inputs in [0, 1] give outputs in [0, 1] for any grid.
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 2, *in_size, generator=generator)
    grid = FAMILIES[name][0].grid(draw_theta(name, batch, seed, torch.float32), out_size)
    grid = grid + spread * (torch.rand(grid.shape, generator=generator) * 2 - 1)  # reach well outside the input
    out = sample(x, grid, mode=mode, padding_mode=padding_mode)
    assert out.shape == (batch, 2, *out_size)
    assert torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1 + 1e-6


@PROPERTY_SETTINGS
@given(seed=seeds, in_size=st.tuples(st.integers(2, 16), st.integers(2, 16)), fill=st.floats(0.0, 1.0))
def test_padding_semantics_at_and_beyond_the_border(seed, in_size, fill):
    height, width = in_size
    x = torch.rand(1, 1, height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ys, _ = normalised_pixel_centres(in_size, dtype=torch.float64)
    row = int(torch.randint(height, (1,), generator=torch.Generator().manual_seed(seed + 1)))
    y = ys[row].item()

    def read(px: float, padding_mode: str) -> float:
        grid = torch.tensor([[[[px, y]]]], dtype=torch.float64)
        return sample(x, grid, padding_mode=padding_mode, fill_value=fill).item()

    # Far outside: zeros reads 0, fill reads fill, border repeats the edge pixel.
    assert read(5.0, "zeros") == 0.0
    assert read(5.0, "fill") == pytest.approx(fill, abs=1e-12)
    assert read(5.0, "border") == pytest.approx(x[0, 0, row, -1].item(), abs=1e-12)
    assert read(-5.0, "border") == pytest.approx(x[0, 0, row, 0].item(), abs=1e-12)
    # Exactly on the edge (half a pixel beyond the last centre): border and reflection
    # read the edge pixel, zeros blends it half-and-half with 0.
    assert read(1.0, "border") == pytest.approx(x[0, 0, row, -1].item(), abs=1e-12)
    assert read(1.0, "reflection") == pytest.approx(x[0, 0, row, -1].item(), abs=1e-12)
    assert read(1.0, "zeros") == pytest.approx(0.5 * x[0, 0, row, -1].item(), abs=1e-12)
    # Reflection mirrors about the edge: a point just outside reads its mirror image inside.
    for offset in (0.3 / width, 0.9 / width):
        assert read(1.0 + offset, "reflection") == pytest.approx(read(1.0 - offset, "reflection"), abs=1e-12)
        assert read(-1.0 - offset, "reflection") == pytest.approx(read(-1.0 + offset, "reflection"), abs=1e-12)


@pytest.mark.parametrize("name", list(FAMILIES))
@PROPERTY_SETTINGS
@given(batch=batches, in_size=sizes, out_size=sizes)
def test_identity_warp_is_a_plain_resample_and_exact_at_equal_sizes(name, batch, in_size, out_size):
    transform, _ = FAMILIES[name]
    x = torch.rand(batch, 1, *in_size, dtype=torch.float64)
    # Border padding: F.interpolate repeats the edge pixels beyond the outer pixel centres.
    out = warp(x, transform.identity(batch, dtype=torch.float64), transform, out_size=out_size, padding_mode="border")
    assert out.shape == (batch, 1, *out_size)
    reference = torch.nn.functional.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, reference, atol=1e-9, rtol=0)
    torch.testing.assert_close(warp(x, transform.identity(1, dtype=torch.float64), transform), x, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_one_theta_is_shared_by_a_large_batch(name):
    transform, _ = FAMILIES[name]
    x = torch.rand(256, 1, 12, 10)
    theta = draw_theta(name, 1, 7, torch.float32)
    shared = warp(x, theta, transform, out_size=(7, 9))
    repeated = warp(x, theta.expand(256, -1), transform, out_size=(7, 9))
    torch.testing.assert_close(shared, repeated)
    assert shared.shape == (256, 1, 7, 9)

