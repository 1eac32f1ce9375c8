"""The worked examples under examples/ run end to end on tiny settings (``--quick``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, timeout: int = 600) -> str:
    script = EXAMPLES / name
    if not script.is_file():
        pytest.skip(f"{script} is not there")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(script), "--quick", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=EXAMPLES.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_add_st_to_your_cnn():
    out = run_example("add_st_to_your_cnn.py")
    assert "your CNN + ST (affine)" in out and "theta of the first test digit" in out


def test_add_st_to_your_cnn_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = run_example("add_st_to_your_cnn.py", "--transform", "tps", "--onnx", str(tmp_path / "mine.onnx"))
    assert (tmp_path / "mine.onnx").is_file() and "max |onnxruntime - torch|" in out


def test_align_product_photos(tmp_path):
    pytest.importorskip("skimage")
    out = run_example("align_product_photos.py", "--out", str(tmp_path / "sheet.png"))
    assert "mean corner error" in out and (tmp_path / "sheet.png").is_file()


def test_measure_invariance():
    out = run_example("measure_invariance.py")
    assert out.strip()
