"""Align an input image to a support image with a spatial transformer.

:class:`Aligner` reads the input and the support side by side (greyscale,
concatenated along channels, resized to a fixed net size) and predicts the
transform that resamples the input into the support's frame. Refinement is
iterative (the current estimate warps the input's small copy, a correction is
predicted and composed) and the full-resolution input is sampled once.

Convention
----------
``theta`` (what :meth:`Aligner.forward` returns) is the library's backward
map: it takes a point of the **support** frame (the output) to the point of
the **input** that is shown there, in normalised coordinates (``-1``/``+1`` at
the image edges). ``AlignmentResult.matrix`` is the opposite direction, in
pixels: ``support_pix_from_input_pix`` (pixel centres at integers), so that
``cv2.warpPerspective(input, matrix, (W_support, H_support))`` aligns the input.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stnkit.localisation.nets import Localisation, RegressionHead
from stnkit.models.imaging import to_gray_uint8
from stnkit.models.registry import register_model
from stnkit.modules.spatial_transformer import SpatialTransformer
from stnkit.transforms import MatrixTransform, Transform, get_transform
from stnkit.transforms.base import check_size, norm_from_pix, pix_from_norm

__all__ = ["Aligner", "AlignmentResult", "build_aligner", "aligner_transform", "SHIPPED_ALIGNER"]

#: Name of the shipped pretrained model (``stnkit/assets/models/<name>.safetensors``).
SHIPPED_ALIGNER = "aligner-projective"

_FAMILIES = ("affine", "projective", "tps")
_FUSIONS = ("concat", "correlation")


def aligner_transform(family: str, tps_grid: int = 4) -> Transform:
    """The transform an aligner of ``family`` predicts.

    ``"projective"`` uses the corner-offset parametrisation (trains best);
    ``"tps"`` a ``tps_grid`` x ``tps_grid`` lattice (matching
    :class:`stnkit.data.pairs.WarpRanges`).

    Examples
    --------
    >>> aligner_transform("projective")
    Projective(parametrisation='corners')
    """
    if family not in _FAMILIES:
        raise ValueError(f"transform family must be one of {_FAMILIES}, got {family!r}")
    if family == "projective":
        return get_transform({"name": "projective", "parametrisation": "corners"})
    if family == "tps":
        return get_transform({"name": "tps", "grid_size": [tps_grid, tps_grid]})
    return get_transform("affine")


class _Standardise(nn.Module):
    """Zero mean, unit standard deviation per image and channel (robust to brightness/contrast)."""

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True)
        return (x - mean) / (std + 1e-3)


def _conv_block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _backbone(in_channels: int, channels: Sequence[int], pooled: int, hidden: int) -> tuple[nn.Module, int]:
    """Conv-BN-ReLU stages, each a stride-2 conv then a stride-1 conv, pooled to ``pooled`` x ``pooled``."""
    layers: list[nn.Module] = [_Standardise()]
    c = in_channels
    for i, c_out in enumerate(channels):
        layers += _conv_block(c, c_out, 2)
        if i > 0:  # the first stage only downsamples (cheap at full net resolution)
            layers += _conv_block(c_out, c_out, 1)
        c = c_out
    # Pool to a small grid, not to 1x1: corner offsets need to know *where* features are.
    layers += [nn.AdaptiveAvgPool2d(pooled), nn.Flatten(), nn.Linear(c * pooled * pooled, hidden), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers), hidden


class _CorrelationBackbone(nn.Module):
    """Siamese features of input and support, a global correlation volume, then a conv head.

    The localisation input is ``(N, 2, H, W)``: channel 0 the (warped) input,
    channel 1 the support. One shared tower (the first ``len(channels) - 1``
    stages) maps each to ``(N, C, h, w)`` features, L2-normalised per position;
    their correlation ``corr[n, k, i, j] = <f_input[n, :, i, j], f_support[n, :, k]>``
    over every support position ``k`` is a ``(N, h*w, h, w)`` volume: for each input
    position, how well it matches every support position, which is what a
    homography's corner offsets are read from (Rocco et al. 2017; DeTone et al. 2016
    fuse by concatenation instead). A last stage, pooling and a fully-connected
    layer read the volume.
    """

    def __init__(self, channels: Sequence[int], pooled: int, hidden: int, size: Sequence[int]) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"the correlation fusion needs at least 2 stages in channels, got {list(channels)!r}")
        self.standardise = _Standardise()
        tower: list[nn.Module] = []
        c = 1
        for i, c_out in enumerate(channels[:-1]):
            tower += _conv_block(c, c_out, 2)
            if i > 0:
                tower += _conv_block(c_out, c_out, 1)
            c = c_out
        self.tower = nn.Sequential(*tower)
        # The head reads one channel per tower position: h * w at the net size.
        with torch.no_grad():
            positions = self.tower(torch.zeros(1, 1, *size)).shape[-2:].numel()
        c = channels[-1]
        self.head = nn.Sequential(*_conv_block(positions, c, 2), *_conv_block(c, c, 1), nn.AdaptiveAvgPool2d(pooled),
                                  nn.Flatten(), nn.Linear(c * pooled * pooled, hidden), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 2:
            raise ValueError(f"the correlation backbone reads (N, 2, H, W) (input, support), got {tuple(x.shape)}")
        x = self.standardise(x)
        batch = x.shape[0]
        features = self.tower(torch.cat((x[:, :1], x[:, 1:]), dim=0))  # one pass for both images
        features = F.normalize(features, dim=1)
        f_input, f_support = features[:batch], features[batch:]
        _, c, h, w = f_input.shape
        corr = torch.einsum("nck,ncij->nkij", f_support.reshape(batch, c, h * w), f_input)
        return self.head(F.relu(corr))


@dataclass
class AlignmentResult:
    """What :meth:`Aligner.align` returns.

    Attributes
    ----------
    matrix : numpy.ndarray or None
        float64 ``(3, 3)`` ``support_pix_from_input_pix`` (matrix families;
        ``None`` for TPS): ``cv2.warpPerspective(input, matrix, (W_s, H_s))``
        gives :attr:`image`.
    image : numpy.ndarray or torch.Tensor
        The input resampled into the support frame at the support's full
        resolution, same channels, dtype and layout as the input.
    theta : torch.Tensor
        ``(num_params,)`` the network's parameters (support normalised -> input
        normalised, the library's backward-map convention), before any refinement.
    ncc : float or None
        With ``refine``: the normalised cross-correlation of the aligned input
        and the support over their overlap (1 is a perfect match; a low value
        flags a doubtful alignment).
    start : str or None
        With ``refine``: the starting point the refinement kept (``"network"``,
        ``"features"``, ``"search1"``..., ``"identity"``).
    """

    matrix: np.ndarray | None
    image: Any
    theta: Tensor
    ncc: float | None = None
    start: str | None = None


class Aligner(nn.Module):
    """Predict the transform that aligns an input image to a support image.

    Parameters
    ----------
    transform : {"affine", "projective", "tps"}
        Family of the predicted warp (projective uses corner offsets).
    size : (int, int), default (128, 128)
        Net size ``(height, width)``; both images are resized to it.
    channels : sequence of int
        Widths of the conv stages (each halves the resolution).
    iterations : int, default 2
        Refinement rounds (compose parameters, sample once).
    fusion : {"concat", "correlation"}
        How input and support are combined: ``"concat"`` stacks them as two
        channels of one conv net (HomographyNet); ``"correlation"`` runs one
        shared conv tower on each and reads their global correlation volume
        (see ``benchmarks/RESULTS.md`` for the comparison).
    hidden : int
        Width of the fully-connected layer before the regression head.
    pooled : int
        Side of the average-pooled feature grid.
    tps_grid : int
        Lattice side for ``"tps"``.

    Convention: :meth:`forward` returns ``theta`` mapping support-frame
    (output) normalised points to input normalised points (backward map);
    :attr:`AlignmentResult.matrix` is ``support_pix_from_input_pix`` in pixels.

    Examples
    --------
    >>> aligner = Aligner("projective", size=(64, 64), channels=(8, 16), iterations=1).eval()
    >>> aligner(torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)).shape
    torch.Size([2, 8])
    >>> result = aligner.align(np.zeros((50, 70), np.uint8), np.zeros((90, 60, 3), np.uint8))
    >>> result.matrix.shape, result.image.shape, result.image.dtype
    ((3, 3), (90, 60), dtype('uint8'))
    """

    def __init__(
        self,
        transform: str = "projective",
        size: Sequence[int] = (128, 128),
        channels: Sequence[int] = (16, 32, 64, 96),
        iterations: int = 2,
        fusion: str = "concat",
        hidden: int = 256,
        pooled: int = 4,
        tps_grid: int = 4,
    ) -> None:
        super().__init__()
        if fusion not in _FUSIONS:
            raise ValueError(f"fusion must be one of {_FUSIONS}, got {fusion!r}")
        channels = list(channels)
        if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels!r}")
        self.family = transform
        self.size = check_size(tuple(size), "size")
        self.fusion = fusion
        family_transform = aligner_transform(transform, tps_grid)
        if fusion == "correlation":
            backbone, features = _CorrelationBackbone(channels, pooled, hidden, self.size), hidden
        else:
            backbone, features = _backbone(2, channels, pooled, hidden)
        localisation = Localisation(backbone, RegressionHead(features, family_transform, bounds=True))
        self.stn = SpatialTransformer(localisation, family_transform, out_size=self.size, loc_size=self.size,
                                      iterations=iterations, padding_mode="zeros")

    @property
    def transform(self) -> Transform:
        """The transform family of ``theta``."""
        return self.stn.transform

    def forward(self, input: Tensor, support: Tensor) -> Tensor:
        """Predict ``theta`` for a batch.

        Parameters
        ----------
        input, support : Tensor
            ``(N, 1, H, W)`` greyscale in ``[0, 1]``, any size (resized to
            :attr:`size` with antialiasing).

        Returns
        -------
        Tensor
            ``(N, num_params)``: support normalised -> input normalised.
        """
        return self.stn.predict_theta(input, support=support)

    def warp(self, input: Tensor, theta: Tensor, out_size: Sequence[int] | None = None) -> Tensor:
        """Resample ``input`` ``(N, C, H, W)`` into the support frame (differentiable)."""
        from stnkit.sampling import warp

        return warp(input, theta, self.transform, out_size or self.size)

    @torch.no_grad()
    def align(self, input: Any, support: Any, *, refine: bool = True, refine_size: int = 256) -> AlignmentResult:
        """Align one ``input`` image to one ``support`` image at full resolution.

        The network predicts the warp from views at its net size. For the
        projective family, ``refine`` then polishes it photometrically
        (:func:`stnkit.models.refinement.refine_alignment`: coarse-to-fine
        Levenberg-Marquardt on the NCC through the same bilinear sampler, from
        the network's estimate, a SIFT + RANSAC estimate when OpenCV finds one,
        a coarse search and the identity; the best-correlated wins).

        Parameters
        ----------
        input, support : numpy.ndarray or torch.Tensor
            ``(H, W)`` or ``(H, W, C)`` arrays (uint8, uint16 or float in
            ``[0, 1]``), or tensors ``(H, W)``, ``(C, H, W)``, ``(1, C, H, W)``.
            Sizes and channel counts may differ.
        refine : bool
            Refine the network's estimate photometrically (projective family only;
            about 0.1-0.2 s per pair on a 2-core CPU, against ~6 ms without).
        refine_size : int
            Side of the square views the finest refinement level works on (at
            most the larger image side; at least the net size).

        Returns
        -------
        AlignmentResult
            ``matrix`` (``support_pix_from_input_pix``), the aligned image and ``theta``.

        Raises
        ------
        TypeError, ValueError
            If an image is not numeric, is empty or has an unsupported shape.

        Examples
        --------
        >>> import cv2
        >>> aligner = Aligner("affine", size=(32, 32), channels=(8,), iterations=1).eval()
        >>> image = np.random.default_rng(0).random((40, 30)).astype(np.float32)
        >>> result = aligner.align(image, image)
        >>> np.allclose(result.image, cv2.warpPerspective(image, result.matrix, (30, 40)))
        True
        """
        input_hwc, restore = _as_hwc(input, "input")
        support_hwc, _ = _as_hwc(support, "support")
        param = next(self.parameters())
        small_input = self._net_view(input_hwc).to(param.device)
        small_support = self._net_view(support_hwc).to(param.device)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                theta = self(small_input, small_support).to(torch.float64)
        finally:
            self.train(was_training)
        in_size, support_size = input_hwc.shape[:2], support_hwc.shape[:2]
        height, width = support_size
        ncc = start = None
        if refine and self.family == "projective":
            from stnkit.models.refinement import candidate_matrices, refine_alignment

            network = self.transform.matrix(theta)[0].cpu()
            candidates = candidate_matrices(small_input.cpu(), small_support.cpu(), network)
            side = max(min(int(refine_size), max(*in_size, *support_size)), *self.size)
            view_input, view_support = self._net_view(input_hwc, (side, side)), self._net_view(support_hwc, (side, side))
            # Levels from 32 px up to `side`, doubling; every start goes through the two coarsest.
            levels = [32 / side]
            while levels[-1] < 1.0:
                levels.append(min(1.0, levels[-1] * 2))
            iterations = [15, 10] + [6] * (len(levels) - 2)
            refined = refine_alignment(view_input, view_support, candidates, levels=levels, iterations=iterations[: len(levels)])
            matrix_norm, ncc, start = refined.matrix, refined.ncc, refined.start
            input_pix_from_support_pix = (pix_from_norm(in_size) @ matrix_norm @ norm_from_pix(support_size)).numpy()
            matrix = np.linalg.inv(input_pix_from_support_pix)
            matrix = matrix / matrix[2, 2]
            aligned = cv2.warpPerspective(input_hwc, matrix, (width, height), flags=cv2.INTER_LINEAR)
        elif isinstance(self.transform, MatrixTransform):
            input_pix_from_support_pix = self.transform.to_pixels(theta, in_size, support_size)[0].cpu().numpy()
            matrix = np.linalg.inv(input_pix_from_support_pix)
            matrix = matrix / matrix[2, 2]
            aligned = cv2.warpPerspective(input_hwc, matrix, (width, height), flags=cv2.INTER_LINEAR)
        else:
            matrix = None
            grid = self.transform.grid(theta, support_size)[0].cpu().numpy()  # normalised input points
            map_x = ((grid[..., 0] + 1) * in_size[1] / 2 - 0.5).astype(np.float32)
            map_y = ((grid[..., 1] + 1) * in_size[0] / 2 - 0.5).astype(np.float32)
            aligned = cv2.remap(input_hwc, map_x, map_y, interpolation=cv2.INTER_LINEAR)
        return AlignmentResult(matrix=matrix, image=restore(aligned), theta=theta[0].float().cpu(), ncc=ncc, start=start)

    def _net_view(self, image: np.ndarray, size: Sequence[int] | None = None) -> Tensor:
        """``(1, 1, h, w)`` float32 greyscale at ``size`` (the net size by default), resized with antialiasing."""
        size = self.size if size is None else tuple(size)
        gray = torch.from_numpy(to_gray_uint8(image).astype(np.float32) / 255.0)[None, None]
        if tuple(gray.shape[-2:]) == size:
            return gray
        return F.interpolate(gray, size=size, mode="bilinear", align_corners=False, antialias=True)

    @classmethod
    def pretrained(cls, name: str | os.PathLike[str] = SHIPPED_ALIGNER, map_location: str | torch.device = "cpu") -> "Aligner":
        """Load a shipped aligner (default ``"aligner-projective"``) or a checkpoint path, in eval mode.

        Raises
        ------
        FileNotFoundError
            If there is no such shipped model or file.
        ValueError
            If the checkpoint is corrupt or holds another kind of model.

        Examples
        --------
        >>> aligner = Aligner.pretrained()  # doctest: +SKIP
        """
        from pathlib import Path

        from stnkit.models.checkpoint import load_checkpoint, load_model

        if Path(name).is_file():
            # Check the kind before building anything from the file.
            kind = load_checkpoint(name).config.get("kind")
            if kind != "aligner":
                raise ValueError(f"{name}: holds a model of kind {kind!r}, not an aligner")
        model = load_model(name, map_location=map_location)
        if not isinstance(model, cls):
            kind = getattr(model, "stnkit_config", {}).get("kind", type(model).__name__)
            raise ValueError(f"{name}: holds a model of kind {kind!r}, not an aligner")
        return model

    def extra_repr(self) -> str:
        return f"family={self.family!r}, size={self.size}, fusion={self.fusion!r}"


def _as_hwc(image: Any, name: str) -> tuple[np.ndarray, Any]:
    """Return ``image`` as a contiguous ``(H, W)`` / ``(H, W, C)`` array and a function that restores its type/layout."""
    if isinstance(image, Tensor):
        array = image.detach().cpu()
        leading = 0
        while array.dim() > 3 and array.shape[0] == 1:
            array = array[0]
            leading += 1
        if array.dim() == 3:
            array = array.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        elif array.dim() != 2:
            raise ValueError(f"{name} tensor must be (H, W), (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
        dtype = image.dtype
        channels_first = image.dim() >= 3
        array = array.numpy()

        def restore(out: np.ndarray) -> Tensor:
            t = torch.from_numpy(np.ascontiguousarray(out)).to(dtype)
            if channels_first:
                t = (t.unsqueeze(-1) if t.dim() == 2 else t).permute(2, 0, 1)
                for _ in range(leading):
                    t = t.unsqueeze(0)
            return t.contiguous()
    else:
        array = np.asarray(image)

        def restore(out: np.ndarray) -> np.ndarray:
            return out

    if array.dtype == bool or array.dtype.kind not in "uif":
        raise TypeError(f"{name} must be a numeric image, got dtype {array.dtype}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and not 1 <= array.shape[2] <= 4):
        raise ValueError(f"{name} must have shape (H, W) or (H, W, C) with C <= 4, got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (zero-size image), got shape {array.shape}")
    squeeze = array.ndim == 3 and array.shape[2] == 1
    work = np.ascontiguousarray(array[:, :, 0] if squeeze else array)
    if work.dtype not in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        work = work.astype(np.float32)
    if squeeze:
        inner = restore

        def restore(out: np.ndarray) -> Any:  # noqa: F811 - keep the trailing channel axis
            return inner(out[:, :, None])
    return work, restore


@register_model("aligner")
def build_aligner(
    transform: str = "projective",
    size: Sequence[int] = (128, 128),
    channels: Sequence[int] = (16, 32, 64, 96),
    iterations: int = 2,
    fusion: str = "concat",
    hidden: int = 256,
    pooled: int = 4,
    tps_grid: int = 4,
) -> Aligner:
    """Registry builder for :class:`Aligner` (config kind ``"aligner"``).

    Examples
    --------
    >>> from stnkit.models.registry import build_model
    >>> build_model({"kind": "aligner", "transform": "affine", "size": [64, 64], "channels": [8]}).family
    'affine'
    """
    return Aligner(transform, size, channels, iterations, fusion, hidden, pooled, tps_grid)
