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
    draw_classifier_figure(model, x[:16], y[:16], figure_path, f"ST-CNN (affine) on RTS MNIST: test error {100 * error:.1f}%")
    click.echo(f"    wrote {figure_path}")

    if "aligner-projective" in shipped_models():
        from .align import demo_alignment

        click.echo("2/2 alignment: aligning a held-out photo patch to its support with the shipped aligner")
        demo_alignment(out, overwrite)
    else:
        click.echo("2/2 alignment: skipped (no shipped aligner in this build)")
