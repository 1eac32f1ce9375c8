"""Classical (non-learned) image alignment baselines built on OpenCV.

Every method has the same signature, ``align_xxx(input, support, **options)``,
and returns the float64 3x3 ``support_pix_from_input_pix``: it maps an input
pixel ``(x, y, 1)`` to the support pixel with the same content (pixel centres
at integers), so ``cv2.warpPerspective(input, H, (W_support, H_support))``
aligns the input into the support's frame.

When a method fails (too few features, ECC does not converge, a degenerate
estimate) it returns the identity and emits an :class:`AlignmentFailedWarning`
that names the reason; :func:`run_classical` returns the same outcome as a
:class:`ClassicalResult` with ``ok=False`` and no warning, for benchmarks.

Methods (keys of :data:`CLASSICAL_METHODS`):

``identity``
    Do nothing: the error floor of the data.
``ecc``
    Single-scale ECC from the identity with 100 iterations, ``eps=1e-5`` and
    OpenCV's 5x5 Gaussian (OpenCV's default criteria stop too early).
``ecc_defaults``
    ECC with OpenCV's default criteria (50 iterations, ``eps=1e-3``): what a
    call without criteria gets.
``ecc_pyramid``
    An extra, tuned variant: 3-level coarse-to-fine ECC.
``orb_ransac``
    ORB (OpenCV defaults, 500 features), brute-force Hamming matching with
    cross-check, ``cv2.findHomography`` with RANSAC at 3 px.
``sift_ransac``
    SIFT (OpenCV defaults), Lowe's ratio test at 0.75, RANSAC at 3 px.
"""

from __future__ import annotations

import functools
import re
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from stnkit.data.images import to_gray_uint8
from stnkit.models.imaging import KeypointFit, fit_homography, orb_matches, sift_homography

__all__ = [
    "CLASSICAL_METHODS",
    "AlignmentFailedWarning",
    "ClassicalResult",
    "align_ecc",
    "align_ecc_defaults",
    "align_ecc_pyramid",
    "align_identity",
    "align_orb_ransac",
    "align_sift_ransac",
    "run_classical",
]


class AlignmentFailedWarning(UserWarning):
    """A classical method failed and returned the identity."""


class _Failure(Exception):
    """Raised inside an estimator; the message is the reason reported to the user."""


@dataclass(frozen=True)
class ClassicalResult:
    """Outcome of one classical alignment.

    Attributes
    ----------
    matrix : numpy.ndarray
        float64 3x3 ``support_pix_from_input_pix`` (the identity on failure).
    ok : bool
        Whether the method produced an estimate.
    reason : str
        Why it failed ("" when ``ok``).
    seconds : float
        Wall time of the call, input conversion included.
    """

    matrix: np.ndarray
    ok: bool
    reason: str
    seconds: float


# -------------------------------------------------------------- estimators
def _estimate_identity(input_image: np.ndarray, support: np.ndarray) -> np.ndarray:
    return np.eye(3)


def _ecc(support_f32: np.ndarray, input_f32: np.ndarray, warp: np.ndarray, iterations: int, eps: float,
         gauss_filter_size: int) -> np.ndarray:
    """One ECC run; returns ``input_pix_from_support_pix`` (ECC's warp maps template to input)."""
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, int(iterations), float(eps))
    try:
        _, warp = cv2.findTransformECC(
            support_f32, input_f32, warp.astype(np.float32), cv2.MOTION_HOMOGRAPHY, criteria, None, int(gauss_filter_size)
        )
    except cv2.error as exc:
        # ECC raises when it diverges ("images may be uncorrelated or non-overlapped").
        raise _Failure(f"ECC did not converge ({_cv2_message(exc)})") from None
    return warp.astype(np.float64)


def _estimate_ecc(
    input_image: np.ndarray, support: np.ndarray, *, iterations: int = 100, eps: float = 1e-5, gauss_filter_size: int = 5
) -> np.ndarray:
    # The template is the support: ECC then finds input_pix_from_support_pix,
    # the inverse of what we return.
    warp = _ecc(support.astype(np.float32), input_image.astype(np.float32), np.eye(3), iterations, eps, gauss_filter_size)
    return _invert(warp)


def _estimate_ecc_pyramid(
    input_image: np.ndarray,
    support: np.ndarray,
    *,
    levels: int = 3,
    iterations: int = 100,
    eps: float = 1e-5,
    gauss_filter_size: int = 5,
) -> np.ndarray:
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    inputs, supports = [input_image.astype(np.float32)], [support.astype(np.float32)]
    for _ in range(levels - 1):
        if min(inputs[-1].shape) < 16 or min(supports[-1].shape) < 16:
            break  # too small for ECC's gradients to mean anything
        inputs.append(cv2.pyrDown(inputs[-1]))
        supports.append(cv2.pyrDown(supports[-1]))
    # pyrDown puts coarse pixel centre i at fine 2i + 0.5 (pixel centres at integers).
    fine_from_coarse = np.array([[2.0, 0.0, 0.5], [0.0, 2.0, 0.5], [0.0, 0.0, 1.0]])
    warp = np.eye(3)  # input_pix_from_support_pix at the current level
    converged_once = False
    reasons = []
    for level in range(len(inputs) - 1, -1, -1):
        try:
            warp = _ecc(supports[level], inputs[level], warp, iterations, eps, gauss_filter_size)
            converged_once = True
        except _Failure as exc:
            reasons.append(f"level {level}: {exc}")  # keep the coarser estimate and refine on
        if level > 0:
            warp = fine_from_coarse @ warp @ np.linalg.inv(fine_from_coarse)
    if not converged_once:
        raise _Failure("; ".join(reasons))
    return _invert(warp)


def _fitted(fit: KeypointFit) -> np.ndarray:
    if fit.support_pix_from_input_pix is None:
        raise _Failure(fit.reason)
    return fit.support_pix_from_input_pix


def _estimate_orb_ransac(
    input_image: np.ndarray, support: np.ndarray, *, n_features: int = 500, ransac_threshold: float = 3.0
) -> np.ndarray:
    input_points, support_points, reason = orb_matches(input_image, support, n_features)
    if reason:
        raise _Failure(reason)
    return _fitted(fit_homography(input_points, support_points, ransac_threshold, "ORB"))


def _estimate_sift_ransac(
    input_image: np.ndarray, support: np.ndarray, *, ratio: float = 0.75, ransac_threshold: float = 3.0
) -> np.ndarray:
    return _fitted(sift_homography(input_image, support, ratio=ratio, ransac_threshold=ransac_threshold))


# ---------------------------------------------------------------- helpers
def _cv2_message(exc: cv2.error) -> str:
    """The useful part of an OpenCV error: "(-7:Iterations do not converge) NaN encountered." -> one short line."""
    text = " ".join(str(exc).split())
    match = re.search(r"error: \(-?\d+:([^)]*)\)\s*(.*?)(?: in function .*)?$", text)
    if match:
        return f"{match.group(1)}: {match.group(2)}".rstrip(": ")
    return text or type(exc).__name__


def _invert(matrix: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.inv(matrix)
    except np.linalg.LinAlgError:
        raise _Failure("the estimate is singular") from None


def _check_estimate(matrix: np.ndarray, input_shape: tuple[int, int]) -> np.ndarray:
    """Reject estimates that cannot be a view of the input: non-finite, singular, or folding it over the horizon."""
    if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
        raise _Failure("the estimate is not a finite 3x3 matrix")
    if abs(matrix[2, 2]) < 1e-12:
        raise _Failure("the estimate has h33 = 0")
    matrix = matrix / matrix[2, 2]
    height, width = input_shape
    corners = np.array([[-0.5, -0.5, 1], [width - 0.5, -0.5, 1], [width - 0.5, height - 0.5, 1], [-0.5, height - 0.5, 1]])
    if np.any(corners @ matrix[2] <= 1e-8):
        raise _Failure("the estimate maps part of the input to or beyond the horizon")
    if abs(np.linalg.det(matrix)) < 1e-10:
        raise _Failure("the estimate is singular")
    return matrix


def _prepare(input_image, support) -> tuple[np.ndarray, np.ndarray]:
    return to_gray_uint8(input_image, "input"), to_gray_uint8(support, "support")


def run_classical(method: str | Callable, input_image, support, **options) -> ClassicalResult:
    """Run one classical method and report success or failure without warnings.

    Parameters
    ----------
    method : str or callable
        A key of :data:`CLASSICAL_METHODS` or one of its values.
    input_image, support : array-like or torch.Tensor
        Greyscale or RGB images; uint8, or float intensities in ``[0, 1]``.
    **options
        Passed to the method (e.g. ``iterations=100`` for ECC).

    Returns
    -------
    ClassicalResult

    Examples
    --------
    >>> blank = np.zeros((64, 64), np.uint8)
    >>> result = run_classical("sift_ransac", blank, blank)
    >>> result.ok, result.matrix.tolist() == np.eye(3).tolist()
    (False, True)
    """
    estimator = _resolve(method)
    start = time.perf_counter()
    input_u8, support_u8 = _prepare(input_image, support)
    try:
        matrix = _check_estimate(estimator(input_u8, support_u8, **options), input_u8.shape)
        ok, reason = True, ""
    except _Failure as exc:
        matrix, ok, reason = np.eye(3), False, str(exc)
    return ClassicalResult(matrix, ok, reason, time.perf_counter() - start)


def _resolve(method: str | Callable) -> Callable:
    if isinstance(method, str):
        if method not in CLASSICAL_METHODS:
            raise ValueError(f"unknown classical method {method!r}; expected one of {sorted(CLASSICAL_METHODS)}")
        return _ESTIMATORS[method]
    for name, public in CLASSICAL_METHODS.items():
        if method is public or method is _ESTIMATORS[name]:
            return _ESTIMATORS[name]
    raise TypeError(f"method must be a name or a function of CLASSICAL_METHODS, got {method!r}")


def _public(name: str, input_image, support, options: dict) -> np.ndarray:
    result = run_classical(name, input_image, support, **options)
    if not result.ok:
        warnings.warn(f"{name} failed, returning the identity: {result.reason}", AlignmentFailedWarning, stacklevel=3)
    return result.matrix


# ------------------------------------------------------------ public API
def align_identity(input_image, support) -> np.ndarray:
    """The identity: the score of doing nothing.

    Examples
    --------
    >>> align_identity(np.zeros((8, 8)), np.zeros((8, 8))).tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    return _public("identity", input_image, support, {})


def align_ecc(
    input_image, support, *, iterations: int = 100, eps: float = 1e-5, gauss_filter_size: int = 5
) -> np.ndarray:
    """Single-scale ECC (``cv2.findTransformECC``, homography motion) started from the identity.

    Parameters
    ----------
    input_image, support : array-like
        Images (greyscale or RGB; uint8 or float in ``[0, 1]``).
    iterations, eps : int, float
        Termination criteria. OpenCV's defaults (50, 1e-3; see
        :func:`align_ecc_defaults`) stop while the warp is still far off on
        128 px patches, so this uses 100 iterations and 1e-5.
    gauss_filter_size : int
        Size of the Gaussian applied to both images first (OpenCV's default: 5).

    Returns
    -------
    numpy.ndarray
        float64 3x3 ``support_pix_from_input_pix``; the identity on failure.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> texture = cv2.GaussianBlur(rng.random((96, 96)).astype(np.float32), (0, 0), 3)
    >>> texture = (texture - texture.min()) / np.ptp(texture)
    >>> shifted = np.roll(texture, 2, axis=1)  # content moves right by 2 px
    >>> H = align_ecc(shifted, texture)
    >>> round(float(H[0, 2]))  # input pixel x lies at support pixel x - 2
    -2
    """
    return _public("ecc", input_image, support, {"iterations": iterations, "eps": eps, "gauss_filter_size": gauss_filter_size})


def align_ecc_defaults(input_image, support) -> np.ndarray:
    """ECC exactly as ``cv2.findTransformECC`` runs without criteria: 50 iterations, eps 1e-3, 5x5 Gaussian.

    What a user gets from OpenCV's defaults; kept as a baseline row.

    Examples
    --------
    >>> image = np.zeros((64, 64), np.uint8)
    >>> with warnings.catch_warnings(record=True) as caught:  # blank: fails, identity
    ...     warnings.simplefilter("always")
    ...     H = align_ecc_defaults(image, image)
    >>> H.shape, caught[0].category.__name__
    ((3, 3), 'AlignmentFailedWarning')
    """
    return _public("ecc_defaults", input_image, support, {})


def align_ecc_pyramid(
    input_image, support, *, levels: int = 3, iterations: int = 100, eps: float = 1e-5, gauss_filter_size: int = 5
) -> np.ndarray:
    """Coarse-to-fine ECC: ``levels`` pyramid levels (``cv2.pyrDown``), each refining the last.

    A tuned variant, not OpenCV's default: the coarse levels widen the basin
    of convergence for large displacements. A level that fails keeps the
    coarser estimate; the method fails only if every level does.

    Examples
    --------
    >>> image = np.zeros((64, 64), np.uint8)
    >>> with warnings.catch_warnings(record=True) as caught:  # blank: fails, identity
    ...     warnings.simplefilter("always")
    ...     H = align_ecc_pyramid(image, image)
    >>> H.shape, caught[0].category.__name__
    ((3, 3), 'AlignmentFailedWarning')
    """
    options = {"levels": levels, "iterations": iterations, "eps": eps, "gauss_filter_size": gauss_filter_size}
    return _public("ecc_pyramid", input_image, support, options)


def align_orb_ransac(input_image, support, *, n_features: int = 500, ransac_threshold: float = 3.0) -> np.ndarray:
    """ORB features, brute-force Hamming matching with cross-check, RANSAC homography.

    Examples
    --------
    >>> image = np.zeros((64, 64), np.uint8)
    >>> with warnings.catch_warnings(record=True) as caught:  # no features: fails, identity
    ...     warnings.simplefilter("always")
    ...     H = align_orb_ransac(image, image)
    >>> H.tolist() == np.eye(3).tolist(), caught[0].category.__name__
    (True, 'AlignmentFailedWarning')
    """
    return _public("orb_ransac", input_image, support, {"n_features": n_features, "ransac_threshold": ransac_threshold})


def align_sift_ransac(input_image, support, *, ratio: float = 0.75, ransac_threshold: float = 3.0) -> np.ndarray:
    """SIFT features, Lowe's ratio test, RANSAC homography.

    Examples
    --------
    >>> image = np.zeros((64, 64), np.uint8)
    >>> with warnings.catch_warnings(record=True) as caught:  # no features: fails, identity
    ...     warnings.simplefilter("always")
    ...     H = align_sift_ransac(image, image)
    >>> H.tolist() == np.eye(3).tolist(), caught[0].category.__name__
    (True, 'AlignmentFailedWarning')
    """
    return _public("sift_ransac", input_image, support, {"ratio": ratio, "ransac_threshold": ransac_threshold})


_ESTIMATORS: dict[str, Callable[..., np.ndarray]] = {
    "identity": _estimate_identity,
    "ecc": _estimate_ecc,
    "ecc_defaults": functools.partial(_estimate_ecc, iterations=50, eps=1e-3, gauss_filter_size=5),
    "ecc_pyramid": _estimate_ecc_pyramid,
    "orb_ransac": _estimate_orb_ransac,
    "sift_ransac": _estimate_sift_ransac,
}

#: Method name -> ``align_xxx(input, support, **options) -> support_pix_from_input_pix``.
CLASSICAL_METHODS: dict[str, Callable[..., np.ndarray]] = {
    "identity": align_identity,
    "ecc": align_ecc,
    "ecc_defaults": align_ecc_defaults,
    "ecc_pyramid": align_ecc_pyramid,
    "orb_ransac": align_orb_ransac,
    "sift_ransac": align_sift_ransac,
}
