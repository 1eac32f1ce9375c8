"""The spatial-transformer variants of Finnveden, Jansson & Lindeberg (ICPR 2020).

"Understanding when spatial transformer networks do not support invariance, and
what to do about it" compares where a spatial transformer sits and what its
localisation net reads. Every model here is one convolutional classifier
(``blocks`` of 3x3 conv + ReLU, 2x2 max pooling after the 2nd and 4th, then a
linear layer) with a transformer placed in one of these ways:

==================  =====================================================================
``cnn``             no transformer (the baseline)
``stn-input``       "STN" / STN-C0: a transformer on the *input*, with its own small
                    localisation net (the ST paper's conv localisation net)
``stn-features``    "STN-Ck": the transformer warps the *feature maps* after block
                    ``layer`` (k); its localisation net reads those feature maps
``stn-deep-loc``    deeper localisation net: a private copy of the classifier's first
                    k blocks (own parameters) predicts theta; the input is warped
``stn-shared``      "SLN": the localisation net *is* the classifier's first k blocks
                    (the same module objects, so the parameters are shared) plus a
                    small head; the input is warped and the whole classifier runs on it
``stn-iterative``   ``stn-shared`` refined ``iterations`` times (inverse-compositional:
                    the image is re-warped by the current estimate and re-read)
==================  =====================================================================

Why it matters: a purely spatial warp of CNN feature maps cannot in general
align the feature maps of a transformed image with those of the original (the
filters themselves are not rotated or rescaled), so ``stn-features`` cannot
give invariance to rotation or scaling however well it is trained, while the
input-warping variants can. :mod:`stnkit.evaluation.invariance` measures this.

All models are built from the core modules (:class:`~stnkit.SpatialTransformer`,
:func:`~stnkit.localisation.conv_localisation`,
:func:`~stnkit.localisation.localisation_from_layers`) and registered as the
model kind ``"invariance"``, so checkpoints, :class:`~stnkit.training.trainer.Trainer`
and ``stnkit eval`` work with them unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..localisation import conv_localisation, default_bounds, localisation_from_layers
from ..modules import InputGradConv2d, SpatialTransformer
from ..transforms import MatrixTransform, get_transform
from ..transforms.base import check_size
from .registry import build_model, register_model

__all__ = [
    "INVARIANCE_VARIANTS",
    "INPUT_VARIANTS",
    "InvarianceClassifier",
    "build_invariance_model",
    "invariance_model",
    "invariance_config",
]

#: Every variant name, in the order of the module docstring.
INVARIANCE_VARIANTS = ("cnn", "stn-input", "stn-features", "stn-deep-loc", "stn-shared", "stn-iterative")
#: The variants whose transformer warps the input image.
INPUT_VARIANTS = ("stn-input", "stn-deep-loc", "stn-shared", "stn-iterative")

# Blocks followed by 2x2 max pooling (1-based), as in a VGG-style 4-layer MNIST net.
_POOL_AFTER = (2, 4)
# Width of the fully-connected layer that turns the (shared or copied) block
# features into the regression head's input.
_LOC_HIDDEN = 32


def _conv_blocks(in_channels: int, channels: Sequence[int]) -> nn.ModuleList:
    """``conv3x3 (padding 1) - ReLU`` per entry of ``channels``; 2x2 max pooling after blocks 2 and 4."""
    blocks = []
    c = in_channels
    for index, c_out in enumerate(channels, start=1):
        # The first block reads the (warped) input: InputGradConv2d makes its input gradient cheap on the CPU.
        conv = InputGradConv2d if index == 1 else nn.Conv2d
        layers: list[nn.Module] = [conv(c, c_out, 3, padding=1), nn.ReLU(inplace=True)]
        if index in _POOL_AFTER:
            layers.append(nn.MaxPool2d(2))
        blocks.append(nn.Sequential(*layers))
        c = c_out
    return nn.ModuleList(blocks)


def _loc_tail(example: Tensor) -> tuple[nn.Sequential, int]:
    """``max-pool 2 - flatten - FC 32 - ReLU`` after a stack of blocks; returns it and its width."""
    pool = nn.MaxPool2d(2, ceil_mode=True)
    with torch.no_grad():
        flat = pool(example).flatten(1).shape[1]
    return nn.Sequential(pool, nn.Flatten(), nn.Linear(flat, _LOC_HIDDEN), nn.ReLU(inplace=True)), _LOC_HIDDEN


class InvarianceClassifier(nn.Module):
    """A conv classifier with a spatial transformer on its input or on its feature maps.

    Parameters
    ----------
    variant : str
        One of :data:`INVARIANCE_VARIANTS`.
    blocks : nn.ModuleList
        The classifier's conv blocks, applied in order.
    head : nn.Module
        Maps the last block's feature maps to logits.
    transformer : SpatialTransformer, optional
        ``None`` for ``"cnn"``.
    layer : int
        ``k``: for ``"stn-features"`` the transformer acts after block ``k``
        (1-based); for the shared and deep localisation nets, the number of
        blocks the localisation net uses.

    Convention: the transformer's ``theta`` maps points of its output to points
    of its input (backward map, normalised coordinates, see
    :mod:`stnkit.transforms.base`); for the input variants its input is the
    image, for ``"stn-features"`` the feature maps after block ``k`` (same
    normalised frame, since every conv is padded).

    Shapes: ``(N, C, H, W) -> (N, num_classes)`` logits.

    Examples
    --------
    >>> net = build_invariance_model("stn-shared", layer=2, channels=[8, 8, 16, 16])
    >>> net(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> sorted(net.invariance_views(torch.rand(2, 1, 28, 28)))
    ['features', 'logits', 'matrix', 'transformer_output']
    """

    def __init__(
        self,
        variant: str,
        blocks: nn.ModuleList,
        head: nn.Module,
        transformer: SpatialTransformer | None = None,
        layer: int = 0,
    ) -> None:
        super().__init__()
        if variant not in INVARIANCE_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(INVARIANCE_VARIANTS)}")
        if (transformer is None) != (variant == "cnn"):
            raise ValueError(f"variant {variant!r} {'needs' if variant != 'cnn' else 'takes no'} transformer")
        self.variant = variant
        self.layer = layer
        # Registered before the transformer: a parameter shared with the
        # localisation net is then named (and trained) as a classifier parameter.
        self.blocks = blocks
        self.head = head
        self.transformer = transformer

    @property
    def transforms_input(self) -> bool:
        """Whether the transformer warps the input image (rather than feature maps)."""
        return self.variant in INPUT_VARIANTS

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The transformer's output and the last block's feature maps."""
        if self.transformer is None:
            transformed = x
            h = x
            start = 0
        elif self.transforms_input:
            transformed = self.transformer(x)
            h = transformed
            start = 0
        else:
            h = x
            for block in self.blocks[: self.layer]:
                h = block(h)
            transformed = self.transformer(h)
            h = transformed
            start = self.layer
        for block in self.blocks[start:]:
            h = block(h)
        return transformed, h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self._run(x)[1])

    def invariance_views(self, x: Tensor) -> dict[str, Tensor | None]:
        """What :func:`stnkit.evaluation.invariance.measure_invariance` compares.

        Returns
        -------
        dict
            ``"transformer_output"``: the transformer's output (the input itself
            for ``"cnn"``); ``"features"``: the last conv block's feature maps
            (what the linear head reads); ``"logits"``; ``"matrix"``: the
            ``(N, 3, 3)`` backward matrix of the predicted transform when the
            transformer warps the input with a matrix family, else ``None``.
        """
        transformed, features = self._run(x)
        matrix = None
        if self.transforms_input and isinstance(self.transformer.transform, MatrixTransform):
            matrix = self.transformer.transform.matrix(self.transformer.last_theta)
        return {"transformer_output": transformed, "features": features, "logits": self.head(features), "matrix": matrix}

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, layer={self.layer}"


@register_model("invariance")
def build_invariance_model(
    variant: str = "stn-shared",
    layer: int = 2,
    transform: str | dict = "affine",
    in_size: Sequence[int] = (28, 28),
    in_channels: int = 1,
    num_classes: int = 10,
    channels: Sequence[int] = (32, 32, 64, 64),
    iterations: int | None = None,
    bounds: bool = True,
    max_translation: float = 1.0,
    max_linear: float = 1.0,
) -> InvarianceClassifier:
    """Build one of the ICPR 2020 STN variants (see the module docstring).

    Parameters
    ----------
    variant : str
        One of :data:`INVARIANCE_VARIANTS`.
    layer : int
        ``k``, between 1 and ``len(channels)``: where ``"stn-features"`` puts its
        transformer, and how many classifier blocks the deep and shared
        localisation nets use. Ignored by ``"cnn"`` and ``"stn-input"``.
    transform : str or dict
        Transformer family: ``"affine"`` (default), ``"rotation"``,
        ``"similarity"``, ``"scale_translation"``...
    in_size : (int, int)
        Input size (28x28 for rotated MNIST, 42x42 for RTS).
    in_channels, num_classes : int
        Input channels and number of classes.
    channels : sequence of int
        Filters of each 3x3 conv block (2x2 max pooling after blocks 2 and 4).
    iterations : int, optional
        Refinement rounds of the transformer; default 2 for
        ``"stn-iterative"`` and 1 otherwise.
    bounds, max_translation, max_linear
        Keep theta in a box around the identity
        (:func:`stnkit.localisation.default_bounds`).

    Returns
    -------
    InvarianceClassifier

    Raises
    ------
    ValueError
        For an unknown variant, a ``layer`` out of range or an input too small.

    Examples
    --------
    >>> net = build_invariance_model("stn-features", layer=1, channels=[8, 8, 16, 16])
    >>> net(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> net.transformer.localisation.backbone[1].in_channels  # reads the 8 feature maps
    8
    """
    if variant not in INVARIANCE_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(INVARIANCE_VARIANTS)}")
    in_size = check_size(in_size, "in_size")
    channels = list(channels)
    if not channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
        raise ValueError(f"channels must be a non-empty list of positive integers, got {channels!r}")
    uses_layer = variant in ("stn-features", "stn-deep-loc", "stn-shared", "stn-iterative")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an integer, got {layer!r}")
    if uses_layer and not 1 <= layer <= len(channels):
        raise ValueError(f"layer must be between 1 and {len(channels)} (the number of conv blocks), got {layer}")
    if iterations is None:
        iterations = 2 if variant == "stn-iterative" else 1
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")

    blocks = _conv_blocks(in_channels, channels)
    shapes = []  # (C, H, W) after each block
    with torch.no_grad():
        h = torch.zeros(1, in_channels, *in_size)
        for block in blocks:
            h = block(h)
            shapes.append(tuple(h.shape[1:]))
    if min(shapes[-1][1:]) < 1:
        raise ValueError(f"in_size {in_size} is too small for {len(channels)} blocks")
    head = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(shapes[-1]).prod()), num_classes))

    transformer = None
    if variant != "cnn":
        family = get_transform(transform)
        box = default_bounds(family, max_translation, max_linear) if bounds else None
        st_kwargs = {"transform": family, "iterations": iterations}
        if variant == "stn-input":
            localisation = conv_localisation(in_channels, in_size, family, bounds=box)
        elif variant == "stn-features":
            c, height, width = shapes[layer - 1]
            # The ST paper's localisation net (pool - conv5 - pool - conv5), with
            # 3x3 kernels where the feature maps are too small for 5x5.
            kernel = 5 if min(height, width) >= 28 else 3
            localisation = conv_localisation(c, (height, width), family, kernel_size=kernel, bounds=box)
        else:
            if variant == "stn-deep-loc":
                prefix = list(_conv_blocks(in_channels, channels[:layer]))  # a private copy
            else:
                prefix = list(blocks[:layer])  # the classifier's own modules: shared parameters
            example = torch.zeros(1, in_channels, *in_size)
            with torch.no_grad():
                for block in prefix:
                    example = block(example)
            tail, width = _loc_tail(example)
            localisation = localisation_from_layers(nn.Sequential(*prefix, tail), family, feature_dim=width, bounds=box)
        transformer = SpatialTransformer(localisation, **st_kwargs)
    return InvarianceClassifier(variant, blocks, head, transformer, layer=layer if uses_layer else 0)


def invariance_config(variant: str, transform: str | dict = "affine", in_size: Sequence[int] = (28, 28), **options) -> dict:
    """The registry config of :func:`build_invariance_model` (what checkpoints store).

    Examples
    --------
    >>> invariance_config("stn-shared", "affine", (28, 28), layer=3)["layer"]
    3
    """
    config = {"kind": "invariance", "variant": variant, "transform": transform, "in_size": list(in_size)}
    config.update(options)
    return config


def invariance_model(variant: str, transform: str | dict = "affine", in_size: Sequence[int] = (28, 28), **options) -> InvarianceClassifier:
    """Build a variant through the registry, so it carries its config for checkpoints.

    This is what ``stnkit train`` would call for ``--model stn-shared`` and friends.

    Examples
    --------
    >>> net = invariance_model("stn-input", "rotation", (28, 28), channels=[8, 8, 16, 16])
    >>> net.stnkit_config["kind"], net.stnkit_config["variant"]
    ('invariance', 'stn-input')
    """
    return build_model(invariance_config(variant, transform, in_size, **options))
