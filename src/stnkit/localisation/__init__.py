"""Localisation nets (L): predict a transform's parameters from an image or feature map."""

from .nets import (
    Localisation,
    ParameterBounds,
    RegressionHead,
    conv_localisation,
    default_bounds,
    fc_localisation,
    localisation_from_layers,
)

__all__ = [
    "Localisation",
    "ParameterBounds",
    "RegressionHead",
    "conv_localisation",
    "default_bounds",
    "fc_localisation",
    "localisation_from_layers",
]
