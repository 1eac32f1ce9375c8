"""Thin-plate spline transform (work in progress)."""

from __future__ import annotations

from .base import Transform

__all__ = ["ThinPlateSpline"]


class ThinPlateSpline(Transform):
    """Thin-plate spline warp (placeholder while the implementation lands)."""

    name = "thin_plate_spline"
