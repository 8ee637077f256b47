"""CIFAR-10/100 reader on miniature archives written in the official pickle format."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from nets.checkpoint import UnsafeFileError
from nets.data import load_dataset
from nets.data.cifar import CIFAR_INFO


def py2_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2's cPickle (protocol 2) wrote the official CIFAR archives.

    Python 2 ``str`` values (keys, file names, the array's raw data) are ``U``/``T``
    (SHORT_BINSTRING/BINSTRING) opcodes, not Python 3's ``_codecs.encode`` calls, and
    arrays reference ``numpy.core.multiarray._reconstruct`` (NumPy 1's module path).
    """
    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        head = b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))
        out.extend(head + b)

    def integer(i: int) -> None:
        if 0 <= i < 256:
            out.extend(b"K" + bytes([i]))
        elif 0 <= i < 65536:
            out.extend(b"M" + struct.pack("<H", i))
        else:
            out.extend(b"J" + struct.pack("<i", i))

    def save(o: object) -> None:
        if isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                save(k)
                save(v)
            out.extend(b"u")
        elif isinstance(o, list | tuple):
            out.extend(b"](" if isinstance(o, list) else b"(")
            for v in o:
                save(v)
            out.extend(b"e" if isinstance(o, list) else b"t")
        elif o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            integer(o)
        elif isinstance(o, bytes):
            string(o)
        elif isinstance(o, np.ndarray) and o.dtype == np.uint8:
            # _reconstruct(ndarray, (0,), 'b') then BUILD (1, shape, dtype('u1'), False, data)
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            save((0,))
            save(b"b")
            out.extend(b"\x87R(")
            integer(1)
            save(tuple(o.shape))
            out.extend(b"cnumpy\ndtype\n")
            save(b"u1")
            integer(0)
            integer(1)
            out.extend(b"\x87R")
            save((3, b"|", None, None, None, -1, -1, 0))
            out.extend(b"b")
            save(False)
            string(np.ascontiguousarray(o).tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    save(obj)
    return bytes(out + b".")


def dump(obj: object, fmt: str) -> bytes:
    return py2_pickle(obj) if fmt == "py2" else pickle.dumps(obj, protocol=2)


def write_batch(
    path: Path, data: np.ndarray, labels: list[int], key: bytes, fmt: str = "py3"
) -> None:
    batch = {
        b"data": data,
        key: labels,
        b"batch_label": b"training batch 1 of 5",
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    path.write_bytes(dump(batch, fmt))


def test_py2_pickle_writer_is_what_python2_cpickle_wrote() -> None:
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = py2_pickle({b"data": data, b"labels": [1, 300, 70000]})
    assert raw.startswith(b"\x80\x02}(U\x04datacnumpy.core.multiarray\n_reconstruct\n")
    assert b"_codecs" not in raw and b"T\x00\x18\x00\x00" + data.tobytes()[:4] in raw
    loaded = pickle.loads(raw, encoding="bytes")  # the usual way to read CIFAR
    assert loaded[b"labels"] == [1, 300, 70000] and np.array_equal(loaded[b"data"], data)


def make_cifar10(root: Path, per_batch: int = 4, n_test: int = 3, seed: int = 0, fmt="py3"):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, per_batch).tolist()
        write_batch(folder / f"data_batch_{i}", data, lab, b"labels", fmt)
        images.append(data)
        labels += lab
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    write_batch(folder / "test_batch", test, list(range(n_test)), b"labels", fmt)
    names = [f"class{i}".encode() for i in range(10)]
    meta = {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(dump(meta, fmt))
    return np.concatenate(images), labels, test


@pytest.mark.parametrize("fmt", ["py2", "py3"])
def test_cifar10_shapes_labels_and_pixels(tmp_path, fmt):
    images, labels, _test = make_cifar10(tmp_path, fmt=fmt)
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


@pytest.mark.parametrize("fmt", ["py2", "py3"])
def test_cifar100_fine_labels_and_meta(tmp_path, fmt):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    for name, data, fine in (
        ("train", train, [0, 99, 5, 7, 42, 1]),
        ("test", rng.integers(0, 256, (2, 3072), dtype=np.uint8), [3, 98]),
    ):
        batch = {
            b"filenames": [f"f{i}.png".encode() for i in range(len(fine))],
            b"batch_label": b"training batch 1 of 1",
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
            b"data": data,
        }
        (folder / name).write_bytes(dump(batch, fmt))
    names = [f"fine{i}".encode() for i in range(100)]
    coarse = [f"coarse{i}".encode() for i in range(20)]
    (folder / "meta").write_bytes(
        dump({b"fine_label_names": names, b"coarse_label_names": coarse}, fmt)
    )
    splits = load_dataset("CIFAR100", tmp_path)
    assert splits.num_classes == 100 and splits.classes == [f"fine{i}" for i in range(100)]
    assert splits.train.targets.tolist() == [0, 99, 5, 7, 42, 1]
    assert splits.test.targets.tolist() == [3, 98]
    x, _ = splits.train_eval.get_batch([1])
    mean = torch.tensor(CIFAR_INFO["CIFAR100"]["mean"]).view(3, 1, 1)
    std = torch.tensor(CIFAR_INFO["CIFAR100"]["std"]).view(3, 1, 1)
    expected = (torch.from_numpy(train[1].reshape(3, 32, 32)).float() / 255 - mean) / std
    torch.testing.assert_close(x[0], expected)
    assert splits.test.get_batch([0, 1])[0].shape == (2, 3, 32, 32)


def test_download_without_torchvision_says_how_to_get_the_data(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    with pytest.raises(ImportError, match=r"torchvision.*cifar-10-python\.tar\.gz"):
        load_dataset("CIFAR10", tmp_path / "empty", download=True)


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


def test_training_on_a_miniature_cifar_archive(tmp_path, capsys, caplog):
    import logging

    from nets.training import train_network

    caplog.set_level(logging.INFO, logger="nets.training")

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
            progress=True,
            device="cpu",
        )
    finally:
        torch.set_num_threads(threads)
    assert "train" in capsys.readouterr().err  # the tqdm bar
    assert any("epoch 1/1" in r.getMessage() for r in caplog.records)
    assert result.config["dataset"] == "CIFAR10" and result.config["input_size"] == 32
    assert result.stats[0]["test_acc"] is not None
