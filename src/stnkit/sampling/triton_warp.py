"""Fused grid generator + sampler for the matrix families on CUDA, in Triton.

The GPU counterpart of the C kernel (:mod:`stnkit.sampling.fused`): each
program takes a block of output pixels of one image, computes their source
points from the image's 3x3 matrix, applies the padding, and gathers (forward)
or scatters with atomic adds (backward) every channel, so the
``(N, H_out, W_out, 2)`` grid is never written to memory. The backward pass
sums ``d loss / d matrix`` per block and adds it atomically into the
``(N, 9)`` result. Bilinear and nearest interpolation; zeros, border,
reflection and fill padding; affine and projective matrices (``w`` clamped
at the horizon, as :func:`stnkit.transforms.base.apply_matrix_to_grid` does).

Convention: identical to :func:`stnkit.warp` (backward map, output
normalised points to input normalised points, ``align_corners=False``); the
unnormalisation, padding and bilinear weights follow ATen's ``GridSampler.h``.

Triton is optional (``pip install triton``, shipped with CUDA builds of
PyTorch). The kernels run on CUDA tensors; with ``TRITON_INTERPRET=1`` Triton
interprets them on the CPU, which is how the test suite checks them against
the reference path on a machine without a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fused import matrix_grad

__all__ = ["triton_available", "triton_interpreted", "TritonWarp"]

_BLOCK = 256


try:  # Triton is optional; without it this module only reports that it is missing.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None


def triton_available() -> bool:
    """Whether Triton can be imported (the CUDA fused path needs it).

    Examples
    --------
    >>> isinstance(triton_available(), bool)
    True
    """
    return triton is not None


def triton_interpreted() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET=1``: kernels run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels() -> tuple[Any, Any]:
    if triton is None:
        raise RuntimeError("the Triton warp kernels need Triton (pip install triton)")
    return warp_forward, warp_backward


# The kernels are module-level functions (Triton resolves the helpers they call by global name).
if triton is not None:

    @triton.jit
    def clip_with_grad(coordinate, size):
        # ATen clip_coordinates_set_grad: clamp to [0, size - 1], gradient 0 where clamped.
        high = size - 1.0
        grad = tl.where((coordinate <= 0.0) | (coordinate >= high), 0.0, 1.0)
        return tl.minimum(tl.maximum(coordinate, 0.0), high), grad

    @triton.jit
    def reflect_with_grad(coordinate, size):
        # ATen reflect_coordinates_set_grad, align_corners=False: mirror about -0.5 and size - 0.5.
        shifted = coordinate + 0.5
        sign = tl.where(shifted < 0.0, -1.0, 1.0)
        shifted = tl.abs(shifted)
        flips = tl.floor(shifted / size)
        extra = shifted - flips * size
        even = (flips - 2.0 * tl.floor(flips * 0.5)) == 0.0
        reflected = tl.where(even, extra - 0.5, size - extra - 0.5)
        return reflected, tl.where(even, sign, -sign)

    @triton.jit
    def source_points(m_ptr, offs, Ho, Wo, H, W, eps, PAD: tl.constexpr, PROJECTIVE: tl.constexpr):
        """Source pixel coordinates of the output pixels `offs`, after padding, and what the chain rule needs."""
        row = offs // Wo
        col = offs - row * Wo
        xn = (col * 2 + 1).to(tl.float32) / Wo - 1.0
        yn = (row * 2 + 1).to(tl.float32) / Ho - 1.0
        m0 = tl.load(m_ptr + 0).to(tl.float32)
        m1 = tl.load(m_ptr + 1).to(tl.float32)
        m2 = tl.load(m_ptr + 2).to(tl.float32)
        m3 = tl.load(m_ptr + 3).to(tl.float32)
        m4 = tl.load(m_ptr + 4).to(tl.float32)
        m5 = tl.load(m_ptr + 5).to(tl.float32)
        sx = m0 * xn + m1 * yn + m2
        sy = m3 * xn + m4 * yn + m5
        w = tl.full(xn.shape, 1.0, tl.float32)
        clamped = tl.full(xn.shape, 0.0, tl.float32)
        if PROJECTIVE:
            m6 = tl.load(m_ptr + 6).to(tl.float32)
            m7 = tl.load(m_ptr + 7).to(tl.float32)
            m8 = tl.load(m_ptr + 8).to(tl.float32)
            w0 = m6 * xn + m7 * yn + m8
            clamped = tl.where(w0 >= eps, 0.0, 1.0)
            w = tl.maximum(w0, eps)
            sx = sx / w
            sy = sy / w
        Wf = W.to(tl.float32)
        Hf = H.to(tl.float32)
        ix = ((sx + 1.0) * Wf - 1.0) * 0.5
        iy = ((sy + 1.0) * Hf - 1.0) * 0.5
        gmx = tl.full(xn.shape, 0.5, tl.float32) * Wf
        gmy = tl.full(xn.shape, 0.5, tl.float32) * Hf
        if PAD == 2:  # reflection, then clip
            ix, g = reflect_with_grad(ix, Wf)
            gmx = gmx * g
            iy, g = reflect_with_grad(iy, Hf)
            gmy = gmy * g
        if PAD == 1 or PAD == 2:  # border (and the clip after reflection)
            ix, g = clip_with_grad(ix, Wf)
            gmx = gmx * g
            iy, g = clip_with_grad(iy, Hf)
            gmy = gmy * g
        return xn, yn, sx, sy, w, clamped, ix, iy, gmx, gmy

    @triton.jit
    def round_half_even(v):
        r = tl.floor(v + 0.5)
        tie = (r - v) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def bilinear_taps(ix, iy, wmax, hmax):
        """Fractional offsets, in-bounds flags and clamped indices of the four bilinear taps."""
        fx = tl.floor(ix)
        fy = tl.floor(iy)
        bx0 = (fx >= 0.0) & (fx <= wmax)
        bx1 = (fx + 1.0 >= 0.0) & (fx + 1.0 <= wmax)
        by0 = (fy >= 0.0) & (fy <= hmax)
        by1 = (fy + 1.0 >= 0.0) & (fy + 1.0 <= hmax)
        x0 = tl.minimum(tl.maximum(fx, 0.0), wmax).to(tl.int32)
        x1 = tl.minimum(tl.maximum(fx + 1.0, 0.0), wmax).to(tl.int32)
        y0 = tl.minimum(tl.maximum(fy, 0.0), hmax).to(tl.int32)
        y1 = tl.minimum(tl.maximum(fy + 1.0, 0.0), hmax).to(tl.int32)
        return ix - fx, iy - fy, bx0, bx1, by0, by1, x0, x1, y0, y1

    @triton.jit
    def nearest_tap(ix, iy, wmax, hmax):
        """In-bounds flag and clamped index of the nearest tap (ties to even, as nearbyint)."""
        rx = round_half_even(ix)
        ry = round_half_even(iy)
        inside = (rx >= 0.0) & (rx <= wmax) & (ry >= 0.0) & (ry <= hmax)
        xi = tl.minimum(tl.maximum(rx, 0.0), wmax).to(tl.int32)
        yi = tl.minimum(tl.maximum(ry, 0.0), hmax).to(tl.int32)
        return inside, xi, yi

    @triton.jit
    def warp_forward(x_ptr, out_ptr, m_ptr, fill_ptr, m_stride, C, H, W, Ho, Wo, eps,
                     MODE: tl.constexpr, PAD: tl.constexpr, PROJECTIVE: tl.constexpr, BLOCK: tl.constexpr):
        n = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < Ho * Wo
        xn, yn, sx, sy, w, clamped, ix, iy, gmx, gmy = source_points(
            m_ptr + n * m_stride, offs, Ho, Wo, H, W, eps, PAD, PROJECTIVE)
        wmax = (W - 1).to(tl.float32)
        hmax = (H - 1).to(tl.float32)
        if MODE == 0:
            ax, ay, bx0, bx1, by0, by1, x0, x1, y0, y1 = bilinear_taps(ix, iy, wmax, hmax)
            for c in range(0, C):
                plane = x_ptr + (n * C + c).to(tl.int64) * H * W
                f = tl.load(fill_ptr + c).to(tl.float32)
                v00 = tl.load(plane + y0 * W + x0, mask=valid & bx0 & by0, other=f).to(tl.float32)
                v01 = tl.load(plane + y0 * W + x1, mask=valid & bx1 & by0, other=f).to(tl.float32)
                v10 = tl.load(plane + y1 * W + x0, mask=valid & bx0 & by1, other=f).to(tl.float32)
                v11 = tl.load(plane + y1 * W + x1, mask=valid & bx1 & by1, other=f).to(tl.float32)
                value = (1.0 - ay) * ((1.0 - ax) * v00 + ax * v01) + ay * ((1.0 - ax) * v10 + ax * v11)
                target = out_ptr + (n * C + c).to(tl.int64) * Ho * Wo + offs
                tl.store(target, value.to(out_ptr.dtype.element_ty), mask=valid)
        else:
            inside, xi, yi = nearest_tap(ix, iy, wmax, hmax)
            for c in range(0, C):
                plane = x_ptr + (n * C + c).to(tl.int64) * H * W
                f = tl.load(fill_ptr + c).to(tl.float32)
                value = tl.load(plane + yi * W + xi, mask=valid & inside, other=f).to(tl.float32)
                target = out_ptr + (n * C + c).to(tl.int64) * Ho * Wo + offs
                tl.store(target, value.to(out_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def warp_backward(x_ptr, g_ptr, gx_ptr, gm_ptr, m_ptr, fill_ptr, m_stride, C, H, W, Ho, Wo, eps,
                      MODE: tl.constexpr, PAD: tl.constexpr, PROJECTIVE: tl.constexpr,
                      NEED_X: tl.constexpr, NEED_M: tl.constexpr, BLOCK: tl.constexpr):
        n = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < Ho * Wo
        xn, yn, sx, sy, w, clamped, ix, iy, gmx, gmy = source_points(
            m_ptr + n * m_stride, offs, Ho, Wo, H, W, eps, PAD, PROJECTIVE)
        wmax = (W - 1).to(tl.float32)
        hmax = (H - 1).to(tl.float32)
        if MODE == 0:
            ax, ay, bx0, bx1, by0, by1, x0, x1, y0, y1 = bilinear_taps(ix, iy, wmax, hmax)
            gix = tl.zeros([BLOCK], tl.float32)
            giy = tl.zeros([BLOCK], tl.float32)
            for c in range(0, C):
                g = tl.load(g_ptr + (n * C + c).to(tl.int64) * Ho * Wo + offs, mask=valid, other=0.0).to(tl.float32)
                if NEED_X:
                    plane = gx_ptr + (n * C + c).to(tl.int64) * H * W
                    dtype = gx_ptr.dtype.element_ty
                    tl.atomic_add(plane + y0 * W + x0, ((1.0 - ax) * (1.0 - ay) * g).to(dtype), mask=valid & bx0 & by0)
                    tl.atomic_add(plane + y0 * W + x1, (ax * (1.0 - ay) * g).to(dtype), mask=valid & bx1 & by0)
                    tl.atomic_add(plane + y1 * W + x0, ((1.0 - ax) * ay * g).to(dtype), mask=valid & bx0 & by1)
                    tl.atomic_add(plane + y1 * W + x1, (ax * ay * g).to(dtype), mask=valid & bx1 & by1)
                if NEED_M:
                    plane = x_ptr + (n * C + c).to(tl.int64) * H * W
                    f = tl.load(fill_ptr + c).to(tl.float32)
                    v00 = tl.load(plane + y0 * W + x0, mask=valid & bx0 & by0, other=f).to(tl.float32)
                    v01 = tl.load(plane + y0 * W + x1, mask=valid & bx1 & by0, other=f).to(tl.float32)
                    v10 = tl.load(plane + y1 * W + x0, mask=valid & bx0 & by1, other=f).to(tl.float32)
                    v11 = tl.load(plane + y1 * W + x1, mask=valid & bx1 & by1, other=f).to(tl.float32)
                    gix += g * ((v01 - v00) * (1.0 - ay) + (v11 - v10) * ay)
                    giy += g * ((v10 - v00) * (1.0 - ax) + (v11 - v01) * ax)
            if NEED_M:
                # Chain rule from the source points to the matrix entries: sums of (du, dv[, dw]) x (xn, yn, 1).
                du = tl.where(valid, gix * gmx / w, 0.0)
                dv = tl.where(valid, giy * gmy / w, 0.0)
                row = gm_ptr + n * 9
                tl.atomic_add(row + 0, tl.sum(du * xn, axis=0))
                tl.atomic_add(row + 1, tl.sum(du * yn, axis=0))
                tl.atomic_add(row + 2, tl.sum(du, axis=0))
                tl.atomic_add(row + 3, tl.sum(dv * xn, axis=0))
                tl.atomic_add(row + 4, tl.sum(dv * yn, axis=0))
                tl.atomic_add(row + 5, tl.sum(dv, axis=0))
                if PROJECTIVE:
                    dw = (1.0 - clamped) * -(du * sx + dv * sy)
                    tl.atomic_add(row + 6, tl.sum(dw * xn, axis=0))
                    tl.atomic_add(row + 7, tl.sum(dw * yn, axis=0))
                    tl.atomic_add(row + 8, tl.sum(dw, axis=0))
        else:
            if NEED_X:
                inside, xi, yi = nearest_tap(ix, iy, wmax, hmax)
                for c in range(0, C):
                    g = tl.load(g_ptr + (n * C + c).to(tl.int64) * Ho * Wo + offs, mask=valid, other=0.0)
                    plane = gx_ptr + (n * C + c).to(tl.int64) * H * W
                    tl.atomic_add(plane + yi * W + xi, g.to(gx_ptr.dtype.element_ty), mask=valid & inside)




def _launch_grid(out_size: tuple[int, int], batch: int) -> tuple[int, int]:
    return ((out_size[0] * out_size[1] + _BLOCK - 1) // _BLOCK, batch)


class TritonWarp(torch.autograd.Function):
    """Forward and backward of the fused warp through the Triton kernels.

    ``apply(x, matrix, out_size, mode, padding, projective, fill)`` with the
    same arguments as the C path of :func:`stnkit.sampling.fused.fused_warp`:
    ``x`` ``(N, C, H, W)`` float32 (or float16/bfloat16, computed in float32),
    ``matrix`` ``(N or 1, 3, 3)``, ``mode`` 0 bilinear / 1 nearest, ``padding``
    0 zeros / 1 border / 2 reflection / 3 fill, ``fill`` ``(C,)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, matrix: Tensor, out_size: tuple[int, int], mode: int, padding: int, projective: bool,
                fill: Tensor) -> Tensor:
        forward_kernel, _ = _kernels()
        x = x.contiguous()
        matrices = matrix.detach().to(torch.float32).reshape(-1, 9).contiguous()
        fill = fill.to(device=x.device, dtype=torch.float32).contiguous()
        batch, channels, height, width = x.shape
        out = torch.empty(batch, channels, *out_size, dtype=x.dtype, device=x.device)
        eps = float(torch.finfo(matrix.dtype).eps)
        stride = 9 if matrices.shape[0] > 1 else 0
        forward_kernel[_launch_grid(out_size, batch)](
            x, out, matrices, fill, stride, channels, height, width, out_size[0], out_size[1], eps,
            MODE=mode, PAD=padding, PROJECTIVE=bool(projective), BLOCK=_BLOCK,
        )
        ctx.save_for_backward(x, matrices, fill)
        ctx.options = (out_size, mode, padding, projective, eps, matrix.dtype, matrix.shape[0])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        _, backward_kernel = _kernels()
        x, matrices, fill = ctx.saved_tensors
        out_size, mode, padding, projective, eps, matrix_dtype, matrix_batch = ctx.options
        need_x, need_matrix = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_matrix):
            return (None,) * 7
        batch, channels, height, width = x.shape
        grad_out = grad_out.contiguous()
        # Atomic adds accumulate in float32 (half-precision atomics lose too much); cast back at the end.
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        want_matrix = need_matrix and mode == 0  # nearest has no gradient to the points
        grad_m = torch.zeros(batch, 9, dtype=torch.float32, device=x.device)
        stride = 9 if matrices.shape[0] > 1 else 0
        backward_kernel[_launch_grid(out_size, batch)](
            x, grad_out, grad_x if grad_x is not None else grad_m, grad_m, matrices, fill, stride,
            channels, height, width, out_size[0], out_size[1], eps,
            MODE=mode, PAD=padding, PROJECTIVE=bool(projective), NEED_X=bool(need_x), NEED_M=bool(want_matrix),
            BLOCK=_BLOCK,
        )
        grad_matrix = matrix_grad(grad_m, matrix_batch, matrix_dtype) if need_matrix else None
        return (grad_x.to(x.dtype) if grad_x is not None else None), grad_matrix, None, None, None, None, None
