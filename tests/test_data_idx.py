"""IDX reader/writer, data-root resolution, MNIST loaders and the shipped digit sample."""

from __future__ import annotations

import gzip
import struct
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from stnkit.data import datasets
from stnkit.data.datasets import DEFAULT_ROOT, ENV_VAR, find_split_files, load_mnist, resolve_data_root
from stnkit.data.digits import SAMPLE_FILES, load_digit_sample
from stnkit.data.idx import IDXFormatError, parse_idx, read_idx, write_idx

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + payload


def write_fake_mnist(directory: Path, n: int, *, labels: int | None = None) -> None:
    """The four files of a tiny MNIST-shaped dataset (``labels`` overrides the label count)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", (np.arange(labels or n) % 10).astype(np.uint8))


# ----------------------------------------------------------------- real files
def test_real_mnist_counts_shapes_and_label_histograms(data_root):
    train_images, train_labels = load_mnist("train", data_root)
    test_images, test_labels = load_mnist("test", data_root)
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert test_images.shape == (10000, 28, 28) and test_images.dtype == np.uint8
    assert train_labels.shape == (60000,) and train_labels.dtype == np.int64
    assert test_labels.shape == (10000,) and test_labels.dtype == np.int64
    assert np.bincount(train_labels, minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(test_labels, minlength=10).tolist() == TEST_COUNTS
    # Real digits: black background, white ink reaching full intensity.
    assert train_images[:, 0, :].max() < 255 and train_images.max() == 255


def test_real_file_is_read_from_content_not_name(data_root, tmp_path):
    reference = read_idx(data_root / "mnist" / "t10k-labels-idx1-ubyte.gz")
    raw = gzip.decompress((data_root / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "raw-but-named.gz").write_bytes(raw)
    (tmp_path / "gzipped-but-unnamed").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-but-named.gz"), reference)
    np.testing.assert_array_equal(read_idx(tmp_path / "gzipped-but-unnamed"), reference)


def test_truncated_real_gzip_names_the_file(data_root, tmp_path):
    data = (data_root / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(IDXFormatError, match="corrupt or truncated gzip") as info:
        read_idx(bad)
    assert str(bad) in str(info.value)


# ------------------------------------------------------------ format errors
def test_parse_small_arrays_of_every_type(tmp_path):
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        array = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
        for name in ("a.gz", "a.idx"):
            back = read_idx(write_idx(tmp_path / name, array))
            assert back.dtype == dtype and back.flags.writeable
            np.testing.assert_array_equal(back, array)
    assert (tmp_path / "a.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "a.idx").read_bytes()[:4] == bytes([0, 0, 0x0E, 3])


def test_writer_is_byte_for_byte_reproducible(tmp_path):
    array = np.arange(100, dtype=np.uint8)
    assert write_idx(tmp_path / "a.gz", array).read_bytes() == write_idx(tmp_path / "b.gz", array).read_bytes()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "unknown IDX element type 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated IDX header"),
        (idx_bytes(0x08, (10, 28, 28), bytes(100)), r"truncated IDX data: shape \(10, 28, 28\)"),
        (idx_bytes(0x0C, (3,), bytes(11)), "truncated IDX data"),
        (idx_bytes(0x08, (3,), bytes(5)), "2 unexpected bytes"),
        (b"\x1f\x8b\x08\x00garbage", "corrupt or truncated gzip"),
    ],
)
def test_corrupt_data_raises_a_clear_error_naming_the_source(data, message, tmp_path):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(IDXFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_gzip_stream_is_rejected(tmp_path):
    full = gzip.compress(idx_bytes(0x08, (1000,), bytes(range(256)) * 3 + bytes(232)))
    with pytest.raises(IDXFormatError, match="corrupt or truncated gzip"):
        parse_idx(full[:-10], "cut.gz")


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gz"):
        read_idx(tmp_path / "nothing.gz")
    with pytest.raises(TypeError, match="bytes"):
        parse_idx("not bytes")
    with pytest.raises(TypeError, match="cannot store dtype int64"):
        write_idx(tmp_path / "x", np.arange(3))


# --------------------------------------------------------------- data root
def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_data_root() == tmp_path / "home" / ".cache" / "stnkit" / "data"
    assert DEFAULT_ROOT == Path("~/.cache/stnkit/data")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_data_root() == tmp_path / "env"
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_root("~/x") == tmp_path / "home" / "x"
    with pytest.raises(TypeError, match="root must be a path"):
        resolve_data_root(3)


def test_missing_data_names_every_place_searched(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env"))
    with pytest.raises(FileNotFoundError) as info:
        load_mnist("train")
    message = str(info.value)
    assert str(tmp_path / "from-env" / "mnist") in message and f"${ENV_VAR}" in message
    assert "train-images-idx3-ubyte[.gz]" in message
    assert "stnkit download mnist --root DIR" in message and f"{ENV_VAR}=DIR" in message

    with pytest.raises(FileNotFoundError) as info:
        load_mnist("test", root=tmp_path / "explicit", kind="fashion-mnist")
    message = str(info.value)
    assert str(tmp_path / "explicit" / "fashion-mnist") in message
    assert "/usr/share/datasets/fashion-mnist" in message and "dataset-fashion-mnist" in message
    assert "stnkit download fashion-mnist" in message


def test_loader_finds_fashion_mnist_in_the_system_directory(monkeypatch, tmp_path):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    write_fake_mnist(system, 20)
    monkeypatch.setitem(datasets.SYSTEM_DIRS, "fashion-mnist", (system,))
    images, labels = load_mnist("train", root=tmp_path / "empty-root", kind="fashion-mnist")
    assert images.shape == (20, 28, 28) and labels.tolist() == [i % 10 for i in range(20)]
    # The data root wins over the system directory.
    write_fake_mnist(tmp_path / "root" / "fashion-mnist", 7)
    assert load_mnist("test", root=tmp_path / "root", kind="fashion-mnist")[0].shape == (7, 28, 28)


def test_loader_accepts_unpacked_files_and_checks_consistency(tmp_path):
    write_fake_mnist(tmp_path / "mnist", 12)
    for path in (tmp_path / "mnist").glob("t10k-*.gz"):
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    images_path, _ = find_split_files("test", tmp_path)
    assert images_path.name == "t10k-images-idx3-ubyte"
    assert load_mnist("test", tmp_path)[0].shape == (12, 28, 28)

    write_fake_mnist(tmp_path / "bad" / "mnist", 12, labels=11)
    with pytest.raises(ValueError, match="12 images but .* 11 labels"):
        load_mnist("train", tmp_path / "bad")


def test_loader_rejects_unknown_split_and_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'valid'.*train, test"):
        load_mnist("valid", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset 'kmnist'.*mnist, fashion-mnist"):
        load_mnist("train", tmp_path, kind="kmnist")


# ------------------------------------------------------------ digit sample
def test_digit_sample_is_balanced_and_small():
    for split, per_class in (("train", 800), ("test", 200)):
        images, labels, indices = load_digit_sample(split, with_indices=True)
        assert images.shape == (10 * per_class, 28, 28) and images.dtype == np.uint8
        assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [per_class] * 10
        assert np.all(np.diff(indices) > 0)  # distinct, in original order
        assert indices.max() < (60000 if split == "train" else 10000)
    folder = resources.files("stnkit").joinpath("assets", "digits")
    files = [folder.joinpath(name) for names in SAMPLE_FILES.values() for name in names.values()]
    assert sum(len(f.read_bytes()) for f in files) <= 2_000_000
    attribution = folder.joinpath("ATTRIBUTION.txt").read_text()
    for needle in ("LeCun", "Cortes", "Burges", "CC BY-SA 3.0", "make_digit_sample.py"):
        assert needle in attribution
    with pytest.raises(ValueError, match="unknown split"):
        load_digit_sample("valid")


def test_digit_sample_matches_real_mnist(data_root):
    for split in ("train", "test"):
        images, labels, indices = load_digit_sample(split, with_indices=True)
        real_images, real_labels = load_mnist(split, data_root)
        np.testing.assert_array_equal(images, real_images[indices])
        np.testing.assert_array_equal(labels, real_labels[indices])
