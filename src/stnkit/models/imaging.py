"""Image-array helpers of the models, built on OpenCV: greyscale, keypoint matching, homography fitting.

:func:`to_gray_uint8` turns what a user hands to :meth:`stnkit.models.Aligner.align`
(or a dataset) into the greyscale array every aligner and baseline works on.
The keypoint functions (SIFT, ORB, RANSAC) are one implementation shared by
the photometric refinement's ``"features"`` start (:mod:`stnkit.models.refinement`)
and the classical baselines of :mod:`stnkit.evaluation.classical`, so that the
baseline we compare against and the start we refine from are the same estimate.

Convention: images are 2-D ``uint8`` arrays; every homography returned is the
float64 3x3 ``support_pix_from_input_pix`` (input pixel ``(x, y, 1)`` to the
support pixel with the same content, pixel centres at integers).

OpenCV is imported when a function is called, so that importing
:mod:`stnkit.models` needs torch alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["to_gray_uint8", "KeypointFit", "fit_homography", "sift_matches", "orb_matches", "sift_homography"]


def to_gray_uint8(image, name: str = "image") -> np.ndarray:
    """Convert an image array (or CPU tensor) to a contiguous uint8 ``(H, W)`` greyscale array.

    Parameters
    ----------
    image : array-like or torch.Tensor
        ``(H, W)``, ``(H, W, 1|3|4)`` (RGB/RGBA) or, for tensors, ``(1, H, W)``
        and ``(1, 1, H, W)``. uint8 is used as is, uint16 is scaled by 1/257,
        floating point is taken as intensities in ``[0, 1]`` (and clipped).
    name : str
        What to call the argument in error messages.

    Raises
    ------
    TypeError
        If ``image`` is not numeric or is boolean.
    ValueError
        If the shape is not one of the above or the image is empty.

    Examples
    --------
    >>> to_gray_uint8(np.full((2, 3), 0.5, np.float32))
    array([[128, 128, 128],
           [128, 128, 128]], dtype=uint8)
    """
    import cv2  # noqa: PLC0415 (optional dependency)

    if hasattr(image, "detach"):  # a torch tensor: channels first
        image = image.detach().cpu().numpy()
        while image.ndim > 2 and image.shape[0] == 1:
            image = image[0]
    arr = np.asarray(image)
    if arr.dtype == bool or arr.dtype.kind not in "uif":
        raise TypeError(f"{name} must be a numeric image array, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"{name} must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.dtype.kind == "f":
            arr = np.clip(np.nan_to_num(arr.astype(np.float32)) * 255.0 + 0.5, 0, 255)
        elif arr.dtype == np.uint16:
            arr = arr / 257.0 + 0.5
        else:
            arr = np.clip(arr, 0, 255)
        arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        code = cv2.COLOR_RGB2GRAY if arr.shape[2] == 3 else cv2.COLOR_RGBA2GRAY
        arr = cv2.cvtColor(np.ascontiguousarray(arr), code)
    return np.ascontiguousarray(arr)


@dataclass(frozen=True)
class KeypointFit:
    """The outcome of matching two images and fitting a homography to the matches.

    Attributes
    ----------
    support_pix_from_input_pix : np.ndarray or None
        The float64 3x3 homography; ``None`` when no fit was possible.
    matches : int
        Matches that reached RANSAC.
    inliers : int
        RANSAC inliers of the fit (0 without a fit).
    reason : str
        Why there is no fit (empty when there is one).
    """

    support_pix_from_input_pix: np.ndarray | None
    matches: int
    inliers: int
    reason: str = ""


def sift_matches(input_image: np.ndarray, support: np.ndarray, ratio: float = 0.75) -> tuple[np.ndarray, np.ndarray, str]:
    """SIFT keypoints (OpenCV defaults) matched by brute force with Lowe's ratio test.

    Returns
    -------
    input_points, support_points : np.ndarray
        ``(M, 2)`` float32 pixel coordinates of the matched keypoints.
    reason : str
        Why there are no matches (empty otherwise).
    """
    import cv2  # noqa: PLC0415 (optional dependency)

    sift = cv2.SIFT_create()
    kp_input, desc_input = sift.detectAndCompute(input_image, None)
    kp_support, desc_support = sift.detectAndCompute(support, None)
    if desc_input is None or desc_support is None or len(kp_support) < 2:
        empty = np.zeros((0, 2), np.float32)
        return empty, empty, f"SIFT: too few keypoints ({len(kp_input)} in input, {len(kp_support)} in support)"
    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(desc_input, desc_support, k=2)
    # Lowe's ratio test: keep a match only if it is clearly better than the runner-up.
    good = [pair[0] for pair in knn if len(pair) == 2 and pair[0].distance < ratio * pair[1].distance]
    input_points = np.float32([kp_input[m.queryIdx].pt for m in good]).reshape(-1, 2)
    support_points = np.float32([kp_support[m.trainIdx].pt for m in good]).reshape(-1, 2)
    return input_points, support_points, ""


def orb_matches(input_image: np.ndarray, support: np.ndarray, n_features: int = 500) -> tuple[np.ndarray, np.ndarray, str]:
    """ORB keypoints matched by brute-force Hamming distance with cross-check (same returns as :func:`sift_matches`)."""
    import cv2  # noqa: PLC0415 (optional dependency)

    orb = cv2.ORB_create(nfeatures=int(n_features))
    kp_input, desc_input = orb.detectAndCompute(input_image, None)
    kp_support, desc_support = orb.detectAndCompute(support, None)
    if desc_input is None or desc_support is None:
        empty = np.zeros((0, 2), np.float32)
        return empty, empty, f"ORB: no keypoints ({len(kp_input)} in input, {len(kp_support)} in support)"
    matches = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(desc_input, desc_support)
    input_points = np.float32([kp_input[m.queryIdx].pt for m in matches]).reshape(-1, 2)
    support_points = np.float32([kp_support[m.trainIdx].pt for m in matches]).reshape(-1, 2)
    return input_points, support_points, ""


def fit_homography(
    input_points: np.ndarray, support_points: np.ndarray, ransac_threshold: float = 3.0, what: str = "keypoints"
) -> KeypointFit:
    """``cv2.findHomography`` with RANSAC at ``ransac_threshold`` pixels on matched points ``(M, 2)``."""
    import cv2  # noqa: PLC0415 (optional dependency)

    count = len(input_points)
    if count < 4:
        return KeypointFit(None, count, 0, f"{what}: {count} matches, need at least 4 for a homography")
    matrix, inliers = cv2.findHomography(
        input_points.reshape(-1, 1, 2), support_points.reshape(-1, 1, 2), cv2.RANSAC, float(ransac_threshold)
    )
    if matrix is None:
        return KeypointFit(None, count, 0, f"{what}: RANSAC found no homography among {count} matches")
    return KeypointFit(matrix.astype(np.float64), count, 0 if inliers is None else int(inliers.sum()))


def sift_homography(
    input_image: np.ndarray, support: np.ndarray, *, ratio: float = 0.75, ransac_threshold: float = 3.0
) -> KeypointFit:
    """SIFT + Lowe's ratio test + RANSAC: the ``support_pix_from_input_pix`` homography between two uint8 images.

    Examples
    --------
    >>> from skimage import data
    >>> import cv2
    >>> image = data.camera()
    >>> shifted = cv2.warpAffine(image, np.float64([[1, 0, 5], [0, 1, -3]]), image.shape[::-1])
    >>> fit = sift_homography(image, shifted)
    >>> np.round(fit.support_pix_from_input_pix[:2, 2]).tolist()
    [5.0, -3.0]
    """
    input_points, support_points, reason = sift_matches(input_image, support, ratio)
    if reason:
        return KeypointFit(None, 0, 0, reason)
    return fit_homography(input_points, support_points, ransac_threshold, "SIFT")
