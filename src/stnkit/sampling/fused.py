"""Fused warps for the matrix families: grid generator and sampler in one pass, on the CPU.

:func:`stnkit.warp` with a matrix family (translation ... affine, projective)
normally builds the sampling grid ``(N, H_out, W_out, 2)`` and hands it to
:func:`torch.nn.functional.grid_sample`; the backward pass then writes
``d loss / d grid`` and reduces it to ``d loss / d theta``. The fused path
computes each sampling point from the 3x3 matrix inside the sampling loop and
accumulates ``d loss / d matrix`` directly, so no grid is stored or read.

Two implementations, tried in this order:

``"c"``
    A small C kernel (``_kernels/warp_cpu.c``), compiled on first use with the
    system C compiler (``cc -O3 -march=native -fopenmp``, about a second),
    cached under ``$STNKIT_CACHE`` (default ``~/.cache/stnkit``) and called
    through :mod:`ctypes`. It needs no network, no ninja and no PyTorch
    headers. Bilinear and nearest, every padding mode, float32 and float64,
    gradients to the input and to the matrix.
``"torch"``
    A custom :class:`torch.autograd.Function` around ATen's grid sampler that
    keeps no grid between forward and backward and computes
    ``d loss / d matrix`` analytically from ``d loss / d grid``. What
    :func:`fused_warp` uses when no compiler is available; any device.

:func:`stnkit.warp` uses the C kernel by default where it applies (see
:func:`fused_applicable`), and its reference path where the kernel cannot be
built; ``STNKIT_FUSED=0`` in the environment turns the fused path off and
``STNKIT_FUSED=torch`` makes :func:`stnkit.warp` use the torch implementation.
``docs/speed.md`` has the measurements behind these choices.

Convention: as everywhere in stnkit, the matrix maps *output* normalised points
to *input* normalised points, ``-1``/``+1`` at the image edges
(``align_corners=False``); see :mod:`stnkit.transforms.base`.

Agreement with the reference path: to rounding (``1e-12`` in float64), except
beyond a homography's horizon with ``padding_mode="reflection"``, where both
paths reflect points ~1e7 (float32) to ~1e16 (float64) pixels away and the
result depends on rounding. The kernel source ships as package data
(``_kernels/warp_cpu.c``); where it is missing or no compiler is found, the
torch implementation is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..transforms import Transform, get_transform
from ..transforms.base import MatrixTransform, _is_compiling, check_size, deferred_value_checks, normalised_pixel_centres
from .sampler import InterpolationMode, PaddingMode, _check_image, _fill_tensor, _parse_enum, sample

__all__ = ["fused_warp", "fused_applicable", "fused_available", "kernel_status"]

#: Matrices with a larger entry go through the reference path (see fused_warp).
_MATRIX_LIMIT = 1e6

# Absolute: the kernel includes itself through __FILE__, which must resolve from any working directory.
_KERNEL_SOURCE = (Path(__file__).resolve().parent / "_kernels" / "warp_cpu.c")
_MODES = {InterpolationMode.BILINEAR: 0, InterpolationMode.NEAREST: 1}
_PADDINGS = {PaddingMode.ZEROS: 0, PaddingMode.BORDER: 1, PaddingMode.REFLECTION: 2, PaddingMode.FILL: 3}

# ----------------------------------------------------------------------------------------------- build
_build_lock = threading.Lock()
_build_error: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("STNKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stnkit")
    return Path(root) / "kernels"


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (a cache shared by machines stays safe)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(compiler: str, source: Path, target: Path) -> str | None:
    """Compile ``source`` to the shared library ``target``; return an error message or None."""
    base = [compiler, "-O3", "-fno-trapping-math", "-shared", "-fPIC", "-std=c99", str(source), "-o", str(target), "-lm"]
    errors = []
    # Prefer OpenMP and native vector instructions; drop them one at a time if the compiler refuses.
    for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
        try:
            result = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{compiler}: {error}"
        if result.returncode == 0:
            return None
        errors.append(result.stderr.strip().splitlines()[-1:] or ["?"])
    return f"{compiler} failed: {errors[-1][0]}"


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use and cached on disk; None when it cannot be built."""
    global _build_error
    with _build_lock:
        try:
            source = _KERNEL_SOURCE.read_bytes()
        except OSError as error:
            _build_error = f"kernel source missing: {error}"
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        key = hashlib.sha256(source + _cpu_fingerprint().encode() + (compiler or "").encode() + b"v6").hexdigest()[:16]
        target = _cache_dir() / f"warp_cpu_{key}.so"
        if not target.exists():
            if compiler is None:
                _build_error = "no C compiler found (set CC)"
                return None
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                # Build into a temporary file and rename, so concurrent processes never load half a library.
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
                os.close(fd)
                error = _compile(compiler, _KERNEL_SOURCE, Path(tmp))
                if error is not None:
                    os.unlink(tmp)
                    _build_error = error
                    return None
                os.replace(tmp, target)
            except OSError as error:  # e.g. an unwritable cache directory: use the torch path
                _build_error = f"cannot build into {target.parent}: {error}"
                return None
        try:
            library = ctypes.CDLL(str(target))
        except OSError as error:
            _build_error = f"cannot load {target}: {error}"
            return None
        _declare(library)
        return library


def _declare(library: ctypes.CDLL) -> None:
    p, i, l, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_double
    for suffix in ("f32", "f64"):
        forward = getattr(library, f"stn_warp_forward_{suffix}")
        forward.argtypes = [p, p, p, l, l, l, l, l, l, l, i, i, i, d, p, i]
        forward.restype = None
        backward = getattr(library, f"stn_warp_backward_{suffix}")
        backward.argtypes = [p, p, p, p, p, l, l, l, l, l, l, l, i, i, i, d, p, i]
        backward.restype = None


def _implementation() -> str:
    """What :func:`stnkit.warp` uses: ``"c"``, ``"torch"`` or ``"off"`` (the reference path).

    ``STNKIT_FUSED`` unset or ``auto``: the C kernel when it builds, else the
    reference path. ``torch``: the torch implementation. ``0``/``off``: the
    reference path.
    """
    choice = _fused_setting()
    if choice in ("off", "torch"):
        return choice
    return "c" if _library() is not None else "off"


def _fused_setting() -> str:
    """``STNKIT_FUSED`` normalised: ``"off"`` for 0/off/false/no, else its lower-cased value (``"auto"`` unset)."""
    choice = os.environ.get("STNKIT_FUSED", "auto").strip().lower()
    return "off" if choice in ("0", "off", "false", "no") else choice


def fused_available() -> bool:
    """Whether the compiled C kernel is available (building it on first call).

    Examples
    --------
    >>> isinstance(fused_available(), bool)
    True
    """
    return _library() is not None


def kernel_status() -> str:
    """A one-line description of the fused kernels, for logs and benchmark reports."""
    library = _library()
    status = f"C kernel ({library._name})" if library is not None else f"C kernel unavailable ({_build_error}); torch fallback"
    if torch.cuda.is_available():
        if _triton_usable():
            import triton

            status += f"; CUDA tensors: Triton kernels (triton {triton.__version__})"
        else:
            status += "; CUDA tensors: grid + grid_sample (Triton missing or STNKIT_FUSED set)"
    return status


# ------------------------------------------------------------------------------------- applicability
def fused_applicable(
    x: Tensor,
    theta: Tensor,
    transform: Transform | str,
    mode: InterpolationMode | str = "bilinear",
    padding_mode: PaddingMode | str = "zeros",
    fill_value: float | Sequence[float] | Tensor = 0.0,
) -> bool:
    """Whether :func:`stnkit.warp` takes the fused C path for these arguments.

    True for CPU float32/float64 inputs, a matrix family, bilinear or nearest
    interpolation and any padding mode, outside ``torch.compile``, tracing and
    ONNX export, when the kernel builds and ``STNKIT_FUSED`` does not turn it
    off. The plain ``affine_grid``/``grid_sample``-style path handles
    everything else.

    Examples
    --------
    >>> x = torch.rand(2, 1, 8, 8)
    >>> fused_applicable(x, torch.zeros(2, 6), "affine", mode="bicubic")
    False
    """
    try:
        transform = get_transform(transform)
        mode = _parse_enum(InterpolationMode, mode, "mode")
        padding_mode = _parse_enum(PaddingMode, padding_mode, "padding_mode")
    except (ValueError, TypeError, KeyError):
        return False
    if not isinstance(transform, MatrixTransform) or mode not in _MODES:
        return False
    # Plain tensors only: FakeTensors and other subclasses (torch.export, tracing modes) have no data pointer.
    if not _plain(x) or not _plain(theta):
        return False
    if x.device.type == "cuda":
        # The Triton kernels (stnkit.sampling.triton_warp), float32 and half precisions only.
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not _triton_usable():
            return False
    elif x.device.type != "cpu" or theta.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    if isinstance(fill_value, Tensor) and (fill_value.requires_grad or fill_value.device != x.device):
        return False
    if _is_compiling() or _exporting() or torch.jit.is_tracing() or torch.jit.is_scripting() or _onnx_exporting():
        return False
    if _functorch_wrapped(x) or _functorch_wrapped(theta):
        return False
    return x.device.type == "cuda" or _implementation() != "off"


def _triton_usable() -> bool:
    """Whether the Triton kernels can run (CUDA tensors; STNKIT_FUSED=0 turns them off too)."""
    if _fused_setting() in ("off", "torch", "c"):
        return False
    from .triton_warp import triton_available

    return triton_available()


def _plain(tensor) -> bool:
    return type(tensor) is Tensor or type(tensor) is torch.nn.Parameter


def _exporting() -> bool:
    compiler = getattr(torch, "compiler", None)
    is_exporting = getattr(compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _onnx_exporting() -> bool:
    onnx = getattr(torch, "onnx", None)
    is_in_export = getattr(onnx, "is_in_onnx_export", None)
    return bool(is_in_export is not None and is_in_export())


def _functorch_wrapped(tensor: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check is not None and check(tensor))


# -------------------------------------------------------------------------------------- the C path
def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


# Below this many output values per thread, waking another thread costs more than it saves.
_VALUES_PER_THREAD = 32768


def _threads(batch: int, channels: int, out_size: tuple[int, int]) -> int:
    work = batch * channels * out_size[0] * out_size[1]
    return max(1, min(torch.get_num_threads(), work // _VALUES_PER_THREAD))


class _FusedWarpC(torch.autograd.Function):
    """Forward and backward of the fused warp through the C kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, matrix: Tensor, out_size: tuple[int, int], mode: int, padding: int, projective: bool, fill: Tensor) -> Tensor:
        library = _library()
        x = x.contiguous()
        matrices = matrix.detach().to(x.dtype).contiguous()
        batch, channels, height, width = x.shape
        out = torch.empty(batch, channels, *out_size, dtype=x.dtype)
        suffix = "f32" if x.dtype == torch.float32 else "f64"
        eps = torch.finfo(matrix.dtype).eps
        getattr(library, f"stn_warp_forward_{suffix}")(
            x.data_ptr(), out.data_ptr(), matrices.data_ptr(), 9 if matrices.shape[0] > 1 else 0,
            batch, channels, height, width, out_size[0], out_size[1],
            mode, padding, int(projective), eps, fill.data_ptr(), _threads(batch, channels, out_size),
        )  # fmt: skip
        ctx.save_for_backward(x, matrices, fill)
        ctx.options = (out_size, mode, padding, projective, eps, matrix.dtype, matrix.shape[0])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, matrices, fill = ctx.saved_tensors
        out_size, mode, padding, projective, eps, matrix_dtype, matrix_batch = ctx.options
        need_x, need_matrix = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_matrix):
            return (None,) * 7
        grad_out = grad_out.to(x.dtype).contiguous()
        batch, channels, height, width = x.shape
        grad_x = torch.zeros_like(x) if need_x else None
        # Nearest interpolation has no gradient to the sampling points.
        grad_matrices = torch.empty(batch, 9, dtype=torch.float64) if need_matrix and mode == 0 else None
        if grad_x is not None or grad_matrices is not None:
            suffix = "f32" if x.dtype == torch.float32 else "f64"
            getattr(_library(), f"stn_warp_backward_{suffix}")(
                x.data_ptr(), grad_out.data_ptr(), _pointer(grad_x), _pointer(grad_matrices), matrices.data_ptr(),
                9 if matrices.shape[0] > 1 else 0, batch, channels, height, width, out_size[0], out_size[1],
                mode, padding, int(projective), eps, fill.data_ptr(), _threads(batch, channels, out_size),
            )  # fmt: skip
        grad_matrix = matrix_grad(grad_matrices, matrix_batch, matrix_dtype) if need_matrix else None
        return grad_x, grad_matrix, None, None, None, None, None


def matrix_grad(rows: Tensor | None, matrix_batch: int, dtype: torch.dtype) -> Tensor:
    """``d loss / d matrix`` from a kernel's per-image ``(N, 9)`` sums: ``(matrix_batch, 3, 3)`` in ``dtype``.

    ``rows`` is None where there is no gradient to the points (nearest
    interpolation): zeros. One matrix shared by the batch gets the sum over images.
    """
    if rows is None:
        return torch.zeros(matrix_batch, 3, 3, dtype=dtype)
    grad = rows.view(-1, 3, 3)
    if matrix_batch == 1 and grad.shape[0] > 1:
        grad = grad.sum(0, keepdim=True)
    return grad.to(dtype)


# ---------------------------------------------------------------------------------- the torch path
def _matrix_grad_from_grid_grad(grad_grid: Tensor, matrix: Tensor, grid: Tensor, projective: bool) -> Tensor:
    """``d loss / d matrix`` ``(B, 3, 3)`` from ``d loss / d grid`` ``(B, H, W, 2)``, without autograd.

    For ``s = (M p)_{xy} / (M p)_w`` with ``p = (x, y, 1)`` the output pixel
    centre: ``d s_x / d M_0j = p_j / w``, ``d s_y / d M_1j = p_j / w`` and
    ``d s / d M_2j = -(s * p_j) / w`` (zero where ``w`` was clamped).
    """
    height, width = grid.shape[1:3]
    ys, xs = normalised_pixel_centres((height, width), dtype=grad_grid.dtype, device=grad_grid.device)
    gx, gy = grad_grid[..., 0], grad_grid[..., 1]
    if projective:
        m = matrix.to(grad_grid.dtype).view(-1, 3, 3, 1, 1)
        w = m[:, 2, 0] * xs.view(1, 1, -1) + m[:, 2, 1] * ys.view(1, -1, 1) + m[:, 2, 2]
        clamped = w < torch.finfo(matrix.dtype).eps
        w = w.clamp_min(torch.finfo(matrix.dtype).eps)
        gx, gy = gx / w, gy / w
        gw = torch.where(clamped, torch.zeros_like(w), -(gx * grid[..., 0] + gy * grid[..., 1]))
        rows = (gx, gy, gw)
    else:
        rows = (gx, gy)
    grads = []
    for g in rows:
        # sum over pixels of g * (x, y, 1), as two small reductions
        along_x = g.sum(1)  # (B, W)
        along_y = g.sum(2)  # (B, H)
        grads.append(torch.stack((along_x @ xs, along_y @ ys, along_x.sum(1)), dim=1))
    if not projective:
        grads.append(torch.zeros_like(grads[0]))
    return torch.stack(grads, dim=1)


class _FusedWarpTorch(torch.autograd.Function):
    """ATen's grid sampler with an analytic ``d loss / d matrix``; keeps no grid for the backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, matrix: Tensor, out_size: tuple[int, int], mode: int, padding: int, projective: bool, fill: Tensor) -> Tensor:
        from ..transforms.base import apply_matrix_to_grid

        grid = apply_matrix_to_grid(matrix.detach().to(x.dtype), out_size, projective=projective)
        if grid.shape[0] != x.shape[0]:
            grid = grid.expand(x.shape[0], -1, -1, -1)
        source = x - fill.view(1, -1, 1, 1) if padding == 3 else x
        out = torch.grid_sampler_2d(source, grid, mode, _ATEN_PADDINGS_BY_CODE[padding], False)
        if padding == 3:
            out = out + fill.view(1, -1, 1, 1)
        ctx.save_for_backward(x, matrix.detach(), fill)
        ctx.options = (out_size, mode, padding, projective)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        from ..transforms.base import apply_matrix_to_grid

        x, matrix, fill = ctx.saved_tensors
        out_size, mode, padding, projective = ctx.options
        need_x, need_matrix = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grid = apply_matrix_to_grid(matrix.to(x.dtype), out_size, projective=projective)
        if grid.shape[0] != x.shape[0]:
            grid = grid.expand(x.shape[0], -1, -1, -1).contiguous()
        source = x - fill.view(1, -1, 1, 1) if padding == 3 else x
        grad_x, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_out, source, grid, mode, _ATEN_PADDINGS_BY_CODE[padding], False, [need_x, need_matrix]
        )
        grad_matrix = None
        if need_matrix:
            grad_matrix = _matrix_grad_from_grid_grad(grad_grid, matrix, grid, projective)
            if matrix.shape[0] == 1 and grad_matrix.shape[0] > 1:
                grad_matrix = grad_matrix.sum(0, keepdim=True)
            grad_matrix = grad_matrix.to(matrix.dtype)
        return (grad_x if need_x else None), grad_matrix, None, None, None, None, None


_ATEN_PADDINGS_BY_CODE = {0: 0, 1: 1, 2: 2, 3: 0}


# ------------------------------------------------------------------------------------------- public
def fused_warp(
    x: Tensor,
    theta: Tensor,
    transform: Transform | str,
    out_size: Sequence[int] | None = None,
    mode: InterpolationMode | str = "bilinear",
    padding_mode: PaddingMode | str = "zeros",
    fill_value: float | Sequence[float] | Tensor = 0.0,
    *,
    implementation: str | None = None,
) -> Tensor:
    """:func:`stnkit.warp` for a matrix family without materialising the sampling grid.

    Parameters
    ----------
    x : Tensor
        ``(N, C, H_in, W_in)`` float32 or float64 (CPU for the C kernel).
    theta : Tensor
        ``(N, P)`` or ``(1, P)`` parameters of ``transform``.
    transform : MatrixTransform or str
        A matrix family (``"affine"``, ``"projective"``, ``"similarity"``, ...).
    out_size : (int, int), optional
        ``(H_out, W_out)``; the input size when omitted.
    mode : {"bilinear", "nearest"}
    padding_mode : {"zeros", "border", "reflection", "fill"}
    fill_value : float, sequence of float or Tensor
        As in :func:`stnkit.sample`.
    implementation : {"c", "torch", "triton"}, optional
        Force one implementation (benchmarks, tests); by default the Triton
        kernels for CUDA tensors, and on the CPU the C kernel when it builds,
        else the torch one. (``"triton"`` runs CPU tensors only under
        ``TRITON_INTERPRET=1``, the interpreter the tests use.)

    Returns
    -------
    Tensor
        ``(N, C, H_out, W_out)``, differentiable w.r.t. ``x`` and ``theta``
        (once: the backward pass is not itself differentiable).

    Convention: ``theta`` maps output normalised points to input normalised
    points (backward map, ``-1``/``+1`` at the image edges), exactly as in
    :func:`stnkit.warp`, which this matches to floating-point rounding.

    Examples
    --------
    >>> from stnkit.sampling import warp
    >>> x = torch.rand(2, 3, 16, 16)
    >>> theta = torch.tensor([[0.9, 0.1, 0.05, -0.1, 0.9, 0.0]]).repeat(2, 1)
    >>> torch.allclose(fused_warp(x, theta, "affine"), warp(x, theta, "affine"), atol=1e-5)
    True
    """
    x = _check_image(x)
    transform = get_transform(transform)
    if not isinstance(transform, MatrixTransform):
        raise TypeError(f"fused_warp needs a matrix family, got {type(transform).__name__}")
    with deferred_value_checks():  # the values are checked once, on the matrix, below
        theta = transform.check_theta(theta)
    if theta.shape[0] != x.shape[0] and theta.shape[0] != 1:
        raise ValueError(f"batch mismatch: x has {x.shape[0]} images but theta has {theta.shape[0]} rows")
    out_size = check_size(tuple(x.shape[-2:]) if out_size is None else out_size)
    mode = _parse_enum(InterpolationMode, mode, "mode")
    padding_mode = _parse_enum(PaddingMode, padding_mode, "padding_mode")
    if mode not in _MODES:
        raise ValueError(f"fused_warp supports bilinear and nearest interpolation, got {mode.value!r}")
    if padding_mode is PaddingMode.FILL:
        fill = _fill_tensor(fill_value, x).detach().reshape(-1).expand(x.shape[1]).contiguous()
    else:
        fill = x.new_zeros(x.shape[1])  # no host-to-device copy of a Python 0.0
    with deferred_value_checks():
        matrix = transform.matrix(theta)
    # One host read checks every value (a GPU synchronises once per warp, not once per check):
    # amax propagates NaN and keeps inf, so a non-finite theta or matrix shows as a non-finite peak.
    peak = float(matrix.detach().abs().amax()) if matrix.numel() else 0.0
    if not math.isfinite(peak):
        # A NaN or infinite matrix would send the kernel's tap indices anywhere. Name the cause
        # with the checked steps' own errors (theta, then h33), else the reference path's.
        transform.matrix(transform.check_theta(theta))
        raise ValueError(
            f"{type(transform).__name__}: degenerate transform, its matrix is not finite "
            "(e.g. projective corners with three collinear points, or parameters too large for the dtype)"
        )
    if peak > _MATRIX_LIMIT:
        # Far beyond any image: the kernel's float-to-int tap arithmetic would overflow. The
        # reference path clamps such points and stays finite; it is as fast here as it matters.
        return sample(x, transform.grid(theta, out_size), mode=mode, padding_mode=padding_mode, fill_value=fill_value)
    if implementation is None and x.device.type == "cuda":
        implementation = "triton" if _triton_usable() and x.dtype != torch.float64 else "torch"
    if implementation is None:
        chosen = _implementation()
        implementation = chosen if chosen != "off" else ("c" if _library() is not None else "torch")
    if implementation == "triton":
        from .triton_warp import TritonWarp, triton_available, triton_interpreted

        if not triton_available():
            raise RuntimeError("implementation='triton' needs Triton (pip install triton)")
        if x.device.type != "cuda" and not triton_interpreted():
            raise ValueError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
        if x.dtype == torch.float64:
            raise ValueError("the Triton kernels compute in float32; use the reference path for float64")
        function = TritonWarp
    elif implementation == "c":
        if _library() is None:
            raise RuntimeError(f"the fused C kernel is unavailable: {_build_error}")
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            raise ValueError("the fused C kernel needs a CPU float32 or float64 input")
        function = _FusedWarpC
    elif implementation == "torch":
        function = _FusedWarpTorch
    else:
        raise ValueError(f"unknown implementation {implementation!r}; expected 'c', 'torch' or 'triton'")
    return function.apply(
        x, matrix, out_size, _MODES[mode], _PADDINGS[padding_mode], bool(transform.is_projective), fill
    )
