"""Image pairs with known geometry, for training and benchmarking aligners.

Two generators live here:

* :func:`homographynet_pair` / :func:`make_benchmark_pairs` follow the data
  protocol of DeTone, Malisiewicz and Rabinovich (2016), "Deep Image
  Homography Estimation": the evaluation pairs of ``benchmarks/align.py``.
* :func:`random_pair` / :func:`batch_pairs` draw self-supervised training pairs
  for an aligner from affine, projective or thin-plate-spline warps, with
  independent photometric jitter on the two images.

Convention
----------
Pixel coordinates put the centre of the top-left pixel at ``(0, 0)``, ``x``
to the right and ``y`` down. The ground-truth matrix of a pair,
``support_pix_from_input_pix``, maps an *input* pixel ``(x, y, 1)`` to the
*support* pixel where the same content lies, so
``cv2.warpPerspective(pair.input, H, (W_support, H_support))`` aligns the
input into the support's frame. Patch corners are the outer pixel *edges*,
``(-0.5, -0.5)`` to ``(W - 0.5, H - 0.5)`` (``-1``/``+1`` in the library's
normalised coordinates), listed top-left, top-right, bottom-right,
bottom-left. Sizes are ``(height, width)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np
import torch

from .images import to_gray_uint8

__all__ = [
    "HomographyPair",
    "PairBatch",
    "PhotometricRanges",
    "TrainingPair",
    "WarpRanges",
    "batch_pairs",
    "homography_from_corners",
    "homographynet_pair",
    "make_benchmark_pairs",
    "patch_corners",
    "random_pair",
    "transform_points",
]

FAMILIES = ("affine", "projective", "tps")

RngLike = np.random.Generator | int | None


# ----------------------------------------------------------------- geometry
def patch_corners(size: int | Sequence[int]) -> np.ndarray:
    """The 4 corners of a patch in pixel coordinates: its outer pixel edges.

    Parameters
    ----------
    size : int or (height, width)
        Patch size; an int means a square patch.

    Returns
    -------
    numpy.ndarray
        ``(4, 2)`` float64 ``(x, y)`` points: top-left, top-right, bottom-right,
        bottom-left.

    Examples
    --------
    >>> patch_corners(128).tolist()
    [[-0.5, -0.5], [127.5, -0.5], [127.5, 127.5], [-0.5, 127.5]]
    """
    height, width = _check_size(size, "size")
    left, top, right, bottom = -0.5, -0.5, width - 0.5, height - 0.5
    return np.array([[left, top], [right, top], [right, bottom], [left, bottom]], dtype=np.float64)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map ``(..., N, 2)`` points through ``(..., 3, 3)`` homographies.

    Points mapped to the line at infinity (``w == 0``) come out as ``inf``/``nan``;
    callers that care check ``w`` themselves.

    Examples
    --------
    >>> shift = np.array([[1.0, 0, 3], [0, 1, 4], [0, 0, 1]])
    >>> transform_points(shift, np.zeros((1, 2))).tolist()
    [[3.0, 4.0]]
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    points = np.asarray(points, dtype=np.float64)
    homogeneous = np.concatenate([points, np.ones(points.shape[:-1] + (1,))], axis=-1)
    mapped = homogeneous @ np.swapaxes(matrix, -1, -2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return mapped[..., :2] / mapped[..., 2:]


def homography_from_corners(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The float64 3x3 homography (``h33 = 1``) that maps 4 points ``src`` onto ``dst``.

    Solved directly in float64 (``cv2.getPerspectiveTransform`` insists on
    float32 points, which would make the ground truth and the corners
    disagree by ~1e-5 px).

    Parameters
    ----------
    src, dst : numpy.ndarray
        ``(4, 2)`` points, no three of either collinear.

    Examples
    --------
    >>> square = patch_corners(2)
    >>> (homography_from_corners(square, square + [3.0, 4.0]).round(12) + 0.0).tolist()
    [[1.0, 0.0, 3.0], [0.0, 1.0, 4.0], [0.0, 0.0, 1.0]]
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != (4, 2) or dst.shape != (4, 2):
        raise ValueError(f"src and dst must both have shape (4, 2), got {src.shape} and {dst.shape}")
    x, y = src[:, 0], src[:, 1]
    u, v = dst[:, 0], dst[:, 1]
    one, zero = np.ones(4), np.zeros(4)
    system = np.concatenate(
        [
            np.stack([x, y, one, zero, zero, zero, -u * x, -u * y], axis=1),
            np.stack([zero, zero, zero, x, y, one, -v * x, -v * y], axis=1),
        ]
    )
    try:
        h = np.linalg.solve(system, np.concatenate([u, v]))
    except np.linalg.LinAlgError:
        raise ValueError("points are degenerate (three of them collinear): no homography maps src onto dst") from None
    return np.append(h, 1.0).reshape(3, 3)


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 affine matrix (last row exactly ``[0, 0, 1]``) mapping 3 points onto 3 points."""
    system = np.concatenate([src, np.ones((3, 1))], axis=1)
    rows = np.linalg.solve(system, dst).T  # (2, 3)
    return np.vstack([rows, [0.0, 0.0, 1.0]])


def _translation(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


# ---------------------------------------------------------- validation
def _check_size(size: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {size!r}")
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size):
        raise TypeError(f"{name} must hold integers, got {size!r}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"{name} must be positive, got {tuple(size)!r}")
    return int(size[0]), int(size[1])


def _check_nonnegative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_range(value: Sequence[float], name: str, *, low: float = -math.inf) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    lo, hi = (float(v) for v in value)
    if not (low <= lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"{name} must satisfy {low} <= min <= max < inf, got {value!r}")
    return lo, hi


def _unpack_images(images: Sequence) -> list[np.ndarray]:
    """Accept a list of arrays or of ``(name, array)`` pairs (what :func:`builtin_photos` returns)."""
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError("images must be a non-empty list of arrays or (name, array) pairs")
    return [item[1] if isinstance(item, tuple) else item for item in images]


# ----------------------------------------------------------- HomographyNet
@dataclass
class HomographyPair:
    """One HomographyNet-protocol pair.

    Attributes
    ----------
    input : numpy.ndarray
        uint8 ``(patch, patch)``: the patch cut from the warped image; the one to align.
    support : numpy.ndarray
        uint8 ``(patch, patch)``: the patch cut from the original image.
    corner_offsets : numpy.ndarray
        ``(4, 2)`` float64: where the input's corners land in the support's
        frame, minus the corners (the paper's 4-point label ``H_4pt``).
    support_pix_from_input_pix : numpy.ndarray
        ``(3, 3)`` float64 ground truth in the library's convention.
    origin : tuple of int
        ``(x, y)`` of the patch's top-left pixel in the resized image.
    """

    input: np.ndarray
    support: np.ndarray
    corner_offsets: np.ndarray
    support_pix_from_input_pix: np.ndarray
    origin: tuple[int, int] = (0, 0)
    name: str = ""

    @property
    def corners(self) -> np.ndarray:
        """The input patch's corners (see :func:`patch_corners`)."""
        return patch_corners(self.input.shape)


def _sample_corner_offsets(rng: np.random.Generator, rho: float, affine_only: bool) -> np.ndarray:
    if not affine_only:
        return rng.uniform(-rho, rho, size=(4, 2))
    # Affine: draw top-left, top-right and bottom-left, derive bottom-right so
    # the four form a parallelogram, and redraw until it too is within rho
    # (about 45% of draws pass). The result is uniform over the affine maps
    # whose four corner offsets all lie in [-rho, rho], so it keeps the corner
    # bound (and hence the crop margin) of the projective protocol.
    while True:
        tl, tr, bl = rng.uniform(-rho, rho, size=(3, 2))
        br = tr + bl - tl
        if np.all(np.abs(br) <= rho):
            return np.array([tl, tr, br, bl])


def _prepare_homographynet_image(image, size: tuple[int, int]) -> np.ndarray:
    gray = to_gray_uint8(image)
    height, width = size
    if gray.shape == (height, width):
        return gray
    shrinking = gray.shape[0] > height or gray.shape[1] > width
    return cv2.resize(gray, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def _check_homographynet_args(rho: float, patch: int, size) -> tuple[float, int, tuple[int, int]]:
    rho = _check_nonnegative(rho, "rho")
    patch = _check_size(patch, "patch")[0]
    size = _check_size(size, "size")
    if rho >= patch / 2:
        raise ValueError(f"rho must be below patch / 2 = {patch / 2} so the perturbed corners cannot cross, got {rho}")
    margin = math.ceil(rho)
    for extent, axis in zip(size, ("height", "width")):
        if extent < patch + 2 * margin:
            raise ValueError(
                f"image {axis} {extent} is too small for patch={patch} with rho={rho}: "
                f"expected at least patch + 2 * ceil(rho) = {patch + 2 * margin}"
            )
    return rho, patch, size


def _homographynet_from_prepared(
    gray: np.ndarray, rho: float, patch: int, rng: np.random.Generator, affine_only: bool, name: str = ""
) -> HomographyPair:
    height, width = gray.shape
    margin = math.ceil(rho)
    # Margin rho on every side keeps every perturbed corner inside the image,
    # so the input patch never samples outside it (the paper's construction).
    x0 = int(rng.integers(margin, width - patch - margin + 1))
    y0 = int(rng.integers(margin, height - patch - margin + 1))
    corners = patch_corners(patch)
    offsets = _sample_corner_offsets(rng, rho, affine_only)
    if affine_only:
        # From three points, so the last row is exactly [0, 0, 1].
        keep = [0, 1, 3]
        support_pix_from_input_pix = _affine_from_points(corners[keep], corners[keep] + offsets[keep])
    else:
        support_pix_from_input_pix = homography_from_corners(corners, corners + offsets)
    # The paper crops patch A at p from the image, warps the image by H_AB^-1
    # and crops patch B at p. B's pixel u shows the image at H_AB (u + p), i.e.
    # A's pixel H_AB (u + p) - p: B is our input, A our support, and
    # support_pix_from_input_pix = T(-p) H_AB T(p) takes the input corners to
    # the perturbed corners. Sampling B straight from the image with that map
    # avoids warping the whole image.
    image_pix_from_input_pix = _translation(x0, y0) @ support_pix_from_input_pix
    input_patch = cv2.warpPerspective(
        gray, image_pix_from_input_pix, (patch, patch), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    support_patch = gray[y0 : y0 + patch, x0 : x0 + patch].copy()
    corner_offsets = transform_points(support_pix_from_input_pix, corners) - corners
    return HomographyPair(input_patch, support_patch, corner_offsets, support_pix_from_input_pix, (x0, y0), name)


def homographynet_pair(
    image: np.ndarray,
    rho: float = 32,
    patch: int = 128,
    size: int | Sequence[int] = (240, 320),
    rng: RngLike = None,
    affine_only: bool = False,
) -> HomographyPair:
    """Draw one pair following DeTone et al. (2016), "Deep Image Homography Estimation".

    The image is made greyscale and resized to ``size`` (320x240, i.e.
    ``(height, width) = (240, 320)``, as in the paper); a ``patch`` x ``patch``
    support patch is cut at a random position at least ``rho`` pixels from
    every border; each of its 4 corners is moved by an offset drawn uniformly
    from ``[-rho, rho]`` in x and y; the input patch is cut from the image
    warped so that the input's corners land on the moved corners.

    Parameters
    ----------
    image : numpy.ndarray
        Greyscale or RGB image, uint8 or float in ``[0, 1]``.
    rho : float, default 32
        Largest corner offset in pixels (must be below ``patch / 2``).
    patch : int, default 128
        Side of the square patches.
    size : (height, width), default (240, 320)
        Size the image is resized to first.
    rng : numpy.random.Generator, int or None
        Source of randomness (a seed makes the pair reproducible).
    affine_only : bool, default False
        Draw an affine map instead: three corner offsets are drawn as above,
        the fourth is implied (parallelogram) and the draw is repeated until it
        also lies within ``rho``. The matrix's last row is exactly ``[0, 0, 1]``.

    Returns
    -------
    HomographyPair
        uint8 ``input`` and ``support`` patches and the ground truth
        ``support_pix_from_input_pix``, such that
        ``cv2.warpPerspective(pair.input, H, (patch, patch))`` matches
        ``pair.support`` wherever the warped input has content.

    Examples
    --------
    >>> image = np.random.default_rng(0).integers(0, 256, (300, 400), dtype=np.uint8)
    >>> pair = homographynet_pair(image, rho=16, rng=0)
    >>> pair.input.shape, pair.support.shape, pair.support_pix_from_input_pix.shape
    ((128, 128), (128, 128), (3, 3))
    >>> bool(np.abs(pair.corner_offsets).max() <= 16)
    True
    """
    rho, patch, size = _check_homographynet_args(rho, patch, size)
    gray = _prepare_homographynet_image(image, size)
    return _homographynet_from_prepared(gray, rho, patch, np.random.default_rng(rng), bool(affine_only))


def make_benchmark_pairs(
    images: Sequence,
    n: int,
    rho: float = 32,
    seed: int = 0,
    affine_only: bool = False,
    *,
    patch: int = 128,
    size: int | Sequence[int] = (240, 320),
) -> list[HomographyPair]:
    """A deterministic list of ``n`` HomographyNet-protocol pairs.

    Pair ``i`` uses image ``i % len(images)`` (so every image is used equally)
    and its own generator seeded with ``(seed, i)``: the same arguments always
    give the same pairs, and the first ``k`` pairs of a longer run equal those
    of a run with ``n = k``.

    Parameters
    ----------
    images : list of numpy.ndarray or of (name, numpy.ndarray)
        Source images, e.g. ``builtin_photos("heldout")``.
    n : int
        Number of pairs.
    rho, affine_only, patch, size
        As in :func:`homographynet_pair`.
    seed : int
        Seed of the whole list.

    Examples
    --------
    >>> from stnkit.data.images import builtin_photos
    >>> pairs = make_benchmark_pairs(builtin_photos("heldout"), 4, rho=32, seed=0)
    >>> [p.name for p in pairs]
    ['astronaut#0', 'chelsea#1', 'coffee#2', 'coins#3']
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    rho, patch, size = _check_homographynet_args(rho, patch, size)
    arrays = _unpack_images(images)
    names = [item[0] if isinstance(item, tuple) else f"image{k}" for k, item in enumerate(images)]
    prepared = [_prepare_homographynet_image(image, size) for image in arrays]
    pairs = []
    for i in range(n):
        k = i % len(prepared)
        rng = np.random.default_rng((int(seed), i))
        pairs.append(_homographynet_from_prepared(prepared[k], rho, patch, rng, bool(affine_only), f"{names[k]}#{i}"))
    return pairs


# ------------------------------------------------------- training pairs
@dataclass(frozen=True)
class WarpRanges:
    """Ranges of the random warps drawn by :func:`random_pair`.

    All draws are uniform. The warp maps a support pixel to the input pixel
    that shows the same content and is built about the patch centre.

    Attributes
    ----------
    rotation : float
        Degrees, drawn from ``[-rotation, rotation]``.
    scale : (float, float)
        Isotropic scale, drawn log-uniformly from ``[min, max]``.
    shear : float
        Shear angle in degrees, drawn from ``[-shear, shear]``.
    translation : float
        Fraction of the patch width/height, drawn per axis from ``[-t, t]``.
    corner : float
        ``"projective"`` only: each patch corner is further moved by up to this
        fraction of the patch size per axis (HomographyNet's ``rho / patch``).
    tps_offset : float
        ``"tps"`` only: each control point is further moved by up to this
        fraction of the patch size per axis.
    tps_grid : int
        ``"tps"`` only: control points form a ``tps_grid`` x ``tps_grid`` grid.
    """

    rotation: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    shear: float = 5.0
    translation: float = 0.1
    corner: float = 0.1
    tps_offset: float = 0.05
    tps_grid: int = 4

    def __post_init__(self) -> None:
        for name in ("rotation", "shear", "translation", "corner", "tps_offset"):
            _check_nonnegative(getattr(self, name), name)
        _check_range(self.scale, "scale", low=1e-6)
        if self.shear >= 90:
            raise ValueError(f"shear must be below 90 degrees, got {self.shear}")
        if self.corner >= 0.5:
            raise ValueError(f"corner must be below 0.5 so that corners cannot cross, got {self.corner}")
        if isinstance(self.tps_grid, bool) or not isinstance(self.tps_grid, int) or self.tps_grid < 2:
            raise ValueError(f"tps_grid must be an int >= 2, got {self.tps_grid!r}")


@dataclass(frozen=True)
class PhotometricRanges:
    """Photometric jitter, drawn independently for the input and the support.

    Attributes
    ----------
    brightness : float
        Additive offset (intensities in ``[0, 1]``) from ``[-b, b]``.
    contrast : float
        Factor about the mean from ``[1 - c, 1 + c]``.
    noise : float
        Standard deviation of Gaussian noise, drawn from ``[0, noise]``.
    blur_probability : float
        Chance of a Gaussian blur.
    blur_sigma : (float, float)
        Range of the blur's sigma in pixels.
    """

    brightness: float = 0.1
    contrast: float = 0.2
    noise: float = 0.02
    blur_probability: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.2)

    def __post_init__(self) -> None:
        for name in ("brightness", "contrast", "noise", "blur_probability"):
            _check_nonnegative(getattr(self, name), name)
        if self.contrast >= 1:
            raise ValueError(f"contrast must be below 1 so the factor stays positive, got {self.contrast}")
        if self.blur_probability > 1:
            raise ValueError(f"blur_probability must be in [0, 1], got {self.blur_probability}")
        _check_range(self.blur_sigma, "blur_sigma", low=1e-3)


@dataclass
class TrainingPair:
    """One self-supervised training pair from :func:`random_pair`.

    Attributes
    ----------
    input, support : numpy.ndarray
        float32 ``(H, W)`` greyscale in ``[0, 1]``. The input is a crop of the
        image; the support shows the same scene through the random warp.
    family : str
        ``"affine"``, ``"projective"`` or ``"tps"``.
    support_pix_from_input_pix : numpy.ndarray or None
        Matrix families: the float64 3x3 ground truth (library convention).
    control_points_support_pix : numpy.ndarray or None
        ``"tps"``: ``(K, 2)`` control points in the support frame, a
        ``tps_grid`` x ``tps_grid`` grid over ``linspace(-1, 1)`` in normalised
        coordinates (so the outer ones sit on the image edges), row by row.
    control_points_input_pix : numpy.ndarray or None
        ``"tps"``: ``(K, 2)`` where each control point's content lies in the
        input. The thin-plate spline through these pairs (kernel
        ``r^2 log r^2``) is exactly the map used to draw the support, and is a
        backward map: it is what a TPS spatial transformer must predict to
        resample the input into the support frame.
    input_pix_from_support_pix_map : numpy.ndarray or None
        ``"tps"``: float32 ``(H, W, 2)`` dense version of the same map.
    """

    input: np.ndarray
    support: np.ndarray
    family: str
    support_pix_from_input_pix: np.ndarray | None = None
    control_points_support_pix: np.ndarray | None = None
    control_points_input_pix: np.ndarray | None = None
    input_pix_from_support_pix_map: np.ndarray | None = None

    @property
    def input_pix_from_support_pix(self) -> np.ndarray | None:
        """Matrix families: the inverse of the ground truth (the backward sampling map)."""
        if self.support_pix_from_input_pix is None:
            return None
        return np.linalg.inv(self.support_pix_from_input_pix)


def _tps_kernel(squared_distance: np.ndarray) -> np.ndarray:
    # U(r) = r^2 log r^2, with U(0) = 0.
    safe = np.maximum(squared_distance, 1e-300)
    return np.where(squared_distance > 0, squared_distance * np.log(safe), 0.0)


def _tps_operator(control: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The ``(N, K)`` linear map from control-point targets to the spline's values at ``points``.

    The thin-plate spline through ``control`` (K, 2) -> targets (K, D),
    evaluated at ``points`` (N, 2), is ``operator @ targets``.
    """
    k = len(control)
    system = np.zeros((k + 3, k + 3))
    system[:k, :k] = _tps_kernel(((control[:, None] - control[None]) ** 2).sum(-1))
    system[:k, k] = 1.0
    system[:k, k + 1 :] = control
    system[k, :k] = 1.0
    system[k + 1 :, :k] = control.T
    coefficients_from_targets = np.linalg.inv(system)[:, :k]  # (K + 3, K)
    kernel = _tps_kernel(((points[:, None] - control[None]) ** 2).sum(-1))
    basis = np.concatenate([kernel, np.ones((len(points), 1)), points], axis=1)  # (N, K + 3)
    return basis @ coefficients_from_targets


def _tps_map(control: np.ndarray, targets: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Evaluate at ``points`` (N, 2) the thin-plate spline taking ``control`` (K, 2) to ``targets``."""
    return _tps_operator(control, points) @ targets


@functools.lru_cache(maxsize=8)
def _tps_dense_operator(size: tuple[int, int], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Control points (pixels) and the ``(H*W, K)`` operator giving the spline at every pixel.

    Cached: both depend only on the patch size and the grid, and building the
    kernel for every pixel dominates the cost of a TPS pair.
    """
    height, width = size
    control = _tps_control_points(grid, size)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    # Built in normalised units for a well-conditioned system; the spline
    # itself does not depend on the unit (TPS is scale invariant).
    to_norm = np.array([2.0 / width, 2.0 / height])
    operator = _tps_operator((control + 0.5) * to_norm - 1, (pixels + 0.5) * to_norm - 1)
    control.flags.writeable = False
    operator.flags.writeable = False
    return control, operator


def _random_affine(rng: np.random.Generator, ranges: WarpRanges, size: tuple[int, int]) -> np.ndarray:
    """``input_pix_from_support_pix`` of a random affine map about the patch centre."""
    height, width = size
    angle = math.radians(rng.uniform(-ranges.rotation, ranges.rotation))
    shear = math.tan(math.radians(rng.uniform(-ranges.shear, ranges.shear)))
    log_lo, log_hi = math.log(ranges.scale[0]), math.log(ranges.scale[1])
    scale = math.exp(rng.uniform(log_lo, log_hi))
    tx, ty = rng.uniform(-ranges.translation, ranges.translation, size=2) * (width, height)
    cos, sin = math.cos(angle), math.sin(angle)
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]]) * scale
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = centre + (tx, ty) - linear @ centre
    return matrix


def _tps_control_points(grid: int, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    normalised = np.linspace(-1.0, 1.0, grid)
    xs = (normalised + 1) * width / 2 - 0.5
    ys = (normalised + 1) * height / 2 - 0.5
    gx, gy = np.meshgrid(xs, ys)  # row by row: y outer, x inner
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def _photometric(image: np.ndarray, rng: np.random.Generator, ranges: PhotometricRanges) -> np.ndarray:
    if rng.random() < ranges.blur_probability:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(*ranges.blur_sigma))
    contrast = rng.uniform(1 - ranges.contrast, 1 + ranges.contrast)
    brightness = rng.uniform(-ranges.brightness, ranges.brightness)
    mean = float(image.mean())
    image = (image - mean) * np.float32(contrast) + np.float32(mean + brightness)
    sigma = rng.uniform(0, ranges.noise)
    if sigma > 0:
        image = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(image, 0.0, 1.0, out=image).astype(np.float32, copy=False)


def _crop_origin(rng: np.random.Generator, low: float, high: float, image_extent: int, patch: int) -> tuple[int, bool]:
    """Pick the crop start along one axis so that every sample in [low, high] (patch coords) is inside."""
    lo = max(0, math.ceil(-low))
    hi = min(image_extent - patch, math.floor(image_extent - 1 - high))
    if lo <= hi:
        return int(rng.integers(lo, hi + 1)), True
    return int(rng.integers(0, max(image_extent - patch, 0) + 1)), False


def random_pair(
    image: np.ndarray,
    family: str = "affine",
    out_size: int | Sequence[int] = (128, 128),
    ranges: WarpRanges | None = None,
    photometric: bool | PhotometricRanges = True,
    rng: RngLike = None,
    *,
    context: tuple[float, float] = (1.75, 3.0),
) -> TrainingPair:
    """Draw one self-supervised training pair: a crop and a randomly warped view of it.

    The image is made greyscale and resized so that its short side is
    ``context`` times the patch's long side (drawn uniformly, so the crop
    covers a third to a half of the image by default: big photos do not give
    texture-free crops). The input is a random crop; the support samples the
    image through a random backward map of ``family`` about the crop centre
    (content from around the crop fills its borders). Only if the image is too
    small for the warp are border pixels reflected. Photometric jitter is then
    applied to each image independently.

    Parameters
    ----------
    image : numpy.ndarray
        Greyscale or RGB, uint8 or float in ``[0, 1]``.
    family : {"affine", "projective", "tps"}
        The warp family. ``"projective"`` adds corner perturbation to an
        affine map; ``"tps"`` adds control-point offsets to one.
    out_size : int or (height, width), default (128, 128)
        Size of both images.
    ranges : WarpRanges, optional
        Warp ranges (defaults: :class:`WarpRanges`).
    photometric : bool or PhotometricRanges, default True
        ``True`` uses the default :class:`PhotometricRanges`, ``False`` none.
    rng : numpy.random.Generator, int or None
        Source of randomness.
    context : (float, float), default (1.75, 3.0)
        Range of the image's short side over the patch's long side.

    Returns
    -------
    TrainingPair
        See :class:`TrainingPair` for the ground truth of each family.

    Examples
    --------
    >>> image = np.random.default_rng(0).integers(0, 256, (240, 320), dtype=np.uint8)
    >>> pair = random_pair(image, "projective", out_size=64, rng=0)
    >>> pair.input.shape, pair.input.dtype, pair.support_pix_from_input_pix.shape
    ((64, 64), dtype('float32'), (3, 3))
    >>> random_pair(image, "tps", out_size=64, rng=0).control_points_input_pix.shape
    (16, 2)
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    size = _check_size(out_size, "out_size")
    ranges = WarpRanges() if ranges is None else ranges
    if not isinstance(ranges, WarpRanges):
        raise TypeError(f"ranges must be a WarpRanges, got {type(ranges).__name__}")
    if photometric is True:
        photometric = PhotometricRanges()
    elif photometric is not False and not isinstance(photometric, PhotometricRanges):
        raise TypeError(f"photometric must be a bool or PhotometricRanges, got {type(photometric).__name__}")
    context = _check_range(context, "context", low=1.0)
    rng = np.random.default_rng(rng)
    height, width = size

    gray = to_gray_uint8(image)
    short_side = rng.uniform(*context) * max(height, width)
    factor = short_side / min(gray.shape)
    new_size = (max(width, round(gray.shape[1] * factor)), max(height, round(gray.shape[0] * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    work = cv2.resize(gray, new_size, interpolation=interpolation).astype(np.float32) / np.float32(255)

    # The backward map input_pix_from_support_pix, sampled for every family.
    affine = _random_affine(rng, ranges, size)
    matrix = control = targets = dense = None
    if family == "affine":
        matrix = affine
    elif family == "projective":
        corners = patch_corners(size)
        offsets = rng.uniform(-ranges.corner, ranges.corner, size=(4, 2)) * (width, height)
        matrix = affine @ homography_from_corners(corners, corners + offsets)
    else:
        control, operator = _tps_dense_operator(size, ranges.tps_grid)
        jitter = rng.uniform(-ranges.tps_offset, ranges.tps_offset, size=control.shape) * (width, height)
        targets = transform_points(affine, control) + jitter
        dense = (operator @ targets).reshape(height, width, 2).astype(np.float32)
        control = control.copy()

    if dense is None:
        centres = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], dtype=np.float64)
        reach = transform_points(matrix, centres)  # convex image: the corners bound it
    else:
        reach = dense.reshape(-1, 2)
    (low_x, low_y), (high_x, high_y) = reach.min(axis=0), reach.max(axis=0)
    x0, _ = _crop_origin(rng, low_x, high_x, work.shape[1], width)
    y0, _ = _crop_origin(rng, low_y, high_y, work.shape[0], height)

    input_image = work[y0 : y0 + height, x0 : x0 + width].copy()
    if dense is None:
        support_image = cv2.warpPerspective(
            work, _translation(x0, y0) @ matrix, (width, height),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT_101,
        )
    else:
        support_image = cv2.remap(
            work, dense[..., 0] + np.float32(x0), dense[..., 1] + np.float32(y0),
            interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101,
        )
    if photometric is not False:
        input_image = _photometric(input_image, rng, photometric)
        support_image = _photometric(support_image, rng, photometric)

    return TrainingPair(
        input=input_image,
        support=support_image,
        family=family,
        support_pix_from_input_pix=None if matrix is None else np.linalg.inv(matrix),
        control_points_support_pix=control,
        control_points_input_pix=targets,
        input_pix_from_support_pix_map=dense,
    )


@dataclass
class PairBatch:
    """A batch of training pairs as float32 tensors (see :class:`TrainingPair`).

    Attributes
    ----------
    input, support : torch.Tensor
        ``(B, 1, H, W)`` in ``[0, 1]``.
    family : str
    support_pix_from_input_pix : torch.Tensor or None
        ``(B, 3, 3)`` for the matrix families.
    control_points_support_pix : torch.Tensor or None
        ``(K, 2)`` for ``"tps"`` (the same for every pair).
    control_points_input_pix : torch.Tensor or None
        ``(B, K, 2)`` for ``"tps"``.
    input_pix_from_support_pix_map : torch.Tensor or None
        ``(B, H, W, 2)`` for ``"tps"``.
    """

    input: torch.Tensor
    support: torch.Tensor
    family: str
    support_pix_from_input_pix: torch.Tensor | None = None
    control_points_support_pix: torch.Tensor | None = None
    control_points_input_pix: torch.Tensor | None = None
    input_pix_from_support_pix_map: torch.Tensor | None = None
    image_indices: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "PairBatch":
        """Return a copy with every tensor moved to ``device``."""
        moved = {
            name: (value.to(device) if isinstance(value, torch.Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return PairBatch(**moved)


def batch_pairs(
    images: Sequence,
    batch_size: int,
    family: str = "affine",
    out_size: int | Sequence[int] = (128, 128),
    ranges: WarpRanges | None = None,
    photometric: bool | PhotometricRanges = True,
    rng: RngLike = None,
    *,
    context: tuple[float, float] = (1.75, 3.0),
) -> PairBatch:
    """Draw a batch of training pairs from images picked uniformly at random.

    Parameters
    ----------
    images : list of numpy.ndarray or of (name, numpy.ndarray)
        The training images, e.g. ``builtin_photos("train")`` or
        ``load_image_folder(path)``. Passing greyscale uint8 images saves a
        colour conversion per pair.
    batch_size : int
        Number of pairs.
    family, out_size, ranges, photometric, context
        As in :func:`random_pair`.
    rng : numpy.random.Generator, int or None
        Source of randomness; pass one Generator across calls for a stream of batches.

    Returns
    -------
    PairBatch
        float32 tensors on the CPU.

    Examples
    --------
    >>> image = np.random.default_rng(0).integers(0, 256, (240, 320), dtype=np.uint8)
    >>> batch = batch_pairs([image], 2, "affine", out_size=32, rng=0)
    >>> tuple(batch.input.shape), tuple(batch.support_pix_from_input_pix.shape)
    ((2, 1, 32, 32), (2, 3, 3))
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    arrays = _unpack_images(images)
    rng = np.random.default_rng(rng)
    indices = [int(i) for i in rng.integers(0, len(arrays), size=batch_size)]
    pairs = [
        random_pair(arrays[i], family, out_size, ranges, photometric, rng, context=context) for i in indices
    ]

    def stack(values) -> torch.Tensor:
        return torch.from_numpy(np.stack(values).astype(np.float32, copy=False))

    batch = PairBatch(
        input=stack([p.input for p in pairs]).unsqueeze(1),
        support=stack([p.support for p in pairs]).unsqueeze(1),
        family=family,
        image_indices=indices,
    )
    if family == "tps":
        batch.control_points_support_pix = torch.from_numpy(pairs[0].control_points_support_pix.astype(np.float32))
        batch.control_points_input_pix = stack([p.control_points_input_pix for p in pairs])
        batch.input_pix_from_support_pix_map = stack([p.input_pix_from_support_pix_map for p in pairs])
    else:
        batch.support_pix_from_input_pix = stack([p.support_pix_from_input_pix for p in pairs])
    return batch
