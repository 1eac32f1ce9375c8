"""Download MNIST or Fashion-MNIST with checksum verification.

Every file is checked against two MD5 sums: the published checksum of the
``.gz`` file and the checksum of its uncompressed IDX content. A file passes if
either matches, so a mirror that re-compressed the files (or a copy written by
another gzip) is accepted, while any change to the data is rejected. Files are
written atomically: downloaded to a hidden temporary file in the destination
directory, flushed to disk, verified, then renamed into place. A download that
fails verification leaves nothing behind, and the next mirror is tried.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from stnkit.data.datasets import resolve_data_root

__all__ = ["RemoteFile", "MIRRORS", "FILES", "DownloadError", "verify_file", "download"]


@dataclass(frozen=True)
class RemoteFile:
    """One distributed file and its checksums.

    Attributes
    ----------
    name : str
        File name on the mirrors and on disk.
    md5 : str
        Published MD5 of the ``.gz`` file.
    payload_md5 : str
        MD5 of the uncompressed IDX content (survives re-compression).
    """

    name: str
    md5: str
    payload_md5: str


# Base URLs tried in order; each file is at BASE + name.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",  # PyTorch's mirror
        "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's mirror
        "http://yann.lecun.com/exdb/mnist/",  # the original
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",  # Zalando's S3 bucket
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
}

# .gz checksums as published (torchvision's MNIST list; Fashion-MNIST's README);
# payload checksums of the uncompressed files, as widely reproduced.
FILES: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": (
        RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f9a519e", "27ae3e4e09519cfbb04c329615203637"),
    ),
    "fashion-mnist": (
        RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    ),
}

_CHUNK = 1 << 20
_USER_AGENT = "stnkit-download/0.1 (+https://pypi.org/project/stnkit/)"


class DownloadError(OSError):
    """No mirror delivered a file that passed verification."""


def _checksum_problem(path: Path, remote: RemoteFile, md5: str | None = None) -> str | None:
    """``None`` if the file matches either checksum, else why not."""
    if md5 is None:
        md5 = _md5_of_file(path)
    if md5 == remote.md5:
        return None
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as exc:
            return f"MD5 mismatch (got {md5}, expected {remote.md5}) and the gzip data is corrupt ({exc})"
    payload_md5 = hashlib.md5(data).hexdigest()
    if payload_md5 == remote.payload_md5:
        return None
    return (
        f"MD5 mismatch: file {md5} (expected {remote.md5}), "
        f"uncompressed content {payload_md5} (expected {remote.payload_md5})"
    )


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: str | PathLike, dataset: str) -> bool:
    """Whether ``path`` is an intact copy of the file of ``dataset`` with the same name.

    Parameters
    ----------
    path : str or os.PathLike
        A downloaded file, e.g. ``ROOT/mnist/train-images-idx3-ubyte.gz``.
    dataset : {"mnist", "fashion-mnist"}

    Returns
    -------
    bool
        ``True`` if the file's MD5 or the MD5 of its uncompressed content matches.

    Examples
    --------
    >>> verify_file("data/mnist/t10k-labels-idx1-ubyte.gz", "mnist")  # doctest: +SKIP
    True
    """
    path = Path(path)
    remote = _remote_file(dataset, path.name)
    return path.is_file() and _checksum_problem(path, remote) is None


def _remote_file(dataset: str, name: str) -> RemoteFile:
    files = _files(dataset)
    for remote in files:
        if remote.name == name:
            return remote
    raise ValueError(f"{name!r} is not a file of {dataset}: expected one of {', '.join(f.name for f in files)}")


def _files(dataset: str) -> tuple[RemoteFile, ...]:
    if dataset not in FILES:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {', '.join(FILES)}")
    return FILES[dataset]


def _check_mirrors(mirrors: Sequence[str]) -> list[str]:
    if isinstance(mirrors, str):
        mirrors = [mirrors]
    checked = []
    for mirror in mirrors:
        if not isinstance(mirror, str):
            raise TypeError(f"mirrors must be URL strings, got {type(mirror).__name__}")
        scheme = urllib.parse.urlparse(mirror).scheme
        if scheme not in ("http", "https", "file"):
            raise ValueError(f"mirror must be an http://, https:// or file:// URL, got {mirror!r}")
        checked.append(mirror if mirror.endswith("/") else mirror + "/")
    if not checked:
        raise ValueError("mirrors is empty: give at least one base URL")
    return checked


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fetch_verified(url: str, dest: Path, remote: RemoteFile, timeout: float) -> int:
    """Download ``url`` and move it to ``dest`` only if it verifies; return its size.

    Raises OSError (network) or ValueError (verification); nothing is left behind on failure.
    """
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5()
        size = 0
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        problem = _checksum_problem(tmp, remote, digest.hexdigest())
        if problem is not None:
            raise ValueError(problem)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        return size
    finally:
        # After a successful os.replace the temporary name no longer exists.
        tmp.unlink(missing_ok=True)


def download(
    dataset: str,
    root: str | PathLike | None = None,
    mirrors: Sequence[str] | None = None,
    overwrite: bool = False,
    *,
    timeout: float = 60.0,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Download the four IDX files of a dataset into ``ROOT/DATASET/``, verifying each.

    Parameters
    ----------
    dataset : {"mnist", "fashion-mnist"}
    root : str or os.PathLike, optional
        Data root (see :func:`stnkit.data.datasets.resolve_data_root`); created if missing.
    mirrors : sequence of str, optional
        Base URLs to try in order instead of :data:`MIRRORS` (``http``, ``https`` or ``file``).
    overwrite : bool
        Download again even when a valid copy is present.
    timeout : float
        Seconds to wait for each connection and read.
    log : callable, optional
        Called with one line of text per file (e.g. ``print``).

    Returns
    -------
    list of pathlib.Path
        The four files, all verified.

    Raises
    ------
    DownloadError
        (an ``OSError``) if no mirror delivered an intact copy of some file;
        the message says what went wrong with each mirror.
    ValueError
        For an unknown dataset or a malformed mirror URL.

    Examples
    --------
    >>> paths = download("mnist", "~/data")  # doctest: +SKIP
    >>> [p.name for p in paths]  # doctest: +SKIP
    ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz']
    """
    files = _files(dataset)
    bases = _check_mirrors(MIRRORS[dataset] if mirrors is None else mirrors)
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    say = log or (lambda line: None)
    directory = resolve_data_root(root) / dataset
    created = [parent for parent in (directory, *directory.parents) if not parent.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return _download_files(dataset, files, bases, directory, timeout, overwrite, say)
    except DownloadError:
        # Leave no empty folders behind: a later run (or the data reader) would mistake them for data.
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (a file was downloaded), or not ours to remove
        raise


def _download_files(dataset, files, bases, directory: Path, timeout: float, overwrite: bool, say) -> list[Path]:
    paths = []
    for remote in files:
        dest = directory / remote.name
        if dest.exists() and not overwrite:
            problem = _checksum_problem(dest, remote)
            if problem is None:
                say(f"{dest}: present, checksum OK")
                paths.append(dest)
                continue
            say(f"{dest}: present but damaged ({problem}); downloading again")
        failures = []
        for base in bases:
            url = base + remote.name
            try:
                size = _fetch_verified(url, dest, remote, timeout)
            except (OSError, ValueError) as exc:
                failures.append(f"{url}: {exc}")
                continue
            say(f"{dest}: downloaded {size / 1e6:.1f} MB from {url}, checksum OK")
            break
        else:
            raise DownloadError(f"could not download {remote.name} for {dataset}: " + "; ".join(failures))
        paths.append(dest)
    return paths
