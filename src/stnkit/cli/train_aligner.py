"""``stnkit train-aligner``: train an input-to-support aligner self-supervised on a folder of images."""

from __future__ import annotations

from pathlib import Path

import click

from ._options import threads_option
from .main import CLIError


@click.command(name="train-aligner", context_settings={"show_default": True})
@click.option("--images", "images_dir", type=click.Path(path_type=Path), default=None,
              help="Folder of training images (any size, colour or greyscale).")
@click.option("--builtin", is_flag=True, help="Train on the built-in training photos (never the held-out ones).")
@click.option("--transform", "family", type=click.Choice(["affine", "projective", "tps"]), default="projective",
              help="Transform family of the aligner and of the synthetic warps.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Run folder: checkpoints/, aligner.safetensors, metrics.csv, loss.png.")
@click.option("--steps", type=click.IntRange(min=1), default=2000, help="Optimisation steps in total.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, help="Adam learning rate (cosine decay).")
@click.option("--size", type=click.IntRange(min=16), default=128, help="Side of the square net input.")
@click.option("--iterations", type=click.IntRange(min=1), default=2, help="Refinement iterations.")
@click.option("--fusion", type=click.Choice(["concat", "correlation"]), default="concat",
              help="How the net combines input and support: stacked channels, or a correlation volume of "
                   "shared features.")
@click.option("--rho", type=click.FloatRange(min=0), default=None,
              help="HomographyNet-like corner perturbation in pixels of the net size (projective); "
                   "default: the library's WarpRanges.")
@click.option("--photometric-weight", type=click.FloatRange(min=0), default=0.0, help="Weight of the photometric loss.")
@click.option("--photometric-loss", type=click.Choice(["l1", "ncc"]), default="l1")
@click.option("--eval-every", type=click.IntRange(min=1), default=100, help="Steps between validations.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, help="Steps between checkpoints.")
@click.option("--seed", type=int, default=0)
@threads_option
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun, cuda picks cuda:LOCAL_RANK).")
@click.option("--amp", type=click.Choice(["off", "bf16", "fp16"]), default="off",
              help="Mixed precision: bf16 autocast (CPU or GPU), fp16 with a gradient scaler (GPU).")
@click.option("--init", "init", type=click.Path(path_type=Path), default=None,
              help="Start from the weights of this aligner checkpoint (new optimizer and schedule).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def command(images_dir, builtin, family, out_dir, steps, batch_size, lr, size, iterations, fusion, rho, photometric_weight,
            photometric_loss, eval_every, checkpoint_every, seed, device, amp, init, resume, overwrite, progress) -> None:
    """Train an aligner on synthetic warps of training images (no labels needed).

    Validation pairs come from the built-in held-out photos with --builtin,
    otherwise from the training images themselves. Under torchrun it trains
    data-parallel (--batch-size is the global batch; rank 0 writes the files).
    """
    from stnkit.data.images import builtin_photos, load_image_folder
    from stnkit.training.aligner_training import homographynet_ranges, train_aligner

    if (images_dir is None) == (not builtin):
        raise CLIError("give exactly one of --images DIR and --builtin")
    if builtin:
        images, val_images = builtin_photos("train"), builtin_photos("heldout")
    else:
        images, val_images = load_image_folder(images_dir), None
    ranges = None
    if rho is not None:
        if rho >= size / 2:
            raise CLIError(f"--rho must be below half the net size ({size / 2}), got {rho}")
        ranges = homographynet_ranges(rho, size)
    train_aligner(
        images, family, out_dir, steps, batch_size, lr, size=(size, size), iterations=iterations, fusion=fusion, ranges=ranges,
        photometric_weight=photometric_weight, photometric_kind=photometric_loss, val_images=val_images,
        eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed, init=init, resume=resume, overwrite=overwrite,
        device=device, amp=amp, progress=progress, log=click.echo,
    )
    click.echo(f"aligner written to {Path(out_dir) / 'aligner.safetensors'}")
