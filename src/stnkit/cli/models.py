"""``stnkit models``: the architectures of the ST paper's Table 1 and their sizes."""

from __future__ import annotations

import click

from ..data.distortions import TASKS
from ..models.classifiers import MODEL_NAMES, classifier, count_parameters


@click.command(context_settings={"show_default": True})
@click.option("--task", type=click.Choice(list(TASKS)), default="rts", help="Sets the input size.")
def command(task):
    """List every model and transformer family with its number of trainable parameters."""
    size = TASKS[task].size
    click.echo(f"input {size}x{size} ({task})")
    click.echo(f"{'model':<10} {'transform':<12} {'parameters':>10}")
    for name in MODEL_NAMES:
        families = ("affine", "projective", "tps") if name.startswith("st-") else (None,)
        for family in families:
            count = count_parameters(classifier(name, family, (size, size)))
            click.echo(f"{name:<10} {family or '-':<12} {count:>10,}")
