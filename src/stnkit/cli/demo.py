"""``stnkit demo``: the main job on built-in defaults, no downloads.

1. Classification: the shipped ST-CNN for RTS-distorted MNIST (or, with
   ``--from-scratch`` or when it is not shipped, one trained here for about a
   minute on the real-digit sample inside stnkit) classifies distorted digits;
   the figure shows each input with the predicted transform, the warped
   output, and the predicted class (after Fig. 1 of the ST paper).
2. Alignment: when the shipped aligner is present, a held-out photo is
   aligned to a support patch and an overlay is written.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from ..data.digits import load_digit_sample
from ..data.distortions import DistortedMNIST
from ..models import classifier, load_model, shipped_models
from ..training.trainer import evaluate
from .figure import draw_classifier_figure
from .main import CLIError


def train_for(seconds: float, seed: int = 0, log=click.echo):
    """Train an ST-CNN (affine) on RTS-distorted digits from the shipped sample for about ``seconds``."""
    torch.manual_seed(seed)
    images, labels = load_digit_sample("train")
    train = DistortedMNIST("rts", "train", seed=seed, images=images, labels=labels)
    model = classifier("st-cnn", "affine", (42, 42))
    localisation = [p for n, p in model.named_parameters() if "localisation" in n]
    others = [p for n, p in model.named_parameters() if "localisation" not in n]
    optimizer = torch.optim.Adam([{"params": others}, {"params": localisation, "lr": 3e-4}], lr=2e-3)
    started, step, epoch = time.perf_counter(), 0, 0
    model.train()
    while time.perf_counter() - started < seconds:
        x, y = train.epoch(epoch)
        order = torch.randperm(len(x))
        for start in range(0, len(x), 128):
            index = order[start : start + 128]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 20 == 0:
                log(f"  step {step:4d}  epoch {epoch}  loss {loss.item():.3f}  {time.perf_counter() - started:5.1f} s")
            if time.perf_counter() - started >= seconds:
                break
        epoch += 1
    model.eval()
    return model


def demo_alignment(path: Path, pairs: int = 3, rho: int = 32, seed: int = 7) -> None:
    """Align HomographyNet-style pairs cut from held-out photos; write support | input | aligned | checkerboard rows."""
    import cv2
    import numpy as np

    from ..data.images import builtin_photos
    from ..data.pairs import make_benchmark_pairs
    from ..evaluation.metrics import mace
    from ..models.aligner import Aligner
    from .align import overlay_picture

    aligner = Aligner.pretrained()
    rows = []
    for pair in make_benchmark_pairs([image for _, image in builtin_photos("heldout")], pairs, rho=rho, seed=seed):
        result = aligner.align(pair.input, pair.support)
        before = float(mace(np.eye(3), pair.support_pix_from_input_pix, pair.support.shape[0]))
        after = float(mace(result.matrix, pair.support_pix_from_input_pix, pair.support.shape[0]))
        click.echo(f"    {pair.name}: corner error {before:5.1f} px before, {after:5.2f} px after")
        rows.append(overlay_picture(pair.support, pair.input, result.image, result.matrix, height=192))
    width = max(row.shape[1] for row in rows)
    gap = np.full((8, width, 3), 255, np.uint8)
    picture = np.concatenate([piece for row in rows for piece in (row, gap)][:-1], axis=0)
    cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    click.echo(f"    wrote {path} (columns: support, input, aligned input, checkerboard of aligned over support)")


def _fresh(path: Path, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise CLIError(f"{path} exists; pass --overwrite to replace it")
    return path


@click.command(context_settings={"show_default": True})
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="out/demo", help="Folder for the figures.")
@click.option("--from-scratch", is_flag=True, help="Train the classifier here instead of loading the shipped one.")
@click.option("--train-seconds", type=float, default=60.0, help="Training time with --from-scratch.")
@click.option("--overwrite", is_flag=True, help="Replace figures already in --out.")
def command(out_dir, from_scratch, train_seconds, overwrite):
    """Classify distorted digits with a spatial transformer and draw what it does."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure_path = _fresh(out / "fig1_rts.png", overwrite)

    if not from_scratch and "mnist-rts" in shipped_models():
        click.echo("1/2 classification: loading the shipped ST-CNN (mnist-rts)")
        model = load_model("mnist-rts")
    else:
        click.echo(f"1/2 classification: training an ST-CNN (affine) on RTS digits for {train_seconds:.0f} s")
        model = train_for(train_seconds)
    images, labels = load_digit_sample("test")
    x, y = DistortedMNIST("rts", "test", images=images, labels=labels).epoch(0)
    error = evaluate(model, x, y)
    click.echo(f"    test error on {len(y)} RTS-distorted sample digits: {100 * error:.2f}%")
    draw_classifier_figure(
        model, x[:16], y[:16], figure_path, f"ST-CNN (affine) on RTS MNIST: {100 * error:.1f}% error on the {len(y)} sample test digits"
    )
    click.echo(f"    wrote {figure_path}")

    if "aligner-projective" in shipped_models():
        click.echo("2/2 alignment: aligning held-out photo patches to their supports with the shipped aligner")
        demo_alignment(_fresh(out / "alignment.png", overwrite))
    else:
        click.echo("2/2 alignment: skipped (no shipped aligner in this build)")
