"""Tests for the model registry and safetensors checkpoints (stnkit.models)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from stnkit.models import checkpoint as checkpoint_module
from stnkit.models.checkpoint import (
    FORMAT,
    capture_rng_state,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
)
from stnkit.models.registry import build_model, model_config, model_kinds, register_model


@register_model("test-ckpt-convnet")
def build_tiny_convnet(channels: int = 4, classes: int = 3) -> nn.Module:
    """A conv net on 1x8x8 inputs with a BatchNorm, so buffers are saved too."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 6 * 6, classes),
    )


CONFIG = {"kind": "test-ckpt-convnet", "channels": 4, "classes": 3}


def trained_model(steps: int = 3, optimizer_name: str = "adam") -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(CONFIG)
    optimizer = make_optimizer(model, optimizer_name)
    train_steps(model, optimizer, steps, seed=1)
    return model, optimizer


def make_optimizer(model: nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 1, 8, 8, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_registry_builds_and_stores_config():
    model = build_model({"kind": "test-ckpt-convnet", "channels": 2})
    assert model[0].out_channels == 2
    assert model.stnkit_config == {"kind": "test-ckpt-convnet", "channels": 2, "classes": 3}  # defaults filled in
    assert model_config(model) == model.stnkit_config
    assert "test-ckpt-convnet" in model_kinds()


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown model kind 'nope'.*test-ckpt-convnet"):
        build_model({"kind": "nope"})
    with pytest.raises(TypeError, match="does not fit its builder"):
        build_model({"kind": "test-ckpt-convnet", "width": 3})
    with pytest.raises(ValueError, match="JSON"):
        build_model({"kind": "test-ckpt-convnet", "channels": object()})
    with pytest.raises(ValueError, match="already registered"):
        register_model("test-ckpt-convnet")(lambda: nn.Identity())
    with pytest.raises(ValueError, match="no stored config"):
        model_config(nn.Linear(2, 2))


def test_round_trip_gives_identical_outputs(tmp_path):
    model, _ = trained_model()
    model.eval()
    path = save_checkpoint(tmp_path / "model.safetensors", model)
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.stnkit_config == CONFIG
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


def test_metadata_fields(tmp_path):
    model, _ = trained_model(steps=0)
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model))
    metadata = checkpoint.metadata
    assert metadata["format"] == FORMAT
    assert metadata["format_version"] == "1"
    assert set(metadata) >= {"config", "stnkit_version", "created", "sha256"}
    assert metadata["created"].endswith("+00:00")
    assert checkpoint.optimizer_state is None and checkpoint.trainer_state is None


@pytest.mark.parametrize("optimizer_name", ["adam", "sgd"])
def test_optimizer_round_trip_continues_bit_identically(tmp_path, optimizer_name):
    model, optimizer = trained_model(optimizer_name=optimizer_name)
    path = save_checkpoint(tmp_path / "m.safetensors", model, optimizer=optimizer)

    checkpoint = load_checkpoint(path)
    restored = build_model(checkpoint.config)
    restored.load_state_dict(checkpoint.model_state)
    restored_optimizer = make_optimizer(restored, optimizer_name)
    restored_optimizer.load_state_dict(checkpoint.optimizer_state)

    train_steps(model, optimizer, 3, seed=2)
    train_steps(restored, restored_optimizer, 3, seed=2)
    for name, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name


def test_scheduler_and_trainer_state_round_trip(tmp_path):
    model, optimizer = trained_model()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    train_steps(model, optimizer, 1, seed=3)
    scheduler.step()
    trainer_state = {"epoch": 3, "best": {"error": 0.125, "step": 7}, "pair": (1, 2.5), "raw": b"\x00\xff", "t": torch.arange(3)}
    path = save_checkpoint(tmp_path / "m.safetensors", model, optimizer=optimizer, scheduler=scheduler, trainer_state=trainer_state)
    checkpoint = load_checkpoint(path)
    assert checkpoint.scheduler_state == scheduler.state_dict()
    state = checkpoint.trainer_state
    assert state["epoch"] == 3 and state["best"] == {"error": 0.125, "step": 7}
    assert state["pair"] == (1, 2.5) and state["raw"] == b"\x00\xff"
    assert torch.equal(state["t"], torch.arange(3))


def test_rng_state_round_trip(tmp_path):
    model, _ = trained_model(steps=0)
    path = save_checkpoint(tmp_path / "m.safetensors", model, trainer_state={"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(load_checkpoint(path).trainer_state["rng"])
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_atomic_write_leaves_only_the_checkpoint(tmp_path):
    model, optimizer = trained_model()
    save_checkpoint(tmp_path / "m.safetensors", model, optimizer=optimizer)
    save_checkpoint(tmp_path / "m.safetensors", model, optimizer=optimizer)  # overwrite in place
    assert os.listdir(tmp_path) == ["m.safetensors"]
    with pytest.raises(FileExistsError, match="already exists"):
        save_checkpoint(tmp_path / "m.safetensors", model, overwrite=False)


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    model, _ = trained_model(steps=0)
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    before = path.read_bytes()

    def failing_replace(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, trainer_state={"epoch": 1})
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert path.read_bytes() == before


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("keep", [4, 40, "half"])
def test_truncated_file_is_refused(tmp_path, keep):
    model, optimizer = trained_model()
    path = save_checkpoint(tmp_path / "m.safetensors", model, optimizer=optimizer)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    with pytest.raises(ValueError, match="m.safetensors: truncated") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_altered_tensor_byte_is_detected(tmp_path):
    model, optimizer = trained_model()
    path = save_checkpoint(tmp_path / "m.safetensors", model, optimizer=optimizer)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data, which follows the header
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="m.safetensors: checksum mismatch: the file was altered or corrupted"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_model(path)


def test_altered_config_is_detected(tmp_path):
    model, _ = trained_model(steps=0)
    path = save_checkpoint(tmp_path / "m.safetensors", model)
    data = path.read_bytes()
    # Same length, still valid JSON, different meaning.
    altered = data.replace(b'\\"channels\\": 4', b'\\"channels\\": 5')
    assert altered != data
    path.write_bytes(altered)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_checkpoint(path)


def test_foreign_files_are_refused(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not the tensors you are looking for\n")
    with pytest.raises(ValueError, match="notes.safetensors: not a safetensors file"):
        load_checkpoint(text)

    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="plain.safetensors: not a stnkit checkpoint"):
        load_checkpoint(plain)

    with pytest.raises(ValueError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    model, _ = trained_model(steps=0)
    path = save_checkpoint(tmp_path / "m.safetensors", model, {**CONFIG, "channels": 2})
    with pytest.raises(ValueError, match="weights do not fit the model config"):
        load_model(path)


def test_load_model_unknown_name_lists_shipped_models(monkeypatch):
    monkeypatch.setattr(checkpoint_module, "shipped_models", lambda: ["mnist-rts", "mnist-rts-small"])
    with pytest.raises(FileNotFoundError, match="no shipped model of that name; shipped models: mnist-rts, mnist-rts-small"):
        load_model("no-such-model")


def test_load_model_by_shipped_name(tmp_path, monkeypatch):
    # Point the asset lookup at a temporary package folder holding one model.
    model, _ = trained_model()
    save_checkpoint(tmp_path / "assets" / "models" / "tiny.safetensors", model)
    monkeypatch.setattr(checkpoint_module.importlib.resources, "files", lambda package: tmp_path)
    monkeypatch.chdir(tmp_path / "assets")  # so "tiny" is not also a local path
    assert checkpoint_module.shipped_models() == ["tiny"]
    loaded = load_model("tiny")
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
