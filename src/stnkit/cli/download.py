"""``stnkit download``: fetch MNIST or Fashion-MNIST into the data root, verifying checksums."""

from __future__ import annotations

from pathlib import Path

import click

from stnkit.data.datasets import ENV_VAR, resolve_data_root
from stnkit.data.download import FILES, download


@click.command(name="download")
@click.argument("dataset", type=click.Choice(sorted(FILES)))
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Data root; the files go in ROOT/DATASET/. Default: ${ENV_VAR}, else ~/.cache/stnkit/data.",
)
@click.option(
    "--mirror",
    "mirrors",
    multiple=True,
    metavar="URL",
    help="Base URL to fetch from instead of the built-in mirrors; repeat to try several in order.",
)
@click.option("--overwrite", is_flag=True, help="Download again even if a verified copy is present.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, help="Network timeout in seconds.")
def command(dataset: str, root: Path | None, mirrors: tuple[str, ...], overwrite: bool, timeout: float) -> None:
    """Download DATASET (mnist or fashion-mnist) and verify every file's MD5.

    Files already present and intact are kept. A corrupted download is
    rejected, nothing of it is left on disk, and the next mirror is tried.
    """
    paths = download(
        dataset, root, mirrors=list(mirrors) or None, overwrite=overwrite, timeout=timeout, log=click.echo
    )
    click.echo(f"{dataset}: {len(paths)} files ready in {resolve_data_root(root) / dataset}")
