"""Turning the workflow functions' arguments into objects: model, data, loss, operator.

Every workflow function accepts names (``dataset='CIFAR100'``, ``model='VGG16'``,
``curvature_matrix='ggn-lanczos'``), objects (``nn.Module``, ``Dataset``,
``DataLoader``, ``DatasetSplits``, a loss module) and checkpoint paths; the
helpers here normalise them, validate scalars with messages that name the
argument, and guarantee that nothing the caller owns is changed (the model is
copied before it is moved or perturbed; the global random states of python,
numpy and torch are restored on exit).

>>> parse_curvature("GGN_Lanczos"), parse_curvature("hessian-lanczos")
('ggn', 'hessian')
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
    Subset,
)

from nets.measurement_settings import feed_hash
from nets.module_modes import evaluation_mode
from spectral.errors import argument_error

__all__ = [
    "CURVATURES",
    "ResolvedData",
    "ResolvedModel",
    "build_operator",
    "check_bn_mode",
    "check_int",
    "check_positive_float",
    "curvature_kind",
    "default_loss",
    "eigvec_file",
    "is_writer",
    "make_eval_loader",
    "model_fingerprint",
    "operator_group",
    "parse_curvature",
    "preserve_global_state",
    "resolve_data",
    "resolve_model",
    "resolve_parallel",
    "shard_loader",
    "spectrum_file",
    "state_digest",
    "subsample_dataset",
    "written",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Canonical curvature names and the spellings accepted for each (case, ``_``
#: and a ``lanczos`` prefix/suffix are ignored: ``'GGN_Lanczos'`` is ``'ggn'``).
CURVATURES: dict[str, tuple[str, ...]] = {
    "hessian": ("hessian", "hess", "h"),
    "ggn": ("ggn", "gn", "gauss-newton", "generalised-gauss-newton", "generalized-gauss-newton"),
    "fisher": ("fisher", "fisher-mc", "mc-fisher", "true-fisher"),
    "empirical-fisher": ("empirical-fisher", "fisher-empirical", "ef", "efisher"),
}


def parse_curvature(name: object, argument: str = "curvature_matrix") -> str:
    """Canonical curvature name: ``'hessian'``, ``'ggn'``, ``'fisher'`` or ``'empirical-fisher'``.

    >>> parse_curvature("Lanczos-GGN"), parse_curvature("fisher")
    ('ggn', 'fisher')

    Raises
    ------
    ValueError
        For an unknown name; the message lists the accepted ones.
    """
    if not isinstance(name, str):
        raise argument_error(argument, "a curvature name (str)", name, kind=TypeError)
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    for affix in ("lanczos-", "lanc-"):
        if key.startswith(affix):
            key = key[len(affix) :]
    for affix in ("-lanczos", "-lanc"):
        if key.endswith(affix):
            key = key[: -len(affix)]
    for canonical, spellings in CURVATURES.items():
        if key in spellings:
            return canonical
    accepted = sorted({s for spellings in CURVATURES.values() for s in spellings})
    raise argument_error(
        argument,
        f"one of {accepted} (any case, '_' or '-', optionally with a '-lanczos' suffix "
        "such as 'ggn-lanczos')",
        name,
    )


def curvature_kind(canonical: str) -> str:
    """Short label stored in files: ``'hessian'``, ``'ggn'`` or ``'fisher'``."""
    return "fisher" if canonical.endswith("fisher") else canonical


def build_operator(
    curvature: str,
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    data: Any,
    *,
    params: Any = None,
    bn_mode: str | None = "train",
    seed: int = 0,
    progress: bool = False,
    process_group: Any = None,
    output_fn: Any = None,
) -> Any:
    """The ``curvops`` operator of a canonical ``curvature`` name (see :func:`parse_curvature`).

    ``process_group`` (see :mod:`curvops.distributed`) and ``output_fn`` (the model
    output the loss takes, see :mod:`curvops.model_io`) are passed to the operator.
    """
    from curvops.fisher import FisherOperator
    from curvops.ggn import GGNOperator
    from curvops.hessian import HessianOperator

    common: dict[str, Any] = {
        "params": params,
        "bn_mode": bn_mode,
        "progress": progress,
        "process_group": process_group,
        "output_fn": output_fn,
    }
    if curvature == "hessian":
        return HessianOperator(model, loss_fn, data, **common)
    if curvature == "ggn":
        return GGNOperator(model, loss_fn, data, **common)
    kind = "empirical" if curvature == "empirical-fisher" else "mc"
    return FisherOperator(model, loss_fn, data, kind=kind, seed=seed, **common)


# ---------------------------------------------------------------------------- distributed


def resolve_parallel(process_group: Any, device: Any) -> tuple[Any, Any]:
    """``(group, device)`` of a workflow call under ``torch.distributed``.

    ``group`` is the process group products and metrics are reduced over, ``None``
    for a single-process computation (see :func:`curvops.distributed.resolve_group`:
    ``process_group=None`` takes the default group of an initialised job, ``False``
    keeps every rank on its own).  In a distributed job ``device='auto'`` becomes
    this process's device (``cuda:LOCAL_RANK`` or the CPU).
    """
    from curvops.distributed import local_device, resolve_group

    group = resolve_group(process_group)
    if group is not None and isinstance(device, str) and device == "auto":
        device = local_device()
    return group, device


def shard_loader(loader: Any, group: Any, *, raw: bool = False) -> Any:
    """This rank's whole batches of ``loader`` (``loader`` itself when ``group`` is None).

    Returns a :class:`curvops.distributed.ShardedData` for the curvature operators,
    or with ``raw=True`` the loader of this rank's batches (for evaluation loops).
    """
    if group is None:
        return loader
    from curvops.distributed import get_rank, get_world_size, shard_batches

    shard = shard_batches(loader, get_rank(group), get_world_size(group))
    return shard.source if raw else shard


def operator_group(group: Any) -> Any:
    """The ``process_group`` argument for curvops: ``group``, or ``False`` (no communication)."""
    return False if group is None else group


def is_writer(group: Any) -> bool:
    """Whether this process writes files: rank 0 of ``group`` (every process when None)."""
    if group is None:
        return True
    from curvops.distributed import get_rank

    return get_rank(group) == 0


def written(group: Any) -> None:
    """Barrier after rank 0 wrote a file, so every rank may read it on return."""
    if group is not None:
        torch.distributed.barrier(group=group)


# ---------------------------------------------------------------------------- checks


def check_int(name: str, value: object, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``, or a ``ValueError``/``TypeError`` naming it.

    >>> check_int("n_points", 21, 2)
    21
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise argument_error(name, "an integer", value, kind=TypeError)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"{minimum} <= {name}" + (f" <= {maximum}" if maximum is not None else "")
        raise argument_error(name, f"an integer with {bound}", value)
    return int(value)


def check_positive_float(name: str, value: object) -> float:
    """``value`` as a finite float > 0, or an error naming ``name``.

    >>> check_positive_float("dist", 1)
    1.0
    """
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise argument_error(name, "a positive finite number", value, kind=TypeError)
    if not (math.isfinite(float(value)) and float(value) > 0):
        raise argument_error(name, "a positive finite number", value)
    return float(value)


def check_bn_mode(bn_mode: object) -> str | None:
    """``'train'``, ``'eval'`` or ``None`` (keep each module's mode)."""
    if bn_mode is None:
        return None
    if isinstance(bn_mode, str) and bn_mode.lower() in ("train", "eval"):
        return bn_mode.lower()
    raise argument_error("bn_mode", "'train', 'eval' or None", bn_mode)


# ---------------------------------------------------------------------------- state


@contextlib.contextmanager
def preserve_global_state() -> Iterator[None]:
    """Restore python's, numpy's and torch's (CPU and CUDA) global random states on exit.

    The workflow never draws from them on purpose; this guards against third
    parties (e.g. a user's ``DataLoader`` without a generator draws its base
    seed from torch's global generator).

    >>> import random
    >>> state = random.getstate()
    >>> with preserve_global_state():
    ...     _ = random.random()
    >>> random.getstate() == state
    True
    """
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (saved, never drawn from)
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def model_fingerprint(model: nn.Module, names: Sequence[str] | None = None) -> str:
    """sha256 over the names, shapes, dtypes and values of the selected parameters.

    ``names=None`` selects the trainable parameters.  Values are hashed as
    stored (host copy of the raw bytes), so a model loaded from the same
    checkpoint has the same fingerprint on any device.

    >>> net = torch.nn.Linear(2, 1)
    >>> model_fingerprint(net) == model_fingerprint(copy.deepcopy(net))
    True
    """
    named = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in named.items() if p.requires_grad]
    digest = hashlib.sha256()
    for n in names:
        p = named[n].detach()
        digest.update(f"{n}|{tuple(p.shape)}|{p.dtype}|".encode())
        digest.update(p.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_digest(model: nn.Module) -> str:
    """``'sha256:<hex>'`` over everything of a model that its outputs depend on.

    Every parameter (name, shape, dtype, ``requires_grad``, bytes) and every buffer
    (BatchNorm running statistics and counters, non-persistent buffers too), in
    ``named_parameters``/``named_buffers`` order, and the train/eval mode of every
    module.  Unlike :func:`model_fingerprint` (the selected parameters only, which a
    spectrum file records for its Ritz vectors) it sees a change of the BatchNorm
    statistics; the resumable state files record it.

    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> before = state_digest(net)
    >>> with torch.no_grad():
    ...     _ = net[1].running_mean.add_(1.0)
    >>> state_digest(net) == before, model_fingerprint(net) == model_fingerprint(net)
    (False, True)
    """
    digest = hashlib.sha256()
    entries: list[tuple[str, torch.Tensor]] = [
        (f"parameter {n} {p.requires_grad}", p) for n, p in model.named_parameters()
    ]
    entries += [(f"buffer {n}", b) for n, b in model.named_buffers()]
    for label, tensor in entries:
        digest.update(f"{label}|".encode())
        feed_hash(digest, tensor)  # dtype, shape and bytes
    digest.update(repr([m.training for m in model.modules()]).encode())
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------- files


def spectrum_file(path: PathLike) -> Path:
    """The spectrum file of ``path``: ``.npz`` appended unless already there.

    >>> str(spectrum_file("spectra/spectrum-00100-ggn-lanczos"))
    'spectra/spectrum-00100-ggn-lanczos.npz'
    """
    text = os.fspath(path)
    return Path(text if text.endswith(".npz") else text + ".npz")


def eigvec_file(path: PathLike) -> Path:
    """The Ritz-vector file beside a spectrum: same stem + ``-eigvec.npz``.

    >>> str(eigvec_file("s/spectrum-100-hessian.npz")), str(eigvec_file("s/spectrum-100-hessian"))
    ('s/spectrum-100-hessian-eigvec.npz', 's/spectrum-100-hessian-eigvec.npz')
    """
    text = os.fspath(spectrum_file(path))
    return Path(text[: -len(".npz")] + "-eigvec.npz")


# ---------------------------------------------------------------------------- data


@dataclass
class ResolvedData:
    """Evaluation data: ``train`` (no augmentation) and optional ``test``, plus metadata."""

    name: str | None
    train: Dataset[Any] | DataLoader[Any]
    test: Dataset[Any] | DataLoader[Any] | None
    num_classes: int | None = None
    in_channels: int | None = None
    input_size: int | None = None
    task: str = "classification"


def _is_data(obj: object) -> bool:
    return isinstance(obj, Dataset | DataLoader)


def resolve_data(dataset: Any, data_path: PathLike | None = None, *, seed: int = 0) -> ResolvedData:
    """Normalise ``dataset``: a name, a ``DatasetSplits``, a ``Dataset``/``DataLoader``,
    or a pair ``(train, test)`` of them.

    A name is loaded with :func:`nets.data.load_dataset` from ``data_path``; the
    training split used is ``train_eval`` (no augmentation).
    """
    from nets.data import load_dataset

    if isinstance(dataset, str):
        dataset = load_dataset(dataset, data_path, seed=seed)
    if hasattr(dataset, "train_eval") and hasattr(dataset, "test"):
        return ResolvedData(
            name=getattr(dataset, "name", None),
            train=dataset.train_eval,
            test=dataset.test,
            num_classes=getattr(dataset, "num_classes", None),
            in_channels=getattr(dataset, "in_channels", None),
            input_size=getattr(dataset, "input_size", None),
            task=getattr(dataset, "task", "classification"),
        )
    if _is_data(dataset):
        return ResolvedData(name=None, train=dataset, test=None)
    if (
        isinstance(dataset, tuple | list)
        and len(dataset) == 2
        and _is_data(dataset[0])
        and (dataset[1] is None or _is_data(dataset[1]))
    ):
        return ResolvedData(name=None, train=dataset[0], test=dataset[1])
    raise argument_error(
        "dataset",
        "a dataset name (e.g. 'digits', 'CIFAR100'), a DatasetSplits, a torch Dataset or "
        "DataLoader, or a (train, test) pair of them",
        dataset,
        kind=TypeError,
    )


def subsample_dataset(dataset: Dataset[Any], subsample: int | float | None, seed: int) -> Any:
    """A seeded subset: ``subsample`` samples (int) or that fraction (float in (0, 1]).

    Indices are drawn without replacement with ``numpy.random.default_rng(seed)``
    and kept in increasing order.
    """
    if subsample is None:
        return dataset
    n = len(dataset)  # type: ignore[arg-type]
    if isinstance(subsample, bool) or not isinstance(
        subsample, int | float | np.integer | np.floating
    ):
        raise argument_error(
            "subsample", "None, a sample count or a fraction in (0, 1]", subsample, kind=TypeError
        )
    if isinstance(subsample, int | np.integer):
        size = int(subsample)
        if not 1 <= size <= n:
            raise argument_error("subsample", f"a sample count between 1 and {n}", subsample)
    else:
        if not 0.0 < float(subsample) <= 1.0:
            raise argument_error("subsample", "a fraction in (0, 1]", subsample)
        size = max(1, round(float(subsample) * n))
    if size == n:
        return dataset
    rng = np.random.default_rng([int(seed), 7])
    indices = np.sort(rng.choice(n, size=size, replace=False))
    return Subset(dataset, indices.tolist())


def _one_pass(loader: DataLoader[Any]) -> bool:
    """Whether ``loader`` yields each sample of its dataset once, in index order: a
    sequential sampler, batched by torch's ``BatchSampler`` without ``drop_last`` (or
    no automatic batching: each item a batch)."""
    if not isinstance(loader.sampler, SequentialSampler):
        return False
    batches = loader.batch_sampler
    return batches is None or (type(batches) is BatchSampler and not batches.drop_last)


def _sequential_loader(
    loader: DataLoader[Any], dataset: Any, batch_size: int | None
) -> DataLoader[Any]:
    """A loader over ``dataset`` with ``loader``'s ``collate_fn`` and worker settings,
    ``batch_size`` per batch, in index order, the last batch kept."""
    options: dict[str, Any] = {
        "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
    }
    if loader.num_workers > 0:
        options["multiprocessing_context"] = loader.multiprocessing_context
        options["prefetch_factor"] = loader.prefetch_factor
        options["persistent_workers"] = loader.persistent_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **options)


def make_eval_loader(
    data: Dataset[Any] | DataLoader[Any],
    batch_size: int,
    *,
    subsample: int | float | None = None,
    seed: int = 0,
) -> DataLoader[Any]:
    """A deterministic loader making one sequential pass over ``data`` (or over its
    seeded ``subsample``, see :func:`subsample_dataset`).

    A ``Dataset`` gets a new unshuffled loader of ``batch_size``.  A given
    ``DataLoader`` is returned as it is when it already makes one pass over its dataset
    in index order (a sequential sampler, no ``drop_last``) and no subsample is asked
    for.  Otherwise (a shuffled loader, ``drop_last=True``, another sampler or batch
    sampler, a subsample) a loader over its dataset is built: the loader's batch size
    (``batch_size`` when it has none, as with a custom ``batch_sampler``; no automatic
    batching stays so), its ``collate_fn`` (a collate that pads each batch to its own
    length still does) and worker settings, no shuffling and the last batch kept; the
    rebuild is logged (``logging.info``).  A shuffled loader was used as it was: every
    evaluation saw another order (with ``drop_last``, another subset), so one landscape
    direction evaluated twice gave two losses, neither the split's.  A loader of an
    ``IterableDataset`` is used as it is (it has no sampler to replace).
    """
    from nets.data import make_loader

    if isinstance(data, DataLoader):
        if isinstance(data.dataset, IterableDataset):
            if subsample is not None:
                raise argument_error(
                    "subsample", "None for a loader of an IterableDataset", subsample
                )
            return data
        if subsample is None and _one_pass(data):
            return data
        bs = data.batch_size
        if bs is None and data.batch_sampler is not None:  # a custom batch sampler
            bs = batch_size
        logger.info(
            "evaluation data: a DataLoader that does not make one sequential pass over its "
            "dataset (sampler %s, drop_last=%s) or a subsample: rebuilt as one sequential "
            "pass in batches of %s (same collate_fn)",
            type(data.sampler).__name__, data.drop_last, bs,
        )  # fmt: skip
        subset = subsample_dataset(data.dataset, subsample, seed)
        return _sequential_loader(data, subset, bs)
    if len(data) == 0:  # type: ignore[arg-type]
        raise argument_error("dataset", "a non-empty dataset", data)
    return make_loader(subsample_dataset(data, subsample, seed), batch_size, shuffle=False)


def default_loss(
    loss_fn: Callable[..., torch.Tensor] | None, task: str = "classification"
) -> Callable[..., torch.Tensor]:
    """``loss_fn`` or the task's loss: ``nn.CrossEntropyLoss()``, or next-token
    cross-entropy over ``(B, T, V)`` logits for ``task="language_modeling"``
    (:func:`curvops.losses.sequence_cross_entropy`); refuses ``reduction='none'``/``'sum'``."""
    if loss_fn is None and task == "language_modeling":
        from curvops.losses import sequence_cross_entropy

        return sequence_cross_entropy()
    if loss_fn is None:
        return nn.CrossEntropyLoss()
    if not callable(loss_fn):
        raise argument_error("loss_fn", "a loss module or callable", loss_fn, kind=TypeError)
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction != "mean":
        raise argument_error("loss_fn", "a loss with reduction='mean'", loss_fn)
    return loss_fn


# ---------------------------------------------------------------------------- model


@dataclass
class ResolvedModel:
    """A working model (never the caller's object when it would be changed) and its origin."""

    model: nn.Module
    name: str | None
    checkpoint_path: str | None = None
    epoch: int | None = None
    config: dict[str, Any] = field(default_factory=dict)


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def _infer_shape(data: ResolvedData) -> tuple[int, int]:
    """(in_channels, input_size) from the first training sample."""
    if data.in_channels is not None and data.input_size is not None:
        return int(data.in_channels), int(data.input_size)
    source = data.train.dataset if isinstance(data.train, DataLoader) else data.train
    x = source[0][0]
    if x.dim() == 3:
        return int(x.shape[0]), int(x.shape[-1])
    return int(x.numel()), 1


def _infer_num_classes(data: ResolvedData) -> int:
    """``data.num_classes``, else 1 + the largest integer label of the training data."""
    if data.num_classes is not None:
        return int(data.num_classes)
    source = data.train.dataset if isinstance(data.train, DataLoader) else data.train
    targets = getattr(source, "targets", None)
    if isinstance(targets, torch.Tensor) and not targets.is_floating_point():
        return int(targets.max().item()) + 1
    raise argument_error(
        "dataset",
        "a DatasetSplits or a dataset with integer 'targets' (to size a model built by name), "
        "or pass an nn.Module",
        data.train,
    )


def resolve_model(
    model: Any,
    checkpoint_path: PathLike | None,
    data: ResolvedData | None,
    *,
    device: str | torch.device = "auto",
    seed: int = 0,
    copy_module: bool = True,
) -> ResolvedModel:
    """Build the working model from a name, an ``nn.Module`` or a checkpoint's config.

    * ``nn.Module``: deep-copied (when ``copy_module`` or it must move device)
      and, with ``checkpoint_path``, loaded with the checkpoint's weights;
    * name: built with :func:`nets.models.get_model` (``seed``) for the data's
      classes/shape, or the checkpoint's config (which must name the same
      architecture), then loaded with the weights;
    * ``None``: rebuilt from the checkpoint's config.

    ``device='auto'`` keeps an ``nn.Module`` on its own device.  A copy of a given
    module keeps each submodule's mode (``bn_mode=None``, "each module's mode", means
    the caller's modes; a copy switched to eval mode measured eval-mode BatchNorm for a
    module in train mode whenever a checkpoint or a copy was involved: 0.87 instead of
    5.0 for a top eigenvalue); a built model is in eval mode.  Evaluations put the model
    in eval mode themselves (:func:`evaluation_mode`).
    """
    from nets.checkpoint import load_checkpoint, load_model_state

    ckpt = None
    if checkpoint_path is not None:
        if not isinstance(checkpoint_path, str | os.PathLike):
            raise argument_error("checkpoint_path", "a file path", checkpoint_path, kind=TypeError)
        ckpt = load_checkpoint(checkpoint_path)
    config = dict(ckpt.get("config") or {}) if ckpt is not None else {}

    if isinstance(model, nn.Module):
        from curvops.distributed import unwrap_model

        model = unwrap_model(model)  # a DistributedDataParallel wrapper: use its module
        work, name, target = _working_copy(model, device, copy_module or ckpt is not None)
    elif model is None or isinstance(model, str):
        work, name, target = _built_model(model, ckpt, config, data, checkpoint_path, seed, device)
    else:
        raise argument_error("model", "a model name, an nn.Module or None", model, kind=TypeError)
    if ckpt is not None:
        load_model_state(work, ckpt)
    if work is not model:  # never change the mode or device of the caller's module
        work.to(target)
        with evaluation_mode(work):  # train-mode BatchNorm would update its statistics
            if ckpt is not None and data is not None:
                _check_inputs_fit(work, data, config, checkpoint_path)
        if not isinstance(model, nn.Module):
            work.eval()
    epoch = ckpt.get("epoch") if ckpt is not None else None
    return ResolvedModel(
        model=work,
        name=name,
        checkpoint_path=None if checkpoint_path is None else os.fspath(checkpoint_path),
        epoch=None if epoch is None else int(epoch),
        config=config,
    )


def _check_inputs_fit(
    model: nn.Module, data: ResolvedData, config: dict[str, Any], checkpoint_path: Any
) -> None:
    """Refuse a dataset whose samples the checkpoint's model cannot take (one forward pass
    of one sample, in eval mode, on the working copy): a digits MLP given byte tokens
    raised PyTorch's bare dtype error from deep inside the analysis.  The sample's inputs
    take the forms of :mod:`nets.workflow._forward` (a tensor, a tuple of positional or a
    mapping of keyword inputs), moved and cast as the operators do."""
    from curvops.data import move_to
    from nets.workflow._forward import call_model

    def one(value: Any) -> Any:  # a batch of one sample
        if isinstance(value, Mapping):
            return {k: one(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return type(value)(one(v) for v in value)
        return torch.as_tensor(value).unsqueeze(0)

    try:
        first = next(iter(model.parameters()))
        inputs = move_to(one(cast(Any, data.train)[0][0]), first.device, first.dtype)
    except Exception:  # an unusual dataset or a parameterless model: nothing to check
        return
    try:
        with torch.no_grad():
            call_model(model, inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        trained = config.get("dataset", "another dataset")
        raise argument_error(
            "dataset",
            f"data the model of checkpoint '{checkpoint_path}' (trained on {trained!r}) can take",
            f"{getattr(data, 'name', data)!r}, on whose samples its forward pass fails "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]})",
        ) from exc


def _working_copy(
    model: nn.Module, device: Any, must_copy: bool
) -> tuple[nn.Module, str, torch.device]:
    """``(working model, name, target device)`` for a given module.

    ``device='auto'`` (or ``None``) keeps the module's own device; the module is
    deep-copied when ``must_copy`` (a copy was asked for, or weights will be loaded)
    or it must move, so the caller's module is never changed.
    """
    from nets.device import resolve_device
    from nets.models import model_spec

    auto = device is None or (isinstance(device, str) and device.lower() == "auto")
    target = _model_device(model) if auto else resolve_device(device)
    must_copy = must_copy or target != _model_device(model)
    work = copy.deepcopy(model) if must_copy else model
    spec = model_spec(model) or {}
    name = spec.get("model") or type(model).__name__
    return work, name, target


def _built_model(
    model: str | None,
    ckpt: dict[str, Any] | None,
    config: dict[str, Any],
    data: Any,
    checkpoint_path: Any,
    seed: int,
    device: Any,
) -> tuple[nn.Module, str, torch.device]:
    """``(new model, name, target device)`` from a name and/or a checkpoint's config.

    A checkpoint's config (which must name the same architecture as ``model``)
    decides the constructor arguments; without one the data's classes and shape do,
    with ``seed``.
    """
    from nets.device import resolve_device
    from nets.models import canonical_model_name, get_model

    target = resolve_device(device)
    if model is None and ckpt is None:
        raise argument_error(
            "model",
            "a model name or nn.Module (or a checkpoint_path whose config names one)",
            None,
        )
    name = canonical_model_name(model) if isinstance(model, str) else None
    saved = config.get("model")
    if name is not None and isinstance(saved, str) and canonical_model_name(saved) != name:
        raise argument_error(
            "checkpoint_path", f"a checkpoint of a {name} model", f"{checkpoint_path} ({saved})"
        )
    if isinstance(saved, str):
        name = canonical_model_name(saved)
        work = get_model(
            name,
            num_classes=int(config.get("num_classes", 10)),
            in_channels=int(config.get("in_channels", 3)),
            input_size=int(config.get("input_size", 32)),
            seed=int(config.get("model_seed", seed)),
            **dict(config.get("model_kwargs") or {}),
        )
    elif name is not None:
        num_classes = _infer_num_classes(data) if data is not None else 10
        in_channels, input_size = _infer_shape(data) if data is not None else (3, 32)
        work = get_model(
            name,
            num_classes=num_classes,
            in_channels=in_channels,
            input_size=input_size,
            seed=seed,
        )
    else:
        raise argument_error(
            "model",
            "a model name or nn.Module (the checkpoint's config names no registered model)",
            None,
        )
    return work, name, target
