"""The sampler (S): read the input at the grid points, with gradients to the input and the grid.

Convention: a grid ``(B, H_out, W_out, 2)`` holds, for every output pixel, the
normalised ``(x, y)`` input point to read, with ``-1``/``+1`` at the outer
edges of the input (``align_corners=False``); see :mod:`stnkit.transforms.base`.
"""

from __future__ import annotations

import enum
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..transforms import Transform, get_transform
from ..transforms.base import _data_checks_enabled, _is_compiling, check_size, deferred_value_checks, grid_limit

__all__ = ["InterpolationMode", "PaddingMode", "sample", "warp"]


class InterpolationMode(str, enum.Enum):
    """How the sampler reads between pixels."""

    BILINEAR = "bilinear"
    NEAREST = "nearest"
    BICUBIC = "bicubic"


class PaddingMode(str, enum.Enum):
    """What the sampler reads outside the input.

    ``FILL`` reads a constant ``fill_value`` (a scalar or one value per
    channel); ``ZEROS`` is ``FILL`` with zero; ``BORDER`` repeats the edge
    pixels; ``REFLECTION`` mirrors the image about its edges.
    """

    ZEROS = "zeros"
    BORDER = "border"
    REFLECTION = "reflection"
    FILL = "fill"


def _parse_enum(enum_type: type[enum.Enum], value, argument: str):
    try:
        return enum_type(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        expected = ", ".join(repr(member.value) for member in enum_type)
        raise ValueError(f"unknown {argument} {value!r}; expected one of {expected}") from None


def _check_image(x: Tensor, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {x.dim()} dimensions {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert with x.float() (and scale to [0, 1])"
        )
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name} must have a non-empty image, got shape {tuple(x.shape)}")
    return x


def _fill_tensor(fill_value: float | Sequence[float] | Tensor, x: Tensor) -> Tensor:
    """``fill_value`` as a tensor broadcastable to ``x`` (a scalar or one value per channel)."""
    fill = torch.as_tensor(fill_value, dtype=x.dtype, device=x.device)
    if fill.dim() == 0:
        return fill
    if fill.dim() != 1 or fill.numel() not in (1, x.shape[1]):
        raise ValueError(
            f"fill_value must be a scalar or hold one value per channel ({x.shape[1]}), got shape {tuple(fill.shape)}"
        )
    return fill.view(1, -1, 1, 1)


def sample(
    x: Tensor,
    grid: Tensor,
    mode: InterpolationMode | str = "bilinear",
    padding_mode: PaddingMode | str = "zeros",
    fill_value: float | Sequence[float] | Tensor = 0.0,
) -> Tensor:
    """Read ``x`` at the normalised points of ``grid``.

    Parameters
    ----------
    x : Tensor
        Input images ``(N, C, H_in, W_in)``, floating point.
    grid : Tensor
        Sampling points ``(N, H_out, W_out, 2)`` or ``(1, H_out, W_out, 2)``
        (shared by the batch); last axis ``(x, y)``.
    mode : {"bilinear", "nearest", "bicubic"}
        Interpolation. Bicubic uses the Keys kernel (a = -0.75) and may overshoot the input range.
    padding_mode : {"zeros", "border", "reflection", "fill"}
        What is read outside the input.
    fill_value : float, sequence of float or Tensor
        The constant read outside the input with ``padding_mode="fill"``: a
        scalar or one value per channel. Useful on normalised inputs, where
        zero is not the background.

    Returns
    -------
    Tensor
        ``(N, C, H_out, W_out)``, differentiable w.r.t. ``x`` and ``grid``;
        finite for finite ``x``: grid points beyond ``+/-1e6`` (``+/-32`` in
        float16), infinite ones included, are read as if they were there.

    Raises
    ------
    ValueError
        If ``grid`` holds NaN (checked outside compiling/tracing/export).

    Convention: ``grid`` holds input points in normalised coordinates, ``-1``
    and ``+1`` at the input's outer edges (align_corners=False).

    Examples
    --------
    >>> from stnkit.transforms import Affine
    >>> x = torch.rand(2, 3, 8, 8)
    >>> grid = Affine().grid(Affine().identity(2), (8, 8))
    >>> torch.allclose(sample(x, grid), x, atol=1e-6)
    True
    >>> sample(x, grid + 10, padding_mode="fill", fill_value=[0.5, 0.4, 0.3])[0, :, 0, 0]
    tensor([0.5000, 0.4000, 0.3000])
    """
    x = _check_image(x)
    mode = _parse_enum(InterpolationMode, mode, "mode")
    padding_mode = _parse_enum(PaddingMode, padding_mode, "padding_mode")
    if not isinstance(grid, Tensor):
        raise TypeError(f"grid must be a torch.Tensor, got {type(grid).__name__}")
    if grid.dim() != 4 or grid.shape[-1] != 2:
        raise ValueError(f"grid must have shape (N, H_out, W_out, 2), got {tuple(grid.shape)}")
    if grid.shape[0] != x.shape[0]:
        if grid.shape[0] != 1:
            raise ValueError(f"batch mismatch: x has {x.shape[0]} images but grid has {grid.shape[0]}")
        grid = grid.expand(x.shape[0], -1, -1, -1)
    if not grid.is_floating_point():
        raise TypeError(f"grid must be a floating-point tensor, got dtype {grid.dtype}")
    grid = grid.to(x.dtype)
    # --- finiteness guarantee (docs/reliability.md): a NaN point has no meaning, so it is a
    # clear error; infinite or huge points are clamped to +/- grid_limit (far outside any
    # image), where grid_sample would otherwise return NaN (zeros padding, bicubic).
    if _data_checks_enabled() and torch.isnan(grid).any():
        raise ValueError("grid contains NaN points: the transform is degenerate (check theta and the grid's source)")
    limit = grid_limit(grid.dtype)
    grid = grid.clamp(-limit, limit)

    if padding_mode is PaddingMode.FILL:
        fill = _fill_tensor(fill_value, x)
        # Interpolation weights sum to one, so sampling (x - fill) with zero
        # padding and adding fill back reads exactly `fill` outside the input
        # and blends towards it at the border, for every mode and channel count.
        out = F.grid_sample(x - fill, grid, mode=mode.value, padding_mode="zeros", align_corners=False)
        return out + fill
    return F.grid_sample(x, grid, mode=mode.value, padding_mode=padding_mode.value, align_corners=False)


def warp(
    x: Tensor,
    theta: Tensor,
    transform: Transform | str,
    out_size: Sequence[int] | None = None,
    mode: InterpolationMode | str = "bilinear",
    padding_mode: PaddingMode | str = "zeros",
    fill_value: float | Sequence[float] | Tensor = 0.0,
) -> Tensor:
    """Warp ``x`` by the transform with parameters ``theta``: grid generator and sampler in one call.

    Parameters
    ----------
    x : Tensor
        Input images ``(N, C, H_in, W_in)``, floating point.
    theta : Tensor
        Parameters ``(N, transform.num_params)`` (or ``(1, P)``, shared by the batch).
    transform : Transform or str
        The family, as an instance or a name (``"affine"``, ``"projective"``, ``"tps"``, ...).
    out_size : (int, int), optional
        ``(H_out, W_out)``; defaults to the input size.
    mode, padding_mode, fill_value
        As in :func:`sample`.

    Returns
    -------
    Tensor
        ``(N, C, H_out, W_out)``, differentiable w.r.t. ``x`` and ``theta``.

    Convention: ``theta`` maps each output point to the input point sampled
    there (backward map), in normalised coordinates (``-1``/``+1`` at the image
    edges). For the matrix families, ``transform.to_pixels(theta, in_size,
    out_size)`` is the same map in pixels, as OpenCV's ``WARP_INVERSE_MAP`` reads it.

    Examples
    --------
    >>> x = torch.rand(4, 1, 28, 28)
    >>> theta = torch.tensor([[0.8, 0.0, 0.1, 0.0, 0.8, -0.1]]).repeat(4, 1)
    >>> warp(x, theta, "affine", out_size=(32, 32)).shape
    torch.Size([4, 1, 32, 32])
    """
    x = _check_image(x)
    transform = get_transform(transform)
    with deferred_value_checks():  # shape and dtype here; each path below checks the values
        theta = transform.check_theta(theta)
    if theta.shape[0] != x.shape[0] and theta.shape[0] != 1:
        raise ValueError(f"batch mismatch: x has {x.shape[0]} images but theta has {theta.shape[0]} rows")
    out_size = check_size(tuple(x.shape[-2:]) if out_size is None else out_size)
    # --- fused fast path (stnkit.sampling.fused; see docs/speed.md) --------------------------
    # Matrix families, bilinear/nearest, CPU float32/float64: the compiled kernel computes each
    # sampling point inside the sampler (same values, no grid). Everything else, and every error,
    # goes through the reference path below. STNKIT_FUSED=0 turns the fused path off.
    from . import fused

    if fused.fused_applicable(x, theta, transform, mode, padding_mode, fill_value):
        return fused.fused_warp(x, theta, transform, out_size, mode, padding_mode, fill_value)
    # --- end of fused fast path ------------------------------------------------------------
    grid = transform.grid(theta, out_size)
    return sample(x, grid, mode=mode, padding_mode=padding_mode, fill_value=fill_value)
