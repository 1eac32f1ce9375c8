"""``stnkit eval``: the test error of a checkpoint on a distorted-MNIST task."""

from __future__ import annotations

import json
import time

import click
import torch

from ..models import Ensemble, load_model
from ..training.trainer import evaluate
from ._options import check_model_fits_task, data_options, limit, task_splits, threads_option
from .main import CLIError


@click.command(context_settings={"show_default": True})
@click.argument("checkpoints", nargs=-1, required=True)
@data_options
@click.option("--test-seed", type=int, default=0, help="Seed of the test distortions (0 is the standard fixed test set).")
@click.option("--test-limit", type=int, default=None, help="Evaluate on only the first N test digits.")
@click.option("--batch-size", type=int, default=1000)
@click.option("--device", default="cpu")
@threads_option
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="Run the spatial transformer this many rounds (same weights) instead of the checkpoint's own count.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a sentence.")
def command(checkpoints, task, data_root, digit_sample, test_seed, test_limit, batch_size, device, iterations, as_json):
    """Evaluate CHECKPOINTS (paths or shipped models' names, e.g. mnist-rts) on a task's test set.

    With several checkpoints, each is scored and so is their ensemble (the
    mean of their class probabilities, ``stnkit.models.Ensemble``); the
    ensemble's error is the one reported as ``test_error``.
    """
    models = [_load(checkpoint, task, device, iterations) for checkpoint in checkpoints]
    _, test = task_splits(task, data_root, digit_sample, test_seed=test_seed)
    x, y = limit(*test.epoch(0), test_limit)
    started = time.perf_counter()
    with torch.no_grad():
        member_errors = [evaluate(model, x, y, batch_size=batch_size, device=device) for model in models]
        error = member_errors[0] if len(models) == 1 else evaluate(Ensemble(models), x, y, batch_size=batch_size, device=device)
    seconds = time.perf_counter() - started
    rounds = [getattr(getattr(model, "transformer", None), "iterations", None) for model in models]
    if as_json:
        record = {"checkpoint": str(checkpoints[0]), "task": task, "test_seed": test_seed, "images": len(y), "test_error": error,
                  "iterations": rounds[0], "seconds": round(seconds, 3)}
        if len(models) > 1:
            record.update(checkpoint=[str(c) for c in checkpoints], iterations=rounds, member_errors=member_errors)
        click.echo(json.dumps(record))
        return
    for checkpoint, member_error in zip(checkpoints, member_errors):
        click.echo(f"{checkpoint} on {task} (test seed {test_seed}, {len(y)} images): test error {100 * member_error:.2f}%")
    if len(models) > 1:
        click.echo(f"ensemble of {len(models)} (mean probability) on {task}: test error {100 * error:.2f}%")


def _load(checkpoint: str, task: str, device: str, iterations: int | None) -> torch.nn.Module:
    """Load one checkpoint, check it fits the task, and set its transformer's rounds if asked."""
    model = load_model(checkpoint, map_location=device)
    check_model_fits_task(model, checkpoint, task)
    if iterations is not None:
        transformer = getattr(model, "transformer", None)
        if transformer is None or not hasattr(transformer, "iterations"):
            raise CLIError(f"--iterations: {checkpoint} has no spatial transformer whose rounds can be set")
        transformer.iterations = iterations
    return model
