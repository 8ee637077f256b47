"""CIFAR-10 / CIFAR-100 from the official python-pickle archives, without unpickling code.

Expected layout under ``data_path`` (what the official tarballs extract to)::

    cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
    cifar-100-python/train, test, meta

Each batch file is a pickled dict with ``b'data'`` (``uint8`` array ``(N, 3072)``,
channel-major rows), ``b'labels'`` (CIFAR-10) or ``b'fine_labels'`` (CIFAR-100),
``b'batch_label'`` and ``b'filenames'``; ``meta`` holds ``b'label_names'`` or
``b'fine_label_names'``.  Files are read by :class:`RestrictedUnpickler`
(``encoding='bytes'``), which resolves only the three globals that numpy array
pickles need (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``,
``numpy.dtype``; plus ``_codecs.encode`` restricted to latin-1 and ``bytes()``
without arguments, which Python 3 uses for ``bytes`` and empty ``bytes`` at pickle
protocol 2) and refuses every other global with :class:`UnsafeFileError`.
Labels must be whole numbers in ``[0, classes)`` (floats and strings are refused, not
rounded), a batch must hold samples, and the names in ``meta`` must be one per class;
each error names the file.

>>> import io, pickle
>>> RestrictedUnpickler(io.BytesIO(pickle.dumps({b"labels": [1, 2]}, protocol=2))).load()
{b'labels': [1, 2]}
>>> RestrictedUnpickler(io.BytesIO(pickle.dumps(print))).load()  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
nets.checkpoint.UnsafeFileError: File '<stream>' asks to load the global builtins.print; ...
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nets.checkpoint import UnsafeFileError
from spectral.errors import argument_error
from spectral.io import CorruptFileError

__all__ = ["CIFAR_INFO", "RestrictedUnpickler", "load_cifar_arrays", "read_pickle_file"]

#: name -> (folder, train files, test files, meta file, label key, names key, classes, mean, std)
CIFAR_INFO: dict[str, dict[str, Any]] = {
    "CIFAR10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": b"labels",
        "names_key": b"label_names",
        "num_classes": 10,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "CIFAR100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": b"fine_labels",
        "names_key": b"fine_label_names",
        "num_classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("_codecs", "encode"): ("codecs", "latin1"),
    ("__builtin__", "bytes"): ("empty", "bytes"),
    ("builtins", "bytes"): ("empty", "bytes"),
}


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` without arguments: how Python 3 pickles an empty ``bytes`` at protocol 2
    (an empty array's data); any argument is refused."""
    if args:
        raise UnsafeFileError(f"Refused bytes{args!r}: only bytes() (empty) is allowed.")
    return b""


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` restricted to latin-1 (how Python 3 writes bytes at protocol 2)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafeFileError(
            f"Refused _codecs.encode with encoding {encoding!r}: only latin-1 is allowed."
        )
    return text.encode("latin1")


def _multiarray() -> Any:
    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        return importlib.import_module("numpy.core.multiarray")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for data files: plain containers, bytes, str, numbers and numpy arrays.

    Any other global (a function or class to call) raises :class:`UnsafeFileError`
    before anything is executed.
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, *, source: str = "<stream>") -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the numpy array-reconstruction globals."""
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UnsafeFileError(
                f"File '{self.source}' asks to load the global {module}.{name}; only plain "
                "containers and numpy arrays are allowed in data files, so it was refused."
            )
        if target[0] == "codecs":
            return _latin1_encode
        if target[0] == "empty":
            return _empty_bytes
        owner = _multiarray() if target[0] == "multiarray" else np
        return getattr(owner, target[1])


def read_pickle_file(path: str | os.PathLike[str]) -> Any:
    """Read a pickled data file with :class:`RestrictedUnpickler`.

    Raises
    ------
    UnsafeFileError
        If the file references any global other than numpy array reconstruction.
    CorruptFileError
        If the file is truncated or not a pickle.
    """
    p = Path(path)
    # Read into memory first: a corrupt FRAME/length opcode then fails as truncated data
    # instead of asking the file object for gigabytes.
    data = p.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=str(p)).load()
    except UnsafeFileError as exc:
        if str(p) in str(exc):
            raise
        raise UnsafeFileError(f"File '{p}' was refused: {exc}") from exc
    except Exception as exc:  # any parse failure (OverflowError, IndexError...) is corruption
        raise CorruptFileError(f"File '{p}' is truncated or not a CIFAR pickle ({exc}).") from exc


def _locate(name: str, data_path: Path) -> Path | None:
    info = CIFAR_INFO[name]
    for candidate in (data_path / info["folder"], data_path):
        if all((candidate / f).is_file() for f in info["train"] + info["test"]):
            return candidate
    return None


def _not_found(name: str, root: Path) -> Exception:
    """Why ``name`` is not under ``root``: the archive itself given, an archive not yet
    extracted, some batch files missing, or nothing there."""
    info = CIFAR_INFO[name]
    archive = info["url"].rsplit("/", 1)[-1]
    files = info["train"] + info["test"]
    if root.is_file():
        hint = ""
        if root.name.endswith((".tar.gz", ".tgz")):
            hint = (
                f"; it is the archive itself: extract it (tar xzf '{root}' -C '{root.parent}', "
                f"giving '{root.parent / info['folder']}') and pass the folder "
                f"'{root.parent}' as data_path"
            )
        return argument_error(
            "data_path", f"a folder holding {name} ({info['folder']}/){hint}", str(root)
        )
    for candidate in (root / info["folder"], root):
        present = [f for f in files if (candidate / f).is_file()]
        if present:
            missing = [f for f in files if f not in present]
            return FileNotFoundError(
                f"{name} data in '{candidate}' is incomplete: missing {missing} (present: "
                f"{present}). Restore the missing files (download {info['url']} and extract "
                f"it into '{root}')."
            )
    beside = [p for p in (root / archive, root.parent / archive) if p.is_file()]
    extract = (
        f"The archive '{beside[0]}' is there but not extracted: run tar xzf '{beside[0]}' -C "
        f"'{beside[0].parent}'"
        if beside
        else f"Download {info['url']} and extract it into '{root}'"
    )
    return FileNotFoundError(
        f"{name} data not found: looked for {files} in {[str(root / info['folder']), str(root)]}. "
        f"{extract} (giving '{root / info['folder']}'), or call with download=True (needs "
        "torchvision)."
    )


def _labels(path: Path, raw: Any, count: int, info: dict[str, Any]) -> np.ndarray:
    """The labels of a batch as int64, checked: ``count`` whole numbers in ``[0, classes)``."""
    values = np.asarray(raw)
    if values.dtype.kind not in "iu" or values.shape != (count,):
        shown = values.ravel()[:3].tolist()
        raise CorruptFileError(
            f"File '{path}': expected {count} integer labels in {info['label_key']!r}; "
            f"found {values.dtype} values of shape {values.shape} (first: {shown})."
        )
    classes = info["num_classes"]
    bad = np.flatnonzero((values < 0) | (values >= classes))
    if bad.size:
        shown = ", ".join(f"{values[i]} at index {i}" for i in bad[:5])
        raise CorruptFileError(
            f"File '{path}': expected labels in [0, {classes}); found {bad.size} outside: "
            f"{shown}{', ...' if bad.size > 5 else ''}."
        )
    return values.astype(np.int64)


def _read_split(folder: Path, files: list[str], info: dict[str, Any]) -> tuple[np.ndarray, ...]:
    images, labels = [], []
    for fname in files:
        path = folder / fname
        batch = read_pickle_file(path)
        if not isinstance(batch, dict) or b"data" not in batch or info["label_key"] not in batch:
            raise CorruptFileError(
                f"File '{path}' is not a CIFAR batch: expected a dict with b'data' and "
                f"{info['label_key']!r}."
            )
        data = np.asarray(batch[b"data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise CorruptFileError(
                f"File '{path}': expected b'data' of dtype uint8 and shape (N, 3072); "
                f"found {data.dtype} {data.shape}."
            )
        if data.shape[0] == 0:
            raise CorruptFileError(f"File '{path}': expected a batch of samples; found none.")
        lab = _labels(path, batch[info["label_key"]], data.shape[0], info)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def _class_names(meta_path: Path, info: dict[str, Any]) -> list[str] | None:
    """The class names in ``meta`` (``None`` without the file or the key), one per class."""
    if not meta_path.is_file():
        return None
    meta = read_pickle_file(meta_path)
    if not isinstance(meta, dict) or info["names_key"] not in meta:
        return None
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[info["names_key"]]]
    if len(names) != info["num_classes"]:
        raise CorruptFileError(
            f"File '{meta_path}': expected {info['num_classes']} class names in "
            f"{info['names_key']!r}, one per class; found {len(names)}."
        )
    return names


def load_cifar_arrays(
    name: str, data_path: str | os.PathLike[str] | None, *, download: bool = False
) -> dict[str, Any]:
    """Read CIFAR ``name`` ("CIFAR10"/"CIFAR100") into uint8 tensors.

    Returns a dict with ``x_train`` ``(50000, 3, 32, 32)`` uint8, ``y_train`` int64,
    ``x_test``, ``y_test``, ``classes`` (list of names or ``None``), ``mean``,
    ``std`` and ``num_classes``.

    Raises
    ------
    FileNotFoundError
        If the archive is not under ``data_path``; the message lists where it
        looked and how to obtain the data.
    ImportError
        If ``download=True`` but torchvision is not installed.
    """
    if name not in CIFAR_INFO:
        raise argument_error("name", f"one of {sorted(CIFAR_INFO)}", name)
    info = CIFAR_INFO[name]
    root = Path("data" if data_path is None else data_path)
    folder = _locate(name, root)
    if folder is None and download:
        try:
            import torchvision
        except ImportError as exc:
            raise ImportError(
                f"download=True needs torchvision (pip install torchvision) to fetch {name}; "
                f"alternatively download {info['url']} and extract it into '{root}'."
            ) from exc
        dataset_cls = getattr(torchvision.datasets, name)
        dataset_cls(root=str(root), train=True, download=True)
        dataset_cls(root=str(root), train=False, download=True)
        folder = _locate(name, root)
    if folder is None:
        raise _not_found(name, root)
    x_train, y_train = _read_split(folder, info["train"], info)
    x_test, y_test = _read_split(folder, info["test"], info)
    return {
        "x_train": torch.from_numpy(np.ascontiguousarray(x_train)),
        "y_train": torch.from_numpy(y_train),
        "x_test": torch.from_numpy(np.ascontiguousarray(x_test)),
        "y_test": torch.from_numpy(y_test),
        "classes": _class_names(folder / info["meta"], info),
        "mean": info["mean"],
        "std": info["std"],
        "num_classes": info["num_classes"],
    }
