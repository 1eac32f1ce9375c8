"""``stnkit figure``: a Fig. 1-style picture of what a checkpoint's transformer does."""

from __future__ import annotations

from pathlib import Path

import click
import torch

from ..evaluation.figures import transformer_figure
from ..models import load_model
from ._options import check_model_fits_task, data_options, task_splits
from .main import CLIError


def draw_classifier_figure(model, x: torch.Tensor, y: torch.Tensor, path: Path, title: str) -> float:
    """Run ``model`` on ``x``, draw inputs + transforms + outputs + classes to ``path``; return the error on ``x``."""
    model.eval()
    with torch.no_grad():
        seen = model.transform_input(x)
        predictions = model.classifier(seen).argmax(1)
    transformer = model.transformer
    transform = None if transformer is None else transformer.transform
    thetas = None if transformer is None else transformer.last_theta
    transformer_figure(x, seen, transform, thetas, predictions.tolist(), y.tolist(), path=path, title=title)
    return float((predictions != y).float().mean())


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint")
@data_options
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False), required=True, help="PNG to write.")
@click.option("--count", type=int, default=16, help="Number of test examples drawn.")
@click.option("--test-seed", type=int, default=0)
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def command(checkpoint, task, data_root, digit_sample, out_path, count, test_seed, overwrite):
    """Draw distorted test inputs, the predicted transform on each, the warped outputs and the classes."""
    path = Path(out_path)
    if path.exists() and not overwrite:
        raise CLIError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir():
        raise CLIError(f"output folder {path.parent} does not exist")
    model = load_model(checkpoint)
    check_model_fits_task(model, checkpoint, task)
    if not hasattr(model, "transform_input"):
        raise CLIError(f"{checkpoint} is not a classifier checkpoint")
    _, test = task_splits(task, data_root, digit_sample, test_seed=test_seed)
    x, y = test.epoch(0)
    draw_classifier_figure(model, x[:count], y[:count], path, f"{checkpoint} on {task}")
    click.echo(f"wrote {path}")
