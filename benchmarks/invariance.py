"""Benchmark the STN variants of Finnveden, Jansson & Lindeberg (ICPR 2020) for invariance.

Two stages, so the (slow) training can run in the background and the
measurement be redone without retraining:

``train``
    Trains each variant of :mod:`stnkit.models.invariance_models` on a
    distorted-MNIST task (default: rotated MNIST, rotations uniform in
    [-90, 90] degrees) with one small, fixed budget: Adam, lr 1e-3 with a
    cosine schedule, batch 128, ``--epochs`` passes over ``--train-limit``
    training digits (distortions redrawn every epoch), gradient norm clipped
    at 5. Each run is an ordinary stnkit run folder (``stnkit eval`` works on it).

``measure``
    Loads each run's last checkpoint and measures, with
    :func:`stnkit.evaluation.invariance.measure_invariance`, on the first
    ``--count`` *undistorted* MNIST test digits rotated over ``--range``:
    test error, the normalised distance between the transformer outputs (and
    between the last feature maps) of ``T x`` and ``x``, and for input
    transformers the corner error of the predicted transform. It also reports
    the error on the task's own (randomly distorted) test set. Writes a
    Markdown table with the command, machine and date.

Usage::

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/invariance.py train --runs runs/invariance --epochs 2
    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/invariance.py measure --runs runs/invariance --count 500 \\
        --out benchmarks/results/invariance.md --plot benchmarks/results/invariance.png
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from stnkit.data.datasets import load_mnist
from stnkit.data.distortions import DistortedMNIST, get_task
from stnkit.models import count_parameters, load_model
from stnkit.models.invariance_models import invariance_model
from stnkit.training.trainer import TrainConfig, Trainer, evaluate

#: run name -> (variant, builder options)
RUNS: dict[str, tuple[str, dict]] = {
    "cnn": ("cnn", {}),
    "stn-input": ("stn-input", {}),
    "stn-features-k1": ("stn-features", {"layer": 1}),
    "stn-features-k2": ("stn-features", {"layer": 2}),
    "stn-deep-loc-k2": ("stn-deep-loc", {"layer": 2}),
    "stn-shared-k2": ("stn-shared", {"layer": 2}),
    "stn-iterative-k2": ("stn-iterative", {"layer": 2, "iterations": 2}),
}


def _train(args: argparse.Namespace) -> None:
    spec = get_task(args.task)
    train = DistortedMNIST(args.task, "train", root=args.data, seed=0)
    test = DistortedMNIST(args.task, "test", root=args.data, seed=0)
    test_x, test_y = test.epoch(0)
    test_x, test_y = test_x[: args.test_limit], test_y[: args.test_limit]
    names = args.only.split(",") if args.only else list(RUNS)
    for name in names:
        variant, options = RUNS[name]
        out = Path(args.runs) / name
        if (out / "checkpoints" / "last.safetensors").is_file() and not args.overwrite:
            print(f"{name}: already trained, skipping (use --overwrite)", flush=True)
            continue
        torch.manual_seed(0)
        model = invariance_model(variant, args.transform, (spec.size, spec.size), channels=args.channels, **options)
        config = TrainConfig(
            epochs=args.epochs, batch_size=128, optimizer="adam", lr=1e-3, localisation_lr_scale=1.0,
            lr_schedule="cosine", max_grad_norm=5.0, seed=0, out_dir=out, overwrite=True, progress=False,
        )
        info = {"task": args.task, "data_root": args.data, "digit_sample": False, "test_seed": 0,
                "train_limit": args.train_limit, "test_limit": args.test_limit}
        start = time.process_time()
        trainer = Trainer(model, None, lambda e: tuple(t[: args.train_limit] for t in train.epoch(e)), (test_x, test_y),
                          config, run_info=info)
        result = trainer.fit()
        cpu = time.process_time() - start
        summary = {"name": name, "variant": variant, **options, "parameters": count_parameters(model),
                   "steps": result.steps, "test_error": result.test_error, "cpu_s": round(cpu, 1)}
        (out / "benchmark.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary), flush=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _measure(args: argparse.Namespace) -> None:
    from stnkit.evaluation.invariance import InvarianceReport, InvarianceRow, canvas_digits, measure_invariance

    spec = get_task(args.task)
    images, labels = load_mnist("test", args.data)
    x, y = canvas_digits(images[: args.count], spec.size), torch.from_numpy(labels[: args.count].astype("int64"))
    test_x, test_y = DistortedMNIST(args.task, "test", root=args.data, seed=0).epoch(0)
    values = torch.linspace(args.range[0], args.range[1], args.steps).tolist()
    inside = [v for v in values if abs(v) <= 90.0 + 1e-9]
    rows, curves = [], {}
    for name in (args.only.split(",") if args.only else RUNS):
        path = Path(args.runs) / name / "checkpoints" / "last.safetensors"
        if not path.is_file():
            print(f"{name}: no checkpoint at {path}, skipped", file=sys.stderr)
            continue
        model = load_model(path)
        info = json.loads((path.parent.parent / "benchmark.json").read_text()) if (path.parent.parent / "benchmark.json").is_file() else {}
        # Cached per run and setting, so adding a run does not re-measure the others.
        cache = path.parent.parent / f"invariance-{args.count}-{args.steps}-{args.range[0]:g}-{args.range[1]:g}.json"
        if cache.is_file() and not args.overwrite:
            report = InvarianceReport(**{**json.loads(cache.read_text()), "rows": []})
            report.rows = [InvarianceRow(**row) for row in json.loads(cache.read_text())["rows"]]
        else:
            report = measure_invariance(model, x, y, "rotation", values)
            cache.write_text(json.dumps(report.to_dict()))
        curves[name] = report.to_dict()
        within = [r for r in report.rows if r.value in inside]

        def mean(key: str) -> float | None:
            vals = [getattr(r, key) for r in within if getattr(r, key) is not None]
            return sum(vals) / len(vals) if vals else None

        # The run's own final test error (full rotated test set) when recorded, else evaluate now.
        test_error = info.get("test_error")
        if test_error is None:
            test_error = evaluate(model, test_x[: args.test_limit], test_y[: args.test_limit])
        rows.append(
            [name, f"{count_parameters(model):,}", _fmt(100 * test_error, 2),
             _fmt(100 * mean("error"), 2), _fmt(mean("transformer_distance")), _fmt(mean("feature_distance")),
             _fmt(mean("corner_error_px"), 2), _fmt(info.get("cpu_s", float("nan")) / 60, 1)]
        )
        print(" | ".join(rows[-1]), flush=True)
    oracle_lines = []
    cnn_path = Path(args.runs) / "cnn" / "checkpoints" / "last.safetensors"
    if cnn_path.is_file():
        cnn = load_model(cnn_path)
        oracle_lines = [
            "",
            "## Perfect localisation, trained CNN: warping the input vs warping feature maps",
            "",
            "The trained `cnn` run, with an *oracle* transformer that applies the exact inverse rotation "
            "(no learning involved) to the input (k = 0) or to the feature maps after block k. "
            "Same digits and angles as above; means over the angles.",
            "",
            "| oracle transformer acts on | error % on rotated digits | feature-map distance |",
            "|---|---|---|",
        ]
        for k in range(len(cnn.blocks) + 1):
            error, distance = _oracle(cnn, x, y, inside, k)
            where = "input (k = 0)" if k == 0 else f"feature maps after block {k}"
            oracle_lines.append(f"| {where} | {_fmt(100 * error, 2)} | {_fmt(distance)} |")
            print(oracle_lines[-1], flush=True)
        oracle_lines.append("| (no transformer: the `cnn` row above) | | |")
    infos = [json.loads(f.read_text()) for f in sorted(Path(args.runs).glob("*/benchmark.json"))]
    total_cpu = sum(info.get("cpu_s", 0.0) for info in infos)
    steps_text = "/".join(sorted({str(info.get("steps")) for info in infos})) or "?"
    # Reference: the corner error of a transformer that always predicts the identity.
    from stnkit.evaluation.invariance import transformation_matrix

    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]], dtype=torch.float64).T
    identity_px = sum(
        float(((transformation_matrix("rotation", v, (spec.size, spec.size)) @ corners - corners)[:2].norm(dim=0) * spec.size / 2).mean())
        for v in inside
    ) / len(inside)
    header = ["model", "params", "test error % (rotated test set)", "error % on rotated digits",
              "transformer-output distance", "feature-map distance", "corner error (px)", "train CPU (min)"]
    lines = [
        "# Invariance of STN variants (Finnveden, Jansson & Lindeberg, ICPR 2020) on rotated MNIST",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared, niced), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)  ",
        f"Date: {dt.date.today().isoformat()}",
        "",
        f"Training (`benchmarks/invariance.py train`, task `{args.task}`): Adam, lr 1e-3, cosine schedule, batch 128, "
        f"{steps_text} steps (2 epochs of the 60,000 training digits, distortions redrawn per epoch), localisation lr "
        "scale 1, gradient norm clipped at 5, affine transformers with the default bounds, classifier channels 16-16-32-32. "
        f"Total training CPU: {total_cpu / 60:.1f} min, one thread (wall time was several times longer on the shared machine). "
        "The test error column is each run's final error on the full rotated test set (10,000 digits).",
        "",
        f"Measures: first {args.count} undistorted MNIST "
        f"test digits rotated by {len(inside)} angles from {args.range[0]:g} to {args.range[1]:g} degrees "
        "(within [-90, 90]); the distances are sum ||A(Tx) - A(x)||^2 / sum ||A(x)||^2 averaged over the angles; "
        "corner error: mean distance, in input pixels, between where the image corners of the canonical frame "
        f"land in x along the two paths (input transformers only; a transformer that always predicts the identity "
        f"scores {identity_px:.2f} px here).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
        *oracle_lines,
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(curves, indent=1))
    if args.plot and curves:
        _plot(curves, args.plot)
    print(f"wrote {args.out}")


@torch.no_grad()
def _oracle(model, x: torch.Tensor, y: torch.Tensor, angles: list[float], k: int) -> tuple[float, float]:
    """Mean error and feature-map distance when the exact inverse rotation is applied at block ``k``.

    ``model`` is an :class:`~stnkit.models.invariance_models.InvarianceClassifier` without a
    transformer; ``k = 0`` warps the input, ``k >= 1`` the feature maps after block ``k``.
    """
    from stnkit.evaluation.invariance import normalised_distance, transform_images

    def run(h: torch.Tensor, angle: float | None) -> torch.Tensor:
        for index, block in enumerate(model.blocks):
            if index == k and angle is not None:
                h = transform_images(h, "rotation", -angle)
            h = block(h)
        if k == len(model.blocks) and angle is not None:
            h = transform_images(h, "rotation", -angle)
        return h

    model.eval()
    reference = run(x, None)
    errors, distances = [], []
    for angle in angles:
        features = run(transform_images(x, "rotation", angle), angle)
        errors.append(float((model.head(features).argmax(1) != y).float().mean()))
        distances.append(normalised_distance(features, reference))
    return sum(errors) / len(errors), sum(distances) / len(distances)


def _plot(curves: dict, path: str) -> None:
    """Error, D(transformer output) and D(feature maps) against the angle, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("error", "test error"), ("transformer_distance", "D(transformer output)"), ("feature_distance", "D(feature maps)")]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for name, curve in curves.items():
        values = [row["value"] for row in curve["rows"]]
        for axis, (key, _) in zip(axes, keys):
            axis.plot(values, [row[key] for row in curve["rows"]], marker="o", markersize=2, label=name)
    for axis, (_, label) in zip(axes, keys):
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("rotation of the test digits (degrees)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["train", "measure"])
    parser.add_argument("--runs", default="runs/invariance", help="Folder of the run folders.")
    parser.add_argument("--task", default="rotated", help="Distorted-MNIST task to train on.")
    parser.add_argument("--transform", default="affine", help="Transformer family of the ST variants.")
    parser.add_argument("--data", default=os.environ.get("STNKIT_DATA"), help="Data root holding mnist/.")
    parser.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")], default=[16, 16, 32, 32])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--only", default="", help="Comma-separated run names (default: all).")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--count", type=int, default=1000, help="Test digits for the invariance measures.")
    parser.add_argument("--range", type=float, nargs=2, default=(-90.0, 90.0))
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--out", default="benchmarks/results/invariance.md")
    parser.add_argument("--json", default="", help="Also write every curve as JSON here.")
    parser.add_argument("--plot", default="", help="Also write a plot of every curve here (PNG).")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    (_train if args.stage == "train" else _measure)(args)


if __name__ == "__main__":
    main()
