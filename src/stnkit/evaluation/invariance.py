"""Measure how invariant a model is to a transformation, and where an STN stops giving invariance.

After Finnveden, Jansson & Lindeberg, "Understanding when spatial transformer
networks do not support invariance, and what to do about it" (ICPR 2020).
For test images ``x`` and transformed copies ``T x`` over a range of the
transformation's parameter, :func:`measure_invariance` reports:

* **test error** of the model on ``T x``;
* **transformer-output distance**: how differently the transformer
  canonicalises ``T x`` and ``x``, ``D(A(T x), A(x))`` with ``A`` the
  transformer's output (the input itself when there is no transformer);
* **feature-map distance**: the same for the feature maps the classifier's
  last layer reads;
* **corner error** (input transformers with a matrix family only): how well the
  predicted transform undoes ``T``. Along the path ``T x`` the canonical frame
  samples ``x`` at ``M_T M_{Tx} p``, along the path ``x`` at ``M_x p``; the error
  is the mean distance between the two for the four image corners ``p``, in
  pixels of ``x``. A perfect canonicaliser gives 0.

The distance is the normalised squared distance

``D(a, b) = sum_i ||a_i - b_i||^2 / sum_i ||b_i||^2``

over the test images ``i`` (a ratio of sums, so faint images do not dominate):
0 for a perfect canonicaliser, and about 2 for unrelated maps of equal
energy. The paper compares the feature maps after the transformer for an
image and its transformed copy with a normalised Euclidean distance; its exact
normalisation could not be checked here, so read our numbers for their
ordering, not against the paper's values (see ``docs/invariance.md``).

Convention: every transformation ``T`` is applied with :func:`stnkit.warp`
as a backward map in normalised coordinates (:mod:`stnkit.transforms.base`):
``rotation`` by ``value`` degrees turns the content anticlockwise on screen
about the image centre; ``translation`` moves it ``value`` pixels to the
right; ``scale`` enlarges it by the factor ``value`` about the centre. Zero
padding outside the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..sampling import warp
from ..transforms import Affine, MatrixTransform, Rotation

__all__ = [
    "TRANSFORM_KINDS",
    "DEFAULT_RANGES",
    "InvarianceRow",
    "InvarianceReport",
    "transformation_matrix",
    "transform_images",
    "normalised_distance",
    "model_views",
    "measure_invariance",
    "canvas_digits",
    "canonical_spread",
    "SPREAD_UNITS",
    "feature_transform_gap",
]

#: The transformations :func:`measure_invariance` sweeps, and their units.
TRANSFORM_KINDS: dict[str, str] = {"rotation": "degrees", "translation": "pixels", "scale": "factor"}
#: Default parameter range of each kind.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {"rotation": (-90.0, 90.0), "translation": (-6.0, 6.0), "scale": (0.7, 1.4)}
#: Unit of :func:`canonical_spread` for each kind.
SPREAD_UNITS: dict[str, str] = {"rotation": "degrees", "translation": "pixels", "scale": "log-scale (std of ln s)"}
#: The parameter value of each kind that is the identity.
IDENTITY_VALUES: dict[str, float] = {"rotation": 0.0, "translation": 0.0, "scale": 1.0}

Views = Mapping[str, Tensor | None]


def _check_kind(kind: str) -> str:
    if not isinstance(kind, str) or kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transformation {kind!r}; expected one of {', '.join(TRANSFORM_KINDS)}")
    return kind


def transformation_matrix(kind: str, value: float, size: Sequence[int]) -> Tensor:
    """The ``(3, 3)`` float64 backward matrix of a transformation of an image of ``size``.

    Parameters
    ----------
    kind : {"rotation", "translation", "scale"}
        See the module docstring for what each does to the content.
    value : float
        Degrees, pixels (of ``size``) or a factor (> 0).
    size : (int, int)
        ``(height, width)`` of the image (the translation is in its pixels).

    Returns
    -------
    Tensor
        Maps normalised output points to normalised input points.

    Convention: backward map, normalised coordinates (``-1``/``+1`` at the
    image edges), as :mod:`stnkit.transforms.base`.

    Examples
    --------
    >>> transformation_matrix("scale", 2.0, (28, 28))[0, 0].item()
    0.5
    >>> transformation_matrix("translation", 7.0, (28, 28))[0, 2].item()  # content moves right
    -0.5
    """
    kind = _check_kind(kind)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"value must be a finite number, got {value!r}")
    height, width = int(size[0]), int(size[1])
    if kind == "rotation":
        theta = torch.tensor([[math.radians(value), 0.0, 0.0]], dtype=torch.float64)
        return Rotation().matrix(theta)[0]
    matrix = torch.eye(3, dtype=torch.float64)
    if kind == "translation":
        matrix[0, 2] = -2.0 * value / width
    else:
        if value <= 0:
            raise ValueError(f"a scale factor must be positive, got {value}")
        matrix[0, 0] = matrix[1, 1] = 1.0 / value
    return matrix


def transform_images(x: Tensor, kind: str, value: float) -> Tensor:
    """Apply the transformation ``kind`` with parameter ``value`` to a batch ``(N, C, H, W)``.

    Convention: see :func:`transformation_matrix`; bilinear sampling, zero padding.

    Examples
    --------
    >>> x = torch.zeros(1, 1, 4, 4); x[0, 0, 0, 0] = 1.0
    >>> transform_images(x, "rotation", 90.0)[0, 0, 3, 0].item()  # top-left corner turns to bottom-left
    1.0
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    matrix = transformation_matrix(kind, value, x.shape[-2:])
    theta = Affine().from_matrix(matrix[None]).to(x.dtype).expand(len(x), 6)
    return warp(x, theta, Affine())


def normalised_distance(a: Tensor, b: Tensor) -> float:
    """``sum ||a - b||^2 / sum ||b||^2``: 0 when ``a == b``, 1 when ``a`` is zero.

    Parameters
    ----------
    a, b : Tensor
        Same shape; ``b`` is the reference (the maps of the untransformed images).

    Raises
    ------
    ValueError
        On a shape mismatch or a reference that is all zero.

    Examples
    --------
    >>> normalised_distance(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
    1.0
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare maps of shape {tuple(a.shape)} and {tuple(b.shape)}")
    squared, reference = _squared_sums(a, b)
    if reference == 0:
        raise ValueError("the reference maps are all zero: the normalised distance is undefined")
    return squared / reference


def _squared_sums(a: Tensor, b: Tensor) -> tuple[float, float]:
    a, b = a.double(), b.double()
    return float(((a - b) ** 2).sum()), float((b**2).sum())


def model_views(model: nn.Module, x: Tensor) -> dict[str, Tensor | None]:
    """The maps :func:`measure_invariance` compares, for any classifier.

    * a model with an ``invariance_views(x)`` method (e.g.
      :class:`~stnkit.models.invariance_models.InvarianceClassifier`) gives them itself;
    * an :class:`~stnkit.models.STClassifier` (the ST paper's models): the
      transformer's output, the features its last linear layer reads, and the
      input transformer's matrix;
    * any other model: its logits only; the "transformer output" is the input
      itself (an identity transformer) and there are no feature maps.

    Returns
    -------
    dict
        ``"logits"`` ``(N, K)``, ``"transformer_output"``, ``"features"`` (or
        ``None``), ``"matrix"`` ``(N, 3, 3)`` backward matrices (or ``None``).

    Examples
    --------
    >>> sorted(model_views(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.rand(3, 1, 2, 2)))
    ['features', 'logits', 'matrix', 'transformer_output']
    """
    views = getattr(model, "invariance_views", None)
    if callable(views):
        return dict(views(x))
    from ..models.classifiers import STClassifier  # models import evaluation-free modules only

    if isinstance(model, STClassifier):
        transformed = model.transform_input(x)
        classifier = model.classifier
        if isinstance(classifier, nn.Sequential) and len(classifier) > 1:
            features = classifier[:-1](transformed)
            logits = classifier[-1](features)
        else:
            features, logits = None, classifier(transformed)
        matrix = None
        transformer = model.transformer
        if transformer is not None and isinstance(transformer.transform, MatrixTransform):
            matrix = transformer.transform.matrix(transformer.last_theta)
        return {"transformer_output": transformed, "features": features, "logits": logits, "matrix": matrix}
    logits = model(x)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return {"transformer_output": x, "features": None, "logits": logits, "matrix": None}


@dataclass
class InvarianceRow:
    """The measures at one parameter value (``None`` where a measure does not apply)."""

    value: float
    error: float | None
    transformer_distance: float | None
    feature_distance: float | None
    corner_error_px: float | None


@dataclass
class InvarianceReport:
    """What :func:`measure_invariance` returns: one :class:`InvarianceRow` per parameter value.

    Attributes
    ----------
    transform : str
        The transformation swept.
    unit : str
        Unit of the values.
    count : int
        Number of test images.
    rows : list of InvarianceRow
    canonical_spread : float or None
        Input transformers with a matrix family only: how much the canonical
        frame of each image moves over the sweep, averaged over the images
        (see :func:`canonical_spread`); 0 for a perfect canonicaliser.
    """

    transform: str
    unit: str
    count: int
    rows: list[InvarianceRow] = field(default_factory=list)
    canonical_spread: float | None = None

    def column(self, name: str) -> list[float | None]:
        """One measure over the sweep, e.g. ``report.column("error")``."""
        return [getattr(row, name) for row in self.rows]

    def mean(self, name: str) -> float | None:
        """Mean of a measure over the sweep (``None`` when it does not apply)."""
        values = [v for v in self.column(name) if v is not None]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"transform": self.transform, "unit": self.unit, "count": self.count,
                "rows": [asdict(r) for r in self.rows], "canonical_spread": self.canonical_spread}

    def table(self) -> str:
        """A plain-text table, one line per parameter value."""

        def fmt(value: float | None, scale: float = 1.0, digits: int = 4) -> str:
            return "-" if value is None else f"{value * scale:.{digits}f}"

        header = f"{self.transform + ' (' + self.unit + ')':>20} {'error %':>8} {'D(transformer)':>15} {'D(features)':>12} {'corner px':>10}"
        lines = [header]
        for row in self.rows:
            lines.append(
                f"{row.value:>20.3g} {fmt(row.error, 100, 2):>8} {fmt(row.transformer_distance):>15} "
                f"{fmt(row.feature_distance):>12} {fmt(row.corner_error_px, digits=2):>10}"
            )
        lines.append(
            f"{'mean':>20} {fmt(self.mean('error'), 100, 2):>8} {fmt(self.mean('transformer_distance')):>15} "
            f"{fmt(self.mean('feature_distance')):>12} {fmt(self.mean('corner_error_px'), digits=2):>10}"
        )
        if self.canonical_spread is not None:
            lines.append(f"canonical spread: {self.canonical_spread:.3f} {SPREAD_UNITS[self.transform]}")
        return "\n".join(lines)

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Write error, distances and corner error against the parameter to an image file."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        values = self.column("value")
        panels = [("error", "test error"), ("transformer_distance", "D(transformer output)"),
                  ("feature_distance", "D(feature maps)"), ("corner_error_px", "corner error (px)")]
        panels = [(key, label) for key, label in panels if any(v is not None for v in self.column(key))]
        figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
        for axis, (key, label) in zip(axes[0], panels):
            column = [np.nan if v is None else v for v in self.column(key)]
            axis.plot(values, column, marker="o", markersize=3)
            axis.set_xlabel(f"{self.transform} ({self.unit})")
            axis.set_title(label, fontsize=10)
            axis.grid(alpha=0.3)
        if title:
            figure.suptitle(title, fontsize=10)
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path


def canonical_spread(kind: str, composed: Tensor, size: Sequence[int]) -> float:
    """How much each image's canonical frame moves over a sweep, averaged over the images.

    After Finnveden, Jansson & Lindeberg's measure of how consistently an STN
    undoes a transformation (their code reports the spread of the applied plus
    the predicted transformation around each image's mean). ``composed[v, i]``
    is the backward map canonical frame -> ``x_i`` along the path ``T_v x_i``
    (``M_T M_{T x}``); a perfect canonicaliser gives the same map for every
    ``v``. The spread is, per image, the standard deviation over ``v`` of the
    canonical frame's
    * rotation angle (circular standard deviation, degrees) for ``"rotation"``;
    * centre position (pixels of ``size``, root of the summed x and y variances) for ``"translation"``;
    * log scale, ``ln sqrt(|det A|)``, for ``"scale"``;
    then averaged over the images.

    Args:
        kind: ``"rotation"``, ``"translation"`` or ``"scale"``.
        composed: ``(V, N, 3, 3)`` float matrices, normalised coordinates.
        size: ``(H, W)`` of the images.

    Examples
    --------
    >>> same = torch.eye(3).expand(5, 2, 3, 3)
    >>> canonical_spread("rotation", same, (28, 28))
    0.0
    """
    kind = _check_kind(kind)
    if composed.dim() != 4 or composed.shape[-2:] != (3, 3):
        raise ValueError(f"composed must be (V, N, 3, 3), got {tuple(composed.shape)}")
    a = composed.double()
    if kind == "rotation":
        angle = torch.atan2(a[..., 1, 0] - a[..., 0, 1], a[..., 0, 0] + a[..., 1, 1])  # (V, N)
        resultant = torch.stack((angle.cos().mean(0), angle.sin().mean(0))).norm(dim=0).clamp(1e-12, 1.0)
        return float(torch.rad2deg(torch.sqrt(-2.0 * torch.log(resultant))).mean())
    if kind == "translation":
        centre = a[..., :2, 2] / a[..., 2:, 2]  # where the canonical centre lands, normalised
        pixels = centre * torch.tensor([size[1] / 2.0, size[0] / 2.0], dtype=torch.float64)
        return float(pixels.var(dim=0, unbiased=False).sum(-1).sqrt().mean())
    log_scale = 0.5 * torch.log(torch.linalg.det(a[..., :2, :2]).abs().clamp_min(1e-300))
    return float(log_scale.std(dim=0, unbiased=False).mean())


def _corner_errors(m_transform: Tensor, m_transformed: Tensor, m_original: Tensor, size: Sequence[int]) -> Tensor:
    """Mean corner distance (pixels) between ``M_T M_{Tx}`` and ``M_x`` per image."""
    height, width = int(size[0]), int(size[1])
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]], dtype=torch.float64).T
    along_t = m_transform @ m_transformed.double() @ corners
    along_x = m_original.double() @ corners
    along_t, along_x = along_t[:, :2] / along_t[:, 2:], along_x[:, :2] / along_x[:, 2:]
    pixels = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64).view(1, 2, 1)
    return ((along_t - along_x) * pixels).norm(dim=1).mean(dim=1)


@torch.no_grad()
def measure_invariance(
    model: nn.Module | None,
    images: Tensor,
    labels: Tensor | None = None,
    transform: str = "rotation",
    values: Sequence[float] | None = None,
    *,
    steps: int = 13,
    batch_size: int = 250,
    views: Callable[[Tensor], Views] | None = None,
) -> InvarianceReport:
    """Sweep a transformation over test images and measure error and canonicalisation consistency.

    Parameters
    ----------
    model : nn.Module or None
        The classifier (put in eval mode for the measurement, then back). May
        be ``None`` when ``views`` is given.
    images : Tensor
        ``(N, C, H, W)`` test images ``x`` (e.g. undistorted digits, see :func:`canvas_digits`).
    labels : Tensor, optional
        ``(N,)`` integer labels; without them the error is not measured.
    transform : {"rotation", "translation", "scale"}
        The transformation ``T`` (see the module docstring).
    values : sequence of float, optional
        Parameter values; default ``steps`` values evenly over
        :data:`DEFAULT_RANGES`.
    steps : int
        Number of values when ``values`` is not given.
    batch_size : int
        Images per forward pass. The maps of ``x`` are kept for the whole sweep.
    views : callable, optional
        ``views(x) -> dict`` with ``"transformer_output"``, ``"features"``,
        ``"logits"`` and ``"matrix"`` (any may be ``None``); defaults to
        :func:`model_views` of ``model``. Use it to measure any model.

    Returns
    -------
    InvarianceReport

    Convention: ``"matrix"`` views are backward maps (canonical output frame ->
    input), normalised coordinates; the corner error is in pixels of ``images``.

    Examples
    --------
    >>> x = torch.rand(4, 1, 28, 28)
    >>> report = measure_invariance(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), x,
    ...                             torch.zeros(4, dtype=torch.long), "rotation", [0.0, 90.0])
    >>> report.rows[0].transformer_distance < 1e-10  # the identity transformer, T = identity
    True
    """
    kind = _check_kind(transform)
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a floating (N, C, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}")
    if len(images) == 0:
        raise ValueError("images is empty")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (len(images),)):
        raise ValueError(f"labels must be a ({len(images)},) tensor, got {getattr(labels, 'shape', type(labels).__name__)}")
    if values is None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        low, high = DEFAULT_RANGES[kind]
        values = np.linspace(low, high, steps).tolist()
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values is empty")
    if views is None:
        if model is None:
            raise ValueError("give a model, or views=")
        views = lambda batch: model_views(model, batch)  # noqa: E731
    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    else:
        device = torch.device("cpu")
    try:
        batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        base = [_to_cpu(views(batch.to(device))) for batch in batches]
        report = InvarianceReport(kind, TRANSFORM_KINDS[kind], len(images))
        composed: list[Tensor] = []  # per value: (N, 3, 3) canonical frame -> x, for the spread
        for value in values:
            m_transform = transformation_matrix(kind, value, images.shape[-2:])
            wrong = 0
            sums = {"transformer_output": [0.0, 0.0], "features": [0.0, 0.0]}
            corner_sum, corner_count = 0.0, 0
            frames: list[Tensor] = []
            for index, (batch, reference) in enumerate(zip(batches, base)):
                current = _to_cpu(views(transform_images(batch, kind, value).to(device)))
                if labels is not None:
                    target = labels[index * batch_size : index * batch_size + len(batch)]
                    wrong += int((current["logits"].argmax(dim=1) != target).sum())
                for key, total in sums.items():
                    if current.get(key) is not None and reference.get(key) is not None:
                        squared, norm = _squared_sums(current[key], reference[key])
                        total[0] += squared
                        total[1] += norm
                if current.get("matrix") is not None and reference.get("matrix") is not None:
                    errors = _corner_errors(m_transform, current["matrix"], reference["matrix"], images.shape[-2:])
                    corner_sum += float(errors.sum())
                    corner_count += len(errors)
                    frames.append(m_transform @ current["matrix"].double())
            if frames and len(frames) == len(batches):
                composed.append(torch.cat(frames))

            def ratio(key: str) -> float | None:
                squared, norm = sums[key]
                return None if norm == 0 else squared / norm

            report.rows.append(
                InvarianceRow(
                    value=value,
                    error=None if labels is None else wrong / len(images),
                    transformer_distance=ratio("transformer_output"),
                    feature_distance=ratio("features"),
                    corner_error_px=corner_sum / corner_count if corner_count else None,
                )
            )
        if len(composed) == len(values) and len(values) > 1:
            report.canonical_spread = canonical_spread(kind, torch.stack(composed), images.shape[-2:])
    finally:
        if model is not None:
            model.train(was_training)
    return report


def _to_cpu(views: Views) -> dict[str, Tensor | None]:
    return {key: (None if value is None else value.detach().cpu()) for key, value in views.items()}


def canvas_digits(images: np.ndarray | Tensor, size: int) -> Tensor:
    """Undistorted ``uint8 (N, 28, 28)`` digits as float images ``(N, 1, size, size)`` in [0, 1], centred.

    The reference images ``x`` of an invariance sweep: MNIST test digits as
    they are, padded with zeros to a task's canvas (28 for rotated MNIST, 42 for RTS).

    Examples
    --------
    >>> canvas_digits(np.full((2, 28, 28), 255, np.uint8), 42)[0, 0, 7:35, 7:35].min().item()
    1.0
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, Tensor) or images.dim() != 3:
        raise ValueError(f"images must be (N, H, W), got {getattr(images, 'shape', type(images).__name__)}")
    height, width = images.shape[-2:]
    if isinstance(size, bool) or not isinstance(size, int) or size < max(height, width):
        raise ValueError(f"size must be an integer >= {max(height, width)} (the digits' size), got {size!r}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    top, left = (size - height) // 2, (size - width) // 2
    out = torch.zeros(len(x), 1, size, size)
    out[:, 0, top : top + height, left : left + width] = x
    return out


@torch.no_grad()
def feature_transform_gap(features: nn.Module, x: Tensor, kind: str = "rotation", value: float = 90.0) -> dict[str, float]:
    """The ICPR 2020 argument in numbers: warping feature maps cannot undo a transformation of the input.

    With ``Γ = features`` and ``T`` the transformation, an STN acting on the
    feature maps can at best output ``T^-1 Γ(T x)``; an STN acting on the input
    outputs ``Γ(T^-1 T x)``. Both are compared with ``Γ(x)``, the maps of the
    untransformed image, using :func:`normalised_distance`, with the *true*
    inverse (a perfect localisation net).

    Parameters
    ----------
    features : nn.Module
        A feature extractor ``(N, C, H, W) -> (N, C', H', W')`` that keeps the
        frame (padded convolutions; pooling windows that tile the image evenly).
    x : Tensor
        ``(N, C, H, W)`` images.
    kind, value : str, float
        The transformation, as in :func:`transform_images`. Rotations by
        multiples of 90 degrees of square images with even sides are exact on
        the pixel grid, so the input path gives 0 up to rounding.

    Returns
    -------
    dict
        ``"feature_maps"``: ``D(T^-1 Γ(T x), Γ(x))``, large unless the
        features are themselves invariant; ``"input"``: ``D(Γ(T^-1 T x), Γ(x))``.

    Examples
    --------
    >>> torch.manual_seed(0) and None
    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    >>> gap = feature_transform_gap(net, torch.rand(2, 1, 8, 8))
    >>> gap["input"] < 1e-10 < 0.1 < gap["feature_maps"]
    True
    """
    was_training = features.training
    features.eval()
    try:
        reference = features(x)
        transformed = transform_images(x, kind, value)
        # T^-1 as the inverse normalised matrix: the same map for images and for
        # feature maps of any resolution (they share the normalised frame).
        inverse = Affine().from_matrix(transformation_matrix(kind, value, x.shape[-2:]).inverse()[None])

        def undo(maps: Tensor) -> Tensor:
            return warp(maps, inverse.to(maps.dtype).expand(len(maps), 6), Affine())

        return {
            "feature_maps": normalised_distance(undo(features(transformed)), reference),
            "input": normalised_distance(features(undo(transformed)), reference),
        }
    finally:
        features.train(was_training)
