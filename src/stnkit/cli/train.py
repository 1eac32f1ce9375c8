"""``stnkit train``: train a distorted-MNIST classifier with checkpoints, metrics and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import torch

from ..models.checkpoint import load_checkpoint, load_model
from ..models.classifiers import MODEL_NAMES, classifier, count_parameters
from ..models.invariance_models import INVARIANCE_VARIANTS, invariance_model
from ..training.trainer import LAST_CHECKPOINT, TrainConfig, Trainer, resolve_device
from ._options import check_model_fits_task, data_options, hold_out, limit, run_info, task_splits, threads_option
from .main import CLIError

# The STN variants of Finnveden et al. that `--model` accepts. Their plain "cnn" is left out on
# purpose: here "cnn" is the ST paper's baseline, as in `stnkit table1` and `stnkit models`.
STN_VARIANTS = tuple(name for name in INVARIANCE_VARIANTS if name.startswith("stn-"))


@click.command(context_settings={"show_default": True})
@data_options
@click.option(
    "--model",
    "model_name",
    type=click.Choice(MODEL_NAMES + STN_VARIANTS),
    default="st-cnn",
    help="Architecture: the ST paper's models, or the STN variants of Finnveden et al. (stn-*).",
)
@click.option("--layer", type=int, default=2, help="stn-features/-deep-loc/-shared/-iterative: the classifier block k.")
@click.option("--transform", default="affine", help="Transformer family of ST models: affine, projective, tps, ...")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Run folder (metrics, plot, checkpoints).")
@click.option("--epochs", type=int, default=None, help="Passes over the training set, distortions redrawn each epoch [default: 20; on --resume, the run's own].")
@click.option("--batch-size", type=int, default=256)
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd")
@click.option("--lr", type=float, default=0.01, help="Base learning rate.")
@click.option("--momentum", type=float, default=0.9)
@click.option("--weight-decay", type=float, default=0.0)
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Dropout before the classifier's last layer (FCN/CNN models; 0: none, as in the paper).")
@click.option(
    "--iterations", type=click.IntRange(min=1), default=None,
    help="Refinement rounds of the transformer: the localisation net re-reads the warped input and the updates "
    "compose (same parameters) [default: 1, as in the paper; with --init, the checkpoint's].",
)
@click.option("--jitter-px", type=float, default=0.0, show_default=True,
              help="Training augmentation, not in the paper: bend each training digit by a 4x4 thin-plate spline "
                   "whose control points move by N(0, PX) pixels, before the task's distortion. Test sets never get it.")
@click.option("--loc-lr-scale", type=float, default=0.1, help="Learning-rate factor of the localisation net.")
@click.option("--schedule", type=click.Choice(["step", "cosine"]), default="cosine", help="Learning-rate schedule.")
@click.option("--lr-steps", default="", help="Comma-separated epochs at which the step schedule divides the lr by 10.")
@click.option("--max-grad-norm", type=float, default=None, help="Clip the gradient norm.")
@click.option("--ema-decay", type=float, default=0.0, show_default=True,
              help="Also keep a moving average of the weights with this decay, e.g. 0.999, written to "
                   "OUT/checkpoints/ema.safetensors (0: none, as in the paper).")
@click.option("--consistency", "consistency_weight", type=float, default=0.0, show_default=True,
              help="Weight of a consistency loss, not in the paper: the transformer must find the same canonical frame "
                   "for each digit and for a copy warped by a random similarity (0: off, as in the paper).")
@click.option("--consistency-rotation", type=float, default=20.0, help="That similarity's rotation range, +- degrees.")
@click.option("--consistency-scale", type=float, default=0.1, help="Its ln-scale range, +-.")
@click.option("--consistency-shift", type=float, default=0.1, help="Its shift range, +- normalised units (1: half the image).")
@click.option("--seed", type=int, default=0)
@click.option("--test-seed", type=int, default=0, help="Seed of the fixed test set.")
@click.option("--val-size", type=int, default=0, show_default=True,
              help="Hold the last N training digits out as a validation set (distorted once); it then picks "
                   "best.safetensors instead of the test set.")
@click.option("--train-limit", type=int, default=None, help="Use only the first N training digits.")
@click.option("--test-limit", type=int, default=None, help="Evaluate on only the first N test digits.")
@click.option("--checkpoint-every", type=int, default=200, help="Steps between checkpoints (and at every epoch end).")
@click.option("--eval-every", type=int, default=0, help="Steps between test evaluations (0: epoch ends).")
@click.option("--max-steps", type=int, default=None, help="Stop after this many steps in total (resume continues).")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:N or auto.")
@threads_option
@click.option(
    "--data-device", type=click.Choice(["train", "cpu"]), default="train", show_default=True,
    help="Where each epoch's distortions are warped: on the training device, or on the CPU (the test set always is).",
)
@click.option("--init", "init_from", default=None, help="Start from the weights of this checkpoint (path or shipped name), with a new schedule.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off",
              help="Mixed precision: bf16 autocast (CPU or GPU), fp16 with a gradient scaler (GPU).")
@click.option("--tensorboard", is_flag=True, help="Also write the metrics to OUT/tb for TensorBoard.")
def command(
    task, data_root, digit_sample, model_name, layer, transform, out_dir, epochs, batch_size, optimizer, lr, momentum,
    weight_decay, dropout, iterations, jitter_px, loc_lr_scale, schedule, lr_steps, max_grad_norm, ema_decay,
    consistency_weight, consistency_rotation, consistency_scale, consistency_shift, seed, test_seed,
    val_size, train_limit, test_limit, checkpoint_every, eval_every, max_steps, device, data_device, init_from, resume,
    overwrite, progress, amp, tensorboard,
):
    """Train a classifier (FCN, CNN, ST-FCN, ST-CNN) on a distorted-MNIST task."""
    out = Path(out_dir)
    if resume:
        last = out / LAST_CHECKPOINT
        if not last.is_file():
            raise CLIError(f"--resume: no checkpoint at {last}")
        if dropout or iterations is not None or init_from is not None or jitter_px or val_size or ema_decay or consistency_weight:
            # The model and data come from the run's checkpoint as it was saved; these would be silently ignored.
            raise CLIError("--resume continues the run as it was set up; --dropout, --iterations, --init, "
                           "--jitter-px, --val-size, --ema-decay and --consistency apply to a new run")
        state = load_checkpoint(last).trainer_state or {}
        info = state.get("run_info", {})
        task, data_root, digit_sample, test_seed = info["task"], info["data_root"], info["digit_sample"], info["test_seed"]
        # The run's own seed drives its distortions: a resumed run must see the same data.
        seed = state.get("train_config", {}).get("seed", seed)
        train_limit, test_limit = info.get("train_limit"), info.get("test_limit")
        jitter_px, val_size = info.get("jitter_px", 0.0), info.get("val_size", 0)
    if not math.isfinite(jitter_px) or jitter_px < 0:
        raise CLIError(f"--jitter-px must be a finite number of pixels >= 0, got {jitter_px}")
    if jitter_px and task == "cluttered":
        raise CLIError("--jitter-px: the cluttered task pastes digits without resampling; leave it at 0")
    train, test = task_splits(task, data_root, digit_sample, seed=seed, test_seed=test_seed, jitter_px=jitter_px)
    try:
        train, val = hold_out(train, val_size)
    except ValueError as error:
        raise CLIError(str(error)) from None
    val_data = None if val is None else val.epoch(0)
    test_data = limit(*test.epoch(0), test_limit)

    # On a GPU, warping 60,000 digits each epoch on the host would take longer than training on them.
    # A bare "cuda" means the current device, which the Trainer sets to this rank's GPU under torchrun.
    warp_device = resolve_device(device)
    warp_device = warp_device if warp_device.type == "cuda" and data_device == "train" else None

    def epoch_data(epoch: int):
        return limit(*train.epoch(epoch, device=warp_device), train_limit)

    overrides = {"progress": progress, "device": device, "max_steps": max_steps, "amp": amp, "tensorboard": tensorboard}
    if epochs is not None:
        overrides["epochs"] = epochs
    elif not resume:
        overrides["epochs"] = 20
    if resume:
        trainer = Trainer.resume(out, epoch_data, test_data, val_data=val_data, **overrides)
    else:
        steps = tuple(int(s) for s in lr_steps.split(",") if s.strip())
        config = TrainConfig(
            batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
            localisation_lr_scale=loc_lr_scale, lr_schedule=schedule, lr_steps=steps, max_grad_norm=max_grad_norm,
            seed=seed, checkpoint_every=checkpoint_every, eval_every=eval_every, out_dir=out, overwrite=overwrite,
            ema_decay=ema_decay, consistency_weight=consistency_weight, consistency_rotation=consistency_rotation,
            consistency_scale=consistency_scale, consistency_shift=consistency_shift, **overrides,
        )
        torch.manual_seed(seed)
        if dropout and (init_from is not None or model_name in STN_VARIANTS):
            raise CLIError("--dropout applies to a new fcn, cnn, st-fcn or st-cnn model, not to --init or the invariance variants")
        if iterations is not None and not model_name.startswith("st-") and init_from is None:
            raise CLIError(f"--iterations applies to st-fcn and st-cnn models, not to {model_name!r}")
        if init_from is not None:
            model = load_model(init_from)
            model.train()
            if getattr(model, "transform_input", None) is None:
                raise CLIError(f"--init {init_from}: not a classifier checkpoint")
            check_model_fits_task(model, f"--init {init_from}", task)
            model_name = model.stnkit_config.get("model", model_name)
            transform = model.stnkit_config.get("transform", transform)
            if iterations is not None:
                if model.stnkit_config.get("kind") != "classifier" or model.transformer is None:
                    raise CLIError(f"--iterations: {init_from} is not an st-fcn or st-cnn checkpoint")
                # Same parameters, more rounds: the config must say so, or the checkpoint would reload with the old count.
                model.transformer.iterations = iterations
                model.stnkit_config["iterations"] = iterations
        elif model_name in STN_VARIANTS:
            model = invariance_model(model_name, transform, (train.size, train.size), layer=layer)
        else:
            options = {} if iterations is None else {"iterations": iterations}
            model = classifier(model_name, transform, (train.size, train.size), dropout=dropout, **options)
        info = run_info(task, data_root, digit_sample, test_seed)
        info.update(train_limit=train_limit, test_limit=test_limit, init=init_from, jitter_px=jitter_px, val_size=val_size)
        has_transformer = model_name.startswith(("st-", "stn-"))
        train_count = len(train) if train_limit is None else min(train_limit, len(train))
        val_note = f", {val_size} validation digits" if val_size else ""
        click.echo(f"{model_name} ({transform if has_transformer else 'no transformer'}) on {task}: "
                   f"{count_parameters(model):,} parameters, {train_count} training digits{val_note}, "
                   f"{len(test_data[0])} test digits")
        trainer = Trainer(model, None, epoch_data, test_data, config, run_info=info, val_data=val_data)
    result = trainer.fit()
    summary = {
        "task": task, "steps": result.steps, "epochs": result.epochs_completed,
        "test_error": result.test_error, "best_test_error": result.best_test_error,
        "skipped_steps": result.skipped_steps, "out": str(out),
    }
    if val_data is not None:
        summary.update(val_error=result.val_error, best_val_error=result.best_val_error, best_step=result.best_step)
    if trainer.dist.is_main:  # under torchrun, print once
        click.echo(json.dumps(summary))
