"""The transform families that are 3x3 matrices: translation up to homography.

Convention (all families here): ``matrix(theta)`` is ``src_norm_from_dst_norm``,
mapping an output point (normalised, ``-1``/``+1`` at the image edges) to the
input point sampled there. Rotations and scales act in normalised
coordinates, so they are rigid in pixels when input and output are square.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import MatrixTransform, _data_checks_enabled

__all__ = ["Translation", "Rotation", "Similarity", "ScaleTranslation", "Affine", "Projective"]


def _matrix_from_rows(row0: Tensor, row1: Tensor, row2: Tensor | None = None) -> Tensor:
    """Stack ``(B, 3)`` rows into ``(B, 3, 3)``; the default bottom row is ``(0, 0, 1)``."""
    if row2 is None:
        row2 = torch.zeros_like(row0)
        row2 = torch.cat((row2[:, :2], torch.ones_like(row2[:, 2:])), dim=1)
    return torch.stack((row0, row1, row2), dim=1)


def _check_matrix(matrix: Tensor) -> Tensor:
    if not isinstance(matrix, Tensor) or matrix.dim() != 3 or matrix.shape[1:] != (3, 3):
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"matrix must have shape (B, 3, 3), got {shape}")
    return matrix


def _affine_part(matrix: Tensor) -> Tensor:
    """Normalise a matrix so that its bottom-right entry is 1 (it is for every affine map)."""
    return matrix / _check_h33(matrix)


def _check_h33(matrix: Tensor) -> Tensor:
    """The ``(B, 1, 1)`` bottom-right entries; a zero one is a clear error, not a silent inf/NaN."""
    h33 = matrix[:, 2:3, 2:3]
    if _data_checks_enabled() and (h33 == 0).any():
        items = (h33.flatten() == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"matrix has a zero bottom-right entry for batch item(s) {items[:10]}: it sends the output centre "
            "to infinity, and no member of the family (h33 = 1) matches it"
        )
    return h33


class Translation(MatrixTransform):
    """Translation by ``(tx, ty)``: 2 parameters.

    Convention: ``theta = (tx, ty)`` in normalised units; output point ``p``
    samples input point ``p + (tx, ty)`` (a positive ``tx`` moves the content left).

    Examples
    --------
    >>> t = Translation()
    >>> t.matrix(torch.tensor([[0.5, -0.25]]))[0]
    tensor([[ 1.0000,  0.0000,  0.5000],
            [ 0.0000,  1.0000, -0.2500],
            [ 0.0000,  0.0000,  1.0000]])
    """

    name = "translation"
    num_params = 2

    def identity(self, batch: int = 1, *, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch, 2, device=device, dtype=dtype)

    def matrix(self, theta: Tensor) -> Tensor:
        theta = self.check_theta(theta)
        one, zero = torch.ones_like(theta[:, 0]), torch.zeros_like(theta[:, 0])
        row0 = torch.stack((one, zero, theta[:, 0]), dim=1)
        row1 = torch.stack((zero, one, theta[:, 1]), dim=1)
        return _matrix_from_rows(row0, row1)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """Translation part of ``matrix`` (the linear part is dropped)."""
        matrix = _affine_part(_check_matrix(matrix))
        return matrix[:, :2, 2].clone()


class Rotation(MatrixTransform):
    """Rigid motion: rotation by ``angle`` (radians) about the centre, then translation. 3 parameters.

    Convention: ``theta = (angle, tx, ty)``; the matrix is
    ``[[cos a, -sin a, tx], [sin a, cos a, ty]]`` mapping output to input
    (normalised), so a positive angle turns the *content* anticlockwise on screen
    (y points down).

    Examples
    --------
    >>> import math
    >>> m = Rotation().matrix(torch.tensor([[math.pi / 2, 0.0, 0.0]]))
    >>> (m[0, :2, :2].round() + 0.0).tolist()  # + 0.0 turns cos(pi/2)'s rounded -0.0 into 0.0
    [[0.0, -1.0], [1.0, 0.0]]
    """

    name = "rotation"
    num_params = 3

    def identity(self, batch: int = 1, *, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch, 3, device=device, dtype=dtype)

    def matrix(self, theta: Tensor) -> Tensor:
        theta = self.check_theta(theta)
        angle, tx, ty = theta.unbind(dim=1)
        cos, sin = torch.cos(angle), torch.sin(angle)
        row0 = torch.stack((cos, -sin, tx), dim=1)
        row1 = torch.stack((sin, cos, ty), dim=1)
        return _matrix_from_rows(row0, row1)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """Angle and translation of ``matrix``; the angle is that of its first column."""
        matrix = _affine_part(_check_matrix(matrix))
        angle = torch.atan2(matrix[:, 1, 0] - matrix[:, 0, 1], matrix[:, 0, 0] + matrix[:, 1, 1])
        return torch.stack((angle, matrix[:, 0, 2], matrix[:, 1, 2]), dim=1)


class Similarity(MatrixTransform):
    """Rotation, isotropic scale and translation: 4 parameters.

    Convention: ``theta = (scale, angle, tx, ty)`` with the matrix
    ``[[s cos a, -s sin a, tx], [s sin a, s cos a, ty]]`` (output to input,
    normalised). ``scale < 1`` samples a smaller region, i.e. zooms in.

    Examples
    --------
    >>> Similarity().identity(1)
    tensor([[1., 0., 0., 0.]])
    """

    name = "similarity"
    num_params = 4

    def identity(self, batch: int = 1, *, device=None, dtype=None) -> Tensor:
        theta = torch.zeros(batch, 4, device=device, dtype=dtype)
        theta[:, 0] = 1
        return theta

    def matrix(self, theta: Tensor) -> Tensor:
        theta = self.check_theta(theta)
        scale, angle, tx, ty = theta.unbind(dim=1)
        a, b = scale * torch.cos(angle), scale * torch.sin(angle)
        row0 = torch.stack((a, -b, tx), dim=1)
        row1 = torch.stack((b, a, ty), dim=1)
        return _matrix_from_rows(row0, row1)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """Closest similarity: the rotation-scale part of the linear block, and the translation."""
        matrix = _affine_part(_check_matrix(matrix))
        a = (matrix[:, 0, 0] + matrix[:, 1, 1]) / 2
        b = (matrix[:, 1, 0] - matrix[:, 0, 1]) / 2
        scale = torch.sqrt(a * a + b * b)
        return torch.stack((scale, torch.atan2(b, a), matrix[:, 0, 2], matrix[:, 1, 2]), dim=1)


class ScaleTranslation(MatrixTransform):
    """Isotropic scale and translation, the "attention" transform of the ST paper: 3 parameters.

    Convention: ``theta = (s, tx, ty)`` with the matrix ``[[s, 0, tx], [0, s, ty]]``
    (output to input, normalised): the output shows the input window of
    half-size ``s`` centred on ``(tx, ty)``.

    Examples
    --------
    >>> ScaleTranslation().matrix(torch.tensor([[0.5, 0.1, 0.2]]))[0, :2]
    tensor([[0.5000, 0.0000, 0.1000],
            [0.0000, 0.5000, 0.2000]])
    """

    name = "scale_translation"
    num_params = 3

    def identity(self, batch: int = 1, *, device=None, dtype=None) -> Tensor:
        theta = torch.zeros(batch, 3, device=device, dtype=dtype)
        theta[:, 0] = 1
        return theta

    def matrix(self, theta: Tensor) -> Tensor:
        theta = self.check_theta(theta)
        s, tx, ty = theta.unbind(dim=1)
        zero = torch.zeros_like(s)
        row0 = torch.stack((s, zero, tx), dim=1)
        row1 = torch.stack((zero, s, ty), dim=1)
        return _matrix_from_rows(row0, row1)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """Closest member: the mean of the diagonal as scale, and the translation."""
        matrix = _affine_part(_check_matrix(matrix))
        s = (matrix[:, 0, 0] + matrix[:, 1, 1]) / 2
        return torch.stack((s, matrix[:, 0, 2], matrix[:, 1, 2]), dim=1)


class Affine(MatrixTransform):
    """Full affine map: 6 parameters, the 2x3 matrix row by row.

    Convention: ``theta = (a, b, c, d, e, f)`` is the matrix
    ``[[a, b, c], [d, e, f]]`` exactly as :func:`torch.nn.functional.affine_grid`
    reads it (output to input, normalised), so the PyTorch tutorial's identity
    ``[1, 0, 0, 0, 1, 0]`` means the same here. A ``(B, 2, 3)`` tensor is
    accepted too.

    Examples
    --------
    >>> Affine().identity(1)
    tensor([[1., 0., 0., 0., 1., 0.]])
    """

    name = "affine"
    num_params = 6

    def identity(self, batch: int = 1, *, device=None, dtype=None) -> Tensor:
        return torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], device=device, dtype=dtype).repeat(batch, 1)

    def check_theta(self, theta: Tensor) -> Tensor:
        if isinstance(theta, Tensor) and theta.dim() == 3 and theta.shape[1:] == (2, 3):
            theta = theta.flatten(1)
        return super().check_theta(theta)

    def matrix(self, theta: Tensor) -> Tensor:
        theta = self.check_theta(theta)
        bottom = torch.zeros_like(theta[:, :3])
        bottom = torch.cat((bottom[:, :2], torch.ones_like(bottom[:, 2:])), dim=1)
        return torch.cat((theta, bottom), dim=1).view(-1, 3, 3)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """The top two rows of ``matrix`` after scaling its bottom-right entry to 1."""
        matrix = _affine_part(_check_matrix(matrix))
        return matrix[:, :2, :].reshape(-1, 6).clone()


# Corners of the output image in normalised coordinates, clockwise from top-left.
_CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))


class Projective(MatrixTransform):
    """Homography with ``h33 = 1``: 8 parameters, in one of two parametrisations.

    Parameters
    ----------
    parametrisation : {"matrix", "corners"}
        ``"matrix"``: ``theta = (h11, h12, h13, h21, h22, h23, h31, h32)``, the
        first eight entries of the 3x3 matrix row by row (identity
        ``[1, 0, 0, 0, 1, 0, 0, 0]``). ``"corners"``: ``theta`` holds the
        offsets ``(dx, dy)`` of the four output image corners (top-left,
        top-right, bottom-right, bottom-left): corner ``c`` samples the input at
        ``c + (dx, dy)``. Identity is all zeros; offsets are on the same scale
        as every parameter and so train better than raw matrix entries
        (DeTone et al., 2016).

    Convention: output to input, normalised coordinates.

    Examples
    --------
    >>> h = Projective("corners")
    >>> theta = torch.tensor([[0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    >>> corner = torch.tensor([-1.0, -1.0, 1.0])
    >>> mapped = h.matrix(theta)[0] @ corner
    >>> [round(v, 6) for v in (mapped[:2] / mapped[2]).tolist()]  # the top-left corner moved by 0.1 in x
    [-0.9, -1.0]
    """

    name = "projective"
    num_params = 8
    is_projective = True

    def __init__(self, parametrisation: str = "matrix") -> None:
        if parametrisation not in ("matrix", "corners"):
            raise ValueError(f"parametrisation must be 'matrix' or 'corners', got {parametrisation!r}")
        self.parametrisation = parametrisation

    def config(self) -> dict:
        return {"name": self.name, "parametrisation": self.parametrisation}

    def identity(self, batch: int = 1, *, device=None, dtype=None) -> Tensor:
        if self.parametrisation == "corners":
            return torch.zeros(batch, 8, device=device, dtype=dtype)
        return torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0], device=device, dtype=dtype).repeat(batch, 1)

    def matrix(self, theta: Tensor) -> Tensor:
        theta = self.check_theta(theta)
        if self.parametrisation == "corners":
            corners = torch.tensor(_CORNERS, device=theta.device, dtype=theta.dtype).expand(theta.shape[0], 4, 2)
            return homography_from_points(corners, corners + theta.view(-1, 4, 2))
        return torch.cat((theta, torch.ones_like(theta[:, :1])), dim=1).view(-1, 3, 3)

    def from_matrix(self, matrix: Tensor) -> Tensor:
        """Parameters of ``matrix`` after scaling its bottom-right entry to 1."""
        matrix = _check_matrix(matrix)
        matrix = matrix / _check_h33(matrix)
        if self.parametrisation == "corners":
            corners = torch.tensor(_CORNERS, device=matrix.device, dtype=matrix.dtype)
            homogeneous = torch.cat((corners, torch.ones_like(corners[:, :1])), dim=1)  # (4, 3)
            mapped = homogeneous @ matrix.transpose(1, 2)  # (B, 4, 3)
            mapped = mapped[..., :2] / mapped[..., 2:]
            return (mapped - corners).reshape(-1, 8)
        return matrix.reshape(-1, 9)[:, :8].clone()


def homography_from_points(src: Tensor, dst: Tensor) -> Tensor:
    """The homographies ``(B, 3, 3)`` with ``h33 = 1`` that map 4 points ``src`` onto ``dst``.

    Parameters
    ----------
    src, dst : Tensor
        ``(B, 4, 2)`` point sets; no three points of either may be collinear.

    Returns
    -------
    Tensor
        ``(B, 3, 3)`` matrices ``H`` with ``H @ (src, 1) ~ (dst, 1)``.

    Notes
    -----
    Closed form, differentiable in both point sets: ``A_p`` maps the
    projective basis ``e1, e2, e3, (1, 1, 1)`` onto the points ``p``, and
    ``H ~ A_dst adj(A_src)`` (the adjugate is the inverse up to scale, and the
    scale goes when ``h33`` is set to 1). Only multiply-adds and one division:
    no ``linalg.solve``, so it exports to ONNX and compiles without graph breaks.
    Computed in float64 (float32 on MPS). Degenerate point sets (three
    collinear points) give non-finite entries.

    Examples
    --------
    >>> square = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    >>> homography_from_points(square, square + 2)[0, :2, 2].tolist()
    [2.0, 2.0]
    """
    if src.shape != dst.shape or src.dim() != 3 or src.shape[1:] != (4, 2):
        raise ValueError(f"src and dst must both have shape (B, 4, 2), got {tuple(src.shape)} and {tuple(dst.shape)}")
    # float64 at least: products of four coordinates lose too much in float32 when points are far apart.
    work_dtype = torch.promote_types(src.dtype, torch.float64) if src.device.type != "mps" else src.dtype
    h = _adjugate(_basis_to_points(src.to(work_dtype)))
    h = _basis_to_points(dst.to(work_dtype)) @ h
    return (h / h[:, 2:3, 2:3]).to(src.dtype)


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """Cross products of ``(..., 3)`` vectors, as multiply-adds (exports everywhere)."""
    a0, a1, a2 = a.unbind(-1)
    b0, b1, b2 = b.unbind(-1)
    return torch.stack((a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0), dim=-1)


def _basis_to_points(points: Tensor) -> Tensor:
    """``(B, 3, 3)`` matrices (up to scale) taking ``e1, e2, e3, (1, 1, 1)`` to 4 points ``(B, 4, 2)``."""
    homogeneous = torch.cat((points, torch.ones_like(points[..., :1])), dim=-1)  # (B, 4, 3)
    p1, p2, p3, p4 = homogeneous.unbind(1)
    # Columns lambda_i p_i with sum_i lambda_i p_i = p4: Cramer's rule, without the common 1/det.
    weights = torch.stack(((_cross(p2, p3) * p4).sum(-1), (_cross(p3, p1) * p4).sum(-1), (_cross(p1, p2) * p4).sum(-1)), dim=-1)
    return (homogeneous[:, :3] * weights.unsqueeze(-1)).transpose(1, 2)


def _adjugate(matrix: Tensor) -> Tensor:
    """Adjugate of ``(B, 3, 3)`` matrices (``det * inverse``): rows are cross products of the columns."""
    c0, c1, c2 = matrix.unbind(-1)
    return torch.stack((_cross(c1, c2), _cross(c2, c0), _cross(c0, c1)), dim=1)
