"""Reader and writer for the IDX format of the MNIST family of datasets.

An IDX file is a small big-endian header followed by the raw array:

* two zero bytes;
* one byte naming the element type (``0x08`` uint8, ``0x09`` int8,
  ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64);
* one byte with the number of dimensions ``ndim``;
* ``ndim`` unsigned 32-bit big-endian sizes;
* the ``prod(sizes)`` elements, row-major, big-endian.

Files are often distributed gzip-compressed. Compression is detected from the
gzip magic bytes, never from the file name, so a ``.gz`` file that was
unpacked in place (or a raw file renamed ``.gz``) still reads.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from os import PathLike
from pathlib import Path

import numpy as np

__all__ = ["IDXFormatError", "parse_idx", "read_idx", "write_idx", "GZIP_MAGIC"]

GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> big-endian numpy dtype of the stored elements.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES: dict[np.dtype, int] = {dtype.newbyteorder("="): code for code, dtype in _DTYPES.items()}


class IDXFormatError(ValueError):
    """An IDX file (or byte string) is truncated, corrupt or not IDX at all."""


def _decompress(data: bytes, source: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:
        # EOFError: the stream stops early (a truncated download); OSError/zlib.error: bad bytes.
        raise IDXFormatError(f"{source}: corrupt or truncated gzip data ({exc})") from exc


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file (raw or gzip-compressed) into an array.

    Parameters
    ----------
    data : bytes
        The file's content. Gzip compression is detected from the magic bytes.
    source : str
        Name used in error messages (usually the file path).

    Returns
    -------
    numpy.ndarray
        A writable array in native byte order with the shape from the header.

    Raises
    ------
    IDXFormatError
        If the data is not IDX, names an unknown element type, or is shorter
        or longer than its header says.

    Examples
    --------
    >>> import numpy as np
    >>> parse_idx(b"\\x00\\x00\\x08\\x01\\x00\\x00\\x00\\x03\\x01\\x02\\x03")
    array([1, 2, 3], dtype=uint8)
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if data[:2] == GZIP_MAGIC:
        data = _decompress(data, source)
    if len(data) < 4:
        raise IDXFormatError(f"{source}: too short to be an IDX file ({len(data)} bytes, the header alone needs 4+)")
    zero0, zero1, code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0:
        raise IDXFormatError(
            f"{source}: not an IDX file: expected the magic to start with two zero bytes, got {data[:4].hex()}"
        )
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise IDXFormatError(f"{source}: unknown IDX element type 0x{code:02X} (expected one of {known})")
    if ndim == 0:
        raise IDXFormatError(f"{source}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IDXFormatError(
            f"{source}: truncated IDX header: {ndim} dimensions need {header_len} bytes, the file has {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(data) - header_len
    if payload < expected:
        raise IDXFormatError(
            f"{source}: truncated IDX data: shape {shape} of {dtype.newbyteorder('=').name} needs "
            f"{expected} bytes after the header, found {payload}"
        )
    if payload > expected:
        raise IDXFormatError(
            f"{source}: corrupt IDX file: {payload - expected} unexpected bytes after the {expected} "
            f"that shape {shape} needs"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    # astype copies: the result is writable and in native byte order.
    return array.astype(dtype.newbyteorder("="))


def read_idx(path: str | PathLike) -> np.ndarray:
    """Read an IDX file, gzip-compressed or not, into a numpy array.

    Parameters
    ----------
    path : str or os.PathLike
        The file. Compression is detected from its first bytes, not its name.

    Returns
    -------
    numpy.ndarray
        The array, in native byte order (``uint8`` for the MNIST files).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    IDXFormatError
        (a ``ValueError``) if the file is truncated or corrupt; the message names the file.

    Examples
    --------
    >>> images = read_idx("mnist/t10k-images-idx3-ubyte.gz")  # doctest: +SKIP
    >>> images.shape, images.dtype  # doctest: +SKIP
    ((10000, 28, 28), dtype('uint8'))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    return parse_idx(path.read_bytes(), str(path))


def write_idx(path: str | PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write an array as an IDX file, gzip-compressed when ``compress`` (default: name ends in ``.gz``).

    The gzip stream carries no timestamp or file name, so the same array always
    gives the same bytes.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    array : numpy.ndarray
        An array of uint8, int8, int16, int32, float32 or float64 with at least one dimension.
    compress : bool, optional
        Gzip the file. Defaults to ``True`` when ``path`` ends in ``.gz``.

    Returns
    -------
    pathlib.Path
        The path written.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> p = write_idx(os.path.join(tempfile.mkdtemp(), "x.gz"), np.arange(3, dtype=np.uint8))
    >>> read_idx(p)
    array([0, 1, 2], dtype=uint8)
    """
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODES:
        raise TypeError(
            f"cannot store dtype {array.dtype} in IDX (expected uint8, int8, int16, int32, float32 or float64)"
        )
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"IDX needs an array with 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, _CODES[native], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        data = gzip.compress(data, compresslevel=9, mtime=0)
    path.write_bytes(data)
    return path
