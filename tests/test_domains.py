import gzip
import struct

import numpy as np
import pytest

from edgeguard.domains import formats, get_domain
from edgeguard.errors import EdgeguardError


def test_mnist_real_counts_and_shape(data_root):
    d = get_domain("mnist", data_root)
    assert d.train_x.shape == (60000, 3, 32, 32) and d.train_x.dtype == np.uint8
    assert d.test_x.shape == (10000, 3, 32, 32)
    assert d.train_y.dtype == np.int64
    assert np.bincount(d.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert d.classes == tuple("0123456789")


def test_usps_both_formats_agree(data_root):
    zx, zy = formats.read_usps(data_root / "usps", "train")
    assert np.bincount(zy).tolist() == [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644]
    d = get_domain("usps", data_root)
    assert np.bincount(d.test_y).tolist() == [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]
    assert d.train_x.shape[1:] == (3, 32, 32)


def test_usps_h5_fallback(data_root, tmp_path):
    (tmp_path / "usps.h5").symlink_to((data_root / "usps" / "usps.h5").resolve())
    x, y = formats.read_usps(tmp_path, "test")
    assert len(y) == 2007 and x.shape == (2007, 16, 16)


def test_mnist_m_order_and_split(data_root):
    x, y = formats.read_mnist_m(data_root / "mnist_m")
    assert y[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert np.bincount(y).tolist() == [878, 1016, 933, 908, 890, 807, 856, 914, 880, 919]
    d = get_domain("mnist_m", data_root)
    assert len(d.train_y) + len(d.test_y) == 9001 and len(d.test_y) == 1800
    d2 = get_domain("mnist_m", data_root)
    assert np.array_equal(d.test_y, d2.test_y)  # deterministic split


def test_cifar10_folder(data_root):
    d = get_domain("cifar10", data_root)
    assert d.classes[0] == "airplane" and d.num_classes == 10
    assert len(d.train_y) == 8000 and np.bincount(d.test_y).tolist() == [200] * 10


def test_embedded_samples_need_no_root(monkeypatch):
    monkeypatch.delenv("EDGEGUARD_DATA_ROOT", raising=False)
    d = get_domain("usps_sample")
    assert d.train_x.shape == (2000, 3, 32, 32) and d.test_x.shape == (500, 3, 32, 32)
    assert set(np.unique(d.train_y)) == set(range(10))


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_fixture_and_truncation(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "mnist"
    root.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        _write_idx(root / f"{prefix}-images.idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels.idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    d = get_domain("mnist", tmp_path)
    assert d.train_x.shape == (20, 3, 32, 32)
    raw = gzip.decompress((root / "t10k-images.idx3-ubyte.gz").read_bytes())
    (root / "t10k-images.idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(EdgeguardError, match="t10k-images.*truncated"):
        formats.read_mnist(root, "test")


def test_svhn_fixture(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    (tmp_path / "svhn").mkdir()
    for part, n in (("train", 12), ("test", 5)):
        y = rng.integers(1, 11, (n, 1))
        savemat(tmp_path / "svhn" / f"{part}_32x32.mat",
                {"X": rng.integers(0, 255, (32, 32, 3, n)).astype(np.uint8), "y": y.astype(np.uint8)})
    x, labels = formats.read_svhn(tmp_path / "svhn" / "train_32x32.mat")
    assert x.shape == (12, 3, 32, 32) and labels.min() >= 0 and labels.max() <= 9
    d = get_domain("svhn", tmp_path)
    assert len(d.test_y) == 5


def test_svhn_label_10_is_zero(tmp_path):
    from scipy.io import savemat

    X = np.zeros((32, 32, 3, 2), np.uint8)
    X[0, 0, 0, 1] = 200  # pixel (row 0, col 0, red) of image 1
    savemat(tmp_path / "t.mat", {"X": X, "y": np.array([[10], [3]], np.uint8)})
    x, y = formats.read_svhn(tmp_path / "t.mat")
    assert y.tolist() == [0, 3] and x[1, 0, 0, 0] == 200


def test_stl10_fixture_column_major(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "stl10"
    root.mkdir()
    for part, n in (("train", 4), ("test", 3)):
        img = rng.integers(0, 255, (n, 3, 96, 96)).astype(np.uint8)  # (N, C, H, W)
        img.transpose(0, 1, 3, 2).tofile(root / f"{part}_X.bin")  # STL stores column-major (W before H)
        np.array(rng.integers(1, 11, n), np.uint8).tofile(root / f"{part}_y.bin")
        if part == "train":
            ref = img
    x, y = formats.read_stl10(root, "train")
    assert np.array_equal(x, ref)
    assert get_domain("stl10", tmp_path).train_x.shape == (4, 3, 32, 32)


def test_imagefolder(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "pets" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((40, 40, 3), i * 20, np.uint8)).save(tmp_path / "pets" / c / f"{i}.png")
    d = get_domain(f"imagefolder:{tmp_path / 'pets'}")
    assert d.classes == ("cat", "dog") and len(d.train_y) == 8 and len(d.test_y) == 2


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(EdgeguardError, match="mnist"):
        get_domain("mnist", tmp_path)
    (tmp_path / "usps").mkdir()
    (tmp_path / "usps" / "zip.train.gz").write_bytes(gzip.compress(b"1 0.5 0.5\n"))
    with pytest.raises(EdgeguardError, match="zip.train.gz.*257"):
        formats.read_usps(tmp_path / "usps", "train")
    with pytest.raises(EdgeguardError, match="unknown domain"):
        get_domain("nope")
    bad = tmp_path / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(EdgeguardError, match="x.png"):
        get_domain(f"imagefolder:{bad}")
