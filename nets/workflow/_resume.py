"""Resumable workflow runs: state files of :func:`compute_eigenspectrum`, :func:`compute_loss_stats`
and :func:`build_loss_landscape` (see :mod:`spectral.resume` for the file format).

Each function takes ``state_path`` (``None``: no state file) and saves its
partial results there atomically: Lanczos recurrences every
``checkpoint_every`` products and each finished probe (spectrum), each
finished checkpoint (loss statistics), each finished direction and plane row
(landscape).  A restarted call with the same arguments skips the finished
work and, on the CPU, returns bit-identical results.  The configuration
fingerprint records every argument that changes the result, the SHA-256 of
the checkpoint files and the fingerprint of the model's selected parameters;
a state file of another configuration is refused with
:class:`spectral.resume.StateMismatchError`, whose message names each differing
entry (``dataset``, ``loss_fn``, ``model_state``, ``batch_size``...).

What identifies the inputs (the results are a function of these alone):

* the data (:func:`describe_data`): a dataset name as given (with ``data_path``
  and ``seed`` beside it); a dataset object by a SHA-256 of its samples' contents
  (:func:`dataset_digest`: the tensors of a ``TensorDataset``, an ``ArrayDataset``
  or a ``TokenDataset`` directly, a ``Subset`` by its indices and base, any other
  dataset sample by sample); a ``DataLoader`` by its dataset's contents, its batch
  size and ``collate_fn`` (the workflows evaluate one sequential pass over it, see
  :func:`nets.workflow._resolve.make_eval_loader`); a ``DatasetSplits`` by its
  unaugmented training split and its test split.  Before, a dataset object was
  recorded as ``repr(type(dataset))``, and a state computed on other data of the same
  type was silently reused;
* the loss (:func:`nets.measurement_settings.describe_loss`): a loss module by its
  class and every setting (``label_smoothing``, ``ignore_index``, ``reduction``, the
  class ``weight`` tensor), a function by its qualified name and code digest;
* the model: a name as given, an ``nn.Module`` by its class and
  :func:`nets.workflow._resolve.state_digest` (every parameter and buffer:
  BatchNorm running statistics too, and the modules' train/eval modes).

>>> import tempfile, os
>>> describe_model("MLP"), file_digest(None)
('MLP', None)
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, IterableDataset, Subset, TensorDataset

from nets.measurement_settings import describe_loss, feed_hash
from nets.workflow._resolve import state_digest
from spectral.resume import Checkpoint

__all__ = [
    "dataset_digest",
    "describe_data",
    "describe_loss",
    "describe_model",
    "describe_output_fn",
    "describe_value",
    "file_digest",
    "open_state",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def file_digest(path: PathLike | None) -> str | None:
    """SHA-256 of a file's bytes (``None`` for ``None``); read in 1 MiB chunks."""
    if path is None:
        return None
    h = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_model(model: Any) -> Any:
    """A model name as is; an ``nn.Module`` by its class and :func:`state_digest`
    (every parameter and buffer, and the modules' modes)."""
    if isinstance(model, nn.Module):
        return f"{type(model).__qualname__}:{state_digest(model)}"
    return model if model is None or isinstance(model, str) else repr(model)


def describe_value(value: Any) -> Any:
    """JSON-able description of an argument: arrays/tensors by SHA-256, others by ``repr``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, torch.Tensor | np.ndarray):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        host = np.ascontiguousarray(array, dtype=np.float64)
        return "sha256:" + hashlib.sha256(host.tobytes()).hexdigest()
    if isinstance(value, list | tuple):
        return [describe_value(v) for v in value]
    if isinstance(value, nn.Module):  # a loss module: class, every setting and buffer
        return describe_loss(value)
    if callable(value):
        return getattr(value, "__qualname__", type(value).__qualname__)
    return repr(value)


def _feed_samples(hasher: Any, samples: Iterable[Any]) -> int:
    """Hash every sample of ``samples`` (tensors by dtype, shape and bytes); their count."""
    count = 0
    for sample in samples:
        feed_hash(hasher, sample, "dataset")
        count += 1
    return count


def _map_samples(dataset: Any, chunk: int = 1024) -> Iterable[Any]:
    """The samples of a map-style dataset in index order (``__getitems__`` in chunks)."""
    n = len(dataset)
    many = getattr(dataset, "__getitems__", None)
    for start in range(0, n, chunk):
        indices = list(range(start, min(start + chunk, n)))
        yield from (many(indices) if many is not None else (dataset[i] for i in indices))


def _feed_dataset(hasher: Any, dataset: Any) -> int:
    """Hash what ``dataset`` yields (exactly: the bytes of its samples); its sample count.

    Known in-memory datasets are hashed from their tensors (their samples are a pure
    function of them); any other dataset sample by sample, in index order.
    """
    from nets.data.base import ArrayDataset
    from nets.data.text import TokenDataset

    kind = type(dataset)
    hasher.update(f"dataset:{kind.__module__}.{kind.__qualname__}:".encode())
    if kind is TensorDataset:
        feed_hash(hasher, list(dataset.tensors), "dataset")
        return len(dataset)
    if kind is TokenDataset:
        feed_hash(hasher, dataset.sequences, "dataset")
        return len(dataset)
    if kind is ArrayDataset:
        parts = [dataset.inputs, dataset.targets, dataset.scale, dataset.mean, dataset.std]
        if dataset.transform is not None:  # augmentation: a function of (seed, epoch)
            parts += [repr(describe_loss(dataset.transform)), dataset.seed, dataset.epoch]
        feed_hash(hasher, parts, "dataset")
        return len(dataset)
    if kind is Subset:
        indices = np.fromiter((int(i) for i in dataset.indices), dtype=np.int64)
        feed_hash(hasher, indices, "dataset")
        _feed_dataset(hasher, dataset.dataset)
        return int(indices.size)
    if kind is ConcatDataset:
        return sum(_feed_dataset(hasher, part) for part in dataset.datasets)
    if isinstance(dataset, IterableDataset):
        return _feed_samples(hasher, dataset)
    return _feed_samples(hasher, _map_samples(dataset))


def dataset_digest(dataset: Any) -> str:
    """``'<type>: <n> samples, sha256:<hex>'``: a SHA-256 of a dataset's contents.

    Exact: two datasets with the same digest yield the same samples (tensors with the
    same dtype, shape and bytes) in the same order.  One pass over the samples at
    most (in-memory datasets are hashed from their tensors: about 1 GB/s).

    >>> from torch.utils.data import TensorDataset
    >>> a = dataset_digest(TensorDataset(torch.zeros(3, 2)))
    >>> a.split(",")[0], a == dataset_digest(TensorDataset(torch.zeros(3, 2)))
    ('TensorDataset: 3 samples', True)
    >>> a == dataset_digest(TensorDataset(torch.ones(3, 2)))
    False
    """
    start = time.perf_counter()
    hasher = hashlib.sha256()
    count = _feed_dataset(hasher, dataset)
    logger.debug("dataset digest of %d samples in %.3f s", count, time.perf_counter() - start)
    return f"{type(dataset).__qualname__}: {count} samples, sha256:{hasher.hexdigest()[:32]}"


def describe_data(dataset: Any) -> Any:
    """JSON-able identity of a workflow's ``dataset`` argument (the module docstring).

    * a name (``'digits'``): itself (``data_path`` and ``seed`` are recorded beside it);
    * a ``DatasetSplits``: its name, task and the digests of ``train_eval`` and ``test``
      (the splits the workflows read);
    * a ``DataLoader``: its dataset's digest, its ``batch_size`` and its ``collate_fn``
      (:func:`describe_loss` of it); sampler and ``drop_last`` are not recorded, as the
      workflows evaluate one sequential pass over the dataset whatever they are;
    * a ``Dataset`` (or any other object): :func:`dataset_digest`;
    * a ``(train, test)`` pair: the list of the two descriptions.

    A dataset whose samples change from one read to the next (random augmentation other
    than an ``ArrayDataset``'s seeded one) gets another digest at every call: its state
    is refused, never reused.

    >>> describe_data("digits")
    'digits'
    """
    if dataset is None or isinstance(dataset, str):
        return dataset
    if hasattr(dataset, "train_eval") and hasattr(dataset, "test"):
        return {
            "name": getattr(dataset, "name", None),
            "task": getattr(dataset, "task", None),
            "train_eval": describe_data(dataset.train_eval),
            "test": describe_data(dataset.test),
        }
    if isinstance(dataset, DataLoader):
        return {
            "loader": describe_data(dataset.dataset),
            "batch_size": dataset.batch_size,
            "collate_fn": describe_loss(dataset.collate_fn),
        }
    if isinstance(dataset, tuple | list) and len(dataset) == 2:
        if all(d is None or isinstance(d, DataLoader | torch.utils.data.Dataset) for d in dataset):
            return [describe_data(d) for d in dataset]
    return dataset_digest(dataset)


def describe_output_fn(output_fn: Any) -> Any:
    """JSON-able description of an ``output_fn`` argument (``None`` for the default selection).

    A function is described by its qualified name (:func:`describe_value`), a callable
    object by its ``repr`` when that holds no memory address (``itemgetter('b')`` is not
    ``itemgetter('a')``).

    >>> import operator
    >>> describe_output_fn(None), describe_output_fn(len)
    (None, 'len')
    >>> describe_output_fn(operator.itemgetter("scores"))
    "operator.itemgetter('scores')"
    """
    if output_fn is None:
        return None
    text = repr(output_fn)
    if hasattr(output_fn, "__qualname__") or " at 0x" in text:
        return describe_value(output_fn)
    return text


def open_state(
    state_path: PathLike | None,
    kind: str,
    config: dict[str, Any] | Callable[[], dict[str, Any]],
) -> Checkpoint | None:
    """A :class:`spectral.resume.Checkpoint` for ``state_path`` (``None`` when not resuming).

    ``config`` may be a function returning the configuration: it is called only with a
    ``state_path`` (the data's digest costs a pass over an unknown dataset's samples).
    """
    if state_path is None:
        return None
    return Checkpoint(state_path, kind=kind, config=config() if callable(config) else config)
