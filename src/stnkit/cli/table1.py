"""``stnkit table1``: train and evaluate cells of the ST paper's Table 1 and write them beside the paper's numbers."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import torch

from ..models.classifiers import classifier, count_parameters
from ..training.trainer import LAST_CHECKPOINT, TrainConfig, Trainer
from ._options import limit, run_info, task_splits, threads_option
from .main import CLIError

#: Test error (%) reported in Table 1 of Jaderberg et al. (2015), by (model, transform) and task code.
PAPER_TABLE1: dict[tuple[str, str | None], dict[str, float]] = {
    ("fcn", None): {"R": 2.1, "RTS": 5.2, "P": 3.1, "E": 3.2},
    ("cnn", None): {"R": 1.2, "RTS": 0.8, "P": 1.5, "E": 1.4},
    ("st-fcn", "affine"): {"R": 1.2, "RTS": 0.8, "P": 1.5, "E": 2.7},
    ("st-fcn", "projective"): {"R": 1.3, "RTS": 0.9, "P": 1.4, "E": 2.6},
    ("st-fcn", "tps"): {"R": 1.1, "RTS": 0.8, "P": 1.4, "E": 2.4},
    ("st-cnn", "affine"): {"R": 0.7, "RTS": 0.5, "P": 0.8, "E": 1.2},
    ("st-cnn", "projective"): {"R": 0.8, "RTS": 0.6, "P": 0.8, "E": 1.3},
    ("st-cnn", "tps"): {"R": 0.7, "RTS": 0.5, "P": 0.8, "E": 1.1},
}
TASK_CODES = {"rotated": "R", "rts": "RTS", "projective": "P", "elastic": "E"}


def parse_cell(text: str) -> tuple[str, str, str | None]:
    """``task:model[:transform]`` -> (task, model, transform)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in TASK_CODES:
        raise CLIError(f"bad cell {text!r}: expected task:model[:transform] with task in {', '.join(TASK_CODES)}")
    task, model = parts[0], parts[1]
    transform = parts[2] if len(parts) == 3 else None
    if (model, transform) not in PAPER_TABLE1:
        known = ", ".join(f"{m}:{t}" if t else m for m, t in PAPER_TABLE1)
        raise CLIError(f"bad cell {text!r}: model[:transform] must be one of {known}")
    return task, model, transform


@click.command(context_settings={"show_default": True})
@click.option("--cell", "cells", multiple=True, required=True, help="task:model[:transform], e.g. rts:st-cnn:affine (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder for the runs and table1.md.")
@click.option("--data", "data_root", type=click.Path(file_okay=False), default=None, help="Data root holding mnist/*.gz.")
@click.option("--epochs", type=int, default=10)
@click.option("--batch-size", type=int, default=128)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="adam")
@click.option("--lr", type=float, default=0.002)
@click.option("--loc-lr-scale", type=float, default=0.3)
@click.option("--seed", type=int, default=0)
@click.option("--device", default="cpu")
@threads_option
@click.option("--resume/--no-resume", default=True, help="Keep cells already finished in --out.")
@click.option("--progress/--no-progress", default=True)
def command(cells, out_dir, data_root, epochs, batch_size, optimizer, lr, loc_lr_scale, seed, device, resume, progress):
    """Train each cell on the full MNIST files, evaluate on the 10,000 test digits, write table1.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parsed = [parse_cell(text) for text in cells]
    for text, (task, model_name, transform) in zip(cells, parsed):
        # One result file per cell, so several processes can fill one table in parallel.
        run_dir = out / text.replace(":", "-")
        result_path = run_dir / "result.json"
        if resume and result_path.is_file():
            done = json.loads(result_path.read_text())
            click.echo(f"{text}: done before ({100 * done['test_error']:.2f}%)")
            continue
        train, test = task_splits(task, data_root, False, seed=seed)
        config = TrainConfig(
            epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, localisation_lr_scale=loc_lr_scale,
            lr_schedule="cosine", seed=seed, checkpoint_every=500, out_dir=run_dir, overwrite=True, progress=progress,
            device=device,
        )
        torch.manual_seed(seed)
        model = classifier(model_name, transform, (train.size, train.size))
        started = time.perf_counter()
        trainer = Trainer(model, None, train.epoch, test.epoch(0), config, run_info=run_info(task, data_root, False, 0))
        result = trainer.fit()
        seconds = time.perf_counter() - started
        record = {
            "cell": text, "task": task, "model": model_name, "transform": transform, "test_error": result.test_error,
            "best_test_error": result.best_test_error, "epochs": epochs, "steps": result.steps,
            "optimizer": optimizer, "lr": lr, "batch_size": batch_size, "train_seconds": round(seconds),
            "parameters": count_parameters(model), "checkpoint": str(run_dir / LAST_CHECKPOINT),
        }
        result_path.write_text(json.dumps(record, indent=2))
        click.echo(f"{text}: test error {100 * result.test_error:.2f}% after {epochs} epochs, {seconds / 60:.1f} min")
    results = {}
    for path in sorted(out.glob("*/result.json")):
        record = json.loads(path.read_text())
        results[record["cell"]] = record
    write_table(results, out / "table1.md")
    click.echo(f"wrote {out / 'table1.md'}")


def write_table(results: dict, path: Path) -> None:
    """Markdown: one row per (model, transform), ours beside the paper's for each task run."""
    tasks = [t for t in TASK_CODES if any(r["task"] == t for r in results.values())]
    lines = [
        "Test error (%) on the 10,000 MNIST test digits, distorted once with the fixed test seed 0; the paper's "
        "models trained 150k iterations of SGD at batch 256, ours the budget in the last columns.",
        "",
        "| model | " + " | ".join(f"{TASK_CODES[t]} ours | {TASK_CODES[t]} paper" for t in tasks) + " | budget |",
        "|---|" + "---|" * (2 * len(tasks) + 1),
    ]
    for (model, transform), paper in PAPER_TABLE1.items():
        row, budgets = [], []
        for task in tasks:
            result = results.get(f"{task}:{model}" + (f":{transform}" if transform else ""))
            row += ["" if result is None else f"{100 * result['test_error']:.2f}", f"{paper[TASK_CODES[task]]}"]
            if result is not None:
                budgets.append(
                    f"{TASK_CODES[task]}: {result['epochs']} ep, {result['optimizer']} lr {result['lr']}, "
                    f"batch {result['batch_size']}, {result['train_seconds'] / 60:.0f} min"
                )
        if budgets:
            name = model.upper() + (f" {transform}" if transform else "")
            lines.append(f"| {name} | " + " | ".join(row) + " | " + "; ".join(budgets) + " |")
    lines += ["", f"Written by `stnkit table1` on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}."]
    path.write_text("\n".join(lines) + "\n")
