"""End-to-end tests of ``stnkit align`` and ``stnkit train-aligner`` on temporary files."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stnkit.cli.main import main
from stnkit.models.checkpoint import save_checkpoint
from stnkit.models.registry import build_model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("align-cli")
    rng = np.random.default_rng(0)
    colour = cv2.GaussianBlur(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), (0, 0), 2)
    grey = cv2.GaussianBlur(rng.integers(0, 256, (300, 200), dtype=np.uint8), (0, 0), 2)
    paths = {"input": folder / "input.png", "support": folder / "support.png"}
    cv2.imwrite(str(paths["input"]), colour)
    cv2.imwrite(str(paths["support"]), grey)
    torch.manual_seed(0)
    model = build_model({"kind": "aligner", "transform": "projective", "size": [32, 32], "channels": [8, 16]})
    paths["model"] = save_checkpoint(folder / "tiny.safetensors", model)
    paths["other"] = save_checkpoint(folder / "other.safetensors", torch.nn.Linear(2, 2), {"kind": "test-not-an-aligner"})
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(paths["model"].read_bytes()[:500])
    paths["truncated"] = truncated
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(paths["input"].read_bytes()[:200])
    paths["corrupt"] = corrupt
    (folder / "empty.png").write_bytes(b"")
    paths["empty"] = folder / "empty.png"
    paths["folder"] = folder
    return paths


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_align_writes_image_matrix_and_overlay(files, tmp_path, capsys):
    out, matrix, overlay = tmp_path / "aligned.png", tmp_path / "m.json", tmp_path / "overlay.png"
    code, _, err = run(capsys, "align", files["input"], files["support"], "-o", out, "--model", files["model"],
                       "--matrix-out", matrix, "--overlay", overlay)
    assert code == 0, err
    aligned = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert aligned.shape == (300, 200, 3)  # the support's size, the input's channels
    record = json.loads(matrix.read_text())
    assert record["input_size"] == [120, 160] and record["support_size"] == [300, 200]
    expected = cv2.warpPerspective(cv2.imread(str(files["input"])), np.array(record["support_pix_from_input_pix"]), (200, 300))
    assert np.abs(aligned.astype(int) - expected.astype(int)).max() <= 1
    picture = cv2.imread(str(overlay))
    assert picture.shape[0] == 256 and picture.shape[1] > 4 * 100

    code, _, err = run(capsys, "align", files["input"], files["support"], "-o", out, "--model", files["model"])
    assert code != 0 and "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "align", files["input"], files["support"], "-o", out, "--model", files["model"], "--overwrite")
    assert code == 0, err


def test_align_records_the_refinement_and_can_skip_it(files, tmp_path, capsys):
    for flag, refined in (("--refine", True), ("--no-refine", False)):
        out, matrix = tmp_path / f"aligned{flag}.png", tmp_path / f"m{flag}.json"
        code, _, err = run(capsys, "align", files["input"], files["support"], "-o", out, "--model", files["model"],
                           "--matrix-out", matrix, flag)
        assert code == 0, err
        record = json.loads(matrix.read_text())
        assert record["refined"] is refined and (record["ncc"] is not None) is refined


def test_align_a_folder(files, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("a.png", "b.jpg"):
        cv2.imwrite(str(inputs / name), cv2.imread(str(files["input"])))
    out = tmp_path / "out"
    code, _, err = run(capsys, "align", inputs, files["support"], "-o", out, "--model", files["model"],
                       "--matrix-out", tmp_path / "all.json", "--overlay", tmp_path / "overlays")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.jpg"]
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["a.png", "b.png"]
    assert len(json.loads((tmp_path / "all.json").read_text())["images"]) == 2


@pytest.mark.parametrize(
    "case, message",
    [
        ("corrupt", "corrupt or truncated"),
        ("empty", "empty file"),
        ("missing", "no such file"),
        ("other", "not an aligner"),
        ("truncated", "truncated"),
        ("missing_folder", "does not exist"),
        ("bad_format", "unsupported image format"),
    ],
)
def test_align_bad_inputs_give_one_line_and_nonzero_exit(files, tmp_path, capsys, case, message):
    input_path, model, out = files["input"], files["model"], tmp_path / "out.png"
    if case in ("corrupt", "empty"):
        input_path = files[case]
    elif case == "missing":
        input_path = tmp_path / "nope.png"
    elif case in ("other", "truncated"):
        model = files[case]
    elif case == "missing_folder":
        out = tmp_path / "no" / "such" / "out.png"
    elif case == "bad_format":
        out = tmp_path / "out.xyz"
    code, _, err = run(capsys, "align", input_path, files["support"], "-o", out, "--model", model)
    assert code != 0
    assert err.startswith("stnkit: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_align_a_zero_size_image_fails_cleanly(files, tmp_path, capsys):
    # A PNG whose header claims 0x0 pixels.
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    zero = tmp_path / "zero.png"
    zero.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    code, _, err = run(capsys, "align", zero, files["support"], "-o", tmp_path / "o.png", "--model", files["model"])
    assert code != 0 and "zero.png" in err and len(err.strip().splitlines()) == 1


def test_train_aligner_cli(files, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), cv2.resize(cv2.imread(str(files["support"])), (300, 300)))
    out = tmp_path / "run"
    args = ["train-aligner", "--images", images, "--transform", "affine", "--out", out, "--size", "32",
            "--batch-size", "2", "--iterations", "1", "--eval-every", "2", "--no-progress"]
    code, stdout, err = run(capsys, *args, "--steps", "2")
    assert code == 0, err
    assert (out / "aligner.safetensors").is_file() and "aligner written" in stdout
    code, _, err = run(capsys, *args, "--steps", "2")
    assert code != 0 and "already holds a training run" in err
    code, _, err = run(capsys, *args, "--steps", "4", "--resume")
    assert code == 0, err
    code, _, err = run(capsys, "train-aligner", "--out", out, "--steps", "1")
    assert code != 0 and "exactly one of --images DIR and --builtin" in err
