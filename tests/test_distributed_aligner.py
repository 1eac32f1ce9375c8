"""``train-aligner`` under torchrun: 2 CPU processes (gloo) train the weights of one process.

The aligner's localisation net has batch norms, so this also checks that the
batch statistics are the global batch's (stnkit.training.distributed.sync_batch_norm):
with per-rank statistics the weights would differ from the single-process run.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from stnkit.models.checkpoint import load_checkpoint
from stnkit.training.aligner_training import train_aligner
from stnkit.training.distributed import GlooSyncBatchNorm, sync_batch_norm

# 7 pairs per step: slices of 4 and 3 pairs.
SETTINGS = dict(family="projective", steps=5, batch_size=7, lr=3e-3, size=[32, 32], channels=[8, 8], iterations=2,
                val_pairs=4, eval_every=2, checkpoint_every=1, seed=5, progress=False)

WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import stnkit.training.aligner_training as training

    settings = json.loads(sys.argv[1])
    stop_after = settings.pop("stop_after", None)
    if stop_after is not None:
        # Interrupt every rank after `stop_after` training steps (the first call draws the validation pairs).
        draw, calls = training.batch_pairs, []
        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) > stop_after + 1:
                raise RuntimeError("interrupted")
            return draw(*args, **kwargs)
        training.batch_pairs = interrupted
    images = [np.random.default_rng(i).integers(0, 256, (80, 96), dtype=np.uint8) for i in range(3)]
    model = training.train_aligner(images, **settings)
    import torch.distributed as dist
    # One write per line (torchrun runs the workers unbuffered; print() would interleave the ranks).
    sys.stdout.write(f"RESULT {dist.get_rank()} {dist.get_world_size()}\\n")
    sys.stdout.flush()
    """
)


def _images() -> list[np.ndarray]:
    return [np.random.default_rng(i).integers(0, 256, (80, 96), dtype=np.uint8) for i in range(3)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(tmp_path: Path, settings: dict, expect_ok: bool = True) -> subprocess.CompletedProcess:
    script = tmp_path / "aligner_worker.py"
    script.write_text(WORKER)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node=2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), json.dumps(settings),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    if expect_ok:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _state(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.safetensors").model_state


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=2e-5, rtol=1e-4, msg=name)


def _single(out_dir: Path) -> None:
    train_aligner(_images(), out_dir=out_dir, **{**SETTINGS, "size": (32, 32), "channels": (8, 8)})


def test_two_processes_train_the_aligner_of_one(tmp_path):
    _single(tmp_path / "single")
    ddp_run = tmp_path / "ddp"
    done = _torchrun(tmp_path, {**SETTINGS, "out_dir": str(ddp_run)})
    assert sorted(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("RESULT")) == [
        ["0", "2"], ["1", "2"]]
    single, ddp = _state(tmp_path / "single"), _state(ddp_run)
    assert any("running_var" in name for name in single)  # the batch norms' statistics are compared too
    _assert_same_state(ddp, single)
    ddp_rows, single_rows = _metrics(ddp_run), _metrics(tmp_path / "single")
    assert [row["step"] for row in ddp_rows] == [row["step"] for row in single_rows] == ["0", "2", "4", "5"]
    for ddp_row, single_row in zip(ddp_rows, single_rows):
        for key in ("train_loss", "test_error"):
            if single_row[key]:
                assert float(ddp_row[key]) == pytest.approx(float(single_row[key]), rel=1e-4)
    # Rank 0 alone wrote the run's files, and the final model loads as a plain aligner.
    assert (ddp_run / "aligner.safetensors").is_file() and (ddp_run / "loss.png").is_file()
    assert load_checkpoint(ddp_run / "aligner.safetensors").config["kind"] == "aligner"


def test_interrupted_and_resumed_ddp_aligner_run_matches_one_process(tmp_path):
    _single(tmp_path / "single")
    ddp_run = tmp_path / "ddp"
    done = _torchrun(tmp_path, {**SETTINGS, "out_dir": str(ddp_run), "stop_after": 3}, expect_ok=False)
    assert done.returncode != 0 and "interrupted" in done.stdout + done.stderr
    assert load_checkpoint(ddp_run / "checkpoints" / "last.safetensors").trainer_state["step"] == 3
    _torchrun(tmp_path, {**SETTINGS, "out_dir": str(ddp_run), "resume": True})
    assert load_checkpoint(ddp_run / "checkpoints" / "last.safetensors").trainer_state["step"] == 5
    _assert_same_state(_state(ddp_run), _state(tmp_path / "single"))


def test_sync_batch_norm_keeps_weights_and_keys():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    x = torch.randn(2, 1, 8, 8)
    expected = model.eval()(x)
    keys = list(model.state_dict())
    converted = sync_batch_norm(model)
    assert isinstance(converted[1], GlooSyncBatchNorm) and list(converted.state_dict()) == keys
    torch.testing.assert_close(converted.eval()(x), expected)


def test_batch_size_below_the_process_count_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("stnkit.training.aligner_training.setup_distributed", lambda device: _FakeContext())
    with pytest.raises(ValueError, match="batch_size .1. must be at least the number of processes .2."):
        train_aligner(_images(), out_dir=tmp_path / "run", **{**SETTINGS, "batch_size": 1})


class _FakeContext:
    world_size, rank, enabled, is_main = 2, 0, True, True

    def device_for(self, device):
        return device
