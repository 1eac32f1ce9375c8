"""``stnkit invariance``: how invariant a checkpoint is to rotation, translation or scaling.

Sweeps a transformation over undistorted MNIST test digits (placed on the
task's canvas) and prints, per parameter value, the test error, the
normalised distance between the transformer's outputs (and the last feature
maps) for ``T x`` and ``x``, and, for transformers on the input, the corner
error of the predicted transform; see :mod:`stnkit.evaluation.invariance`.
"""

from __future__ import annotations

import json
import math

import click
import numpy as np
import torch

from ..data.datasets import load_mnist
from ..data.digits import load_digit_sample
from ..data.distortions import get_task
from ..evaluation.invariance import DEFAULT_RANGES, TRANSFORM_KINDS, canvas_digits, measure_invariance
from ..models import load_model
from ._options import check_model_fits_task, data_options, threads_option
from .main import CLIError


def _values(transform: str, value_range: tuple[float, float] | None, steps: int) -> list[float]:
    """The parameter values of the sweep; raise :class:`CLIError` on a bad range."""
    if steps < 1:
        raise CLIError(f"--steps must be at least 1, got {steps}")
    low, high = value_range if value_range is not None else DEFAULT_RANGES[transform]
    if not (math.isfinite(low) and math.isfinite(high)):
        raise CLIError(f"--range must be two finite numbers, got {low} {high}")
    if low > high or (low == high and steps > 1):
        raise CLIError(f"--range must go from low to high (low < high for --steps > 1), got {low:g} {high:g}")
    if transform == "scale" and low <= 0:
        raise CLIError(f"--range of scale factors must be positive, got {low:g} {high:g}")
    return np.linspace(low, high, steps).tolist()


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint")
@data_options
@click.option("--transform", type=click.Choice(list(TRANSFORM_KINDS)), default="rotation",
              help="Transformation to sweep: rotation (degrees, anticlockwise), translation (pixels, rightwards), scale (factor).")
@click.option("--range", "value_range", type=float, nargs=2, default=None,
              help="Low and high parameter values [default: rotation -90 90, translation -6 6, scale 0.7 1.4].")
@click.option("--steps", type=int, default=13, help="Number of parameter values, evenly spaced over --range.")
@click.option("--count", type=int, default=1000, help="Number of test digits.")
@click.option("--batch-size", type=int, default=250)
@click.option("--device", default="cpu")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, help="Also write a plot (PNG) here.")
def command(checkpoint, task, data_root, digit_sample, transform, value_range, steps, count, batch_size, device, as_json, plot_path):
    """Measure how invariant CHECKPOINT is to a transformation of undistorted test digits."""
    values = _values(transform, value_range, steps)
    if count < 1:
        raise CLIError(f"--count must be at least 1, got {count}")
    if batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {batch_size}")
    model = load_model(checkpoint, map_location=device)
    check_model_fits_task(model, checkpoint, task)
    size = get_task(task).size
    images, labels = load_digit_sample("test") if digit_sample else load_mnist("test", data_root)
    x = canvas_digits(images[:count], size)
    y = torch.from_numpy(np.asarray(labels[:count]).astype(np.int64))
    report = measure_invariance(model, x, y, transform, values, batch_size=batch_size)
    if plot_path:
        report.plot(plot_path, title=f"{checkpoint} ({task}, {len(y)} digits)")
    if as_json:
        click.echo(json.dumps({"checkpoint": str(checkpoint), "task": task, **report.to_dict(), "plot": plot_path}))
    else:
        click.echo(f"{checkpoint} on {len(y)} undistorted {task} test digits, {transform} swept:")
        click.echo(report.table())
        if plot_path:
            click.echo(f"plot: {plot_path}")
