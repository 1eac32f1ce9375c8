"""Tests for the generic trainer (stnkit.training.trainer) on a tiny problem."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from torch import nn

from stnkit.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from stnkit.models.registry import build_model, register_model
from stnkit.training.metrics_log import METRICS_COLUMNS, read_metrics
from stnkit.training.trainer import TrainConfig, Trainer, evaluate, learning_rate_at

FEATURES, CLASSES = 4, 3
CENTRES = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])


class TinySTNLike(nn.Module):
    """An MLP with a "localisation" part (to exercise its lr group) and optional dropout.

    ``poison_calls`` lists training forward passes (counted from 1) whose output
    is NaN, to exercise the non-finite-loss handling; ``crash_call`` is one that
    raises, to simulate a crash.
    """

    def __init__(self, hidden: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.localisation = nn.Linear(FEATURES, FEATURES)
        self.body = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, CLASSES))
        self.poison_calls: set[int] = set()
        self.crash_call: int | None = None
        self.training_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x + 0.1 * self.localisation(x))
        if self.training:
            self.training_calls += 1
            if self.training_calls in self.poison_calls:
                out = out * float("nan")
            if self.training_calls == self.crash_call:
                raise KeyboardInterrupt("simulated crash")
        return out


@register_model("test-trainer-mlp")
def build_tiny(hidden: int = 16, dropout: float = 0.0) -> nn.Module:
    return TinySTNLike(hidden, dropout)


def blobs(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs in 4-D."""
    y = torch.arange(n) % CLASSES
    x = CENTRES[y] + 1.0 * torch.randn(n, FEATURES, generator=generator)
    return x, y


def epoch_data(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Uses the global RNG on purpose, like a data layer redrawing distortions.
    return blobs(96)


TEST_DATA = blobs(60, torch.Generator().manual_seed(123))


def make_model(**config) -> nn.Module:
    torch.manual_seed(0)
    return build_model({"kind": "test-trainer-mlp", **config})


def settings(out_dir, **overrides) -> TrainConfig:
    values = dict(epochs=3, batch_size=16, lr=0.1, momentum=0.9, out_dir=out_dir, progress=False, seed=7)
    return TrainConfig(**{**values, **overrides})


def fit(model: nn.Module, config: TrainConfig):
    return Trainer(model, None, epoch_data, TEST_DATA, config).fit()


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, value), other in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(value, other), name


def test_loss_falls_and_files_are_written(tmp_path):
    model = make_model()
    result = fit(model, settings(tmp_path, epochs=4, eval_every=3))
    assert result.steps == 4 * 6 and result.epochs_completed == 4 and not result.stopped_early
    assert result.test_error < 0.3  # chance is 0.67; the blobs overlap a little
    rows = read_metrics(tmp_path / "metrics.csv")
    assert list(rows[0]) == list(METRICS_COLUMNS)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert [row["step"] for row in rows] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert all(row["images_per_s"] > 0 and row["skipped_steps"] == 0 for row in rows)
    assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["best.safetensors", "last.safetensors"]
    best = load_model(tmp_path / "checkpoints" / "best.safetensors")
    assert evaluate(best, *TEST_DATA) == result.best_test_error
    last = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors")
    assert last.trainer_state["step"] == 24 and last.trainer_state["epoch"] == 4


def test_localisation_parameters_get_a_scaled_learning_rate():
    trainer = Trainer(make_model(), None, epoch_data, TEST_DATA, settings(None, epochs=1, localisation_lr_scale=0.01))
    trainer.fit()
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and len(groups[1]["params"]) == 2  # localisation weight and bias
    assert groups[0]["lr"] == pytest.approx(0.1) and groups[1]["lr"] == pytest.approx(0.001)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(optimizer="sgd", lr_steps=(1, 2), lr_gamma=0.5, max_grad_norm=1.0),
        dict(optimizer="adam", lr=0.01, lr_schedule="cosine", weight_decay=1e-3),
    ],
    ids=["sgd-step", "adam-cosine"],
)
def test_resume_after_interruption_is_bit_identical(tmp_path, overrides):
    common = dict(checkpoint_every=4, eval_every=5, **overrides)
    full_model = make_model(dropout=0.2)  # dropout draws from the global RNG during training
    full = fit(full_model, settings(tmp_path / "full", **common))

    stopped = fit(make_model(dropout=0.2), settings(tmp_path / "split", max_steps=7, **common))
    assert stopped.stopped_early and stopped.steps == 7
    torch.manual_seed(999)  # whatever happens between the sessions must not matter
    resumed_trainer = Trainer.resume(tmp_path / "split", epoch_data, TEST_DATA)
    resumed = resumed_trainer.fit()

    assert resumed.steps == full.steps == 18
    assert_same_weights(full_model, resumed_trainer.model)
    assert resumed.best_test_error == full.best_test_error and resumed.best_step == full.best_step
    full_rows, split_rows = read_metrics(tmp_path / "full" / "metrics.csv"), read_metrics(tmp_path / "split" / "metrics.csv")
    ignore = {"time", "images_per_s"}
    strip = lambda rows: [{k: v for k, v in row.items() if k not in ignore} for row in rows]  # noqa: E731
    assert strip(split_rows) == strip(full_rows)


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    common = dict(checkpoint_every=4, eval_every=5)
    full_model = make_model(dropout=0.2)
    fit(full_model, settings(tmp_path / "full", **common))

    crashing = make_model(dropout=0.2)
    crashing.crash_call = 11  # after the checkpoint at step 8 and the metrics row at step 10
    with pytest.raises(KeyboardInterrupt):
        fit(crashing, settings(tmp_path / "crash", **common))
    assert [row["step"] for row in read_metrics(tmp_path / "crash" / "metrics.csv")] == [5, 6, 10]
    resumed_trainer = Trainer.resume(tmp_path / "crash", epoch_data, TEST_DATA)
    resumed_trainer.fit()

    assert_same_weights(full_model, resumed_trainer.model)
    steps = [row["step"] for row in read_metrics(tmp_path / "crash" / "metrics.csv")]
    assert steps == [row["step"] for row in read_metrics(tmp_path / "full" / "metrics.csv")] == [5, 6, 10, 12, 15, 18]
    assert not [name for name in os.listdir(tmp_path / "crash" / "checkpoints") if name.endswith(".tmp")]


def test_resume_option_on_the_constructor(tmp_path):
    full_model = make_model()
    fit(full_model, settings(tmp_path / "full", checkpoint_every=2))
    fit(make_model(), settings(tmp_path / "split", checkpoint_every=2, max_steps=6))  # stops at an epoch end
    other_start = make_model(hidden=16)
    fit(other_start, settings(tmp_path / "split", checkpoint_every=2, resume=True))
    assert_same_weights(full_model, other_start)


def test_resume_refuses_changed_settings(tmp_path):
    fit(make_model(), settings(tmp_path, max_steps=3))
    with pytest.raises(ValueError, match=r"cannot resume with different settings \(lr: 0.1 -> 0.2\)"):
        fit(make_model(), settings(tmp_path, lr=0.2, resume=True))
    with pytest.raises(ValueError, match="model config"):
        fit(make_model(hidden=8), settings(tmp_path, resume=True))


def test_out_dir_holding_a_run_is_protected(tmp_path):
    fit(make_model(), settings(tmp_path, epochs=1))
    with pytest.raises(FileExistsError, match="already holds a training run .*metrics.csv.*resume it or choose overwrite"):
        fit(make_model(), settings(tmp_path, epochs=1))
    result = fit(make_model(), settings(tmp_path, epochs=1, overwrite=True))
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.csv")] == [result.steps]
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        fit(make_model(), settings(tmp_path / "empty", resume=True))
    with pytest.raises(ValueError, match="exclude each other"):
        settings(tmp_path, resume=True, overwrite=True)


def test_non_finite_step_is_skipped_without_update(tmp_path, caplog):
    reference = make_model()
    fit(reference, settings(tmp_path / "ref", max_steps=2))
    poisoned = make_model()
    poisoned.poison_calls = {3}
    with caplog.at_level(logging.WARNING, logger="stnkit.training.trainer"):
        result = fit(poisoned, settings(tmp_path / "nan", max_steps=3))
    assert result.skipped_steps == 1 and result.steps == 3
    assert_same_weights(reference, poisoned)  # the NaN step changed nothing
    assert "step 3: loss is nan; step skipped" in caplog.text

    # The count reaches metrics.csv, and training goes on normally afterwards.
    poisoned = make_model()
    poisoned.poison_calls = {3}
    fit(poisoned, settings(tmp_path / "nan-full", epochs=1))
    assert read_metrics(tmp_path / "nan-full" / "metrics.csv")[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in poisoned.parameters())


def test_repeated_non_finite_steps_roll_back_and_halve_localisation_lr(tmp_path, caplog):
    model = make_model()
    model.poison_calls = {4, 5, 6}
    config = settings(tmp_path, epochs=2, checkpoint_every=2, max_nonfinite=3, localisation_lr_scale=0.5)
    trainer = Trainer(model, None, epoch_data, TEST_DATA, config)
    with caplog.at_level(logging.WARNING, logger="stnkit.training.trainer"):
        result = trainer.fit()
    assert result.skipped_steps == 3 and result.localisation_lr_factor == 0.5
    assert "restored the last good checkpoint and halved the localisation learning rate" in caplog.text
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(0.1 * 0.5 * 0.5)
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors").trainer_state
    assert saved["localisation_lr_factor"] == 0.5 and saved["skipped_steps"] == 3


def test_evaluate_returns_error_rate_and_keeps_mode():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    model.train()
    assert evaluate(model, x, torch.tensor([0, 1, 0, 1]), batch_size=3) == 0.0
    assert evaluate(model, x, torch.tensor([0, 1, 1, 1])) == 0.25
    assert model.training
    with pytest.raises(ValueError, match="same, non-zero number"):
        evaluate(model, x, torch.tensor([0, 1]))


def test_learning_rate_schedules():
    step = TrainConfig(lr=1.0, lr_steps=(10, 20), lr_step_unit="step", lr_gamma=0.1)
    assert [learning_rate_at(step, epoch=0, step=s, steps_per_epoch=5) for s in (9, 10, 25)] == pytest.approx([1.0, 0.1, 0.01])
    cosine = TrainConfig(lr=1.0, epochs=2, lr_schedule="cosine")
    assert learning_rate_at(cosine, epoch=0, step=0, steps_per_epoch=5) == 1.0
    assert learning_rate_at(cosine, epoch=1, step=5, steps_per_epoch=5) == pytest.approx(0.5)
    assert math.isclose(learning_rate_at(cosine, epoch=2, step=10, steps_per_epoch=5), 0.0, abs_tol=1e-12)


def test_bad_settings_and_data_are_refused():
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam'"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"epochz": 3})
    trainer = Trainer(make_model(), None, lambda epoch: (torch.zeros(4, FEATURES), torch.zeros(4)), TEST_DATA, settings(None))
    with pytest.raises(ValueError, match="integer class labels"):
        trainer.fit()


# ---------------------------------------------------------------- validation data
VAL_DATA = blobs(45, torch.Generator().manual_seed(321))


def test_validation_data_alone_picks_the_best_model(tmp_path):
    # Validation labels shifted by one class: the better the model, the worse its validation
    # error, so a selection on validation and one on the test set must disagree.
    wrong_val = (VAL_DATA[0], (VAL_DATA[1] + 1) % CLASSES)
    trainer = Trainer(make_model(), None, epoch_data, TEST_DATA, settings(tmp_path, epochs=4, eval_every=3), val_data=wrong_val)
    result = trainer.fit()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert all(row["val_error"] is not None for row in rows)
    chosen = min(rows, key=lambda row: (row["val_error"], row["step"]))
    assert result.best_step == chosen["step"] and result.best_val_error == chosen["val_error"]
    assert result.best_test_error == chosen["test_error"] > min(row["test_error"] for row in rows)
    best = load_checkpoint(tmp_path / "checkpoints" / "best.safetensors")
    assert best.trainer_state["step"] == chosen["step"] and best.trainer_state["val_error"] == chosen["val_error"]
    assert evaluate(load_model(tmp_path / "checkpoints" / "best.safetensors"), *wrong_val) == result.best_val_error
    assert result.val_error == rows[-1]["val_error"]


def test_without_validation_data_the_column_stays_empty(tmp_path):
    result = fit(make_model(), settings(tmp_path, epochs=1))
    assert result.val_error is None and result.best_val_error is None
    assert all(row["val_error"] is None for row in read_metrics(tmp_path / "metrics.csv"))


def test_resume_with_validation_data_is_bit_identical_and_needs_it(tmp_path):
    common = dict(checkpoint_every=4, eval_every=5)
    full_model = make_model()
    full = Trainer(full_model, None, epoch_data, TEST_DATA, settings(tmp_path / "full", **common), val_data=VAL_DATA).fit()
    Trainer(make_model(), None, epoch_data, TEST_DATA, settings(tmp_path / "split", max_steps=7, **common), val_data=VAL_DATA).fit()
    with pytest.raises(ValueError, match="had validation data; resume it with the same validation data"):
        Trainer.resume(tmp_path / "split", epoch_data, TEST_DATA).fit()
    resumed_trainer = Trainer.resume(tmp_path / "split", epoch_data, TEST_DATA, val_data=VAL_DATA)
    resumed = resumed_trainer.fit()
    assert_same_weights(full_model, resumed_trainer.model)
    assert (resumed.best_step, resumed.best_val_error, resumed.best_test_error) == (full.best_step, full.best_val_error, full.best_test_error)


def test_empty_validation_data_is_refused():
    empty = (torch.zeros(0, FEATURES), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="val_data: x and y must hold the same, non-zero number of samples"):
        Trainer(make_model(), None, epoch_data, TEST_DATA, settings(None), val_data=empty)


# --- moving average of the weights (ema_decay) -------------------------------------------


def test_moving_average_follows_its_formula_and_is_written(tmp_path):
    model = make_model()
    start = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = Trainer(model, None, epoch_data, TEST_DATA, settings(tmp_path, epochs=1, max_steps=1, ema_decay=0.99))
    trainer.fit()
    # One step: the warm-up decay min(0.99, (1 + 0) / (10 + 0)) = 0.1 keeps 10% of the start.
    for name, value in trainer.ema_model.state_dict().items():
        expected = 0.1 * start[name] + 0.9 * model.state_dict()[name]
        assert torch.allclose(value, expected, atol=1e-6), name
    saved = load_model(tmp_path / "checkpoints" / "ema.safetensors")
    assert_same_weights(saved, trainer.ema_model)


def test_moving_average_is_logged_and_differs_from_the_weights(tmp_path):
    model = make_model()
    trainer = Trainer(model, None, epoch_data, TEST_DATA, settings(tmp_path, epochs=2, ema_decay=0.9))
    trainer.fit()
    rows = read_metrics(tmp_path / "metrics.csv")
    ema = load_model(tmp_path / "checkpoints" / "ema.safetensors")
    assert rows[-1]["ema_test_error"] == evaluate(ema, *TEST_DATA)
    assert not torch.equal(ema.body[0].weight, model.body[0].weight)
    assert not any(parameter.requires_grad for parameter in trainer.ema_model.parameters())


def test_without_moving_average_nothing_extra_is_written(tmp_path):
    fit(make_model(), settings(tmp_path, epochs=1))
    assert not (tmp_path / "checkpoints" / "ema.safetensors").exists()
    assert all(row["ema_test_error"] is None for row in read_metrics(tmp_path / "metrics.csv"))


def test_resume_continues_the_moving_average_bit_identically(tmp_path):
    common = dict(checkpoint_every=4, eval_every=5, ema_decay=0.95)
    full = Trainer(make_model(dropout=0.2), None, epoch_data, TEST_DATA, settings(tmp_path / "full", **common))
    full.fit()
    fit(make_model(dropout=0.2), settings(tmp_path / "split", max_steps=7, **common))
    resumed = Trainer.resume(tmp_path / "split", epoch_data, TEST_DATA)
    resumed.fit()
    assert_same_weights(full.ema_model, resumed.ema_model)
    assert [row["ema_test_error"] for row in read_metrics(tmp_path / "split" / "metrics.csv")] == [
        row["ema_test_error"] for row in read_metrics(tmp_path / "full" / "metrics.csv")
    ]


def test_moving_average_settings_are_checked(tmp_path):
    for bad in (1.0, -0.1, "0.9"):
        with pytest.raises(ValueError, match=r"ema_decay must be a number in \[0, 1\)"):
            TrainConfig(ema_decay=bad)
    fit(make_model(), settings(tmp_path, max_steps=3))
    with pytest.raises(ValueError, match=r"cannot resume with different settings \(ema_decay: 0.0 -> 0.9\)"):
        fit(make_model(), settings(tmp_path, ema_decay=0.9, resume=True))


def test_runs_from_before_the_moving_average_still_resume(tmp_path):
    fit(make_model(), settings(tmp_path, max_steps=3))
    path = tmp_path / "checkpoints" / "last.safetensors"
    checkpoint = load_checkpoint(path)
    # Rewrite the checkpoint as an older stnkit wrote it: no ema_decay or consistency settings, no ema_state.
    state = dict(checkpoint.trainer_state)
    del state["train_config"]["ema_decay"], state["ema_state"]
    for name in ("consistency_weight", "consistency_rotation", "consistency_scale", "consistency_shift"):
        del state["train_config"][name]
    old = Trainer(make_model(), None, epoch_data, TEST_DATA, settings(None))
    old.model.load_state_dict(checkpoint.model_state)
    old.optimizer.load_state_dict(checkpoint.optimizer_state)
    save_checkpoint(path, old.model, optimizer=old.optimizer, trainer_state=state)
    resumed = Trainer.resume(tmp_path, epoch_data, TEST_DATA)
    assert resumed.config.ema_decay == 0.0 and resumed.config.consistency_weight == 0.0 and resumed.fit().steps == 18
