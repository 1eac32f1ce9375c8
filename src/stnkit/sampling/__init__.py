"""Samplers (S): read an image at the points of a sampling grid."""

from .sampler import InterpolationMode, PaddingMode, sample, warp

__all__ = ["InterpolationMode", "PaddingMode", "sample", "warp"]
