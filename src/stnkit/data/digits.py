"""A small sample of real MNIST digits shipped inside the package.

10,000 digits (8,000 from the training set, 2,000 from the test set, 800 and
200 per class) for demos, tests and quick experiments without a download.
MNIST is by Y. LeCun, C. Cortes and C. J. C. Burges, licensed CC BY-SA 3.0;
see ``stnkit/assets/digits/ATTRIBUTION.txt`` for how the sample was drawn
(``scripts/make_digit_sample.py``).
"""

from __future__ import annotations

from importlib import resources

import numpy as np

from stnkit.data.idx import parse_idx

__all__ = ["SAMPLE_FILES", "load_digit_sample"]

SAMPLE_FILES: dict[str, dict[str, str]] = {
    split: {
        "images": f"{split}-images-idx3-ubyte.gz",
        "labels": f"{split}-labels-idx1-ubyte.gz",
        "indices": f"{split}-indices-idx1-int32.gz",
    }
    for split in ("train", "test")
}


def _read(name: str) -> np.ndarray:
    resource = resources.files("stnkit").joinpath("assets", "digits", name)
    if not resource.is_file():
        raise FileNotFoundError(
            f"the shipped digit sample is missing {name} (looked in stnkit/assets/digits/); "
            "reinstall stnkit or rebuild it with scripts/make_digit_sample.py"
        )
    return parse_idx(resource.read_bytes(), f"stnkit/assets/digits/{name}")


def load_digit_sample(split: str = "train", *, with_indices: bool = False):
    """Load the MNIST sample shipped with stnkit.

    Parameters
    ----------
    split : {"train", "test"}
        8,000 training digits or 2,000 test digits, balanced over the classes.
    with_indices : bool
        Also return each digit's index in its original MNIST split.

    Returns
    -------
    images : numpy.ndarray
        ``uint8 (N, 28, 28)``.
    labels : numpy.ndarray
        ``int64 (N,)``.
    indices : numpy.ndarray
        ``int64 (N,)``, only with ``with_indices``.

    Examples
    --------
    >>> images, labels = load_digit_sample("test")
    >>> images.shape, labels[:5].tolist()
    ((2000, 28, 28), [7, 1, 5, 0, 4])
    """
    if split not in SAMPLE_FILES:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SAMPLE_FILES)}")
    names = SAMPLE_FILES[split]
    images = _read(names["images"])
    labels = _read(names["labels"]).astype(np.int64)
    if with_indices:
        return images, labels, _read(names["indices"]).astype(np.int64)
    return images, labels
