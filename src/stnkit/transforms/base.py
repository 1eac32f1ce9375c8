"""The interface every transform family shares, and the library's coordinate convention.

Convention
----------
Every transform in stnkit is a *backward* map: it takes a point of the
**output** image and returns the point of the **input** image that is sampled
there (this is what :func:`torch.nn.functional.affine_grid` computes, and what
OpenCV calls ``WARP_INVERSE_MAP``).

Points are in **normalised coordinates**: ``x`` runs left to right and ``y``
top to bottom, and ``-1`` and ``+1`` are the outer *edges* of the image, so the
centre of pixel ``i`` of an axis of ``n`` pixels lies at ``(2 i + 1) / n - 1``
(``align_corners=False`` in PyTorch's terms). With this choice the identity
transform reproduces the input exactly, and an image keeps its meaning when it
is resampled to another size.

Pixel coordinates put the centre of the top-left pixel at ``(0, 0)``, ``x``
along columns and ``y`` along rows, as OpenCV does. :meth:`MatrixTransform.to_pixels`
converts a transform to the 3x3 matrix ``src_pix_from_dst_pix``, so that
``cv2.warpPerspective(img, M, (W_out, H_out), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)``
produces the same image as :func:`stnkit.warp`.

Sizes are always ``(height, width)``. Parameters ``theta`` are a floating
tensor of shape ``(B, num_params)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor

Size = tuple[int, int]


def _is_compiling() -> bool:
    # Data-dependent checks (isfinite) break torch.compile graphs; skip them there.
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


# --- robustness (see docs/reliability.md) -------------------------------------
#: Grid coordinates are clamped to +/- this (normalised units): a million image
#: half-widths is outside any image, and keeps the sampler's unnormalisation finite.
GRID_LIMIT = 1e6


def grid_limit(dtype: torch.dtype) -> float:
    """The largest grid coordinate kept in ``dtype``: :data:`GRID_LIMIT`, or less where ``dtype`` overflows first.

    Examples
    --------
    >>> grid_limit(torch.float32), grid_limit(torch.float16)
    (1000000.0, 32.0)
    """
    # float16 tops out at 65504: keep a margin so (x + 1) * W / 2 stays finite for W up to 1024.
    return min(GRID_LIMIT, float(2 ** math.floor(math.log2(torch.finfo(dtype).max / 1024))))


_VALUE_CHECKS_DEFERRED = contextvars.ContextVar("stnkit_value_checks_deferred", default=False)


@contextlib.contextmanager
def deferred_value_checks():
    """Skip the per-call value checks (finite theta, non-zero h33) inside; the caller checks once.

    Every value check reads a tensor on the host, which on a GPU waits for the
    device: a warp made of several checked steps would synchronise several
    times. A caller that enters this context must check its final result itself
    (the fused warp does, in one reduction over the matrix) and re-run the
    checked steps to name the error when that check fails.
    """
    if _is_compiling():  # no value checks while compiling anyway; Dynamo cannot trace ContextVar
        yield
        return
    token = _VALUE_CHECKS_DEFERRED.set(True)
    try:
        yield
    finally:
        _VALUE_CHECKS_DEFERRED.reset(token)


def _data_checks_enabled() -> bool:
    """False while compiling, tracing or exporting, where data-dependent checks break the graph,
    and inside :func:`deferred_value_checks`."""
    if _is_compiling():
        return False
    onnx = getattr(torch, "onnx", None)
    exporting = bool(onnx is not None and hasattr(onnx, "is_in_onnx_export") and onnx.is_in_onnx_export())
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or exporting or _VALUE_CHECKS_DEFERRED.get())


def check_size(size: Sequence[int], name: str = "out_size") -> Size:
    """Validate a ``(height, width)`` pair of positive integers and return it as a tuple."""
    if isinstance(size, torch.Size):
        size = tuple(size)
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        raise ValueError(f"{name} must be a (height, width) pair, got {size!r}")
    height, width = size
    if isinstance(height, bool) or isinstance(width, bool) or not all(isinstance(v, int) for v in (height, width)):
        raise TypeError(f"{name} must hold two integers, got {size!r}")
    if height < 1 or width < 1:
        raise ValueError(f"{name} must be positive, got {size!r}")
    return int(height), int(width)


def normalised_pixel_centres(size: Size, *, device=None, dtype=None) -> tuple[Tensor, Tensor]:
    """Normalised coordinates of the pixel centres along ``y`` (H,) and ``x`` (W,).

    Convention: ``-1`` and ``+1`` are the image edges (align_corners=False).

    Examples
    --------
    >>> ys, xs = normalised_pixel_centres((2, 4))
    >>> xs.tolist()
    [-0.75, -0.25, 0.25, 0.75]
    """
    height, width = size
    dtype = dtype or torch.get_default_dtype()
    ys = (torch.arange(height, device=device, dtype=dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=device, dtype=dtype) * 2 + 1) / width - 1
    return ys, xs


def norm_from_pix(size: Size, *, dtype=torch.float64, device=None) -> Tensor:
    """The 3x3 matrix that maps pixel coordinates of an image of ``size`` to normalised ones.

    Convention: pixel centres at integers, ``(0, 0)`` the top-left centre;
    normalised ``-1``/``+1`` at the image edges.

    Examples
    --------
    >>> norm_from_pix((4, 8)) @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    tensor([-0.8750, -0.7500,  1.0000], dtype=torch.float64)
    """
    height, width = check_size(size, "size")
    return torch.tensor(
        [[2.0 / width, 0.0, 1.0 / width - 1.0], [0.0, 2.0 / height, 1.0 / height - 1.0], [0.0, 0.0, 1.0]],
        dtype=dtype,
        device=device,
    )


def pix_from_norm(size: Size, *, dtype=torch.float64, device=None) -> Tensor:
    """The inverse of :func:`norm_from_pix`: normalised coordinates to pixel coordinates."""
    height, width = check_size(size, "size")
    return torch.tensor(
        [[width / 2.0, 0.0, (width - 1) / 2.0], [0.0, height / 2.0, (height - 1) / 2.0], [0.0, 0.0, 1.0]],
        dtype=dtype,
        device=device,
    )


class Transform(ABC):
    """A family of spatial transformations with ``num_params`` parameters.

    Subclasses implement :meth:`identity`, :meth:`grid` and, where the family
    is closed under composition, :meth:`compose` and :meth:`inverse`.

    Convention: ``grid(theta, out_size)[b, i, j]`` is the normalised ``(x, y)``
    point of the input sampled at output pixel ``(i, j)``.
    """

    #: Short name used by :func:`get_transform` and in checkpoints.
    name: str = ""
    num_params: int = 0

    # ------------------------------------------------------------------ API
    @abstractmethod
    def identity(self, batch: int = 1, *, device=None, dtype=None) -> Tensor:
        """Parameters of the identity transform, shape ``(batch, num_params)``."""

    @abstractmethod
    def grid(self, theta: Tensor, out_size: Sequence[int]) -> Tensor:
        """Sampling grid ``(B, H_out, W_out, 2)`` of normalised input points for each output pixel."""

    def compose(self, first: Tensor, second: Tensor) -> Tensor:
        """Parameters of "warp by ``first``, then warp the result by ``second``"."""
        raise NotImplementedError(f"{type(self).__name__} does not support compose")

    def inverse(self, theta: Tensor) -> Tensor:
        """Parameters of the inverse transform."""
        raise NotImplementedError(f"{type(self).__name__} does not support inverse")

    def config(self) -> dict:
        """A JSON-able description that :func:`get_transform` turns back into this transform."""
        return {"name": self.name}

    # ----------------------------------------------------------- validation
    def check_theta(self, theta: Tensor) -> Tensor:
        """Validate ``theta`` and return it as ``(B, num_params)``; raise a clear error otherwise."""
        family = type(self).__name__
        if not isinstance(theta, Tensor):
            raise TypeError(f"{family}: theta must be a torch.Tensor, got {type(theta).__name__}")
        if not theta.is_floating_point():
            raise TypeError(f"{family}: theta must be a floating-point tensor, got dtype {theta.dtype}")
        if theta.dim() != 2 or theta.shape[1] != self.num_params:
            raise ValueError(
                f"{family}: theta must have shape (B, {self.num_params}), got {tuple(theta.shape)}"
            )
        if _data_checks_enabled() and not torch.isfinite(theta).all():
            raise ValueError(f"{family}: theta contains NaN or Inf")
        return theta

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.config() == other.config()  # type: ignore[union-attr]

    def __hash__(self) -> int:
        return hash(repr(self))


class MatrixTransform(Transform):
    """A family whose members are 3x3 matrices acting on homogeneous normalised points.

    Convention: ``matrix(theta)`` is ``src_norm_from_dst_norm``: it maps an
    output point ``(x, y, 1)`` (normalised) to the input point sampled there.
    """

    @abstractmethod
    def matrix(self, theta: Tensor) -> Tensor:
        """The ``(B, 3, 3)`` matrix ``src_norm_from_dst_norm`` of each member."""

    @abstractmethod
    def from_matrix(self, matrix: Tensor) -> Tensor:
        """Parameters of the family member given by ``matrix`` ``(B, 3, 3)``.

        Exact for any matrix of the family; for other matrices the result is a
        projection onto the family (documented per subclass).
        """

    def grid(self, theta: Tensor, out_size: Sequence[int]) -> Tensor:
        """Sampling grid ``(B, H_out, W_out, 2)``: ``matrix(theta)`` applied to every output pixel centre.

        Convention: backward map (output -> input), normalised coordinates.

        Examples
        --------
        >>> from stnkit.transforms import Affine
        >>> Affine().grid(Affine().identity(1), (2, 2))[0, :, :, 0].tolist()
        [[-0.5, 0.5], [-0.5, 0.5]]
        """
        out_size = check_size(out_size)
        theta = self.check_theta(theta)
        # 16-bit theta (autocast): built in float32, since bf16 holds ~3 digits (a pixel off
        # at 512 px); returned in float32 under autocast (the sampler's precision), else in
        # theta's dtype, clamped so that far points stay finite (see docs/reliability.md).
        work = torch.float32 if theta.dtype in (torch.float16, torch.bfloat16) else theta.dtype
        matrix = self.matrix(theta.to(work))
        if _data_checks_enabled() and not torch.isfinite(matrix).all():
            raise ValueError(
                f"{type(self).__name__}: degenerate transform, its matrix is not finite "
                "(e.g. projective corners with three collinear points, or parameters too large for the dtype)"
            )
        grid = apply_matrix_to_grid(matrix, out_size, projective=self.is_projective)
        out_dtype = work if work != theta.dtype and _autocast_on(theta.device.type) else theta.dtype
        if self.is_projective or out_dtype != work:
            limit = grid_limit(out_dtype)
            grid = grid.clamp(-limit, limit)
        return grid.to(out_dtype)

    #: Whether the bottom row of the matrix can differ from (0, 0, 1).
    is_projective: bool = False

    def compose(self, first: Tensor, second: Tensor) -> Tensor:
        """Parameters of warping by ``first`` and then warping the result by ``second``.

        Convention: ``warp(warp(x, first), second) == warp(x, compose(first, second))``
        (away from the borders); in matrices, ``matrix(first) @ matrix(second)``.
        """
        first, second = self.check_theta(first), self.check_theta(second)
        if first.shape[0] != second.shape[0] and 1 not in (first.shape[0], second.shape[0]):
            raise ValueError(f"compose: batch sizes differ ({first.shape[0]} vs {second.shape[0]})")
        return self.from_matrix(self.matrix(first) @ self.matrix(second))

    def inverse(self, theta: Tensor) -> Tensor:
        """Parameters of the inverse map, so that ``compose(theta, inverse(theta))`` is the identity.

        Raises
        ------
        ValueError
            If a matrix is singular (e.g. a zero scale): it has no inverse.
        """
        matrix = self.matrix(self.check_theta(theta))
        if not _data_checks_enabled():
            return self.from_matrix(torch.linalg.inv(matrix))
        inverse, info = torch.linalg.inv_ex(matrix)
        bad = (info != 0) | ~torch.isfinite(inverse).flatten(1).all(dim=1)
        if bad.any():
            items = bad.nonzero().flatten().tolist()
            raise ValueError(
                f"{type(self).__name__}.inverse: singular matrix for batch item(s) {items[:10]} "
                "(zero scale or collapsed linear part): it has no inverse"
            )
        return self.from_matrix(inverse)

    def to_pixels(self, theta: Tensor, in_size: Sequence[int], out_size: Sequence[int]) -> Tensor:
        """The ``(B, 3, 3)`` float64 matrix ``src_pix_from_dst_pix`` in pixel coordinates.

        Convention: maps an output pixel ``(x, y, 1)`` (pixel centres at
        integers) to the input pixel it samples, so that
        ``cv2.warpPerspective(img, M, (W_out, H_out), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)``
        equals :func:`stnkit.warp` with the same ``theta``.

        Examples
        --------
        >>> from stnkit.transforms import Translation
        >>> M = Translation().to_pixels(torch.tensor([[0.5, 0.0]]), (10, 10), (10, 10))
        >>> M[0, 0, 2].item()  # half the normalised width is 2.5 pixels
        2.5
        """
        in_size, out_size = check_size(in_size, "in_size"), check_size(out_size, "out_size")
        matrix = self.matrix(self.check_theta(theta)).to(torch.float64)
        return pix_from_norm(in_size, device=matrix.device) @ matrix @ norm_from_pix(out_size, device=matrix.device)

    def from_pixels(self, matrix: Tensor, in_size: Sequence[int], out_size: Sequence[int]) -> Tensor:
        """The inverse of :meth:`to_pixels`: parameters from a ``src_pix_from_dst_pix`` matrix."""
        in_size, out_size = check_size(in_size, "in_size"), check_size(out_size, "out_size")
        if matrix.dim() == 2:
            matrix = matrix.unsqueeze(0)
        if matrix.shape[-2:] != (3, 3):
            raise ValueError(f"matrix must have shape (B, 3, 3), got {tuple(matrix.shape)}")
        norm = norm_from_pix(in_size, device=matrix.device) @ matrix.to(torch.float64) @ pix_from_norm(
            out_size, device=matrix.device
        )
        return self.from_matrix(norm)


def apply_matrix_to_grid(matrix: Tensor, out_size: Size, *, projective: bool = True) -> Tensor:
    """Map the output pixel centres through ``matrix`` ``(B, 3, 3)`` and return ``(B, H, W, 2)``.

    Built with broadcast multiply-adds rather than a batched matmul over a
    materialised ``(H*W, 3)`` base grid: fewer passes over memory, and every
    operation exports to ONNX.
    """
    ys, xs = normalised_pixel_centres(out_size, device=matrix.device, dtype=matrix.dtype)
    xs = xs.view(1, 1, -1)
    ys = ys.view(1, -1, 1)
    m = matrix.unsqueeze(-1).unsqueeze(-1)  # (B, 3, 3, 1, 1)
    src_x = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]
    src_y = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
    if projective:
        src_w = m[:, 2, 0] * xs + m[:, 2, 1] * ys + m[:, 2, 2]
        # (MatrixTransform.grid clamps the result: x / eps can be ~1e7.)
        # Points on or behind the horizon (w <= 0) have no image: clamping w to a
        # tiny positive value sends them far outside the input instead of
        # mirroring them back in, and keeps the grid finite.
        src_w = src_w.clamp_min(torch.finfo(src_w.dtype).eps)
        src_x = src_x / src_w
        src_y = src_y / src_w
    return torch.stack((src_x, src_y), dim=-1)


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
