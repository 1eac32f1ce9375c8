"""The benchmark scripts that score checkpoints run end to end (on real MNIST, where it is present)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import stnkit
from stnkit.models import classifier

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_error_analysis_reports_distorted_and_undistorted_error(tmp_path, data_root, capsys):
    checkpoint = stnkit.models.save_checkpoint(tmp_path / "r.safetensors", classifier("st-cnn", "affine", (28, 28)))
    out = tmp_path / "report.md"
    script = load_script("error_analysis")
    assert script.main([f"rotated={checkpoint}", "--test-seeds", "0", "--data", str(data_root), "--out", str(out)]) == 0
    report = out.read_text(encoding="utf-8")
    assert "| rotated, seed 0 |" in report and "| the same digits undistorted |" in report
    # Four quartiles of the rotation angle, 2,500 digits each, spanning 0-90 degrees.
    rows = [line for line in report.splitlines() if line.startswith("| ") and line.count("|") == 5 and "-" in line.split("|")[1]]
    assert [int(row.split("|")[2]) for row in rows] == [2500] * 4
    assert rows[0].split("|")[1].strip().startswith("0.0-") and rows[-1].split("|")[1].strip().endswith("-90.0")
