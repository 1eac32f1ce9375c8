"""``stnkit average``: write the uniform average of the weights of several checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command(context_settings={"show_default": True})
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The averaged checkpoint to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def command(checkpoints: tuple[Path, ...], output: Path, overwrite: bool) -> None:
    """Average the weights of two or more CHECKPOINTS of one architecture into one.

    Use it on checkpoints that share a basin: moving averages or snapshots of
    one run, or fine-tunes from the same weights (a "model soup"). Prints a
    JSON summary; evaluate the result with ``stnkit eval``.
    """
    from ..models.averaging import average_checkpoints

    written = average_checkpoints(checkpoints, output, overwrite=overwrite)
    click.echo(json.dumps({"out": str(written), "averaged": [str(path) for path in checkpoints]}))
