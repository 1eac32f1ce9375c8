"""Training loops: classification (checkpoints, metrics, exact resume) and aligner training."""

from .allocator import tune_cpu_allocator
from .consistency import consistency_loss, random_similarity, sampled_consistency_loss
from .metrics_log import METRICS_COLUMNS, read_metrics
from .plots import plot_learning_curve
from .trainer import TrainConfig, Trainer, TrainResult, evaluate, learning_rate_at, seed_everything

__all__ = [
    "METRICS_COLUMNS",
    "read_metrics",
    "plot_learning_curve",
    "TrainConfig",
    "Trainer",
    "TrainResult",
    "evaluate",
    "learning_rate_at",
    "seed_everything",
    "tune_cpu_allocator",
    "consistency_loss",
    "random_similarity",
    "sampled_consistency_loss",
]
