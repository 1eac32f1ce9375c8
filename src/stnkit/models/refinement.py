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
   else the damping grows; a start is done when its step is below ``tol``.

Local refinement only finds the optimum whose basin it starts in, so
:func:`candidate_matrices` offers several starts: the network's estimate, a
SIFT + RANSAC estimate on the same views (where OpenCV is installed and finds
one), the best of a coarse similarity search, and the identity.
:func:`refine_alignment` refines them all at once (batched) at the coarsest
level, the best few at the next, and the single best-correlated from there on.

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

from ..transforms.base import norm_from_pix, pix_from_norm
from .imaging import sift_homography

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
    return _corner_updates(d.detach().reshape(1, 8))[0]


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


@functools.lru_cache(maxsize=16)
def _points(size: tuple[int, int]) -> Tensor:
    """Homogeneous normalised pixel centres ``(3, H, W)``."""
    height, width = size
    ys = (torch.arange(height, dtype=torch.float64) * 2 + 1) / height - 1
    xs = (torch.arange(width, dtype=torch.float64) * 2 + 1) / width - 1
    return torch.stack((xs.view(1, -1).expand(height, width), ys.view(-1, 1).expand(height, width),
                        torch.ones(height, width, dtype=torch.float64)))


def _admissible(matrices: Tensor) -> Tensor:
    """``(B,)``: finite, and every support corner in front of the horizon (else not an alignment)."""
    finite = torch.isfinite(matrices).flatten(1).all(dim=1)
    w = torch.nan_to_num(matrices[:, 2].to(torch.float64), nan=-1.0) @ _HOMOGENEOUS_CORNERS.T  # (B, 4)
    return finite & (w > 1e-6).all(dim=1)


def _grids(matrices: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Grids ``(B, H, W, 2)`` of ``matrices`` at ``size``, the projective ``w`` and the points ``(3, H, W)``."""
    points = _points(size)
    q = torch.einsum("bij,jhw->bihw", torch.nan_to_num(matrices), points)
    w = q[:, 2].clamp_min(torch.finfo(torch.float64).eps)
    return torch.stack((q[:, 0] / w, q[:, 1] / w), dim=-1), w, points


def _masked_ncc(a: Tensor, b: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per item (dim 0) NCC of ``a`` and ``b`` over ``mask``; also the centred maps and their norms."""
    count = mask.flatten(1).sum(dim=1).clamp_min(1.0)
    shape = (-1,) + (1,) * (a.dim() - 1)
    a_centred = (a - (a * mask).flatten(1).sum(dim=1).div(count).view(shape)) * mask
    b_centred = (b - (b * mask).flatten(1).sum(dim=1).div(count).view(shape)) * mask
    a_norm, b_norm = a_centred.flatten(1).norm(dim=1), b_centred.flatten(1).norm(dim=1)
    ncc = (a_centred * b_centred).flatten(1).sum(dim=1) / (a_norm * b_norm).clamp_min(1e-12)
    return ncc, a_centred, b_centred, a_norm, b_norm


def _ncc_batch(input: Tensor, support: Tensor, matrices: Tensor, min_overlap: float) -> tuple[Tensor, Tensor]:
    """NCC ``(B,)`` (``-1`` where inadmissible or overlapping too little) and overlap ``(B,)``."""
    size = tuple(support.shape[-2:])
    grid, _, _ = _grids(matrices, size)
    mask = _inside(grid, input.shape[-2:]).to(torch.float64)
    overlap = mask.flatten(1).mean(dim=1)
    sampled = _sample(input.expand(len(matrices), -1, -1, -1), grid)[:, 0].double()
    ncc, *_ = _masked_ncc(sampled, support[0, 0].double().expand_as(sampled), mask)
    ok = _admissible(matrices) & (overlap >= min_overlap)
    return torch.where(ok, ncc, torch.full_like(ncc, -1.0)), torch.where(_admissible(matrices), overlap, 0.0)


def ncc_score(input: Tensor, support: Tensor, matrix: Tensor, min_overlap: float = 0.25) -> tuple[float, float]:
    """NCC of ``input`` warped by ``matrix`` against ``support`` over their overlap, and the overlap fraction.

    Args:
        input: ``(1, 1, H_in, W_in)`` float.
        support: ``(1, 1, H, W)`` float.
        matrix: ``(3, 3)`` ``input_norm_from_support_norm``.
        min_overlap: below this overlap fraction the score is ``-1``; a matrix that puts a support
            corner on or beyond the horizon scores ``(-1, 0)``.

    Examples
    --------
    >>> image = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    >>> round(ncc_score(image, image, torch.eye(3, dtype=torch.float64))[0], 6)
    1.0
    """
    score, overlap = _ncc_batch(input, support, matrix.to(torch.float64)[None], min_overlap)
    return float(score[0]), float(overlap[0])


def _corner_updates(d: Tensor) -> Tensor:
    """Batched :func:`corner_update`: ``(B, 8)`` offsets to ``(B, 3, 3)`` (NaN where the solve fails)."""
    batch = d.shape[0]
    square = torch.as_tensor(_SQUARE, dtype=torch.float64)
    x, y = square[:, 0].expand(batch, 4), square[:, 1].expand(batch, 4)
    dst = square + d.to(torch.float64).view(batch, 4, 2)
    u, v = dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(u), torch.zeros_like(u)
    rows_u = torch.stack((x, y, one, zero, zero, zero, -u * x, -u * y), dim=-1)
    rows_v = torch.stack((zero, zero, zero, x, y, one, -v * x, -v * y), dim=-1)
    a = torch.stack((rows_u, rows_v), dim=2).reshape(batch, 8, 8)
    h, info = torch.linalg.solve_ex(a, dst.reshape(batch, 8))
    h = torch.where((info == 0).view(-1, 1), h, torch.full_like(h, float("nan")))
    return torch.cat((h, torch.ones(batch, 1, dtype=torch.float64)), dim=1).view(batch, 3, 3)


def _corner_generators() -> Tensor:
    """``dC/dd_k`` at ``d = 0`` (``(8, 3, 3)``): how each corner offset changes the update matrix."""
    step = 1e-6
    return (_corner_updates(torch.eye(8, dtype=torch.float64) * step) - torch.eye(3, dtype=torch.float64)) / step


_GENERATORS: Tensor | None = None


def _refine_level(
    input: Tensor, support: Tensor, matrices: Tensor, iterations: int, tol: float, min_overlap: float
) -> tuple[Tensor, Tensor]:
    """Levenberg-Marquardt on one level for a batch of starts ``(B, 3, 3)``; returns them and their NCC ``(B,)``.

    Each start keeps its own damping; a step is kept only where it raises the NCC.
    """
    global _GENERATORS
    if _GENERATORS is None:
        _GENERATORS = _corner_generators()
    size = tuple(support.shape[-2:])
    in_size = tuple(input.shape[-2:])
    batch = matrices.shape[0]
    grad_x, grad_y = _gradients(input)
    stack = torch.cat((input, grad_x, grad_y), dim=1).double()
    target = support[0, 0].double()
    best, _ = _ncc_batch(input, support, matrices, min_overlap)
    damping = torch.full((batch,), 1e-3, dtype=torch.float64)
    active = best > -1.0
    eye8 = torch.eye(8, dtype=torch.float64)
    for _ in range(iterations):
        if not bool(active.any()):
            break
        grid, w, points = _grids(matrices, size)
        mask = _inside(grid, in_size).to(torch.float64)
        sampled = _sample(stack.expand(batch, -1, -1, -1), grid)  # (B, 3, H, W): image, d/dx, d/dy
        # Jacobian of the sampled image w.r.t. the corner offsets of M <- M @ C(d), at d = 0:
        # with e_k = M G_k p, the grid point x = q_xy / q_w moves by (e_k,xy - x e_k,w) / q_w.
        e = torch.einsum("bij,kjl,lhw->bkihw", torch.nan_to_num(matrices), _GENERATORS, points)  # (B, 8, 3, H, W)
        x, y = grid[..., 0].unsqueeze(1), grid[..., 1].unsqueeze(1)
        w = w.unsqueeze(1)
        jac = sampled[:, 1:2] * (e[:, :, 0] - x * e[:, :, 2]) / w + sampled[:, 2:3] * (e[:, :, 1] - y * e[:, :, 2]) / w
        _, a_centred, b_centred, a_norm, b_norm = _masked_ncc(sampled[:, 0], target.expand(batch, -1, -1), mask)
        usable = active & (a_norm > 0) & (b_norm > 0)
        a_norm, b_norm = a_norm.clamp_min(1e-12), b_norm.clamp_min(1e-12)
        residual = a_centred / a_norm.view(-1, 1, 1) - b_centred / b_norm.view(-1, 1, 1)  # (B, H, W)
        count = mask.flatten(1).sum(dim=1).clamp_min(1.0)
        jac_mean = (jac * mask.unsqueeze(1)).flatten(2).sum(dim=2) / count.view(-1, 1)
        jac = (jac - jac_mean.view(batch, 8, 1, 1)) * mask.unsqueeze(1) / a_norm.view(-1, 1, 1, 1)
        flat = jac.flatten(2)  # (B, 8, P)
        hessian = flat @ flat.transpose(1, 2)
        gradient = (flat * residual.flatten(1).unsqueeze(1)).sum(dim=2)
        system = hessian + damping.view(-1, 1, 1) * torch.diag_embed(torch.diagonal(hessian, dim1=1, dim2=2)) + 1e-12 * eye8
        delta, info = torch.linalg.solve_ex(system, -gradient)
        delta = torch.where((info == 0).view(-1, 1), delta, torch.zeros_like(delta))
        candidates = matrices @ _corner_updates(delta)
        candidates = candidates / candidates[:, 2:3, 2:3]
        scores, _ = _ncc_batch(input, support, candidates, min_overlap)
        accept = usable & (scores > best)
        matrices = torch.where(accept.view(-1, 1, 1), candidates, matrices)
        best = torch.where(accept, scores, best)
        damping = torch.where(accept, (damping * 0.3).clamp_min(1e-7), damping * 10.0)
        # A start is done when its accepted step is tiny, or when the damping has grown past use.
        small = delta.abs().amax(dim=1) < tol
        active = usable & ~(accept & small) & (damping < 1e6)
    return matrices, best


def candidate_matrices(
    input: Tensor, support: Tensor, network: Tensor | None = None, *, features: bool = True, search: bool = True
) -> dict[str, Tensor]:
    """Starting points for :func:`refine_alignment`.

    ``"network"``: the given estimate; ``"features"``: SIFT + RANSAC on the
    same views (needs OpenCV and at least 8 inliers, else left out);
    ``"search1"``... ``"search8"``: the eight best-correlated of a coarse grid of
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


def _grid_search(input: Tensor, support: Tensor, side: int = 32, keep: int = 8) -> list[Tensor]:
    """The ``keep`` best-correlated similarity warps of a coarse grid (scored by NCC at ``side`` px), best first.

    The grid: shifts of -0.4 to 0.4 half-widths in steps of 0.2 (25), zooms 0.8, 1 and 1.25, and
    rotations of -15, 0 and 15 degrees: 225 warps, scored in one batch.
    """
    scale = side / max(input.shape[-2:])
    small_input, small_support = _pyramid_level(input.double(), scale), _pyramid_level(support.double(), scale)
    shifts = torch.tensor([-0.4, -0.2, 0.0, 0.2, 0.4], dtype=torch.float64)
    zooms = torch.tensor([1.0, 0.8, 1.25], dtype=torch.float64)
    angles = torch.deg2rad(torch.tensor([0.0, -15.0, 15.0], dtype=torch.float64))
    angle, zoom, tx, ty = torch.meshgrid(angles, zooms, shifts, shifts, indexing="ij")
    angle, zoom = angle.reshape(-1), zoom.reshape(-1)
    matrices = torch.zeros(angle.numel(), 3, 3, dtype=torch.float64)
    matrices[:, 0, 0], matrices[:, 0, 1] = zoom * torch.cos(angle), -zoom * torch.sin(angle)
    matrices[:, 1, 0], matrices[:, 1, 1] = zoom * torch.sin(angle), zoom * torch.cos(angle)
    matrices[:, 0, 2], matrices[:, 1, 2], matrices[:, 2, 2] = tx.reshape(-1), ty.reshape(-1), 1.0
    scores, _ = _ncc_batch(small_input, small_support, matrices, 0.5)
    order = torch.argsort(-scores, stable=True)[:keep]
    return [matrices[i] for i in order.tolist()]


def _sift_matrix(input: Tensor, support: Tensor, min_inliers: int = 8) -> Tensor | None:
    """SIFT + RANSAC (:func:`~stnkit.models.imaging.sift_homography`) as a normalised backward matrix, or None."""
    a = (input[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    b = (support[0, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    try:
        fit = sift_homography(a, b)
    except ImportError:  # no OpenCV: no features start
        return None
    if fit.support_pix_from_input_pix is None or fit.inliers < min_inliers:
        return None
    try:
        backward = np.linalg.inv(fit.support_pix_from_input_pix)
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
    survivors: int = 3,
) -> RefinementResult:
    """Refine a homography by maximising the NCC of the warped input and the support, coarse to fine.

    Args:
        input: ``(1, 1, H_in, W_in)`` float greyscale in ``[0, 1]``.
        support: ``(1, 1, H, W)`` float greyscale in ``[0, 1]``.
        candidates: starting matrices by name (``(3, 3)`` ``input_norm_from_support_norm``), or one matrix.
            All are refined at the coarsest level, the ``survivors`` best-correlated at the next, the best
            one from there on.
        levels: pyramid scales, coarse to fine (1.0 is the given size).
        iterations: Levenberg-Marquardt iterations per level.
        tol: stop a level when the largest corner step (normalised units) is below this.
        min_overlap: least fraction of support pixels that must read inside the input (a warp that
            leaves less is scored -1: a small overlap can correlate well by chance).
        survivors: how many starts go on from the coarsest level to the next.

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
    # A funnel: every start is refined (all at once) at the coarsest level, the best `survivors`
    # of them at the next, and the single best from there on.
    names = [name for name, m in candidates.items() if bool(_admissible(m.to(torch.float64).view(1, 3, 3))[0])
             and float(m[2, 2]) != 0.0]
    if not names:
        raise ValueError("no finite starting matrix among the candidates")
    matrices = torch.stack([candidates[name].to(torch.float64) / candidates[name][2, 2] for name in names])
    for index, ((level_input, level_support), count) in enumerate(zip(pyramid, iterations)):
        matrices, scores = _refine_level(level_input, level_support, matrices, count, tol, min_overlap)
        keep = survivors if index == 0 else 1
        # Stable: among equal scores the earlier start (the order of preference) survives.
        order = torch.argsort(-scores, stable=True)[:keep]
        matrices, names = matrices[order], [names[i] for i in order.tolist()]
    best_name, matrix = names[0], matrices[0]
    score, overlap = ncc_score(input, support, matrix, min_overlap)
    return RefinementResult(matrix=matrix, ncc=score, overlap=overlap, start=str(best_name))
