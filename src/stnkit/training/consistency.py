"""A consistency loss that teaches a spatial transformer to canonicalise.

Not in the ST paper. The paper's localisation net learns only from the
classification loss, and a classifier that copes with some leftover pose gives
it little reason to remove that pose: the RTS transformer shipped until the
eighteenth session undid scale and position almost fully but left most of the
rotation to the classifier (``benchmarks/RESULTS.md``, eighteenth session). Finnveden, Jansson and
Lindeberg (2020) measure exactly this as the spread of the canonical frame.

The loss makes that spread a training signal, without labels. Each training
image ``x`` is warped once more by a small random similarity ``T`` of our own
choosing, ``x2(p) = x(T p)``. If the transformer predicts the backward map
``M1`` (canonical frame -> ``x``) for ``x`` and ``M2`` for ``x2``, then the
canonical frame it finds through ``x2`` is ``T M2`` in ``x``'s coordinates; a
transformer that canonicalises consistently finds the same frame both ways, so
``R = M1^-1 T M2`` is the identity. The loss is the mean squared distance, in
normalised canonical coordinates, by which ``R`` moves the four corners of the
canonical frame. It is measured in the canonical frame, so shrinking the frame
(a transformer that zooms in on nothing) does not lower it.

Convention: all matrices are ``(N, 3, 3)`` backward maps (output -> input) in
normalised coordinates, as :meth:`stnkit.transforms.MatrixTransform.matrix`
returns them; ``T``'s rotation is a true rotation in pixels for any aspect ratio.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stnkit.modules import SpatialTransformer
from stnkit.sampling import warp
from stnkit.transforms import MatrixTransform

__all__ = ["random_similarity", "consistency_loss", "sampled_consistency_loss"]

# Corners of the canonical frame, homogeneous columns (3, 4).
_CORNERS = ((-1.0, 1.0, 1.0, -1.0), (-1.0, -1.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0))


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")


def random_similarity(
    batch: int,
    size: tuple[int, int],
    *,
    rotation: float,
    scale: float,
    shift: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Random similarity transforms ``T`` about the image centre, as ``(batch, 3, 3)`` backward matrices.

    Args:
        batch: number of transforms.
        size: ``(H, W)`` of the images they act on.
        rotation: angles are uniform in ``[-rotation, rotation]`` degrees.
        scale: ``ln`` of the scale is uniform in ``[-scale, scale]``.
        shift: each coordinate of the translation is uniform in ``[-shift, shift]``,
            in normalised units (1 is half the image).
        generator: for reproducible draws (drawn on the CPU, then moved).

    Convention: backward maps (output -> input), normalised coordinates.

    Examples
    --------
    >>> t = random_similarity(2, (28, 28), rotation=0.0, scale=0.0, shift=0.0)
    >>> torch.equal(t, torch.eye(3).expand(2, 3, 3))
    True
    """
    for name, value in (("rotation", rotation), ("scale", scale), ("shift", shift)):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    height, width = int(size[0]), int(size[1])
    draws = torch.rand(batch, 4, generator=generator, dtype=torch.float64) * 2.0 - 1.0  # uniform in [-1, 1]
    angle = torch.deg2rad(draws[:, 0] * rotation)
    factor = torch.exp(draws[:, 1] * scale)
    cos, sin = torch.cos(angle) * factor, torch.sin(angle) * factor
    # A rotation in pixels is, in normalised units, diag(2/W, 2/H) R diag(W/2, H/2).
    matrix = torch.zeros(batch, 3, 3, dtype=torch.float64)
    matrix[:, 0, 0], matrix[:, 0, 1] = cos, -sin * height / width
    matrix[:, 1, 0], matrix[:, 1, 1] = sin * width / height, cos
    matrix[:, 0, 2], matrix[:, 1, 2] = draws[:, 2] * shift, draws[:, 3] * shift
    matrix[:, 2, 2] = 1.0
    return matrix.to(device=device, dtype=dtype)


def consistency_loss(transformer: SpatialTransformer, x: Tensor, transform_matrix: Tensor) -> Tensor:
    """How far the transformer's canonical frames for ``x`` and for ``x`` warped by ``T`` disagree.

    Args:
        transformer: a :class:`~stnkit.modules.SpatialTransformer` whose
            transform has a matrix (every family but TPS and displacement fields).
        x: ``(N, C, H, W)`` images.
        transform_matrix: ``(N, 3, 3)`` backward matrices ``T`` (see :func:`random_similarity`).

    Returns:
        A scalar: the mean squared corner distance of ``M1^-1 T M2`` from the
        identity, normalised canonical units (0 for a consistent transformer).

    Convention: backward maps (output -> input), normalised coordinates.

    Examples
    --------
    >>> from stnkit.models.classifiers import classifier
    >>> model = classifier("st-cnn", "affine", (28, 28))  # its transformer starts at the identity
    >>> x = torch.rand(4, 1, 28, 28)
    >>> shift = torch.eye(3).repeat(4, 1, 1)
    >>> shift[:, 0, 2] = 0.1  # T samples 0.1 to the right, so each corner moves by 0.1
    >>> round(consistency_loss(model.transformer, x, shift).item(), 4)  # M1 = M2 = I: T's own 0.1 ** 2
    0.01
    """
    if not isinstance(transformer, SpatialTransformer):
        raise TypeError(f"transformer must be a SpatialTransformer, got {type(transformer).__name__}")
    if not isinstance(transformer.transform, MatrixTransform):
        raise ValueError(
            f"the consistency loss needs a transform with a matrix (affine, projective, similarity, ...), "
            f"got {transformer.transform.name!r}"
        )
    _check_images(x)
    batch = x.shape[0]
    if not isinstance(transform_matrix, Tensor) or transform_matrix.shape != (batch, 3, 3):
        raise ValueError(f"transform_matrix must be ({batch}, 3, 3), got {getattr(transform_matrix, 'shape', None)}")
    transform_matrix = transform_matrix.to(device=x.device, dtype=x.dtype)
    # Zero padding: what T brings in from outside the image is blank, as the distortions' own canvas is.
    moved = warp(x, transform_matrix[:, :2, :].reshape(batch, 6), "affine")
    # One localisation pass for both views (the paper's localisation nets have no batch statistics).
    theta = transformer.predict_theta(torch.cat((x, moved)))
    # The 3x3 algebra in at least float32, also under autocast: a bfloat16 product of near-identity
    # matrices would drown the small disagreements the loss is about.
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        matrices = transformer.transform.matrix(theta.to(dtype))
        original, through_moved = matrices[:batch], matrices[batch:]
        relative = torch.linalg.solve(original, transform_matrix.to(dtype) @ through_moved)
        corners = torch.tensor(_CORNERS, dtype=dtype, device=x.device)
        mapped = relative @ corners
        mapped = mapped[:, :2] / mapped[:, 2:]
        return (mapped - corners[:2]).square().sum(dim=1).mean()


def sampled_consistency_loss(
    transformer: SpatialTransformer,
    x: Tensor,
    *,
    rotation: float,
    scale: float,
    shift: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`consistency_loss` with a fresh :func:`random_similarity` ``T`` per image.

    This is one training step's term of ``stnkit train --consistency W``.

    Args:
        transformer: as for :func:`consistency_loss`.
        x: ``(N, C, H, W)`` images.
        rotation, scale, shift: the ranges of ``T``, as for :func:`random_similarity`.
        generator: for reproducible draws.

    Returns:
        A scalar, as :func:`consistency_loss` returns it.

    Convention: backward maps (output -> input), normalised coordinates.

    Examples
    --------
    >>> from stnkit.models.classifiers import classifier
    >>> model = classifier("st-cnn", "affine", (28, 28))
    >>> x = torch.rand(4, 1, 28, 28)
    >>> loss = sampled_consistency_loss(model.transformer, x, rotation=20, scale=0.1, shift=0.1)
    >>> loss.shape, bool(loss > 0)  # > 0: a transformer that ignores the image scores T itself
    (torch.Size([]), True)
    """
    _check_images(x)
    similarity = random_similarity(
        len(x), tuple(x.shape[-2:]), rotation=rotation, scale=scale, shift=shift,
        generator=generator, device=x.device, dtype=x.dtype,
    )  # fmt: skip
    return consistency_loss(transformer, x, similarity)
