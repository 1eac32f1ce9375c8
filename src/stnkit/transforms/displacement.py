"""Dense displacement-field transform (work in progress)."""

from __future__ import annotations

from .base import Transform

__all__ = ["DisplacementField"]


class DisplacementField(Transform):
    """Displacement field warp (placeholder while the implementation lands)."""

    name = "displacement_field"
