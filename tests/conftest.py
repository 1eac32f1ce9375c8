"""Shared fixtures: seeded RNG, smooth test images, the data root for tests that need real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def smooth_images(batch: int, channels: int, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """Smooth random images in [0, 1]: a few low-frequency sinusoids.

    Smooth inputs make interpolation schemes agree closely (OpenCV quantises
    its bilinear weights to 1/32 px, which shows on noise but not on smooth images).
    """
    generator = torch.Generator().manual_seed(batch * 1000 + channels * 100 + height + width)
    ys = torch.linspace(0, 1, height, dtype=torch.float64).view(height, 1)
    xs = torch.linspace(0, 1, width, dtype=torch.float64).view(1, width)
    out = torch.zeros(batch, channels, height, width, dtype=torch.float64)
    for b in range(batch):
        for c in range(channels):
            fx, fy, px, py = (torch.rand(4, generator=generator, dtype=torch.float64) * torch.tensor([2.0, 2.0, 6.3, 6.3], dtype=torch.float64))
            out[b, c] = 0.5 + 0.25 * torch.sin(2 * torch.pi * (fx + 0.5) * xs + px) * torch.cos(2 * torch.pi * (fy + 0.5) * ys + py)
    return out.to(dtype)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``stnkit ARGS`` in-process: (exit code, stdout, stderr)."""
    from stnkit.cli.main import main

    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def data_root() -> Path:
    """The real-data root from STNKIT_DATA; tests that need it skip with the reason when absent."""
    root = os.environ.get("STNKIT_DATA")
    if not root or not (Path(root) / "mnist").is_dir():
        pytest.skip("needs the MNIST files: set STNKIT_DATA to a folder holding mnist/*.gz (CI points it at ../shared/data)")
    return Path(root)
