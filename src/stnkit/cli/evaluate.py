"""``stnkit eval``: the test error of a checkpoint on a distorted-MNIST task."""

from __future__ import annotations

import json
import time

import click
import torch

from ..models import load_model
from ..training.trainer import evaluate
from ._options import check_model_fits_task, data_options, limit, task_splits
from .main import CLIError


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint")
@data_options
@click.option("--test-seed", type=int, default=0, help="Seed of the test distortions (0 is the standard fixed test set).")
@click.option("--test-limit", type=int, default=None, help="Evaluate on only the first N test digits.")
@click.option("--batch-size", type=int, default=1000)
@click.option("--device", default="cpu")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Run the spatial transformer this many rounds (same weights) instead of the checkpoint's own count.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a sentence.")
def command(checkpoint, task, data_root, digit_sample, test_seed, test_limit, batch_size, device, iterations, as_json):
    """Evaluate CHECKPOINT (a path or a shipped model's name, e.g. mnist-rts) on a task's test set."""
    model = load_model(checkpoint, map_location=device)
    check_model_fits_task(model, checkpoint, task)
    transformer = getattr(model, "transformer", None)
    if iterations is not None:
        if transformer is None or not hasattr(transformer, "iterations"):
            raise CLIError(f"--iterations: {checkpoint} has no spatial transformer whose rounds can be set")
        transformer.iterations = iterations
    _, test = task_splits(task, data_root, digit_sample, test_seed=test_seed)
    x, y = limit(*test.epoch(0), test_limit)
    started = time.perf_counter()
    with torch.no_grad():
        error = evaluate(model, x, y, batch_size=batch_size, device=device)
    seconds = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps({"checkpoint": str(checkpoint), "task": task, "test_seed": test_seed, "images": len(y), "test_error": error,
                                "iterations": getattr(transformer, "iterations", None), "seconds": round(seconds, 3)}))
    else:
        click.echo(f"{checkpoint} on {task} (test seed {test_seed}, {len(y)} images): test error {100 * error:.2f}%")
