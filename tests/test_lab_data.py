"""Fashion-MNIST loading: IDX round trips, checksum/truncation/missing-file errors, search order."""
import gzip

import numpy as np
import pytest

from normlab.lab import data as D


def test_idx_round_trip_gz_and_raw(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    labels = np.array([3, 7], dtype=np.uint8)
    for name in ("a-idx3-ubyte.gz", "a-idx3-ubyte"):
        digest = D.write_idx(tmp_path / name, images)
        assert np.array_equal(D.read_idx(tmp_path / name, digest), images)
    digest = D.write_idx(tmp_path / "l.gz", labels)
    assert np.array_equal(D.read_idx(tmp_path / "l.gz", digest), labels)


def test_checksum_mismatch_is_named(tmp_path):
    D.write_idx(tmp_path / "x.gz", np.zeros(5, np.uint8))
    with pytest.raises(D.DataError, match=r"corrupt: sha256 .* expected 0+"):
        D.read_idx(tmp_path / "x.gz", "0" * 64)


def test_truncated_raw_and_gz(tmp_path):
    D.write_idx(tmp_path / "img", np.zeros((10, 28, 28), np.uint8))
    raw = (tmp_path / "img").read_bytes()
    (tmp_path / "img").write_bytes(raw[:-100])
    with pytest.raises(D.DataError, match=r"truncated: the header declares \(10, 28, 28\) -> 7856 bytes"):
        D.read_idx(tmp_path / "img")
    gz = gzip.compress(raw)
    (tmp_path / "img.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(D.DataError, match="truncated gzip stream"):
        D.read_idx(tmp_path / "img.gz")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(D.DataError, match="not even an IDX header"):
        D.read_idx(tmp_path / "tiny")
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x05" + b"\x00" * 8)
    with pytest.raises(D.DataError, match="magic number 0x00000805"):
        D.read_idx(tmp_path / "bad")


def test_missing_files_listed(tmp_path):
    D.write_synthetic(tmp_path, 20, 10)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DataError, match=r"lacks t10k-labels-idx1-ubyte") as err:
        D.load_fashion_mnist(tmp_path, verify=False)
    assert "--data-dir" in str(err.value)


def test_canonical_checksums_reject_synthetic_data(tmp_path):
    D.write_synthetic(tmp_path, 20, 10)
    with pytest.raises(D.DataError, match="corrupt"):
        D.load_fashion_mnist(tmp_path)  # verify=True: these are not the real files
    train, test = D.load_fashion_mnist(tmp_path, verify=False)
    assert train.images.shape == (20, 28, 28) and len(test) == 10
    assert train.float_images().shape == (20, 1, 28, 28) and float(train.float_images().max()) <= 1.0


def test_label_count_mismatch(tmp_path):
    D.write_synthetic(tmp_path, 20, 10)
    D.write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(D.DataError, match="20 images but 19 labels"):
        D.load_fashion_mnist(tmp_path, verify=False)


def test_search_order_env_then_vendored(tmp_path, monkeypatch):
    D.write_synthetic(tmp_path / "env", 20, 10, compress=False)
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "env"))
    dirs = D.candidate_dirs()
    assert dirs[0] == tmp_path / "env" and dirs[1] == D.vendored_dir()
    assert dirs[-1].as_posix() == "/usr/share/datasets/fashion-mnist"
    assert D.find_data_dir() == tmp_path / "env"
    assert D.candidate_dirs(tmp_path) == [tmp_path]  # an explicit --data-dir is the only place searched


def test_vendored_copy_is_canonical():
    directory = D.vendored_dir()
    if not (directory / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip("no vendored data in this checkout")
    labels = D.read_idx(directory / "t10k-labels-idx1-ubyte.gz", D.CHECKSUMS["t10k-labels-idx1-ubyte"])
    assert labels.shape == (10000,) and np.bincount(labels).tolist() == [1000] * 10
    assert (directory / "LICENSE").read_text().count("Zalando SE") == 1
