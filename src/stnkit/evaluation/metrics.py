"""Alignment error metrics: mean average corner error (MACE) and run summaries.

Matrices follow the library's convention: ``support_pix_from_input_pix`` maps
an input pixel to the support pixel that shows the same content (pixel
centres at integers, see :mod:`stnkit.data.pairs`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from stnkit.data.pairs import patch_corners

__all__ = ["mace", "summarise"]


def _as_matrices(value, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().double().numpy()
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim < 2 or arr.shape[-2:] != (3, 3):
        raise ValueError(f"{name} must have shape (3, 3) or (B, 3, 3), got {arr.shape}")
    return arr


def mace(
    pred: np.ndarray,
    true: np.ndarray,
    patch_size: int | Sequence[int] | None = None,
    *,
    corners: np.ndarray | None = None,
) -> float | np.ndarray:
    """Mean average corner error in pixels, per pair.

    The four corners of the input patch are mapped by the predicted and by the
    true ``support_pix_from_input_pix``; the error is the mean of the four
    Euclidean distances between the two images of each corner (DeTone et
    al., 2016). A prediction that sends a corner to or beyond the horizon
    (``w <= 0``) or holds non-finite entries scores ``inf``.

    Parameters
    ----------
    pred, true : array-like or torch.Tensor
        ``(3, 3)`` or ``(B, 3, 3)`` matrices (they broadcast against each other).
    patch_size : int or (height, width), optional
        Size of the input patch; its corners are the outer pixel edges (see
        :func:`stnkit.data.pairs.patch_corners`).
    corners : numpy.ndarray, optional
        ``(N, 2)`` points to use instead of ``patch_size``'s corners.

    Returns
    -------
    float or numpy.ndarray
        A float for single matrices, else a float64 array of shape ``(B,)``.

    Raises
    ------
    ValueError
        If the shapes are wrong or not exactly one of ``patch_size`` and
        ``corners`` is given.

    Examples
    --------
    >>> shift = np.array([[1.0, 0, 3], [0, 1, 4], [0, 0, 1]])
    >>> mace(np.eye(3), shift, patch_size=128)
    5.0
    >>> mace(np.stack([np.eye(3), shift]), shift, 128).tolist()
    [5.0, 0.0]
    """
    if (patch_size is None) == (corners is None):
        raise ValueError("give exactly one of patch_size and corners")
    if corners is None:
        corners = patch_corners(patch_size)
    corners = np.asarray(corners, dtype=np.float64)
    if corners.ndim != 2 or corners.shape[1] != 2 or len(corners) == 0:
        raise ValueError(f"corners must have shape (N, 2), got {corners.shape}")
    pred, true = _as_matrices(pred, "pred"), _as_matrices(true, "true")
    try:
        pred, true = np.broadcast_arrays(pred, true)
    except ValueError:
        raise ValueError(f"pred and true must have matching batch shapes, got {pred.shape} and {true.shape}") from None

    homogeneous = np.concatenate([corners, np.ones((len(corners), 1))], axis=1)  # (N, 3)
    mapped_pred = homogeneous @ np.swapaxes(pred, -1, -2)  # (..., N, 3)
    mapped_true = homogeneous @ np.swapaxes(true, -1, -2)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Normalise the sign of w by h33 so that a matrix and its negative agree.
        sign_pred = np.where(pred[..., 2:3, 2:3] < 0, -1.0, 1.0)[..., 0, :]
        w_pred = mapped_pred[..., 2] * sign_pred
        points_pred = mapped_pred[..., :2] / mapped_pred[..., 2:]
        points_true = mapped_true[..., :2] / mapped_true[..., 2:]
        distance = np.linalg.norm(points_pred - points_true, axis=-1)  # (..., N)
    invalid = (w_pred <= 1e-12) | ~np.isfinite(distance)
    distance = np.where(invalid, np.inf, distance)
    errors = distance.mean(axis=-1)
    if errors.ndim == 0:
        return float(errors)
    return errors


def summarise(
    errors: Sequence[float] | np.ndarray,
    times: Sequence[float] | np.ndarray | None = None,
    *,
    threshold: float = 10.0,
) -> dict[str, float]:
    """Summary statistics of per-pair errors and run times.

    Parameters
    ----------
    errors : array-like
        Per-pair errors in pixels (e.g. from :func:`mace`); ``inf`` counts as
        above the threshold and makes the mean ``inf``.
    times : array-like, optional
        Per-pair run times in **seconds**.
    threshold : float, default 10.0
        Errors above this many pixels count as failures.

    Returns
    -------
    dict
        ``n``, ``mean``, ``median``, ``share_above`` (fraction in ``[0, 1]``
        of errors above ``threshold``), ``threshold`` and ``ms_per_pair``
        (mean time in milliseconds, ``nan`` without ``times``).

    Examples
    --------
    >>> summarise([1.0, 2.0, 30.0], [0.001, 0.002, 0.003])
    {'n': 3, 'mean': 11.0, 'median': 2.0, 'share_above': 0.3333333333333333, 'threshold': 10.0, 'ms_per_pair': 2.0}
    """
    errors = np.asarray(errors, dtype=np.float64).ravel()
    if errors.size == 0:
        raise ValueError("errors is empty, expected at least one value")
    if np.isnan(errors).any():
        raise ValueError("errors contains NaN; score failed predictions as inf instead")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    ms_per_pair = math.nan
    if times is not None:
        times = np.asarray(times, dtype=np.float64).ravel()
        if times.size != errors.size:
            raise ValueError(f"times must have one value per error: expected {errors.size}, got {times.size}")
        ms_per_pair = float(times.mean() * 1000.0)
    return {
        "n": int(errors.size),
        "mean": float(errors.mean()),
        "median": float(np.median(errors)),
        "share_above": float((errors > threshold).mean()),
        "threshold": float(threshold),
        "ms_per_pair": ms_per_pair,
    }
