"""Data-parallel training: 2 CPU processes under torchrun (gloo) train the same weights as one process.

The convention under test (stnkit.training.distributed): ``batch_size`` is the
global batch, each rank trains on its slice of it, so the result does not
depend on the number of processes, uneven slices and resuming included.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stnkit.models.checkpoint import load_checkpoint
from stnkit.training.distributed import DistributedContext, setup_distributed
from stnkit.training.trainer import LAST_CHECKPOINT, METRICS_FILE, TrainConfig, Trainer

# 50 examples in batches of 15: slices of 8/7 and, for the last batch of 5, 3/2.
SETTINGS = dict(epochs=2, batch_size=15, lr=0.05, optimizer="sgd", momentum=0.9, eval_every=2, progress=False, seed=3)

SETUP = textwrap.dedent(
    """
    import torch
    from stnkit.models.classifiers import classifier

    def make_run():
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(50, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (50,), generator=generator)
        x_test = torch.rand(21, 1, 28, 28, generator=generator)
        y_test = torch.randint(0, 10, (21,), generator=generator)
        torch.manual_seed(0)
        model = classifier("st-fcn", "affine", (28, 28))
        return model, (lambda epoch: (x, y)), (x_test, y_test)
    """
)

WORKER = SETUP + textwrap.dedent(
    """
    import json, sys
    from stnkit.training.trainer import TrainConfig, Trainer

    settings = json.loads(sys.argv[1])
    model, epoch_fn, test_data = make_run()
    if settings.pop("resume_run", False):
        trainer = Trainer.resume(settings["out_dir"], epoch_fn, test_data, progress=False)
    else:
        trainer = Trainer(model, None, epoch_fn, test_data, TrainConfig(**settings))
    result = trainer.fit()
    assert trainer.dist.world_size == 2, trainer.dist
    # One write per line: torchrun runs the workers unbuffered, and print() would write word by word,
    # interleaving the two ranks' lines.
    sys.stdout.write(f"RESULT {trainer.dist.rank} {result.steps} {result.test_error}\\n")
    sys.stdout.flush()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(tmp_path: Path, settings: dict, processes: int = 2) -> str:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    import json

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc-per-node={processes}",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), json.dumps(settings),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _single_process(out_dir: Path | None, **overrides) -> Trainer:
    namespace: dict = {}
    exec(SETUP, namespace)
    model, epoch_fn, test_data = namespace["make_run"]()
    trainer = Trainer(model, None, epoch_fn, test_data, TrainConfig(**{**SETTINGS, "out_dir": out_dir, **overrides}))
    trainer.fit()
    return trainer


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / LAST_CHECKPOINT).model_state


def _metrics(run: Path) -> list[dict[str, str]]:
    with open(run / METRICS_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_context_outside_torchrun_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = setup_distributed("cpu")
    assert context == DistributedContext() and not context.enabled and context.is_main
    x = torch.arange(10)
    assert context.shard(x)[0] is x and context.all_reduce_sum(x) is x


def test_shards_cover_the_batch_in_order():
    x = torch.arange(7)
    pieces = [DistributedContext(world_size=3, rank=r).shard(x)[0].tolist() for r in range(3)]
    assert pieces == [[0, 1, 2], [3, 4], [5, 6]]


def test_bad_environment_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="RANK is missing"):
        setup_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        setup_distributed("cpu")


def test_two_processes_train_the_weights_of_one(tmp_path):
    single = _single_process(tmp_path / "single")
    ddp_run = tmp_path / "ddp"
    stdout = _torchrun(tmp_path, {**SETTINGS, "out_dir": str(ddp_run)})
    results = sorted(line.split()[1:] for line in stdout.splitlines() if line.startswith("RESULT"))
    assert [r[0] for r in results] == ["0", "1"]
    # Both ranks agree on the (all-reduced) test error, and it is the single run's.
    assert results[0][1:] == results[1][1:] == [str(single.step), str(single.test_error)]
    _assert_same_weights(_weights(ddp_run), _weights(tmp_path / "single"))
    # Rank 0 alone wrote the metrics; the all-reduced training loss is the global batch's.
    ddp_rows, single_rows = _metrics(ddp_run), _metrics(tmp_path / "single")
    assert [row["step"] for row in ddp_rows] == [row["step"] for row in single_rows]
    for ddp_row, single_row in zip(ddp_rows, single_rows):
        assert float(ddp_row["train_loss"]) == pytest.approx(float(single_row["train_loss"]), rel=1e-5)
        assert ddp_row["train_acc"] == single_row["train_acc"] and ddp_row["test_error"] == single_row["test_error"]
    # The checkpoint carries the full training config.
    assert load_checkpoint(ddp_run / LAST_CHECKPOINT).trainer_state["train_config"]["batch_size"] == 15


def test_interrupted_and_resumed_ddp_run_matches_one_process(tmp_path):
    _single_process(tmp_path / "single")
    ddp_run = tmp_path / "ddp"
    _torchrun(tmp_path, {**SETTINGS, "out_dir": str(ddp_run), "max_steps": 3})
    assert load_checkpoint(ddp_run / LAST_CHECKPOINT).trainer_state["step"] == 3
    _torchrun(tmp_path, {"out_dir": str(ddp_run), "resume_run": True})
    assert load_checkpoint(ddp_run / LAST_CHECKPOINT).trainer_state["step"] == 8
    _assert_same_weights(_weights(ddp_run), _weights(tmp_path / "single"))
