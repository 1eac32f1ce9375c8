"""Evaluation: alignment metrics, classical baselines (OpenCV), figures."""

from .classical import CLASSICAL_METHODS, AlignmentFailedWarning, ClassicalResult, run_classical
from .metrics import mace, summarise

__all__ = ["CLASSICAL_METHODS", "AlignmentFailedWarning", "ClassicalResult", "run_classical", "mace", "summarise"]
