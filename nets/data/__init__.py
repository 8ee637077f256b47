"""Datasets: embedded digits, CIFAR-10/100 from the python archives, synthetic data.

:func:`load_dataset` returns a :class:`DatasetSplits` with a training set
(augmented when the dataset has an augmentation), the same training set
without augmentation (``train_eval``, for curvature and statistics) and a test
set; :func:`make_loader` wraps one in a deterministic ``DataLoader``.

=============  ==============  =======  ==================================
name           input shape     classes  notes
=============  ==============  =======  ==================================
``digits``     (1, 8, 8)       10       sklearn, no download; 1438/359 split
``CIFAR10``    (3, 32, 32)     10       crop(pad 4) + flip augmentation
``CIFAR100``   (3, 32, 32)     100      crop(pad 4) + flip augmentation
``synthetic``  (dim,)          k        ``kind="gaussian_mixture"`` or
                                        ``"teacher_student"`` (regression)
``text``       (64,) int64     256      byte tokens, next-token targets
                                        ``(64,)``; no download (see
                                        :mod:`nets.data.text`)
=============  ==============  =======  ==================================

Vector data of dimension ``d`` is described by ``in_channels=d, input_size=1``
(what :class:`nets.models.MLP` needs).

>>> splits = load_dataset("digits")
>>> splits.num_classes, splits.input_shape, len(splits.train), len(splits.test)
(10, (1, 8, 8), 1438, 359)
>>> x, y = next(iter(make_loader(splits.train, 4, shuffle=True, seed=0)))
>>> x.shape, y.shape
(torch.Size([4, 1, 8, 8]), torch.Size([4]))
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from nets.data.augment import RandomCropFlip
from nets.data.base import ArrayDataset
from nets.data.cifar import load_cifar_arrays
from nets.data.digits import load_digits_tensors
from nets.data.synthetic import gaussian_mixture, teacher_student
from nets.data.text import VOCAB_SIZE, load_text_splits
from nets.models._common import check_positive_int
from spectral.errors import argument_error

__all__ = [
    "ArrayDataset",
    "DatasetSplits",
    "available_datasets",
    "canonical_dataset_name",
    "load_dataset",
    "make_loader",
]

_NAMES = {
    "digits": "digits",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
    "synthetic": "synthetic",
    "gaussianmixture": "synthetic",
    "teacherstudent": "synthetic",
    "text": "text",
}


@dataclass
class DatasetSplits:
    """The splits of a dataset and what a model needs to know about it.

    Attributes
    ----------
    name:
        Canonical dataset name.
    train:
        Training set (augmented if the dataset has an augmentation and
        ``augment=True``).
    train_eval:
        The training set without augmentation.
    test:
        Test set.
    num_classes:
        Number of classes (output dimension for regression).
    input_shape:
        Shape of one input, e.g. ``(3, 32, 32)``.
    in_channels, input_size:
        What :func:`nets.models.get_model` takes.
    task:
        ``"classification"``, ``"regression"`` or ``"language_modeling"`` (token ids in,
        ``(B, T, V)`` logits out, next-token targets).
    classes:
        Class names when known.
    options:
        The loading options (JSON-safe), recorded in checkpoints.

    Examples
    --------
    >>> splits = load_dataset("digits")
    >>> splits.name, splits.num_classes, splits.input_shape, len(splits.train) + len(splits.test)
    ('digits', 10, (1, 8, 8), 1797)
    """

    name: str
    train: Dataset[Any]
    train_eval: Dataset[Any]
    test: Dataset[Any]
    num_classes: int
    input_shape: tuple[int, ...]
    in_channels: int
    input_size: int
    task: str = "classification"
    classes: list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`.

    Examples
    --------
    >>> available_datasets()
    ['CIFAR10', 'CIFAR100', 'digits', 'synthetic', 'text']

    Returns
    -------
    list of str
        The names.
    """
    return sorted(set(_NAMES.values()))


def canonical_dataset_name(name: str) -> str:
    """The canonical spelling of a dataset name (case, ``-`` and ``_`` ignored).

    >>> canonical_dataset_name("cifar-100")
    'CIFAR100'
    """
    if not isinstance(name, str):
        raise argument_error("dataset", "a dataset name (str)", name, kind=TypeError)
    key = name.lower().replace("-", "").replace("_", "")
    if key not in _NAMES:
        raise argument_error("dataset", f"one of {available_datasets()}", name)
    return _NAMES[key]


def _digits(seed: int, **kw: Any) -> DatasetSplits:
    (x_train, y_train), (x_test, y_test) = load_digits_tensors(**kw)
    mean, std = float(x_train.mean()), float(x_train.std())
    train = ArrayDataset(x_train, y_train, mean=[mean], std=[std], seed=seed)
    test = ArrayDataset(x_test, y_test, mean=[mean], std=[std], seed=seed)
    return DatasetSplits("digits", train, train, test, 10, (1, 8, 8), 1, 8, classes=None)


def _cifar(name: str, data_path: Any, seed: int, augment: bool, download: bool) -> DatasetSplits:
    arrays = load_cifar_arrays(name, data_path, download=download)
    common: dict[str, Any] = {
        "scale": 1.0 / 255.0,
        "mean": arrays["mean"],
        "std": arrays["std"],
        "seed": seed,
        "classes": arrays["classes"],
    }
    train_eval = ArrayDataset(arrays["x_train"], arrays["y_train"], **common)
    train = train_eval.with_transform(RandomCropFlip(4)) if augment else train_eval
    test = ArrayDataset(arrays["x_test"], arrays["y_test"], **common)
    return DatasetSplits(
        name,
        train,
        train_eval,
        test,
        arrays["num_classes"],
        (3, 32, 32),
        3,
        32,
        classes=arrays["classes"],
    )


def _synthetic(name: str, seed: int, kind: str | None = None, **kw: Any) -> DatasetSplits:
    key = name.lower().replace("-", "").replace("_", "")
    if kind is None:
        kind = "teacher_student" if key == "teacherstudent" else "gaussian_mixture"
    if kind == "gaussian_mixture":
        (xtr, ytr), (xte, yte) = gaussian_mixture(**kw)
        num_classes, task = int(kw.get("num_classes", 3)), "classification"
    elif kind == "teacher_student":
        (xtr, ytr), (xte, yte) = teacher_student(**kw)
        num_classes, task = int(ytr.shape[1]), "regression"
    else:
        raise argument_error("kind", "'gaussian_mixture' or 'teacher_student'", kind)
    dim = int(xtr.shape[1])
    train = ArrayDataset(xtr, ytr, seed=seed)
    test = ArrayDataset(xte, yte, seed=seed)
    return DatasetSplits(
        "synthetic",
        train,
        train,
        test,
        num_classes,
        (dim,),
        dim,
        1,
        task=task,
        options={"kind": kind},
    )


def _text(**kw: Any) -> DatasetSplits:
    train, test = load_text_splits(**kw)
    t = train.seq_len
    return DatasetSplits(
        "text", train, train, test, VOCAB_SIZE, (t,), 1, t, task="language_modeling"
    )


def load_dataset(
    name: str,
    data_path: str | os.PathLike[str] | None = None,
    *,
    augment: bool = True,
    seed: int = 0,
    download: bool = False,
    **kwargs: Any,
) -> DatasetSplits:
    """Load dataset ``name`` (see the module table).

    Parameters
    ----------
    name:
        ``"digits"``, ``"CIFAR10"``, ``"CIFAR100"``, ``"synthetic"`` or ``"text"``
        (case-insensitive).
    data_path:
        Folder holding the CIFAR archives (default ``./data``); unused otherwise.
    augment:
        Augment the training split (CIFAR only).
    seed:
        Seed of the augmentation.
    download:
        Fetch CIFAR with torchvision when it is missing (torchvision needed).
    **kwargs:
        ``digits``: ``data_seed``, ``test_fraction``.  ``synthetic``: ``kind``
        plus the arguments of :func:`nets.data.synthetic.gaussian_mixture` or
        :func:`~nets.data.synthetic.teacher_student`.  ``text``: ``seq_len``,
        ``test_every``, ``max_sequences`` (:func:`nets.data.text.load_text_splits`).

    Returns
    -------
    DatasetSplits
        The splits and what a model needs to know about them.

    Raises
    ------
    ValueError
        For an unknown name.
    FileNotFoundError
        If CIFAR files are missing (the message says where it looked and how to
        get them).

    Examples
    --------
    >>> splits = load_dataset("digits")
    >>> splits.num_classes, splits.in_channels, splits.input_size
    (10, 1, 8)
    """
    canonical = canonical_dataset_name(name)
    if canonical == "digits":
        splits = _digits(seed, **kwargs)
    elif canonical in ("CIFAR10", "CIFAR100"):
        if kwargs:
            raise argument_error("kwargs", f"no extra options for {canonical}", kwargs)
        splits = _cifar(canonical, data_path, seed, augment, download)
    elif canonical == "text":
        splits = _text(**kwargs)
    else:
        splits = _synthetic(name, seed, **kwargs)
    splits.options = {**splits.options, **kwargs, "augment": augment, "seed": seed}
    return splits


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
) -> DataLoader[Any]:
    """A ``DataLoader`` whose shuffling comes from ``torch.Generator().manual_seed(seed)``.

    The loader's generator (``loader.generator``) advances once per epoch; its
    state is what a training checkpoint stores to resume the same order.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        The samples.
    batch_size : int
        Samples per batch.
    shuffle : bool
        Shuffle every epoch (``False`` for curvature: one fixed order).
    seed : int
        Seed of the shuffling generator.
    drop_last : bool
        Drop a last incomplete batch.
    num_workers : int
        Loader worker processes.

    Returns
    -------
    torch.utils.data.DataLoader
        The loader.

    Examples
    --------
    >>> loader = make_loader(load_dataset("digits").train_eval, 512, shuffle=False)
    >>> [len(t) for _, t in loader]
    [512, 512, 414]
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_workers", num_workers, minimum=0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(int(seed)),
    )
