"""Tests for weight averaging of checkpoints (stnkit.models.averaging, ``stnkit average``)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from stnkit.cli.main import main
from stnkit.models import Ensemble, average_checkpoints, load_checkpoint, load_model, save_checkpoint
from stnkit.models.registry import build_model, register_model


@register_model("test-avg-convnet")
def build_tiny_convnet(channels: int = 4) -> nn.Module:
    """A conv net with a BatchNorm, so float buffers and an integer counter are saved too."""
    return nn.Sequential(nn.Conv2d(1, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(), nn.Flatten(),
                         nn.Linear(channels * 6 * 6, 3))


def trained_checkpoint(path, seed: int, steps: int = 2, channels: int = 4):
    """Save a model whose weights and BatchNorm statistics depend on ``seed``."""
    torch.manual_seed(seed)
    model = build_model({"kind": "test-avg-convnet", "channels": channels}).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
    return save_checkpoint(path, model)


def test_average_is_the_elementwise_mean(tmp_path):
    paths = [trained_checkpoint(tmp_path / f"m{seed}.safetensors", seed) for seed in (1, 2, 3)]
    out = average_checkpoints(paths, tmp_path / "avg.safetensors")
    states = [load_checkpoint(path).model_state for path in paths]
    averaged = load_checkpoint(out)
    for name, tensor in averaged.model_state.items():
        if tensor.is_floating_point():
            expected = torch.stack([state[name].double() for state in states]).mean(0).to(tensor.dtype)
            torch.testing.assert_close(tensor, expected, rtol=0, atol=0)
        else:
            assert torch.equal(tensor, states[0][name])  # num_batches_tracked: equal in all three, kept
    assert averaged.config == load_checkpoint(paths[0]).config
    assert averaged.trainer_state["averaged_from"] == [str(path) for path in paths]
    assert averaged.optimizer_state is None
    model = load_model(out)  # a plain, loadable model checkpoint
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_average_of_copies_round_trips(tmp_path):
    path = trained_checkpoint(tmp_path / "m.safetensors", seed=5)
    out = average_checkpoints([path, path], tmp_path / "avg.safetensors")
    original, averaged = load_checkpoint(path).model_state, load_checkpoint(out).model_state
    assert original.keys() == averaged.keys()
    for name in original:
        assert torch.equal(original[name], averaged[name]), name


def test_float64_checkpoints_average_and_load_in_float64(tmp_path):
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = build_model({"kind": "test-avg-convnet", "channels": 4}).double()
        paths.append(save_checkpoint(tmp_path / f"m{seed}.safetensors", model))
    out = average_checkpoints(paths, tmp_path / "avg.safetensors")
    states = [load_checkpoint(path).model_state for path in paths]
    averaged = load_checkpoint(out).model_state
    weight = averaged["0.weight"]
    assert weight.dtype == torch.float64
    torch.testing.assert_close(weight, (states[0]["0.weight"] + states[1]["0.weight"]) / 2, rtol=0, atol=1e-15)
    model = load_model(out)
    assert next(model.parameters()).dtype == torch.float64
    assert torch.equal(model.state_dict()["0.weight"], weight)  # not rounded through float32


def test_average_errors_name_the_problem(tmp_path):
    a = trained_checkpoint(tmp_path / "a.safetensors", seed=1)
    with pytest.raises(ValueError, match="at least two checkpoints, got 1"):
        average_checkpoints([a], tmp_path / "out.safetensors")
    wide = trained_checkpoint(tmp_path / "wide.safetensors", seed=2, channels=5)
    with pytest.raises(ValueError, match=r"wide\.safetensors: model config .* differs from .*a\.safetensors"):
        average_checkpoints([a, wide], tmp_path / "out.safetensors")
    longer = trained_checkpoint(tmp_path / "longer.safetensors", seed=3, steps=3)  # num_batches_tracked 3, not 2
    with pytest.raises(ValueError, match=r"longer\.safetensors: non-float tensor '1\.num_batches_tracked' differs"):
        average_checkpoints([a, longer], tmp_path / "out.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        average_checkpoints([a, tmp_path / "missing.safetensors"], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    a, b = (trained_checkpoint(tmp_path / f"{name}.safetensors", seed) for name, seed in (("a", 1), ("b", 2)))
    out = tmp_path / "avg.safetensors"
    out.write_bytes(b"the user's file")
    with pytest.raises(FileExistsError, match="already exists"):
        average_checkpoints([a, b], out)
    assert out.read_bytes() == b"the user's file"
    average_checkpoints([a, b], out, overwrite=True)
    assert load_checkpoint(out).trainer_state["average"] == "uniform"


def test_cli_average(tmp_path, capsys):
    a, b = (trained_checkpoint(tmp_path / f"{name}.safetensors", seed) for name, seed in (("a", 1), ("b", 2)))
    out = tmp_path / "avg.safetensors"
    assert main(["average", str(a), str(b), "-o", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"out": str(out), "averaged": [str(a), str(b)]}
    assert main(["average", str(a), str(b), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
    assert main(["average", str(a), "-o", str(out), "--overwrite"]) == 1
    assert "at least two checkpoints, got 1" in capsys.readouterr().err
    assert main(["average", str(a), str(b), "-o", str(out), "--overwrite"]) == 0


def test_ensemble_returns_the_log_of_the_mean_probability(tmp_path):
    members = [load_model(trained_checkpoint(tmp_path / f"{seed}.safetensors", seed)) for seed in (1, 2, 3)]
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = torch.stack([member(x).softmax(1) for member in members]).mean(0)
        output = Ensemble(members)(x)
    torch.testing.assert_close(output.exp(), expected)
    assert output.shape == (5, 3)


def test_ensemble_stays_finite_where_a_probability_underflows():
    class Confident(nn.Module):
        def forward(self, x):
            return torch.tensor([[0.0, 1e4, -1e4]]).expand(len(x), 3), "second output ignored"

    output = Ensemble([Confident(), Confident()])(torch.zeros(2, 1))
    assert torch.isfinite(output).all() and output.argmax(1).tolist() == [1, 1]  # softmax-then-log gives -inf


def test_ensemble_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least two members, got 1"):
        Ensemble([nn.Linear(2, 3)])
    with pytest.raises(TypeError, match="member 1 must be an nn.Module, got function"):
        Ensemble([nn.Linear(2, 3), lambda x: x])
    with pytest.raises(ValueError, match=r"member 1 returned logits of shape \(4, 5\), member 0 returned \(4, 3\)"):
        Ensemble([nn.Linear(2, 3), nn.Linear(2, 5)])(torch.zeros(4, 2))
