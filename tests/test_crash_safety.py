"""Crash safety: runs killed with SIGKILL resume to the same result; damaged checkpoints are refused.

The kill tests start real ``stnkit train`` processes (on the digit sample
shipped with stnkit, so no data download), kill them with SIGKILL mid-epoch
as soon as a checkpoint exists, resume them, and compare the final weights,
optimizer state and metrics with an uninterrupted run of the same seed.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from stnkit.cli.main import main
from stnkit.models.checkpoint import load_checkpoint, save_checkpoint
from stnkit.models.classifiers import classifier

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and fsync semantics are POSIX")

TRAIN_ARGS = [
    "train", "--digit-sample", "--task", "rts", "--model", "st-fcn", "--epochs", "2", "--batch-size", "32",
    "--train-limit", "512", "--test-limit", "200", "--checkpoint-every", "4", "--schedule", "cosine",
    "--seed", "3", "--no-progress",
]
LAST = Path("checkpoints") / "last.safetensors"
# Columns of metrics.csv that do not depend on wall-clock time.
STABLE_COLUMNS = ("step", "epoch", "train_loss", "train_acc", "test_error", "lr", "skipped_steps")


def _env() -> dict[str, str]:
    # One thread: the run is bit-for-bit reproducible on the CPU, and the machine is shared.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _stnkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "stnkit.cli.main", *args]


def _run_to_end(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(_stnkit(*args), env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result


def _kill_after_checkpoint(out: Path, *args: str, after_step: int) -> int:
    """Start a training process, SIGKILL it once its checkpoint is past ``after_step``; return that step."""
    process = subprocess.Popen(_stnkit(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = out / LAST
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the run ended before it could be killed: {process.stderr.read().decode()[-500:]}")
            if last.exists():
                try:
                    step = load_checkpoint(last).trainer_state["step"]
                except ValueError:  # never expected: writes are atomic
                    raise
                if step > after_step:
                    process.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.01)
        else:
            pytest.fail("no checkpoint appeared in time")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return load_checkpoint(last).trainer_state["step"]


def _stable_metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as handle:
        return [{key: row[key] for key in STABLE_COLUMNS} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted run of TRAIN_ARGS."""
    reference = tmp_path_factory.mktemp("crash") / "reference"
    return reference, _run_to_end(*TRAIN_ARGS, "--out", str(reference))


def _kill_twice_and_resume(interrupted: Path, *resume_args: str) -> subprocess.CompletedProcess:
    # Killed twice, mid-epoch (16 steps per epoch, checkpoints every 4 steps), resumed twice.
    first_kill = _kill_after_checkpoint(interrupted, *TRAIN_ARGS, "--out", str(interrupted), after_step=0)
    assert 0 < first_kill < 16
    second_kill = _kill_after_checkpoint(interrupted, "train", "--resume", "--out", str(interrupted), "--no-progress",
                                         *resume_args, after_step=first_kill + 4)
    assert first_kill < second_kill < 32
    return _run_to_end("train", "--resume", "--out", str(interrupted), "--no-progress", *resume_args)


def test_sigkilled_run_resumes_to_the_same_weights_and_metrics(tmp_path, reference_run):
    reference, finished = reference_run
    interrupted = tmp_path / "interrupted"
    # --seed repeated on resume: see the next test for why.
    resumed = _kill_twice_and_resume(interrupted, "--seed", "3")

    assert resumed.stdout.splitlines()[-1] == finished.stdout.splitlines()[-1].replace(str(reference), str(interrupted))
    a, b = load_checkpoint(reference / LAST), load_checkpoint(interrupted / LAST)
    assert a.trainer_state["step"] == b.trainer_state["step"] == 32
    assert a.model_state.keys() == b.model_state.keys()
    for name in a.model_state:
        assert torch.equal(a.model_state[name], b.model_state[name]), name
    for key, state in a.optimizer_state["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b.optimizer_state["state"][key][name])), (key, name)
    assert _stable_metrics(interrupted) == _stable_metrics(reference)
    best_a, best_b = load_checkpoint(reference / "checkpoints" / "best.safetensors"), load_checkpoint(interrupted / "checkpoints" / "best.safetensors")
    assert best_a.trainer_state["test_error"] == best_b.trainer_state["test_error"]


def test_resume_without_repeating_the_seed_continues_the_same_run(tmp_path, reference_run):
    reference, finished = reference_run
    stopped = tmp_path / "stopped"
    _run_to_end(*TRAIN_ARGS, "--out", str(stopped), "--max-steps", "6")
    _run_to_end("train", "--resume", "--out", str(stopped), "--no-progress")  # no --seed: the run's own should apply
    a, b = load_checkpoint(reference / LAST), load_checkpoint(stopped / LAST)
    assert all(torch.equal(a.model_state[name], b.model_state[name]) for name in a.model_state)


_SAVE_LOOP = textwrap.dedent(
    """
    import sys, torch
    from stnkit.models.checkpoint import save_checkpoint
    from stnkit.models.classifiers import classifier
    torch.manual_seed(0)
    model = classifier("st-fcn", "affine", (12, 12))
    print("ready", flush=True)
    version = 0
    while True:
        version += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(version % 1000)
        save_checkpoint(sys.argv[1], model, trainer_state={"version": version})
    """
)


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.7])
def test_sigkill_during_checkpoint_writes_leaves_a_complete_checkpoint(tmp_path, delay):
    path = tmp_path / "ckpt" / "last.safetensors"
    process = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(path)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stdout.close()
    checkpoint = load_checkpoint(path)  # complete and verified: one of the versions, never a mix
    version = checkpoint.trainer_state["version"]
    assert version >= 1
    parameters = {name for name, _ in classifier("st-fcn", "affine", (12, 12)).named_parameters()}
    for name in parameters:
        assert (checkpoint.model_state[name] == version % 1000).all(), name
    # A temp file of the interrupted write may be left; it is never mistaken for the checkpoint.
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert all(name.startswith(".last.safetensors.") and name.endswith(".tmp") for name in leftovers)


# --------------------------------------------------------------- damaged files


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory) -> bytes:
    """A real training checkpoint (weights, optimizer state, trainer state), as bytes."""
    torch.manual_seed(0)
    model = classifier("st-fcn", "affine", (12, 12))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 1, 12, 12)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "c.safetensors", model, optimizer=optimizer,
                           trainer_state={"step": 1, "train_config": {}})
    return path.read_bytes()


def test_every_truncation_is_refused(tmp_path, training_checkpoint):
    data = training_checkpoint
    cuts = sorted(set([0, 1, 7, 8, 9, len(data) - 1] + [len(data) * k // 97 for k in range(1, 97)]))
    path = tmp_path / "cut.safetensors"
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|not a safetensors|corrupted|empty"):
            load_checkpoint(path)


def test_every_altered_byte_is_detected(tmp_path, training_checkpoint):
    data = training_checkpoint
    header_end = 8 + int.from_bytes(data[:8], "little")
    # Every byte of the length field and the header, and a stride through the tensor data.
    positions = list(range(0, header_end, max(1, header_end // 400))) + list(range(header_end, len(data), max(1, (len(data) - header_end) // 200)))
    path = tmp_path / "altered.safetensors"
    for position in positions:
        altered = bytearray(data)
        altered[position] ^= 0xFF
        path.write_bytes(bytes(altered))
        with pytest.raises(ValueError):
            load_checkpoint(path)
    assert len(positions) > 300


def test_cli_refuses_damaged_checkpoints_in_one_line(tmp_path, training_checkpoint, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(training_checkpoint[: len(training_checkpoint) // 2])
    altered = tmp_path / "altered.safetensors"
    changed = bytearray(training_checkpoint)
    changed[-10] ^= 0x01
    altered.write_bytes(bytes(changed))
    for path, message in ((truncated, "truncated"), (altered, "checksum mismatch")):
        code = main(["eval", str(path), "--digit-sample", "--test-limit", "10"])
        err = capsys.readouterr().err
        assert code == 1 and message in err and str(path) in err and len(err.strip().splitlines()) == 1, err


def test_resume_from_a_damaged_last_checkpoint_is_refused_in_one_line(tmp_path, training_checkpoint, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / LAST).write_bytes(training_checkpoint[:1000])
    code = main(["train", "--resume", "--out", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "truncated" in err and len(err.strip().splitlines()) == 1, err
