"""Tests of stnkit.evaluation.metrics and stnkit.evaluation.classical."""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
import pytest
import torch

from stnkit.data.images import builtin_photos
from stnkit.data.pairs import make_benchmark_pairs, patch_corners
from stnkit.evaluation.classical import (
    CLASSICAL_METHODS,
    AlignmentFailedWarning,
    ClassicalResult,
    align_ecc,
    align_sift_ransac,
    run_classical,
)
from stnkit.evaluation.metrics import mace, summarise


def translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def easy_pairs():
    """rho=8 HomographyNet pairs from textured held-out photos (astronaut, chelsea, coffee, coins)."""
    return make_benchmark_pairs(builtin_photos("heldout")[:4], 4, rho=8, seed=1)


# ------------------------------------------------------------------- MACE
def test_mace_closed_form_cases():
    assert mace(np.eye(3), translation(3, 4), 128) == 5.0
    assert mace(translation(3, 4), np.eye(3), (64, 32)) == 5.0
    assert mace(np.eye(3), np.eye(3), 128) == 0.0
    # A 2x scale about the origin: corners at the pixel edges (-0.5 .. 3.5) of a 4x4 patch.
    scale = np.diag([2.0, 2.0, 1.0])
    expected = np.linalg.norm(patch_corners(4), axis=1).mean()
    assert mace(scale, np.eye(3), 4) == pytest.approx(expected)
    # The scale of a homography does not matter, nor its sign.
    assert mace(-7 * translation(3, 4), translation(3, 4), 16) == pytest.approx(0.0, abs=1e-12)


def test_mace_is_vectorised_and_accepts_tensors_and_corners():
    pred = np.stack([np.eye(3), translation(3, 4), translation(-6, 8)])
    errors = mace(pred, np.eye(3), 128)
    assert isinstance(errors, np.ndarray) and errors.tolist() == [0.0, 5.0, 10.0]
    errors_t = mace(torch.tensor(pred, dtype=torch.float32), torch.eye(3), 128)
    np.testing.assert_allclose(errors_t, [0.0, 5.0, 10.0], atol=1e-5)
    assert mace(translation(3, 4), np.eye(3), corners=np.zeros((1, 2))) == 5.0


def test_mace_scores_degenerate_predictions_as_inf():
    horizon = np.array([[1.0, 0, 0], [0, 1, 0], [-0.02, 0, 1]])  # w <= 0 for x >= 50
    assert math.isinf(mace(horizon, np.eye(3), 128))
    assert math.isinf(mace(np.full((3, 3), np.nan), np.eye(3), 128))


def test_mace_argument_errors():
    with pytest.raises(ValueError, match="exactly one of patch_size and corners"):
        mace(np.eye(3), np.eye(3))
    with pytest.raises(ValueError, match="exactly one of patch_size and corners"):
        mace(np.eye(3), np.eye(3), 128, corners=np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"pred must have shape \(3, 3\) or \(B, 3, 3\), got \(2, 2\)"):
        mace(np.eye(2), np.eye(3), 128)
    with pytest.raises(ValueError, match="matching batch shapes"):
        mace(np.stack([np.eye(3)] * 2), np.stack([np.eye(3)] * 3), 128)


def test_summarise():
    summary = summarise([1.0, 3.0, 20.0, math.inf], [0.001, 0.002, 0.003, 0.006])
    assert summary["n"] == 4
    assert summary["median"] == 11.5
    assert summary["share_above"] == 0.5
    assert math.isinf(summary["mean"])
    assert summary["ms_per_pair"] == pytest.approx(3.0)
    assert math.isnan(summarise([1.0])["ms_per_pair"])
    with pytest.raises(ValueError, match="NaN"):
        summarise([1.0, math.nan])
    with pytest.raises(ValueError, match="one value per error: expected 2, got 1"):
        summarise([1.0, 2.0], [0.1])
    with pytest.raises(ValueError, match="empty"):
        summarise([])


# ------------------------------------------------------------ classical
def test_registry_has_every_method_with_one_signature():
    assert set(CLASSICAL_METHODS) == {"identity", "ecc", "ecc_defaults", "ecc_pyramid", "orb_ransac", "sift_ransac"}
    image = builtin_photos("heldout")[0][1]
    for name, method in CLASSICAL_METHODS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AlignmentFailedWarning)
            matrix = method(image[:96, :96], image[:96, :96])
        assert matrix.shape == (3, 3) and matrix.dtype == np.float64, name


def test_ecc_and_sift_recover_an_easy_homography(easy_pairs):
    for pair in easy_pairs:
        truth = pair.support_pix_from_input_pix
        assert mace(np.eye(3), truth, 128) > 3  # the task is not trivial
        assert mace(align_ecc(pair.input, pair.support), truth, 128) < 1.0, pair.name
    # SIFT is sub-pixel on the textured ones (coffee's smooth patch is left out).
    for pair in (easy_pairs[0], easy_pairs[1], easy_pairs[3]):
        assert mace(align_sift_ransac(pair.input, pair.support), pair.support_pix_from_input_pix, 128) < 1.0, pair.name


def test_ecc_pyramid_recovers_an_easy_homography(easy_pairs):
    pair = easy_pairs[0]
    result = run_classical("ecc_pyramid", pair.input, pair.support)
    assert result.ok and mace(result.matrix, pair.support_pix_from_input_pix, 128) < 1.0


def test_direction_matches_the_library_convention():
    # The input shows the support's content 3 px to the right and 2 px down:
    # input pixel (x, y) lies at support pixel (x - 3, y - 2).
    image = builtin_photos("heldout")[0][1]
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    support = gray[100:228, 100:228]
    input_image = gray[98:226, 97:225]
    truth = translation(-3, -2)
    for name in ("ecc", "sift_ransac"):
        result = run_classical(name, input_image, support)
        assert result.ok and mace(result.matrix, truth, 128) < 0.3, name


@pytest.mark.parametrize("name", ["ecc", "ecc_defaults", "ecc_pyramid", "orb_ransac", "sift_ransac"])
def test_failure_falls_back_to_identity_and_is_reported(name):
    blank = np.zeros((128, 128), np.uint8)
    with pytest.warns(AlignmentFailedWarning, match=f"{name} failed, returning the identity"):
        matrix = CLASSICAL_METHODS[name](blank, blank)
    assert np.array_equal(matrix, np.eye(3))
    result = run_classical(name, blank, blank)
    assert isinstance(result, ClassicalResult)
    assert not result.ok and result.reason and "\n" not in result.reason
    assert np.array_equal(result.matrix, np.eye(3)) and result.seconds >= 0


def test_run_classical_accepts_float_and_tensor_images_and_checks_inputs(easy_pairs):
    pair = easy_pairs[0]
    as_float = run_classical("ecc", pair.input / 255.0, torch.from_numpy(pair.support / 255.0)[None])
    assert as_float.ok and mace(as_float.matrix, pair.support_pix_from_input_pix, 128) < 1.0
    with pytest.raises(ValueError, match="unknown classical method 'surf'"):
        run_classical("surf", pair.input, pair.support)
    with pytest.raises(ValueError, match=r"input must have shape"):
        run_classical("ecc", np.zeros((4, 4, 2)), pair.support)
    with pytest.raises(TypeError, match="support must be a numeric image"):
        run_classical("ecc", pair.input, np.zeros((4, 4), bool))
