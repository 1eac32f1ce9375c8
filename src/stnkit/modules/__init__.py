"""Modules that compose the localisation net, grid generator and sampler."""

from .conv import InputGradConv2d, input_grad_conv2d
from .spatial_transformer import SpatialTransformer, Warp

__all__ = ["SpatialTransformer", "Warp", "InputGradConv2d", "input_grad_conv2d"]
