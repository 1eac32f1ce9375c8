"""Modules that compose the localisation net, grid generator and sampler."""

from .spatial_transformer import SpatialTransformer, Warp

__all__ = ["SpatialTransformer", "Warp"]
