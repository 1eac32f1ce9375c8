"""Where a distorted-MNIST classifier's errors come from.

For each checkpoint: its test error on the task's test sets (seeds 0, 1, 2 by
default), its error on the same 10,000 test digits undistorted (28x28, or centred
on the task's canvas), and its error on test seed 0 split by how strong the
distortion was (in quartiles of the rotation angle for R and RTS, largest corner offset for P,
largest control-point offset for E), and for P also by how much of the digit's ink
the warp keeps inside the frame. When the undistorted error is close to the
distorted one, the transformer has done its job and what is left is the
classifier's.

Usage::

    STNKIT_DATA=../shared/data python benchmarks/error_analysis.py \\
        rotated=runs/rotated-st-cnn-280/checkpoints/last.safetensors \\
        rts=mnist-rts --out benchmarks/results/error_analysis.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stnkit.data.datasets import load_mnist
# The P generator's own corner square (normalised, clockwise on screen from top-left) and pixel
# size, so the draws it returns are read back exactly as it made them.
from stnkit.data.distortions import PIXEL_NORM as PX, CORNER_SQUARE as SQUARE, DistortedMNIST, distort, get_task
from stnkit.models.checkpoint import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by a test
from _machine import cpu_model, write_report  # noqa: E402

# task -> (what measures a digit's distortion, how to get it from the generator's params)
STRENGTH = {
    "rotated": ("rotation, abs. deg", lambda p: np.abs(p["angle_deg"])),
    "rts": ("rotation, abs. deg", lambda p: np.abs(p["angle_deg"])),
    "projective": ("largest corner offset, px", lambda p: np.abs(p["corner_offsets_px"]).reshape(len(p["scale"]), -1).max(1)),
    "elastic": ("largest control-point offset, px", lambda p: np.abs(p["control_offsets_px"]).reshape(len(p["scale"]), -1).max(1)),
}


def projective_ink_kept(images: np.ndarray, params: dict) -> np.ndarray:
    """Fraction of each digit's ink that a P warp keeps inside the 28x28 output.

    The backward map samples the input inside the quadrilateral ``(square + offsets) / scale``
    (normalised units, corners clockwise on screen from top-left); ink outside it is cut off.
    Pixel centres stand for pixels, so this is exact up to the one-pixel reach of bilinear sampling.
    """
    quads = (SQUARE + params["corner_offsets_px"] * PX) / params["scale"][:, None, None]  # (N, 4, 2)
    centres = (np.arange(28) + 0.5) * PX - 1.0
    points = np.stack(np.meshgrid(centres, centres, indexing="xy"), -1).reshape(-1, 2)  # (784, 2) as (x, y)
    inside = np.ones((len(quads), len(points)), dtype=bool)
    for k in range(4):  # a convex quad, clockwise on screen (y down): every edge has the point on its right
        start, end = quads[:, k], quads[:, (k + 1) % 4]
        edge, to_point = end - start, points[None] - start[:, None]
        inside &= edge[:, None, 0] * to_point[..., 1] - edge[:, None, 1] * to_point[..., 0] >= 0
    ink = images.reshape(len(images), -1).astype(np.float64)
    return (ink * inside).sum(1) / np.maximum(ink.sum(1), 1.0)


def predict(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)]).numpy()


def analyse(task: str, checkpoint: str, seeds: list[int], root: str | None) -> str:
    model = load_model(checkpoint).eval()
    images, labels = load_mnist("test", root)
    lines = [f"### {task}: `{checkpoint}`", ""]
    errors, first = [], None
    for seed in seeds:
        test_set = DistortedMNIST(task, "test", seed=seed, images=images, labels=labels)
        # distort() itself, with the test split's seed, to get each digit's parameters too.
        x, params = distort(images, task, test_set.epoch_seed(0), return_params=True)
        wrong = predict(model, x) != labels
        errors.append(100 * float(wrong.mean()))
        first = first or (wrong, params)
    clean = torch.from_numpy(images).float().div(255).unsqueeze(1)
    pad = (get_task(task).size - 28) // 2
    clean = F.pad(clean, (pad, pad, pad, pad))
    clean_error = 100 * float((predict(model, clean) != labels).mean())
    transformer = getattr(model, "transformer", None)
    if transformer is not None:
        # The frame the transformer maps undistorted digits to: where its classifier expects them.
        with torch.no_grad():
            model(clean[:2000])
        canonical = transformer.last_theta.mean(0).tolist()
        lines += [f"Mean theta ({transformer.transform.name}) on the first 2,000 undistorted digits: "
                  f"`{', '.join(f'{v:.3f}' for v in canonical)}`", ""]  # fmt: skip
    lines += [
        "| test set | error % |", "|---|---:|",
        *[f"| {task}, seed {s} | {e:.2f} |" for s, e in zip(seeds, errors)],
        f"| {task}, mean | {np.mean(errors):.2f} |",
        f"| the same digits undistorted{f' (centred on {28 + 2 * pad}x{28 + 2 * pad})' if pad else ''} | {clean_error:.2f} |",
        "",
    ]
    if task in STRENGTH:
        name, strength_of = STRENGTH[task]
        wrong, params = first
        strength = strength_of(params)
        quartile = np.searchsorted(np.quantile(strength, [0.25, 0.5, 0.75]), strength, side="right")
        lines += [f"Seed {seeds[0]}, by quartile of distortion strength:", "", f"| {name} | digits | errors | error % |", "|---|---:|---:|---:|"]
        for q in range(4):
            inside = quartile == q
            span = f"{strength[inside].min():.1f}-{strength[inside].max():.1f}"
            lines.append(f"| {span} | {inside.sum()} | {wrong[inside].sum()} | {100 * wrong[inside].mean():.2f} |")
        lines.append("")
    if task == "projective":
        wrong, params = first
        kept = projective_ink_kept(images, params)
        bins = [(1.0, 1.01, "all of it"), (0.95, 1.0, "95-100%"), (0.85, 0.95, "85-95%"), (0.0, 0.85, "under 85%")]
        lines += [f"Seed {seeds[0]}, by how much of the digit's ink the warp keeps in the frame:", "",
                  "| ink kept | digits | errors | error % |", "|---|---:|---:|---:|"]  # fmt: skip
        for low, high, label in bins:
            inside = (kept >= low) & (kept < high)
            rate = f"{100 * wrong[inside].mean():.2f}" if inside.any() else "-"
            lines.append(f"| {label} | {inside.sum()} | {wrong[inside].sum()} | {rate} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="TASK=CHECKPOINT (a path or a shipped name)")
    parser.add_argument("--test-seeds", default="0,1,2")
    parser.add_argument("--data", default=None, help="data root (default: STNKIT_DATA)")
    parser.add_argument("--out", default=None, help="write the markdown report here")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.test_seeds.split(",")]
    parts = [
        "# Error analysis: distorted against undistorted digits", "",
        f"- **machine**: {cpu_model()}, torch {torch.__version__}",
        f"- **date**: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- **command**: python benchmarks/error_analysis.py {' '.join(argv if argv is not None else sys.argv[1:])}", "",
    ]  # fmt: skip
    for run in args.runs:
        task, _, checkpoint = run.partition("=")
        if not checkpoint:
            parser.error(f"expected TASK=CHECKPOINT, got {run!r}")
        parts.append(analyse(get_task(task).name, checkpoint, seeds, args.data))
    text = "\n".join(parts)
    print(text)
    write_report(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
