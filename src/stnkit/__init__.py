"""stnkit: spatial transformer networks for PyTorch.

The core, importable with torch alone:

- :mod:`stnkit.transforms`: grid generators, one class per transform family;
- :mod:`stnkit.sampling`: :func:`sample` and the one-call :func:`warp`;
- :mod:`stnkit.localisation`: localisation nets with identity-initialised heads;
- :mod:`stnkit.modules`: :class:`SpatialTransformer` and :class:`Warp`.

Convention: a transform maps each *output* point to the *input* point sampled
there, in normalised coordinates with -1 and +1 at the image edges
(``align_corners=False``). See :mod:`stnkit.transforms.base`.
"""

from __future__ import annotations

from .modules import SpatialTransformer, Warp
from .sampling import InterpolationMode, PaddingMode, sample, warp
from .transforms import (
    Affine,
    DisplacementField,
    Projective,
    Rotation,
    ScaleTranslation,
    Similarity,
    ThinPlateSpline,
    Translation,
    get_transform,
)

__version__ = "0.1.0"

__all__ = [
    "SpatialTransformer",
    "Warp",
    "sample",
    "warp",
    "InterpolationMode",
    "PaddingMode",
    "Translation",
    "Rotation",
    "Similarity",
    "ScaleTranslation",
    "Affine",
    "Projective",
    "ThinPlateSpline",
    "DisplacementField",
    "get_transform",
    "load",
    "pretrained",
    "Aligner",
]

# Higher layers load lazily so that `import stnkit` needs torch alone.
_LAZY = {
    "load": ("stnkit.models", "load"),
    "pretrained": ("stnkit.models", "pretrained"),
    "Aligner": ("stnkit.models", "Aligner"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'stnkit' has no attribute {name!r}")
