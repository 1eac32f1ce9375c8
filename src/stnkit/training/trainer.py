"""A generic, resumable training loop for supervised classification.

The loop is deliberately plain: each epoch it asks ``train_epoch_fn(epoch)`` for
the whole epoch's ``(x, y)`` (so a data layer can redraw its random distortions
every epoch), shuffles it with a generator seeded from ``(seed, epoch)``, and
takes one optimizer step per batch of cross-entropy loss.

Reproducibility and resuming
----------------------------
Before ``train_epoch_fn(epoch)`` runs, the global Python, NumPy and torch RNGs
are seeded from ``(seed, epoch)``, so an epoch's data and order depend on
nothing but the seed and the epoch number. ``checkpoints/last.safetensors``
holds the weights, the optimizer state, the position (epoch, batch, step), the
RNG states and the running metrics; resuming regenerates the epoch's data,
restores the RNGs and continues at the next batch, so an interrupted and
resumed run ends with exactly the weights of an uninterrupted one (bit for bit
on the CPU).

Files written into ``out_dir``
------------------------------
``metrics.csv`` (see :mod:`stnkit.training.metrics_log`), ``learning_curve.png``,
``checkpoints/last.safetensors`` and ``checkpoints/best.safetensors``.

Which model is "best"
---------------------
Given validation data (``val_data``, e.g. digits held out of the training set),
``best.safetensors`` is the model with the lowest validation error so far, and
the test set is only watched. Without it, the lowest *test* error picks it:
convenient for a quick look, but a selection on the test set, so a published
test error should come from ``last.safetensors`` or from a run with validation data.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from stnkit.models.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from stnkit.models.registry import build_model, resolve_config
from stnkit.models.registry import model_config as stored_model_config
from stnkit.training.consistency import sampled_consistency_loss
from stnkit.training.distributed import setup_distributed
from stnkit.training.guards import CollapseGuard
from stnkit.training.metrics_log import MetricsLog
from stnkit.training.plots import plot_learning_curve

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "evaluate",
    "learning_rate_at",
    "seed_everything",
]

logger = logging.getLogger(__name__)

EpochDataFn = Callable[[int], tuple[torch.Tensor, torch.Tensor]]

LAST_CHECKPOINT = Path("checkpoints") / "last.safetensors"
BEST_CHECKPOINT = Path("checkpoints") / "best.safetensors"
EMA_CHECKPOINT = Path("checkpoints") / "ema.safetensors"
METRICS_FILE = "metrics.csv"
CURVE_FILE = "learning_curve.png"

# Settings that change the weights a run produces: a resumed run must keep them.
_RUN_DEFINING = (
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "localisation_lr_scale",
    "lr_schedule",
    "lr_steps",
    "lr_step_unit",
    "lr_gamma",
    "seed",
    "max_grad_norm",
    "ema_decay",
    "consistency_weight",
    "consistency_rotation",
    "consistency_scale",
    "consistency_shift",
)
# Run-defining settings added later, with the value that older checkpoints (which lack them) ran with.
_ADDED_LATER = {
    "ema_decay": 0.0,
    "consistency_weight": 0.0,
    "consistency_rotation": 20.0,
    "consistency_scale": 0.1,
    "consistency_shift": 0.1,
}


@dataclass
class TrainConfig:
    """Settings of a training run.

    Parameters
    ----------
    epochs : int
        Number of passes over ``train_epoch_fn(epoch)``'s data.
    batch_size : int
        Images per optimizer step (the last batch of an epoch may be smaller).
    optimizer : {"sgd", "adam"}
        The optimizer.
    lr : float
        Base learning rate.
    momentum : float
        SGD momentum (ignored by Adam).
    weight_decay : float
        L2 penalty, for all parameters.
    localisation_lr_scale : float
        Parameters whose qualified name contains ``"localisation"`` (or
        ``"localization"``) train with ``lr * localisation_lr_scale``: a
        localisation net that moves too fast collapses the transform.
    lr_schedule : {"step", "cosine"}
        ``"step"``: multiply the lr by ``lr_gamma`` at each entry of
        ``lr_steps`` (constant if it is empty). ``"cosine"``: anneal to zero
        over all steps of the run.
    lr_steps : tuple of int
        Epochs (or steps, see ``lr_step_unit``) at which the step schedule decays.
    lr_step_unit : {"epoch", "step"}
        Unit of ``lr_steps``.
    lr_gamma : float
        Decay factor of the step schedule.
    seed : int
        Seeds the per-epoch data, the shuffling and the global RNGs.
    checkpoint_every : int
        Also write ``last.safetensors`` every this many steps (0: epoch ends only).
    eval_every : int
        Also evaluate and log a metrics row every this many steps (0: epoch ends only).
    out_dir : str or Path, optional
        Folder for metrics, plot and checkpoints; None writes no files.
    max_grad_norm : float, optional
        Clip the gradient norm to this value.
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``... or ``"auto"`` (CUDA when available).
    eval_batch_size : int
        Batch size for evaluating the test set.
    max_steps : int, optional
        Stop (with a checkpoint) once this many steps are done in total; a later
        resume continues the same run.
    max_nonfinite : int
        After this many consecutive steps with a non-finite loss, restore the
        last good checkpoint and halve the localisation learning rate.
    progress : bool
        Show a progress bar (only when stderr is a terminal).
    resume : bool
        Continue the run in ``out_dir`` from ``checkpoints/last.safetensors``.
    overwrite : bool
        Replace the run files already in ``out_dir``.
    amp : {"off", "bf16", "fp16"}
        Mixed precision: ``"bf16"`` runs the forward pass under bfloat16
        autocast (CPU and CUDA); ``"fp16"`` under float16 autocast with a
        gradient scaler (CUDA only). Grids and sampling stay in float32 where
        the transforms need it; weights and optimizer state stay float32.
    tensorboard : bool
        Also write every metrics row to ``out_dir/tb`` for TensorBoard (needs
        the ``tensorboard`` package; without it a warning and CSV only).
    ema_decay : float
        Also keep an exponential moving average of the weights (and float
        buffers), updated after every optimizer step with this decay (0: off).
        Early steps use ``min(ema_decay, (1 + step) / (10 + step))`` so the
        average is not dominated by the initial weights. Its test error is
        logged as ``ema_test_error`` and it is written, as a plain model
        checkpoint, to ``checkpoints/ema.safetensors``. Not in the ST paper.
    consistency_weight : float
        Add this times :func:`stnkit.training.consistency.consistency_loss` of
        the model's spatial transformer (``model.transformer``) to every step's
        loss (0: off): it asks the transformer to find the same canonical frame
        for each image and for a copy warped by a random similarity. Needs a
        transform with a matrix; not under torchrun. Not in the ST paper.
    consistency_rotation, consistency_scale, consistency_shift : float
        Ranges of that random similarity: degrees, ``ln`` scale and normalised
        translation (see :func:`stnkit.training.consistency.random_similarity`).

    Notes
    -----
    Under ``torchrun`` the run is data-parallel (see
    :mod:`stnkit.training.distributed`): ``batch_size`` is the global batch.

    Examples
    --------
    >>> TrainConfig(epochs=2, lr=0.05, lr_steps=(1,)).lr_steps
    (1,)
    """

    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    localisation_lr_scale: float = 0.1
    lr_schedule: str = "step"
    lr_steps: tuple[int, ...] = ()
    lr_step_unit: str = "epoch"
    lr_gamma: float = 0.1
    seed: int = 0
    checkpoint_every: int = 0
    eval_every: int = 0
    out_dir: str | Path | None = None
    max_grad_norm: float | None = None
    device: str = "cpu"
    eval_batch_size: int = 1024
    max_steps: int | None = None
    max_nonfinite: int = 5
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    amp: str = "off"
    tensorboard: bool = False
    ema_decay: float = 0.0
    consistency_weight: float = 0.0
    consistency_rotation: float = 20.0
    consistency_scale: float = 0.1
    consistency_shift: float = 0.1

    def __post_init__(self) -> None:
        self.lr_steps = tuple(self.lr_steps)
        for name in ("epochs", "batch_size", "eval_batch_size", "max_nonfinite"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("checkpoint_every", "eval_every", "seed"):
            _check_int(name, getattr(self, name), minimum=0)
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, minimum=0)
        for step in self.lr_steps:
            _check_int("lr_steps entries", step, minimum=0)
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr_schedule not in ("step", "cosine"):
            raise ValueError(f"lr_schedule must be 'step' or 'cosine', got {self.lr_schedule!r}")
        if self.lr_step_unit not in ("epoch", "step"):
            raise ValueError(f"lr_step_unit must be 'epoch' or 'step', got {self.lr_step_unit!r}")
        for name in ("lr", "localisation_lr_scale", "lr_gamma"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other: resume continues a run, overwrite replaces it")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay must be a number in [0, 1) (0: no moving average), got {self.ema_decay!r}")
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {self.amp!r}")
        for name in ("consistency_weight", "consistency_rotation", "consistency_scale", "consistency_shift"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-serialisable dict.

        Examples
        --------
        >>> TrainConfig(epochs=3).to_dict()["epochs"]
        3
        """
        out = asdict(self)
        out["lr_steps"] = list(self.lr_steps)
        out["out_dir"] = None if self.out_dir is None else str(self.out_dir)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise ``ValueError``.

        Examples
        --------
        >>> TrainConfig.from_dict({"epochs": 2}).epochs
        2
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes
    ----------
    steps : int
        Steps done in total (including skipped non-finite ones).
    epochs_completed : int
        Complete epochs done.
    test_error : float or None
        Test error at the last evaluation.
    best_step : int or None
        The step of ``best.safetensors``: lowest validation error when the run
        has validation data, else lowest test error.
    best_test_error : float or None
        The test error at ``best_step``.
    val_error, best_val_error : float or None
        Validation error at the last evaluation and at ``best_step`` (None
        without validation data).
    skipped_steps : int
        Steps skipped because the loss (or gradient norm) was not finite.
    localisation_lr_factor : float
        Extra factor on the localisation lr (halved at each non-finite recovery).
    stopped_early : bool
        True when ``max_steps`` stopped the run before its last epoch ended.
    out_dir : Path or None
        Where the run's files are.
    """

    steps: int
    epochs_completed: int
    test_error: float | None
    best_test_error: float | None
    best_step: int | None
    skipped_steps: int
    localisation_lr_factor: float
    stopped_early: bool
    out_dir: Path | None
    val_error: float | None = None
    best_val_error: float | None = None


@dataclass
class _Window:
    """Running training metrics since the last metrics row."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    seconds: float = 0.0
    consistency_sum: Any = 0.0  # a tensor while steps add to it, so the device is not waited for


class Trainer:
    """Train a classifier, with checkpoints, metrics, a learning curve and exact resuming.

    Parameters
    ----------
    model : nn.Module
        Maps a batch of images to logits ``(N, classes)`` (or a tuple whose
        first element is the logits).
    model_config : dict or None
        The model's config (see :func:`~stnkit.models.build_model`); None takes
        the one stored on the model. Its kind must be registered.
    train_epoch_fn : callable
        ``train_epoch_fn(epoch) -> (x, y)``: all training images and integer
        labels of that epoch.
    test_data : tuple of Tensor
        ``(x, y)`` of the test set.
    config : TrainConfig, optional
        Settings; defaults to ``TrainConfig()``.
    run_info : dict, optional
        JSON-serialisable notes stored in every checkpoint (e.g. the task name,
        so a CLI can rebuild the data on resume).
    guard : CollapseGuard or bool, default True
        Watches the model's spatial transformers for collapse (blank output,
        scale running to zero or infinity); a flagged step is handled like a
        non-finite one (see :mod:`stnkit.training.guards`). ``True`` uses the
        default thresholds, ``False`` turns it off.
    val_data : tuple of Tensor, optional
        ``(x, y)`` of a validation set, evaluated with the test set; when given,
        it alone selects ``best.safetensors`` (see the module docstring).

    Examples
    --------
    >>> trainer = Trainer(model, None, lambda epoch: (x, y), (x_test, y_test),
    ...                   TrainConfig(epochs=5, out_dir="runs/mlp"))  # doctest: +SKIP
    >>> result = trainer.fit()  # doctest: +SKIP
    >>> result = Trainer.resume("runs/mlp", lambda epoch: (x, y), (x_test, y_test)).fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        model_config: Mapping[str, Any] | None,
        train_epoch_fn: EpochDataFn,
        test_data: tuple[torch.Tensor, torch.Tensor],
        config: TrainConfig | None = None,
        *,
        run_info: Mapping[str, Any] | None = None,
        guard: CollapseGuard | bool = True,
        val_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not callable(train_epoch_fn):
            raise TypeError("train_epoch_fn must be a callable epoch -> (x, y)")
        self.config = config if config is not None else TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        # Completed with the builder's defaults, so that equal architectures compare equal on resume.
        self.model_config = stored_model_config(model) if model_config is None else resolve_config(model_config)
        self.run_info = _json_normalised(dict(run_info or {}), "run_info")
        # Under torchrun: join the process group; each rank trains on its slice of every batch.
        self.dist = setup_distributed(resolve_device(self.config.device))
        self.device = self.dist.device_for(resolve_device(self.config.device))
        self.model = model.to(self.device)
        # The moving average is a copy taken before the collapse guard hooks the model.
        self.ema_model = _frozen_copy(self.model) if self.config.ema_decay > 0 else None
        self._train_model = self.dist.wrap(self.model, self.device)
        self._amp_dtype, self._scaler = mixed_precision(self.config.amp, self.device)
        self._tensorboard: Any = None
        self.train_epoch_fn = train_epoch_fn
        self.test_x, self.test_y = _check_xy(test_data, "test_data")
        self.val_x, self.val_y = (None, None) if val_data is None else _check_xy(val_data, "val_data")
        self.out_dir = Path(self.config.out_dir) if self.config.out_dir is not None else None
        self.optimizer, self._is_localisation_group = self._make_optimizer()
        # Collapse detection (stnkit.training.guards): hooks on the spatial transformers.
        if not isinstance(guard, (bool, CollapseGuard)):
            raise TypeError(f"guard must be a CollapseGuard or a bool, got {type(guard).__name__}")
        self.guard = (CollapseGuard() if guard is True else guard or None)
        if self.guard is not None:
            self.guard.attach(self.model)
        self._consistent_transformer = self._check_consistency_setup()

        # Position and history of the run; all of it goes into last.safetensors.
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.test_error: float | None = None
        self.best_test_error: float | None = None
        self.best_step: int | None = None
        self.val_error: float | None = None
        self.best_val_error: float | None = None
        self.skipped_steps = 0
        self.consecutive_nonfinite = 0
        self.localisation_lr_factor = 1.0
        self.elapsed = 0.0
        self._last_eval_step = -1
        self._window = _Window()
        self._good_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        self._metrics: MetricsLog | None = None
        self._clock_start = 0.0
        self._elapsed_at_start = 0.0
        self._last_plot_time = 0.0

    @classmethod
    def resume(
        cls,
        out_dir: str | Path,
        train_epoch_fn: EpochDataFn,
        test_data: tuple[torch.Tensor, torch.Tensor],
        *,
        val_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        **overrides: Any,
    ) -> Trainer:
        """Rebuild the trainer of the run in ``out_dir`` from its last checkpoint; call :meth:`fit` to continue.

        The model is rebuilt from the checkpoint's config and the settings are
        the run's own; ``overrides`` may change the ones that do not alter the
        result (``epochs``, ``max_steps``, ``progress``, ``device``,
        ``checkpoint_every``, ``eval_every``, ``eval_batch_size``, ``max_nonfinite``).
        ``val_data`` must be given again if the run had it (it chose ``best``).

        Examples
        --------
        >>> result = Trainer.resume("runs/mlp", epoch_fn, (x_test, y_test), epochs=20).fit()  # doctest: +SKIP
        """
        last = Path(out_dir) / LAST_CHECKPOINT
        checkpoint = load_checkpoint(last)
        state = checkpoint.trainer_state or {}
        if "train_config" not in state:
            raise ValueError(f"{last}: not a training checkpoint (no trainer state)")
        # max_steps ended the earlier session; it is not part of the run.
        settings = {**state["train_config"], "max_steps": None, **overrides}
        settings.update(out_dir=str(out_dir), resume=True, overwrite=False)
        model = build_model(checkpoint.config)
        return cls(
            model, checkpoint.config, train_epoch_fn, test_data, TrainConfig.from_dict(settings),
            run_info=state.get("run_info"), val_data=val_data,
        )  # fmt: skip

    # --- the loop -------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Run (or continue) training until ``epochs`` are done or ``max_steps`` is reached.

        Returns
        -------
        TrainResult
        """
        config = self.config
        self._prepare_out_dir()
        self.dist.barrier()  # rank 0 has cleared or checked the run folder
        saved_rng = self._load_last() if config.resume else None
        self._remember_good_state()
        if self.out_dir is not None and self.dist.is_main:
            self._metrics = MetricsLog(self.out_dir / METRICS_FILE, keep_until_step=self.step if config.resume else None)
            self._tensorboard = _open_tensorboard(self.out_dir / "tb") if config.tensorboard else None
        self._clock_start, self._elapsed_at_start = time.perf_counter(), self.elapsed
        self._last_plot_time = self._clock_start

        stopped = False
        while self.epoch < config.epochs and not stopped:
            if self._reached_max_steps():
                stopped = True
                break
            x, y = self._epoch_data(self.epoch)
            order = torch.randperm(len(x), generator=_generator(config.seed, "shuffle", self.epoch))
            if self.device.type == "cuda" and x.numel() * x.element_size() <= _EPOCH_ON_DEVICE_BYTES:
                # One copy per epoch instead of a gather and a copy per step.
                x, y, order = x.to(self.device), y.to(self.device), order.to(self.device)
            if saved_rng is not None and self.batch_in_epoch > 0:
                # Mid-epoch resume: the data is regenerated above; from here on the
                # RNGs must continue where the interrupted run left them.
                restore_rng_state(saved_rng)
            saved_rng = None
            batches = math.ceil(len(x) / config.batch_size)
            with self._progress_bar(batches) as bar:
                while self.batch_in_epoch < batches:
                    if self._reached_max_steps():
                        stopped = True
                        break
                    start = self.batch_in_epoch * config.batch_size
                    index = order[start : start + config.batch_size]
                    self._train_step(x[index], y[index], batches)
                    self.batch_in_epoch += 1
                    self.step += 1
                    if config.eval_every and self.step % config.eval_every == 0:
                        self._evaluate_and_log()
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        self._save_last()
                    self._update_bar(bar)
            if stopped:
                self._save_last()
                break
            if self._last_eval_step != self.step:
                self._evaluate_and_log()
            self.epoch += 1
            self.batch_in_epoch = 0
            self._save_last()
            self._plot(at_most_every_s=30.0)
        self._plot()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        return TrainResult(
            steps=self.step,
            epochs_completed=self.epoch,
            test_error=self.test_error,
            best_test_error=self.best_test_error,
            best_step=self.best_step,
            skipped_steps=self.skipped_steps,
            localisation_lr_factor=self.localisation_lr_factor,
            stopped_early=stopped and self.epoch < config.epochs,
            out_dir=self.out_dir,
            val_error=self.val_error,
            best_val_error=self.best_val_error,
        )

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, batches_per_epoch: int) -> None:
        self._set_learning_rates(batches_per_epoch)
        started = time.perf_counter()
        global_count = len(y)
        x, y = self.dist.shard(x, y)  # this rank's slice of the global batch (all of it without DDP)
        x, y = x.to(self.device), y.to(self.device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            logits = _logits(self._train_model(x))
        if self.dist.enabled:
            # Summed over the global batch: DDP's mean over ranks then gives the
            # gradient of the global batch's mean loss (see training/distributed.py).
            loss = F.cross_entropy(logits.float(), y, reduction="sum") * (self.dist.world_size / global_count)
        else:
            loss = F.cross_entropy(logits.float(), y)
        consistency = None
        if self._consistent_transformer is not None:
            with self._autocast():
                consistency = sampled_consistency_loss(
                    self._consistent_transformer, x, rotation=self.config.consistency_rotation,
                    scale=self.config.consistency_scale, shift=self.config.consistency_shift,
                ).float()  # fmt: skip
            loss = loss + self.config.consistency_weight * consistency
        # A collapsed transform gets the same policy as a non-finite loss (skip, then roll back).
        collapse = self.guard.check(self.step + 1) if self.guard is not None else None
        if self.dist.enabled:
            # One all-reduce: the metrics, and the same skip decision on every rank
            # (a rank that skipped backward alone would leave the others waiting).
            total_loss, correct, collapsed = self.dist.all_reduce_sum(torch.stack((
                loss.detach() * (global_count / self.dist.world_size),
                (logits.argmax(dim=1) == y).sum().float(),
                torch.tensor(float(collapse is not None), device=self.device),
            ))).tolist()
            mean_loss = total_loss / global_count
            if collapsed and collapse is None:
                collapse = "on another rank"
        else:
            # Read later, with the gradient norm: one host read per step (on a GPU each read
            # waits for the device). A non-finite loss then only costs a discarded backward.
            mean_loss, correct = None, (logits.argmax(dim=1) == y).sum()
            if collapse is not None:
                mean_loss = loss.item()
        if mean_loss is not None and not math.isfinite(mean_loss):
            self._skip_nonfinite_step(f"loss is {mean_loss}")
            return
        if collapse is not None:
            self._skip_nonfinite_step(f"transform collapse: {collapse}")
            return
        (loss if self._scaler is None else self._scaler.scale(loss)).backward()
        norm = None
        if self.config.max_grad_norm is not None:
            if self._scaler is not None:
                self._scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        if mean_loss is None:
            watched = [loss.detach().float(), correct.float()]
            if norm is not None and self._scaler is None:  # the scaler skips non-finite steps itself
                watched.append(norm.detach().float())
            read = torch.stack(watched).tolist()
            mean_loss, correct = read[0], int(read[1])
            norm_value = read[2] if len(read) > 2 else 0.0
            if not math.isfinite(mean_loss):
                self.optimizer.zero_grad(set_to_none=True)
                self._skip_nonfinite_step(f"loss is {mean_loss}")
                return
        else:
            norm_value = float(norm) if norm is not None and self._scaler is None else 0.0
        if not math.isfinite(norm_value):
            self.optimizer.zero_grad(set_to_none=True)
            self._skip_nonfinite_step(f"gradient norm is {norm_value}")
            return
        if self._scaler is None:
            self.optimizer.step()
        else:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        self.consecutive_nonfinite = 0
        self._update_ema()
        self._window.loss_sum += mean_loss * global_count
        if consistency is not None:
            self._window.consistency_sum = self._window.consistency_sum + consistency.detach() * global_count
        self._window.correct += int(correct)
        self._window.count += global_count
        self._window.seconds += time.perf_counter() - started

    def _check_consistency_setup(self) -> nn.Module | None:
        """The spatial transformer the consistency loss trains (None when the loss is off)."""
        if self.config.consistency_weight == 0:
            return None
        from stnkit.modules import SpatialTransformer
        from stnkit.transforms import MatrixTransform

        transformer = getattr(self.model, "transformer", None)
        if not isinstance(transformer, SpatialTransformer):
            raise ValueError(
                "consistency_weight > 0 needs a model with a spatial transformer in front (model.transformer), "
                f"got {type(self.model).__name__} with transformer={type(transformer).__name__}"
            )
        if not isinstance(transformer.transform, MatrixTransform):
            raise ValueError(
                "consistency_weight > 0 needs a transform with a matrix (affine, projective, similarity, ...), "
                f"got {transformer.transform.name!r}"
            )
        if self.dist.enabled:
            raise ValueError("consistency_weight > 0 is not supported under torchrun (it bypasses DDP's forward)")
        return transformer

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_model is None:
            return
        # self.step counts the steps before this one; the warm-up keeps early averages near the current weights.
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        averaged = self.ema_model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.is_floating_point():
                averaged[name].lerp_(value, 1.0 - decay)
            else:
                averaged[name].copy_(value)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to ``config.amp``'s dtype on the training device (a no-op with ``amp="off"``)."""
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._amp_dtype)

    def _skip_nonfinite_step(self, why: str) -> None:
        """Leave the weights as they are; after too many in a row, roll back and slow the localisation net."""
        self.skipped_steps += 1
        self.consecutive_nonfinite += 1
        self._repair_buffers()
        logger.warning(
            "step %d: %s; step skipped (%d in a row, %d in total)", self.step + 1, why, self.consecutive_nonfinite, self.skipped_steps
        )
        if self.consecutive_nonfinite >= self.config.max_nonfinite:
            model_state, optimizer_state = self._good_state
            self.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(copy.deepcopy(optimizer_state))
            self.localisation_lr_factor *= 0.5
            self.consecutive_nonfinite = 0
            logger.warning(
                "step %d: %d non-finite or collapsed steps in a row: restored the last good checkpoint and halved the "
                "localisation learning rate (now x%g of its scheduled value)",
                self.step + 1,
                self.config.max_nonfinite,
                self.localisation_lr_factor,
            )

    def _repair_buffers(self) -> None:
        # A NaN forward pass in train mode may already have written NaN into
        # buffers such as BatchNorm running statistics; take them from the last good state.
        good_state = self._good_state[0]
        for name, buffer in self.model.named_buffers():
            if buffer.is_floating_point() and not torch.isfinite(buffer).all() and name in good_state:
                buffer.copy_(good_state[name])

    def _error_on(self, x: torch.Tensor, y: torch.Tensor, model: nn.Module | None = None) -> float:
        # Each rank evaluates its slice; the wrong counts are summed.
        shard_x, shard_y = self.dist.shard(x, y)
        with self._autocast():
            error = evaluate(self.model if model is None else model, shard_x, shard_y, self.config.eval_batch_size, device=self.device) if len(shard_y) else 0.0
        if self.dist.enabled:
            wrong = self.dist.all_reduce_sum(torch.tensor([round(error * len(shard_y))], device=self.device))
            error = int(wrong.item()) / len(y)
        return error

    def _evaluate_and_log(self) -> None:
        self.test_error = self._error_on(self.test_x, self.test_y)
        if self.val_y is not None:
            self.val_error = self._error_on(self.val_x, self.val_y)
        ema_test_error = None if self.ema_model is None else self._error_on(self.test_x, self.test_y, self.ema_model)
        self._last_eval_step = self.step
        # With validation data, it alone picks the best model; the test set is only watched.
        selection_error, best_so_far = (
            (self.test_error, self.best_test_error) if self.val_y is None else (self.val_error, self.best_val_error)
        )
        if best_so_far is None or selection_error < best_so_far:
            self.best_test_error, self.best_val_error, self.best_step = self.test_error, self.val_error, self.step
            if self.out_dir is not None and self.dist.is_main:
                best_state = {"step": self.step, "epoch": self.epoch, "test_error": self.test_error,
                              "val_error": self.val_error, "train_config": self.config.to_dict(), "run_info": self.run_info}
                save_checkpoint(self.out_dir / BEST_CHECKPOINT, self.model, self.model_config, trainer_state=best_state)
        window = self._window
        if self._metrics is not None:
            row = {
                "step": self.step,
                "epoch": self.epoch,
                "train_loss": window.loss_sum / window.count if window.count else None,
                "train_acc": window.correct / window.count if window.count else None,
                "test_error": self.test_error,
                "val_error": self.val_error,
                "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": window.count / window.seconds if window.seconds > 0 else None,
                "time": round(self._elapsed_now(), 3),
                "skipped_steps": self.skipped_steps,
                "ema_test_error": ema_test_error,
                "consistency_loss": (float(window.consistency_sum) / window.count
                                     if self._consistent_transformer is not None and window.count else None),
            }
            self._metrics.append(row)
            if self._tensorboard is not None:
                for name, value in row.items():
                    if name != "step" and value is not None:
                        self._tensorboard.add_scalar(name, value, self.step)
                self._tensorboard.flush()
        self._window = _Window()

    # --- learning rate and optimizer -------------------------------------------

    def _make_optimizer(self) -> tuple[torch.optim.Optimizer, list[bool]]:
        localisation, other = [], []
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                is_localisation = "localisation" in name or "localization" in name
                (localisation if is_localisation else other).append(parameter)
        groups = [{"params": params} for params in (other, localisation) if params]
        is_localisation_group = [params is localisation for params in (other, localisation) if params]
        if not groups:
            raise ValueError("the model has no trainable parameters")
        config = self.config
        if config.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        else:
            optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
        return optimizer, is_localisation_group

    def _set_learning_rates(self, batches_per_epoch: int) -> None:
        # Recomputed from the position at every step, so resuming needs no scheduler state.
        lr = learning_rate_at(self.config, epoch=self.epoch, step=self.step, steps_per_epoch=batches_per_epoch)
        localisation_scale = self.config.localisation_lr_scale * self.localisation_lr_factor
        for group, is_localisation in zip(self.optimizer.param_groups, self._is_localisation_group):
            group["lr"] = lr * localisation_scale if is_localisation else lr

    # --- files, checkpoints and resuming --------------------------------------

    def _prepare_out_dir(self) -> None:
        config, out_dir = self.config, self.out_dir
        if out_dir is None:
            if config.resume:
                raise ValueError("resume needs an out_dir holding the run to continue")
            return
        last = out_dir / LAST_CHECKPOINT
        if config.resume:
            if not last.exists():
                raise FileNotFoundError(f"{out_dir}: nothing to resume: no {LAST_CHECKPOINT} in it")
            return
        run_files = [out_dir / name for name in (LAST_CHECKPOINT, BEST_CHECKPOINT, EMA_CHECKPOINT, METRICS_FILE, CURVE_FILE)]
        existing = [path for path in run_files if path.exists()]
        if existing and not config.overwrite:
            names = ", ".join(str(path.relative_to(out_dir)) for path in existing)
            raise FileExistsError(
                f"{out_dir}: already holds a training run ({names}); resume it or choose overwrite to replace it"
            )
        if not self.dist.is_main:
            return  # rank 0 alone writes the run's files
        for path in existing:
            path.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)

    def _trainer_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "test_error": self.test_error,
            "best_test_error": self.best_test_error,
            "best_step": self.best_step,
            "val_error": self.val_error,
            "best_val_error": self.best_val_error,
            "skipped_steps": self.skipped_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
            "localisation_lr_factor": self.localisation_lr_factor,
            "elapsed": self._elapsed_now(),
            "last_eval_step": self._last_eval_step,
            "window": {**asdict(self._window), "consistency_sum": float(self._window.consistency_sum)},
            "rng": capture_rng_state(),
            "train_config": self.config.to_dict(),
            "run_info": self.run_info,
            "ema_state": None if self.ema_model is None else self.ema_model.state_dict(),
        }

    def _save_last(self) -> None:
        self._remember_good_state()
        if self.out_dir is not None and self.dist.is_main:
            save_checkpoint(
                self.out_dir / LAST_CHECKPOINT,
                self.model,
                self.model_config,
                optimizer=self.optimizer,
                trainer_state=self._trainer_state(),
            )
            if self.ema_model is not None:
                ema_state = {"step": self.step, "epoch": self.epoch, "ema_decay": self.config.ema_decay,
                             "train_config": self.config.to_dict(), "run_info": self.run_info}
                save_checkpoint(self.out_dir / EMA_CHECKPOINT, self.ema_model, self.model_config, trainer_state=ema_state)

    def _load_last(self) -> dict[str, Any]:
        """Load ``last.safetensors`` into the model, optimizer and counters; return its RNG states."""
        path = self.out_dir / LAST_CHECKPOINT
        checkpoint = load_checkpoint(path, map_location=self.device)
        state = checkpoint.trainer_state
        if not state or "train_config" not in state or checkpoint.optimizer_state is None:
            raise ValueError(f"{path}: not a training checkpoint (no trainer or optimizer state)")
        if checkpoint.config != self.model_config:
            raise ValueError(f"{path}: the run's model config {checkpoint.config} differs from this model's {self.model_config}")
        current = self.config.to_dict()
        saved = {**_ADDED_LATER, **state["train_config"]}
        changed = [f"{key}: {saved.get(key)!r} -> {current[key]!r}" for key in _RUN_DEFINING if saved.get(key) != current[key]]
        if self.config.lr_schedule == "cosine" and state["train_config"].get("epochs") != current["epochs"]:
            changed.append(f"epochs (sets the cosine schedule): {state['train_config'].get('epochs')!r} -> {current['epochs']!r}")
        if changed:
            raise ValueError(f"{path}: cannot resume with different settings ({'; '.join(changed)})")
        try:
            self.model.load_state_dict(checkpoint.model_state)
            self.optimizer.load_state_dict(checkpoint.optimizer_state)
            if self.ema_model is not None:
                self.ema_model.load_state_dict(state["ema_state"])
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{path}: does not fit this model/optimizer: {str(exc).splitlines()[0]}") from None
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        self.test_error, self.best_test_error, self.best_step = state["test_error"], state["best_test_error"], state["best_step"]
        # Checkpoints from before validation data existed have neither key.
        self.val_error, self.best_val_error = state.get("val_error"), state.get("best_val_error")
        if (self.best_val_error is not None) != (self.val_y is not None) and self.best_step is not None:
            had = "had validation data" if self.best_val_error is not None else "had none"
            raise ValueError(f"{path}: the run {had}; resume it with the same validation data, which chose its best model")
        self.skipped_steps, self.consecutive_nonfinite = state["skipped_steps"], state["consecutive_nonfinite"]
        self.localisation_lr_factor, self.elapsed = state["localisation_lr_factor"], state["elapsed"]
        self._last_eval_step = state["last_eval_step"]
        self._window = _Window(**state["window"])
        logger.info("resuming %s at epoch %d, step %d", self.out_dir, self.epoch, self.step)
        return state["rng"]

    def _remember_good_state(self) -> None:
        # An in-memory copy of what last.safetensors holds, for non-finite recovery.
        if self.consecutive_nonfinite and self._good_state is not None:
            return  # steps are being skipped: these weights are suspect, keep the older good state
        model_state = {name: value.detach().clone() for name, value in self.model.state_dict().items()}
        self._good_state = (model_state, copy.deepcopy(self.optimizer.state_dict()))

    def _plot(self, at_most_every_s: float = 0.0) -> None:
        # Drawing takes about a second, so during a run the curve is refreshed
        # at most every `at_most_every_s` seconds; fit() always draws it at the end.
        if self.out_dir is None or self._metrics is None:
            return
        if time.perf_counter() - self._last_plot_time < at_most_every_s:
            return
        plot_learning_curve(self.out_dir / METRICS_FILE, self.out_dir / CURVE_FILE, title=self.model_config.get("kind"))
        self._last_plot_time = time.perf_counter()

    # --- small helpers ----------------------------------------------------------

    def _epoch_data(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Seeding here makes the epoch's data a function of (seed, epoch) alone,
        # however the run got to this epoch (fresh, or resumed).
        seed_everything(_derived_seed(self.config.seed, "data", epoch))
        return _check_xy(self.train_epoch_fn(epoch), f"train_epoch_fn({epoch})")

    def _reached_max_steps(self) -> bool:
        return self.config.max_steps is not None and self.step >= self.config.max_steps

    def _elapsed_now(self) -> float:
        return self._elapsed_at_start + time.perf_counter() - self._clock_start

    def _progress_bar(self, batches: int) -> tqdm:
        enabled = self.config.progress and sys.stderr.isatty() and self.dist.is_main
        return tqdm(
            total=batches,
            initial=self.batch_in_epoch,
            desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
            unit="batch",
            disable=not enabled,
            leave=False,
        )

    def _update_bar(self, bar: tqdm) -> None:
        bar.update(1)
        window = self._window
        if not bar.disable and window.count:
            bar.set_postfix(
                loss=f"{window.loss_sum / window.count:.3f}",
                acc=f"{window.correct / window.count:.3f}",
                img_s=f"{window.count / max(window.seconds, 1e-9):.0f}",
                refresh=False,
            )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1024,
    *,
    device: str | torch.device | None = None,
) -> float:
    """Return the classification error rate (fraction in [0, 1]) of ``model`` on ``(x, y)``.

    The model is evaluated in eval mode and put back in its previous mode.

    Parameters
    ----------
    model : nn.Module
        Returns logits ``(N, classes)`` (or a tuple starting with them).
    x, y : Tensor
        Inputs and integer labels.
    batch_size : int
        Images per forward pass.
    device : str or torch.device, optional
        Where to run; defaults to the device of the model's first parameter.

    Examples
    --------
    >>> model = torch.nn.Linear(2, 2)
    >>> evaluate(model, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)) in (0.0, 1.0)
    True
    """
    x, y = _check_xy((x, y), "evaluation data")
    _check_int("batch_size", batch_size, minimum=1)
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    wrong = 0
    try:
        for start in range(0, len(x), batch_size):
            logits = _logits(model(x[start : start + batch_size].to(device)))
            wrong += int((logits.argmax(dim=1) != y[start : start + batch_size].to(device)).sum().item())
    finally:
        model.train(was_training)
    return wrong / len(x)


#: Epochs up to this size are moved to a CUDA device whole (distorted MNIST: 0.4 GB at 42x42).
_EPOCH_ON_DEVICE_BYTES = 2 * 2**30


def learning_rate_at(config: TrainConfig, *, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Return the scheduled base learning rate at a position in the run.

    Examples
    --------
    >>> config = TrainConfig(lr=0.1, lr_steps=(2,), lr_gamma=0.5)
    >>> learning_rate_at(config, epoch=1, step=10, steps_per_epoch=10), learning_rate_at(config, epoch=2, step=20, steps_per_epoch=10)
    (0.1, 0.05)
    """
    if config.lr_schedule == "cosine":
        total = max(config.epochs * steps_per_epoch, 1)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step / total, 1.0)))
    position = epoch if config.lr_step_unit == "epoch" else step
    decays = sum(1 for boundary in config.lr_steps if position >= boundary)
    return config.lr * config.lr_gamma**decays


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (if installed) and torch's global RNGs (CUDA included).

    Examples
    --------
    >>> seed_everything(0); a = torch.rand(1); seed_everything(0); bool(torch.rand(1) == a)
    True
    """
    _check_int("seed", seed, minimum=0)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the core
        return
    np.random.seed(seed % 2**32)


def _derived_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from ``seed`` and a purpose, stable across processes and platforms."""
    digest = hashlib.sha256(json.dumps([seed, *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _generator(seed: int, *parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(seed, *parts))


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose parameters take no gradients (for a moving average)."""
    copied = copy.deepcopy(model).eval()
    for parameter in copied.parameters():
        parameter.requires_grad_(False)
    return copied


def _logits(output: Any) -> torch.Tensor:
    logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape (N, classes), got {shape}")
    return logits


def _check_xy(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"{what} must be a pair (x, y) of tensors, got {type(data).__name__}")
    x, y = data
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{what} must be a pair (x, y) of tensors, got ({type(x).__name__}, {type(y).__name__})")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"{what}: x and y must hold the same, non-zero number of samples, got {len(x)} and {len(y)}")
    if y.dim() != 1 or y.is_floating_point() or y.is_complex():
        raise ValueError(f"{what}: y must be a 1-D tensor of integer class labels, got {y.dtype} of shape {tuple(y.shape)}")
    return x, y.long()


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _json_normalised(value: dict[str, Any], what: str) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from None


def mixed_precision(amp: str, device: torch.device) -> tuple[torch.dtype | None, Any]:
    """The autocast dtype and gradient scaler of an ``amp`` setting (``"off"``, ``"bf16"``, ``"fp16"``) on ``device``.

    Examples
    --------
    >>> mixed_precision("bf16", torch.device("cpu"))
    (torch.bfloat16, None)
    """
    if amp not in ("off", "bf16", "fp16"):
        raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {amp!r}")
    if amp == "off":
        return None, None
    if amp == "bf16":
        return torch.bfloat16, None
    if device.type != "cuda":
        raise ValueError(f"amp='fp16' needs a CUDA device (float16 with a gradient scaler), got {device}; use amp='bf16'")
    return torch.float16, torch.amp.GradScaler("cuda")


def _open_tensorboard(folder: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``folder``, or None (with a warning) without the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard=True but torch.utils.tensorboard is not importable (pip install tensorboard); "
                       "writing metrics.csv only")
        return None
    return SummaryWriter(str(folder))


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`; ``"auto"`` is CUDA when available.

    Raises
    ------
    ValueError
        If ``device`` is not a device name, or names CUDA where there is none.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved
