"""Learning-curve plot of a training run (``learning_curve.png``).

Uses matplotlib's object API with the Agg canvas directly, so it works without a
display and never changes the global pyplot backend of the caller.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stnkit.training.metrics_log import read_metrics

__all__ = ["plot_learning_curve"]


def plot_learning_curve(
    metrics: str | os.PathLike[str] | Sequence[Mapping[str, Any]],
    out_path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Plot training loss, and training, validation (when logged) and test error, against the step; save as PNG.

    Parameters
    ----------
    metrics : path or sequence of dict
        A ``metrics.csv`` file or its rows (as from
        :func:`~stnkit.training.metrics_log.read_metrics`).
    out_path : str or PathLike
        The image to write (parent folders are created).
    title : str, optional
        Figure title.

    Returns
    -------
    Path
        ``out_path``.

    Examples
    --------
    >>> plot_learning_curve("runs/rts/metrics.csv", "runs/rts/learning_curve.png")  # doctest: +SKIP
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    out_path = Path(out_path)

    figure = Figure(figsize=(8, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, error_axes = figure.subplots(1, 2)
    loss_points = [(row["step"], row["train_loss"]) for row in rows if row.get("train_loss") is not None]
    error_points = [(row["step"], 100.0 * row["test_error"]) for row in rows if row.get("test_error") is not None]
    val_points = [(row["step"], 100.0 * row["val_error"]) for row in rows if row.get("val_error") is not None]
    ema_points = [(row["step"], 100.0 * row["ema_test_error"]) for row in rows if row.get("ema_test_error") is not None]
    train_error_points = [
        (row["step"], 100.0 * (1.0 - row["train_acc"])) for row in rows if row.get("train_acc") is not None
    ]
    if loss_points:
        loss_axes.plot(*zip(*loss_points), color="tab:blue", marker=".")
    if train_error_points:
        error_axes.plot(*zip(*train_error_points), color="tab:blue", marker=".", label="train")
    if val_points:
        error_axes.plot(*zip(*val_points), color="tab:green", marker=".", label="validation")
    if error_points:
        error_axes.plot(*zip(*error_points), color="tab:red", marker=".", label="test")
    if ema_points:
        error_axes.plot(*zip(*ema_points), color="tab:purple", marker=".", label="test, weight average")
    loss_axes.set(xlabel="step", ylabel="training loss", title="loss")
    error_axes.set(xlabel="step", ylabel="error (%)", title="error")
    if train_error_points or error_points:
        error_axes.legend()
    for axes in (loss_axes, error_axes):
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    return out_path
