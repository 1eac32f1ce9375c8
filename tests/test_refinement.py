"""Photometric refinement of an alignment (stnkit.models.refinement) and Aligner.align(refine=True)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from stnkit.data.images import builtin_photos
from stnkit.data.pairs import make_benchmark_pairs
from stnkit.evaluation.metrics import mace
from stnkit.models.aligner import Aligner
from stnkit.models.refinement import candidate_matrices, corner_update, ncc_score, refine_alignment
from stnkit.transforms import Projective
from stnkit.transforms.base import norm_from_pix, pix_from_norm


def _views(pair) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float views of a benchmark pair and its true input_norm_from_support_norm."""
    to_tensor = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)[None, None]  # noqa: E731
    truth = norm_from_pix(pair.input.shape[:2]) @ torch.from_numpy(np.linalg.inv(pair.support_pix_from_input_pix)) \
        @ pix_from_norm(pair.support.shape[:2])
    return to_tensor(pair.input), to_tensor(pair.support), truth / truth[2, 2]


def _mace(pair, matrix: torch.Tensor) -> float:
    input_pix_from_support_pix = pix_from_norm(pair.input.shape[:2]) @ matrix @ norm_from_pix(pair.support.shape[:2])
    estimate = np.linalg.inv(input_pix_from_support_pix.numpy())
    return float(mace(estimate[None], pair.support_pix_from_input_pix[None], 128)[0])


@pytest.fixture(scope="module")
def pairs():
    return make_benchmark_pairs(builtin_photos("heldout"), 6, rho=12, seed=3)


def test_corner_update_is_the_corners_parametrisation():
    d = torch.tensor([0.1, -0.05, 0.02, 0.03, -0.04, 0.0, 0.05, 0.01], dtype=torch.float64)
    torch.testing.assert_close(corner_update(d), Projective("corners").matrix(d[None])[0])
    torch.testing.assert_close(corner_update(torch.zeros(8, dtype=torch.float64)), torch.eye(3, dtype=torch.float64))


def test_ncc_score_known_cases():
    image = torch.rand(1, 1, 24, 24, dtype=torch.float64)
    assert ncc_score(image, image, torch.eye(3, dtype=torch.float64))[0] == pytest.approx(1.0)
    assert ncc_score(image, 1.0 - image, torch.eye(3, dtype=torch.float64))[0] == pytest.approx(-1.0)
    # A support corner beyond the horizon is not an alignment.
    horizon = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [2.0, 0, 1.0]], dtype=torch.float64)
    assert ncc_score(image, image, horizon) == (-1.0, 0.0)
    # Too little overlap scores -1.
    far = torch.tensor([[1.0, 0, 1.9], [0, 1.0, 0], [0, 0, 1.0]], dtype=torch.float64)
    assert ncc_score(image, image, far, min_overlap=0.5)[0] == -1.0


def test_refinement_recovers_a_known_homography_to_subpixel(pairs):
    errors = []
    for pair in pairs:
        input_view, support_view, truth = _views(pair)
        start = _mace(pair, torch.eye(3, dtype=torch.float64))
        result = refine_alignment(input_view, support_view, torch.eye(3, dtype=torch.float64),
                                  levels=(0.25, 0.5, 1.0), iterations=(15, 10, 6))
        errors.append((start, _mace(pair, result.matrix), result.ncc))
    starts, finals, nccs = zip(*errors)
    assert np.mean(starts) > 5.0  # the identity is far off ...
    assert np.median(finals) < 0.5  # ... refinement lands within half a pixel on most pairs
    assert sum(f < 1.0 for f in finals) >= 4, errors
    assert all(n > 0.9 for f, n in zip(finals, nccs) if f < 1.0)


def test_the_best_correlated_start_wins(pairs):
    input_view, support_view, truth = _views(pairs[0])
    wrong = torch.tensor([[0.6, 0.3, 0.5], [-0.3, 0.6, -0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    result = refine_alignment(input_view, support_view, {"wrong": wrong, "near": truth @ corner_update(torch.full((8,), 0.03))})
    assert result.start == "near" and _mace(pairs[0], result.matrix) < 0.5


def test_candidates_include_the_network_search_and_identity(pairs):
    input_view, support_view, _ = _views(pairs[0])
    names = list(candidate_matrices(input_view, support_view, torch.eye(3, dtype=torch.float64)))
    assert names[0] == "network" and names[-1] == "identity" and "search1" in names
    assert "features" in names  # this textured photo gives SIFT enough inliers


def test_bad_input_is_a_clear_error():
    eye = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="input must be a .1, 1, H, W. tensor"):
        refine_alignment(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 8), eye)
    with pytest.raises(ValueError, match="same non-zero length"):
        refine_alignment(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), eye, levels=(0.5, 1.0), iterations=(3,))
    with pytest.raises(ValueError, match="no finite starting matrix"):
        refine_alignment(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), {"nan": torch.full((3, 3), float("nan"))})


def test_aligner_align_refines_and_stays_consistent(pairs):
    # An untrained projective aligner: the refinement alone must align the pair.
    torch.manual_seed(0)
    aligner = Aligner("projective", size=(64, 64), channels=(8, 8), iterations=1).eval()
    pair = pairs[1]
    support = cv2.resize(pair.support, (160, 120))  # a different size from the input
    plain = aligner.align(pair.input, support, refine=False)
    refined = aligner.align(pair.input, support, refine=True)
    assert plain.ncc is None and refined.ncc is not None and refined.start is not None
    scale = np.diag([160 / 128, 120 / 128, 1.0])
    truth = scale @ pair.support_pix_from_input_pix
    corners = np.array([[0, 0, 1], [127, 0, 1], [127, 127, 1], [0, 127, 1]], dtype=np.float64).T

    def corner_error(matrix):
        a, b = matrix @ corners, truth @ corners
        return float(np.linalg.norm(a[:2] / a[2] - b[:2] / b[2], axis=0).mean())

    assert corner_error(refined.matrix) < 1.5 < corner_error(plain.matrix)
    expected = cv2.warpPerspective(pair.input, refined.matrix, (160, 120), flags=cv2.INTER_LINEAR)
    assert np.abs(expected.astype(int) - refined.image.astype(int)).max() <= 1
