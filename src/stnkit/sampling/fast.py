"""A fast, no-grad warp for full-resolution images, through OpenCV when it is installed.

:func:`warp_image` applies the same map as :func:`stnkit.warp` to one image
(``H x W`` or ``H x W x C`` NumPy array, ``uint8`` or floating point, or a
tensor) without building a sampling grid in PyTorch: matrix maps go to
``cv2.warpAffine`` / ``cv2.warpPerspective`` with ``WARP_INVERSE_MAP``, other
families (thin-plate splines, ...) to ``cv2.remap`` with the grid converted to
pixel maps. Without OpenCV (or for tensors on an accelerator) it falls back to
:func:`stnkit.warp`.

Convention: the matrix is ``src_pix_from_dst_pix``: it maps an output pixel
``(x, y, 1)`` (pixel centres at integers, ``(0, 0)`` the top-left centre) to
the input pixel it reads, as :meth:`stnkit.transforms.MatrixTransform.to_pixels`
returns it and as OpenCV's ``WARP_INVERSE_MAP`` reads it.

Padding modes map to OpenCV border modes with the same meaning:

==============  ===========================================================
``zeros``       ``BORDER_CONSTANT`` with 0
``fill``        ``BORDER_CONSTANT`` with ``fill_value`` (one value per channel)
``border``      ``BORDER_REPLICATE``
``reflection``  ``BORDER_REFLECT`` (``fedcba|abcdef``: the mirror sits on the
                pixel edge, as in PyTorch's ``align_corners=False`` reflection;
                ``BORDER_REFLECT_101`` would mirror about the edge pixel's centre)
==============  ===========================================================

OpenCV interpolates with weights quantised to 1/32 pixel and rounds
``uint8`` results, so it agrees with :func:`stnkit.warp` to interpolation
tolerance, not bit for bit.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

try:  # NumPy is not a dependency of the core: without it, importing works and warp_image says what it needs.
    import numpy as np
except ModuleNotFoundError:  # pragma: no cover - exercised by tests/test_architecture.py in a subprocess
    np = None

from ..transforms import Transform, get_transform
from ..transforms.base import MatrixTransform, check_size, norm_from_pix, pix_from_norm
from .sampler import InterpolationMode, PaddingMode, _parse_enum

__all__ = ["warp_image", "opencv_available"]

# Tensor dtypes that OpenCV warps as they are (other dtypes are converted).
_OPENCV_TENSOR_DTYPES = (torch.uint8, torch.int16, torch.float32, torch.float64)

# OpenCV's remap and warp functions index with 16-bit integers.
_OPENCV_MAX_SIDE = 32767


def _cv2() -> Any | None:
    try:
        import cv2  # noqa: PLC0415  (optional dependency, imported lazily)
    except ImportError:
        return None
    return cv2


def opencv_available() -> bool:
    """Whether :func:`warp_image` can use OpenCV.

    Examples
    --------
    >>> isinstance(opencv_available(), bool)
    True
    """
    return _cv2() is not None


def _as_hwc(image: np.ndarray | Tensor) -> tuple[np.ndarray | Tensor, str]:
    """The image as ``H x W x C`` (NumPy) or ``1 x C x H x W`` (tensor), and its layout name."""
    if isinstance(image, Tensor):
        if image.dim() == 2:
            return image[None, None], "hw"
        if image.dim() == 3:
            return image[None], "chw"
        if image.dim() == 4 and image.shape[0] == 1:
            return image, "nchw"
        raise ValueError(f"image tensor must be (H, W), (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}")
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            return image[:, :, None], "hw"
        if image.ndim == 3:
            return image, "hwc"
        raise ValueError(f"image array must be (H, W) or (H, W, C), got shape {image.shape}")
    raise TypeError(f"image must be a numpy array or a torch.Tensor, got {type(image).__name__}")


def _pixel_matrix(
    matrix: Any, theta: Tensor | None, transform: Transform | None, in_size: tuple[int, int], out_size: tuple[int, int]
) -> np.ndarray | None:
    """The 3x3 float64 ``src_pix_from_dst_pix`` matrix, or None for a non-matrix family."""
    if matrix is not None:
        m = matrix.detach().cpu().double().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix, dtype=np.float64)
        if m.shape == (1, 3, 3) or m.shape == (1, 2, 3):
            m = m[0]
        if m.shape == (2, 3):
            m = np.vstack([m, [0.0, 0.0, 1.0]])
        if m.shape != (3, 3):
            raise ValueError(f"matrix must be 3x3 (or 2x3 affine), got shape {m.shape}")
        if not np.isfinite(m).all():
            raise ValueError("matrix contains NaN or Inf")
        return m
    if not isinstance(transform, MatrixTransform):
        return None
    if theta.shape[0] != 1:
        raise ValueError(f"warp_image warps one image: theta must have one row, got shape {tuple(theta.shape)}")
    return transform.to_pixels(theta, in_size, out_size)[0].cpu().numpy()


def _horizon_crossed(m: np.ndarray, out_size: tuple[int, int], eps: float) -> bool:
    """Whether some output pixel maps to ``w <= eps`` (w is affine, so the corners decide)."""
    height, width = out_size
    corners = np.array([[0, 0, 1], [width - 1, 0, 1], [0, height - 1, 1], [width - 1, height - 1, 1]], dtype=np.float64)
    return bool(((corners @ m[2]) <= eps).any())


def _remap_maps_from_matrix(
    m: np.ndarray, in_size: tuple[int, int], out_size: tuple[int, int], eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel maps for ``cv2.remap`` with ``w`` clamped as :func:`stnkit.warp` does (never mirrored).

    Points beyond the horizon land very far outside the input; they are clipped to two pixels
    outside it, which reads the same with zeros, fill and border padding (not with reflection).
    """
    # Clamp w in normalised coordinates, exactly as apply_matrix_to_grid does: after the clamp the
    # division no longer commutes with the change of frame, so the pixel-space division would differ.
    norm = (norm_from_pix(in_size) @ torch.from_numpy(m) @ pix_from_norm(out_size)).numpy()
    height, width = out_size
    xs = (np.arange(width, dtype=np.float64) * 2 + 1) / width - 1
    ys = ((np.arange(height, dtype=np.float64) * 2 + 1) / height - 1)[:, None]
    w = np.maximum(norm[2, 0] * xs + norm[2, 1] * ys + norm[2, 2], eps)
    sx = (norm[0, 0] * xs + norm[0, 1] * ys + norm[0, 2]) / w
    sy = (norm[1, 0] * xs + norm[1, 1] * ys + norm[1, 2]) / w
    u = ((sx + 1.0) * in_size[1] - 1.0) / 2.0
    v = ((sy + 1.0) * in_size[0] - 1.0) / 2.0
    map_x = np.clip(u, -2.0, in_size[1] + 1.0).astype(np.float32)
    map_y = np.clip(v, -2.0, in_size[0] + 1.0).astype(np.float32)
    return map_x, map_y


def _torch_warp(
    image: Tensor,
    m: np.ndarray | None,
    theta: Tensor | None,
    transform: Transform | None,
    out_size: tuple[int, int],
    mode: InterpolationMode,
    padding_mode: PaddingMode,
    fill_value,
) -> Tensor:
    """The same warp through :func:`stnkit.warp` (no OpenCV), on ``1 x C x H x W`` floating point."""
    from .sampler import warp

    in_size = (int(image.shape[-2]), int(image.shape[-1]))
    if m is not None:
        norm = norm_from_pix(in_size) @ torch.from_numpy(m) @ pix_from_norm(out_size)
        norm = norm / norm[2, 2]
        family = "projective" if bool((norm[2, :2] != 0).any()) else "affine"
        theta = norm.reshape(-1)[: 8 if family == "projective" else 6][None].to(torch.float64)
        transform = get_transform(family)
    with torch.no_grad():
        return warp(image, theta.to(image.device), transform, out_size, mode, padding_mode, fill_value)


def warp_image(
    image: np.ndarray | Tensor,
    matrix: np.ndarray | Tensor | None = None,
    *,
    theta: Tensor | None = None,
    transform: Transform | str | None = None,
    out_size: Sequence[int] | None = None,
    mode: InterpolationMode | str = "bilinear",
    padding_mode: PaddingMode | str = "zeros",
    fill_value: float | Sequence[float] = 0.0,
    backend: str = "auto",
) -> np.ndarray | Tensor:
    """Warp one full-resolution image, without gradients, as fast as the machine allows.

    Parameters
    ----------
    image : numpy.ndarray or Tensor
        ``H x W`` or ``H x W x C`` array (``uint8``, ``float32`` or ``float64``),
        or a tensor ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)``.
    matrix : array-like, optional
        The 3x3 (or 2x3 affine) ``src_pix_from_dst_pix`` matrix in pixel
        coordinates. Give either ``matrix`` or ``theta`` and ``transform``.
    theta : Tensor, optional
        ``(1, P)`` parameters of ``transform`` in stnkit's normalised convention.
    transform : Transform or str, optional
        The family of ``theta``; any family (matrix families go through
        ``warpAffine``/``warpPerspective``, others through ``remap``).
    out_size : (int, int), optional
        ``(H_out, W_out)``; the input size when omitted.
    mode : {"bilinear", "nearest", "bicubic"}
        Interpolation (``INTER_LINEAR``, ``INTER_NEAREST``, ``INTER_CUBIC``).
    padding_mode : {"zeros", "border", "reflection", "fill"}
        What is read outside the input; see the module docstring.
    fill_value : float or sequence of float
        The constant for ``padding_mode="fill"`` (one value per channel allowed),
        in the image's units (0-255 for ``uint8``).
    backend : {"auto", "opencv", "torch"}
        ``"auto"`` uses OpenCV when installed and the image is on the CPU.

    Returns
    -------
    numpy.ndarray or Tensor
        The warped image, of the same kind, dtype and layout as ``image``.

    Convention: ``matrix`` (or ``theta``) maps output points to the input
    points they read (backward map); with ``theta``, exactly the map of
    :func:`stnkit.warp` with the same arguments.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((4, 6, 3), np.uint8); img[:, 3] = 200
    >>> shift = np.array([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]])  # output x reads input x + 1
    >>> warp_image(img, shift)[0, 2].tolist()
    [200, 200, 200]
    """
    if backend not in ("auto", "opencv", "torch"):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'opencv' or 'torch'")
    if np is None:
        raise ImportError("warp_image needs NumPy: pip install numpy (or stnkit[all])")
    mode = _parse_enum(InterpolationMode, mode, "mode")
    padding_mode = _parse_enum(PaddingMode, padding_mode, "padding_mode")
    work, layout = _as_hwc(image)
    is_tensor = isinstance(image, Tensor)
    in_size = (int(work.shape[-2]), int(work.shape[-1])) if is_tensor else (int(work.shape[0]), int(work.shape[1]))
    out_size = in_size if out_size is None else check_size(out_size)
    if (matrix is None) == (theta is None):
        raise ValueError("give either matrix= (src_pix_from_dst_pix) or theta= with transform=")
    if theta is not None:
        if transform is None:
            raise ValueError("theta= needs transform= (e.g. 'affine', 'projective', 'tps')")
        transform = get_transform(transform)
        theta = transform.check_theta(theta)
    m = _pixel_matrix(matrix, theta, transform, in_size, out_size)
    if m is not None and m[2, 2] > 0:
        # The scale of a homography is free; with m22 = 1, w is the normalised w that stnkit.warp clamps.
        m = m / m[2, 2]
    eps = float(torch.finfo(theta.dtype if theta is not None else torch.float32).eps)

    cv2 = _cv2()
    channels = int(work.shape[1] if is_tensor else work.shape[2])
    # Beyond the horizon of a homography stnkit reads "very far outside"; OpenCV would mirror those
    # points, and its reflection of far-away points costs time in proportion to the distance.
    horizon = m is not None and (m[2, 0] != 0.0 or m[2, 1] != 0.0) and _horizon_crossed(m, out_size, eps)
    use_opencv = (
        backend != "torch"
        and cv2 is not None
        and not (horizon and padding_mode is PaddingMode.REFLECTION)
        and not (is_tensor and image.device.type != "cpu")
        and max(*in_size, *out_size) <= _OPENCV_MAX_SIDE
    )
    if backend == "opencv" and not use_opencv:
        raise RuntimeError(
            "backend='opencv' needs OpenCV (pip install opencv-python-headless), a CPU image, sides < 32768, "
            "and no reflection padding beyond a homography's horizon"
        )

    if not use_opencv:
        tensor = work if is_tensor else torch.from_numpy(np.ascontiguousarray(work)).permute(2, 0, 1)[None]
        source_dtype = tensor.dtype
        out = _torch_warp(
            tensor if tensor.is_floating_point() else tensor.float(),
            m, theta, transform, out_size, mode, padding_mode, fill_value,
        )  # fmt: skip
        if not source_dtype.is_floating_point:
            info = torch.iinfo(source_dtype)
            out = out.round().clamp(info.min, info.max)
        out = out.to(source_dtype)
        if is_tensor:
            return {"hw": out[0, 0], "chw": out[0], "nchw": out}[layout]
        out = out[0].permute(1, 2, 0).numpy()
        return out[:, :, 0] if layout == "hw" else out

    # ------------------------------------------------------------------ OpenCV
    # A CPU tensor is planar (C, H, W): warp plane by plane, straight into the output tensor, which
    # saves the two interleaving copies (measured: about 2x on a 3x2048x2048 float32 tensor).
    planar = is_tensor and work.dtype in _OPENCV_TENSOR_DTYPES
    if planar:
        array = work[0].detach().contiguous().numpy()
    elif is_tensor:
        array = work[0].detach().permute(1, 2, 0).numpy()
    else:
        array = work
    source_dtype = array.dtype
    if array.dtype not in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        array = array.astype(np.float32)
    flags = {
        InterpolationMode.BILINEAR: cv2.INTER_LINEAR,
        InterpolationMode.NEAREST: cv2.INTER_NEAREST,
        InterpolationMode.BICUBIC: cv2.INTER_CUBIC,
    }[mode]
    border = {
        PaddingMode.ZEROS: cv2.BORDER_CONSTANT,
        PaddingMode.FILL: cv2.BORDER_CONSTANT,
        PaddingMode.BORDER: cv2.BORDER_REPLICATE,
        PaddingMode.REFLECTION: cv2.BORDER_REFLECT,
    }[padding_mode]
    fill = np.broadcast_to(
        np.asarray(fill_value if padding_mode is PaddingMode.FILL else 0.0, dtype=np.float64).reshape(-1), (channels,)
    ) if np.asarray(fill_value).size in (1, channels) else None  # fmt: skip
    if fill is None:
        raise ValueError(f"fill_value must be a scalar or hold one value per channel ({channels})")

    height, width = out_size
    maps = None
    if m is None:  # a non-matrix family: its grid, in input pixels
        with torch.no_grad():
            grid = transform.grid(theta.to(torch.float64), out_size)[0].numpy()
        maps = (
            (((grid[..., 0] + 1.0) * in_size[1] - 1.0) / 2.0).astype(np.float32),
            (((grid[..., 1] + 1.0) * in_size[0] - 1.0) / 2.0).astype(np.float32),
        )
    elif horizon:
        maps = _remap_maps_from_matrix(m, in_size, out_size, eps)

    def run(block: np.ndarray, values: np.ndarray, dst: np.ndarray | None = None) -> np.ndarray:
        value = tuple(float(v) for v in values) + (0.0,) * (4 - len(values))
        if maps is not None:
            return cv2.remap(block, maps[0], maps[1], flags, dst=dst, borderMode=border, borderValue=value)
        if m[2, 0] == 0.0 and m[2, 1] == 0.0:
            return cv2.warpAffine(
                block, m[:2] / m[2, 2], (width, height), dst=dst,
                flags=flags | cv2.WARP_INVERSE_MAP, borderMode=border, borderValue=value,
            )  # fmt: skip
        return cv2.warpPerspective(
            block, m, (width, height), dst=dst, flags=flags | cv2.WARP_INVERSE_MAP, borderMode=border, borderValue=value
        )

    if planar:
        result = torch.empty((channels, height, width), dtype=work.dtype)
        for k in range(channels):
            run(array[k], fill[k : k + 1], dst=result[k].numpy())
        return {"hw": result[0], "chw": result, "nchw": result[None]}[layout]

    # OpenCV's border value holds at most four channels: warp wider images four channels at a time.
    if channels <= 4:
        out = run(np.ascontiguousarray(array), fill)
        if out.ndim == 2:
            out = out[:, :, None]
    else:
        out = np.concatenate(
            [np.atleast_3d(run(np.ascontiguousarray(array[:, :, k : k + 4]), fill[k : k + 4])) for k in range(0, channels, 4)],
            axis=2,
        )
    out = out.astype(source_dtype, copy=False)
    if is_tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)[None].to(image.dtype)
        return {"hw": tensor[0, 0], "chw": tensor[0], "nchw": tensor}[layout]
    return out[:, :, 0] if layout == "hw" else out
