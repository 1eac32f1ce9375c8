"""How well could the ST paper's CNN do on R, RTS or P with a perfect transformer?

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

With ``--task rts`` the oracle undoes the rotation, the scaling and the
placement: each digit comes back upright and centred on the 42x42 canvas, at
``--zoom`` times its MNIST size (1: 28 px, as ``canvas_digits`` pads it; 1.5 fills
the canvas). The CNN is then the paper's at 42x42, as in the RTS ST-CNN. With
``--task projective`` it samples each P digit through the inverse of its own
homography, back into the 28x28 frame; ink that the warp pushed out of the
frame stays lost, so this floor includes what P's cropping costs.

Usage::

    STNKIT_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/oracle_alignment.py \\
        --seed 21 --epochs 60 --out benchmarks/results/oracle_alignment-s21.md
    STNKIT_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/oracle_alignment.py --task rts \\
        --seed 21 --epochs 40 --out benchmarks/results/oracle_alignment-rts-s21.md
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
from stnkit.data.distortions import CORNER_SQUARE, MNIST_SIZE, PIXEL_NORM, RTS_SIZE, DistortedMNIST, _rotation, distort
from stnkit.models import classifier
from stnkit.sampling import warp
from stnkit.training import tune_cpu_allocator
from stnkit.training.trainer import TrainConfig, Trainer, evaluate
from stnkit.transforms import Affine, Projective, Rotation

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by a test
from _machine import cpu_model  # noqa: E402


def oracle_aligned(images: np.ndarray, seed, task: str = "rotated", zoom: float = 1.0) -> torch.Tensor:
    """The ``task`` digits drawn from ``seed``, each warped back by exactly its own distortion (bilinear).

    R: turned back by its angle (28x28). RTS: upright, centred on the 42x42 canvas, ``zoom`` times MNIST
    size. P: through the inverse homography, into the digit's own 28x28 frame.
    """
    distorted, params = distort(images, task, seed, return_params=True)
    if task == "rotated":
        # R's generator turns the content by +angle (counter-clockwise on screen) about the centre;
        # Rotation's theta maps output to input, so sampling at +angle turns it back by -angle.
        # The digits are square, so a rotation about the centre is the same in normalised units.
        angle = torch.from_numpy(np.deg2rad(params["angle_deg"])).float()
        theta, transform = torch.stack((-angle, torch.zeros_like(angle), torch.zeros_like(angle)), 1), Rotation()
    elif task == "rts":
        theta, transform = _rts_oracle_theta(params, zoom), Affine()
    elif task == "projective":
        # The generator's backward map sends output corner c to (c + offset) / scale in the digit;
        # the oracle samples the P image through the inverse homography, back into the digit's frame.
        # Ink the warp pushed out of the 28x28 frame is lost for good: the oracle cannot restore it.
        quads = (CORNER_SQUARE + params["corner_offsets_px"] * PIXEL_NORM) / params["scale"][:, None, None]
        generator = torch.from_numpy((quads - CORNER_SQUARE).reshape(len(images), 8))
        transform = Projective("corners")
        theta = transform.inverse(generator).float()
    else:
        raise ValueError(f"task: expected 'rotated', 'rts' or 'projective', got {task!r}")
    return torch.cat([warp(distorted[i : i + 4096], theta[i : i + 4096], transform) for i in range(0, len(images), 4096)])


def _rts_oracle_theta(params: dict, zoom: float) -> torch.Tensor:
    # In pixels (centres at integers): RTS puts MNIST pixel q at dst = centre + s R(a) (q - c28).
    # The oracle's output pixel p shows MNIST pixel q = c28 + (p - c42) / zoom, so it samples the
    # RTS canvas at centre + (s / zoom) R(a) (p - c42): one affine map from output to input pixels.
    c42 = (RTS_SIZE - 1) / 2.0
    linear = _rotation(params["angle_deg"]) * (params["scale"] / zoom)[:, None, None]
    matrix = np.zeros((len(linear), 3, 3))
    matrix[:, :2, :2] = linear
    matrix[:, :2, 2] = params["centre"] - linear.sum(axis=2) * c42
    matrix[:, 2, 2] = 1.0
    size = (RTS_SIZE, RTS_SIZE)
    return Affine().from_pixels(torch.from_numpy(matrix), size, size).float()


def reference_digits(images: np.ndarray, task: str = "rotated", zoom: float = 1.0) -> torch.Tensor:
    """The undistorted digits in the oracle's frame: as they are (R, P), or centred on 42x42 at ``zoom`` (RTS)."""
    clean = torch.from_numpy(images).float().div(255).unsqueeze(1)
    if task in ("rotated", "projective"):
        return clean
    # Output pixel p of the 42x42 canvas shows MNIST pixel c28 + (p - c42) / zoom.
    c28, c42 = (MNIST_SIZE - 1) / 2.0, (RTS_SIZE - 1) / 2.0
    matrix = torch.tensor([[1 / zoom, 0.0, c28 - c42 / zoom], [0.0, 1 / zoom, c28 - c42 / zoom], [0.0, 0.0, 1.0]], dtype=torch.float64)
    theta = Affine().from_pixels(matrix.expand(len(images), 3, 3), (MNIST_SIZE, MNIST_SIZE), (RTS_SIZE, RTS_SIZE)).float()
    return torch.cat([warp(clean[i : i + 4096], theta[i : i + 4096], Affine(), out_size=(RTS_SIZE, RTS_SIZE)) for i in range(0, len(images), 4096)])


def run(args: argparse.Namespace) -> str:
    if args.digit_sample:
        (train_images, train_labels), (test_images, test_labels) = load_digit_sample("train"), load_digit_sample("test")
    else:
        (train_images, train_labels), (test_images, test_labels) = load_mnist("train", args.data), load_mnist("test", args.data)
    train_images, train_labels = train_images[: args.train_limit], train_labels[: args.train_limit]
    train_split = DistortedMNIST(args.task, "train", seed=args.seed, images=train_images, labels=train_labels)
    y_train = torch.from_numpy(train_labels.astype(np.int64))
    y_test = torch.from_numpy(test_labels.astype(np.int64))
    clean = reference_digits(test_images, args.task, args.zoom)

    # The same per-epoch and test seeds as `stnkit train --task TASK` and `stnkit eval --test-seed S`.
    def epoch_data(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return oracle_aligned(train_images, train_split.epoch_seed(epoch), args.task, args.zoom), y_train

    def test_set(seed: int) -> torch.Tensor:
        test_split = DistortedMNIST(args.task, "test", seed=seed, images=test_images, labels=test_labels)
        return oracle_aligned(test_images, test_split.epoch_seed(0), args.task, args.zoom)

    # Sanity: the oracle really undoes the distortion (only resampling blur and the corners remain).
    watched = test_set(0)
    residual = float((watched - clean).abs().mean())
    if residual > 0.05:
        raise RuntimeError(f"oracle alignment leaves a mean residual of {residual:.3f}: the inverse is wrong")

    torch.manual_seed(args.seed)
    size = (RTS_SIZE, RTS_SIZE) if args.task == "rts" else (MNIST_SIZE, MNIST_SIZE)
    model = classifier("cnn", None, size, dropout=args.dropout)
    config = TrainConfig(
        epochs=args.epochs, batch_size=128, optimizer="adam", lr=0.002, lr_schedule="cosine", max_grad_norm=5.0,
        seed=args.seed, out_dir=args.run_dir, overwrite=True, progress=False,
    )  # fmt: skip
    result = Trainer(model, None, epoch_data, (watched, y_test), config).fit()
    errors = {seed: 100 * evaluate(model, watched if seed == 0 else test_set(seed), y_test) for seed in args.test_seeds}
    clean_error = 100 * evaluate(model, clean, y_test)
    train_error = 100 * evaluate(model, *epoch_data(args.epochs - 1))
    name = {"rotated": "R", "rts": "RTS", "projective": "P"}[args.task]
    zoom = f", the digit {args.zoom:g}x its MNIST size, centred on 42x42" if args.task == "rts" else ""
    lines = [
        f"# {name} with an oracle transformer: the paper's CNN on exactly re-aligned digits", "",
        f"- **machine**: {cpu_model()}, torch {torch.__version__}",
        f"- **date**: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- **command**: python benchmarks/oracle_alignment.py {' '.join(args.argv)}",
        f"- CNN (no transformer), dropout {args.dropout}, Adam lr 0.002, cosine, batch 128, clip 5, "
        f"{args.epochs} epochs, training seed {args.seed}, {len(train_images)} training digits; last weights{zoom}",
        f"- mean residual of the oracle on test seed 0 against the undistorted digits: {residual:.4f}", "",
        "| test set | error % |", "|---|---:|",
        *[f"| {name} oracle-aligned, seed {s} | {e:.2f} |" for s, e in errors.items()],
        f"| {name} oracle-aligned, mean | {np.mean(list(errors.values())):.2f} |",
        f"| the same test digits undistorted | {clean_error:.2f} |",
        f"| last training epoch (oracle-aligned, eval mode) | {train_error:.2f} |",
        "",
        f"Training: {result.steps} steps, {result.epochs_completed} epochs.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("rotated", "rts", "projective"), default="rotated")
    parser.add_argument("--zoom", type=float, default=1.0, help="RTS: the oracle's digit size, times MNIST's 28 px")
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
    tune_cpu_allocator()  # as the stnkit command does: the training epochs run 1.2-1.3x faster on the CPU
    text = run(args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
