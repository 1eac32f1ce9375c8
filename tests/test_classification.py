"""The ST-CNN end to end on real digits: training, checkpoints, the CLI, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import stnkit
from stnkit.data.digits import load_digit_sample
from stnkit.data.distortions import DistortedMNIST
from stnkit.cli._options import task_splits
from stnkit.models import MODEL_NAMES, Ensemble, classifier, count_parameters, load_model
from stnkit.models.checkpoint import load_checkpoint
from stnkit.training.metrics_log import read_metrics
from stnkit.training.trainer import evaluate

from conftest import run_cli


def test_st_cnn_trains_on_digits_and_starts_at_identity():
    torch.manual_seed(0)
    images, labels = load_digit_sample("train")
    x, y = DistortedMNIST("rts", "train", images=images[:2048], labels=labels[:2048]).epoch(0)
    model = classifier("st-cnn", "affine", (42, 42))
    model(x[:8])
    torch.testing.assert_close(model.transformer.last_theta, stnkit.Affine().identity(8))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for step in range(150):
        index = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    # The transformer has moved away from the identity: it learned something about the input.
    model(x[:64])
    assert (model.transformer.last_theta - stnkit.Affine().identity(64)).abs().mean() > 1e-3


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("transform", ["affine", "projective", "tps"])
def test_every_model_builds_and_round_trips(tmp_path, name, transform):
    model = classifier(name, transform, (28, 28))
    x = torch.rand(3, 1, 28, 28)
    model.eval()
    path = stnkit.models.save_checkpoint(tmp_path / "m.safetensors", model)
    again = load_model(path)
    torch.testing.assert_close(again(x), model(x))
    assert count_parameters(model) > 0


@pytest.mark.parametrize("name", ["cnn", "st-fcn"])
def test_dropout_adds_no_parameters_and_round_trips(tmp_path, name):
    plain, dropped = classifier(name, "affine", (28, 28)), classifier(name, "affine", (28, 28), dropout=0.5)
    assert count_parameters(dropped) == count_parameters(plain)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())  # the paper's models keep their layers
    dropped.eval()
    x = torch.rand(4, 1, 28, 28)
    again = load_model(stnkit.models.save_checkpoint(tmp_path / "d.safetensors", dropped))
    assert again.stnkit_config["dropout"] == 0.5
    torch.testing.assert_close(again(x), dropped(x))
    dropped.train()
    torch.manual_seed(0)
    assert not torch.allclose(dropped(x), again(x))  # active in training mode only
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        classifier(name, "affine", (28, 28), dropout=1.0)


def test_cli_train_eval_resume(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--task", "rotated", "--digit-sample", "--model", "st-cnn", "--out", str(out), "--epochs", "2", "--batch-size", "64",
              "--optimizer", "adam", "--lr", "0.002", "--train-limit", "256", "--test-limit", "128", "--no-progress", "--checkpoint-every", "4"]
    code, stdout, err = run_cli(["train", *common, "--max-steps", "6"], capsys)
    assert code == 0, err
    assert (out / "checkpoints" / "last.safetensors").is_file()
    # Refuses to overwrite an existing run without --resume/--overwrite.
    code, _, err = run_cli(["train", *common], capsys)
    assert code != 0 and "exists" in err.lower() or "already" in err.lower()
    code, stdout, err = run_cli(["train", "--out", str(out), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    resumed = json.loads(stdout.strip().splitlines()[-1])
    assert resumed["steps"] == 8 and resumed["epochs"] == 2
    # The same run without interruption ends with the same weights.
    straight = tmp_path / "straight"
    code, stdout, err = run_cli(["train", *[a if a != str(out) else str(straight) for a in common]], capsys)
    assert code == 0, err
    a = load_model(out / "checkpoints" / "last.safetensors").state_dict()
    b = load_model(straight / "checkpoints" / "last.safetensors").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert (out / "metrics.csv").is_file() and (out / "learning_curve.png").is_file()

    code, stdout, err = run_cli(["eval", str(out / "checkpoints" / "last.safetensors"), "--task", "rotated", "--digit-sample", "--test-limit", "128", "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert 0.0 <= report["test_error"] <= 1.0 and report["images"] == 128

    figure = tmp_path / "fig.png"
    code, _, err = run_cli(["figure", str(out / "checkpoints" / "last.safetensors"), "--task", "rotated", "--digit-sample", "-o", str(figure), "--count", "4"], capsys)
    assert code == 0, err
    assert figure.stat().st_size > 1000
    code, _, err = run_cli(["figure", str(out / "checkpoints" / "last.safetensors"), "--task", "rotated", "--digit-sample", "-o", str(figure)], capsys)
    assert code == 1 and "--overwrite" in err


def test_cli_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STNKIT_DATA", str(tmp_path / "nowhere"))
    code, _, err = run_cli(["train", "--task", "rts", "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert code == 1 and "nowhere" in err and "stnkit download" in err
    assert "Traceback" not in err
    code, _, err = run_cli(["train", "--task", "not-a-task", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "not-a-task" in err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 100)
    code, _, err = run_cli(["eval", str(broken), "--digit-sample"], capsys)
    assert code == 1 and "broken.safetensors" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["eval", str(tmp_path / "missing.safetensors"), "--digit-sample"], capsys)
    assert code == 1 and "missing.safetensors" in err
    code, _, err = run_cli(["train", "--resume", "--out", str(tmp_path / "empty")], capsys)
    assert code == 1 and "no checkpoint" in err


def test_cli_models_lists_parameter_counts(capsys):
    code, stdout, _ = run_cli(["models", "--task", "rts"], capsys)
    assert code == 0
    assert "st-cnn" in stdout and "tps" in stdout and f"{count_parameters(classifier('cnn', None, (42, 42))):,}" in stdout


def test_table1_cells_and_table(tmp_path, capsys):
    from stnkit.cli.table1 import PAPER_TABLE1, parse_cell, write_table

    assert parse_cell("rts:st-cnn:tps") == ("rts", "st-cnn", "tps")
    assert parse_cell("rotated:cnn") == ("rotated", "cnn", None)
    code, _, err = run_cli(["table1", "--cell", "rts:st-cnn:lanczos", "--out", str(tmp_path)], capsys)
    assert code == 1 and "rts:st-cnn:lanczos" in err
    record = {"task": "rts", "test_error": 0.0123, "epochs": 2, "optimizer": "adam", "lr": 0.002, "batch_size": 128, "train_seconds": 120}
    write_table({"rts:st-cnn:affine": record}, tmp_path / "t.md")
    table = (tmp_path / "t.md").read_text()
    assert "| ST-CNN affine | 1.23 | 0.5 |" in table and "2 ep" in table
    assert PAPER_TABLE1[("st-cnn", "tps")]["E"] == 1.1


def test_cli_dropout_with_init_is_refused(tmp_path, capsys):
    code, _, err = run_cli(["train", "--task", "rts", "--digit-sample", "--init", "mnist-rts", "--dropout", "0.25",
                            "--out", str(tmp_path / "run"), "--epochs", "1"], capsys)  # fmt: skip
    assert code != 0 and "--dropout applies to a new" in err and not (tmp_path / "run").exists()


def test_cli_iterations_sets_and_overrides_the_refinement_rounds(tmp_path, capsys):
    common = ["--task", "rts", "--digit-sample", "--epochs", "1", "--train-limit", "128", "--test-limit", "64", "--no-progress"]
    code, _, err = run_cli(["train", *common, "--iterations", "2", "--out", str(tmp_path / "new")], capsys)
    assert code == 0, err
    assert load_model(tmp_path / "new" / "checkpoints" / "last.safetensors").transformer.iterations == 2
    # With --init the weights are kept and only the number of rounds changes; the checkpoint must reload that way.
    code, _, err = run_cli(["train", *common, "--init", "mnist-rts", "--iterations", "3", "--out", str(tmp_path / "ft")], capsys)
    assert code == 0, err
    tuned = load_model(tmp_path / "ft" / "checkpoints" / "last.safetensors")
    assert tuned.transformer.iterations == 3 and tuned.stnkit_config["iterations"] == 3
    assert count_parameters(tuned) == count_parameters(stnkit.pretrained("mnist-rts"))


def test_cli_iterations_without_a_transformer_is_refused(tmp_path, capsys):
    code, _, err = run_cli(["train", "--task", "rts", "--digit-sample", "--model", "cnn", "--iterations", "2",
                            "--out", str(tmp_path / "run"), "--epochs", "1"], capsys)  # fmt: skip
    assert code != 0 and "--iterations applies to st-fcn and st-cnn" in err and not (tmp_path / "run").exists()


def test_cli_train_cnn_is_the_st_papers_baseline(tmp_path, capsys):
    # "cnn" is also the name of Finnveden et al.'s larger CNN; `train --model cnn` must build the ST paper's.
    code, out, err = run_cli(["train", "--task", "projective", "--digit-sample", "--model", "cnn", "--dropout", "0.25", "--epochs", "1",
                              "--train-limit", "128", "--test-limit", "64", "--no-progress", "--out", str(tmp_path / "run")], capsys)  # fmt: skip
    assert code == 0, err
    expected = classifier("cnn", None, (28, 28), dropout=0.25)
    assert f"{count_parameters(expected):,} parameters" in out
    trained = load_model(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert trained.stnkit_config["kind"] == "classifier" and trained.transformer is None


@pytest.mark.parametrize(
    "option",
    [["--iterations", "2"], ["--dropout", "0.25"], ["--init", "mnist-rts"], ["--jitter-px", "1"], ["--ema-decay", "0.9"]],
)
def test_cli_resume_refuses_options_that_would_change_the_model(tmp_path, capsys, option):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--task", "rts", "--digit-sample", "--epochs", "1", "--train-limit", "64",
                            "--test-limit", "32", "--no-progress", "--out", str(run)], capsys)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(["train", "--out", str(run), "--resume", *option], capsys)
    assert code != 0 and "--resume continues the run as it was set up" in err and option[0] in err


def small_rotated_run(out) -> list[str]:
    """``stnkit train`` arguments for a few-second R run on the shipped sample, ending in ``--out OUT``."""
    return ["--task", "rotated", "--digit-sample", "--train-limit", "64", "--test-limit", "32", "--batch-size", "32",
            "--no-progress", "--out", str(out)]  # fmt: skip


def test_cli_jitter_is_recorded_and_kept_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    common = small_rotated_run(run)
    code, _, err = run_cli(["train", *common, "--epochs", "2", "--max-steps", "2", "--jitter-px", "0.5"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["train", "--out", str(run), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    state = load_checkpoint(run / "checkpoints" / "last.safetensors").trainer_state
    assert state["run_info"]["jitter_px"] == 0.5 and state["step"] == 4
    code, _, err = run_cli(["train", *common[:-1], str(tmp_path / "bad"), "--jitter-px", "-1"], capsys)
    assert code == 1 and "--jitter-px" in err and len(err.strip().splitlines()) == 1


def test_cli_ema_decay_writes_an_evaluable_average(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *small_rotated_run(run), "--epochs", "2", "--ema-decay", "0.9"], capsys)
    assert code == 0, err
    ema = run / "checkpoints" / "ema.safetensors"
    code, stdout, err = run_cli(["eval", str(ema), "--task", "rotated", "--digit-sample", "--test-limit", "32", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["test_error"] == read_metrics(run / "metrics.csv")[-1]["ema_test_error"]
    code, _, err = run_cli(["train", *small_rotated_run(tmp_path / "bad"), "--ema-decay", "1"], capsys)
    assert code == 1 and "ema_decay must be a number in [0, 1)" in err and len(err.strip().splitlines()) == 1


def test_cli_eval_iterations_sets_the_transformer_rounds(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *small_rotated_run(run), "--epochs", "1", "--model", "st-cnn"], capsys)
    assert code == 0, err
    last = str(run / "checkpoints" / "last.safetensors")
    evaluate_args = ["eval", last, "--task", "rotated", "--digit-sample", "--test-limit", "32", "--json"]
    code, stdout, err = run_cli([*evaluate_args, "--iterations", "3"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["iterations"] == 3
    code, _, err = run_cli([*evaluate_args, "--iterations", "0"], capsys)
    assert code == 2 and "--iterations" in err and "range" in err  # click's usage error, as for train
    code, _, err = run_cli(["train", "--task", "rotated", "--digit-sample", "--train-limit", "64", "--test-limit", "32",
                            "--epochs", "1", "--model", "cnn", "--no-progress", "--out", str(tmp_path / "cnn")], capsys)  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(["eval", str(tmp_path / "cnn" / "checkpoints" / "last.safetensors"), "--task", "rotated",
                            "--digit-sample", "--iterations", "2"], capsys)  # fmt: skip
    assert code == 1 and "no spatial transformer" in err


def test_cli_eval_scores_several_checkpoints_and_their_ensemble(tmp_path, capsys):
    paths = []
    for seed in (1, 2):
        run = tmp_path / f"run{seed}"
        code, _, err = run_cli(["train", *small_rotated_run(run), "--epochs", "1", "--model", "cnn", "--seed", str(seed)], capsys)
        assert code == 0, err
        paths.append(str(run / "checkpoints" / "last.safetensors"))
    evaluate_args = ["--task", "rotated", "--digit-sample", "--test-limit", "64", "--json"]
    singles = []
    for path in paths:
        code, stdout, err = run_cli(["eval", path, *evaluate_args], capsys)
        assert code == 0, err
        singles.append(json.loads(stdout)["test_error"])
    code, stdout, err = run_cli(["eval", *paths, *evaluate_args], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["checkpoint"] == paths and report["member_errors"] == singles
    _, test = task_splits("rotated", None, True)
    x, y = test.epoch(0)
    expected = evaluate(Ensemble([load_model(path) for path in paths]), x[:64], y[:64])
    assert report["test_error"] == expected
    code, _, err = run_cli(["eval", paths[0], str(tmp_path / "missing.safetensors"), *evaluate_args], capsys)
    assert code == 1 and "missing.safetensors" in err and len(err.strip().splitlines()) == 1


def test_cli_val_size_holds_digits_out_and_picks_best(tmp_path, capsys):
    run = tmp_path / "run"
    common = small_rotated_run(run)
    code, out, err = run_cli(["train", *common, "--epochs", "2", "--max-steps", "2", "--val-size", "100"], capsys)
    assert code == 0, err
    assert "100 validation digits" in out and json.loads(out.strip().splitlines()[-1])["best_val_error"] is not None
    code, _, err = run_cli(["train", "--out", str(run), "--resume", "--val-size", "100"], capsys)
    assert code == 1 and "--val-size" in err
    code, out, err = run_cli(["train", "--out", str(run), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    best = load_checkpoint(run / "checkpoints" / "best.safetensors").trainer_state
    assert best["val_error"] == summary["best_val_error"] and best["step"] == summary["best_step"]
    assert load_checkpoint(run / "checkpoints" / "last.safetensors").trainer_state["run_info"]["val_size"] == 100
    code, _, err = run_cli(["train", *common[:-1], str(tmp_path / "bad"), "--val-size", "8000"], capsys)
    assert code == 1 and "--val-size must be 0 or between 1 and 7999" in err


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "mnist-rts", "--task", "plain", "--digit-sample"],
        ["figure", "mnist-rts", "--task", "rotated", "--digit-sample", "-o", "{tmp}/fig.png"],
        ["train", "--init", "mnist-rts", "--task", "rotated", "--digit-sample", "--out", "{tmp}/run", "--epochs", "1"],
    ],
    ids=["eval", "figure", "train-init"],
)
def test_a_checkpoint_on_a_task_of_another_size_is_refused(tmp_path, capsys, args):
    code, _, err = run_cli([arg.format(tmp=tmp_path) for arg in args], capsys)
    assert code != 0 and "takes 42x42 inputs but task" in err and "28x28 images" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists() and not (tmp_path / "fig.png").exists()


@pytest.mark.parametrize("command", ["train", "eval", "table1", "train-aligner", "invariance"])
def test_cli_threads_sets_torch_threads_and_warns_past_the_cores(command, tmp_path, capsys, monkeypatch):
    import stnkit.cli._options as options

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # the test process keeps its own count
    monkeypatch.setattr(options, "usable_cores", lambda: 2)
    # --threads is applied while the options are parsed, before the command fails on its other (bad) input.
    base = {"train": ["train", "--resume", "--out", str(tmp_path / "none")],
            "eval": ["eval", str(tmp_path / "missing.safetensors"), "--digit-sample"],
            "table1": ["table1", "--cell", "bad", "--out", str(tmp_path / "t")],
            "train-aligner": ["train-aligner", "--out", str(tmp_path / "a")],
            "invariance": ["invariance", str(tmp_path / "missing.safetensors"), "--digit-sample"]}[command]
    code, _, err = run_cli([*base, "--threads", "1"], capsys)
    assert code == 1 and calls == [1] and "warning" not in err
    code, _, err = run_cli([*base, "--threads", "3"], capsys)
    assert code == 1 and calls == [1, 3]
    assert "--threads 3 is more than the 2 cores" in err
    code, _, err = run_cli([*base, "--threads", "0"], capsys)
    assert code == 2 and "--threads" in err and calls == [1, 3]
