"""Network training that writes analysable checkpoints: ``train_network``.

The paper's Table 1 call works as written::

    train_network(dir="result/VGG16-CIFAR100/", dataset="CIFAR100", data_path="data/",
                  epochs=100, model="VGG16", optimizer="SGD",
                  optimizer_kwargs={"lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4})

Files written in ``dir``
------------------------
``checkpoint-XXXXX.pt``
    After ``XXXXX`` completed epochs (``00000`` is the initialisation), every
    ``save_freq`` epochs and after the last one; format in :mod:`nets.checkpoint`.
    Extra entries: ``rng_state`` (dict of ``uint8`` generator-state tensors:
    ``torch_cpu``, ``cuda``, ``train_loader``, ``curvature_loader``) and, with
    SWA, ``swa_state_dict``.
``swa-XXXXX.pt``
    With ``swa=True``, at the same epochs once averaging has started: the
    averaged model (``state_dict``, BatchNorm statistics recomputed) in the same
    format, plus ``n_averaged``; :func:`nets.checkpoint.model_from_checkpoint` reads it.
``curvature.jsonl``
    With ``track=``: the :class:`nets.CurvatureTracker` rows (one JSON line per
    measurement: ``step``, ``top_eigenvalues``, ``trace``, ``epoch``, ``lr``, ``loss``,
    ...), each with its CRC-32 (:mod:`nets.curvature_rows`), also the ``curvature`` list
    of ``stats.json`` (their CRC-32s in its ``curvature_crc32`` list); density snapshots
    ``curvature.density-XXXXXXXX.npz`` and the warm start ``curvature.jsonl.ritz.npz``
    beside it.
``stats.json``
    One JSON file per run (rewritten atomically after every epoch)::

        {"format": "deep-curvature-training-stats", "version": 1,
         "config": {...}, "definitions": {"train_loss": "...", ...},
         "epochs": [{"epoch": 1, "lr": 0.05, "train_loss": ..., "train_acc": ...,
                     "train_top5": ..., "test_loss": ..., "test_acc": ...,
                     "test_top5": ..., "epoch_time": seconds, "peak_memory_mb": ...,
                     ["swa_test_loss", "swa_test_acc", "swa_test_top5", "swa_n_averaged"]},
                    ...],
         ["curvature": [tracker rows], "curvature_crc32": [one CRC-32 per row]]}

    Accuracies are percentages; ``test_*`` are ``null`` on epochs without
    evaluation (and accuracies are ``null`` for regression).  ``train_*`` are
    running averages over the epoch's minibatches (model in training mode:
    BatchNorm batch statistics, dropout on, weights changing during the epoch,
    each minibatch's at the weights its step starts from: the first evaluation of
    the closure for optimisers that evaluate it several times, e.g. LBFGS;
    inputs augmented when the training set has an augmentation, e.g. CIFAR's
    crop and flip; the digits have none); ``test_*`` are one full pass over the
    test set in eval mode at the end of the epoch.  ``definitions`` states this
    for each key in words, so that the file says what its numbers are.
    ``peak_memory_mb`` is the CUDA peak allocation during the epoch, or on CPU
    the process's peak resident set size.  (The original code wrote several
    ``stats-*`` files; one JSON file replaces them.)  Only the ``curvature`` rows
    carry checksums: the rest of the file (``config``, ``epochs``) has none, so a
    changed digit there is not detected.  A resumed run keeps the recorded ``curvature``
    rows up to the step it resumes at (those after it, of a branch abandoned by resuming
    from an earlier checkpoint, are measured again): untracked, as they are; tracked, in
    front of the tracker's new rows (never twice).  The ``epochs`` count up by one:
    resuming refuses a checkpoint of a later epoch than the file records (one left by a
    branch abandoned when the run was continued from an earlier checkpoint), and a file
    with a gap.

Randomness and exact resumption
-------------------------------
Model initialisation uses ``seed`` through an explicit generator.  The training
data order comes from the loader's generator (seeded with ``seed``), curvature
batches from a second loader with a derived seed, and augmentation is a
function of ``(seed, epoch, indices)``.  Dropout and other layers that draw from
torch's global generator run inside ``torch.random.fork_rng``, whose state is
seeded from ``seed`` and saved in every checkpoint: the caller's global random
state is the same after the call as before.  On CPU, training ``2k`` epochs
equals training ``k``, stopping and resuming from ``checkpoint-k`` for ``k``
more, bit for bit.

Curvature optimisers
--------------------
If the optimiser has an attribute ``curvature_step = True`` (Lanczos-Newton,
K-FAC), each step is ``optimizer.step(closure=closure, curvature_batch=(x_c, y_c),
loss_fn=loss_fn)``, where ``closure()`` zeroes the gradients, evaluates the loss
on the training batch, back-propagates and returns the loss, and ``(x_c, y_c)``
is a batch of ``curvature_batch_size`` training samples from a separate seeded
loader.  Optimisers with ``requires_closure = True`` (and ``LBFGS``) get
``optimizer.step(closure)``; all others the usual ``zero_grad``/``backward``/``step``.
``batch_size`` and ``curvature_batch_size`` may be given inside
``optimizer_kwargs`` as in the paper's Table 4.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import numbers
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from curvops.losses import counted_mask, sequence_cross_entropy
from nets.checkpoint import (
    checkpoint_name,
    json_safe,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    swa_checkpoint_name,
)
from nets.curvature_rows import STATS_CHECKSUMS, row_checksums, verified_rows, write_rows
from nets.data import DatasetSplits, load_dataset, make_loader
from nets.device import resolve_device
from nets.loss_means import LossMean, check_mean_loss
from nets.measurement_settings import describe_callable, describe_loss
from nets.models import get_model, model_spec
from nets.models._common import check_positive_int
from nets.module_modes import evaluation_mode
from nets.optim.registry import get_optimizer
from nets.schedules import get_schedule
from nets.swa import WeightAverager
from nets.tracker import CurvatureTracker
from spectral.errors import NumericalError, argument_error, check_real
from spectral.io import CorruptFileError, atomic_write

__all__ = [
    "CURVATURE_FILE",
    "STATS_FILE",
    "LearningRateSchedule",
    "Loaders",
    "SWAConfig",
    "StatsFile",
    "StepProtocol",
    "TrainingData",
    "TrainingOptions",
    "TrainingResult",
    "TrainingRun",
    "build_model",
    "build_optimizer",
    "check_model_fits",
    "check_schedule_history",
    "default_loss",
    "evaluate",
    "evaluation_entry",
    "make_loaders",
    "metric_definitions",
    "optimizer_defaults",
    "resolve_data",
    "restore_run",
    "run_config",
    "run_epoch",
    "save_run",
    "seeded_global_rng",
    "swa_config",
    "swa_entry",
    "train_epoch",
    "train_network",
]

logger = logging.getLogger(__name__)

STATS_FILE = "stats.json"
CURVATURE_FILE = "curvature.jsonl"
STATS_FORMAT = "deep-curvature-training-stats"

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainingResult:
    """What :func:`train_network` produced.

    Attributes
    ----------
    dir:
        The run directory.
    model, optimizer:
        The trained model (on the training device) and its optimiser.
    stats:
        Per-epoch statistics (the ``epochs`` list of ``stats.json``).
    checkpoints, swa_checkpoints:
        Paths written by this call.
    stats_path:
        ``dir / "stats.json"``.
    config:
        The JSON-safe run configuration stored in checkpoints.
    swa_model:
        The averaged model (``swa=True``), else ``None``.

    Examples
    --------
    >>> import tempfile
    >>> res = train_network(tempfile.mkdtemp(), "digits", model="MLP", epochs=1, progress=False,
    ...                     model_kwargs={"hidden": (8,)}, device="cpu",
    ...                     optimizer_kwargs={"lr": 0.1, "batch_size": 512})
    >>> type(res).__name__, [p.name for p in res.checkpoints], len(res.stats)
    ('TrainingResult', ['checkpoint-00000.pt', 'checkpoint-00001.pt'], 1)
    """

    dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    stats: list[dict[str, Any]]
    checkpoints: list[Path] = field(default_factory=list)
    swa_checkpoints: list[Path] = field(default_factory=list)
    stats_path: Path = Path(STATS_FILE)
    config: dict[str, Any] = field(default_factory=dict)
    swa_model: nn.Module | None = None


def _derived_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class TrainingData:
    train: Dataset[Any] | None
    train_eval: Dataset[Any] | None
    test: Dataset[Any] | None
    train_loader: DataLoader[Any] | None
    num_classes: int | None
    in_channels: int | None
    input_size: int | None
    task: str
    name: str | None
    options: dict[str, Any]


def resolve_data(
    dataset: Any, data_path: Any, seed: int, dataset_kwargs: dict[str, Any]
) -> TrainingData:
    if isinstance(dataset, str):
        dataset = load_dataset(dataset, data_path, seed=seed, **dataset_kwargs)
    if isinstance(dataset, DatasetSplits):
        return TrainingData(
            dataset.train,
            dataset.train_eval,
            dataset.test,
            None,
            dataset.num_classes,
            dataset.in_channels,
            dataset.input_size,
            dataset.task,
            dataset.name,
            dict(dataset.options),
        )
    train: Any = dataset
    test: Any = None
    if isinstance(dataset, tuple) and len(dataset) == 2:
        train, test = dataset
    if isinstance(test, DataLoader):
        test = test.dataset
    if isinstance(train, DataLoader):
        return TrainingData(
            train.dataset, train.dataset, test, train, None, None, None, "classification", None, {}
        )
    if isinstance(train, Dataset):
        return TrainingData(train, train, test, None, None, None, None, "classification", None, {})
    raise argument_error(
        "dataset",
        "a dataset name, DatasetSplits, Dataset, DataLoader or a (train, test) pair of them",
        dataset,
        kind=TypeError,
    )


def _batch_iter(loader: DataLoader[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise argument_error("dataset", "batches of (inputs, targets)", batch, kind=TypeError)
        yield batch[0], batch[1]


class _Metrics:
    """Mean loss and top-1/top-5 hit counts, accumulated on the device (no syncs).

    Each batch's mean loss is weighted by the loss's own normaliser (:class:`LossMean`: its
    counted targets for cross-entropy with ``ignore_index`` padding), so the result is the
    loss over all the data.  Accuracies are counted for batches of integer class targets
    ``(B,)`` and logits ``(B, C)`` only, over the targets the loss counts, so regression
    data reports ``None``.
    """

    def __init__(self, device: torch.device, classification: bool, loss_fn: LossFn) -> None:
        self.classification = classification
        self.loss_fn = loss_fn
        self.mean = LossMean(loss_fn, device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.correct5 = torch.zeros((), dtype=torch.int64, device=device)
        self.labelled = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def add(
        self, output: torch.Tensor, inputs: Any, target: torch.Tensor, loss: torch.Tensor
    ) -> None:
        n = int(output.shape[0])
        self.mean.add(loss, inputs, target, n)
        self.count += n
        if (
            self.classification
            and output.dim() == 2
            and target.dim() == 1
            and not torch.is_floating_point(target)
        ):
            counted = counted_mask(self.loss_fn, target)
            top = output.topk(min(5, output.shape[1]), dim=1).indices
            hits = (top == target[:, None]) & counted[:, None]
            self.correct += hits[:, 0].sum()
            self.correct5 += hits.any(dim=1).sum()
            self.labelled += counted.sum()

    def result(self) -> dict[str, float | None]:
        labelled = int(self.labelled)
        return {
            "loss": self.mean.value(),
            "acc": 100.0 * float(self.correct) / labelled if labelled else None,
            "top5": 100.0 * float(self.correct5) / labelled if labelled else None,
        }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader[Any],
    loss_fn: LossFn,
    device: torch.device | str = "cpu",
    *,
    classification: bool = True,
) -> dict[str, float | None]:
    """Mean loss, top-1 and top-5 accuracy (%) of ``model`` in eval mode over ``loader``.

    The mean loss weights each batch by the loss's own normaliser (e.g. its counted
    tokens under ``ignore_index`` padding): the loss over all of ``loader``.  ``loss_fn``
    has mean reduction (:func:`nets.loss_means.check_mean_loss`; a ``"sum"`` loss's result
    depended on the batch size).

    Each submodule's mode is restored afterwards (a frozen BatchNorm in eval mode inside a
    model in train mode stays so; ``model.train(was_training)`` switched it back to train).

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> net = torch.nn.Linear(2, 3)
    >>> data = DataLoader(TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
    >>> sorted(evaluate(net, data, torch.nn.CrossEntropyLoss()))
    ['acc', 'loss', 'top5']
    """
    check_mean_loss(loss_fn)
    device = torch.device(device)
    metrics = _Metrics(device, classification, loss_fn)
    with evaluation_mode(model):
        for x, y in _batch_iter(loader):
            x, y = x.to(device), y.to(device)
            output = model(x)
            metrics.add(output, x, y, loss_fn(output, y))
    if metrics.count == 0:
        raise argument_error("loader", "a non-empty data loader", loader)
    return metrics.result()


def _peak_memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux/macOS
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _generator_state(loader: DataLoader[Any] | None) -> torch.Tensor | None:
    if loader is None or loader.generator is None:
        return None
    return loader.generator.get_state()


def metric_definitions(augmentation: str | None) -> dict[str, str]:
    """What each loss/accuracy key of ``stats.json`` measures, in words (its ``definitions``).

    >>> print(metric_definitions(None)["train_loss"])  # doctest: +ELLIPSIS
    running mean over the epoch's minibatches, model in train mode ... no augmentation
    """
    augmented = f"inputs {augmentation}" if augmentation else "no augmentation"
    train = (
        "running mean over the epoch's minibatches, model in train mode (BatchNorm batch "
        "statistics, dropout on) while the weights change, each minibatch's at the weights "
        "its step starts from (the first evaluation of the closure for optimisers that "
        f"evaluate it several times per step, e.g. LBFGS), {augmented}"
    )
    test = "one full pass over the test set at the end of the epoch, model in eval mode"
    return {
        "train_loss": train,
        "train_acc": f"top-1 accuracy (%), {train}",
        "train_top5": f"top-5 accuracy (%), {train}",
        "test_loss": test,
        "test_acc": f"top-1 accuracy (%), {test}",
        "test_top5": f"top-5 accuracy (%), {test}",
    }


def _augmentation(dataset: Any) -> str | None:
    """How the training inputs are augmented, in words; ``None`` without augmentation."""
    from nets.data import ArrayDataset

    if not isinstance(dataset, ArrayDataset):
        return "as the given dataset yields them (augmented if it augments)"
    if dataset.transform is None:
        return None
    return f"augmented by {type(dataset.transform).__name__}"


def _write_stats(
    path: Path,
    config: dict[str, Any],
    epochs: list[dict[str, Any]],
    augmentation: str | None,
    curvature: list[dict[str, Any]] | None = None,
) -> None:
    payload: dict[str, Any] = {
        "format": STATS_FORMAT,
        "version": 1,
        "config": config,
        "definitions": metric_definitions(augmentation),
        "epochs": epochs,
    }
    if curvature is not None:
        rows = json_safe(curvature)
        payload["curvature"] = rows
        payload[STATS_CHECKSUMS] = row_checksums(rows)
    with atomic_write(path, "w") as handle:
        json.dump(json_safe(payload), handle, indent=1, allow_nan=False)


def _unreadable(path: Path, exc: Exception) -> CorruptFileError:
    return CorruptFileError(
        f"{path}: unreadable ({exc}); the run's history is in it, so resuming would "
        "lose it. Restore the file, or start the run anew in another directory"
    )


def _read_stats(
    path: Path,
    upto_epoch: int,
    config: dict[str, Any],
    optimizer_defaults: Mapping[str, Any] | None = None,
    *,
    resumed: tuple[Any, Path] | None = None,
) -> list[dict[str, Any]]:
    """The epochs of ``stats.json`` up to ``upto_epoch``, from a run of the same model, data
    and settings as ``config`` (:func:`check_same_run`; an unreadable file is an error:
    rewriting it would lose the run's history).

    The recorded epochs must count up by one (a file with a gap is refused, naming it), and
    the run continues its history: when epochs up to ``upto_epoch`` are recorded, the last
    of them must be ``upto_epoch`` itself.  A checkpoint of a later epoch than the file
    records was left by an abandoned branch (the run was continued from an earlier
    checkpoint); resuming it wrote a history with a gap (epochs 1, 2, 3, 5, 6).  The error
    names ``resume`` (``resumed``: its value and the checkpoint's path) and the latest
    checkpoint the file records.  Epochs after ``upto_epoch`` (trained after the checkpoint
    was saved) are trained again.
    """
    if not path.is_file():
        return []
    try:
        payload = json.loads(path.read_text())
        epochs = [int(e["epoch"]) for e in payload["epochs"]]
        recorded = dict(payload["config"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _unreadable(path, exc) from exc
    check_same_run(recorded, config, where=f"'{path}'", optimizer_defaults=optimizer_defaults)
    gap = _epoch_gap(epochs)
    if gap is not None:
        raise CorruptFileError(
            f"{path}: its epochs are not contiguous (epoch {gap[1]} follows epoch {gap[0]}), so "
            "it misstates the run's history; restore the file, or start the run anew in "
            "another directory"
        )
    kept = [e for e, n in zip(payload["epochs"], epochs) if n <= upto_epoch]
    if kept and epochs[len(kept) - 1] != upto_epoch:
        raise _beyond_history(path, epochs[len(kept) - 1], upto_epoch, resumed)
    return cast(list[dict[str, Any]], kept)


def _epoch_gap(epochs: Sequence[int]) -> tuple[int, int] | None:
    """The first ``(epoch, next epoch)`` that does not count up by one (``(0, e)`` for a first
    epoch below 1), or ``None``.

    >>> _epoch_gap([1, 2, 3]), _epoch_gap([1, 2, 3, 5, 6]), _epoch_gap([])
    (None, (3, 5), None)
    """
    if epochs and epochs[0] < 1:
        return (0, epochs[0])
    for before, after in itertools.pairwise(epochs):
        if after != before + 1:
            return (before, after)
    return None


def _beyond_history(
    path: Path, last: int, epoch: int, resumed: tuple[Any, Path] | None
) -> ValueError:
    """The error for resuming a checkpoint of ``epoch`` beyond the history ``path`` records
    (which ends at ``last``), naming ``resume`` and the latest checkpoint it records."""
    found = []
    for candidate in path.parent.glob("checkpoint-*.pt"):
        stem = candidate.stem.split("-", 1)[1]
        if stem.isdigit() and int(stem) <= last:
            found.append((int(stem), candidate))
    hint = "start the run anew in another directory"
    if found:
        hint = (
            f"to continue the recorded run pass resume='{max(found)[1]}' (the latest "
            f"checkpoint it records), or {hint}"
        )
    shown = f"'{resumed[1]}'" if resumed is not None else "the checkpoint being resumed"
    return cast(
        ValueError,
        argument_error(
            "resume",
            f"a checkpoint of the history that '{path}' records (its epochs end at {last}; "
            f"{shown} is of epoch {epoch}, after it: a checkpoint left by an abandoned "
            "branch, the run having been continued from an earlier checkpoint, or one of "
            f"another run); {hint}",
            resumed[0] if resumed is not None else epoch,
        ),
    )


def _read_curvature(path: Path) -> list[dict[str, Any]] | None:
    """The ``curvature`` rows recorded in ``stats.json`` (checksums verified), or ``None``
    when it has none."""
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _unreadable(path, exc) from exc
    if not isinstance(payload, dict) or payload.get("curvature") is None:
        return None
    return verified_rows(payload["curvature"], payload.get(STATS_CHECKSUMS), path)


#: The configuration entries that identify a run's model and data.
RUN_IDENTITY = (
    "model", "model_class", "model_kwargs", "num_classes", "in_channels", "input_size",
    "dataset", "dataset_options", "task",
)  # fmt: skip

#: The configuration entries that define how a run trains, with the argument that sets each
#: (``lr0`` is the learning rate ``lr`` of the optimiser's keywords, or its default).
RUN_SETTINGS = (
    ("seed", "seed"),
    ("optimizer", "optimizer"),
    ("lr0", "lr"),
    ("batch_size", "batch_size"),
    ("curvature_batch_size", "curvature_batch_size"),
    ("schedule", "schedule"),
    ("swa", "swa"),
    ("swa_start", "swa_start"),
    ("swa_lr", "swa_lr"),
    ("swa_c_epochs", "swa_c_epochs"),
    ("loss", "loss_fn"),
    ("loss_settings", "loss_fn"),
    ("schedule_settings", "schedule"),
)

#: Settings recorded by a description (:func:`run_config`), with the entry that an older
#: run records instead (the class name ``loss``, ``schedule`` ``"custom"``).
_DESCRIBED = {"loss_settings": "loss", "schedule_settings": "schedule"}

_NOT_GIVEN = "not given"


def check_same_run(
    recorded: dict[str, Any],
    config: dict[str, Any],
    *,
    where: str,
    tracking: bool = False,
    optimizer_defaults: Mapping[str, Any] | None = None,
) -> None:
    """Refuse to continue a run with another model, data or training setting.

    A resumed run continues the recorded run: its model and data (:data:`RUN_IDENTITY`),
    seed, optimiser and every keyword of it (a keyword given on one side only is compared
    with ``optimizer_defaults``, the optimiser's own defaults), initial learning rate,
    batch sizes, schedule, SWA settings and loss (:data:`RUN_SETTINGS`) must all equal
    the recorded ones; otherwise the error names the argument and both values.  Only
    ``epochs`` may differ (:func:`restore_run` checks that the epochs already trained keep
    their learning rates), and the device and data path.

    >>> check_same_run({"model": "MLP"}, {"model": "MLP"}, where="x")
    >>> check_same_run({"model": "MLP"}, {"model": "SmallCNN"}, where="checkpoint c.pt")
    Traceback (most recent call last):
    ...
    ValueError: Argument 'resume': expected a run of this model and data (model 'SmallCNN')...
    >>> check_same_run({"lr0": 0.05}, {"lr0": 0.001}, where="checkpoint c.pt")
    Traceback (most recent call last):
    ...
    ValueError: Argument 'lr': expected the setting of the run being resumed (0.05, recorded...
    """
    _note_undescribed(recorded, config, where)
    for key, name in RUN_SETTINGS:
        if key in recorded and key in config and not _same_setting(key, recorded[key], config[key]):
            if key in _DESCRIBED:
                raise _changed_description(name, recorded[key], config[key], where)
            if key == "batch_size" and tracking:
                raise argument_error(
                    "batch_size",
                    f"the batch size of the run being resumed ({recorded[key]}): the curvature "
                    "tracker counts optimiser steps, which another batch size renumbers",
                    config[key],
                )
            raise _changed_setting(name, recorded[key], config[key], where)
    for key, before, now in _optimizer_differences(recorded, config, optimizer_defaults or {}):
        raise _changed_setting(key, before, now, where)
    _check_same_param_groups(recorded, config, where)
    for key in RUN_IDENTITY:
        if key in recorded and key in config and json_safe(recorded[key]) != config[key]:
            raise argument_error(
                "resume",
                f"a run of this model and data ({key} {config[key]!r})",
                f"{where} with {key} {recorded[key]!r}",
            )


def _same_setting(key: str, recorded: Any, now: Any) -> bool:
    """Whether a recorded run setting equals the new one; optimiser names as the registry
    reads them, case-insensitively (a run started with ``'sgd'`` was refused to ``'SGD'``).

    >>> _same_setting("optimizer", "sgd", "SGD"), _same_setting("seed", 1, 2)
    (True, False)
    """
    if key == "optimizer" and isinstance(recorded, str) and isinstance(now, str):
        return recorded.lower() == now.lower()
    return bool(json_safe(recorded) == now)


def _note_undescribed(recorded: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """Log what cannot be compared with a run recorded before :func:`run_config` described its
    loss and schedule: its loss only by class name (compared as such), a custom schedule
    not at all."""
    for key, older in _DESCRIBED.items():
        if key in recorded or key not in config or older not in recorded:
            continue
        if key == "loss_settings":
            logger.warning(
                "%s records the loss by its class name only (%r; written by an older version): "
                "the loss_fn's settings (label_smoothing, weight, a function's code) cannot be "
                "compared with the run's; only the class name is",
                where, recorded[older],
            )  # fmt: skip
        elif recorded[older] == "custom" and config[key] is not None:
            logger.warning(
                "%s records a custom schedule without describing it (written by an older "
                "version): the schedule cannot be compared with the run's",
                where,
            )


def _description_difference(before: Any, now: Any) -> str:
    """The entries in which two descriptions (:func:`run_config`'s ``*_settings``) differ,
    in words.

    >>> _description_difference({"type": "L", "label_smoothing": 0.0},
    ...                         {"type": "L", "label_smoothing": 0.5})
    'label_smoothing: 0.0 recorded, 0.5 now'
    """
    if not (isinstance(before, dict) and isinstance(now, dict)):
        return f"{before!r} recorded, {now!r} now"
    keys = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    return "; ".join(f"{k}: {before.get(k, _NOT_GIVEN)!r} recorded, {now.get(k, _NOT_GIVEN)!r} now"
                     for k in keys)  # fmt: skip


def _changed_description(name: str, before: Any, now: Any, where: str) -> ValueError:
    """The error for a loss or schedule other than the recorded one (their descriptions
    differ), naming the argument and the entries that differ."""
    what = "loss" if name == "loss_fn" else "schedule"
    shown = now.get("type") or now.get("function") if isinstance(now, dict) else None
    return cast(
        ValueError,
        argument_error(
            name,
            f"the {what} of the run being resumed (recorded in {where}; the one given differs "
            f"in {_description_difference(before, now)}): resuming continues that run with "
            f"the same objective and learning rates; start a new run in another directory to "
            f"train with another {what}",
            f"another {what}" + ("" if shown is None else f", {shown}"),
        ),
    )


def _changed_setting(name: str, before: Any, now: Any, where: str) -> ValueError:
    return cast(
        ValueError,
        argument_error(
            name,
            f"the setting of the run being resumed ({before!r}, recorded in {where}): "
            "resuming continues that run as it was configured; start a new run in another "
            "directory to train with other settings",
            now,
        ),
    )


def _optimizer_differences(
    recorded: dict[str, Any], config: dict[str, Any], defaults: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(keyword, recorded value, new value)`` for each optimiser keyword (but ``lr``, whose
    initial value is ``lr0``) whose effective values differ; a keyword given on one side only
    takes the optimiser's default on the other (``"not given"`` when it has none)."""
    if "optimizer_kwargs" not in recorded or "optimizer_kwargs" not in config:
        return []
    if not _same_setting("optimizer", recorded.get("optimizer"), config.get("optimizer")):
        return []
    before = dict(recorded["optimizer_kwargs"] or {})
    now = dict(config["optimizer_kwargs"] or {})
    found = []
    for key in sorted((set(before) | set(now)) - {"lr"}):
        old = before.get(key, defaults.get(key, _NOT_GIVEN))
        new = now.get(key, defaults.get(key, _NOT_GIVEN))
        if json_safe(old) != json_safe(new):
            found.append((key, old, new))
    return found


def _check_same_param_groups(recorded: dict[str, Any], config: dict[str, Any], where: str) -> None:
    """Refuse an optimiser whose parameter groups differ from the recorded run's.

    An optimiser given as an object has no ``optimizer_kwargs`` to compare, and resuming
    loads the checkpoint's group settings into it: a run resumed with ``momentum=0.0,
    weight_decay=0.5`` trained with the recorded 0.9 and 0 while its new checkpoints and
    ``stats.json`` recorded 0.0 and 0.5 (read by the edge-of-stability line).  Compared:
    the number of groups and every setting both records have, but ``lr`` (the schedule's,
    compared as ``lr0``); a setting one PyTorch version has and another lacks is not.

    >>> _check_same_param_groups({"optimizer_param_groups": [{"momentum": 0.9}]},
    ...                          {"optimizer_param_groups": [{"momentum": 0.0}]}, "c.pt")
    Traceback (most recent call last):
    ...
    ValueError: Argument 'optimizer': expected parameter group 0 with momentum = 0.9, as...
    """
    before, now = recorded.get("optimizer_param_groups"), config.get("optimizer_param_groups")
    if not isinstance(before, list) or not isinstance(now, list):
        return  # a run recorded before the groups were
    if len(before) != len(now):
        raise argument_error(
            "optimizer",
            f"{len(before)} parameter groups, as in the run being resumed (recorded in {where})",
            f"an optimiser with {len(now)}",
        )
    for index, (old, new) in enumerate(zip(before, now)):
        for key in sorted((set(old) & set(new)) - {"lr"}):
            if json_safe(old[key]) != json_safe(new[key]):
                raise argument_error(
                    "optimizer",
                    f"parameter group {index} with {key} = {old[key]!r}, as in the run being "
                    f"resumed (recorded in {where}): resuming continues that run as it was "
                    "configured; start a new run in another directory to train with other "
                    "settings",
                    f"{key} = {new[key]!r}",
                )


def optimizer_defaults(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The keyword defaults of ``optimizer``'s constructor (``{}`` when it has no signature).

    >>> optimizer_defaults(torch.optim.SGD(torch.nn.Linear(1, 1).parameters()))["momentum"]
    0
    """
    import inspect

    try:
        parameters = inspect.signature(type(optimizer)).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a class without a signature
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def train_network(
    dir: str | os.PathLike[str],
    dataset: Any = "digits",
    data_path: str | os.PathLike[str] | None = None,
    model: str | nn.Module = "SmallCNN",
    optimizer: str | torch.optim.Optimizer = "SGD",
    optimizer_kwargs: dict[str, Any] | None = None,
    epochs: int = 100,
    batch_size: int = 128,
    schedule: str | Callable[..., float] | None = "linear",
    save_freq: int | None = 25,
    eval_freq: int = 1,
    resume: str | os.PathLike[str] | bool | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    swa: bool = False,
    swa_start: int | None = None,
    swa_lr: float | None = None,
    swa_c_epochs: int = 1,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    num_workers: int = 0,
    *,
    model_kwargs: dict[str, Any] | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    curvature_batch_size: int | None = None,
    track: CurvatureTracker | Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> TrainingResult:
    """Train a network, saving checkpoints and per-epoch statistics in ``dir``.

    Parameters
    ----------
    dir:
        Output directory (created).
    dataset:
        A name for :func:`nets.data.load_dataset` (``"digits"``, ``"CIFAR10"``,
        ``"CIFAR100"``, ``"synthetic"``), a :class:`~nets.data.DatasetSplits`, a
        ``Dataset`` or ``DataLoader`` of ``(inputs, targets)`` (training only), or a
        ``(train, test)`` pair of them.  Non-empty; the training set map-style (with a
        length: an ``IterableDataset`` is refused).
    data_path:
        Where CIFAR is stored.
    model:
        A name for :func:`nets.models.get_model` (built for the dataset's classes,
        channels and size, with ``seed``) or any ``nn.Module`` (trained in place).
    optimizer:
        A registered name (:func:`nets.optim.get_optimizer`, case-insensitive) or
        an optimiser over ``model``'s parameters.
    optimizer_kwargs:
        Passed to the optimiser; ``batch_size`` and ``curvature_batch_size``
        entries are taken out first and override the arguments of those names.
    epochs:
        Total number of epochs (including those before ``resume``): not below the
        resumed checkpoint's epoch (equal to it, the run is finished and nothing is done).
    batch_size:
        Training minibatch size (also used for evaluation).  One that leaves a last batch
        of a single sample, which the model's BatchNorm layers cannot normalise in train
        mode, is refused.
    schedule:
        ``"linear"`` (Eq. 8, ``r = 0.01``), ``"constant"``, a callable
        ``f(epoch, total_epochs, lr0, ratio)`` or ``None`` to leave learning rates alone.
        Each parameter group is scheduled from its own initial rate (its rate when the run
        starts; a resumed run's from the checkpoint); a custom schedule's rates must be
        finite and non-negative (checked for every epoch before training).  A resumed run
        must use the recorded schedule: a callable is recorded by its description
        (:func:`nets.measurement_settings.describe_callable`: name, code digest, closure
        and defaults) and another one is refused; a run recorded before the description
        (``"custom"`` only) cannot be checked (a logged warning says so).
    save_freq:
        Save a checkpoint every ``save_freq`` epochs (plus the initial and final
        ones); ``None`` saves only those two.
    eval_freq:
        Evaluate the test set every ``eval_freq`` epochs (and after the last).
    resume:
        A checkpoint path, or ``True`` for the latest ``checkpoint-*.pt`` in ``dir``.  A
        checkpoint of a later epoch than ``dir``'s ``stats.json`` records is refused (one
        left by a branch abandoned when the run was continued from an earlier checkpoint:
        the error names the checkpoint to pass instead); nothing is renamed or deleted.
    seed:
        Seed of initialisation, data order, augmentation and dropout.
    device:
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``, ...
    swa, swa_start, swa_lr, swa_c_epochs:
        Stochastic weight averaging: from epoch ``swa_start`` (default
        ``epochs // 2``) average the weights every ``swa_c_epochs`` epochs, with the
        learning rate annealed to ``swa_lr`` (default ``lr0 / 10``; other parameter groups
        in their ratio to the first) by ``swa_start``.  With ``schedule=None`` the rates
        are left alone and ``swa_lr`` is refused.
    loss_fn:
        Loss with mean reduction (a ``reduction`` other than ``"mean"`` is refused; a plain
        function is taken as a mean); default cross-entropy (MSE for regression).  Recorded
        by its class name (``loss``) and its full description (``loss_settings``:
        :func:`nets.measurement_settings.describe_loss`, e.g. ``label_smoothing``, the
        ``weight`` digest, a function's code); a resumed run must use an equal one (the
        error names ``loss_fn`` and what differs).  A run recorded before the description
        is compared by class name only, with a logged warning.
    progress:
        Show a tqdm progress bar.
    num_workers:
        Data-loading worker processes.
    model_kwargs, dataset_kwargs:
        Extra arguments of :func:`~nets.models.get_model` / :func:`~nets.data.load_dataset`.
    curvature_batch_size:
        Size of curvature batches for ``curvature_step`` optimisers (default ``batch_size``).
    track:
        Curvature during training: a :class:`nets.CurvatureTracker` (its ``step`` is
        called after every optimiser step with the epoch, learning rate and batch loss),
        or a mapping of its keyword arguments (``every``, ``top_k``, ``trace_probes``,
        ``kind``, ...; plus ``samples``, the size of the measurement set, default 256:
        the first training samples, unaugmented), from which the tracker is built on
        the run's model and loss with ``path = dir / "curvature.jsonl"`` (continued on
        ``resume``).  The rows go into ``curvature.jsonl`` and the ``curvature`` section
        of ``stats.json``; tracking leaves the run bit-identical.  A tracker object must
        track the network being trained and count from the run's step when training
        starts (0, or on ``resume`` the checkpoint's epoch times the steps per epoch: build
        it with ``start_step=``), else it is refused (``ValueError`` naming ``track``); on
        ``resume`` it takes in the recorded rows up to that step that it lacks
        (:meth:`CurvatureTracker.adopt_rows`, refused if they measure something else).
    overwrite:
        What to do with a run already in ``dir`` (``stats.json``, checkpoints, curvature
        rows) when ``resume`` does not continue it: ``True`` (default, the paper's
        behaviour: Table 4 trains two optimisers into one directory) replaces that run's
        files by the new run's, so that no file of the old run (a later checkpoint) stays
        beside them (they are set aside while the new run starts, put back if it fails to
        start, then deleted with a logged warning naming them); ``False`` refuses the directory
        (the ``curvature train`` command's default; ``--overwrite`` sets it).

    Returns
    -------
    TrainingResult

    Raises
    ------
    ValueError, TypeError
        For invalid arguments (the message names the argument).
    NumericalError
        If the training loss becomes non-finite (names the epoch and batch).

    Examples
    --------
    >>> import tempfile
    >>> res = train_network(tempfile.mkdtemp(), "digits", model="MLP", epochs=1,
    ...                     optimizer_kwargs={"lr": 0.05, "momentum": 0.9, "batch_size": 512},
    ...                     model_kwargs={"hidden": (16,)}, progress=False, device="cpu")
    >>> [p.name for p in res.checkpoints], sorted(res.stats[0])[:3]
    (['checkpoint-00000.pt', 'checkpoint-00001.pt'], ['epoch', 'epoch_time', 'lr'])
    """
    options = TrainingOptions.checked(
        epochs=epochs,
        batch_size=batch_size,
        save_freq=save_freq,
        eval_freq=eval_freq,
        seed=seed,
        num_workers=num_workers,
        progress=progress,
        curvature_batch_size=curvature_batch_size,
        optimizer_kwargs=optimizer_kwargs,
    )
    previous = check_run_directory(Path(dir), resume=bool(resume), overwrite=overwrite)
    schedule_fn = None if schedule is None else get_schedule(schedule)
    run_device = resolve_device(device)
    data = resolve_data(dataset, data_path, seed, dict(dataset_kwargs or {}))
    net, spec = build_model(model, data, seed=seed, model_kwargs=model_kwargs, device=run_device)
    opt_kwargs = options.optimizer_options(optimizer_kwargs)
    opt, optimizer_name = checked_optimizer(optimizer, net, opt_kwargs)
    protocol = StepProtocol.of(opt)
    lr0 = float(opt.param_groups[0]["lr"])
    loss_fn = checked_loss(loss_fn, data.task)
    swa_cfg = swa_config(swa, swa_start, swa_lr, swa_c_epochs, epochs=epochs, lr0=lr0,
                         scheduled=schedule is not None)  # fmt: skip
    config = run_config(
        spec, net, data, options, protocol, swa_cfg, optimizer_groups=optimizer_param_groups(opt),
        data_path=data_path, optimizer_name=optimizer_name, optimizer_kwargs=opt_kwargs,
        schedule=schedule, lr0=lr0, loss_fn=loss_fn, device=run_device, swa_c_epochs=swa_c_epochs,
    )  # fmt: skip
    loaders = make_loaders(data, options, curvature_step=protocol.curvature_step, swa=swa,
                           model=net)  # fmt: skip
    run = TrainingRun(
        Path(dir), data, net, opt, loss_fn, run_device, loaders, options, config, protocol,
        schedule=LearningRateSchedule.checked(schedule_fn, epochs, lr0, swa_cfg, opt),
        swa=swa_cfg, averager=WeightAverager(net) if swa else None,
    )  # fmt: skip
    with seeded_global_rng(seed, run_device):
        start_epoch = begin_run(run, resume, tracking=track is not None)
        stats = _stats_file(run)
        with replaced_run(run.out_dir, previous):
            result = _initial_result(run, stats, stats.read(start_epoch) if resume else [])
            run.tracker = _make_tracker(
                track, net, loss_fn, data.train_eval or data.train, run.out_dir,
                start_step=start_epoch * len(loaders.train), optimizer=opt, seed=seed,
            )  # fmt: skip
            if resume:  # the rows recorded up to the start step are kept
                stats = continue_curvature(run, stats, start_epoch * len(loaders.train))
            if start_epoch == 0 and not resume:
                stats.write([], _rows(run.tracker))
                _record_saved(result, save_run(run, 0))
        _train_epochs(run, result, stats, start_epoch)
    return result


# --------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class TrainingOptions:
    """The loop settings of :func:`train_network` (see its parameters of the same names)."""

    epochs: int = 100
    batch_size: int = 128
    curvature_batch_size: int = 128
    save_freq: int | None = 25
    eval_freq: int = 1
    seed: int = 0
    num_workers: int = 0
    progress: bool = True

    @classmethod
    def checked(
        cls,
        *,
        optimizer_kwargs: dict[str, Any] | None = None,
        curvature_batch_size: int | None = None,
        **values: Any,
    ) -> TrainingOptions:
        """Validated options; ``batch_size``/``curvature_batch_size`` in ``optimizer_kwargs`` win.

        >>> TrainingOptions.checked(epochs=2, optimizer_kwargs={"batch_size": 32}).batch_size
        32
        """
        for name in ("epochs", "batch_size", "eval_freq"):
            if name in values:
                check_positive_int(name, values[name])
        if values.get("save_freq") is not None:
            check_positive_int("save_freq", values["save_freq"])
        seed = values.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise argument_error("seed", "an integer", seed, kind=TypeError)
        if not 0 <= seed < 2**63:
            raise argument_error("seed", "an integer in [0, 2**63)", seed)
        if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, Mapping):
            raise argument_error(
                "optimizer_kwargs",
                "a mapping of the optimiser's keyword arguments, e.g. {'lr': 0.1}",
                optimizer_kwargs,
                kind=TypeError,
            )
        given = dict(optimizer_kwargs or {})
        batch = given.pop("batch_size", values.pop("batch_size", cls.batch_size))
        batch = check_positive_int("batch_size", batch)
        curvature = given.pop("curvature_batch_size", curvature_batch_size)
        curvature = batch if curvature is None else curvature
        check_positive_int("curvature_batch_size", curvature)
        return cls(batch_size=batch, curvature_batch_size=curvature, **values)

    @staticmethod
    def optimizer_options(optimizer_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        """``optimizer_kwargs`` without the entries that are training options."""
        given = dict(optimizer_kwargs or {})
        for key in ("batch_size", "curvature_batch_size"):
            given.pop(key, None)
        return given

    def evaluates_after(self, done: int) -> bool:
        """Whether the test set is evaluated after ``done`` epochs (every ``eval_freq``, last)."""
        return done % self.eval_freq == 0 or done == self.epochs

    def saves_after(self, done: int) -> bool:
        """Whether a checkpoint is saved after ``done`` epochs (every ``save_freq``, last)."""
        return done == self.epochs or (self.save_freq is not None and done % self.save_freq == 0)


@dataclass(frozen=True)
class SWAConfig:
    """Stochastic weight averaging: average every ``c_epochs`` epochs from epoch ``start``,
    with the learning rate annealed to ``lr`` by ``start`` (``None``: no schedule, the rates
    are left alone)."""

    start: int
    lr: float | None
    c_epochs: int = 1

    def averages_after(self, done: int) -> bool:
        """Whether the weights are averaged in after ``done`` epochs."""
        return done >= self.start and (done - self.start) % self.c_epochs == 0


def swa_config(
    swa: bool,
    swa_start: int | None,
    swa_lr: float | None,
    swa_c_epochs: int,
    *,
    epochs: int,
    lr0: float,
    scheduled: bool = True,
) -> SWAConfig | None:
    """The checked SWA settings (defaults ``epochs // 2`` and ``lr0 / 10``), ``None`` without SWA.

    ``scheduled=False`` (``schedule=None``: the learning rates are left alone) has no SWA
    rate: ``swa_lr`` is refused (it was recorded in the run's configuration, but never
    applied).  The SWA rate is the first parameter group's, the other groups' in their
    ratio to it, so a first group at rate ``lr0 = 0`` (a frozen layer) is refused too.

    >>> swa_config(True, None, None, 1, epochs=10, lr0=0.1)
    SWAConfig(start=5, lr=0.01, c_epochs=1)
    >>> swa_config(True, None, 0.01, 1, epochs=10, lr0=0.1, scheduled=False)
    Traceback (most recent call last):
    ...
    ValueError: Argument 'swa_lr': expected None when schedule=None (...
    """
    check_positive_int("swa_c_epochs", swa_c_epochs)
    if not swa:
        return None
    start = epochs // 2 if swa_start is None else swa_start
    check_positive_int("swa_start", start)
    if start >= epochs:
        raise argument_error("swa_start", f"an epoch below epochs={epochs}", start)
    if not scheduled:
        if swa_lr is not None:
            raise argument_error(
                "swa_lr",
                "None when schedule=None (without a schedule the learning rates are left "
                "alone, so no SWA rate is applied; pass schedule='linear' or 'constant' to "
                "anneal to swa_lr)",
                swa_lr,
            )
        return SWAConfig(start, None, swa_c_epochs)
    if swa_lr is not None and (isinstance(swa_lr, bool) or not isinstance(swa_lr, numbers.Real)):
        raise argument_error("swa_lr", "a positive learning rate", swa_lr, kind=TypeError)
    if not lr0 > 0:
        raise argument_error(
            "swa_lr",
            "a first parameter group that trains: the SWA rate is the first group's and "
            "every other group's is in its ratio to the first group's initial rate, which is "
            f"{lr0!r} here (put a group with a positive learning rate first)",
            swa_lr,
        )
    lr = lr0 / 10.0 if swa_lr is None else float(swa_lr)
    if not (math.isfinite(lr) and lr > 0):
        raise argument_error("swa_lr", "a finite, positive learning rate", swa_lr)
    return SWAConfig(start, lr, swa_c_epochs)


@dataclass(frozen=True)
class StepProtocol:
    """How the optimiser is stepped (the module docstring's *Curvature optimisers*).

    >>> StepProtocol.of(torch.optim.LBFGS([torch.zeros(1, requires_grad=True)]))
    StepProtocol(curvature_step=False, requires_closure=True)
    """

    curvature_step: bool = False
    requires_closure: bool = False

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> StepProtocol:
        """The protocol ``optimizer`` declares (``curvature_step``, ``requires_closure``)."""
        closure = getattr(optimizer, "requires_closure", isinstance(optimizer, torch.optim.LBFGS))
        return cls(bool(getattr(optimizer, "curvature_step", False)), bool(closure))


def build_model(
    model: str | nn.Module,
    data: TrainingData,
    *,
    seed: int,
    model_kwargs: dict[str, Any] | None,
    device: torch.device,
) -> tuple[nn.Module, dict[str, Any]]:
    """The network on ``device`` (built by name for ``data``, seeded) and its config spec;
    refused (:func:`check_model_fits`) when it cannot take ``data``'s samples."""
    if isinstance(model, str):
        if data.num_classes is None or data.in_channels is None or data.input_size is None:
            raise argument_error(
                "model",
                "an nn.Module when the dataset is a plain Dataset/DataLoader (its classes and "
                "input shape are unknown)",
                model,
            )
        net = get_model(
            model,
            data.num_classes,
            data.in_channels,
            data.input_size,
            seed=seed,
            **dict(model_kwargs or {}),
        )
    elif isinstance(model, nn.Module):
        net = model
    else:
        raise argument_error("model", "a model name or an nn.Module", model, kind=TypeError)
    net.to(device)
    check_model_fits(net, data, model_name=model if isinstance(model, str) else None)
    spec = model_spec(net) or {
        "model": None,
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "input_size": data.input_size,
        "model_kwargs": {},
        "model_seed": None,
    }
    return net, spec


def check_model_fits(net: nn.Module, data: TrainingData, *, model_name: str | None) -> None:
    """Refuse a model that cannot take the training samples, before any file is written.

    One forward pass of the first (unaugmented) training sample, on a copy of ``net`` in
    eval mode without gradients (``net``, its buffers and the random streams untouched):
    a language model given images, or an image model given token ids, failed at the
    first training step only, naming an internal argument, with the run's first files
    already written.  A dataset whose samples cannot be read this way is not checked.

    Raises
    ------
    ValueError
        Naming ``model`` (and the dataset), with the forward pass's error.
    """
    import copy

    inputs = _first_input(net, data)
    if inputs is None:  # an unusual dataset or a parameterless model: nothing to check
        return
    probe = copy.deepcopy(net).eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            probe(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shown = model_name if model_name is not None else type(net).__name__
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise argument_error(
            "model",
            f"a network that takes the samples of the dataset {data.name or 'given'!r} (or "
            f"a dataset that it takes; its forward pass fails on them: {type(exc).__name__}: "
            f"{reason})",
            shown,
        ) from exc
    finally:
        del probe


def build_optimizer(
    optimizer: str | torch.optim.Optimizer, net: nn.Module, options: dict[str, Any]
) -> tuple[torch.optim.Optimizer, str]:
    """The optimiser over ``net`` (a registered name with ``options``, or as given) and its name."""
    if isinstance(optimizer, str):
        for key, value in options.items():  # a NaN momentum only surfaced as a diverging loss
            if isinstance(value, float) and not math.isfinite(value):
                raise argument_error(key, "a finite number", value)
        try:
            return get_optimizer(optimizer, net, **options), optimizer
        except TypeError as exc:  # Python's "unexpected keyword argument 'momentm'"
            raise _keyword_error(optimizer, options, exc) from exc
        except ValueError as exc:  # PyTorch's "Invalid momentum value: -0.5" names no argument
            if str(exc).startswith("Argument "):
                raise
            named = [key for key in options if key.lower() in str(exc).lower()]
            key = named[-1] if named else "optimizer_kwargs"
            raise argument_error(
                key,
                f"a value {optimizer} accepts ({exc})",
                options.get(key, options) if named else options,
            ) from exc
    if isinstance(optimizer, torch.optim.Optimizer):
        if options:
            raise argument_error(
                "optimizer_kwargs", "no options when an optimiser object is given", options
            )
        return optimizer, type(optimizer).__name__
    raise argument_error(
        "optimizer", "an optimiser name or a torch.optim.Optimizer", optimizer, kind=TypeError
    )


def _keyword_error(name: str, options: Mapping[str, Any], exc: TypeError) -> Exception:
    """The error for ``optimizer_kwargs`` that ``name``'s constructor does not take, naming
    the keyword (Python's own message is passed on when it names none of them).

    >>> str(_keyword_error("SGD", {"momentm": 0.9}, TypeError(
    ...     "SGD.__init__() got an unexpected keyword argument 'momentm'")))[:60]
    "Argument 'optimizer_kwargs': expected keywords that SGD take"
    """
    text = str(exc)
    named = [key for key in options if f"'{key}'" in text]
    if not named:
        return exc
    key = named[0]
    if "multiple values" in text:  # LancGN fixes its curvature: 'curvature' given again
        expected = f"no {key!r}: optimiser {name!r} sets it itself"
    else:
        expected = f"keywords that {name} takes ({text})"
    return argument_error("optimizer_kwargs", expected, {key: options[key]}, kind=TypeError)


def checked_optimizer(
    optimizer: str | torch.optim.Optimizer, net: nn.Module, options: dict[str, Any]
) -> tuple[torch.optim.Optimizer, str]:
    """:func:`build_optimizer` with the learning rates checked: ``lr`` of ``options`` before the
    optimiser's own check (:func:`check_learning_rate_option`), every group's after
    (:func:`check_learning_rates`)."""
    check_learning_rate_option(options.get("lr"))
    opt, name = build_optimizer(optimizer, net, options)
    check_learning_rates(opt, given_as_name=isinstance(optimizer, str))
    return opt, name


def check_learning_rate_option(lr: Any) -> None:
    """``lr=`` of the optimiser's keywords: finite and non-negative (None: its default).

    Parameters
    ----------
    lr : Any
        The value given, or None.

    Raises
    ------
    ValueError
        Naming ``lr`` (PyTorch's own message for ``lr=-1``, "Invalid learning rate",
        named no argument or flag).

    Examples
    --------
    >>> check_learning_rate_option(-1.0)
    Traceback (most recent call last):
    ...
    ValueError: Argument 'lr': expected a finite, non-negative learning rate; received -1.0.
    """
    if lr is None or isinstance(lr, torch.Tensor):
        return
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise argument_error("lr", _LEARNING_RATE, lr, kind=TypeError)
    _refuse_bad_learning_rate(lr, "lr")


def check_learning_rates(opt: torch.optim.Optimizer, *, given_as_name: bool = True) -> None:
    """Refuse a NaN, infinite or negative learning rate before training starts.

    PyTorch's optimisers accept ``lr=nan`` (``nan < 0`` is false) and ``lr=inf``; the
    run then failed at its first step (or its first non-finite loss) after the data,
    the model and the progress display were set up, naming an internal argument.

    Parameters
    ----------
    opt : torch.optim.Optimizer
        The optimiser of the run.
    given_as_name : bool
        The optimiser was built from a name and keywords (the error names ``lr``),
        not given as an object (the error names ``optimizer``).

    Raises
    ------
    ValueError
        Naming ``lr`` (or ``optimizer``) and the parameter group.

    Examples
    --------
    >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=float("nan"))
    >>> check_learning_rates(opt)
    Traceback (most recent call last):
    ...
    ValueError: Argument 'lr': expected a finite, non-negative learning rate; received nan.
    """
    for i, group in enumerate(opt.param_groups):
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if isinstance(lr, (int, float)):
            where = "" if len(opt.param_groups) == 1 else f" (parameter group {i})"
            _refuse_bad_learning_rate(lr, "lr" if given_as_name else "optimizer", where)


_LEARNING_RATE = "a finite, non-negative learning rate"


def _refuse_bad_learning_rate(lr: float, name: str, where: str = "") -> None:
    if not (math.isfinite(lr) and lr >= 0):
        raise argument_error(name, _LEARNING_RATE + where, lr)


def checked_loss(loss_fn: Any, task: str) -> LossFn:
    """``loss_fn`` checked (:func:`nets.loss_means.check_mean_loss`: a callable loss instance
    with mean reduction), or the task's :func:`default_loss` for ``None``.

    A ``reduction="sum"`` loss was accepted, and its reported losses depended on the batch
    size; a string failed at the first step as "'str' object is not callable".

    >>> checked_loss(nn.CrossEntropyLoss(reduction="sum"), "classification")
    Traceback (most recent call last):
    ...
    ValueError: Argument 'loss_fn': expected a loss with mean reduction...
    """
    return default_loss(task) if loss_fn is None else check_mean_loss(loss_fn)


def default_loss(task: str) -> LossFn:
    """Cross-entropy (per token for language modelling; perplexity reported), MSE for regression."""
    if task == "language_modeling":
        return sequence_cross_entropy()  # over (B, T, V) logits
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


def optimizer_param_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each parameter group's settings (``lr``, ``momentum``, ``nesterov``, ``betas``...),
    without its parameters, as plain JSON values.

    What the run trains with, also when the optimiser is given as an object (whose
    ``optimizer_kwargs`` are empty): the run's configuration records them as
    ``optimizer_param_groups``, which the tracking figure's edge of stability reads
    (:func:`nets.plots.tracking.edge_of_stability`).  Resuming compares them with the
    recorded run's (but ``lr``, see :func:`_check_same_param_groups`).

    >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1, momentum=0.9)
    >>> {k: optimizer_param_groups(opt)[0][k] for k in ("lr", "momentum", "nesterov")}
    {'lr': 0.1, 'momentum': 0.9, 'nesterov': False}
    """
    groups = []
    for group in optimizer.param_groups:
        settings: dict[str, Any] = {}
        for key, value in group.items():
            if key in ("params", "initial_lr"):  # initial_lr: a schedule's bookkeeping
                continue
            scalar = isinstance(value, torch.Tensor) and value.numel() == 1  # a tensor lr
            settings[str(key)] = value.item() if scalar else value
        groups.append(cast(dict[str, Any], json_safe(settings)))
    return groups


def run_config(
    spec: dict[str, Any],
    net: nn.Module,
    data: TrainingData,
    options: TrainingOptions,
    protocol: StepProtocol,
    swa: SWAConfig | None,
    *,
    data_path: Any,
    optimizer_name: str,
    optimizer_kwargs: dict[str, Any],
    optimizer_groups: list[dict[str, Any]] | None = None,
    schedule: Any,
    lr0: float,
    loss_fn: LossFn,
    device: torch.device,
    swa_c_epochs: int,
) -> dict[str, Any]:
    """The JSON-safe run configuration stored in checkpoints and ``stats.json``
    (``optimizer_groups``: :func:`optimizer_param_groups` of the run's optimiser).

    ``loss`` is the loss's class name and ``loss_settings`` its full description
    (:func:`nets.measurement_settings.describe_loss`: class and every setting, e.g.
    ``label_smoothing`` and the ``weight`` digest, or a function's name and code digest);
    ``schedule`` is the schedule's name (``"custom"`` for a callable) and
    ``schedule_settings`` a callable's description
    (:func:`nets.measurement_settings.describe_callable`; ``None`` for a name).
    :func:`check_same_run` compares both descriptions on resume.
    """
    return cast(
        dict[str, Any],
        json_safe(
            {
                **spec,
                "model_class": f"{type(net).__module__}.{type(net).__qualname__}",
                "dataset": data.name,
                "data_path": None if data_path is None else os.fspath(data_path),
                "dataset_options": data.options,
                "task": data.task,
                "optimizer": optimizer_name,
                "optimizer_kwargs": optimizer_kwargs,
                "optimizer_param_groups": optimizer_groups,  # optimizer_param_groups()
                "batch_size": options.batch_size,
                "curvature_batch_size": (
                    options.curvature_batch_size if protocol.curvature_step else None
                ),
                "epochs": options.epochs,
                "save_freq": options.save_freq or 0,  # 0: the initial and final checkpoints
                "schedule": schedule if isinstance(schedule, str) or schedule is None else "custom",
                "schedule_settings": _schedule_settings(schedule),
                "lr0": lr0,
                "seed": options.seed,
                "swa": swa is not None,
                "swa_start": None if swa is None else swa.start,
                "swa_lr": None if swa is None else swa.lr,
                "swa_c_epochs": swa_c_epochs,
                "loss": type(loss_fn).__name__,
                "loss_settings": describe_loss(loss_fn, model=net),
                "device": str(device),
            }
        ),
    )


def _schedule_settings(schedule: Any) -> Any:
    """A callable schedule's description (``None`` for a name or no schedule)."""
    if schedule is None or isinstance(schedule, str):
        return None
    return describe_callable(schedule)


@dataclass
class Loaders:
    """The loaders of a run: training (seeded order), test, curvature batches, SWA's BatchNorm."""

    train: DataLoader[Any]
    test: DataLoader[Any] | None = None
    curvature: DataLoader[Any] | None = None
    bn: DataLoader[Any] | None = None


def make_loaders(
    data: TrainingData,
    options: TrainingOptions,
    *,
    curvature_step: bool,
    swa: bool,
    model: nn.Module | None = None,
) -> Loaders:
    """Seeded loaders: training order from ``seed``, curvature batches from a derived seed.

    The data are checked first (:func:`check_training_data`), and with ``model`` the last
    batches (:func:`check_last_batches`): before any file of the run is written.
    """
    assert data.train is not None
    check_training_data(data)
    workers = options.num_workers
    train = data.train_loader
    if train is None:  # (an empty DataLoader is falsy: `or` replaced it)
        train = make_loader(
            data.train, options.batch_size, shuffle=True, seed=options.seed, num_workers=workers
        )
    test = None
    if data.test is not None:
        test = make_loader(data.test, options.batch_size, shuffle=False, num_workers=workers)
    curvature = None
    if curvature_step:
        curvature = make_loader(
            data.train,
            options.curvature_batch_size,
            shuffle=True,
            seed=_derived_seed(options.seed, 1),
            num_workers=workers,
        )
    bn = None
    if swa:
        source = data.train_eval if data.train_eval is not None else data.train
        bn = make_loader(source, options.batch_size, shuffle=False)
    loaders = Loaders(train, test, curvature, bn)
    if model is not None:
        check_last_batches(model, loaders, data)
    return loaders


def check_training_data(data: TrainingData) -> None:
    """Refuse a training or test set that cannot be used, before any file is written.

    An empty training ``Dataset`` or ``DataLoader`` failed in PyTorch's sampler ("num_samples
    should be a positive integer value": an empty ``DataLoader`` is falsy, and was replaced);
    a ``DataLoader`` over an ``IterableDataset`` as "object of type ... has no len()"; an empty
    test set only after the first epoch was trained and its files written, naming ``loader``.
    A test ``IterableDataset`` is evaluated in one pass, as it yields its samples.

    Raises
    ------
    TypeError, ValueError
        Naming ``dataset``.
    """
    for split, dataset in (("training", data.train), ("test", data.test)):
        if dataset is None or (split == "test" and isinstance(dataset, IterableDataset)):
            continue
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise argument_error(
                "dataset",
                f"a {split} set with a length (a map-style Dataset, or a DataLoader over one: "
                "the samples of an IterableDataset cannot be counted, shuffled with the run's "
                "seed or replayed on resume)",
                dataset,
                kind=TypeError,
            )
        if len(cast(Any, dataset)) == 0:
            raise argument_error(
                "dataset", f"a non-empty {split} set", f"an empty {split} set ({dataset!r})"
            )
    if data.train_loader is not None and len(data.train_loader) == 0:
        raise argument_error(
            "dataset",
            "a training DataLoader that yields at least one batch (drop_last with a batch size "
            "above the number of samples yields none)",
            data.train_loader,
        )


def check_last_batches(net: nn.Module, loaders: Loaders, data: TrainingData) -> None:
    """Refuse a training (or curvature) loader whose last batch holds one sample when ``net``
    has BatchNorm layers that cannot normalise it in train mode, before any file is written.

    Such a run failed at its last batch with PyTorch's "Expected more than 1 value per
    channel when training", after the epoch's other batches were trained.  The failure is
    confirmed by one train-mode forward pass of one sample on a copy of ``net`` (``net``,
    its buffers and the random streams untouched): a BatchNorm over positions too (images)
    normalises a single sample.

    Raises
    ------
    ValueError
        Naming ``batch_size`` (``curvature_batch_size`` for the curvature batches, ``dataset``
        for a given ``DataLoader``).
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return
    named = (
        ("batch_size" if data.train_loader is None else "dataset", loaders.train),
        ("curvature_batch_size", loaders.curvature),
    )
    for name, loader in named:
        if loader is None or loader.batch_size is None or loader.drop_last:
            continue
        try:
            size = len(cast(Any, loader.sampler))
        except TypeError:  # a sampler without a length: its last batch is unknown
            continue
        if size % loader.batch_size != 1 or not _fails_on_one_sample(net, data):
            continue
        raise argument_error(
            name,
            f"a batch size that leaves no last batch of 1 sample (the training set of {size} "
            f"samples leaves a last batch of 1, which BatchNorm cannot normalise in train "
            "mode); choose another batch size",
            loader.batch_size,
        )


def _fails_on_one_sample(net: nn.Module, data: TrainingData) -> bool:
    """Whether a train-mode forward pass of the first training sample alone fails in a
    BatchNorm layer (on a copy of ``net``, the random streams forked; ``False`` when the
    sample cannot be read)."""
    import copy

    inputs = _first_input(net, data)
    if inputs is None:
        return False
    probe = copy.deepcopy(net).train()
    cuda = [inputs.device.index or 0] if inputs.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda, device_type="cuda"):
            probe(inputs)
    except ValueError as exc:
        return "more than 1 value per channel" in str(exc)
    except Exception:  # another failure: check_model_fits's and the run's to report
        return False
    finally:
        del probe
    return False


def _first_input(net: nn.Module, data: TrainingData) -> torch.Tensor | None:
    """The first (unaugmented) training sample's inputs as a batch of one on ``net``'s
    device and floating dtype; ``None`` for an unusual dataset or a parameterless model."""
    source = data.train_eval if data.train_eval is not None else data.train
    try:
        sample = cast(Any, source)[0][0]
        first = next(iter(net.parameters()))
        inputs = torch.as_tensor(sample).unsqueeze(0).to(first.device)
        if torch.is_floating_point(inputs):
            inputs = inputs.to(first.dtype)
    except Exception:
        return None
    return inputs


@dataclass(frozen=True)
class LearningRateSchedule:
    """The learning rate of each epoch: ``fn(epoch, epochs, lr0, 0.01)``, or with SWA annealed to
    the SWA rate by its start and constant after; ``fn = None`` leaves the rates alone.

    Each parameter group is scheduled from its own initial rate (:meth:`rate`); ``lr0`` is the
    first group's, whose rates ``stats.json`` reports.
    """

    fn: Callable[..., float] | None
    epochs: int
    lr0: float
    swa: SWAConfig | None = None

    @classmethod
    def checked(
        cls,
        fn: Callable[..., float] | None,
        epochs: int,
        lr0: float,
        swa: SWAConfig | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> LearningRateSchedule:
        """The schedule, with the rate of every epoch checked before training starts (a
        finite, non-negative number: :meth:`rate`) for ``lr0`` and for the rate of each of
        ``optimizer``'s parameter groups (their initial rates in a new run).

        >>> LearningRateSchedule.checked(lambda e, T, lr0, r: -0.1, 3, 0.1)
        Traceback (most recent call last):
        ...
        ValueError: Argument 'schedule': expected a callable returning a finite, non-negative...
        """
        schedule = cls(fn, epochs, lr0, swa)
        if fn is not None:
            groups = [] if optimizer is None else optimizer.param_groups
            for initial in sorted({float(lr0), *(float(g["lr"]) for g in groups)}):
                for epoch in range(epochs):
                    schedule.rate(epoch, initial)
        return schedule

    def __call__(self, epoch: int) -> float | None:
        """The rate of (0-based) ``epoch`` for the first group, or ``None`` without a schedule."""
        return self.rate(epoch, self.lr0)

    def rate(self, epoch: int, initial: float) -> float | None:
        """The rate of (0-based) ``epoch`` for a group of initial rate ``initial`` (``None``
        without a schedule): the schedule evaluated with that initial rate.

        With SWA the decay ends at the SWA rate times the group's ratio to the first group,
        ``initial / lr0`` (the first group's is ``swa_lr`` itself), the rate of every epoch
        from ``swa_start`` on.  A group that starts at 0 (a frozen layer) stays at 0 under
        the paper's schedules, whatever the first group's rate.

        Raises
        ------
        ValueError, TypeError
            Naming ``schedule`` and the epoch, when a schedule returns anything but a finite,
            non-negative number (a negative rate ran gradient ascent, a NaN one failed later
            as a "non-finite loss").

        >>> from nets.schedules import get_schedule
        >>> LearningRateSchedule(get_schedule("constant"), 10, 0.1).rate(3, 0.0)
        0.0
        """
        fn, swa = self.fn, self.swa
        if fn is None:
            return None
        if swa is None or swa.lr is None:
            return _checked_rate(fn(epoch, self.epochs, initial, 0.01), epoch)
        ratio = swa.lr / self.lr0 if self.lr0 > 0 else 1.0
        if epoch >= swa.start:
            return swa.lr if initial == self.lr0 else initial * ratio
        return _checked_rate(fn(epoch, swa.start, initial, ratio), epoch)

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int) -> float:
        """Set every parameter group's ``lr`` for ``epoch``; return the first group's rate.

        Each group is scheduled from its own initial rate ``initial_lr`` (PyTorch's name,
        kept in the group and so in the optimiser's checkpoint; :func:`begin_run` sets it to
        the group's rate when a run starts): groups at 0.1 and 0.001 keep their ratio, and a
        first group at 0 (a frozen layer) leaves the others training.  (Every group used to
        get the first group's rate, and with a first group at 0 no group trained.)  A group
        without ``initial_lr`` (a checkpoint written before it was kept) has rates already
        scheduled by the first group's factor, which is undone.
        """
        if self.fn is None:
            return float(optimizer.param_groups[0]["lr"])
        groups = optimizer.param_groups
        current = float(groups[0]["lr"])
        # rates of a run resumed from a checkpoint without initial_lr are already scheduled:
        # undo the first group's factor (1 in a new run)
        undo = self.lr0 / current if current > 0 else 1.0
        for group in groups:
            initial = float(group.setdefault("initial_lr", float(group["lr"]) * undo))
            group["lr"] = self.rate(epoch, initial)
        return float(groups[0]["lr"])


def _checked_rate(value: Any, epoch: int) -> float:
    """A schedule's rate as a float: a finite, non-negative number (error naming ``schedule``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    expected = f"a callable returning a finite, non-negative learning rate (epoch {epoch + 1})"
    return check_real("schedule", value, expected, lambda rate: math.isfinite(rate) and rate >= 0)


def begin_run(
    run: TrainingRun, resume: str | os.PathLike[str] | bool | None, *, tracking: bool = False
) -> int:
    """Start ``run``: each parameter group's initial rate (``initial_lr``, what the schedule
    scales) is its rate now, then with ``resume`` the checkpoint's state is restored
    (:func:`restore_run`; its groups' initial rates with it); return the epoch to start from.

    An ``initial_lr`` already in the optimiser (a PyTorch scheduler's, or an earlier run's on
    the same optimiser) was kept, so the run trained from that stale rate, not from its
    recorded ``lr0``.
    """
    for i, group in enumerate(run.optimizer.param_groups):
        stale, group["initial_lr"] = group.get("initial_lr"), float(group["lr"])
        if stale is not None and not resume and float(stale) != group["initial_lr"]:
            logger.info(
                "parameter group %d: initial_lr %r (from an earlier schedule) replaced by the "
                "group's rate %r, the run's initial rate",
                i, float(stale), group["initial_lr"],
            )  # fmt: skip
    return restore_run(run, resume, tracking=tracking) if resume else 0


@dataclass
class TrainingRun:
    """Everything one run is made of; the parts below take it (``train_network`` builds it)."""

    out_dir: Path
    data: TrainingData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    device: torch.device
    loaders: Loaders
    options: TrainingOptions
    config: dict[str, Any]
    protocol: StepProtocol
    schedule: LearningRateSchedule
    swa: SWAConfig | None = None
    averager: WeightAverager | None = None
    tracker: CurvatureTracker | None = None

    @property
    def classification(self) -> bool:
        """Whether accuracies are counted (a classification task)."""
        return self.data.task == "classification"


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on torch's global generators seeded from ``seed``, restored on exit.

    Dropout and other layers drawing from the global generator get a stream derived
    from ``seed``; the caller's global random state is the same after the block.

    >>> before = torch.get_rng_state()
    >>> with seeded_global_rng(0, torch.device("cpu")):
    ...     _ = torch.rand(2)
    >>> bool(torch.equal(before, torch.get_rng_state()))
    True
    """
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices, device_type="cuda"):
        torch.set_rng_state(torch.Generator().manual_seed(_derived_seed(seed, 2)).get_state())
        if device.type == "cuda":
            cuda_gen = torch.Generator(device=device).manual_seed(_derived_seed(seed, 3))
            torch.cuda.set_rng_state(cuda_gen.get_state(), device)
        yield


#: The files of a run in its directory (those :func:`train_network` writes).
RUN_FILE_PATTERNS = (
    STATS_FILE,
    "checkpoint-*.pt",
    "swa-*.pt",
    "curvature.jsonl",
    "curvature.jsonl.ritz.npz",
    "curvature.density-*.npz",
)


def run_files(out_dir: Path) -> list[Path]:
    """The files of a run in ``out_dir`` (:data:`RUN_FILE_PATTERNS`), sorted."""
    if not out_dir.is_dir():
        return []
    return sorted({p for pattern in RUN_FILE_PATTERNS for p in out_dir.glob(pattern)})


def check_run_directory(out_dir: Path, *, resume: bool, overwrite: bool) -> list[Path]:
    """The files of a run already in ``out_dir`` that a new run replaces (module docstring).

    A fresh run there would replace some of the old run's files and leave others (its
    later checkpoints) beside the new ones.  With ``resume`` the run is continued (no
    file is replaced); otherwise the old run's files are returned for
    :func:`replaced_run` when ``overwrite``, and refused without it.

    >>> import tempfile
    >>> check_run_directory(Path(tempfile.mkdtemp()), resume=False, overwrite=False)
    []
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise argument_error("dir", "a directory (or a path to create one at)", str(out_dir))
    if resume:
        return []
    found = run_files(out_dir)
    if found and not overwrite:
        shown = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise argument_error(
            "dir",
            "a directory without a run in it (resume continues that run; overwrite deletes "
            "its files and starts anew)",
            f"'{out_dir}', which holds a run ({shown})",
        )
    return found


@contextlib.contextmanager
def replaced_run(out_dir: Path, previous: Sequence[Path]) -> Iterator[None]:
    """Set the files ``previous`` of an old run aside while the new run starts.

    They are moved into a hidden folder of ``out_dir``; if starting fails (a bad tracker
    setting, an error in the first checkpoint) they are moved back, so a failed start
    never costs the old run; once the new run's first files are written they are deleted,
    with a logged warning naming them.
    """
    if not previous:
        yield
        return
    aside = out_dir / f".replaced-run-{os.getpid()}"
    aside.mkdir(exist_ok=True)
    moved: list[tuple[Path, Path]] = []
    try:
        for path in previous:
            target = aside / path.name
            os.replace(path, target)
            moved.append((path, target))
        yield
    except BaseException:
        for path, target in reversed(moved):
            os.replace(target, path)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    logger.warning(
        "%s held a run; its files were replaced by the new run's: %s",
        out_dir,
        ", ".join(p.name for p in previous),
    )
    shutil.rmtree(aside, ignore_errors=True)


def restore_run(
    run: TrainingRun, resume: str | os.PathLike[str] | bool, *, tracking: bool = False
) -> int:
    """Load model, optimiser, RNG streams and SWA state from a checkpoint; return its epoch.

    ``resume=True`` takes the latest ``checkpoint-*.pt`` of the run directory.  Refused,
    before anything is loaded, when the run directory's ``stats.json`` (if any) does not lead
    to the checkpoint's epoch (:func:`_read_stats`): a later checkpoint left by a branch that
    was abandoned when the run was continued from an earlier one is not resumed (pass the
    checkpoint to continue from); nothing is renamed or deleted.  A run resumed in a
    directory without ``stats.json`` records the epochs after the checkpoint's.
    """
    resume_path = latest_checkpoint(run.out_dir) if resume is True else Path(cast(Any, resume))
    if resume_path is None:
        raise argument_error(
            "resume", f"a checkpoint path (no checkpoint-*.pt in '{run.out_dir}')", resume
        )
    ckpt = load_checkpoint(resume_path, map_location=run.device)
    _check_training_state(ckpt, resume_path, swa=run.averager is not None)
    recorded = dict(ckpt.get("config") or {})
    check_same_run(
        recorded, run.config, where=f"checkpoint '{resume_path}'", tracking=tracking,
        optimizer_defaults=optimizer_defaults(run.optimizer),
    )  # fmt: skip
    start_epoch = int(ckpt.get("epoch") or 0)
    if start_epoch > run.options.epochs:
        raise argument_error(
            "epochs",
            f"at least the epoch of the checkpoint being resumed ({start_epoch}: the total "
            "counts the training before the resume too; equal to it, the run is finished)",
            run.options.epochs,
        )
    check_schedule_history(run.schedule, recorded.get("epochs"), start_epoch)
    _read_stats(  # the run's history must lead to the checkpoint (no gap)
        run.out_dir / STATS_FILE, start_epoch, run.config, optimizer_defaults(run.optimizer),
        resumed=(resume, resume_path),
    )  # fmt: skip
    load_model_state(run.model, ckpt)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    loaders = run.loaders
    _restore_rng(ckpt["rng_state"], loaders.train, loaders.curvature, run.device)
    if run.averager is not None:
        run.averager.load_state_dict(ckpt["swa_state_dict"])
    logger.info("resumed from %s at epoch %d", resume_path, start_epoch)
    return start_epoch


def _check_training_state(ckpt: Mapping[str, Any], path: Path, *, swa: bool) -> None:
    """Refuse a checkpoint that cannot continue a run as if uninterrupted.

    A training checkpoint (``checkpoint-<epoch>.pt``, :func:`save_run`) holds the model,
    the optimiser's state, the random streams and (with SWA) the average's state.  An SWA
    file (``swa-<epoch>.pt``: the averaged weights, no optimiser state) or a checkpoint
    saved without them was resumed silently: training went on from the averaged weights
    with empty momentum buffers, the data order restarted from the seed and the average
    restarted (n_averaged 2 -> 1).
    """
    expected = (
        "a training checkpoint written by train_network (checkpoint-<epoch>.pt: the model "
        "with its optimiser state, random streams" + (" and SWA average" if swa else "") + ")"
    )
    if "n_averaged" in ckpt:
        raise argument_error(
            "resume", expected, f"'{path}', an SWA average (its weights are not the trained ones)"
        )
    missing = [
        what
        for key, what in (
            ("optimizer", "optimiser state"),
            ("rng_state", "random streams"),
            *((("swa_state_dict", "SWA average state"),) if swa else ()),
        )
        if ckpt.get(key) is None
    ]
    if missing:
        raise argument_error("resume", expected, f"'{path}', without {' and '.join(missing)}")


def check_schedule_history(schedule: LearningRateSchedule, recorded_epochs: Any, done: int) -> None:
    """Refuse a new total of epochs under which the ``done`` epochs already trained would
    have had other learning rates (the linear schedule depends on the total): the run's
    recorded configuration would then misstate its history.

    >>> from nets.schedules import get_schedule
    >>> check_schedule_history(LearningRateSchedule(get_schedule("linear"), 4, 0.1), 2, 1)
    >>> check_schedule_history(LearningRateSchedule(get_schedule("linear"), 10, 0.1), 4, 4)
    Traceback (most recent call last):
    ...
    ValueError: Argument 'epochs': expected a total under which the 4 epochs already trained...
    """
    if not isinstance(recorded_epochs, int) or recorded_epochs == schedule.epochs:
        return
    before = replace(schedule, epochs=recorded_epochs)
    for epoch in range(done):
        if before(epoch) != schedule(epoch):
            raise argument_error(
                "epochs",
                f"a total under which the {done} epochs already trained keep their learning "
                f"rates (the run was trained for a total of {recorded_epochs}: epoch "
                f"{epoch + 1} had lr {before(epoch)!r}, under the new total its schedule "
                f"gives {schedule(epoch)!r}); resume with epochs={recorded_epochs}",
                schedule.epochs,
            )


def save_run(run: TrainingRun, epoch: int) -> tuple[Path, Path | None]:
    """Write ``checkpoint-<epoch>.pt`` (with RNG and SWA state) and, once averaging has
    started, ``swa-<epoch>.pt``; return both paths (``None`` for no SWA file)."""
    loaders = run.loaders
    extra: dict[str, Any] = {"rng_state": _rng_state(loaders.train, loaders.curvature, run.device)}
    averager = run.averager
    if averager is not None:
        extra["swa_state_dict"] = averager.state_dict()
    path = run.out_dir / checkpoint_name(epoch)
    save_checkpoint(path, run.model, run.optimizer, epoch, run.config, **extra)
    if averager is None or averager.n_averaged == 0:
        return path, None
    swa_path = run.out_dir / swa_checkpoint_name(epoch)
    save_checkpoint(
        swa_path, averager.module, None, epoch, run.config, n_averaged=averager.n_averaged
    )
    return path, swa_path


def _stats_file(run: TrainingRun) -> StatsFile:
    """The run's ``stats.json`` (a resumed run's recorded optimiser keywords are compared
    with the defaults of the optimiser's constructor)."""
    return StatsFile(
        run.out_dir / STATS_FILE,
        run.config,
        _augmentation(run.data.train),
        optimizer_defaults=optimizer_defaults(run.optimizer),
    )


def _initial_result(
    run: TrainingRun, stats: StatsFile, rows: list[dict[str, Any]]
) -> TrainingResult:
    """The run's result before the first epoch to come: its directory, model, optimiser, config.

    ``rows`` are the statistics rows already written (a resumed run's), or none.
    """
    return TrainingResult(
        run.out_dir,
        run.model,
        run.optimizer,
        rows,
        stats_path=stats.path,
        config=run.config,
        swa_model=None if run.averager is None else run.averager.module,
    )


def _record_saved(result: TrainingResult, saved: tuple[Path, Path | None]) -> None:
    result.checkpoints.append(saved[0])
    if saved[1] is not None:
        result.swa_checkpoints.append(saved[1])


@dataclass(frozen=True)
class StatsFile:
    """The run's ``stats.json`` (format in the module docstring), rewritten atomically."""

    path: Path
    config: dict[str, Any]
    augmentation: str | None = None
    #: Rows written as ``curvature`` when :meth:`write` is given none (a tracked run
    #: resumed without tracking keeps its recorded rows).
    kept_curvature: list[dict[str, Any]] | None = None
    #: The optimiser's keyword defaults (:func:`check_same_run` compares the recorded run's
    #: optimiser keywords with them).
    optimizer_defaults: Mapping[str, Any] = field(default_factory=dict)

    def write(
        self, epochs: list[dict[str, Any]], curvature: list[dict[str, Any]] | None = None
    ) -> None:
        """Rewrite the file with ``epochs`` (and the tracker's rows as ``curvature``); epochs
        that do not count up by one are refused (``RuntimeError``), the file left as it was."""
        gap = _epoch_gap([int(e["epoch"]) for e in epochs])
        if gap is not None:  # never a history with a gap
            raise RuntimeError(
                f"{self.path}: not written: its epochs would not be contiguous (epoch {gap[1]} "
                f"after epoch {gap[0]})"
            )
        rows = self.kept_curvature if curvature is None else curvature
        _write_stats(self.path, self.config, epochs, self.augmentation, rows)

    def read(self, upto_epoch: int) -> list[dict[str, Any]]:
        """The recorded epochs up to ``upto_epoch`` (``[]`` without a file)."""
        return _read_stats(self.path, upto_epoch, self.config, self.optimizer_defaults)


def evaluation_entry(run: TrainingRun, model: nn.Module, prefix: str = "test") -> dict[str, Any]:
    """``<prefix>_loss``, ``_acc``, ``_top5`` of ``model`` on the test set (``None`` if none)."""
    if run.loaders.test is None:
        return {f"{prefix}_loss": None, f"{prefix}_acc": None, f"{prefix}_top5": None}
    ev = evaluate(
        model, run.loaders.test, run.loss_fn, run.device, classification=run.classification
    )
    return {f"{prefix}_loss": ev["loss"], f"{prefix}_acc": ev["acc"], f"{prefix}_top5": ev["top5"]}


def swa_entry(run: TrainingRun, done: int, *, refresh: bool) -> dict[str, Any]:
    """Average the weights in when due after ``done`` epochs; with ``refresh`` (an epoch that
    evaluates or saves) recompute the BatchNorm statistics and evaluate the averaged model."""
    averager, swa = run.averager, run.swa
    if averager is None or swa is None:
        return {}
    if swa.averages_after(done):
        averager.update(run.model)
    entry: dict[str, Any] = {
        "swa_test_loss": None,
        "swa_test_acc": None,
        "swa_test_top5": None,
        "swa_n_averaged": averager.n_averaged,
    }
    if averager.n_averaged > 0 and refresh:
        assert run.loaders.bn is not None
        averager.recompute_bn(_inputs_only(run.loaders.bn), run.device)
        if run.loaders.test is not None:
            entry.update(evaluation_entry(run, averager.module, "swa_test"))
    return entry


def run_epoch(run: TrainingRun, epoch: int) -> dict[str, Any]:
    """One epoch (0-based ``epoch``): schedule, training pass, evaluation, SWA; its stats entry."""
    run.schedule.apply(run.optimizer, epoch)
    entry = train_epoch(run, epoch)
    entry["lr"] = float(run.optimizer.param_groups[0]["lr"])
    done = epoch + 1
    evaluate_now = run.options.evaluates_after(done)
    if evaluate_now:
        entry.update(evaluation_entry(run, run.model))
    else:
        entry.update(test_loss=None, test_acc=None, test_top5=None)
    entry.update(swa_entry(run, done, refresh=evaluate_now or run.options.saves_after(done)))
    if run.data.task == "language_modeling":  # perplexity exp(mean token loss)
        entry.update(_perplexities(entry))
    entry["peak_memory_mb"] = _peak_memory_mb(run.device)
    return {"epoch": done, **entry}


def train_epoch(run: TrainingRun, epoch: int) -> dict[str, Any]:
    """One pass over the training loader (the optimiser stepped by its protocol, the tracker
    after each step): ``train_loss``, ``train_acc``, ``train_top5``, ``epoch_time``."""
    return _train_epoch(
        run.model,
        run.optimizer,
        run.loaders.train,
        run.loaders.curvature,
        run.loss_fn,
        run.device,
        epoch,
        classification=run.classification,
        curvature_step=run.protocol.curvature_step,
        requires_closure=run.protocol.requires_closure,
        track=run.tracker,
    )


def _log_epoch(entry: dict[str, Any], epochs: int) -> None:
    logger.info(
        "epoch %d/%d lr=%.4g train_loss=%.4f train_acc=%s test_loss=%s test_acc=%s time=%.2fs",
        entry["epoch"],
        epochs,
        entry["lr"],
        entry["train_loss"],
        entry["train_acc"],
        entry["test_loss"],
        entry["test_acc"],
        entry["epoch_time"],
    )


def _train_epochs(
    run: TrainingRun, result: TrainingResult, stats: StatsFile, start_epoch: int
) -> None:
    """Epochs ``start_epoch .. epochs - 1``: each one's stats written, checkpoints when due."""
    from tqdm.auto import tqdm

    epochs = run.options.epochs
    bar = tqdm(
        range(start_epoch, epochs),
        desc="train",
        disable=not run.options.progress,
        unit="epoch",
        initial=start_epoch,
        total=epochs,
    )
    try:
        for epoch in bar:
            entry = run_epoch(run, epoch)
            result.stats.append(entry)
            stats.write(result.stats, _rows(run.tracker))
            _write_curvature(run.out_dir / CURVATURE_FILE, run.tracker)
            if run.options.saves_after(entry["epoch"]):
                _record_saved(result, save_run(run, entry["epoch"]))
            bar.set_postfix(loss=f"{entry['train_loss']:.4g}")
            _log_epoch(entry, epochs)
    finally:
        bar.close()


def _perplexities(entry: dict[str, Any]) -> dict[str, float | None]:
    """``train_ppl``/``test_ppl`` = :math:`e^{L}` of the mean next-token losses (None if absent)."""
    losses = {split: entry.get(f"{split}_loss") for split in ("train", "test")}
    return {f"{k}_ppl": None if v is None else math.exp(v) for k, v in losses.items()}


class _inputs_only:
    """Iterate the inputs of a loader of ``(x, y)`` batches (what ``update_bn`` wants)."""

    def __init__(self, loader: DataLoader[Any]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[torch.Tensor]:
        for x, _ in _batch_iter(self.loader):
            yield x


def _rng_state(
    train_loader: DataLoader[Any], curvature_loader: DataLoader[Any] | None, device: torch.device
) -> dict[str, torch.Tensor | None]:
    return {
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "train_loader": _generator_state(train_loader),
        "curvature_loader": _generator_state(curvature_loader),
    }


def _restore_rng(
    state: dict[str, Any],
    train_loader: DataLoader[Any],
    curvature_loader: DataLoader[Any] | None,
    device: torch.device,
) -> None:
    if state.get("torch_cpu") is not None:
        torch.set_rng_state(state["torch_cpu"].cpu())
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    for loader, key in ((train_loader, "train_loader"), (curvature_loader, "curvature_loader")):
        if loader is not None and loader.generator is not None and state.get(key) is not None:
            loader.generator.set_state(state[key].cpu())


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    curvature_loader: DataLoader[Any] | None,
    loss_fn: LossFn,
    device: torch.device,
    epoch: int,
    *,
    classification: bool,
    curvature_step: bool,
    requires_closure: bool,
    track: CurvatureTracker | None = None,
) -> dict[str, Any]:
    for dataset in {id(d): d for d in _datasets(loader, curvature_loader)}.values():
        set_epoch = getattr(dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model.train()
    metrics = _Metrics(device, classification, loss_fn)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    curvature_iter = iter(_batch_iter(curvature_loader)) if curvature_loader is not None else None
    for index, (x, y) in enumerate(_batch_iter(loader)):
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        last: dict[str, torch.Tensor] = {}
        closure = _make_closure(model, optimizer, loss_fn, x, y, last)
        if curvature_step:
            assert curvature_loader is not None and curvature_iter is not None
            try:
                xc, yc = next(curvature_iter)
            except StopIteration:
                curvature_iter = iter(_batch_iter(curvature_loader))
                xc, yc = next(curvature_iter)
            cast(Any, optimizer).step(
                closure=closure,
                curvature_batch=(xc.to(device), yc.to(device)),
                loss_fn=loss_fn,
            )
        elif requires_closure:
            cast(Any, optimizer).step(closure)
        else:
            closure()
            optimizer.step()
        if "loss" not in last:
            raise RuntimeError(
                f"The optimiser {type(optimizer).__name__} did not call the closure at epoch "
                f"{epoch + 1}, batch {index}."
            )
        loss = last["loss"]
        if track is not None:
            lr = float(optimizer.param_groups[0]["lr"])
            track.step(epoch=epoch + 1, lr=lr, loss=float(loss))
        first_bad = torch.where(
            (first_bad < 0) & ~torch.isfinite(loss), torch.full_like(first_bad, index), first_bad
        )
        metrics.add(last["output"], x, y, loss)
    if metrics.count == 0:
        raise argument_error("dataset", "a non-empty training set", loader)
    bad = int(first_bad)
    if bad >= 0:
        raise NumericalError(
            f"Training loss became non-finite at epoch {epoch + 1}, batch {bad}; lower the "
            "learning rate or check the data."
        )
    stats = metrics.result()
    return {
        "train_loss": stats["loss"],
        "train_acc": stats["acc"],
        "train_top5": stats["top5"],
        "epoch_time": time.perf_counter() - start,
    }


def _make_closure(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    last: dict[str, torch.Tensor],
) -> Callable[[], torch.Tensor]:
    """Zero the gradients, evaluate the loss on ``(x, y)``, back-propagate, return the loss.

    ``last`` keeps the output and loss of the closure's first call, at the weights the step
    starts from (what ``LBFGS.step`` returns, and what the other optimisers' single call
    gives): LBFGS evaluates the closure several times per step, and the last evaluation
    was reported as the step's loss.
    """

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        output = model(x)
        loss = loss_fn(output, y)
        loss.backward()
        if "loss" not in last:  # the step's first evaluation: at the weights it starts from
            last["output"], last["loss"] = output.detach(), loss.detach()
        return loss

    return closure


def _datasets(*loaders: DataLoader[Any] | None) -> list[Any]:
    return [loader.dataset for loader in loaders if loader is not None]


def _rows(tracker: CurvatureTracker | None) -> list[dict[str, Any]] | None:
    return None if tracker is None else tracker.rows


def _write_curvature(path: Path, tracker: CurvatureTracker | None) -> None:
    """The tracker's rows as JSON lines in the run directory (unless it writes them there)."""
    if tracker is None or (tracker.path is not None and tracker.path.resolve() == path.resolve()):
        return
    write_rows(path, [json_safe(row) for row in tracker.rows])  # each with its CRC-32


def check_users_tracker(tracker: CurvatureTracker, model: nn.Module, start_step: int) -> None:
    """Refuse a :class:`CurvatureTracker` given as ``track`` that would mislabel its rows.

    Its model must be the network being trained (a tracker of another model measured a
    model that never changed), and its step count the run's step when training starts,
    ``start_step`` (0 for a new run, the resumed epoch times the steps per epoch): the
    tracker labels each row with its own count, so a tracker of a resumed run built without
    ``start_step`` (count 0) wrote the measurement of step 11 as step 5 (and its epoch),
    replacing the recorded row, and one continuing its file (the last row's step) was off by
    the steps between that row and the checkpoint.

    Raises
    ------
    ValueError
        Naming ``track``, with the count expected and found, and how to build the tracker.
    """
    if tracker.model is not model:
        raise argument_error(
            "track",
            "a CurvatureTracker of the network being trained (build it on the model object "
            "passed as model=, or pass track as a mapping of its arguments)",
            f"a tracker of another model ({type(tracker.model).__name__})",
        )
    if tracker.count != start_step:
        raise argument_error(
            "track",
            f"a CurvatureTracker whose step count is the run's step when training starts, "
            f"{start_step} (it labels each row with its count); build it with "
            f"start_step={start_step} (with path= the run's curvature.jsonl to continue that "
            "file), or pass track as a mapping of its arguments",
            f"a tracker at step count {tracker.count}",
        )


def recorded_curvature(stats: StatsFile, upto_step: int) -> list[dict[str, Any]] | None:
    """The ``curvature`` rows of ``stats.json`` at steps up to ``upto_step`` (checksums
    verified), or ``None`` when it records none.

    The rows after it were measured on a branch that the resumed run abandons (a run
    continued from an earlier checkpoint): its steps are trained, and measured, again.
    """
    rows = _read_curvature(stats.path)
    if rows is None:
        return None
    kept = []
    for number, row in enumerate(rows, start=1):
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise CorruptFileError(
                f"File '{stats.path}', 'curvature' row {number}: no integer step ({step!r})."
            )
        if step <= upto_step:
            kept.append(row)
    return kept


def continue_curvature(run: TrainingRun, stats: StatsFile, start_step: int) -> StatsFile:
    """The resumed run's ``stats.json``, carrying on its recorded curvature rows up to
    ``start_step`` (:func:`recorded_curvature`).

    Untracked, the file keeps them (written as its ``curvature`` rows); tracked, the tracker
    takes in those it lacks (:meth:`CurvatureTracker.adopt_rows`: checked against its
    settings), so that ``stats.json`` and ``curvature.jsonl``, written from its rows, hold
    the whole curve once (a tracker built without the run's rows, ``path=None``, rewrote
    both with its new rows only).
    """
    recorded = recorded_curvature(stats, start_step)
    if run.tracker is None:
        return replace(stats, kept_curvature=recorded)
    if recorded:
        run.tracker.adopt_rows(recorded, source=stats.path)
    return stats


#: Keys of a ``track`` mapping that train_network fills itself.
_TRACK_OWN = frozenset({"model", "loss_fn", "data", "path", "start_step", "optimizer"})


def _make_tracker(
    track: CurvatureTracker | Mapping[str, Any] | None,
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset[Any] | None,
    out_dir: Path,
    *,
    start_step: int,
    optimizer: torch.optim.Optimizer,
    seed: int,
) -> CurvatureTracker | None:
    """``track`` as a tracker: as given, or built from its keyword arguments on the run.

    A mapping's tracker measures on the first ``samples`` (default 256) samples of
    ``dataset`` and writes ``out_dir / "curvature.jsonl"``, continued from ``start_step``.
    A tracker given as an object is checked (:func:`check_users_tracker`).
    """
    if track is None:
        return None
    if isinstance(track, CurvatureTracker):
        check_users_tracker(track, model, start_step)
        return track
    if not isinstance(track, Mapping):
        raise argument_error(
            "track", "a CurvatureTracker or a mapping of its arguments", track, kind=TypeError
        )
    import inspect

    kwargs = dict(track)
    accepted = set(inspect.signature(CurvatureTracker).parameters) - _TRACK_OWN
    unknown = sorted(set(kwargs) - accepted - {"samples"})
    if unknown:
        raise argument_error(
            "track", f"keys among {sorted(accepted | {'samples'})}", f"unknown keys {unknown}"
        )
    samples = check_positive_int("samples", kwargs.pop("samples", 256))
    assert dataset is not None
    subset = torch.utils.data.Subset(dataset, range(min(samples, len(cast(Any, dataset)))))
    loader = make_loader(subset, min(samples, 256), shuffle=False)
    kwargs.setdefault("seed", seed)
    return CurvatureTracker(
        model,
        loss_fn,
        loader,
        path=out_dir / CURVATURE_FILE,
        start_step=start_step,
        optimizer=optimizer,
        **kwargs,
    )
