"""Add a spatial transformer in front of your own CNN, train both, and compare them.

The recipe is three lines: build a localisation net for your input size and a
transform family, wrap it in :class:`stnkit.SpatialTransformer`, and call the
transformer before your network. The localisation head starts at the identity
(and, with ``bounds=True``, cannot leave a box around it), so the wrapped
model starts out exactly as your CNN and can only learn to help.

Convention: the transformer's ``theta`` maps output points to input points
(backward map) in normalised coordinates; ``model.st.last_theta`` holds the
last batch's parameters.

Usage::

    python examples/add_st_to_your_cnn.py --quick                 # seconds
    python examples/add_st_to_your_cnn.py --steps 1500 --transform affine
    python examples/add_st_to_your_cnn.py --quick --onnx my_st_cnn.onnx   # needs stnkit[export]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from stnkit import SpatialTransformer
from stnkit.data import DistortedMNIST, load_digit_sample
from stnkit.localisation import conv_localisation


class YourCNN(nn.Module):
    """Stand-in for your network: any module taking ``(N, C, H, W)`` images works."""

    def __init__(self, in_channels: int = 1, size: int = 42, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(width * (size // 4) ** 2, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class WithTransformer(nn.Module):
    """Your CNN with a spatial transformer in front: the only new code you need."""

    def __init__(self, cnn: nn.Module, in_channels: int, size: int, transform: str = "affine") -> None:
        super().__init__()
        self.st = SpatialTransformer(conv_localisation(in_channels, (size, size), transform, bounds=True))
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn(self.st(x))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 64, seed: int = 0) -> float:
    """Plain Adam training on random batches; returns the last loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


@torch.no_grad()
def error_rate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) != y).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny settings: runs in seconds.")
    parser.add_argument("--steps", type=int, default=600, help="Training steps per model.")
    parser.add_argument("--transform", default="affine", help="Transformer family: affine, projective, tps, similarity, ...")
    parser.add_argument("--task", default="rts", choices=["rotated", "rts", "projective", "elastic"], help="Distorted-MNIST task.")
    parser.add_argument("--onnx", help="Also export the model with the transformer to this .onnx file.")
    args = parser.parse_args(argv)
    steps, width, batch = (5, 8, 16) if args.quick else (args.steps, 32, 64)
    torch.manual_seed(0)

    # Distorted digits from the sample shipped inside stnkit: no download.
    images, labels = load_digit_sample("train")
    train_set = DistortedMNIST(args.task, "train", images=images, labels=labels)
    x, y = train_set.epoch(0)
    test_images, test_labels = load_digit_sample("test")
    x_test, y_test = DistortedMNIST(args.task, "test", images=test_images, labels=test_labels).epoch(0)
    if args.quick:
        x_test, y_test = x_test[:200], y_test[:200]
    size, channels = x.shape[-1], x.shape[1]

    for name, model in [
        ("your CNN", YourCNN(channels, size, width)),
        (f"your CNN + ST ({args.transform})", WithTransformer(YourCNN(channels, size, width), channels, size, args.transform)),
    ]:
        started = time.perf_counter()
        loss = train(model, x, y, steps, batch)
        print(f"{name:<28} {sum(p.numel() for p in model.parameters()):>9,} parameters, "
              f"last loss {loss:.3f}, test error {error_rate(model, x_test, y_test):.1%} "
              f"({time.perf_counter() - started:.0f}s)")

    # What the transformer predicted for the first test digits.
    model(x_test[:4])
    print("theta of the first test digit:", [round(v, 3) for v in model.st.last_theta[0].tolist()])

    if args.onnx:
        from stnkit.export import export_onnx

        report = export_onnx(model, args.onnx, overwrite=True, input_shape=(channels, size, size))
        print(f"wrote {report.path} (opset {report.opset}); max |onnxruntime - torch| = {report.max_abs_diff:.2e}")


if __name__ == "__main__":
    main()
