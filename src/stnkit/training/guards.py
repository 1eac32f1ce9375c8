"""Collapse guards: notice when a spatial transformer stops showing the input, before training is lost.

A spatial transformer can *collapse* while the loss stays finite: the
localisation net runs the scale to zero (the output is one magnified pixel) or
to infinity (the input shrinks to a dot), or moves the window off the image,
and the output goes blank. The classifier behind it then sees nothing, the
gradients to the localisation net vanish, and the run never recovers. The
classic symptom is the PyTorch STN tutorial's head without bounds trained with
too high a localisation learning rate.

:class:`CollapseGuard` watches every :class:`~stnkit.modules.SpatialTransformer`
inside a model through forward hooks (no extra computation beyond a few
reductions of tensors that already exist) and flags a training step when, for
at least ``max_bad_fraction`` of the batch,

* the warped output's standard deviation falls below ``min_std_ratio`` times
  that of the input image (the output went blank or flat), or
* ``|det|`` of the linear part of a matrix transform leaves
  ``[min_det, max_det]`` (scale running to zero or infinity), or
* ``theta`` is not finite (for any image: diverged weights). Such rows are
  replaced by the identity before the warp, which would otherwise stop the
  run with ``ValueError: theta contains NaN or Inf``; the step is flagged, so
  nothing computed from the replacement is ever applied.

Recovery policy
---------------
The guard only *detects*; :class:`~stnkit.training.trainer.Trainer` treats a
flagged step exactly like a step with a non-finite loss, so there is a single
policy for both: the step is skipped (no weight update) and logged; after
``max_nonfinite`` bad steps in a row the trainer restores the last good state
(the one written with the last checkpoint, never one taken while steps were
being skipped) and halves the localisation learning rate, and logs that too.
Every detection is also kept in :attr:`CollapseGuard.events`.

Examples
--------
>>> import torch
>>> from stnkit.models.classifiers import classifier
>>> model = classifier("st-cnn", "affine", (28, 28))
>>> guard = CollapseGuard().attach(model)
>>> _ = model.train()(torch.rand(4, 1, 28, 28))
>>> guard.check(step=1) is None  # the identity transform is healthy
True
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from stnkit.transforms import MatrixTransform
from stnkit.transforms.base import deferred_value_checks

__all__ = ["CollapseGuard", "GuardEvent", "linear_determinant"]

logger = logging.getLogger(__name__)


@dataclass
class GuardEvent:
    """One flagged training step: where, and why (``reason`` is one line)."""

    step: int
    reason: str
    stats: dict[str, float] = field(default_factory=dict)


def linear_determinant(transform: MatrixTransform, theta: Tensor) -> Tensor:
    """``det`` of the 2x2 linear part of each matrix ``(B,)``, after scaling ``h33`` to 1.

    For the backward maps used here, ``|det| < 1`` samples a smaller input
    region (zoom in) and ``|det| > 1`` a larger one (zoom out); for a
    homography it is the local area change at the output centre.

    Examples
    --------
    >>> from stnkit.transforms import Affine
    >>> linear_determinant(Affine(), torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.5, 0.0]])).tolist()
    [0.25]
    """
    with torch.no_grad():
        matrix = transform.matrix(theta.detach().to(torch.float64))
        bottom = matrix[:, 2, 2]
        # h33 == 0 (a centre on the horizon) has no finite linear part: report inf, i.e. "collapsed".
        safe = torch.where(bottom == 0, torch.ones_like(bottom), bottom)
        det = torch.linalg.det(matrix[:, :2, :2]) / (safe * safe)
        return torch.where(bottom == 0, torch.full_like(det, math.inf), det)


class CollapseGuard:
    """Detect transform collapse and non-finite parameters in the spatial transformers of a model.

    Parameters
    ----------
    min_std_ratio : float
        An image counts as blank when ``std(output) < min_std_ratio * std(input)``.
        Per image, so a batch with a few faint digits is not flagged; images
        whose input is itself constant are ignored.
    min_det, max_det : float
        Allowed range of ``|det|`` of the linear part of matrix transforms
        (``1e-2``: a window a tenth of the image wide; ``1e2``: the image shrunk
        to a tenth of its width).
    max_bad_fraction : float
        Flag the step when at least this fraction of the batch is bad.

    Attributes
    ----------
    events : list of GuardEvent
        Every flagged step, in order.

    Notes
    -----
    Only the forward passes in training mode are looked at. Families that
    are not matrices (TPS, displacement fields) are checked by the blank-output
    test only. For the thresholds' defaults, a healthy ST-CNN on RTS-distorted
    MNIST stays near ``|det|`` 0.2-1.5 and a std ratio above 0.5.
    """

    def __init__(
        self,
        min_std_ratio: float = 0.1,
        min_det: float = 1e-2,
        max_det: float = 1e2,
        max_bad_fraction: float = 0.5,
    ) -> None:
        for name, value in (("min_std_ratio", min_std_ratio), ("min_det", min_det), ("max_det", max_det),
                            ("max_bad_fraction", max_bad_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"CollapseGuard: {name} must be a finite number, got {value!r}")
        if not 0 <= min_std_ratio < 1:
            raise ValueError(f"CollapseGuard: min_std_ratio must be in [0, 1), got {min_std_ratio}")
        if not 0 < min_det < 1 < max_det:
            raise ValueError(f"CollapseGuard: need 0 < min_det < 1 < max_det, got min_det={min_det}, max_det={max_det}")
        if not 0 < max_bad_fraction <= 1:
            raise ValueError(f"CollapseGuard: max_bad_fraction must be in (0, 1], got {max_bad_fraction}")
        self.min_std_ratio = float(min_std_ratio)
        self.min_det = float(min_det)
        self.max_det = float(max_det)
        self.max_bad_fraction = float(max_bad_fraction)
        self.events: list[GuardEvent] = []
        self._pending: list[dict[str, float]] = []
        self._handles: list[Any] = []

    # ------------------------------------------------------------ wiring
    def attach(self, model: nn.Module) -> CollapseGuard:
        """Watch every spatial transformer inside ``model``; returns ``self``. A model without one is never flagged."""
        from stnkit.modules import SpatialTransformer  # here: modules imports training helpers indirectly

        if not isinstance(model, nn.Module):
            raise TypeError(f"CollapseGuard.attach: model must be an nn.Module, got {type(model).__name__}")
        self.detach()
        for module in model.modules():
            if isinstance(module, SpatialTransformer):
                self._handles.append(module.register_forward_hook(self._hook))
                self._handles.append(module.localisation.register_forward_hook(
                    lambda net, args, theta, st=module: self._sanitise_theta(net, theta, st.transform)))
        return self

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending.clear()

    @property
    def watching(self) -> int:
        """How many spatial transformers are watched."""
        return len(self._handles)

    # ------------------------------------------------------------ detection
    def _sanitise_theta(self, module: nn.Module, theta: Any, transform: Any) -> Tensor | None:
        """Forward hook on a localisation net: non-finite rows of ``theta`` become the identity (training only)."""
        if not module.training or not isinstance(theta, Tensor) or theta.dim() != 2:
            return None
        finite = torch.isfinite(theta).all(dim=1, keepdim=True)
        if bool(finite.all()):
            return None
        # Recorded here, not by the transformer's hook: the consistency loss runs the localisation
        # net with no transformer forward after it, and its step must be judged all the same.
        self._record({"blank": 0.0, "std_ratio": 1.0, "nonfinite_theta": 1.0 - float(finite.float().mean()), "bad_det": 0.0})
        if getattr(transform, "num_params", None) != theta.shape[1]:
            return None  # no known identity: the warp will raise its own clear error
        identity = transform.identity(theta.shape[0], device=theta.device, dtype=theta.dtype)
        return torch.where(finite, theta, identity)

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not module.training or not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            return
        with torch.no_grad():
            self._record(self.measure(module.transform, module.last_theta, args[0], output))

    def _record(self, stats: dict[str, float]) -> None:
        self._pending.append(stats)
        del self._pending[:-16]  # forward passes nobody checks must not pile up

    def measure(self, transform: Any, theta: Tensor | None, x: Tensor, out: Tensor) -> dict[str, float]:
        """Fractions of bad images in one forward pass: blank output, ``|det|`` out of range, non-finite theta.

        Examples
        --------
        >>> from stnkit.transforms import Affine
        >>> x = torch.rand(2, 1, 8, 8)
        >>> CollapseGuard().measure(Affine(), Affine().identity(2), x, torch.zeros_like(x))["blank"]
        1.0
        """
        x, out = x.detach().float(), out.detach().float()
        in_std = x.flatten(1).std(dim=1)
        out_std = torch.nan_to_num(out.flatten(1).std(dim=1), nan=0.0)
        # Constant inputs have nothing to lose; leave them out of the fraction.
        informative = in_std > 1e-6
        blank = (out_std < self.min_std_ratio * in_std) & informative
        nan = torch.full_like(in_std, float("nan"))
        # Every statistic stays on the device until one read at the end: on a GPU each
        # host read waits for the device, and this runs at every training step.
        values = [
            blank.sum() / informative.sum().clamp_min(1),
            torch.where(informative, out_std / in_std.clamp_min(1e-12), nan).nanmedian(),
        ]
        is_matrix = False
        if theta is not None:
            theta = theta.detach()
            finite = torch.isfinite(theta).all(dim=1)
            values.append(1.0 - finite.float().mean())
            if isinstance(transform, MatrixTransform):
                is_matrix = True
                safe = torch.where(finite[:, None], theta, transform.identity(theta.shape[0], device=theta.device, dtype=theta.dtype))
                with deferred_value_checks():  # `safe` is finite by construction
                    det = linear_determinant(transform, safe).abs().to(in_std.dtype)
                bad = ~((det >= self.min_det) & (det <= self.max_det)) & finite
                values += [bad.float().sum() / theta.shape[0], torch.where(finite, det, nan.new_full(det.shape, float("nan"))).nanmedian()]
        read = torch.stack([v.float().reshape(()) for v in values]).tolist()
        std_ratio = read[1]
        stats = {
            "blank": read[0],
            "std_ratio": 1.0 if math.isnan(std_ratio) else std_ratio,
            "nonfinite_theta": read[2] if theta is not None else 0.0,
            "bad_det": read[3] if is_matrix else 0.0,
        }
        if is_matrix and not math.isnan(read[4]):
            stats["median_abs_det"] = read[4]
        return stats

    def check(self, step: int) -> str | None:
        """Judge the forward passes since the last call: a one-line reason when the step must be skipped, else None."""
        pending, self._pending = self._pending, []
        for stats in pending:
            reason = self._judge(stats)
            if reason is not None:
                self.events.append(GuardEvent(step, reason, stats))
                logger.warning("step %d: transform collapse: %s", step, reason)
                return reason
        return None

    def _judge(self, stats: dict[str, float]) -> str | None:
        limit = self.max_bad_fraction
        if stats["nonfinite_theta"] > 0:  # any: the forward pass ran on replaced parameters
            return f"theta is NaN/Inf for {stats['nonfinite_theta']:.0%} of the batch (replaced by the identity)"
        if stats["blank"] >= limit:
            return (f"warped output blank for {stats['blank']:.0%} of the batch (median std ratio "
                    f"{stats['std_ratio']:.3g} < {self.min_std_ratio:g})")
        if stats["bad_det"] >= limit:
            return (f"|det| of the linear part outside [{self.min_det:g}, {self.max_det:g}] for {stats['bad_det']:.0%} "
                    f"of the batch (median {stats.get('median_abs_det', float('nan')):.3g})")
        return None

    def __repr__(self) -> str:
        return (f"CollapseGuard(min_std_ratio={self.min_std_ratio:g}, min_det={self.min_det:g}, max_det={self.max_det:g}, "
                f"max_bad_fraction={self.max_bad_fraction:g}, watching={self.watching})")
