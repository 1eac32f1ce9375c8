"""Self-supervised training of an :class:`~stnkit.models.aligner.Aligner`.

Every step draws a batch of pairs with :func:`stnkit.data.pairs.batch_pairs`
(a random crop of a training image, a randomly warped view of it, independent
photometric jitter) whose ground-truth geometry is known, and regresses it.

Loss
----
*Corner loss* (matrix families): the four normalised image corners of the
support frame (``(+-1, +-1)``) are mapped by the predicted and by the true
backward map (support normalised -> input normalised); the loss is the mean
Euclidean distance between the two images of each corner, in normalised units
(multiply by ``size / 2`` for pixels). For ``"tps"`` it is the mean distance
between predicted and true control-point positions in the input. An optional
photometric term (``"l1"`` or ``"ncc"``) compares the input warped by the
prediction with the support over their overlap.

Outputs in ``out_dir``: ``checkpoints/last.safetensors`` (model, optimizer,
scheduler and loop state: what ``resume=True`` continues from),
``checkpoints/best.safetensors`` (lowest validation error),
``aligner.safetensors`` (final weights only), ``metrics.csv`` (the
``test_error`` column holds the validation corner error in **pixels** of the
net size) and ``loss.png``.

Data-parallel
-------------
Under ``torchrun`` the loop runs data-parallel with no code change, with the
convention of :mod:`stnkit.training.distributed`: ``batch_size`` is the global
batch; every rank draws the same global batch of pairs (same seed) and trains
on its slice; batch norms use the global batch's statistics
(:func:`~stnkit.training.distributed.sync_batch_norm`), so the weights equal
those of one process with the same ``batch_size``; rank 0 alone writes files::

    torchrun --nproc-per-node 2 -m stnkit.cli.main train-aligner --builtin --out runs/aligner-ddp
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from stnkit.data.images import to_gray_uint8
from stnkit.data.pairs import PairBatch, PhotometricRanges, WarpRanges, batch_pairs
from stnkit.models.aligner import Aligner
from stnkit.models.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from stnkit.models.registry import build_model
from stnkit.transforms.base import norm_from_pix, pix_from_norm
from stnkit.training.distributed import DistributedContext, setup_distributed
from stnkit.training.metrics_log import MetricsLog, read_metrics
from stnkit.training.trainer import mixed_precision, resolve_device

__all__ = ["train_aligner", "corner_loss", "true_theta_matrix", "homographynet_ranges", "plot_aligner_curve"]

_CORNERS = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)


def homographynet_ranges(rho: float = 32, patch: int = 128) -> WarpRanges:
    """Warp ranges close to the HomographyNet protocol: corner offsets up to ``rho`` px on ``patch`` px patches.

    A small similarity (rotation 5 degrees, scale 0.95-1.05, translation 5%) is
    kept on top, so the net also sees rotations and zooms.

    Examples
    --------
    >>> homographynet_ranges().corner
    0.25
    """
    return WarpRanges(rotation=5.0, scale=(0.95, 1.05), shear=0.0, translation=0.05, corner=rho / patch)


def true_theta_matrix(batch: PairBatch, size: Sequence[int]) -> Tensor:
    """Ground truth ``(B, 3, 3)`` float64 backward map support normalised -> input normalised.

    Convention: the inverse of the batch's ``support_pix_from_input_pix``,
    expressed in normalised coordinates of images of ``size`` (both the same).
    """
    size = tuple(size)
    pix = batch.support_pix_from_input_pix.to(torch.float64)
    return norm_from_pix(size, device=pix.device) @ torch.linalg.inv(pix) @ pix_from_norm(size, device=pix.device)


def _map(matrix: Tensor, points: Tensor) -> Tensor:
    homogeneous = torch.cat((points, torch.ones_like(points[:, :1])), dim=1)  # (N, 3)
    mapped = homogeneous @ matrix.transpose(-1, -2)  # (B, N, 3)
    return mapped[..., :2] / mapped[..., 2:].clamp_min(1e-6)


def corner_loss(aligner: Aligner, theta: Tensor, batch: PairBatch) -> Tensor:
    """Per-pair geometric error in normalised units (``(B,)``), see the module docstring.

    Examples
    --------
    >>> import numpy as np
    >>> aligner = Aligner("affine", size=(32, 32), channels=(8,), iterations=1)
    >>> image = np.random.default_rng(0).integers(0, 256, (100, 100), dtype=np.uint8)
    >>> batch = batch_pairs([image], 2, "affine", out_size=32, rng=0)
    >>> corner_loss(aligner, aligner.transform.identity(2), batch).shape
    torch.Size([2])
    """
    if batch.family == "tps":
        size = aligner.size
        scale = torch.tensor([2.0 / size[1], 2.0 / size[0]], dtype=theta.dtype, device=theta.device)
        true_points = (batch.control_points_input_pix.to(theta.dtype) + 0.5) * scale - 1
        control = aligner.transform.control_points(dtype=theta.dtype).to(theta.device)
        predicted = control + theta.view(theta.shape[0], -1, 2)
        return (predicted - true_points).norm(dim=-1).mean(dim=1)
    true = true_theta_matrix(batch, aligner.size)
    predicted = aligner.transform.matrix(theta).to(torch.float64)
    corners = _CORNERS.to(theta.device)
    return (_map(predicted, corners) - _map(true, corners)).norm(dim=-1).mean(dim=1).to(theta.dtype)


def photometric_loss(aligner: Aligner, theta: Tensor, batch: PairBatch, kind: str = "l1") -> Tensor:
    """Dissimilarity of the input warped by ``theta`` and the support over their overlap (scalar)."""
    return photometric_loss_per_pair(aligner, theta, batch, kind).mean()


def photometric_loss_per_pair(aligner: Aligner, theta: Tensor, batch: PairBatch, kind: str = "l1") -> Tensor:
    """:func:`photometric_loss` of each pair (``(B,)``)."""
    warped = aligner.warp(torch.cat((batch.input, torch.ones_like(batch.input)), dim=1), theta)
    image, mask = warped[:, :1], (warped[:, 1:] > 0.99).to(warped.dtype)
    count = mask.sum(dim=(1, 2, 3)).clamp_min(1.0)
    if kind == "l1":
        return ((image - batch.support).abs() * mask).sum(dim=(1, 2, 3)).div(count)
    if kind == "ncc":
        def centred(x: Tensor) -> Tensor:
            mean = (x * mask).sum(dim=(1, 2, 3), keepdim=True) / count.view(-1, 1, 1, 1)
            return (x - mean) * mask
        a, b = centred(image), centred(batch.support)
        ncc = (a * b).sum(dim=(1, 2, 3)) / (a.pow(2).sum(dim=(1, 2, 3)).sqrt() * b.pow(2).sum(dim=(1, 2, 3)).sqrt() + 1e-6)
        return 1 - ncc
    raise ValueError(f"photometric loss must be 'l1' or 'ncc', got {kind!r}")


def plot_aligner_curve(metrics_path: str | os.PathLike[str], out_path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Plot training loss and validation corner error (pixels) against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    figure = Figure(figsize=(8, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, error_axes = figure.subplots(1, 2)
    loss = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    error = [(r["step"], r["test_error"]) for r in rows if r.get("test_error") is not None]
    if loss:
        loss_axes.plot(*zip(*loss), marker=".")
    if error:
        error_axes.plot(*zip(*error), marker=".", color="tab:red")
    loss_axes.set(xlabel="step", ylabel="corner loss (normalised)", title="training loss")
    error_axes.set(xlabel="step", ylabel="mean corner error (px)", title="validation")
    for axes in (loss_axes, error_axes):
        axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=100)
    return out_path


def _shard_pairs(batch: PairBatch, dist: DistributedContext) -> PairBatch:
    """This rank's slice of a global batch of pairs (the batch itself when not distributed)."""
    if not dist.enabled:
        return batch
    per_pair = ("input", "support", "support_pix_from_input_pix", "control_points_input_pix",
                "input_pix_from_support_pix_map")
    fields = {name: getattr(batch, name) for name in batch.__dataclass_fields__}
    for name in per_pair:
        if fields[name] is not None:
            (fields[name],) = dist.shard(fields[name])
    indices = torch.arange(len(batch.image_indices)).tensor_split(dist.world_size)[dist.rank].tolist()
    fields["image_indices"] = [batch.image_indices[i] for i in indices]
    return type(batch)(**fields)


def _prepare_images(images: Sequence, name: str) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) or not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"{name} must be a non-empty list of images or (name, image) pairs")
    arrays = [item[1] if isinstance(item, tuple) else item for item in images]
    return [to_gray_uint8(a, f"{name}[{i}]") for i, a in enumerate(arrays)]


def train_aligner(
    images: Sequence,
    family: str = "projective",
    out_dir: str | os.PathLike[str] = "runs/aligner",
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    *,
    size: Sequence[int] = (128, 128),
    channels: Sequence[int] = (16, 32, 64, 96),
    iterations: int = 2,
    fusion: str = "concat",
    ranges: WarpRanges | None = None,
    photometric: bool | PhotometricRanges = True,
    photometric_weight: float = 0.0,
    photometric_kind: str = "l1",
    val_images: Sequence | None = None,
    val_pairs: int = 64,
    eval_every: int = 100,
    checkpoint_every: int = 100,
    min_lr_ratio: float = 0.05,
    seed: int = 0,
    init: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    num_threads: int | None = None,
    device: str | torch.device = "cpu",
    amp: str = "off",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Aligner:
    """Train an aligner self-supervised on ``images``; return it (eval mode).

    Parameters
    ----------
    images : list of numpy.ndarray or of (name, numpy.ndarray)
        Training images, e.g. ``builtin_photos("train")``.
    family : {"affine", "projective", "tps"}
        Transform family (and family of the synthetic warps).
    out_dir : str or PathLike
        Run folder (see the module docstring for what is written there).
    steps : int
        Total optimisation steps (a resumed run continues up to this).
    batch_size : int
        Pairs per step.
    lr : float
        Adam's initial learning rate; cosine decay to ``lr * min_lr_ratio``.
    size, channels, iterations, fusion
        Architecture (see :class:`~stnkit.models.aligner.Aligner`).
    ranges : WarpRanges, optional
        Warp ranges of the training pairs (defaults of :class:`WarpRanges`;
        see :func:`homographynet_ranges` for the HomographyNet-like setting).
    photometric : bool or PhotometricRanges
        Photometric jitter of the pairs.
    photometric_weight : float
        Weight of the photometric loss term (0 disables it).
    photometric_kind : {"l1", "ncc"}
        The photometric dissimilarity.
    val_images : list, optional
        Images for the fixed validation pairs (same warp ranges); defaults to ``images``.
    val_pairs, eval_every, checkpoint_every : int
        Validation set size and how often (steps) to validate and to save ``last``.
    seed : int
        Seed of the pair stream and of the weights.
    init : str or PathLike, optional
        Start a new run from the weights of this aligner checkpoint (fine-tuning
        or a new schedule); its architecture replaces ``size``, ``channels`` and
        ``iterations``. Optimizer, schedule and step start afresh.
    resume : bool
        Continue from ``out_dir/checkpoints/last.safetensors``.
    overwrite : bool
        Start afresh even if ``out_dir`` holds a previous run.
    num_threads : int, optional
        ``torch.set_num_threads`` for the run.
    device : str or torch.device
        Training device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``... or ``"auto"``
        (``"cuda"`` under ``torchrun`` picks ``cuda:LOCAL_RANK``).
    amp : {"off", "bf16", "fp16"}
        Mixed precision of the forward pass: bfloat16 autocast (CPU or GPU), or
        float16 with a gradient scaler (GPU). The sampler, the grids and the
        losses stay in float32.
    progress : bool
        Show a tqdm progress bar (rank 0 only).
    log : callable, optional
        Receives one line per validation.

    Returns
    -------
    Aligner
        The trained model in eval mode (its config is stored for :func:`save_checkpoint`).

    Raises
    ------
    FileExistsError
        If ``out_dir`` holds a run and neither ``resume`` nor ``overwrite`` is set.
    FileNotFoundError
        If ``resume`` is set and there is no checkpoint to resume.
    ValueError
        On invalid arguments or a checkpoint that is not an aligner of this family.

    Examples
    --------
    >>> from stnkit.data.images import builtin_photos
    >>> model = train_aligner(builtin_photos("train")[:1], "affine", "/tmp/al", steps=2, batch_size=2,
    ...                       size=(32, 32), channels=(8,), overwrite=True, progress=False)  # doctest: +SKIP
    """
    if family not in ("affine", "projective", "tps"):
        raise ValueError(f"family must be 'affine', 'projective' or 'tps', got {family!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("val_pairs", val_pairs),
                        ("eval_every", eval_every), ("checkpoint_every", checkpoint_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(photometric_weight, (int, float)) and photometric_weight >= 0):
        raise ValueError(f"photometric_weight must be >= 0, got {photometric_weight!r}")
    if photometric_kind not in ("l1", "ncc"):
        raise ValueError(f"photometric_kind must be 'l1' or 'ncc', got {photometric_kind!r}")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    # Under torchrun: join the process group (see "Data-parallel" in the module docstring).
    device = resolve_device(device)
    dist = setup_distributed(device)
    device = dist.device_for(device)
    amp_dtype, scaler = mixed_precision(amp, device)
    if batch_size < dist.world_size:
        raise ValueError(f"batch_size ({batch_size}) must be at least the number of processes ({dist.world_size})")
    train = _prepare_images(images, "images")
    val = train if val_images is None else _prepare_images(val_images, "val_images")
    size = tuple(int(s) for s in size)

    out_dir = Path(out_dir)
    last_path = out_dir / "checkpoints" / "last.safetensors"
    best_path = out_dir / "checkpoints" / "best.safetensors"
    final_path = out_dir / "aligner.safetensors"
    metrics_path = out_dir / "metrics.csv"
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: is a file, expected a run folder")
    previous = [p for p in (last_path, final_path, metrics_path) if p.exists()]
    if resume and not last_path.exists():
        raise FileNotFoundError(f"{last_path}: no checkpoint to resume from")
    if previous and not resume and not overwrite:
        raise FileExistsError(f"{out_dir}: already holds a training run (pass resume=True or overwrite=True)")
    dist.barrier()  # every rank has looked at out_dir before rank 0 clears it

    config = {"kind": "aligner", "transform": family, "size": list(size), "channels": list(channels),
              "iterations": iterations, "fusion": fusion}
    torch.manual_seed(seed)
    model: Aligner = build_model(config)
    if init is not None and not resume:
        start = load_checkpoint(init)
        if start.config.get("kind") != "aligner" or start.config.get("transform") != family:
            raise ValueError(f"{init}: holds {start.config!r}, not an aligner of family {family!r}")
        model = build_model(start.config)
        model.load_state_dict(start.model_state)
        size = tuple(model.size)
    checkpoint = load_checkpoint(last_path) if resume else None
    if checkpoint is not None:
        if checkpoint.config.get("kind") != "aligner" or checkpoint.config.get("transform") != family:
            raise ValueError(f"{last_path}: holds {checkpoint.config!r}, not an aligner of family {family!r}")
        model = build_model(checkpoint.config)
        model.load_state_dict(checkpoint.model_state)
    model = dist.sync_batch_norm(model.to(device), device)
    net = dist.wrap(model, device)  # what the training step calls; `model` is the plain module
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * min_lr_ratio)
    rng = np.random.default_rng(seed)
    step, elapsed, skipped, best = 0, 0.0, 0, math.inf

    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint.optimizer_state)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr * min_lr_ratio)
        scheduler.load_state_dict(checkpoint.scheduler_state)
        scheduler.T_max = steps  # a resumed run may extend the schedule
        state = checkpoint.trainer_state or {}
        step, elapsed = int(state.get("step", 0)), float(state.get("time", 0.0))
        skipped, best = int(state.get("skipped_steps", 0)), float(state.get("best", math.inf))
        rng.bit_generator.state = state["numpy_generator"]
        restore_rng_state(state["rng"])
        metrics = MetricsLog(metrics_path, keep_until_step=step) if dist.is_main else None
    else:
        if dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            for path in (last_path, best_path, final_path, metrics_path):
                if path.exists():
                    path.unlink()
        metrics = MetricsLog(metrics_path) if dist.is_main else None
    log = log if dist.is_main else None

    val_batch = batch_pairs(val, val_pairs, family, size, ranges, photometric, np.random.default_rng(seed + 10_000))
    val_batch = val_batch.to(device)
    pixels_per_unit = (size[0] + size[1]) / 4.0  # normalised units -> pixels of the net size

    def validate() -> float:
        model.eval()
        with torch.no_grad():
            error = float(corner_loss(model, model(val_batch.input, val_batch.support), val_batch).mean())
        model.train()
        return error * pixels_per_unit

    def save(path: Path, with_state: bool) -> None:
        if not dist.is_main:
            return
        state = None
        if with_state:
            state = {"step": step, "time": elapsed, "skipped_steps": skipped, "best": best,
                     "numpy_generator": rng.bit_generator.state, "rng": capture_rng_state()}
        save_checkpoint(path, model, optimizer=optimizer if with_state else None,
                        scheduler=scheduler if with_state else None, trainer_state=state)

    model.train()
    if step == 0:
        identity_error = validate()
        if metrics is not None:
            metrics.append({"step": 0, "epoch": 0, "test_error": identity_error, "lr": lr, "time": 0.0,
                            "skipped_steps": 0})
        if log:
            log(f"step 0: validation corner error {identity_error:.2f} px ({'initial weights' if init else 'identity'})")
    bar = tqdm(total=steps, initial=step, disable=not (progress and dist.is_main), desc=f"aligner-{family}", unit="step")
    running, count, window_start, window_images = 0.0, 0, time.perf_counter(), 0
    try:
        while step < steps:
            started = time.perf_counter()
            # Every rank draws the same global batch (same rng) and keeps its slice.
            batch = _shard_pairs(batch_pairs(train, batch_size, family, size, ranges, photometric, rng), dist)
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                theta = net(batch.input, batch.support)
            theta = theta.float()
            per_pair = corner_loss(model, theta, batch)
            if photometric_weight > 0:
                per_pair = per_pair + photometric_weight * photometric_loss_per_pair(model, theta, batch, photometric_kind)
            # Summed over the global batch: DDP's mean over ranks is then the global batch's mean loss.
            loss = per_pair.sum() * (dist.world_size / batch_size)
            # One all-reduce: the logged loss, and the same skip decision on every rank.
            mean_loss = float(dist.all_reduce_sum(per_pair.detach().sum().reshape(1))) / batch_size
            optimizer.zero_grad(set_to_none=True)
            if math.isfinite(mean_loss):
                (loss if scaler is None else scaler.scale(loss)).backward()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)  # skips the step itself if the scaled gradients overflowed
                    scaler.update()
                running += mean_loss
                count += 1
            else:
                skipped += 1
            scheduler.step()
            step += 1
            window_images += batch_size
            elapsed += time.perf_counter() - started
            bar.update(1)
            if step % eval_every == 0 or step == steps:
                error = validate()
                rate = window_images / max(time.perf_counter() - window_start, 1e-9)
                train_loss = running / count if count else math.nan
                if metrics is not None:
                    metrics.append({"step": step, "epoch": 0, "train_loss": train_loss, "test_error": error,
                                    "lr": scheduler.get_last_lr()[0], "images_per_s": rate, "time": elapsed,
                                    "skipped_steps": skipped})
                bar.set_postfix(loss=f"{train_loss:.4f}", val_px=f"{error:.2f}")
                if log:
                    log(f"step {step}: loss {train_loss:.4f}, validation corner error {error:.2f} px, {elapsed:.0f} s")
                running, count, window_start, window_images = 0.0, 0, time.perf_counter(), 0
                if error < best:
                    best = error
                    save(best_path, with_state=False)
            if step % checkpoint_every == 0 or step == steps:
                save(last_path, with_state=True)
    finally:
        bar.close()
    save(final_path, with_state=False)
    if dist.is_main:
        plot_aligner_curve(metrics_path, out_dir / "loss.png", title=f"aligner ({family})")
    dist.barrier()  # no rank leaves before rank 0 has written the final files
    return model.eval()
