"""How much of each digit's ink the P distortion keeps in the frame, under two readings of the protocol.

The ST paper's appendix moves the four image corners by N(0, 5 px) after scaling the digit by
U(0.75, 1.0). stnkit perturbs the corners of the *backward* map (output corner ``c`` samples the
input at ``(c + offset) / scale``; see ``docs/distorted_mnist_protocol.md``). A common alternative
perturbs the *forward* map: the scaled image's corners land at ``corner + offset``, as with
``cv2.getPerspectiveTransform`` + ``cv2.warpPerspective``. This script takes the same draws
(scales and offsets) of the P test set and reports, for both readings, the share of digits that
keep all of their ink, and that keep less than 95%, 85% and 50% of it. The draws are conditioned
on a usable backward quad (as the generator does); read forward, some of them fold the frame's
preimage over (the horizon crosses the frame) or squeeze it past the generator's angle limits;
those would be redrawn, and are counted apart, not scored.

Usage::

    STNKIT_DATA=../shared/data python benchmarks/projective_ink.py --out benchmarks/results/projective_ink.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import cv2
import numpy as np

from stnkit.data.datasets import load_mnist
# The P generator's own corner square, pixel size and rule for a usable quad, so its draws are read back as it made them.
from stnkit.data.distortions import PIXEL_NORM as PX, CORNER_SQUARE as SQUARE, well_shaped
from stnkit.data.distortions import DistortedMNIST, distort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import write_report  # noqa: E402
from error_analysis import projective_ink_kept  # noqa: E402


def forward_reading(params: dict) -> dict:
    """The same draws read as a forward map, as params of :func:`projective_ink_kept` (scale 1).

    The forward map scales by ``s``, then sends the image corners to ``corner + offset`` (homography
    ``H``). The output frame therefore shows the input quad ``H^-1(square) / s``.
    """
    scale, offsets = params["scale"], params["corner_offsets_px"] * PX
    quads = np.empty_like(offsets)
    for i in range(len(scale)):
        forward = cv2.getPerspectiveTransform(SQUARE.astype(np.float32), (SQUARE + offsets[i]).astype(np.float32))
        quads[i] = cv2.perspectiveTransform(SQUARE[None], np.linalg.inv(forward))[0] / scale[i]
    return {"scale": np.ones_like(scale), "corner_offsets_px": (quads - SQUARE) / PX}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test-seed", type=int, default=0)
    parser.add_argument("--data", default=None, help="data root (default: STNKIT_DATA)")
    parser.add_argument("--out", default=None, help="write the markdown report here")
    args = parser.parse_args(argv)
    images, labels = load_mnist("test", args.data)
    test_set = DistortedMNIST("projective", "test", seed=args.test_seed, images=images, labels=labels)
    _, params = distort(images, "projective", test_set.epoch_seed(0), return_params=True)
    lines = [
        "# P distortion: ink kept in the 28x28 frame, backward against forward reading", "",
        f"- **date**: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- **command**: python benchmarks/projective_ink.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        f"- **digits**: the {len(images):,} MNIST test digits, P test seed {args.test_seed}, the same draws for both rows", "",
        "| reading | unusable, redrawn (not scored) | all ink kept | under 95% | under 85% | under 50% |",
        "|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name, reading in (("backward (stnkit)", params), ("forward (cv2.getPerspectiveTransform)", forward_reading(params))):
        usable = well_shaped((SQUARE + reading["corner_offsets_px"] * PX) / reading["scale"][:, None, None])
        kept = projective_ink_kept(images[usable], {key: value[usable] for key, value in reading.items()})
        shares = [(kept >= 1.0).mean(), (kept < 0.95).mean(), (kept < 0.85).mean(), (kept < 0.5).mean()]
        lines.append(f"| {name} | {100 * (1 - usable.mean()):.2f}% | " + " | ".join(f"{100 * v:.2f}%" for v in shares) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
