"""Measure how invariant your own model is to rotations (or translations, or scaling).

:func:`stnkit.evaluation.invariance.measure_invariance` needs only a model and
some test images. Any ``nn.Module`` that returns logits works; to also see how
consistently *your* spatial transformer canonicalises, give a ``views``
function that returns what you want compared (here: the transformer's output
and the features the last layer reads).

Usage::

    python examples/measure_invariance.py --quick            # seconds: tiny model, few steps
    python examples/measure_invariance.py --steps-train 300 --plot invariance.png
    python examples/measure_invariance.py --checkpoint runs/invariance/stn-shared-k2/checkpoints/last.safetensors
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from stnkit import SpatialTransformer
from stnkit.data import DistortedMNIST, load_digit_sample
from stnkit.evaluation.invariance import canvas_digits, measure_invariance
from stnkit.localisation import conv_localisation
from stnkit.models import load_model


class MySTN(nn.Module):
    """Stand-in for "your model": a transformer on the input, then a small CNN."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.st = SpatialTransformer(conv_localisation(1, (28, 28), "affine", bounds=True))
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * 7 * 7, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.st(x)))


def my_views(model: MySTN, x: torch.Tensor) -> dict:
    """What to compare between x and T(x). "matrix" (backward, normalised) enables the corner error."""
    warped = model.st(x)
    features = model.features(warped)
    matrix = model.st.transform.matrix(model.st.last_theta)
    return {"transformer_output": warped, "features": features, "logits": model.head(features), "matrix": matrix}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny settings: runs in seconds.")
    parser.add_argument("--checkpoint", help="Measure a stnkit checkpoint (28x28 input) instead of the example model.")
    parser.add_argument("--steps-train", type=int, default=200, help="Training steps of the example model.")
    parser.add_argument("--count", type=int, default=500, help="Test digits.")
    parser.add_argument("--transform", default="rotation", choices=["rotation", "translation", "scale"])
    parser.add_argument("--plot", help="Write a plot here.")
    args = parser.parse_args()
    if args.quick:
        args.steps_train, args.count = 20, 100
    torch.manual_seed(0)

    if args.checkpoint:
        model = load_model(args.checkpoint)
        views = None  # stnkit models know what to compare (see stnkit.evaluation.invariance.model_views)
    else:
        # Train the example model briefly on rotated digits (the shipped sample, no download).
        images, labels = load_digit_sample("train")
        x, y = DistortedMNIST("rotated", "train", images=images, labels=labels).epoch(0)
        model = MySTN(width=8 if args.quick else 16)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        for step in range(args.steps_train):
            index = torch.randint(0, len(x), (64,))
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"trained {args.steps_train} steps, last loss {loss.item():.3f}")
        views = lambda batch: my_views(model, batch)  # noqa: E731

    # The measurement itself: undistorted test digits x, transformed over a range, compared with x.
    test_images, test_labels = load_digit_sample("test")
    x_test = canvas_digits(test_images[: args.count], 28)
    y_test = torch.from_numpy(test_labels[: args.count])
    model.eval()
    report = measure_invariance(model, x_test, y_test, args.transform, steps=7, views=views)
    print(report.table())
    if args.plot:
        print("plot:", report.plot(args.plot))


if __name__ == "__main__":
    main()
