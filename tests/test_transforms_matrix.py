"""Matrix transform families: identity, OpenCV agreement, compose/inverse laws, gradients, bad input."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

import stnkit
from stnkit.transforms import (
    Affine,
    MatrixTransform,
    Projective,
    Rotation,
    ScaleTranslation,
    Similarity,
    Translation,
    get_transform,
    homography_from_points,
)

from conftest import smooth_images

MATRIX_FAMILIES = [Translation(), Rotation(), Similarity(), ScaleTranslation(), Affine(), Projective(), Projective("corners")]
IDS = [repr(t) for t in MATRIX_FAMILIES]


def random_theta(transform: MatrixTransform, batch: int, strength: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    """Non-trivial parameters that keep most of the output inside the input."""
    generator = torch.Generator().manual_seed(transform.num_params * 7 + batch)
    noise = (torch.rand(batch, transform.num_params, generator=generator, dtype=torch.float64) * 2 - 1) * strength
    scale = {
        "translation": [0.2, 0.2],
        "rotation": [0.6, 0.15, 0.15],
        "similarity": [0.15, 0.6, 0.15, 0.15],
        "scale_translation": [0.2, 0.15, 0.15],
        "affine": [0.15, 0.15, 0.15, 0.15, 0.15, 0.15],
    }.get(transform.name)
    if scale is None:  # projective
        scale = [0.15] * 8 if transform.parametrisation == "corners" else [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.08, 0.08]
    theta = transform.identity(batch, dtype=torch.float64) + noise * torch.tensor(scale, dtype=torch.float64)
    return theta.to(dtype)


@pytest.mark.parametrize("transform", MATRIX_FAMILIES, ids=IDS)
def test_identity_reproduces_input(transform):
    x = torch.rand(3, 2, 17, 23)
    y = stnkit.warp(x, transform.identity(3), transform)
    torch.testing.assert_close(y, x, atol=2e-6, rtol=0)


@pytest.mark.parametrize("transform", MATRIX_FAMILIES, ids=IDS)
@pytest.mark.parametrize("in_size,out_size", [((40, 40), (40, 40)), ((48, 64), (30, 36)), ((31, 27), (45, 50))])
def test_agrees_with_opencv(transform, in_size, out_size):
    x = smooth_images(2, 1, *in_size)
    theta = random_theta(transform, 2)
    ours = stnkit.warp(x, theta, transform, out_size=out_size)
    matrices = transform.to_pixels(theta, in_size, out_size)
    assert matrices.dtype == torch.float64 and matrices.shape == (2, 3, 3)
    margin = 3
    for b in range(2):
        image = x[b, 0].numpy()
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        size = (out_size[1], out_size[0])
        if transform.is_projective:
            ref = cv2.warpPerspective(image, matrices[b].numpy(), size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        else:
            ref = cv2.warpAffine(image, matrices[b, :2].numpy(), size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        # Compare only pixels whose source lies well inside the input (OpenCV and torch treat the border differently).
        xs, ys = np.meshgrid(np.arange(out_size[1]), np.arange(out_size[0]))
        pts = np.stack([xs, ys, np.ones_like(xs)], -1).reshape(-1, 3).astype(np.float64) @ matrices[b].numpy().T
        pts = pts[:, :2] / pts[:, 2:]
        inside = (
            (pts[:, 0] > margin) & (pts[:, 0] < in_size[1] - 1 - margin) & (pts[:, 1] > margin) & (pts[:, 1] < in_size[0] - 1 - margin)
        ).reshape(out_size)
        assert inside.sum() > 0.2 * inside.size, "test parameters move the image too far out"
        diff = np.abs(ours[b, 0].numpy() - ref)[inside]
        assert diff.mean() < 1e-3, f"mean abs difference {diff.mean():.2e} against OpenCV"


@pytest.mark.parametrize("transform", MATRIX_FAMILIES, ids=IDS)
def test_from_pixels_inverts_to_pixels(transform):
    theta = random_theta(transform, 4, dtype=torch.float64)
    pixels = transform.to_pixels(theta, (30, 50), (20, 25))
    torch.testing.assert_close(transform.from_pixels(pixels, (30, 50), (20, 25)), theta)


@pytest.mark.parametrize("transform", MATRIX_FAMILIES, ids=IDS)
def test_compose_with_inverse_is_identity(transform):
    theta = random_theta(transform, 5, dtype=torch.float64)
    identity = transform.identity(5, dtype=torch.float64)
    torch.testing.assert_close(transform.compose(theta, transform.inverse(theta)), identity, atol=1e-10, rtol=0)
    torch.testing.assert_close(transform.compose(transform.inverse(theta), theta), identity, atol=1e-10, rtol=0)


@pytest.mark.parametrize("transform", MATRIX_FAMILIES, ids=IDS)
def test_compose_equals_warping_twice(transform):
    x = smooth_images(2, 1, 64, 64)
    first, second = random_theta(transform, 2, 0.5), random_theta(transform, 2, 0.5).flip(0)
    twice = stnkit.warp(stnkit.warp(x, first, transform), second, transform)
    once = stnkit.warp(x, transform.compose(first, second), transform)
    interior = (slice(None), slice(None), slice(12, -12), slice(12, -12))
    assert (twice - once)[interior].abs().mean() < 2e-3


@pytest.mark.parametrize("transform", MATRIX_FAMILIES, ids=IDS)
def test_matrix_round_trip(transform):
    theta = random_theta(transform, 3, dtype=torch.float64)
    torch.testing.assert_close(transform.from_matrix(transform.matrix(theta)), theta)


@pytest.mark.parametrize("transform", MATRIX_FAMILIES, ids=IDS)
def test_gradcheck_through_warp(transform):
    x = smooth_images(2, 2, 7, 6, dtype=torch.float64).requires_grad_()
    theta = random_theta(transform, 2, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, t_: stnkit.warp(x_, t_, transform, out_size=(5, 8)), (x, theta))


def test_conventions_closed_form():
    # Translation by half the normalised width moves content by a quarter of the image, leftwards.
    x = torch.zeros(1, 1, 4, 8)
    x[..., 6] = 1.0
    y = stnkit.warp(x, torch.tensor([[0.5, 0.0]]), "translation")
    assert y[0, 0, 0].argmax().item() == 4
    # A quarter turn maps output point (x, y) to input point (-y, x).
    m = Rotation().matrix(torch.tensor([[math.pi / 2, 0.0, 0.0]]))[0]
    torch.testing.assert_close(m @ torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0]), atol=1e-6, rtol=0)
    # Affine parameters read as F.affine_grid reads them.
    theta = torch.tensor([[0.9, 0.2, 0.1, -0.1, 1.1, 0.05]])
    ref = torch.nn.functional.affine_grid(theta.view(1, 2, 3), (1, 1, 9, 11), align_corners=False)
    torch.testing.assert_close(Affine().grid(theta, (9, 11)), ref, atol=1e-6, rtol=0)
    # A (B, 2, 3) tensor is accepted for Affine.
    torch.testing.assert_close(Affine().matrix(theta.view(1, 2, 3)), Affine().matrix(theta))


def test_homography_from_points_maps_points():
    src = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
    dst = src + torch.tensor([[[0.1, 0.0], [0.0, 0.2], [-0.1, 0.1], [0.05, -0.05]]], dtype=torch.float64)
    h = homography_from_points(src, dst)[0]
    mapped = torch.cat((src[0], torch.ones(4, 1, dtype=torch.float64)), 1) @ h.T
    torch.testing.assert_close(mapped[:, :2] / mapped[:, 2:], dst[0])


def test_corner_parametrisation_matches_matrix():
    corners, matrix = Projective("corners"), Projective("matrix")
    theta = random_theta(corners, 3, dtype=torch.float64)
    as_matrix = matrix.from_matrix(corners.matrix(theta))
    torch.testing.assert_close(matrix.grid(as_matrix, (10, 12)), corners.grid(theta, (10, 12)))


def test_get_transform_round_trips_config():
    for transform in MATRIX_FAMILIES:
        assert get_transform(transform.config()) == transform
    assert get_transform("attention") == ScaleTranslation()
    assert get_transform("homography") == Projective()


@pytest.mark.parametrize(
    "theta,error,match",
    [
        (torch.zeros(2, 5), ValueError, r"shape \(B, 6\), got \(2, 5\)"),
        (torch.zeros(6), ValueError, r"shape \(B, 6\)"),
        (torch.zeros(2, 6, dtype=torch.int64), TypeError, "floating-point"),
        (torch.tensor([[1.0, 0, float("nan"), 0, 1, 0]]), ValueError, "NaN or Inf"),
        ([1.0, 0, 0, 0, 1, 0], TypeError, "torch.Tensor"),
    ],
)
def test_bad_theta(theta, error, match):
    with pytest.raises(error, match=match):
        Affine().grid(theta, (4, 4))


def test_bad_sizes_and_names():
    with pytest.raises(ValueError, match="out_size must be a"):
        Affine().grid(Affine().identity(1), (4,))
    with pytest.raises(ValueError, match="positive"):
        Affine().grid(Affine().identity(1), (0, 4))
    with pytest.raises(ValueError, match="unknown transform 'bogus'"):
        get_transform("bogus")
    with pytest.raises(ValueError, match="parametrisation"):
        Projective("bogus")
    with pytest.raises(ValueError, match=r"\(B, 3, 3\)"):
        Affine().from_matrix(torch.eye(2).unsqueeze(0))


def test_compile_grid():
    compiled = torch.compile(Projective("corners").grid, fullgraph=True, backend="eager")
    theta = random_theta(Projective("corners"), 2)
    torch.testing.assert_close(compiled(theta, (6, 7)), Projective("corners").grid(theta, (6, 7)))
