"""Grid generators (G): one class per family of spatial transformations.

Every family shares one interface: ``num_params``, ``identity(batch)``,
``grid(theta, out_size)``, ``compose(first, second)`` and ``inverse(theta)``;
the matrix families add ``matrix``, ``from_matrix``, ``to_pixels`` and
``from_pixels``. See :mod:`stnkit.transforms.base` for the coordinate convention.
"""

from __future__ import annotations

from typing import Any, Mapping

from .base import MatrixTransform, Transform, check_size, norm_from_pix, normalised_pixel_centres, pix_from_norm
from .matrix import Affine, Projective, Rotation, ScaleTranslation, Similarity, Translation, homography_from_points
from .tps import ThinPlateSpline
from .displacement import DisplacementField

__all__ = [
    "Transform",
    "MatrixTransform",
    "Translation",
    "Rotation",
    "Similarity",
    "ScaleTranslation",
    "Affine",
    "Projective",
    "ThinPlateSpline",
    "DisplacementField",
    "TRANSFORMS",
    "get_transform",
    "homography_from_points",
    "check_size",
    "norm_from_pix",
    "pix_from_norm",
    "normalised_pixel_centres",
]

#: Family name -> class. The names are what the CLI and checkpoints use.
TRANSFORMS: dict[str, type[Transform]] = {
    cls.name: cls
    for cls in (Translation, Rotation, Similarity, ScaleTranslation, Affine, Projective, ThinPlateSpline, DisplacementField)
}
# Friendly aliases seen in papers and other libraries.
_ALIASES = {"attention": "scale_translation", "homography": "projective", "tps": "thin_plate_spline", "rigid": "rotation"}


def get_transform(spec: Transform | str | Mapping[str, Any]) -> Transform:
    """Return a transform from an instance, a family name, or a config dict.

    Parameters
    ----------
    spec : Transform, str or dict
        An instance (returned as is), a name such as ``"affine"`` or ``"tps"``,
        or a dict ``{"name": ..., **options}`` as written by ``Transform.config()``.

    Examples
    --------
    >>> get_transform("affine")
    Affine()
    >>> get_transform({"name": "projective", "parametrisation": "corners"})
    Projective(parametrisation='corners')
    """
    if isinstance(spec, Transform):
        return spec
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, Mapping):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"a transform config needs a 'name' string, got {dict(spec)!r}")
    else:
        raise TypeError(f"transform must be a Transform, a name or a config dict, got {type(spec).__name__}")
    key = _ALIASES.get(name.lower().replace("-", "_"), name.lower().replace("-", "_"))
    if key not in TRANSFORMS:
        known = ", ".join(sorted(TRANSFORMS) + sorted(_ALIASES))
        raise ValueError(f"unknown transform {name!r}; expected one of: {known}")
    return TRANSFORMS[key](**options)
