"""CIFAR batches with corrupted labels or metadata are refused, naming the file (an
adversarial sweep found float labels ``[0.7, 1.7, ...]`` truncated to ``[0, 1, ...]`` and
string labels accepted, 5 class names for 10 classes accepted, out-of-range labels
reported by shape only, a missing batch file or the ``.tar.gz`` given as the folder
reported vaguely, and an empty Python-3 pickled batch refused as unsafe)."""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nets.cli import main
from nets.data import load_dataset
from spectral.io import CorruptFileError


def make_cifar10(root: Path, labels: Any = None, names: Any = None, n_test: int = 3) -> Path:
    """A miniature CIFAR-10 in the official layout (Python-3 pickles at protocol 2)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", n_test)]:
        lab = rng.integers(0, 10, n).tolist() if labels is None else labels(n)
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": lab,
                 b"batch_label": name.encode(), b"filenames": [b"x.png"] * n}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [f"class{i}".encode() for i in range(10)] if names is None else names
    meta = {b"label_names": names, b"num_cases_per_batch": 4, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


@pytest.mark.parametrize(
    ("labels", "found"),
    [
        (lambda n: [i % 10 + 0.7 for i in range(n)], r"float64.*0\.7"),
        (lambda n: [str(i % 10) for i in range(n)], r"'0'"),
    ],
)
def test_labels_that_are_not_whole_numbers_are_refused(
    tmp_path: Path, labels: Any, found: str
) -> None:
    make_cifar10(tmp_path, labels)
    with pytest.raises(CorruptFileError, match=rf"data_batch_1'.*integer labels.*{found}"):
        load_dataset("CIFAR10", tmp_path)


def test_out_of_range_labels_are_named_with_their_index(tmp_path: Path) -> None:
    make_cifar10(tmp_path, lambda n: [1, 1, 10, -1][:n])
    with pytest.raises(CorruptFileError, match=r"data_batch_1'.*10 at index 2, -1 at index 3"):
        load_dataset("CIFAR10", tmp_path)


def test_class_names_must_be_one_per_class(tmp_path: Path) -> None:
    make_cifar10(tmp_path, names=[b"a", b"b", b"c", b"d", b"e"])
    with pytest.raises(CorruptFileError, match=r"batches\.meta'.*10 class names.*found 5"):
        load_dataset("CIFAR10", tmp_path)


def test_an_empty_batch_is_refused_as_empty_not_unsafe(tmp_path: Path) -> None:
    make_cifar10(tmp_path, n_test=0)
    with pytest.raises(CorruptFileError, match=r"test_batch'.*found none"):
        load_dataset("CIFAR10", tmp_path)


def test_a_missing_batch_file_is_named(tmp_path: Path) -> None:
    (make_cifar10(tmp_path) / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['data_batch_3'\]"):
        load_dataset("CIFAR10", tmp_path)


def test_the_archive_itself_as_data_path_says_to_extract_it(tmp_path: Path, capsys: Any) -> None:
    folder = make_cifar10(tmp_path / "src")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    argv = ["train", "--dir", str(tmp_path / "run"), "--dataset", "CIFAR10", "--data-path",
            str(archive), "--epochs", "1", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Option --data-path:" in err and "the archive itself" in err and "tar xzf" in err, err
    assert not (tmp_path / "run").exists()
    # beside the archive, not extracted: the message says so
    with pytest.raises(FileNotFoundError, match=r"is there but not extracted"):
        load_dataset("CIFAR10", tmp_path)
