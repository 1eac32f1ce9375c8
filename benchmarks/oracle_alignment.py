"""How well could the ST paper's CNN do on R with a perfect transformer?

A spatial transformer on R can at best undo each digit's rotation exactly. This
script builds that "oracle" transformer's output from the generator's own
angles: each rotated digit is warped back by the exact inverse rotation
(bilinear, like the ST's sampler, so the digit is resampled twice as in an
ST-CNN). It trains the paper-sized CNN (no transformer, same recipe as our R
runs) on oracle-aligned training epochs, and reports its error on oracle-aligned
test sets and on the undistorted test digits. The gap between this floor and an
ST-CNN's error is what the learned transformer still costs; the gap between the
floor and the CNN on undistorted digits (``stnkit train --task plain --model cnn``)
is what the double resampling costs.

Usage::

    STNKIT_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/oracle_alignment.py \\
        --seed 21 --epochs 60 --out benchmarks/results/oracle_alignment-s21.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import torch

from stnkit.data.datasets import load_mnist
from stnkit.data.digits import load_digit_sample
from stnkit.data.distortions import DistortedMNIST, distort
from stnkit.models import classifier
from stnkit.sampling import warp
from stnkit.training.trainer import TrainConfig, Trainer, evaluate
from stnkit.transforms import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by a test
from _machine import cpu_model  # noqa: E402


def oracle_aligned(images: np.ndarray, seed) -> torch.Tensor:
    """The R digits drawn from ``seed``, each turned back by exactly its own angle (bilinear)."""
    rotated, params = distort(images, "rotated", seed, return_params=True)
    # R's generator turns the content by +angle (counter-clockwise on screen) about the centre;
    # Rotation's theta maps output to input, so sampling at +angle turns it back by -angle.
    # The digits are square, so a rotation about the centre is the same in normalised units.
    angle = torch.from_numpy(np.deg2rad(params["angle_deg"])).float()
    theta = torch.stack((-angle, torch.zeros_like(angle), torch.zeros_like(angle)), 1)
    return torch.cat([warp(rotated[i : i + 4096], theta[i : i + 4096], Rotation()) for i in range(0, len(images), 4096)])


def run(args: argparse.Namespace) -> str:
    if args.digit_sample:
        (train_images, train_labels), (test_images, test_labels) = load_digit_sample("train"), load_digit_sample("test")
    else:
        (train_images, train_labels), (test_images, test_labels) = load_mnist("train", args.data), load_mnist("test", args.data)
    train_images, train_labels = train_images[: args.train_limit], train_labels[: args.train_limit]
    train_split = DistortedMNIST("rotated", "train", seed=args.seed, images=train_images, labels=train_labels)
    y_train = torch.from_numpy(train_labels.astype(np.int64))
    y_test = torch.from_numpy(test_labels.astype(np.int64))
    clean = torch.from_numpy(test_images).float().div(255).unsqueeze(1)

    # The same per-epoch and test seeds as `stnkit train --task rotated` and `stnkit eval --test-seed S`.
    def epoch_data(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return oracle_aligned(train_images, train_split.epoch_seed(epoch)), y_train

    def test_set(seed: int) -> torch.Tensor:
        test_split = DistortedMNIST("rotated", "test", seed=seed, images=test_images, labels=test_labels)
        return oracle_aligned(test_images, test_split.epoch_seed(0))

    # Sanity: the oracle really undoes the rotation (only resampling blur and the corners remain).
    watched = test_set(0)
    residual = float((watched - clean).abs().mean())
    if residual > 0.05:
        raise RuntimeError(f"oracle alignment leaves a mean residual of {residual:.3f}: the inverse is wrong")

    torch.manual_seed(args.seed)
    model = classifier("cnn", None, (28, 28), dropout=args.dropout)
    config = TrainConfig(
        epochs=args.epochs, batch_size=128, optimizer="adam", lr=0.002, lr_schedule="cosine", max_grad_norm=5.0,
        seed=args.seed, out_dir=args.run_dir, overwrite=True, progress=False,
    )  # fmt: skip
    result = Trainer(model, None, epoch_data, (watched, y_test), config).fit()
    errors = {seed: 100 * evaluate(model, watched if seed == 0 else test_set(seed), y_test) for seed in args.test_seeds}
    clean_error = 100 * evaluate(model, clean, y_test)
    train_error = 100 * evaluate(model, *epoch_data(args.epochs - 1))
    lines = [
        "# R with an oracle transformer: the paper's CNN on exactly re-aligned digits", "",
        f"- **machine**: {cpu_model()}, torch {torch.__version__}",
        f"- **date**: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- **command**: python benchmarks/oracle_alignment.py {' '.join(args.argv)}",
        f"- CNN (no transformer), dropout {args.dropout}, Adam lr 0.002, cosine, batch 128, clip 5, "
        f"{args.epochs} epochs, training seed {args.seed}, {len(train_images)} training digits; last weights",
        f"- mean residual of the oracle on test seed 0 against the undistorted digits: {residual:.4f}", "",
        "| test set | error % |", "|---|---:|",
        *[f"| R oracle-aligned, seed {s} | {e:.2f} |" for s, e in errors.items()],
        f"| R oracle-aligned, mean | {np.mean(list(errors.values())):.2f} |",
        f"| the same test digits undistorted | {clean_error:.2f} |",
        f"| last training epoch (oracle-aligned, eval mode) | {train_error:.2f} |",
        "",
        f"Training: {result.steps} steps, {result.epochs_completed} epochs.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=21, help="training seed")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--dropout", type=float, default=0.25)
    parser.add_argument("--test-seeds", default="0,1,2")
    parser.add_argument("--train-limit", type=int, default=None, help="only the first N training digits")
    parser.add_argument("--data", default=None, help="data root (default: STNKIT_DATA)")
    parser.add_argument("--digit-sample", action="store_true", help="use the sample shipped in stnkit (for tests)")
    parser.add_argument("--run-dir", default=None, help="keep the training run (checkpoints, metrics) here")
    parser.add_argument("--out", default=None, help="write the markdown report here")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.test_seeds = [int(s) for s in args.test_seeds.split(",")]
    text = run(args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
