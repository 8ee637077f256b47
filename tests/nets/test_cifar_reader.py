"""CIFAR-10/100 reader on miniature archives written in the official pickle format."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from nets.checkpoint import UnsafeFileError
from nets.data import load_dataset
from nets.data.cifar import CIFAR_INFO


def write_batch(path: Path, data: np.ndarray, labels: list[int], key: bytes) -> None:
    batch = {
        b"batch_label": b"training batch",
        key: labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def make_cifar10(root: Path, per_batch: int = 4, n_test: int = 3, seed: int = 0):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, per_batch).tolist()
        write_batch(folder / f"data_batch_{i}", data, lab, b"labels")
        images.append(data)
        labels += lab
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    write_batch(folder / "test_batch", test, list(range(n_test)), b"labels")
    names = [f"class{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return np.concatenate(images), labels, test


def test_cifar10_shapes_labels_and_pixels(tmp_path):
    images, labels, _test = make_cifar10(tmp_path)
    splits = load_dataset("CIFAR10", tmp_path)
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    assert len(splits.train) == 20 and len(splits.test) == 3
    assert splits.classes == [f"class{i}" for i in range(10)]
    x, y = splits.train_eval.get_batch(range(20))
    assert x.shape == (20, 3, 32, 32) and y.tolist() == labels
    mean = torch.tensor(CIFAR_INFO["CIFAR10"]["mean"]).view(3, 1, 1)
    std = torch.tensor(CIFAR_INFO["CIFAR10"]["std"]).view(3, 1, 1)
    expected = (torch.from_numpy(images.reshape(20, 3, 32, 32)).float() / 255 - mean) / std
    assert torch.allclose(x, expected, atol=1e-6)
    assert splits.test.get_batch([0, 1, 2])[1].tolist() == [0, 1, 2]
    # the training split is augmented (same shape, different pixels), train_eval is not
    xa, ya = splits.train.get_batch(range(20))
    assert xa.shape == x.shape and torch.equal(ya, y) and not torch.equal(xa, x)
    assert torch.equal(
        load_dataset("cifar-10", tmp_path, augment=False).train.get_batch([0])[0], x[:1]
    )


def test_cifar100_fine_labels_and_meta(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    write_batch(
        folder / "train",
        rng.integers(0, 256, (6, 3072), dtype=np.uint8),
        [0, 99, 5, 7, 42, 1],
        b"fine_labels",
    )
    write_batch(
        folder / "test", rng.integers(0, 256, (2, 3072), dtype=np.uint8), [3, 98], b"fine_labels"
    )
    names = [f"fine{i}".encode() for i in range(100)]
    (folder / "meta").write_bytes(
        pickle.dumps({b"fine_label_names": names, b"coarse_label_names": []}, protocol=2)
    )
    splits = load_dataset("CIFAR100", tmp_path)
    assert splits.num_classes == 100 and len(splits.classes) == 100
    assert splits.train.targets.tolist() == [0, 99, 5, 7, 42, 1]
    assert splits.test.get_batch([0, 1])[0].shape == (2, 3, 32, 32)


def test_missing_data_error_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("CIFAR100", tmp_path / "nowhere")
    message = str(info.value)
    assert "cifar-100-python" in message and "nowhere" in message
    assert "download=True" in message and "cifar-100-python.tar.gz" in message


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_batch_file_is_refused(tmp_path):
    make_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    target = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    target.write_bytes(pickle.dumps({b"data": _Evil(str(marker))}, protocol=2))
    with pytest.raises(UnsafeFileError, match=r"posix.mkdir|os.mkdir|refused"):
        load_dataset("CIFAR10", tmp_path)
    assert not marker.exists()


def test_corrupt_batch_files(tmp_path):
    make_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    data = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(data[:100])
    with pytest.raises(OSError, match=r"test_batch"):
        load_dataset("CIFAR10", tmp_path)
    write_batch(folder / "test_batch", np.zeros((2, 100), dtype=np.uint8), [0, 1], b"labels")
    with pytest.raises(OSError, match=r"3072"):
        load_dataset("CIFAR10", tmp_path)


def test_training_on_a_miniature_cifar_archive(tmp_path):
    from nets.training import train_network

    make_cifar10(tmp_path / "data", per_batch=8, n_test=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train_network(
            tmp_path / "run",
            "CIFAR10",
            tmp_path / "data",
            model="SmallCNN",
            epochs=1,
            batch_size=16,
            optimizer_kwargs={"lr": 0.01},
            progress=False,
            device="cpu",
        )
    finally:
        torch.set_num_threads(threads)
    assert result.config["dataset"] == "CIFAR10" and result.config["input_size"] == 32
    assert result.stats[0]["test_acc"] is not None
