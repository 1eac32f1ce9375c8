"""The distorted-MNIST tasks of Jaderberg et al., "Spatial Transformer Networks" (NeurIPS 2015).

Appendix A.1 of the paper defines the distortions used for its Table 1:

* **R** (``rotated``): a random rotation, uniform in [-90, 90] degrees;
* **RTS** (``rts``): rotation uniform in [-45, 45] degrees, scale uniform in
  [0.7, 1.2], and placement at a uniformly random location in a 42x42 image
  (here: uniform over the positions that keep all of the digit's ink inside);
* **P** (``projective``): scale uniform in [0.75, 1.0], then each of the four
  corners moved by a zero-mean Gaussian of 5 pixels standard deviation;
* **E** (``elastic``): scale uniform in [0.75, 1.0], then a thin-plate-spline
  warp whose 16 control points, on a regular 4x4 grid, are moved by a
  zero-mean Gaussian of 1.5 pixels standard deviation;

plus translated-cluttered MNIST (**TC**, ``cluttered``): the digit at a random
location in a 60x60 image with 6 random 6x6 fragments of other digits as clutter.
``plain`` leaves the digits as they are: not a task of the paper, but the
baseline that says what a classifier reaches without any distortion.
Every choice the paper leaves open is written in ``docs/distorted_mnist_protocol.md``.

All randomness comes from one :class:`numpy.random.Generator` seeded by the
caller, drawn in a fixed order and vectorised over the batch, so the same
images, task and seed always give the same output. The warps are backward maps
sampled bilinearly with zero padding through :func:`stnkit.warp`, in the
library's coordinate convention (:mod:`stnkit.transforms.base`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike

import numpy as np
import torch
from torch import Tensor

from stnkit.data.datasets import SPLITS, load_mnist
from stnkit.sampling import sample, warp
from stnkit.transforms import Affine, Projective, ThinPlateSpline

__all__ = [
    "TaskSpec", "TASKS", "get_task", "distort", "DistortedMNIST", "SeedLike", "CORNER_SQUARE", "PIXEL_NORM", "well_shaped",
]  # fmt: skip

SeedLike = int | Sequence[int] | np.random.SeedSequence

MNIST_SIZE = 28

# Distribution parameters of Appendix A.1 (pixels are MNIST pixels).
ROTATED_MAX_DEG = 90.0
RTS_MAX_DEG = 45.0
RTS_SCALE = (0.7, 1.2)
RTS_SIZE = 42
PE_SCALE = (0.75, 1.0)  # the scale drawn before the P and E warps
PROJECTIVE_CORNER_STD_PX = 5.0
PROJECTIVE_MIN_ANGLE_DEG = 10.0  # not in the paper: see _draw_projective
ELASTIC_GRID = (4, 4)
ELASTIC_POINT_STD_PX = 1.5
JITTER_GRID = (4, 4)  # training-only elastic jitter (not in the paper): see distort(jitter_px=...)
CLUTTER_SIZE = 60
CLUTTER_FRAGMENTS = 6
CLUTTER_FRAGMENT_PX = 6

# Images per call to the sampler: bounds the temporary grids at a few tens of MB.
_CHUNK = 4096


@dataclass(frozen=True)
class TaskSpec:
    """A distorted-MNIST task.

    Attributes
    ----------
    name : str
        Registry key, e.g. ``"rts"``.
    code : str
        The paper's abbreviation, e.g. ``"RTS"``.
    size : int
        Side of the square output canvas in pixels.
    description : str
        One line saying what the generator draws.
    """

    name: str
    code: str
    size: int
    description: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("rotated", "R", MNIST_SIZE, "rotation uniform in [-90, 90] degrees about the image centre; 28x28"),
        TaskSpec(
            "rts",
            "RTS",
            RTS_SIZE,
            "rotation uniform in [-45, 45] degrees, scale uniform in [0.7, 1.2], "
            "placed uniformly at random wholly inside a 42x42 canvas",
        ),
        TaskSpec(
            "projective",
            "P",
            MNIST_SIZE,
            "scale uniform in [0.75, 1], then the four corners moved by N(0, 5 px) each; projective warp, 28x28",
        ),
        TaskSpec(
            "elastic",
            "E",
            MNIST_SIZE,
            "scale uniform in [0.75, 1], then a thin-plate spline whose 4x4 control points move by N(0, 1.5 px); 28x28",
        ),
        TaskSpec(
            "cluttered",
            "TC",
            CLUTTER_SIZE,
            "digit at a uniformly random position in a 60x60 canvas with 6 random 6x6 fragments of other digits",
        ),
        # Not in the paper's table: the baseline that says what a classifier gets with no distortion at all.
        TaskSpec("plain", "U", MNIST_SIZE, "no distortion: the MNIST digit as it is (a calibration baseline); 28x28"),
    )
}


def get_task(task: str | TaskSpec) -> TaskSpec:
    """Look up a task by name (a :class:`TaskSpec` is returned as is).

    Raises
    ------
    ValueError
        For an unknown name; the message lists the valid ones.

    Examples
    --------
    >>> get_task("rts").size
    42
    """
    if isinstance(task, TaskSpec):
        return task
    if not isinstance(task, str):
        raise TypeError(f"task must be a task name, got {type(task).__name__}")
    if task not in TASKS:
        raise ValueError(f"unknown distorted-MNIST task {task!r}: expected one of {', '.join(TASKS)}")
    return TASKS[task]


# ------------------------------------------------------------------ helpers
def _as_images(images: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(images, Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (0..255), got dtype {images.dtype}")
    if images.ndim != 3 or images.shape[1:] != (MNIST_SIZE, MNIST_SIZE):
        raise ValueError(f"images must have shape (N, {MNIST_SIZE}, {MNIST_SIZE}), got {images.shape}")
    return images


def _rng(seed: SeedLike) -> np.random.Generator:
    if isinstance(seed, (bool, str)) or not isinstance(seed, (int, Sequence, np.random.SeedSequence)):
        raise TypeError(f"rng_seed must be an int, a sequence of ints or a SeedSequence, got {seed!r}")
    if isinstance(seed, int) and seed < 0:
        raise ValueError(f"rng_seed must be >= 0, got {seed}")
    return np.random.default_rng(seed)


def _rotation(angle_deg: np.ndarray) -> np.ndarray:
    """``(N, 2, 2)`` matrices turning a picture counter-clockwise on screen (y points down)."""
    a = np.deg2rad(angle_deg)
    cos, sin = np.cos(a), np.sin(a)
    return np.stack((np.stack((cos, sin), -1), np.stack((-sin, cos), -1)), -2)


def _backward_affine(angle_deg: np.ndarray, scale: np.ndarray, centre: np.ndarray, out_size: int) -> Tensor:
    """Affine ``theta`` of the backward map of "rotate and scale about the digit centre, move it to ``centre``".

    Forward, in pixel coordinates (centres at integers): ``dst = centre + scale * R(angle) (src - c)``
    with ``c`` the MNIST image centre; the backward map ``src = c + R(-angle) (dst - centre) / scale``
    is returned in the library's normalised parametrisation.
    """
    c = (MNIST_SIZE - 1) / 2.0
    inverse = np.swapaxes(_rotation(angle_deg), 1, 2) / scale[:, None, None]
    matrix = np.zeros((len(angle_deg), 3, 3))
    matrix[:, :2, :2] = inverse
    matrix[:, :2, 2] = c - np.einsum("nij,nj->ni", inverse, centre)
    matrix[:, 2, 2] = 1.0
    size = (MNIST_SIZE, MNIST_SIZE), (out_size, out_size)
    return Affine().from_pixels(torch.from_numpy(matrix), *size).float()


def well_shaped(quads: np.ndarray) -> np.ndarray:
    """Whether each ``(4, 2)`` quadrilateral (corners in order) is convex, oriented like the
    square, and has every interior angle within ``[PROJECTIVE_MIN_ANGLE_DEG, 180 - that]``.

    The P generator redraws the corner offsets of any quad that fails this test.

    Examples
    --------
    >>> well_shaped(CORNER_SQUARE[None]).tolist()
    [True]
    """
    into = quads - np.roll(quads, 1, axis=1)  # edge arriving at each corner
    out = np.roll(quads, -1, axis=1) - quads  # edge leaving it
    cross = into[..., 0] * out[..., 1] - into[..., 1] * out[..., 0]
    dot = (into * out).sum(-1)
    turn = np.degrees(np.arctan2(cross, dot))  # exterior angle; 180 - turn is the interior angle
    return ((turn >= PROJECTIVE_MIN_ANGLE_DEG) & (turn <= 180.0 - PROJECTIVE_MIN_ANGLE_DEG)).all(axis=1)


# Image corners in normalised coordinates, in the order of Projective("corners"): clockwise on
# screen from top-left. The P generator's corner offsets are relative to these, in PIXEL_NORM units.
CORNER_SQUARE = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
CORNER_SQUARE.flags.writeable = False
PIXEL_NORM = 2.0 / MNIST_SIZE  # one MNIST pixel in normalised units
_CORNERS = Projective("corners")


# -------------------------------------------------------------- generators
# Each draws its parameters (in a fixed order, the same number of draws whatever the
# images hold) and returns (theta, transform, params); the cluttered task needs no
# resampling and is built directly.
def _draw_rotated(rng: np.random.Generator, images: np.ndarray):
    n = len(images)
    angle = rng.uniform(-ROTATED_MAX_DEG, ROTATED_MAX_DEG, n)
    centre = np.full((n, 2), (MNIST_SIZE - 1) / 2.0)
    theta = _backward_affine(angle, np.ones(n), centre, MNIST_SIZE)
    return theta, Affine(), {"angle_deg": angle}


def _ink_footprints(images: np.ndarray) -> np.ndarray:
    """``(N, 4, 2)`` corners of each image's ink bounding box, grown by the 1-pixel reach of bilinear sampling.

    Pixel-centre coordinates; a blank image gets its whole frame.
    """
    cols, rows = images.any(axis=1), images.any(axis=2)  # (N, 28): columns / rows holding ink
    last = MNIST_SIZE - 1
    x0, x1 = cols.argmax(1), last - cols[:, ::-1].argmax(1)
    y0, y1 = rows.argmax(1), last - rows[:, ::-1].argmax(1)
    blank = ~cols.any(1)
    x0[blank], y0[blank], x1[blank], y1[blank] = 0, 0, last, last
    x0, y0, x1, y1 = x0 - 1.0, y0 - 1.0, x1 + 1.0, y1 + 1.0
    return np.stack([np.stack(c, -1) for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))], 1)


def _draw_rts(rng: np.random.Generator, images: np.ndarray):
    n = len(images)
    angle = rng.uniform(-RTS_MAX_DEG, RTS_MAX_DEG, n)
    scale = rng.uniform(*RTS_SCALE, n)
    position = rng.uniform(0.0, 1.0, (n, 2))
    # Where the digit's ink lands relative to the image centre, after rotation and scaling.
    c = (MNIST_SIZE - 1) / 2.0
    linear = _rotation(angle) * scale[:, None, None]
    corners = np.einsum("nij,nkj->nki", linear, _ink_footprints(images) - c)
    low = -0.5 - corners.min(axis=1)  # (N, 2): range of the centre that keeps all ink on the canvas
    high = RTS_SIZE - 0.5 - corners.max(axis=1)
    # A digit too big for the canvas (never for MNIST: at most ~37 px) is centred instead.
    too_big = low > high
    low[too_big] = high[too_big] = ((low + high) / 2.0)[too_big]
    centre = low + (high - low) * position
    theta = _backward_affine(angle, scale, centre, RTS_SIZE)
    return theta, Affine(), {"angle_deg": angle, "scale": scale, "centre": centre}


def _draw_projective(rng: np.random.Generator, images: np.ndarray):
    n = len(images)
    scale = rng.uniform(*PE_SCALE, n)
    offsets = rng.normal(0.0, PROJECTIVE_CORNER_STD_PX, (n, 4, 2))
    # Backward map, as the ST's own projective grid generator parametrises it (and as the
    # elastic task below): output corner c samples the input at (c + offset) / scale.
    # A quad that folds over has no sensible homography, and one with a corner near 0 or
    # 180 degrees squeezes the digit to a sliver: redraw those offsets, i.e. condition
    # the Gaussian on a usable warp (about 0.6% of draws).
    while True:
        quads = (CORNER_SQUARE + offsets * PIXEL_NORM) / scale[:, None, None]
        bad = ~well_shaped(quads)
        if not bad.any():
            break
        offsets[bad] = rng.normal(0.0, PROJECTIVE_CORNER_STD_PX, (int(bad.sum()), 4, 2))
    theta = torch.from_numpy((quads - CORNER_SQUARE).reshape(n, 8)).float()
    return theta, _CORNERS, {"scale": scale, "corner_offsets_px": offsets}


_TPS = ThinPlateSpline(grid_size=ELASTIC_GRID)


def _draw_elastic(rng: np.random.Generator, images: np.ndarray):
    n = len(images)
    scale = rng.uniform(*PE_SCALE, n)
    offsets = rng.normal(0.0, ELASTIC_POINT_STD_PX, (n, ELASTIC_GRID[0] * ELASTIC_GRID[1], 2))
    # Backward map: output control point p_k samples the input at (p_k + d_k) / s, i.e. the
    # spline through the perturbed points followed by the inverse of the scaling. Dividing a
    # spline by s is the spline through the divided values, so one TPS does both exactly.
    points = _TPS.control_points(dtype=torch.float64).numpy()
    theta = (points + offsets * PIXEL_NORM) / scale[:, None, None] - points
    theta = torch.from_numpy(theta.reshape(n, _TPS.num_params)).float()
    return theta, _TPS, {"scale": scale, "control_offsets_px": offsets}


def _cluttered(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    n = len(images)
    frag, size, reach = CLUTTER_FRAGMENT_PX, CLUTTER_SIZE, CLUTTER_SIZE - MNIST_SIZE
    digit_at = rng.integers(0, reach + 1, (n, 2))  # top-left (x, y) of the 28x28 frame
    # Fragments come from *other* images of the batch: a random non-zero shift of the index.
    source = (np.arange(n)[:, None] + rng.integers(1, max(n, 2), (n, CLUTTER_FRAGMENTS))) % n
    crop_at = rng.integers(0, MNIST_SIZE - frag + 1, (n, CLUTTER_FRAGMENTS, 2))
    paste_at = rng.integers(0, size - frag + 1, (n, CLUTTER_FRAGMENTS, 2))

    canvas = np.zeros((n, size, size), dtype=np.uint8)
    rows = np.arange(n)[:, None, None]
    span = np.arange(MNIST_SIZE)
    canvas[rows, digit_at[:, 1, None, None] + span[:, None], digit_at[:, 0, None, None] + span] = images
    f = np.arange(frag)
    for k in range(CLUTTER_FRAGMENTS):
        # One fragment per image per round, so the fancy-indexed writes never collide.
        piece = images[
            source[:, k, None, None], crop_at[:, k, 1, None, None] + f[:, None], crop_at[:, k, 0, None, None] + f
        ]
        ys, xs = paste_at[:, k, 1, None, None] + f[:, None], paste_at[:, k, 0, None, None] + f
        # Maximum, not overwrite: clutter never erases the digit's strokes.
        canvas[rows, ys, xs] = np.maximum(canvas[rows, ys, xs], piece)
    params = {"digit_offset": digit_at, "fragment_source": source, "fragment_crop": crop_at, "fragment_offset": paste_at}
    return canvas, params


def _draw_plain(rng: np.random.Generator, images: np.ndarray):
    # Draws nothing. Only used with the training jitter, which needs a grid to bend: without
    # it, distort() returns the digits without resampling.
    return Affine().identity(len(images)), Affine(), {}


_GENERATORS = {
    "rotated": _draw_rotated, "rts": _draw_rts, "projective": _draw_projective, "elastic": _draw_elastic, "plain": _draw_plain,
}  # fmt: skip

_JITTER_TPS = ThinPlateSpline(grid_size=JITTER_GRID)


def _check_jitter(jitter_px: float) -> float:
    if isinstance(jitter_px, bool) or not isinstance(jitter_px, (int, float)) or not np.isfinite(jitter_px) or jitter_px < 0:
        raise ValueError(f"jitter_px must be a finite number of pixels >= 0, got {jitter_px!r}")
    return float(jitter_px)


def _jittered_grid(grid: Tensor, jitter_theta: Tensor) -> Tensor:
    """Follow the task's backward ``grid`` ``(n, H, W, 2)`` by the jitter spline: the digit is jittered first.

    The spline's displacement is computed on the 28x28 source lattice (a cached
    linear map, fast) and read at the task's points bilinearly, with border
    padding. Evaluating the spline exactly at every task point makes a
    60,000-digit epoch ~10x slower, and moves no point inside the image by more
    than 0.2 px at ``jitter_px=1``: the spline is smooth.
    """
    lattice = (MNIST_SIZE, MNIST_SIZE)
    displacement = _JITTER_TPS.grid(jitter_theta, lattice) - _JITTER_TPS.grid(_JITTER_TPS.identity(1), lattice)
    moved = sample(displacement.permute(0, 3, 1, 2), grid, padding_mode="border")
    return grid + moved.permute(0, 2, 3, 1)


def distort(
    images: np.ndarray | Tensor,
    task: str | TaskSpec,
    rng_seed: SeedLike,
    *,
    return_params: bool = False,
    device: str | torch.device | None = None,
    jitter_px: float = 0.0,
) -> Tensor | tuple[Tensor, dict[str, np.ndarray]]:
    """Distort MNIST digits as in Appendix A.1 of Jaderberg et al. (2015).

    Implements the paper's R, RTS, P and E generators and translated-cluttered
    MNIST (see the module docstring and ``docs/distorted_mnist_protocol.md``).

    Parameters
    ----------
    images : numpy.ndarray or torch.Tensor
        ``uint8`` digits of shape ``(N, 28, 28)``.
    task : str or TaskSpec
        One of :data:`TASKS`: ``"rotated"``, ``"rts"``, ``"projective"``, ``"elastic"``, ``"cluttered"``,
        or ``"plain"`` (no distortion, a calibration baseline outside the paper's table).
    rng_seed : int, sequence of int or numpy.random.SeedSequence
        Seed of the generator drawing every random parameter. The same
        images, task and seed always give the same output.
    return_params : bool
        Also return the parameters drawn for each image (angles in degrees,
        scales, offsets in pixels; keys depend on the task).
    device : str or torch.device, optional
        Warp on this device (default: the CPU) and return the images there.
        The random parameters are always drawn on the CPU from ``rng_seed``, so a
        device changes the output only by float rounding; on a GPU it spares a
        training run the CPU warp of every epoch. Test sets are best made on the
        CPU, so that every machine scores the same images.
    jitter_px : float
        Training augmentation, **not part of the paper's protocol**: before the
        task's distortion, bend each digit by a thin-plate spline whose 4x4
        control points move by N(0, ``jitter_px``) MNIST pixels (the E task's
        warp, without its scaling). 0 (the default) adds nothing. The jitter is
        drawn after, and independently of, the task's parameters, so the
        task's draws are the same with and without it; both warps are composed
        into one bilinear sampling, so jitter adds no extra blur. Not available
        for ``"cluttered"``, which does not resample.

    Returns
    -------
    torch.Tensor
        ``float32`` of shape ``(N, 1, S, S)`` in ``[0, 1]``, ``S = TASKS[task].size``.
    dict of numpy.ndarray
        Only with ``return_params``.

    Raises
    ------
    ValueError
        For an unknown task (listing the valid ones) or images of the wrong shape.
    TypeError
        For images that are not uint8, or a seed that is not an integer seed.

    Examples
    --------
    >>> import numpy as np
    >>> digits = np.zeros((2, 28, 28), dtype=np.uint8)
    >>> distort(digits, "rts", rng_seed=0).shape
    torch.Size([2, 1, 42, 42])
    """
    spec = get_task(task)
    images = _as_images(images)
    jitter_px = _check_jitter(jitter_px)
    rng = _rng(rng_seed)
    n = len(images)
    if spec.name == "cluttered":
        if jitter_px:
            raise ValueError("jitter_px: the cluttered task pastes digits without resampling; use jitter_px=0")
        canvas, params = _cluttered(images, rng)
        out = torch.from_numpy(canvas).unsqueeze(1).float().div_(255.0)
        return (out, params) if return_params else out

    device = torch.device("cpu") if device is None else torch.device(device)
    if spec.name == "plain" and not jitter_px:
        out = torch.from_numpy(images).unsqueeze(1).to(device).float().div_(255.0)  # exact: no resampling
        return (out, {}) if return_params else out

    theta, transform, params = _GENERATORS[spec.name](rng, images)
    jitter_theta = None
    if jitter_px:
        # Drawn after the task's parameters, so those are the same with and without jitter.
        offsets = rng.normal(0.0, jitter_px, (n, _JITTER_TPS.num_control_points, 2))
        params["jitter_offsets_px"] = offsets
        jitter_theta = torch.from_numpy(offsets.reshape(n, _JITTER_TPS.num_params) * PIXEL_NORM).float().to(device)
    out_size = (spec.size, spec.size)
    out = torch.empty(n, 1, *out_size, device=device)
    source = torch.from_numpy(images).unsqueeze(1).to(device)
    theta = theta.to(device)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        batch = source[start:stop].float().div_(255.0)
        if jitter_theta is None:
            out[start:stop] = warp(batch, theta[start:stop], transform, out_size=out_size)
        else:
            grid = _jittered_grid(transform.grid(theta[start:stop], out_size), jitter_theta[start:stop])
            out[start:stop] = sample(batch, grid)
    # Bilinear weights are convex, so only float rounding can leave [0, 1].
    out.clamp_(0.0, 1.0)
    return (out, params) if return_params else out


class DistortedMNIST:
    """A distorted-MNIST split, regenerated each training epoch.

    The training split is redrawn every epoch from the seed ``seed + epoch``;
    the test split is drawn once, from ``seed``, and is the same for every
    epoch. Keep the test seed fixed (the default 0) to compare runs.

    Parameters
    ----------
    task : str
        One of :data:`TASKS`.
    split : {"train", "test"}
    root : str or os.PathLike, optional
        Data root for :func:`stnkit.data.datasets.load_mnist` (ignored when ``images`` is given).
    seed : int
        Base seed, ``>= 0``.
    images, labels : numpy.ndarray, optional
        Use these ``uint8 (N, 28, 28)`` digits and their labels instead of loading MNIST
        (e.g. :func:`stnkit.data.digits.load_digit_sample`).
    jitter_px : float
        Training split only: the elastic jitter of :func:`distort` (not part of
        the paper's protocol; 0, the default, adds none). Test sets are always
        made exactly as the protocol says.

    Examples
    --------
    >>> from stnkit.data.digits import load_digit_sample
    >>> images, labels = load_digit_sample("test")
    >>> data = DistortedMNIST("rts", "test", images=images, labels=labels)
    >>> x, y = data.epoch(0)
    >>> x.shape, y.dtype
    (torch.Size([2000, 1, 42, 42]), torch.int64)
    """

    def __init__(
        self,
        task: str,
        split: str = "train",
        root: str | PathLike | None = None,
        seed: int = 0,
        images: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        jitter_px: float = 0.0,
    ) -> None:
        self.spec = get_task(task)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
        jitter_px = _check_jitter(jitter_px)
        if jitter_px and split == "test":
            raise ValueError("jitter_px is a training augmentation: test sets are made as the protocol says, without it")
        if jitter_px and self.spec.name == "cluttered":
            raise ValueError("jitter_px: the cluttered task pastes digits without resampling; use jitter_px=0")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        if (images is None) != (labels is None):
            raise ValueError("give both images and labels, or neither (to load MNIST)")
        if images is None:
            images, labels = load_mnist(split, root)
        images = _as_images(images)
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be {len(images)} integers, got {labels.dtype} array of shape {labels.shape}")
        self.task = self.spec.name
        self.split = split
        self.seed = seed
        self.jitter_px = jitter_px
        self.images = images
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self._fixed: Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> int:
        """Side of the output images."""
        return self.spec.size

    def epoch_seed(self, epoch_index: int) -> np.random.SeedSequence:
        """The seed of an epoch: ``seed + epoch`` for train, ``seed`` for test.

        The split is mixed in as a second word, so a train epoch and the test
        set never share their random draws.
        """
        if isinstance(epoch_index, bool) or not isinstance(epoch_index, int) or epoch_index < 0:
            raise ValueError(f"epoch_index must be an integer >= 0, got {epoch_index!r}")
        if self.split == "test":
            return np.random.SeedSequence([self.seed, 1])
        return np.random.SeedSequence([self.seed + epoch_index, 0])

    def epoch(self, epoch_index: int = 0, device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
        """The distorted images and labels of one epoch.

        Parameters
        ----------
        epoch_index : int
            The epoch, ``>= 0`` (ignored by the test split, which is fixed).
        device : str or torch.device, optional
            Warp the training split on this device (see :func:`distort`). The test
            split is always made on the CPU, then moved, so it is the same everywhere.

        Returns
        -------
        x : torch.Tensor
            ``float32 (N, 1, S, S)`` in ``[0, 1]``. For the test split this is
            the same cached tensor every call: do not modify it in place.
        y : torch.Tensor
            ``int64 (N,)``.

        Examples
        --------
        >>> x, y = DistortedMNIST("rotated", "train").epoch(3)  # doctest: +SKIP
        """
        seed = self.epoch_seed(epoch_index)
        if self.split == "test":
            if self._fixed is None:
                self._fixed = distort(self.images, self.spec, seed)
            if device is None:
                return self._fixed, self.labels
            return self._fixed.to(device), self.labels.to(device)
        x = distort(self.images, self.spec, seed, device=device, jitter_px=self.jitter_px)
        return x, self.labels.to(x.device)

    def __repr__(self) -> str:
        jitter = f", jitter_px={self.jitter_px}" if self.jitter_px else ""
        return f"DistortedMNIST(task={self.task!r}, split={self.split!r}, seed={self.seed}{jitter}, n={len(self)})"
