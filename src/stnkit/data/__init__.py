"""Data: MNIST-format readers, downloads, the ST paper's distortions, alignment pairs and photos.

Modules that need OpenCV (:mod:`stnkit.data.images`, :mod:`stnkit.data.pairs`)
are not imported here; import them directly.
"""

from .datasets import load_mnist, resolve_data_root
from .digits import load_digit_sample
from .distortions import TASKS, DistortedMNIST, TaskSpec, distort, get_task
from .download import DownloadError, download, verify_file
from .idx import IDXFormatError, read_idx, write_idx

__all__ = [
    "load_mnist",
    "resolve_data_root",
    "load_digit_sample",
    "TASKS",
    "DistortedMNIST",
    "TaskSpec",
    "distort",
    "get_task",
    "DownloadError",
    "download",
    "verify_file",
    "IDXFormatError",
    "read_idx",
    "write_idx",
]
