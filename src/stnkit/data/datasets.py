"""Where the MNIST-family files live on disk, and loading them as arrays.

Data root
---------
The data root is, in order of precedence: the ``root`` argument, the
environment variable ``STNKIT_DATA``, then ``~/.cache/stnkit/data``. A dataset
``KIND`` lives in ``ROOT/KIND/`` as the four standard IDX files, gzip-compressed
or not (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``).
``stnkit download mnist`` puts them there.

Fashion-MNIST is also found where Debian's ``dataset-fashion-mnist`` package
installs it (``/usr/share/datasets/fashion-mnist/``).
"""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

import numpy as np

from stnkit.data.idx import read_idx

__all__ = [
    "ENV_VAR",
    "DEFAULT_ROOT",
    "KINDS",
    "SPLITS",
    "SYSTEM_DIRS",
    "split_files",
    "resolve_data_root",
    "find_split_files",
    "load_mnist",
]

ENV_VAR = "STNKIT_DATA"
DEFAULT_ROOT = Path("~/.cache/stnkit/data")
KINDS = ("mnist", "fashion-mnist")
SPLITS = ("train", "test")
# The IDX files call the test split "t10k".
_FILE_PREFIX = {"train": "train", "test": "t10k"}
# Directories outside the data root that system packages install to.
SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {
    "mnist": (),
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}
_IMAGE_SIZE = 28


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown dataset {kind!r}: expected one of {', '.join(KINDS)}")
    return kind


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    return split


def split_files(split: str) -> tuple[str, str]:
    """The gzip file names ``(images, labels)`` of a split, as distributed.

    Examples
    --------
    >>> split_files("test")
    ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
    """
    prefix = _FILE_PREFIX[_check_split(split)]
    return f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"


def resolve_data_root(root: str | PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$STNKIT_DATA``, else ``~/.cache/stnkit/data``.

    The directory need not exist.

    Parameters
    ----------
    root : str or os.PathLike, optional
        An explicit root; wins over everything else. ``~`` is expanded.

    Returns
    -------
    pathlib.Path

    Examples
    --------
    >>> str(resolve_data_root("/data"))
    '/data'
    """
    if root is not None:
        if not isinstance(root, (str, PathLike)):
            raise TypeError(f"root must be a path, got {type(root).__name__}")
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return DEFAULT_ROOT.expanduser()


def _root_origin(root: str | PathLike | None) -> str:
    if root is not None:
        return "the root argument"
    if os.environ.get(ENV_VAR, "").strip():
        return f"${ENV_VAR}"
    return f"the default; ${ENV_VAR} is not set"


def _candidate_dirs(kind: str, root: str | PathLike | None) -> list[tuple[Path, str]]:
    """Directories to search, in order, each with a note of where it came from."""
    dirs = [(resolve_data_root(root) / kind, _root_origin(root))]
    dirs += [(d, "system package") for d in SYSTEM_DIRS[kind]]
    return dirs


def _find_file(directory: Path, gz_name: str) -> Path | None:
    # Accept the unpacked file too: the reader detects compression from the content.
    for name in (gz_name, gz_name[: -len(".gz")]):
        if (directory / name).is_file():
            return directory / name
    return None


def find_split_files(split: str = "train", root: str | PathLike | None = None, kind: str = "mnist") -> tuple[Path, Path]:
    """Locate the image and label files of a split.

    Parameters
    ----------
    split : {"train", "test"}
    root : str or os.PathLike, optional
        Data root (see :func:`resolve_data_root`); the files are looked for in ``ROOT/KIND/``.
    kind : {"mnist", "fashion-mnist"}

    Returns
    -------
    (pathlib.Path, pathlib.Path)
        The images file and the labels file, from the first directory holding both.

    Raises
    ------
    FileNotFoundError
        Naming every directory searched and how to get the files.

    Examples
    --------
    >>> images_path, labels_path = find_split_files("test", root="/data")  # doctest: +SKIP
    """
    _check_kind(kind)
    names = split_files(split)
    searched = []
    for directory, origin in _candidate_dirs(kind, root):
        found = [_find_file(directory, name) for name in names]
        if all(found):
            return found[0], found[1]
        searched.append(f"{directory} ({origin})")
    wanted = " and ".join(f"{name}[.gz]" for name in (n[: -len(".gz")] for n in names))
    hint = f"run `stnkit download {kind} --root DIR` or set {ENV_VAR}=DIR (files go in DIR/{kind}/)"
    if kind == "fashion-mnist":
        hint += ", or install Debian's dataset-fashion-mnist package"
    raise FileNotFoundError(
        f"{kind} {split} split not found: looked for {wanted} in {'; '.join(searched)}. To get them, {hint}."
    )


def load_mnist(
    split: str = "train", root: str | PathLike | None = None, kind: str = "mnist"
) -> tuple[np.ndarray, np.ndarray]:
    """Load a split of MNIST or Fashion-MNIST from the IDX files.

    Parameters
    ----------
    split : {"train", "test"}
        ``"test"`` is the 10,000-image ``t10k`` set.
    root : str or os.PathLike, optional
        Data root; default ``$STNKIT_DATA``, then ``~/.cache/stnkit/data``.
    kind : {"mnist", "fashion-mnist"}

    Returns
    -------
    images : numpy.ndarray
        ``uint8`` of shape ``(N, 28, 28)``, 0 background, 255 ink.
    labels : numpy.ndarray
        ``int64`` of shape ``(N,)``, values 0..9.

    Raises
    ------
    FileNotFoundError
        If the files are missing; the message lists every place searched.
    ValueError
        If a file is corrupt or the two files do not match.

    Examples
    --------
    >>> images, labels = load_mnist("test")  # doctest: +SKIP
    >>> images.shape, labels.dtype  # doctest: +SKIP
    ((10000, 28, 28), dtype('int64'))
    """
    images_path, labels_path = find_split_files(split, root, kind)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (_IMAGE_SIZE, _IMAGE_SIZE):
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, {_IMAGE_SIZE}, {_IMAGE_SIZE}), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected a 1-D uint8 label array, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: labels must be 0..9, found {int(labels.max())}")
    return images, labels.astype(np.int64)
