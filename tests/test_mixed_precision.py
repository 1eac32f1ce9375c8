"""Mixed precision: bfloat16 autocast (CPU and GPU), float16 + GradScaler (GPU), and the trainer's amp/tensorboard options."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from stnkit.models.classifiers import classifier
from stnkit.training.trainer import METRICS_FILE, TrainConfig, Trainer

FAMILIES = ["affine", "projective", {"name": "projective", "parametrisation": "corners"}, "tps"]


def _data(count: int = 40, size: int = 28):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(count, 1, size, size, generator=generator)
    y = torch.randint(0, 10, (count,), generator=generator)
    return x, y


def _nudged(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_transformer_samples_in_float32_under_bf16_autocast(family):
    model = _nudged(classifier("st-cnn", family, (28, 28))).eval()
    x = _data(4)[0]
    with torch.no_grad():
        reference = model.transformer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            warped = model.transformer(x)
            theta = model.transformer.last_theta
            grid = model.transformer.transform.grid(theta, (28, 28))
            logits = model(x)
    # Grid and sampler in float32: only the localisation net's bf16 rounding remains.
    assert warped.dtype == torch.float32 and grid.dtype == torch.float32
    assert (warped - reference).abs().max() < 0.1
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["affine", "tps"])
def test_bf16_training_stays_finite(tmp_path, family):
    x, y = _data()
    torch.manual_seed(0)
    model = classifier("st-cnn", family, (28, 28))
    config = TrainConfig(epochs=1, batch_size=10, lr=0.02, amp="bf16", out_dir=tmp_path, progress=False, eval_every=2)
    result = Trainer(model, None, lambda epoch: (x, y), (x[:10], y[:10]), config).fit()
    assert result.steps == 4 and result.skipped_steps == 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    with open(tmp_path / METRICS_FILE, newline="") as handle:
        losses = [float(row["train_loss"]) for row in csv.DictReader(handle)]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_amp_setting_is_checked():
    with pytest.raises(ValueError, match="amp must be 'off', 'bf16' or 'fp16'"):
        TrainConfig(amp="int8")
    assert TrainConfig().to_dict()["amp"] == "off"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp16_needs_cuda():
    x, y = _data(10)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Trainer(classifier("st-fcn", "affine", (28, 28)), None, lambda epoch: (x, y), (x, y), TrainConfig(amp="fp16"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_gpu_autocast_training_stays_finite(amp):
    x, y = _data()
    model = classifier("st-cnn", "tps", (28, 28))
    config = TrainConfig(epochs=1, batch_size=10, amp=amp, device="cuda", progress=False, max_grad_norm=1.0)
    result = Trainer(model, None, lambda epoch: (x, y), (x[:10], y[:10]), config).fit()
    assert result.steps == 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_tensorboard_option_writes_event_files(tmp_path):
    pytest.importorskip("torch.utils.tensorboard")
    x, y = _data(20)
    config = TrainConfig(epochs=1, batch_size=10, out_dir=tmp_path, progress=False, tensorboard=True)
    Trainer(classifier("fcn", None, (28, 28)), None, lambda epoch: (x, y), (x, y), config).fit()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / METRICS_FILE).is_file()


def test_aligner_training_under_bf16_autocast_stays_finite(tmp_path):
    import numpy as np

    from stnkit.models.checkpoint import load_checkpoint
    from stnkit.training.aligner_training import train_aligner

    images = [np.random.default_rng(i).integers(0, 256, (80, 96), dtype=np.uint8) for i in range(2)]
    train_aligner(images, "projective", tmp_path / "run", steps=6, batch_size=4, size=(32, 32), channels=(8, 8),
                  iterations=2, val_pairs=4, eval_every=3, checkpoint_every=6, amp="bf16", progress=False)
    state = load_checkpoint(tmp_path / "run" / "aligner.safetensors").model_state
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
    with open(tmp_path / "run" / "metrics.csv") as handle:
        assert "nan" not in handle.read().lower()


def test_aligner_training_refuses_fp16_on_the_cpu(tmp_path):
    import numpy as np

    from stnkit.training.aligner_training import train_aligner

    with pytest.raises(ValueError, match="fp16.*needs a CUDA device"):
        train_aligner([np.zeros((40, 40), np.uint8)], "affine", tmp_path / "run", steps=1, batch_size=2,
                      size=(16, 16), channels=(4,), amp="fp16", progress=False)
