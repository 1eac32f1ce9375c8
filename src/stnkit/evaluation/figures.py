"""Figures in the spirit of Fig. 1 of the ST paper: input, predicted transform, warped output, class."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..transforms import MatrixTransform, Transform
from ..transforms.base import check_size

__all__ = ["sampling_outline", "transformer_figure"]


def _norm_to_pix(points: Tensor, size: tuple[int, int]) -> Tensor:
    """Normalised (x, y) points to pixel coordinates of an image of ``size`` (pixel centres at integers)."""
    height, width = size
    scale = torch.tensor([width / 2.0, height / 2.0], dtype=points.dtype)
    offset = torch.tensor([(width - 1) / 2.0, (height - 1) / 2.0], dtype=points.dtype)
    return points * scale + offset


def sampling_outline(transform: Transform, theta: Tensor, in_size: Sequence[int], out_size: Sequence[int], lines: int = 5) -> list[np.ndarray]:
    """Polylines, in input pixel coordinates, showing where the output frame samples the input.

    For the matrix families this is the quadrilateral of the output image's
    border; for non-rigid families it is a ``lines x lines`` mesh of the
    output frame mapped into the input.

    Parameters
    ----------
    transform : Transform
        The family of ``theta``.
    theta : Tensor
        Parameters of one transform, ``(1, num_params)``.
    in_size, out_size : (int, int)
        Input and output sizes.
    lines : int
        Mesh lines per axis for non-rigid families.

    Returns
    -------
    list of ndarray
        Each an ``(M, 2)`` array of ``(x, y)`` input pixel coordinates.

    Convention: ``theta`` maps output points to input points (normalised), so
    the polylines are the output frame drawn on the input.
    """
    in_size, out_size = check_size(in_size, "in_size"), check_size(out_size)
    theta = theta.detach().float().cpu()[:1]
    if isinstance(transform, MatrixTransform):
        # The image border of the output (normalised +/-1) mapped into the input.
        corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0], [-1.0, -1.0, 1.0]])
        mapped = corners @ transform.matrix(theta)[0].T
        mapped = mapped[:, :2] / mapped[:, 2:]
        return [_norm_to_pix(mapped, in_size).numpy()]
    # Non-rigid: a mesh of the output frame, read off the transform's own grid.
    dense = 64
    grid = transform.grid(theta, (dense, dense))[0]  # (dense, dense, 2) normalised input points
    indices = np.linspace(0, dense - 1, lines).round().astype(int)
    polylines = [grid[i, :, :] for i in indices] + [grid[:, j, :] for j in indices]
    return [_norm_to_pix(line, in_size).numpy() for line in polylines]


def transformer_figure(
    inputs: Tensor,
    outputs: Tensor,
    transform: Transform | None,
    thetas: Tensor | None,
    predictions: Sequence[int],
    labels: Sequence[int] | None = None,
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    columns: int = 8,
):
    """Draw the Fig. 1-style panel: distorted inputs with the predicted transform, warped outputs, classes.

    Parameters
    ----------
    inputs : Tensor
        ``(N, C, H, W)`` inputs in [0, 1] (first channel shown for C != 3).
    outputs : Tensor
        ``(N, C, H_out, W_out)`` the transformer's outputs (what the classifier sees).
    transform : Transform, optional
        The family (``None`` for a model without a transformer).
    thetas : Tensor, optional
        ``(N, num_params)`` predicted parameters.
    predictions, labels : sequence of int
        Predicted (and true) classes, printed under each output.
    path : path, optional
        Where to save a PNG; the figure is returned either way.
    title : str, optional
        Figure title.
    columns : int
        Examples per row.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = inputs.shape[0]
    columns = min(columns, n)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(2 * rows, columns, figsize=(1.6 * columns, 3.4 * rows), squeeze=False)
    in_size = tuple(inputs.shape[-2:])
    out_size = tuple(outputs.shape[-2:])

    def show(ax, image: Tensor) -> None:
        image = image.detach().float().cpu().clamp(0, 1)
        if image.shape[0] == 3:
            ax.imshow(image.permute(1, 2, 0).numpy())
        else:
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])

    for k in range(rows * columns):
        r, c = divmod(k, columns)
        top, bottom = axes[2 * r, c], axes[2 * r + 1, c]
        if k >= n:
            top.axis("off")
            bottom.axis("off")
            continue
        show(top, inputs[k])
        if transform is not None and thetas is not None:
            for line in sampling_outline(transform, thetas[k : k + 1], in_size, out_size):
                top.plot(line[:, 0], line[:, 1], color="#ff3b30", linewidth=1.2)
            top.set_xlim(-0.5, in_size[1] - 0.5)
            top.set_ylim(in_size[0] - 0.5, -0.5)
        show(bottom, outputs[k])
        text = f"pred {predictions[k]}"
        colour = "black"
        if labels is not None:
            colour = "#1a7f37" if int(predictions[k]) == int(labels[k]) else "#cf222e"
            text += f" (true {labels[k]})"
        bottom.set_title(text, fontsize=7, color=colour, y=-0.22)
    axes[0, 0].set_ylabel("input + T", fontsize=8)
    axes[1, 0].set_ylabel("warped", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)
    return fig
