"""``scripts/gpu_session.py``: the parts that can be checked without a GPU or a training run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_session.py"


@pytest.fixture(scope="module")
def gpu_session():
    spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_averaging_phase_drops_model_flags_and_sets_its_own(gpu_session):
    flags = gpu_session.average_phase_flags(
        ["--dropout", "0.25", "--weight-decay", "1e-4", "--iterations", "2", "--ema-decay", "0.9995", "--jitter-px", "1"],
        seed=21, copy=0, epochs=12,
    )
    # The model (dropout, rounds) comes from the checkpoint; the moving average is the phase's own.
    assert "--dropout" not in flags and "--iterations" not in flags
    assert flags[:4] == ["--weight-decay", "1e-4", "--jitter-px", "1"]
    assert flags[flags.index("--ema-decay") + 1] == str(gpu_session.AVERAGE_EMA_DECAY)
    assert flags[flags.index("--schedule") + 1] == "step"
    assert flags[flags.index("--epochs") + 1] == "12"


def test_averaging_copies_get_distinct_seeds(gpu_session):
    seeds = {gpu_session.average_phase_flags([], seed, copy, 1)[1] for seed in (21, 22) for copy in range(4)}
    assert len(seeds) == 8


def test_every_job_builds_valid_averaging_flags(gpu_session):
    for job, (_task, _model, _transform, flags) in gpu_session.JOBS.items():
        phase = gpu_session.average_phase_flags(flags, 21, 0, 5)
        assert phase.count("--ema-decay") == 1, job


@pytest.mark.parametrize("bad", [["--average-copies", "-1"], ["--average-share", "1"], ["--average-share", "0"]])
def test_bad_averaging_options_are_refused(gpu_session, tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exit_info:
        gpu_session.main(["--out", str(tmp_path), *bad])
    assert exit_info.value.code == 2
    assert "--average" in capsys.readouterr().err
