"""Build the small MNIST sample shipped in ``src/stnkit/assets/digits/``.

A class-balanced, seeded subset of the real MNIST digits: by default 800
training images per class (8,000) from the training set and 200 per class
(2,000) from the test set, drawn without replacement with
``numpy.random.default_rng(seed)``, kept in their original order. Written as
gzip-compressed IDX files (no timestamp, so the same input gives the same
bytes) with the original indices and an ATTRIBUTION.txt:

    python scripts/make_digit_sample.py --mnist /path/to/mnist

``--mnist`` is a directory with the four standard files
(``train-images-idx3-ubyte.gz`` ...).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

from stnkit.data.datasets import load_mnist
from stnkit.data.digits import SAMPLE_FILES
from stnkit.data.idx import write_idx

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "stnkit" / "assets" / "digits"
MAX_BYTES = 2_000_000

ATTRIBUTION = """\
MNIST digit sample shipped with stnkit
======================================

Source: the MNIST database of handwritten digits, by Yann LeCun, Corinna Cortes
and Christopher J. C. Burges (http://yann.lecun.com/exdb/mnist/), licensed under
the Creative Commons Attribution-Share Alike 3.0 license (CC BY-SA 3.0,
https://creativecommons.org/licenses/by-sa/3.0/). These files are a derived
subset and are shared under the same license.

What it is: a class-balanced random subset of the original images and labels,
unchanged pixel for pixel.
- train: {train_per_class} images per digit class ({train_total} in all) drawn from the
  60,000 MNIST training images;
- test: {test_per_class} images per digit class ({test_total} in all) drawn from the
  10,000 MNIST test (t10k) images.

How it was made: `python scripts/make_digit_sample.py --mnist DIR --seed {seed}`.
For each class the indices were drawn without replacement with NumPy's
default_rng({seed}) (train classes 0..9 first, then test classes 0..9), and
the selection kept in the original order. `SPLIT-indices-idx1-int32.gz` holds
the original 0-based index of every image in its MNIST split.

Files (IDX format, gzip-compressed; SHA-256):
{checksums}
"""


def select(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` random images of every class."""
    picks = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        if len(members) < per_class:
            raise ValueError(f"class {digit} has only {len(members)} images, fewer than --per-class {per_class}")
        picks.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, required=True, help="directory with the four MNIST .gz files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: the package assets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-per-class", type=int, default=800)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args(argv)

    # load_mnist looks in ROOT/mnist/; accept the mnist directory itself.
    root = args.mnist.parent if args.mnist.name == "mnist" else args.mnist
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        images, labels = load_mnist(split, root)
        index = select(labels, per_class, rng)
        names = SAMPLE_FILES[split]
        written.append(write_idx(args.out / names["images"], images[index]))
        written.append(write_idx(args.out / names["labels"], labels[index].astype(np.uint8)))
        written.append(write_idx(args.out / names["indices"], index.astype(np.int32)))

    total = sum(path.stat().st_size for path in written)
    checksums = "\n".join(
        f"- {path.name}: {hashlib.sha256(path.read_bytes()).hexdigest()}" for path in written
    )
    (args.out / "ATTRIBUTION.txt").write_text(
        ATTRIBUTION.format(
            train_per_class=args.train_per_class,
            train_total=10 * args.train_per_class,
            test_per_class=args.test_per_class,
            test_total=10 * args.test_per_class,
            seed=args.seed,
            checksums=checksums,
        )
    )
    print(f"wrote {len(written)} files, {total / 1e6:.2f} MB, to {args.out}")
    if total > MAX_BYTES:
        print(f"error: the sample is {total} bytes, over the {MAX_BYTES}-byte budget", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
