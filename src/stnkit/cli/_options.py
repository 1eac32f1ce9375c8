"""Pieces shared by the classification subcommands: data options and task loading."""

from __future__ import annotations

import os
from typing import Any, Callable

import click
import torch

from ..data.digits import load_digit_sample
from ..data.distortions import TASKS, DistortedMNIST, get_task

TASK_NAMES = list(TASKS)


def data_options(function: Callable) -> Callable:
    """Add ``--task``, ``--data`` and ``--digit-sample`` to a command."""
    function = click.option(
        "--digit-sample",
        is_flag=True,
        help="Use the small real-digit sample shipped inside stnkit instead of the full MNIST files.",
    )(function)
    function = click.option(
        "--data",
        "data_root",
        type=click.Path(file_okay=False),
        default=None,
        help="Data root holding mnist/*.gz (default: $STNKIT_DATA, then ~/.cache/stnkit/data).",
    )(function)
    function = click.option(
        "--task", type=click.Choice(TASK_NAMES), default="rts", help="Distorted-MNIST task (ST paper, Appendix A)."
    )(function)
    return function


def usable_cores() -> int:
    """How many cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _set_threads(context: click.Context, parameter: click.Parameter, threads: int | None) -> None:
    if threads is None:
        return
    cores = usable_cores()
    if threads > cores:
        # Not an error: the user may know better (e.g. hyper-threads), but it is the usual cause of a 3x slowdown.
        click.echo(f"warning: --threads {threads} is more than the {cores} cores this process may use; "
                   "threads that share a core slow each other down", err=True)
    torch.set_num_threads(threads)


def threads_option(function: Callable) -> Callable:
    """Add ``--threads N``, which calls ``torch.set_num_threads(N)`` before the command runs.

    Left out, torch's own count applies (``OMP_NUM_THREADS``, else one per core). Runs side by side
    should together use at most one thread per core: on two cores, a two-thread run beside a
    one-thread run trained ~3x slower than alone (``docs/speed.md``).
    """
    return click.option(
        "--threads", type=click.IntRange(min=1), default=None, expose_value=False, callback=_set_threads,
        help="CPU threads for this command (torch.set_num_threads) [default: $OMP_NUM_THREADS, else one per core].",
    )(function)


def check_model_fits_task(model: torch.nn.Module, checkpoint: Any, task: str) -> None:
    """Refuse a checkpoint whose input size is not the task's, before torch fails deep inside the model."""
    size = get_task(task).size
    expected = (getattr(model, "stnkit_config", None) or {}).get("in_size")
    if expected is not None and list(expected) != [size, size]:
        raise ValueError(
            f"{checkpoint} takes {expected[0]}x{expected[1]} inputs but task {task} has {size}x{size} images; "
            "pick the task it was trained on"
        )


def task_splits(
    task: str, data_root: str | None, digit_sample: bool, seed: int = 0, test_seed: int = 0, jitter_px: float = 0.0
) -> tuple[DistortedMNIST, DistortedMNIST]:
    """The train and test splits of a task, from the MNIST files or the shipped sample (jitter: training split only)."""
    get_task(task)
    if digit_sample:
        train_images, train_labels = load_digit_sample("train")
        test_images, test_labels = load_digit_sample("test")
        train = DistortedMNIST(task, "train", seed=seed, images=train_images, labels=train_labels, jitter_px=jitter_px)
        test = DistortedMNIST(task, "test", seed=test_seed, images=test_images, labels=test_labels)
    else:
        train = DistortedMNIST(task, "train", root=data_root, seed=seed, jitter_px=jitter_px)
        test = DistortedMNIST(task, "test", root=data_root, seed=test_seed)
    return train, test


def hold_out(train: DistortedMNIST, count: int) -> tuple[DistortedMNIST, DistortedMNIST | None]:
    """Split the last ``count`` training digits off as a validation set; ``(train, None)`` for 0.

    The validation digits are distorted once, as the protocol says (no jitter), from the
    training seed; the training split keeps the rest and its own settings.
    """
    if count == 0:
        return train, None
    if not 0 < count < len(train):
        raise ValueError(f"--val-size must be 0 or between 1 and {len(train) - 1} (the training digits), got {count}")
    labels = train.labels.numpy()
    kept = DistortedMNIST(
        train.task, "train", seed=train.seed, images=train.images[:-count], labels=labels[:-count], jitter_px=train.jitter_px
    )
    val = DistortedMNIST(train.task, "test", seed=train.seed, images=train.images[-count:], labels=labels[-count:])
    return kept, val


def run_info(task: str, data_root: str | None, digit_sample: bool, test_seed: int) -> dict[str, Any]:
    """What a checkpoint needs to rebuild the data on resume and evaluation."""
    return {"task": task, "data_root": data_root, "digit_sample": digit_sample, "test_seed": test_seed}


def limit(x: torch.Tensor, y: torch.Tensor, count: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``count`` examples (all when None)."""
    return (x, y) if count is None else (x[:count], y[:count])
