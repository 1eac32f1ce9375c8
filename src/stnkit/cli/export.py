"""``stnkit export``: write a checkpoint (or a shipped model) as ONNX, checked with onnxruntime."""

from __future__ import annotations

import json

import click

from .main import CLIError


@click.command(context_settings={"show_default": True})
@click.argument("checkpoint")
@click.option("--format", "format_", type=click.Choice(["onnx"]), default="onnx", help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="The .onnx file to write.")
@click.option("--opset", type=int, default=18, help="ONNX opset (>= 16, for GridSample; 18 is the exporter's native one).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--verify/--no-verify", default=True, help="Compare onnxruntime with PyTorch on random smooth images (batch 1 and 3).")
@click.option("--atol", type=float, default=1e-4, help="Largest accepted |onnxruntime - torch| when verifying.")
def command(checkpoint, format_, output, opset, overwrite, verify, atol):
    """Export CHECKPOINT (a checkpoint file or a shipped model's name, e.g. mnist-rts) to ONNX.

    Classifiers become images (N, C, H, W) -> logits; aligners become
    (input, support) at the net size -> (theta, aligned). The batch size is
    dynamic. Prints a JSON summary with the largest difference to PyTorch.
    """
    try:
        from ..export import export_onnx
    except ImportError as exc:  # pragma: no cover - torch is always there
        raise CLIError(str(exc)) from None
    try:
        report = export_onnx(checkpoint, output, opset=opset, overwrite=overwrite, verify=verify, atol=atol)
    except ImportError as exc:
        raise CLIError(str(exc)) from None
    click.echo(json.dumps(report.to_dict()))
