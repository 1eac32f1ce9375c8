"""Modules that compose the localisation net (L), grid generator (G) and sampler (S)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sampling import InterpolationMode, PaddingMode, warp
from ..sampling.sampler import _check_image, _parse_enum
from ..transforms import Transform, get_transform
from ..transforms.base import check_size

__all__ = ["Warp", "SpatialTransformer"]


class Warp(nn.Module):
    """:func:`stnkit.warp` as a module: ``forward(x, theta)``.

    Parameters
    ----------
    transform : Transform or str
        The family of ``theta``.
    out_size : (int, int), optional
        Output size; the input's size when omitted.
    mode, padding_mode, fill_value
        As in :func:`stnkit.sample`.

    Convention: ``theta`` maps output points to input points (backward map),
    normalised coordinates. Shapes: ``x (N, C, H, W)``, ``theta (N, P)``.

    Examples
    --------
    >>> w = Warp("affine", out_size=(16, 16))
    >>> w(torch.rand(2, 3, 32, 32), torch.tensor([[0.5, 0, 0, 0, 0.5, 0.0]]).repeat(2, 1)).shape
    torch.Size([2, 3, 16, 16])
    """

    def __init__(
        self,
        transform: Transform | str,
        out_size: Sequence[int] | None = None,
        mode: InterpolationMode | str = "bilinear",
        padding_mode: PaddingMode | str = "zeros",
        fill_value: float | Sequence[float] = 0.0,
    ) -> None:
        super().__init__()
        self.transform = get_transform(transform)
        self.out_size = None if out_size is None else check_size(out_size)
        self.mode = _parse_enum(InterpolationMode, mode, "mode")
        self.padding_mode = _parse_enum(PaddingMode, padding_mode, "padding_mode")
        self.fill_value = fill_value

    def forward(self, x: Tensor, theta: Tensor) -> Tensor:
        return warp(x, theta, self.transform, self.out_size, self.mode, self.padding_mode, self.fill_value)

    def extra_repr(self) -> str:
        return f"{self.transform!r}, out_size={self.out_size}, mode={self.mode.value}, padding_mode={self.padding_mode.value}"


class SpatialTransformer(nn.Module):
    """A spatial transformer: localisation net, grid generator and sampler in one module.

    Parameters
    ----------
    localisation : nn.Module
        Maps the localisation input ``(N, C_loc, H_loc, W_loc)`` to ``theta``
        ``(N, transform.num_params)``; see :mod:`stnkit.localisation`. With a
        support image it reads the view and the support concatenated along
        channels, so ``C_loc = C + C_support``.
    transform : Transform or str, optional
        The family of ``theta``; defaults to ``localisation.transform`` when it has one.
    out_size : (int, int), optional
        Output size ``(H_out, W_out)``; the input's size when omitted. The
        output size does not depend on the input size when given.
    loc_size : (int, int), optional
        Resize the localisation input to this size first (predict from a
        low-resolution copy, sample the full-resolution input).
    iterations : int
        Rounds of refinement. Each round warps the localisation input by the
        current estimate, predicts a correction and composes it; the input
        itself is sampled once, at the end, so refinement adds no
        interpolation blur (inverse-compositional STN, Lin & Lucey, CVPR 2017).
    mode, padding_mode, fill_value
        Sampler options, as in :func:`stnkit.sample`.

    Convention: ``theta`` maps output points to input points (backward map) in
    normalised coordinates; :attr:`last_theta` holds the parameters of the
    last forward pass (detached), for inspection and drawing.

    Shapes: ``x (N, C, H, W) -> (N, C, H_out, W_out)``.

    Examples
    --------
    >>> from stnkit.localisation import conv_localisation
    >>> st = SpatialTransformer(conv_localisation(1, (42, 42), "affine"), out_size=(28, 28))
    >>> st(torch.rand(4, 1, 42, 42)).shape
    torch.Size([4, 1, 28, 28])
    >>> st.last_theta[0]
    tensor([1., 0., 0., 0., 1., 0.])
    """

    def __init__(
        self,
        localisation: nn.Module,
        transform: Transform | str | None = None,
        out_size: Sequence[int] | None = None,
        loc_size: Sequence[int] | None = None,
        iterations: int = 1,
        mode: InterpolationMode | str = "bilinear",
        padding_mode: PaddingMode | str = "zeros",
        fill_value: float | Sequence[float] = 0.0,
    ) -> None:
        super().__init__()
        if transform is None:
            transform = getattr(localisation, "transform", None)
            if transform is None:
                raise ValueError("give transform=, or a localisation net that has a .transform attribute")
        self.localisation = localisation
        self.warp = Warp(transform, out_size, mode, padding_mode, fill_value)
        self.loc_size = None if loc_size is None else check_size(loc_size, "loc_size")
        self.iterations = iterations
        self.last_theta: Tensor | None = None

    @property
    def iterations(self) -> int:
        """Refinement rounds; checked on every assignment, since CLIs change it on loaded models."""
        return self._iterations

    @iterations.setter
    def iterations(self, iterations: int) -> None:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
        self._iterations = iterations

    @property
    def transform(self) -> Transform:
        return self.warp.transform

    def _resize(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        if tuple(image.shape[-2:]) == size:
            return image
        # Antialiasing matters when predicting from a much smaller copy.
        return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)

    def predict_theta(self, x: Tensor, support: Tensor | None = None, loc_input: Tensor | None = None) -> Tensor:
        """Predict ``theta`` for ``x`` (optionally against ``support``), refining ``iterations`` times.

        Parameters
        ----------
        x : Tensor
            ``(N, C, H, W)`` input to be warped.
        support : Tensor, optional
            ``(N, C_s, H_s, W_s)`` reference image the input is aligned to.
        loc_input : Tensor, optional
            What the localisation net reads instead of ``x`` (e.g. a
            low-resolution copy or a feature map); same frame as ``x``.

        Returns
        -------
        Tensor
            ``(N, num_params)``.
        """
        view = _check_image(x if loc_input is None else loc_input, "x" if loc_input is None else "loc_input")
        if view.shape[0] != x.shape[0]:
            raise ValueError(f"batch mismatch: x has {x.shape[0]} images but loc_input has {view.shape[0]}")
        size = self.loc_size or tuple(view.shape[-2:])
        view = self._resize(view, size)
        if support is not None:
            support = _check_image(support, "support")
            if support.shape[0] != x.shape[0]:
                raise ValueError(f"batch mismatch: x has {x.shape[0]} images but support has {support.shape[0]}")
            support = self._resize(support, size)
        theta = None
        for _ in range(self.iterations):
            current = view if theta is None else warp(view, theta, self.transform, size, padding_mode="border")
            if support is not None:
                current = torch.cat((current, support), dim=1)
            delta = self.localisation(current)
            theta = delta if theta is None else self.transform.compose(theta, delta)
        return theta

    def forward(self, x: Tensor, support: Tensor | None = None, loc_input: Tensor | None = None) -> Tensor:
        """Warp ``x`` by the predicted transform; see :meth:`predict_theta` for the arguments."""
        theta = self.predict_theta(x, support=support, loc_input=loc_input)
        self.last_theta = theta.detach()
        return self.warp(x, theta)

    def extra_repr(self) -> str:
        return f"iterations={self.iterations}, loc_size={self.loc_size}"
