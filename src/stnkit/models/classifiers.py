"""The classifiers of the ST paper's distorted-MNIST experiments (Jaderberg et al., 2015, Table 1).

Every model is an optional :class:`~stnkit.SpatialTransformer` on the input
followed by a fully-connected (FCN) or convolutional (CNN) classifier:

=============  =====================================================================
``fcn``        two hidden layers of 128 ReLU units, softmax over the classes
``cnn``        conv 9x9 (32) - max-pool 2 - conv 7x7 (32) - max-pool 2 - linear
``st-fcn``     a transformer with the fully-connected localisation net
               (three layers of 32 units), then ``fcn``
``st-cnn``     a transformer with the convolutional localisation net (max-pool 2 -
               conv 5x5 (20) - max-pool 2 - conv 5x5 (20) - FC 20), then ``cnn``
=============  =====================================================================

The transformer samples bilinearly and outputs an image of the input's size
unless ``st_out_size`` says otherwise; its regression head starts at the
identity and, with ``bounds`` (the default), cannot leave a box around it.
The choices the paper leaves open are written down in
``docs/distorted_mnist_protocol.md``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..localisation import conv_localisation, default_bounds, fc_localisation
from ..localisation.nets import mlp_layers
from ..modules import InputGradConv2d, SpatialTransformer
from ..transforms import get_transform
from ..transforms.base import check_size
from .registry import build_model, register_model

__all__ = [
    "STClassifier",
    "MODEL_NAMES",
    "build_classifier",
    "classifier",
    "classifier_config",
    "fcn_backbone",
    "cnn_backbone",
    "count_parameters",
]

MODEL_NAMES = ("fcn", "cnn", "st-fcn", "st-cnn")


def _dropout_layers(dropout: float) -> list[nn.Module]:
    """``[nn.Dropout(dropout)]``, or no layer at 0 (so models without dropout keep their layer indices)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return [nn.Dropout(dropout)] if dropout > 0 else []


def fcn_backbone(
    in_channels: int, in_size: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 128), dropout: float = 0.0
) -> nn.Sequential:
    """The fully-connected baseline: ``Flatten - (Linear - ReLU) x len(hidden) - [Dropout] - Linear``."""
    height, width = check_size(in_size, "in_size")
    layers, features = mlp_layers(in_channels * height * width, hidden)
    return nn.Sequential(nn.Flatten(), *layers, *_dropout_layers(dropout), nn.Linear(features, num_classes))


def cnn_backbone(
    in_channels: int, in_size: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 32), dropout: float = 0.0
) -> nn.Sequential:
    """The convolutional baseline: ``conv9x9 - pool - conv7x7 - pool - [Dropout] - Linear`` (ReLU after each conv).

    The first convolution is an :class:`~stnkit.modules.InputGradConv2d`: an
    ``nn.Conv2d`` whose input gradient (needed behind a transformer) is fast on the CPU.
    """
    height, width = check_size(in_size, "in_size")
    features = nn.Sequential(
        InputGradConv2d(in_channels, channels[0], 9),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(channels[0], channels[1], 7),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    try:
        with torch.no_grad():
            feature_dim = features(torch.zeros(1, in_channels, height, width)).shape[1]
    except RuntimeError:
        raise ValueError(f"in_size {(height, width)} is too small for the CNN (needs at least 24x24)") from None
    return nn.Sequential(*features, *_dropout_layers(dropout), nn.Linear(feature_dim, num_classes))


class STClassifier(nn.Module):
    """A classifier with an optional spatial transformer in front of it.

    Parameters
    ----------
    classifier : nn.Module
        Maps the (transformed) images to logits.
    transformer : SpatialTransformer, optional
        Applied to the input first; ``None`` for the baselines.

    Shapes: ``(N, C, H, W) -> (N, num_classes)`` logits. After a forward pass
    ``model.transformer.last_theta`` holds the predicted parameters.
    """

    def __init__(self, classifier: nn.Module, transformer: SpatialTransformer | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.classifier = classifier

    def transform_input(self, x: Tensor) -> Tensor:
        """What the classifier sees: the input after the transformer (or the input itself)."""
        return x if self.transformer is None else self.transformer(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.transform_input(x))


@register_model("classifier")
def build_classifier(
    model: str = "st-cnn",
    transform: str | dict | None = "affine",
    in_size: Sequence[int] = (42, 42),
    in_channels: int = 1,
    num_classes: int = 10,
    st_out_size: Sequence[int] | None = None,
    bounds: bool = True,
    max_translation: float = 1.0,
    max_linear: float = 1.0,
    iterations: int = 1,
    dropout: float = 0.0,
) -> STClassifier:
    """Build one of the ST paper's distorted-MNIST models.

    Parameters
    ----------
    model : {"fcn", "cnn", "st-fcn", "st-cnn"}
        Architecture (see the module docstring).
    transform : str or dict, optional
        Transformer family for the ST models: ``"affine"``, ``"projective"``,
        ``"tps"`` (16 control points on a 4x4 grid, as in the paper) or any
        other family name; ignored by the baselines.
    in_size : (int, int)
        Input size (28x28 for R, P, E; 42x42 for RTS; 60x60 for cluttered).
    in_channels, num_classes : int
        Input channels and number of classes.
    st_out_size : (int, int), optional
        Output size of the transformer; the input size when omitted.
    bounds : bool
        Keep the predicted parameters in a box around the identity
        (``max_translation``, ``max_linear``; see :func:`stnkit.localisation.default_bounds`).
    iterations : int
        Refinement rounds of the transformer (1 = the classic STN).
    dropout : float
        Dropout before the classifier's last linear layer, in ``[0, 1)``; 0 (the
        paper's models) adds no layer. It adds no parameters.

    Returns
    -------
    STClassifier

    Examples
    --------
    >>> net = build_classifier("st-cnn", "affine", in_size=(42, 42))
    >>> net(torch.rand(2, 1, 42, 42)).shape
    torch.Size([2, 10])
    """
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODEL_NAMES)}")
    in_size = check_size(in_size, "in_size")
    out_size = in_size if st_out_size is None else check_size(st_out_size, "st_out_size")
    fully_connected = model.endswith("fcn")
    if fully_connected:
        classifier = fcn_backbone(in_channels, out_size, num_classes, dropout=dropout)
    else:
        classifier = cnn_backbone(in_channels, out_size, num_classes, dropout=dropout)
    transformer = None
    if model.startswith("st-"):
        if transform is None:
            raise ValueError(f"model {model!r} needs a transform family, e.g. transform='affine'")
        family = get_transform({"name": "thin_plate_spline", "grid_size": [4, 4]} if transform in ("tps", "thin_plate_spline") else transform)
        box = default_bounds(family, max_translation, max_linear) if bounds else None
        if fully_connected:
            localisation = fc_localisation(in_channels, in_size, family, bounds=box)
        else:
            localisation = conv_localisation(in_channels, in_size, family, bounds=box)
        transformer = SpatialTransformer(localisation, family, out_size=out_size, iterations=iterations)
    return STClassifier(classifier, transformer)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def classifier_config(model: str, transform: str | None, in_size: Sequence[int], **options) -> dict:
    """The registry config of :func:`build_classifier` (what checkpoints store)."""
    config = {"kind": "classifier", "model": model, "transform": transform if model.startswith("st-") else None, "in_size": list(in_size)}
    config.update(options)
    return config


def classifier(model: str, transform: str | None, in_size: Sequence[int], **options) -> STClassifier:
    """Build a classifier through the registry, so it carries its config for checkpoints."""
    return build_model(classifier_config(model, transform, in_size, **options))
