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


#: (task, kind) -> the sweep range the task was trained on (Jaderberg et al., Appendix A).
TASK_RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("rotated", "rotation"): (-90.0, 90.0),
    ("rts", "rotation"): (-45.0, 45.0),
    ("rts", "scale"): (0.7, 1.2),
    ("rts", "translation"): (-7.0, 7.0),
    ("cluttered", "translation"): (-16.0, 16.0),
}


def _train(args: argparse.Namespace) -> None:
    spec = get_task(args.task)
    # The seed changes the initialisation and the training distortions; the test set stays seed 0.
    train = DistortedMNIST(args.task, "train", root=args.data, seed=args.seed)
    test = DistortedMNIST(args.task, "test", root=args.data, seed=0)
    test_x, test_y = test.epoch(0)
    test_x, test_y = test_x[: args.test_limit], test_y[: args.test_limit]
    names = args.only.split(",") if args.only else list(RUNS)
    for name in names:
        variant, options = RUNS[name]
        out = Path(args.runs[0]) / name
        if (out / "checkpoints" / "last.safetensors").is_file() and not args.overwrite:
            print(f"{name}: already trained, skipping (use --overwrite)", flush=True)
            continue
        torch.manual_seed(args.seed)
        model = invariance_model(variant, args.transform, (spec.size, spec.size), channels=args.channels, **options)
        config = TrainConfig(
            epochs=args.epochs, batch_size=128, optimizer="adam", lr=1e-3, localisation_lr_scale=1.0,
            lr_schedule="cosine", max_grad_norm=5.0, seed=args.seed, out_dir=out, overwrite=True, progress=False,
        )
        info = {"task": args.task, "data_root": args.data, "digit_sample": False, "test_seed": 0, "seed": args.seed,
                "train_limit": args.train_limit, "test_limit": args.test_limit}
        start = time.process_time()
        trainer = Trainer(model, None, lambda e: tuple(t[: args.train_limit] for t in train.epoch(e)), (test_x, test_y),
                          config, run_info=info)
        result = trainer.fit()
        cpu = time.process_time() - start
        summary = {"name": name, "variant": variant, **options, "task": args.task, "seed": args.seed, "epochs": args.epochs, "parameters": count_parameters(model),
                   "steps": result.steps, "test_error": result.test_error, "cpu_s": round(cpu, 1)}
        (out / "benchmark.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary), flush=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


def _inverse(kind: str, value: float) -> float:
    """The parameter of the inverse transformation."""
    return 1.0 / value if kind == "scale" else -value


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    values = [v * scale for v in values if v is not None and v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _measure(args: argparse.Namespace) -> None:
    from stnkit.evaluation.invariance import (
        DEFAULT_RANGES, SPREAD_UNITS, TRANSFORM_KINDS, InvarianceReport, InvarianceRow, canvas_digits,
        measure_invariance,
    )

    spec = get_task(args.task)
    kind = args.kind
    value_range = tuple(args.range) if args.range else TASK_RANGES.get((args.task, kind), DEFAULT_RANGES[kind])
    images, labels = load_mnist("test", args.data)
    x, y = canvas_digits(images[: args.count], spec.size), torch.from_numpy(labels[: args.count].astype("int64"))
    test_x, test_y = DistortedMNIST(args.task, "test", root=args.data, seed=0).epoch(0)
    values = torch.linspace(value_range[0], value_range[1], args.steps).tolist()
    roots = [Path(r) for r in args.runs]
    # name -> measure -> one value per seed (run root)
    collected: dict[str, dict[str, list]] = {}
    curves = {}
    for root in roots:
        for name in (args.only.split(",") if args.only else RUNS):
            path = root / name / "checkpoints" / "last.safetensors"
            if not path.is_file():
                print(f"{name}: no checkpoint at {path}, skipped", file=sys.stderr)
                continue
            model = load_model(path)
            info_path = path.parent.parent / "benchmark.json"
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            # Cached per run and setting, so adding a run does not re-measure the others.
            tag = f"{kind}-" if kind != "rotation" else ""
            cache = path.parent.parent / f"invariance-{tag}{args.count}-{args.steps}-{value_range[0]:g}-{value_range[1]:g}.json"
            if cache.is_file() and not args.overwrite:
                saved = json.loads(cache.read_text())
                report = InvarianceReport(**{**saved, "rows": []})
                if "canonical_spread" not in saved:
                    raise SystemExit(f"{cache}: measured by an older version (no canonical spread); pass --overwrite")
                report.rows = [InvarianceRow(**row) for row in saved["rows"]]
            else:
                report = measure_invariance(model, x, y, kind, values)
                cache.write_text(json.dumps(report.to_dict()))
            curves[f"{name} ({root.name})" if len(roots) > 1 else name] = report.to_dict()
            test_error = info.get("test_error")
            if test_error is None:
                test_error = evaluate(model, test_x[: args.test_limit], test_y[: args.test_limit])
            entry = collected.setdefault(name, {"params": [], "test_error": [], "error": [], "transformer_distance": [],
                                               "feature_distance": [], "corner_error_px": [], "spread": [], "cpu_min": []})
            entry["params"].append(count_parameters(model))
            entry["test_error"].append(test_error)
            for key in ("error", "transformer_distance", "feature_distance", "corner_error_px"):
                entry[key].append(report.mean(key))
            entry["spread"].append(report.canonical_spread)
            entry["cpu_min"].append(info.get("cpu_s", float("nan")) / 60)
            print(name, root, {k: v[-1] for k, v in entry.items()}, flush=True)
    rows = []
    for name, entry in collected.items():
        rows.append([
            name, f"{entry['params'][0]:,}", str(len(entry["test_error"])), _mean_std(entry["test_error"], 100, 2),
            _mean_std(entry["error"], 100, 2), _mean_std(entry["transformer_distance"]),
            _mean_std(entry["feature_distance"]), _mean_std(entry["corner_error_px"], digits=2),
            _mean_std(entry["spread"], digits=2), _mean_std(entry["cpu_min"], digits=1),
        ])
    oracle_lines = []
    cnn_paths = [root / "cnn" / "checkpoints" / "last.safetensors" for root in roots]
    cnn_paths = [p for p in cnn_paths if p.is_file()]
    if cnn_paths:
        oracle_lines = [
            "",
            "## Perfect localisation, trained CNN: warping the input vs warping feature maps",
            "",
            f"The trained `cnn` run(s), with an *oracle* transformer that applies the exact inverse {kind} "
            "(no learning involved) to the input (k = 0) or to the feature maps after block k. "
            "Same digits and values as above; means over the values (and seeds).",
            "",
            f"| oracle transformer acts on | error % on transformed digits | feature-map distance |",
            "|---|---|---|",
        ]
        cnns = [load_model(p) for p in cnn_paths]
        for k in range(len(cnns[0].blocks) + 1):
            results = [_oracle(cnn, x, y, values, k, kind) for cnn in cnns]
            where = "input (k = 0)" if k == 0 else f"feature maps after block {k}"
            oracle_lines.append(
                f"| {where} | {_mean_std([r[0] for r in results], 100, 2)} | {_mean_std([r[1] for r in results])} |")
            print(oracle_lines[-1], flush=True)
        oracle_lines.append("| (no transformer: the `cnn` row above) | | |")
    infos = [json.loads(f.read_text()) for root in roots for f in sorted(root.glob("*/benchmark.json"))]
    total_cpu = sum(info.get("cpu_s", 0.0) for info in infos)
    steps_text = "/".join(sorted({str(info.get("steps")) for info in infos})) or "?"
    epochs_text = "/".join(sorted({str(info.get("epochs", 2)) for info in infos})) or "?"
    seeds_text = ", ".join(sorted({str(info.get("seed", 0)) for info in infos})) or "0"
    # Reference: the corner error of a transformer that always predicts the identity.
    from stnkit.evaluation.invariance import transformation_matrix

    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]], dtype=torch.float64).T
    identity_px = sum(
        float(((transformation_matrix(kind, v, (spec.size, spec.size)) @ corners - corners)[:2].norm(dim=0) * spec.size / 2).mean())
        for v in values
    ) / len(values)
    from stnkit.evaluation.invariance import canonical_spread

    identity_spread = canonical_spread(
        kind, torch.stack([transformation_matrix(kind, v, (spec.size, spec.size)) for v in values])[:, None], (spec.size, spec.size)
    )
    unit = TRANSFORM_KINDS[kind]
    header = ["model", "params", "seeds", f"test error % ({spec.code} test set)", f"error % on transformed digits",
              "transformer-output distance", "feature-map distance", "corner error (px)",
              f"canonical spread ({SPREAD_UNITS[kind]})", "train CPU (min)"]
    lines = [
        f"# Invariance of STN variants (Finnveden, Jansson & Lindeberg, ICPR 2020): {spec.code} MNIST ({spec.name}), {kind} sweep",
        "",
        f"Command: `{' '.join(shlex.quote(a) for a in sys.argv)}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared, niced), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)  ",
        f"Date: {dt.date.today().isoformat()}",
        "",
        f"Training (`benchmarks/invariance.py train --task {args.task}`): Adam, lr 1e-3, cosine schedule, batch 128, "
        f"{steps_text} steps ({epochs_text} epochs of the 60,000 training digits, distortions redrawn per epoch), "
        "localisation lr scale 1, gradient norm clipped at 5, affine transformers with the default bounds, classifier "
        f"channels 16-16-32-32; seeds {seeds_text} (initialisation and training distortions; where there are several, "
        f"cells are mean ± sample standard deviation over them). Total training CPU: {total_cpu / 60:.1f} min, one "
        "thread. The test error column is each run's final error on the task's full test set (10,000 digits, seed 0).",
        "",
        f"Measures: first {args.count} undistorted MNIST test digits on the {spec.size}x{spec.size} canvas, "
        f"transformed by {kind} over {len(values)} values from {value_range[0]:g} to {value_range[1]:g} {unit}; "
        "the distances are sum ||A(Tx) - A(x)||^2 / sum ||A(x)||^2 averaged over the values; "
        "corner error: mean distance, in input pixels, between where the image corners of the canonical frame "
        f"land in x along the two paths (input transformers only; a transformer that always predicts the identity "
        f"scores {identity_px:.2f} px here). Canonical spread (input transformers only; Finnveden et al.'s consistency "
        "measure, as their code computes it): per digit, the standard deviation over the sweep of the canonical "
        f"frame's {kind} (`stnkit.evaluation.invariance.canonical_spread`), averaged over the digits; 0 for a perfect "
        f"canonicaliser, {identity_spread:.2f} (the spread of the sweep itself) for a transformer that always predicts "
        "the identity.",
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
        _plot(curves, args.plot, f"{kind} ({unit})")
    print(f"wrote {args.out}")


@torch.no_grad()
def _oracle(model, x: torch.Tensor, y: torch.Tensor, values: list[float], k: int, kind: str = "rotation") -> tuple[float, float]:
    """Mean error and feature-map distance when the exact inverse of ``kind`` is applied at block ``k``.

    ``model`` is an :class:`~stnkit.models.invariance_models.InvarianceClassifier` without a
    transformer; ``k = 0`` warps the input, ``k >= 1`` the feature maps after block ``k``.
    """
    from stnkit.evaluation.invariance import normalised_distance, transform_images

    def undo(h: torch.Tensor, value: float) -> torch.Tensor:
        # A translation is in pixels of x: in pixels of a (smaller) feature map it is proportionally less.
        inverse = _inverse(kind, value) * (h.shape[-1] / x.shape[-1] if kind == "translation" else 1.0)
        return transform_images(h, kind, inverse)

    def run(h: torch.Tensor, value: float | None) -> torch.Tensor:
        for index, block in enumerate(model.blocks):
            if index == k and value is not None:
                h = undo(h, value)
            h = block(h)
        if k == len(model.blocks) and value is not None:
            h = undo(h, value)
        return h

    model.eval()
    reference = run(x, None)
    errors, distances = [], []
    for value in values:
        features = run(transform_images(x, kind, value), value)
        errors.append(float((model.head(features).argmax(1) != y).float().mean()))
        distances.append(normalised_distance(features, reference))
    return sum(errors) / len(errors), sum(distances) / len(distances)


def _plot(curves: dict, path: str, xlabel: str = "rotation (degrees)") -> None:
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
        axis.set_xlabel(f"{xlabel} of the test digits")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["train", "measure"])
    parser.add_argument("--runs", nargs="+", default=["runs/invariance"],
                        help="Folder of the run folders; measure: several folders (one per seed) give mean ± std.")
    parser.add_argument("--task", default="rotated", help="Distorted-MNIST task to train on.")
    parser.add_argument("--transform", default="affine", help="Transformer family of the ST variants.")
    parser.add_argument("--data", default=os.environ.get("STNKIT_DATA"), help="Data root holding mnist/.")
    parser.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")], default=[16, 16, 32, 32])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="Initialisation and training-distortion seed (train stage).")
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--only", default="", help="Comma-separated run names (default: all).")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--count", type=int, default=1000, help="Test digits for the invariance measures.")
    parser.add_argument("--kind", choices=["rotation", "translation", "scale"], default="rotation",
                        help="Transformation swept by the measure stage.")
    parser.add_argument("--range", type=float, nargs=2, default=None,
                        help="Sweep range (default: the task's own range for the kind, else the library's default).")
    parser.add_argument("--steps", type=int, default=13)
    parser.add_argument("--out", default="benchmarks/results/invariance.md")
    parser.add_argument("--json", default="", help="Also write every curve as JSON here.")
    parser.add_argument("--plot", default="", help="Also write a plot of every curve here (PNG).")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    (_train if args.stage == "train" else _measure)(args)


if __name__ == "__main__":
    main()
