"""Hostile files: pickles posing as checkpoints, broken and bomb images, and a seeded fuzz of both.

Every case must end the CLI cleanly: a non-zero exit code and exactly one
``stnkit: ...`` line on stderr, never a traceback (``main`` would raise it).
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import stnkit
from stnkit.cli.main import main
from stnkit.data.images import DEFAULT_MAX_PIXELS, load_image
from stnkit.models.checkpoint import load_checkpoint, save_checkpoint
from stnkit.models.classifiers import classifier
from stnkit.models.registry import build_model

FUZZ_CASES = 50


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG whose header claims ``width x height`` 8-bit grey pixels, with the given (or a tiny) IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def valid_zero_png(width: int, height: int) -> bytes:
    """A complete, valid black PNG built by streaming compression (never holds the pixels in memory)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return png_claiming(width, height, b"".join(parts))


def jpeg_claiming(width: int, height: int) -> bytes:
    """SOI, a baseline SOF0 claiming ``width x height`` (1 component), SOS, a few bytes, EOI."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
    return b"\xff\xd8" + sof + sos + b"\x00" * 16 + b"\xff\xd9"


def gif_claiming(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b",\0\0\0\0" + struct.pack("<HH", width, height) + b"\0\x02\x02D\x01\0;"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), (0, 0), 2)
    paths = {"png": folder / "good.png", "jpg": folder / "good.jpg", "support": folder / "support.png"}
    cv2.imwrite(str(paths["png"]), image)
    cv2.imwrite(str(paths["jpg"]), image)
    cv2.imwrite(str(paths["support"]), image[:, :, 0])
    torch.manual_seed(0)
    aligner = build_model({"kind": "aligner", "transform": "projective", "size": [32, 32], "channels": [8, 16]})
    paths["aligner"] = save_checkpoint(folder / "aligner.safetensors", aligner)
    paths["classifier"] = save_checkpoint(folder / "classifier.safetensors", classifier("st-fcn", "affine", (42, 42)))
    return paths


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_clean_failure(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0, err
    assert len(lines) == 1 and lines[0].startswith("stnkit: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


# ------------------------------------------------------------------ no pickle


def _pickle_loading_calls(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name in ("torch.load", "pickle.load", "pickle.loads", "dill.load", "joblib.load", "torch.jit.load",
                    "cloudpickle.load", "pickle.Unpickler", "np.load", "numpy.load"):
            unsafe = name not in ("np.load", "numpy.load") or any(
                k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            )
            if unsafe:
                found.append(name)
    return found


def test_no_code_path_unpickles():
    package = Path(stnkit.__file__).parent
    offenders = {}
    for source in package.rglob("*.py"):
        calls = _pickle_loading_calls(ast.parse(source.read_text(), filename=str(source)))
        if calls:
            offenders[str(source.relative_to(package))] = calls
    assert offenders == {}


class _Payload:
    """Unpickling this would create the marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_malicious_pickle_checkpoint_is_refused_and_never_executed(tmp_path, capsys, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    buffer = io.BytesIO()
    if writer == "torch.save":
        torch.save({"state_dict": _Payload(marker)}, buffer)
    else:
        pickle.dump(_Payload(marker), buffer)
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_checkpoint(path)
    code, err = run_cli(capsys, "eval", path, "--digit-sample", "--test-limit", "10")
    assert_clean_failure(code, err, "not a safetensors file")
    code, err = run_cli(capsys, "align", tmp_path / "in.png", tmp_path / "in.png", "-o", tmp_path / "o.png", "--model", path)
    assert code != 0 and "Traceback" not in err
    assert not marker.exists()


# ------------------------------------------------------------------ images


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("png_bomb_100000", ("above the limit of max_pixels=100000000",)),
        ("png_bomb_12000x9000", ("12000x9000", "max_pixels=100000000")),
        ("jpeg_bomb", ("above the limit of max_pixels=100000000",)),
        ("gif_bomb", ("max_pixels=100000000",)),
        ("truncated_png", ("corrupt or truncated",)),
        ("truncated_jpg", ("corrupt or truncated",)),
        ("text", ("not a readable image",)),
        ("checkpoint_as_image", ("not a readable image",)),
        ("zero_size", ()),
    ],
)
@pytest.mark.parametrize("role", ["input", "support"])
def test_broken_and_bomb_images_fail_in_one_line(files, tmp_path, capsys, case, fragments, role):
    bad = tmp_path / ("bad.jpg" if "jpg" in case or "jpeg" in case else "bad.gif" if "gif" in case else "bad.png")
    if case == "png_bomb_100000":
        bad.write_bytes(png_claiming(100_000, 100_000))
    elif case == "png_bomb_12000x9000":
        bad.write_bytes(png_claiming(12_000, 9_000))
    elif case == "jpeg_bomb":
        bad.write_bytes(jpeg_claiming(65_000, 65_000))
    elif case == "gif_bomb":
        bad.write_bytes(gif_claiming(65_535, 65_535))
    elif case == "truncated_png":
        bad.write_bytes(files["png"].read_bytes()[:300])
    elif case == "truncated_jpg":
        bad.write_bytes(files["jpg"].read_bytes()[:400])
    elif case == "text":
        bad.write_text("<html>this is not an image</html>\n")
    elif case == "checkpoint_as_image":
        bad.write_bytes(files["aligner"].read_bytes())
    elif case == "zero_size":
        bad.write_bytes(png_claiming(0, 0))
    input_path, support = (bad, files["support"]) if role == "input" else (files["png"], bad)
    out = tmp_path / "out.png"
    code, err = run_cli(capsys, "align", input_path, support, "-o", out, "--model", files["aligner"])
    assert_clean_failure(code, err, str(bad), *fragments)
    assert not out.exists()


def test_a_valid_image_over_the_pixel_limit_is_refused_naming_the_limit(tmp_path, capsys, files):
    # 10500 x 10000 = 105 MP, a complete and valid PNG of about 100 KB.
    big = tmp_path / "big.png"
    big.write_bytes(valid_zero_png(10_500, 10_000))
    assert big.stat().st_size < 1_000_000
    with pytest.raises(ValueError, match=r"10500x10000 = 105000000 pixels, above the limit of max_pixels=100000000"):
        load_image(big)
    assert DEFAULT_MAX_PIXELS == 100_000_000
    code, err = run_cli(capsys, "align", big, files["support"], "-o", tmp_path / "o.png", "--model", files["aligner"])
    assert_clean_failure(code, err, "max_pixels=100000000")


_MEASURE_ALIGN = """
import resource, sys
from stnkit.cli.main import main
code = main(sys.argv[1:])
print("maxrss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "code", code)
"""


def test_a_large_valid_image_is_aligned_within_bounded_memory(tmp_path, files):
    # 4000 x 3000 grey (12 MP): peak memory of the whole `stnkit align` process,
    # against the same command on the small image.
    big = tmp_path / "big.png"
    big.write_bytes(valid_zero_png(4000, 3000))

    def peak_mb(image: Path) -> float:
        out = tmp_path / f"aligned-{image.stem}.png"
        result = subprocess.run(
            [sys.executable, "-c", _MEASURE_ALIGN, "align", str(image), str(files["support"]), "-o", str(out),
             "--model", str(files["aligner"])],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0 and "code 0" in result.stdout, result.stderr
        assert out.exists()
        return int(result.stdout.split()[-3]) / 1024

    baseline, large = peak_mb(files["png"]), peak_mb(big)
    # 12 MB of pixels: the aligner may hold a few float copies, but nothing like a blow-up.
    assert large - baseline < 12 * 16, (baseline, large)


@pytest.mark.parametrize("case", ["bomb", "zero_size"])
def test_real_process_prints_one_line_and_exits_non_zero(tmp_path, files, case):
    # A real process: C libraries (libpng...) write to fd 2 directly, which capsys would not see.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000) if case == "bomb" else png_claiming(0, 0))
    result = subprocess.run(
        [sys.executable, "-m", "stnkit.cli.main", "align", str(bomb), str(files["support"]), "-o", str(tmp_path / "o.png"),
         "--model", str(files["aligner"])],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and str(bomb) in result.stderr, result.stderr
    assert case != "bomb" or "max_pixels" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ fuzz


def _fuzz_bytes(seed: int, valid: bytes) -> tuple[str, bytes]:
    """Case ``seed``: random bytes, a randomly mutated valid file, or a truncated one."""
    rng = np.random.default_rng(seed)
    kind = ("random", "mutated", "truncated")[seed % 3]
    if kind == "random":
        return kind, rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
    data = bytearray(valid)
    if kind == "mutated":
        for position in rng.integers(0, len(data), int(rng.integers(1, 20))):
            data[position] = int(rng.integers(0, 256))
        return kind, bytes(data)
    return kind, bytes(data[: int(rng.integers(0, len(data) - 1))])


def test_fuzzed_images_never_crash_stnkit_align(files, tmp_path, capsys):
    outcomes = {"refused": 0, "decoded": 0}
    for seed in range(FUZZ_CASES):
        valid = (files["png"], files["jpg"])[seed % 2].read_bytes()
        kind, data = _fuzz_bytes(seed, valid)
        path = tmp_path / f"fuzz{seed}{'.png' if seed % 2 == 0 else '.jpg'}"
        path.write_bytes(data)
        out = tmp_path / f"out{seed}.png"
        code, err = run_cli(capsys, "align", path, files["support"], "-o", out, "--model", files["aligner"])
        if code == 0 and kind == "mutated":
            # A few flipped bytes in the pixel data can leave a decodable image: then it is aligned.
            assert out.exists() and err == "", err
            outcomes["decoded"] += 1
            continue
        assert_clean_failure(code, err, str(path))
        assert not out.exists()
        outcomes["refused"] += 1
    assert outcomes["refused"] >= FUZZ_CASES * 2 // 3, outcomes


def test_fuzzed_checkpoints_never_crash_stnkit_eval(files, tmp_path, capsys):
    valid = files["classifier"].read_bytes()
    for seed in range(FUZZ_CASES):
        _, data = _fuzz_bytes(1000 + seed, valid)
        path = tmp_path / f"fuzz{seed}.safetensors"
        path.write_bytes(data)
        code, err = run_cli(capsys, "eval", path, "--digit-sample", "--test-limit", "10")
        assert_clean_failure(code, err, str(path))
