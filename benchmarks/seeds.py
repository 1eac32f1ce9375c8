"""Seed robustness of ST-CNN training on RTS-distorted MNIST, and the collapse guard at work.

Two experiments, both with :class:`stnkit.training.Trainer` and the
``stnkit train`` defaults (SGD, lr 0.01, momentum 0.9, localisation lr scale
0.1, cosine schedule, batch 256, bounded affine head):

``seeds``
    ST-CNN (affine) trained for ``--epochs`` epochs on the first
    ``--train-digits`` MNIST training digits (RTS distortions redrawn each
    epoch), once per seed; test error on the fixed RTS test set (test seed 0).
    A run *converges* when its final test error is below ``--max-error`` and it
    never collapsed (no guard events, no rollback).
``failure``
    The PyTorch-tutorial failure mode: an *unbounded* head (``bounds=False``)
    with a localisation lr ``--failure-loc-scale`` times the base lr, trained
    with the guard off and then on, from the same seed. Reports what the guard
    flagged and what the trainer did (skips, rollbacks, localisation lr factor).

Writes ``benchmarks/results/seeds.md`` (the table, command, machine, date and
budget) and ``seeds.json`` next to it.

Usage::

    STNKIT_DATA=/path/to/data OMP_NUM_THREADS=1 python benchmarks/seeds.py --seeds 0,1,2,3,4 --epochs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stnkit.data.datasets import load_mnist
from stnkit.data.distortions import DistortedMNIST
from stnkit.models.classifiers import classifier
from stnkit.training import TrainConfig, Trainer, evaluate
from stnkit.training.guards import CollapseGuard, linear_determinant

RESULTS = Path(__file__).resolve().parent / "results"


class _Recorder(logging.Handler):
    """Keep the trainer's and the guard's warnings, to report what the recovery policy did."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _transformer_health(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Median |det| of the predicted affine maps and median std(output)/std(input) on ``x``."""
    model.eval()
    with torch.no_grad():
        st = model.transformer
        theta = st.predict_theta(x)
        out = st.warp(x, theta)
        det = linear_determinant(st.transform, theta).abs()
        ratio = out.flatten(1).std(1) / x.flatten(1).std(1).clamp_min(1e-6)
    return {"median_abs_det": float(det.median()), "median_std_ratio": float(ratio.median())}


def train_one(seed: int, args, train_images, train_labels, test, *, bounds: bool = True, loc_scale: float | None = None,
              guard: bool = True, max_steps: int | None = None) -> dict:
    """Train one ST-CNN and return its final metrics and what the guard did."""
    train = DistortedMNIST("rts", "train", seed=seed, images=train_images, labels=train_labels)
    test_x, test_y = test
    recorder = _Recorder()
    watched = [logging.getLogger("stnkit.training.trainer"), logging.getLogger("stnkit.training.guards")]
    for logger in watched:
        logger.addHandler(recorder)
    try:
        torch.manual_seed(seed)
        model = classifier("st-cnn", "affine", (42, 42), bounds=bounds)
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, optimizer="sgd", lr=0.01, momentum=0.9,
            localisation_lr_scale=args.loc_scale if loc_scale is None else loc_scale, lr_schedule=args.schedule,
            seed=seed, checkpoint_every=args.checkpoint_every, out_dir=None, progress=False, max_steps=max_steps,
        )
        trainer = Trainer(model, None, train.epoch, (test_x, test_y), config, guard=guard)
        started = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - started
    finally:
        for logger in watched:
            logger.removeHandler(recorder)
    # fit() evaluates at epoch ends only; a run cut by max_steps is evaluated here.
    error = result.test_error if not result.stopped_early else evaluate(model, test_x, test_y)
    health = _transformer_health(model, test_x[:1000])
    return {
        "seed": seed, "bounds": bounds, "guard": guard, "loc_lr_scale": config.localisation_lr_scale,
        "steps": result.steps, "epochs": result.epochs_completed, "test_error": error,
        "skipped_steps": result.skipped_steps, "rollbacks": sum("restored the last good" in line for line in recorder.lines),
        "localisation_lr_factor": result.localisation_lr_factor,
        "guard_events": len(trainer.guard.events) if trainer.guard is not None else None,
        "first_guard_event": (f"step {trainer.guard.events[0].step}: {trainer.guard.events[0].reason}"
                              if trainer.guard is not None and trainer.guard.events else None),
        "log": recorder.lines[:6] + [line for line in recorder.lines[6:] if "restored the last good" in line][:4],
        "seconds": round(seconds, 1), **health,
    }


def _machine() -> str:
    return (f"{platform.node() or 'unknown host'}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
            f"(shared with other jobs), torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


def _markdown(args, seeds: list[dict], failure: list[dict], command: str, failure_args=None, failure_command: str = "") -> str:
    failure_args = failure_args or args
    lines = [
        "# Seed robustness of ST-CNN on RTS-distorted MNIST",
        "",
        f"- Date: {dt.date.today().isoformat()}",
        f"- Command: `{command}`",
        f"- Machine: {args.machine}",
        f"- Budget: {args.epochs} epochs on the first {args.train_digits} MNIST training digits (RTS redrawn every epoch), "
        f"batch {args.batch_size}, SGD lr 0.01, momentum 0.9, localisation lr x{args.loc_scale} (the `stnkit train` "
        f"default), {args.schedule} schedule{' (constant lr)' if args.schedule == 'step' else ''}, bounded affine head; "
        f"test: {args.test_count} RTS test digits (test seed 0). The paper trains far longer: these errors are "
        "a short-budget check that every seed converges, not a reproduction of Table 1.",
        "- Collapsed: any guard event or roll-back, or a final median output/input std ratio below 0.1 "
        "(blank outputs) on 1000 test digits.",
        f"- Error target: final test error below {args.max_error:.0%} (set before the runs).",
        "",
        "| seed | steps | test error | median abs det | median std ratio | guard events | skipped | collapsed | "
        f"error < {args.max_error:.0%} | time (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|---:|",
    ]
    for r in seeds:
        collapsed = bool(r["guard_events"] or r["rollbacks"] or r["median_std_ratio"] < 0.1)
        lines.append(f"| {r['seed']} | {r['steps']} | {100 * r['test_error']:.2f}% | {r['median_abs_det']:.3f} | "
                     f"{r['median_std_ratio']:.3f} | {r['guard_events']} | {r['skipped_steps']} | "
                     f"{'**yes**' if collapsed else 'no'} | {'yes' if r['test_error'] < args.max_error else '**no**'} | "
                     f"{r['seconds']} |")
    if seeds:
        errors = np.array([r["test_error"] for r in seeds]) * 100
        lines += ["", f"Mean test error {errors.mean():.2f}% (std {errors.std(ddof=1) if len(errors) > 1 else 0:.2f}, "
                      f"min {errors.min():.2f}, max {errors.max():.2f}) over {len(seeds)} seeds."]
    if failure:
        lines += [
            "",
            "## Failure mode: unbounded head, localisation lr too high",
            "",
            f"Command: `{failure_command or command}`",
            "",
            f"ST-CNN with `bounds=False` and localisation lr x{failure_args.failure_loc_scale} (i.e. "
            f"{0.01 * failure_args.failure_loc_scale:g}), seed {failure_args.failure_seed}, {failure_args.failure_steps} "
            f"steps (batch {failure_args.batch_size}, {failure_args.schedule} schedule) on the same data, "
            f"{failure_args.test_count} test digits; guard off, then on (default thresholds, `max_nonfinite=5`, "
            f"good state refreshed every {failure_args.checkpoint_every} steps).",
            "",
            "| guard | test error | median abs det | median std ratio | guard events | skipped | rollbacks | final loc lr factor |",
            "|:---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in failure:
            lines.append(f"| {'on' if r['guard'] else 'off'} | {100 * r['test_error']:.2f}% | {r['median_abs_det']:.3g} | "
                         f"{r['median_std_ratio']:.3f} | {r['guard_events'] if r['guard_events'] is not None else '-'} | "
                         f"{r['skipped_steps']} | {r['rollbacks']} | {r['localisation_lr_factor']:g} |")
        guarded = [r for r in failure if r["guard"]]
        if guarded and guarded[0]["log"]:
            lines += ["", "What the guard logged first (guard on):", ""]
            lines += [f"    {line}" for line in guarded[0]["log"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="Comma-separated seeds ('' to skip).")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-digits", type=int, default=20000)
    parser.add_argument("--test-digits", type=int, default=10000)
    parser.add_argument("--loc-scale", type=float, default=0.1, help="Localisation lr scale (stnkit train default).")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="Steps between good-state snapshots.")
    parser.add_argument("--max-error", type=float, default=0.10, help="Converged means a final test error below this.")
    parser.add_argument("--failure", action="store_true", help="Also run the unbounded-head failure demo.")
    parser.add_argument("--failure-loc-scale", type=float, default=10.0)
    parser.add_argument("--failure-steps", type=int, default=120)
    parser.add_argument("--failure-seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="Data root (default: $STNKIT_DATA).")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--schedule", choices=["cosine", "step"], default="cosine", help="'step' with no steps: constant lr.")
    parser.add_argument("--out", default=str(RESULTS / "seeds.md"))
    parser.add_argument("--render", nargs="+", default=None, metavar="JSON",
                        help="Only write --out from the .json files of earlier runs (seed tables merged).")
    args = parser.parse_args(argv)
    if args.render:
        return render(args.render, Path(args.out))

    images, labels = load_mnist("train", args.data)
    train_images, train_labels = images[: args.train_digits], labels[: args.train_digits]
    test_x, test_y = DistortedMNIST("rts", "test", root=args.data, seed=0).epoch(0)
    test = (test_x[: args.test_digits], test_y[: args.test_digits])
    args.test_count = len(test[1])
    command = "OMP_NUM_THREADS=1 python benchmarks/seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seeds, failure = [], []

    args.machine = _machine()

    def save() -> None:
        out.write_text(_markdown(args, seeds, failure, command))
        config = {k: v for k, v in vars(args).items() if k not in ("render",)}
        payload = {"command": command, "date": dt.date.today().isoformat(), "config": config, "seeds": seeds, "failure": failure}
        out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")

    for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
        seeds.append(train_one(seed, args, train_images, train_labels, test))
        print(json.dumps({k: v for k, v in seeds[-1].items() if k != "log"}), flush=True)
        save()
    if args.failure:
        for guard in (False, True):
            failure.append(train_one(args.failure_seed, args, train_images, train_labels, test, bounds=False,
                                     loc_scale=args.failure_loc_scale, guard=guard, max_steps=args.failure_steps))
            print(json.dumps(failure[-1]), flush=True)
            save()
    save()
    return 0


def render(json_files: list[str], out: Path) -> int:
    """Merge the seed tables of several runs (e.g. seeds split over two processes) into one report."""
    runs = [json.loads(Path(name).read_text()) for name in json_files]
    out.parent.mkdir(parents=True, exist_ok=True)
    seed_runs = [run for run in runs if run["seeds"]]
    failure_runs = [run for run in runs if run["failure"]]
    if not seed_runs:
        raise SystemExit("--render: none of the files holds seed results")
    args = argparse.Namespace(**seed_runs[0]["config"])
    seeds = sorted((r for run in seed_runs for r in run["seeds"]), key=lambda r: r["seed"])
    failure = failure_runs[0]["failure"] if failure_runs else []
    failure_args = argparse.Namespace(**failure_runs[0]["config"]) if failure_runs else None
    commands = " ; ".join(run["command"] for run in seed_runs)
    out.write_text(_markdown(args, seeds, failure, commands, failure_args,
                             failure_runs[0]["command"] if failure_runs else ""))
    out.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
