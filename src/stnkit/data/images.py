"""Images for alignment: the built-in photo corpus and a careful file loader.

The built-in corpus is the set of photographs that ship *inside* the
scikit-image wheel, read straight from its data folder, so it works offline
and never triggers a download. It is split once, by name, into

``"train"`` (13 images)
    camera, motorcycle_left, motorcycle_right, retina, hubble_deep_field,
    moon, clock_motion, page, text, brick, gravel, immunohistochemistry, cell
``"heldout"`` (6 images)
    astronaut, chelsea, coffee, coins, rocket, grass

Both splits hold ordinary photos (people/objects/outdoor scenes), a natural
texture and greyscale as well as colour images, so the held-out benchmark is
not easier or harder by construction. The two motorcycle views are near
duplicates, so they sit in the same split. Images that are not photographs or
carry too little texture to align (horse silhouette, logo, colour wheel,
chessboard, phantom, the 102x102 microaneurysms crop) are left out of both.
Models must never be trained on ``"heldout"``.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import sys
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from ..models.imaging import to_gray_uint8  # noqa: F401 (re-exported with the data layer's other image helpers)

__all__ = [
    "BUILTIN_SPLITS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "builtin_photos",
    "load_image",
    "load_image_folder",
    "to_gray_uint8",
]

#: Refuse images above this many pixels (a decompression-bomb guard): 100 MP.
DEFAULT_MAX_PIXELS = 100_000_000

#: File extensions :func:`load_image_folder` picks up (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm", ".pbm", ".pnm")

# name -> file inside skimage's data folder. Kept as files (not skimage.data.*
# calls) so that a loader that moved to a pooch download can never be hit.
_BUILTIN_FILES = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "cell": "cell.png",
    "chelsea": "chelsea.png",
    "clock_motion": "clock_motion.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "moon": "moon.png",
    "motorcycle_left": "motorcycle_left.png",
    "motorcycle_right": "motorcycle_right.png",
    "page": "page.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "text": "text.png",
}

#: The fixed, documented split of the built-in photos (see the module docstring).
BUILTIN_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "camera",
        "motorcycle_left",
        "motorcycle_right",
        "retina",
        "hubble_deep_field",
        "moon",
        "clock_motion",
        "page",
        "text",
        "brick",
        "gravel",
        "immunohistochemistry",
        "cell",
    ),
    "heldout": ("astronaut", "chelsea", "coffee", "coins", "rocket", "grass"),
}


def builtin_photos(split: str = "train") -> list[tuple[str, np.ndarray]]:
    """Return the built-in photos of one split, read offline from scikit-image.

    Parameters
    ----------
    split : {"train", "heldout"}
        Which part of the fixed split to return. ``"heldout"`` is reserved for
        evaluation; models are never trained on it.

    Returns
    -------
    list of (str, numpy.ndarray)
        ``(name, image)`` pairs in a fixed order; each image is uint8, either
        ``(H, W)`` greyscale or ``(H, W, 3)`` RGB.

    Raises
    ------
    ValueError
        If ``split`` is not one of the two names.
    FileNotFoundError
        If the installed scikit-image does not ship one of the files.

    Examples
    --------
    >>> photos = builtin_photos("heldout")
    >>> [name for name, _ in photos][:2]
    ['astronaut', 'chelsea']
    >>> photos[0][1].shape, photos[0][1].dtype
    ((512, 512, 3), dtype('uint8'))
    """
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"split must be one of {sorted(BUILTIN_SPLITS)}, got {split!r}")
    data_dir = _skimage_data_dir()
    photos = []
    for name in BUILTIN_SPLITS[split]:
        path = data_dir / _BUILTIN_FILES[name]
        if not path.is_file():
            raise FileNotFoundError(
                f"built-in photo {name!r} is not shipped with this scikit-image ({path} is missing)"
            )
        photos.append((name, load_image(path)))
    return photos


def _skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).resolve().parent / "data"


def load_image(
    path: str | os.PathLike,
    *,
    grayscale: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read an image file into a uint8 array, refusing corrupt or huge files.

    Pillow opens the file first: it reads only the header, so the pixel count
    is checked *before* anything is decoded. Formats Pillow does not know fall
    back to OpenCV, where the size can only be checked after decoding.
    The EXIF orientation is applied, alpha is dropped, 16-bit images are scaled
    to 8 bits and multi-frame files give their first frame.

    Parameters
    ----------
    path : str or os.PathLike
        The image file.
    grayscale : bool, default False
        Convert to a single channel.
    max_pixels : int or None, default 100_000_000
        Refuse images with more pixels than this (decompression-bomb guard);
        ``None`` disables the check (Pillow's own limit, about 179 MP, still
        applies to formats it decodes).

    Returns
    -------
    numpy.ndarray
        uint8, ``(H, W)`` if the file or ``grayscale`` is single-channel,
        otherwise ``(H, W, 3)`` RGB.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the path is a directory, the file is empty, is not an image, is
        corrupt or truncated, has a zero-size image, or exceeds ``max_pixels``.

    Examples
    --------
    >>> import cv2, numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "grey.png")
    >>> _ = cv2.imwrite(path, np.full((4, 6), 128, np.uint8))
    >>> load_image(path).shape
    (4, 6)
    >>> load_image(path, max_pixels=10)
    Traceback (most recent call last):
    ...
    ValueError: ...grey.png: image is 6x4 = 24 pixels, above the limit of max_pixels=10
    """
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels <= 0):
        raise ValueError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected an image file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), expected an image")

    image = _load_with_pillow(path, max_pixels)
    if image is None:  # Pillow does not know the format: let OpenCV try.
        image = _load_with_opencv(path, max_pixels)
    if grayscale and image.ndim == 3:
        import cv2

        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(image)


def _check_size(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"{path}: image has zero size ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"{path}: image is {width}x{height} = {width * height} pixels, above the limit of max_pixels={max_pixels}"
        )


def _load_with_pillow(path: Path, max_pixels: int | None) -> np.ndarray | None:
    """Decode with Pillow; ``None`` if Pillow cannot identify the format."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    with warnings.catch_warnings():
        # Our own max_pixels check replaces Pillow's warning (which starts at 89 MP).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                _check_size(path, img.width, img.height, max_pixels)
                img.load()
                img = ImageOps.exif_transpose(img)
                return _pil_to_uint8(img)
        except UnidentifiedImageError:
            return None
        except (PermissionError, FileNotFoundError):
            raise  # not the file's fault: keep the OS error as it is
        except Image.DecompressionBombError as exc:
            # Pillow refuses at open (before our check) above twice its own limit.
            hard_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
            if max_pixels is not None and max_pixels < hard_limit:
                count = re.search(r"\((\d+) pixels\)", str(exc))
                size = f"{count.group(1)} pixels" if count else f"more than {hard_limit} pixels"
                raise ValueError(f"{path}: image is {size}, above the limit of max_pixels={max_pixels}") from None
            raise ValueError(f"{path}: refused as a decompression bomb by Pillow ({exc})") from None
        except (OSError, SyntaxError, EOFError, struct.error) as exc:
            # Truncated or corrupt data surfaces as one of these from the decoders.
            raise ValueError(f"{path}: corrupt or truncated image file ({exc})") from None


def _pil_to_uint8(img) -> np.ndarray:
    """Convert any Pillow mode to uint8 greyscale ``(H, W)`` or RGB ``(H, W, 3)``."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return np.asarray(img, dtype=np.uint8)
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode.startswith("I") or mode == "F":
        # 16/32-bit and float greyscale: scale by the type's range, not by the
        # image's own max, so that a dark 16-bit image stays dark.
        arr = np.asarray(img)
        if arr.dtype.kind == "f":
            scale = 1.0 if float(np.nanmax(arr, initial=0.0)) <= 1.0 else 1.0 / 255.0
            arr = np.nan_to_num(arr) * (255.0 * scale)
        elif arr.max(initial=0) > 255:
            arr = arr / 257.0
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if mode in ("LA", "La"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    # RGBA, P, PA, CMYK, YCbCr, LAB, HSV, ...: let Pillow do the colour maths.
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _load_with_opencv(path: Path, max_pixels: int | None) -> np.ndarray:
    import cv2

    data = np.fromfile(path, dtype=np.uint8)  # imdecode copes with non-ASCII paths
    try:
        with _quiet_opencv(cv2):
            image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ValueError(f"{path}: corrupt or unsupported image file ({str(exc).strip().splitlines()[-1]})") from None
    if image is None:
        raise ValueError(f"{path}: not a readable image file (neither Pillow nor OpenCV can decode it)")
    _check_size(path, image.shape[1], image.shape[0], max_pixels)
    if image.dtype == np.uint16:
        image = np.rint(image / 257.0).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"{path}: unsupported pixel type {image.dtype}, expected 8- or 16-bit")
    if image.ndim == 3:
        if image.shape[2] == 1:
            image = image[:, :, 0]
        elif image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
        else:
            image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


@contextlib.contextmanager
def _quiet_opencv(cv2) -> Iterator[None]:
    """Silence what OpenCV and its decoders print to stderr while decoding one file.

    A broken file must give exactly one message, the ValueError raised by the
    caller. Without this, OpenCV's logger ("[ERROR:0@...] imdecode_ ...") and
    the C decoders it wraps (libpng's "libpng error: Invalid IHDR data", ...)
    write their own lines straight to file descriptor 2. Only this fallback
    path, taken for files Pillow cannot identify, redirects it, for the
    duration of one ``imdecode``.
    """
    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    previous = logging.getLogLevel() if logging is not None else None
    if logging is not None:
        logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    saved_fd = None
    try:
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            saved_fd = os.dup(2)
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # no usable fd 2 (e.g. a closed or replaced stderr): decode as is
        saved_fd = None
    try:
        yield
    finally:
        if saved_fd is not None:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        if logging is not None:
            logging.setLogLevel(previous)


def load_image_folder(
    directory: str | os.PathLike,
    *,
    recursive: bool = False,
    grayscale: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    skip_unreadable: bool = False,
) -> list[tuple[str, np.ndarray]]:
    """Read every image file in a folder, sorted by relative path.

    Parameters
    ----------
    directory : str or os.PathLike
        Folder to scan; files are picked by extension (:data:`IMAGE_EXTENSIONS`).
    recursive : bool, default False
        Also scan sub-folders.
    grayscale, max_pixels
        Passed to :func:`load_image`.
    skip_unreadable : bool, default False
        Skip files :func:`load_image` rejects (with a warning) instead of raising.

    Returns
    -------
    list of (str, numpy.ndarray)
        ``(relative path, image)`` pairs.

    Raises
    ------
    FileNotFoundError
        If ``directory`` does not exist.
    ValueError
        If it is not a folder, holds no image files, or a file is unreadable
        and ``skip_unreadable`` is False.

    Examples
    --------
    >>> import cv2, numpy as np, tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> _ = cv2.imwrite(os.path.join(folder, "a.png"), np.zeros((8, 8), np.uint8))
    >>> [(name, img.shape) for name, img in load_image_folder(folder)]
    [('a.png', (8, 8))]
    """
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such folder")
    if not directory.is_dir():
        raise ValueError(f"{directory}: is a file, expected a folder of images")
    pattern = "**/*" if recursive else "*"
    files = sorted(
        p for p in directory.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise ValueError(
            f"{directory}: no image files found (expected extensions {', '.join(IMAGE_EXTENSIONS)})"
        )
    images = []
    for path in files:
        try:
            image = load_image(path, grayscale=grayscale, max_pixels=max_pixels)
        except ValueError as exc:
            if not skip_unreadable:
                raise
            warnings.warn(f"skipping {exc}", stacklevel=2)
            continue
        images.append((path.relative_to(directory).as_posix(), image))
    if not images:
        raise ValueError(f"{directory}: none of the {len(files)} image files could be read")
    return images


