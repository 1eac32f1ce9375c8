"""Downloads over a loopback HTTP server: checksums, corrupted files, mirror fallback, the CLI."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from stnkit.cli.main import main
from stnkit.data.datasets import KINDS, SPLITS, load_mnist, split_files
from stnkit.data.download import FILES, MIRRORS, DownloadError, RemoteFile, download, verify_file

MNIST_NAMES = [f.name for f in FILES["mnist"]]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@contextlib.contextmanager
def serve(directory: Path):
    """Serve ``directory`` on 127.0.0.1 at a free port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def corrupted_copy(source: Path, target: Path) -> None:
    """A valid gzip of the IDX data with one byte of the payload changed: only the checksum can tell."""
    data = bytearray(gzip.decompress(source.read_bytes()))
    data[-1] ^= 0xFF
    target.write_bytes(gzip.compress(bytes(data), compresslevel=1))


# ---------------------------------------------------------------- tables
def test_tables_cover_both_datasets_and_every_file():
    assert set(FILES) == set(MIRRORS) == set(KINDS)
    expected = {name for split in SPLITS for name in split_files(split)}
    for files in FILES.values():
        assert {f.name for f in files} == expected
        assert all(len(f.md5) == 32 and len(f.payload_md5) == 32 for f in files)
    for mirrors in MIRRORS.values():
        assert mirrors and all(m.startswith(("http://", "https://")) and m.endswith("/") for m in mirrors)


def test_published_checksums_match_the_real_files(data_root):
    # The shared copies were re-compressed, so it is the payload checksum that matches here.
    for remote in FILES["mnist"]:
        path = data_root / "mnist" / remote.name
        assert verify_file(path, "mnist"), remote.name
        payload = hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest()
        assert payload == remote.payload_md5


def test_archive_checksum_alone_is_enough(monkeypatch, tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"\x1f\x8bnot really gzip")
    fake = RemoteFile(path.name, hashlib.md5(path.read_bytes()).hexdigest(), "0" * 32)
    monkeypatch.setitem(FILES, "mnist", (fake,))
    assert verify_file(path, "mnist")
    monkeypatch.setitem(FILES, "mnist", (RemoteFile(path.name, "0" * 32, "0" * 32),))
    assert not verify_file(path, "mnist")
    with pytest.raises(ValueError, match="not a file of mnist"):
        verify_file(tmp_path / "other.gz", "mnist")


# ------------------------------------------------------------- downloads
def test_download_from_loopback_mirror_verifies_and_loads(data_root, tmp_path):
    logged = []
    with serve(data_root / "mnist") as url:
        paths = download("mnist", tmp_path, mirrors=[url], log=logged.append)
        assert [p.name for p in paths] == MNIST_NAMES
        for path in paths:
            assert path.read_bytes() == (data_root / "mnist" / path.name).read_bytes()
            assert verify_file(path, "mnist")
        assert leftovers(tmp_path / "mnist") == sorted(MNIST_NAMES)  # no temporary files
        assert all("downloaded" in line and url in line for line in logged)
        images, labels = load_mnist("test", tmp_path)
        assert images.shape == (10000, 28, 28) and labels.shape == (10000,)

    # Files present and valid are kept without touching the network (the server is gone).
    logged.clear()
    assert download("mnist", tmp_path, mirrors=[url], log=logged.append) == paths
    assert all("present, checksum OK" in line for line in logged)


def test_damaged_local_file_is_downloaded_again(data_root, tmp_path):
    (tmp_path / "mnist").mkdir()
    for name in MNIST_NAMES:
        shutil.copy(data_root / "mnist" / name, tmp_path / "mnist" / name)
    corrupted_copy(data_root / "mnist" / "t10k-labels-idx1-ubyte.gz", tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz")
    logged = []
    with serve(data_root / "mnist") as url:
        download("mnist", tmp_path, mirrors=[url], log=logged.append)
    assert verify_file(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", "mnist")
    assert sum("present but damaged" in line for line in logged) == 1


def test_corrupted_download_is_rejected_and_leaves_nothing(data_root, tmp_path):
    bad_mirror = tmp_path / "bad-mirror"
    bad_mirror.mkdir()
    # The first file fails, so the download stops there.
    corrupted_copy(data_root / "mnist" / MNIST_NAMES[0], bad_mirror / MNIST_NAMES[0])
    root = tmp_path / "root"
    with serve(bad_mirror) as url:
        with pytest.raises(DownloadError, match="could not download train-images-idx3-ubyte.gz") as info:
            download("mnist", root, mirrors=[url])
    message = str(info.value)
    assert "MD5 mismatch" in message and url + "train-images-idx3-ubyte.gz" in message
    assert FILES["mnist"][0].payload_md5 in message
    assert leftovers(root / "mnist") == []
    assert not root.exists()  # nor the empty folders the download created


def test_truncated_and_missing_files_are_rejected_without_real_data(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    payload = b"\x00\x00\x08\x01\x00\x00\x13\x88" + bytes(range(256)) * 20
    (mirror / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(payload)[:-20])
    with serve(mirror) as url:
        with pytest.raises(DownloadError) as info:
            download("fashion-mnist", tmp_path / "root", mirrors=[url])
        assert "gzip data is corrupt" in str(info.value)
        (mirror / "train-images-idx3-ubyte.gz").unlink()
        with pytest.raises(DownloadError, match="404"):
            download("fashion-mnist", tmp_path / "root", mirrors=[url])
    assert leftovers(tmp_path / "root" / "fashion-mnist") == []


def test_next_mirror_is_tried_after_a_bad_one(data_root, tmp_path):
    bad_mirror = tmp_path / "bad-mirror"
    bad_mirror.mkdir()
    corrupted_copy(data_root / "mnist" / "t10k-labels-idx1-ubyte.gz", bad_mirror / "t10k-labels-idx1-ubyte.gz")
    logged = []
    with serve(bad_mirror) as bad_url, serve(data_root / "mnist") as good_url:
        paths = download("mnist", tmp_path / "root", mirrors=[bad_url, good_url], log=logged.append)
    assert all(verify_file(p, "mnist") for p in paths)
    assert all(good_url in line for line in logged)  # 404 or bad checksum on the first, then the second
    assert leftovers(tmp_path / "root" / "mnist") == sorted(MNIST_NAMES)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'emnist'"):
        download("emnist", tmp_path)
    with pytest.raises(ValueError, match="http://, https:// or file://"):
        download("mnist", tmp_path, mirrors=["ftp://example.org/"])
    with pytest.raises(ValueError, match="mirrors is empty"):
        download("mnist", tmp_path, mirrors=[])
    with pytest.raises(ValueError, match="timeout must be positive"):
        download("mnist", tmp_path, mirrors=["http://127.0.0.1:1/"], timeout=0)


# ------------------------------------------------------------------- CLI
def test_cli_download_through_loopback(data_root, tmp_path, capsys):
    with serve(data_root / "mnist") as url:
        code = main(["download", "mnist", "--root", str(tmp_path), "--mirror", url])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"4 files ready in {tmp_path / 'mnist'}" in out
    assert all(verify_file(tmp_path / "mnist" / name, "mnist") for name in MNIST_NAMES)


def test_cli_reports_a_corrupted_download_in_one_line(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in MNIST_NAMES:
        (mirror / name).write_bytes(gzip.compress(b"not mnist"))
    with serve(mirror) as url:
        code = main(["download", "mnist", "--root", str(tmp_path / "root"), "--mirror", url])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("stnkit: could not download train-images-idx3-ubyte.gz") and err.count("\n") == 1
    assert leftovers(tmp_path / "root" / "mnist") == []


def test_cli_rejects_unknown_dataset(tmp_path, capsys):
    assert main(["download", "cifar10", "--root", str(tmp_path)]) == 2
    assert "cifar10" in capsys.readouterr().err
