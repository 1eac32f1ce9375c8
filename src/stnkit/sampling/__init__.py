"""Samplers (S): read an image at the points of a sampling grid."""

from .sampler import InterpolationMode, PaddingMode, sample, warp
from .fused import fused_warp  # noqa: E402  (imports .sampler)
from .fast import warp_image  # noqa: E402

__all__ = ["InterpolationMode", "PaddingMode", "sample", "warp", "fused_warp", "warp_image"]
