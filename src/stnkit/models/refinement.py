"""Photometric refinement of an alignment: iterative, coarse-to-fine, on the sampler's own geometry.

The aligner's network gives a coarse homography in one forward pass. This
module refines it the way a spatial transformer is trained, but at test time
and for one pair: it samples the input through the current warp, compares it
with the support, and moves the warp's four corners to reduce the difference,
on an image pyramid from coarse to fine.

Algorithm (Levenberg-Marquardt on the zero-mean, unit-norm difference, i.e.
on 1 - NCC, so brightness and contrast changes do not matter):

1. At each pyramid level the input is sampled at the current grid
   ``M @ p`` (bilinear, ``align_corners=False``, the library's convention)
   together with its spatial gradient; the Jacobian of the sampled image with
   respect to the 8 corner offsets ``d`` of the update ``M <- M @ C(d)`` is the
   image gradient times the grid's derivative (a forward-compositional update,
   as in Lucas-Kanade and ECC).
2. A damped Gauss-Newton step is taken when it raises the NCC over the overlap,
   else the damping grows; the level ends when the step is below ``tol``.

:func:`candidate_matrices` adds, where OpenCV is installed, a SIFT + RANSAC
estimate on the same views as a second starting point; :func:`refine_alignment`
refines every starting point at the coarsest level and keeps the best.

Convention: every matrix here is a ``(3, 3)`` float64 **backward** map from
the support's normalised coordinates to the input's normalised coordinates
(``input_norm_from_support_norm``), as :class:`~stnkit.transforms.Projective`
uses them (:mod:`stnkit.transforms.base`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..transforms.base import apply_matrix_to_grid, norm_from_pix, pix_from_norm

__all__ = ["RefinementResult", "refine_alignment", "corner_update", "ncc_score", "candidate_matrices"]

# Updates are parametrised by the offsets of the four support corners (top-left, top-right,
# bottom-right, bottom-left; better conditioned than matrix entries), as Projective("corners").
_SQUARE = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
_HOMOGENEOUS_CORNERS = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]], dtype=torch.float64)


@dataclass
class RefinementResult:
    """What :func:`refine_alignment` returns.

    Attributes
    ----------
    matrix : Tensor
        ``(3, 3)`` float64 ``input_norm_from_support_norm``.
    ncc : float
        Normalised cross-correlation of the warped input and the support over
        their overlap at the finest level (1 is a perfect match).
    overlap : float
        Fraction of support pixels that read inside the input.
    start : str
        Which starting point won (``"network"``, ``"features"``, ``"identity"``...).
    """

    matrix: Tensor
    ncc: float
    overlap: float
    start: str


def corner_update(d: Tensor) -> Tensor:
    """The homography ``C(d)`` that moves the four normalised corners by ``d`` (``(8,)``), as ``(3, 3)``.

    Convention: ``C(d)`` maps support normalised points to support normalised
    points; corner ``c`` goes to ``c + (d[2c], d[2c+1])``; ``C(0)`` is the identity.

    Examples
    --------
    >>> torch.allclose(corner_update(torch.zeros(8, dtype=torch.float64)), torch.eye(3, dtype=torch.float64))
    True
    """
    # The 8x8 direct linear transform of the four correspondences, solved in NumPy: this runs
    # hundreds of times per alignment, where a batched torch solve costs more in overhead.
    dst = _SQUARE + d.detach().to(torch.float64).cpu().numpy().reshape(4, 2)
    a = np.zeros((8, 8))
    for i, ((x, y), (u, v)) in enumerate(zip(_SQUARE, dst)):
        a[2 * i] = (x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y)
        a[2 * i + 1] = (0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y)
    h = np.linalg.solve(a, dst.reshape(-1))
    return torch.from_numpy(np.append(h, 1.0).reshape(3, 3))


def _pyramid_level(image: Tensor, scale: float) -> Tensor:
    if scale >= 1.0:
        return image
    size = (max(8, round(image.shape[-2] * scale)), max(8, round(image.shape[-1] * scale)))
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)


def _gradients(image: Tensor) -> tuple[Tensor, Tensor]:
    """Central-difference gradients of ``(1, 1, H, W)`` in **normalised** units (d/dx_norm = W/2 d/dx_pix)."""
    height, width = image.shape[-2:]
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) * 0.5 * (width / 2.0)
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) * 0.5 * (height / 2.0)
    return gx, gy


def _sample(images: Tensor, grid: Tensor) -> Tensor:
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def _inside(grid: Tensor, in_size: Sequence[int]) -> Tensor:
    """Points whose bilinear footprint lies inside the input (half a pixel in from the edge)."""
    margin_x, margin_y = 1.0 - 1.0 / in_size[1], 1.0 - 1.0 / in_size[0]
    return (grid[..., 0].abs() <= margin_x) & (grid[..., 1].abs() <= margin_y)


def ncc_score(input: Tensor, support: Tensor, matrix: Tensor, min_overlap: float = 0.25) -> tuple[float, float]:
    """NCC of ``input`` warped by ``matrix`` against ``support`` over their overlap, and the overlap fraction.

    Args:
        input: ``(1, 1, H_in, W_in)`` float.
        support: ``(1, 1, H, W)`` float.
        matrix: ``(3, 3)`` ``input_norm_from_support_norm``.
        min_overlap: below this overlap fraction the score is ``-1``.

    Examples
    --------
    >>> image = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    >>> round(ncc_score(image, image, torch.eye(3, dtype=torch.float64))[0], 6)
    1.0
    """
    if not bool(torch.isfinite(matrix).all()) or bool(((_HOMOGENEOUS_CORNERS @ matrix[2].to(torch.float64)) <= 1e-6).any()):
        return -1.0, 0.0  # a support corner on or beyond the horizon: not an alignment
    grid = apply_matrix_to_grid(matrix[None], tuple(support.shape[-2:]))
    mask = _inside(grid, input.shape[-2:])[0]
    overlap = float(mask.float().mean())
    if overlap < min_overlap:
        return -1.0, overlap
    a = _sample(input, grid)[0, 0][mask].double()
    b = support[0, 0][mask].double()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return (float((a * b).sum()) / denominator if denominator > 0 else -1.0), overlap


def _corner_generators() -> Tensor:
    """``dC/dd_k`` at ``d = 0`` (``(8, 3, 3)``): how each corner offset changes the update matrix."""
    step = 1e-6
    eye = torch.eye(3, dtype=torch.float64)
    generators = []
    for k in range(8):
        d = torch.zeros(8, dtype=torch.float64)
        d[k] = step
        generators.append((corner_update(d) - eye) / step)
    return torch.stack(generators)


_GENERATORS: Tensor | None = None


@functools.lru_cache(maxsize=16)
def _points(size: tuple[int, int]) -> Tensor:
    """Homogeneous normalised pixel centres ``(3, H, W)``."""
    height, width = size
    ys = (torch.arange(height, dtype=torch.float64) * 2 + 1) / height - 1
    xs = (torch.arange(width, dtype=torch.float64) * 2 + 1) / width - 1
    return torch.stack((xs.view(1, -1).expand(height, width), ys.view(-1, 1).expand(height, width),
                        torch.ones(height, width, dtype=torch.float64)))


def _corner_jacobian(matrix: Tensor, size: Sequence[int], grad_x: Tensor, grad_y: Tensor) -> Tensor:
    """d(sampled image)/d(corner offsets) for the update ``M <- M @ C(d)`` at ``d = 0``: ``(8, H, W)``.

    With ``q = M p`` and ``e_k = M G_k p`` (``G_k = dC/dd_k``), the grid point
    ``x = q_xy / q_w`` moves by ``(e_k,xy - x e_k,w) / q_w``; the image changes
    by its gradient times that motion.
    """
    global _GENERATORS
    if _GENERATORS is None:
        _GENERATORS = _corner_generators()
    points = _points(tuple(size))
    q = torch.einsum("ij,jhw->ihw", matrix, points)
    w = q[2].clamp_min(torch.finfo(torch.float64).eps)
    x, y = q[0] / w, q[1] / w
    e = torch.einsum("ij,kjl,lhw->kihw", matrix, _GENERATORS, points)  # (8, 3, H, W)
    dx, dy = (e[:, 0] - x * e[:, 2]) / w, (e[:, 1] - y * e[:, 2]) / w
    return grad_x.double() * dx + grad_y.double() * dy


def _refine_level(
    input: Tensor, support: Tensor, matrix: Tensor, iterations: int, tol: float, min_overlap: float
) -> tuple[Tensor, float]:
    """Levenberg-Marquardt on one level; returns the matrix and its NCC."""
    in_size, size = tuple(input.shape[-2:]), tuple(support.shape[-2:])
    grad_x, grad_y = _gradients(input)
    stack = torch.cat((input, grad_x, grad_y), dim=1)
    best, _ = ncc_score(input, support, matrix, min_overlap)
    damping = 1e-3
    eye8 = torch.eye(8, dtype=torch.float64)
    for _ in range(iterations):
        grid = apply_matrix_to_grid(matrix[None], size)[0]  # (H, W, 2)
        mask = _inside(grid, in_size)
        if float(mask.float().mean()) < min_overlap:
            break
        sampled = _sample(stack, grid[None])[0].double()  # (3, H, W): image, d/dx, d/dy
        jac = _corner_jacobian(matrix, size, sampled[1], sampled[2])  # (8, H, W)
        a, b, j = sampled[0][mask], support[0, 0][mask].double(), jac[:, mask].T  # (P,), (P,), (P, 8)
        a_centred, b_centred = a - a.mean(), b - b.mean()
        a_norm, b_norm = a_centred.norm(), b_centred.norm()
        if a_norm == 0 or b_norm == 0:
            break
        residual = a_centred / a_norm - b_centred / b_norm
        j = (j - j.mean(dim=0)) / a_norm
        hessian, gradient = j.T @ j, j.T @ residual
        improved = False
        for _attempt in range(4):
            system = hessian + damping * torch.diag(torch.diagonal(hessian)) + 1e-12 * eye8
            try:
                delta = -torch.linalg.solve(system, gradient)
            except RuntimeError:
                break
            candidate = matrix @ corner_update(delta)
            candidate = candidate / candidate[2, 2]
            score, _ = ncc_score(input, support, candidate, min_overlap)
            if score > best:
                matrix, best, improved = candidate, score, True
                damping = max(damping * 0.3, 1e-7)
                break
            damping *= 10.0
        if not improved or float(delta.abs().max()) < tol:
            break
    return matrix, best


def candidate_matrices(
    input: Tensor, support: Tensor, network: Tensor | None = None, *, features: bool = True, search: bool = True
) -> dict[str, Tensor]:
    """Starting points for :func:`refine_alignment`.

    ``"network"``: the given estimate; ``"features"``: SIFT + RANSAC on the
    same views (needs OpenCV and at least 8 inliers, else left out);
    ``"search1"``... ``"search3"``: the three best-correlated of a coarse grid of
    shifts and zooms (25 shifts of up to 0.4 half-widths times 3 scales, scored by NCC at 32 px);
    ``"identity"``.
    """
    candidates: dict[str, Tensor] = {}
    if network is not None:
        candidates["network"] = network.to(torch.float64)
    if features:
        matrix = _sift_matrix(input, support)
        if matrix is not None:
            candidates["features"] = matrix
    if search:
        for rank, matrix in enumerate(_grid_search(input, support)):
            candidates[f"search{rank + 1}"] = matrix
    candidates["identity"] = torch.eye(3, dtype=torch.float64)
    return candidates


def _grid_search(input: Tensor, support: Tensor, side: int = 32, keep: int = 3) -> list[Tensor]:
    """The ``keep`` best-correlated shifts and zooms of a coarse grid, best first."""
    scale = side / max(input.shape[-2:])
    small_input, small_support = _pyramid_level(input.double(), scale), _pyramid_level(support.double(), scale)
    scored = []
    for zoom in (0.8, 1.0, 1.25):
        for tx in (-0.4, -0.2, 0.0, 0.2, 0.4):
            for ty in (-0.4, -0.2, 0.0, 0.2, 0.4):
                matrix = torch.tensor([[zoom, 0.0, tx], [0.0, zoom, ty], [0.0, 0.0, 1.0]], dtype=torch.float64)
                scored.append((ncc_score(small_input, small_support, matrix, 0.5)[0], len(scored), matrix))
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [matrix for _, _, matrix in scored[:keep]]


def _sift_matrix(input: Tensor, support: Tensor, min_inliers: int = 8) -> Tensor | None:
    try:
        import cv2  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return None
    a = (input[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    b = (support[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    sift = cv2.SIFT_create()
    kp_a, desc_a = sift.detectAndCompute(a, None)
    kp_b, desc_b = sift.detectAndCompute(b, None)
    if desc_a is None or desc_b is None or len(kp_a) < 4 or len(kp_b) < 2:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(desc_a, desc_b, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.75 * p[1].distance]
    if len(good) < min_inliers:
        return None
    points_a = np.float32([kp_a[m.queryIdx].pt for m in good]).reshape(-1, 1, 2)
    points_b = np.float32([kp_b[m.trainIdx].pt for m in good]).reshape(-1, 1, 2)
    support_pix_from_input_pix, inliers = cv2.findHomography(points_a, points_b, cv2.RANSAC, 3.0)
    if support_pix_from_input_pix is None or inliers is None or int(inliers.sum()) < min_inliers:
        return None
    try:
        backward = np.linalg.inv(support_pix_from_input_pix)
    except np.linalg.LinAlgError:
        return None
    matrix = norm_from_pix(tuple(a.shape)) @ torch.from_numpy(backward) @ pix_from_norm(tuple(b.shape))
    if not bool(torch.isfinite(matrix).all()) or abs(float(matrix[2, 2])) < 1e-9:
        return None
    return matrix / matrix[2, 2]


@torch.no_grad()
def refine_alignment(
    input: Tensor,
    support: Tensor,
    candidates: dict[str, Tensor] | Tensor,
    *,
    levels: Sequence[float] = (0.25, 0.5, 1.0),
    iterations: Sequence[int] = (15, 10, 6),
    tol: float = 1e-4,
    min_overlap: float = 0.5,
    select_levels: int = 2,
) -> RefinementResult:
    """Refine a homography by maximising the NCC of the warped input and the support, coarse to fine.

    Args:
        input: ``(1, 1, H_in, W_in)`` float greyscale in ``[0, 1]``.
        support: ``(1, 1, H, W)`` float greyscale in ``[0, 1]``.
        candidates: starting matrices by name (``(3, 3)`` ``input_norm_from_support_norm``), or one matrix.
            Each is refined through the first ``select_levels`` levels; the best NCC goes on to the finer levels.
        levels: pyramid scales, coarse to fine (1.0 is the given size).
        iterations: Levenberg-Marquardt iterations per level.
        tol: stop a level when the largest corner step (normalised units) is below this.
        min_overlap: least fraction of support pixels that must read inside the input (a warp that
            leaves less is scored -1: a small overlap can correlate well by chance).
        select_levels: how many levels every start is refined through before the best is chosen.

    Returns:
        RefinementResult: the refined matrix, its NCC, overlap and winning start.

    Raises:
        ValueError: if the images are not ``(1, 1, H, W)`` or the settings do not match.

    Examples
    --------
    >>> image = torch.rand(1, 1, 32, 32)
    >>> result = refine_alignment(image, image, torch.eye(3, dtype=torch.float64), levels=(1.0,), iterations=(3,))
    >>> round(result.ncc, 4)
    1.0
    """
    for name, image in (("input", input), ("support", support)):
        if not isinstance(image, Tensor) or image.dim() != 4 or image.shape[:2] != (1, 1):
            raise ValueError(f"{name} must be a (1, 1, H, W) tensor, got {getattr(image, 'shape', type(image).__name__)}")
    if len(levels) != len(iterations) or not levels:
        raise ValueError(f"levels and iterations must have the same non-zero length, got {len(levels)} and {len(iterations)}")
    if isinstance(candidates, Tensor):
        candidates = {"given": candidates}
    input, support = input.double(), support.double()
    pyramid = [(_pyramid_level(input, s), _pyramid_level(support, s)) for s in levels]
    # Every start is refined through the first `select_levels` levels; the best NCC goes on.
    select_levels = min(select_levels, len(levels))
    best_name, best_matrix, best_score = None, None, -2.0
    for name, matrix in candidates.items():
        matrix = matrix.to(torch.float64)
        if not bool(torch.isfinite(matrix).all()) or float(matrix[2, 2]) == 0.0:
            continue
        matrix, score = matrix / matrix[2, 2], -2.0
        for (level_input, level_support), count in zip(pyramid[:select_levels], iterations[:select_levels]):
            matrix, score = _refine_level(level_input, level_support, matrix, count, tol, min_overlap)
        if score > best_score:
            best_name, best_matrix, best_score = name, matrix, score
    if best_matrix is None:
        raise ValueError("no finite starting matrix among the candidates")
    matrix = best_matrix
    for (level_input, level_support), count in zip(pyramid[select_levels:], iterations[select_levels:]):
        matrix, _ = _refine_level(level_input, level_support, matrix, count, tol, min_overlap)
    score, overlap = ncc_score(input, support, matrix, min_overlap)
    return RefinementResult(matrix=matrix, ncc=score, overlap=overlap, start=str(best_name))
