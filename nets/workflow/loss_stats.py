r"""The paper's loss statistics of one or several checkpoints.

For every checkpoint, :func:`compute_loss_stats` evaluates the training split
(without augmentation) and the test split in eval mode (loss, accuracy in %),
and computes with :func:`curvops.stats.loss_stats` the minibatch statistics of
the training split cut into batches of ``batch_size``: loss mean and variance,
:math:`\|\bar g\|^2` and the gradient variance, and for the curvature
:math:`C` (Hessian or GGN) along a seeded unit direction :math:`z` (the same
for every checkpoint): :math:`\|\bar C z\|^2`, its variance over minibatches,
:math:`\mu = z^\top\bar C z`, :math:`\delta = \|\bar C z-\mu z\|^2` and
:math:`\alpha = \sqrt{\mathrm{Var}}/|\mu|` (definitions in :mod:`curvops.stats`),
a Hutchinson estimate of :math:`\|\bar C\|_F^2` and the weight norms.

File format (``save_path``, written atomically, ``allow_pickle=False``): one
entry per checkpoint, in the given order, for each key

=====================================================  ====================================
key                                                    content
=====================================================  ====================================
``loss_mean``, ``loss_var``, ``grad_mean_norm_sq``,    float64[K] (see above)
``grad_var``, ``hess_mean_norm_sq``, ``hess_var``,
``hess_mu``, ``delta``, ``alpha``
``frobenius_norm_sq``, ``frobenius_norm_sq_stderr``    float64[K] (NaN when not estimated)
``weight_norm_l2``, ``weight_norm_linf``               float64[K]
``train_loss``, ``train_acc``, ``test_loss``,          float64[K] (accuracy in %, NaN
``test_acc``                                           without labels or test split)
``epoch``                                              int64[K] (-1 when unknown)
``checkpoints``                                        str[K] paths (``''`` for a bare module)
``num_batches``, ``num_samples``                       int64[K]
``curvature``                                          str ``'hessian'`` or ``'ggn'``
``config_json``                                        str
=====================================================  ====================================
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from curvops.model_io import OutputFn, check_output_fn
from curvops.params import select_params
from curvops.stats import loss_stats
from nets.module_modes import evaluation_mode
from nets.workflow._resolve import (
    check_bn_mode,
    check_int,
    default_loss,
    is_writer,
    make_eval_loader,
    operator_group,
    parse_curvature,
    preserve_global_state,
    resolve_data,
    resolve_model,
    resolve_parallel,
    shard_loader,
    written,
)
from nets.workflow._resume import (
    describe_data,
    describe_loss,
    describe_model,
    describe_output_fn,
    describe_value,
    file_digest,
    open_state,
)
from nets.workflow.landscape import evaluate
from spectral.errors import argument_error
from spectral.io import save_npz

__all__ = ["STATS_KEYS", "compute_loss_stats", "stats_definitions"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: The float64[K] statistics of the paper, in file order.
STATS_KEYS = (
    "loss_mean",
    "loss_var",
    "grad_mean_norm_sq",
    "grad_var",
    "hess_mean_norm_sq",
    "hess_var",
    "hess_mu",
    "delta",
    "alpha",
    "frobenius_norm_sq",
    "frobenius_norm_sq_stderr",
    "weight_norm_l2",
    "weight_norm_linf",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
)


def _checkpoint_list(checkpoint_path: Any) -> list[PathLike | None]:
    if checkpoint_path is None:
        return [None]
    if isinstance(checkpoint_path, str | os.PathLike):
        return [checkpoint_path]
    if isinstance(checkpoint_path, Sequence) and checkpoint_path:
        paths = list(checkpoint_path)
        if all(isinstance(p, str | os.PathLike) for p in paths):
            return paths
    raise argument_error(
        "checkpoint_path", "a checkpoint path or a non-empty list of paths", checkpoint_path
    )


def stats_definitions(
    bn_mode: str | None, batch_size: int, subsample: int | float | None
) -> dict[str, str]:
    """What the losses of a statistics file are, in words (``config_json["definitions"]``).

    >>> print(stats_definitions("train", 128, None)["loss_mean"])  # doctest: +ELLIPSIS
    mean of the losses of minibatches of 128 of the training split ... BatchNorm in train mode ...
    """
    statistics = {
        "train": "BatchNorm in train mode (each minibatch's own statistics)",
        "eval": "BatchNorm in eval mode (running statistics)",
    }.get(str(bn_mode), "each module in its current mode")
    part = "" if subsample is None else f", subsample {subsample} drawn with the seed"
    moments = (
        f"of minibatches of {batch_size} of the training split (no augmentation{part}), "
        f"{statistics}"
    )
    evaluation = f"(no augmentation{part}), model in eval mode (BatchNorm running statistics)"
    return {
        "loss_mean": f"mean of the losses {moments}",
        "loss_var": f"variance of the losses {moments}",
        "train_loss": f"one full pass over the training split {evaluation}",
        "test_loss": f"one full pass over the test split {evaluation}",
    }


@dataclass(frozen=True)
class _StatsSettings:
    """The statistics' settings, as :func:`compute_loss_stats` received them (checked).

    One place for the two records of them: the resumable state's configuration
    (which a restarted run must match) and the output file's ``config_json``.
    """

    curvature: str
    bn_mode: str | None
    batch_size: int
    params: Any
    subsample: int | float | None
    frobenius_probes: int
    direction: Any
    seed: int
    output_fn: OutputFn | None = None

    def state_config(
        self, dataset: Any, data_path: PathLike | None, model: Any, paths: list[Any], loss: Any
    ) -> dict[str, Any]:
        """What a state file must match to be resumed: the data's contents
        (:func:`nets.workflow._resume.describe_data`), the model (a name, or a module's
        parameters and buffers), the checkpoints by their digest, the loss's full
        configuration (``loss_fn``) and every setting."""
        return {
            "dataset": describe_data(dataset),
            "data_path": None if data_path is None else os.fspath(data_path),
            "model": describe_model(model),
            "checkpoints": [file_digest(p) for p in paths],
            "batch_size": int(self.batch_size),
            "curvature": self.curvature,
            "bn_mode": self.bn_mode,
            "params": describe_value(self.params),
            "subsample": self.subsample,
            "frobenius_probes": int(self.frobenius_probes),
            "direction": describe_value(self.direction),
            "seed": int(self.seed),
            "loss_fn": describe_loss(loss),
            "output_fn": describe_output_fn(self.output_fn),
        }

    def output_config(
        self,
        dataset_name: str | None,
        data_path: PathLike | None,
        names: list[str | None],
        loss: Any,
    ) -> dict[str, Any]:
        """The output file's ``config_json`` (``names``: the checkpoints' model names)."""
        mode, batch_size, subsample = self.bn_mode, self.batch_size, self.subsample
        params, seed = self.params, self.seed
        shown = params if params is None or isinstance(params, list | tuple) else repr(params)
        return {
            "function": "compute_loss_stats",
            "model": names[0] if names else None,
            "dataset": dataset_name,
            "data_path": None if data_path is None else os.fspath(data_path),
            "curvature": self.curvature,
            "bn_mode": mode,
            "batch_size": int(batch_size),
            "subsample": subsample,
            "frobenius_probes": int(self.frobenius_probes),
            "direction": "given" if self.direction is not None else f"gaussian(seed={seed})",
            "params": shown,
            "seed": int(seed),
            "loss": type(loss).__name__,
            "accuracy_unit": "percent",
            "definitions": stats_definitions(mode, int(batch_size), subsample),
            "output_fn": describe_output_fn(self.output_fn),
        }


def compute_loss_stats(
    dataset: Any = "digits",
    data_path: PathLike | None = None,
    model: Any = None,
    checkpoint_path: PathLike | Sequence[PathLike] | None = None,
    save_path: PathLike | None = None,
    batch_size: int = 128,
    curvature_matrix: str = "hessian",
    *,
    bn_mode: str | None = "train",
    params: Any = None,
    subsample: int | float | None = None,
    frobenius_probes: int = 4,
    direction: Any = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    loss_fn: Callable[..., torch.Tensor] | None = None,
    progress: bool = False,
    state_path: PathLike | None = None,
    process_group: Any = None,
    output_fn: OutputFn | None = None,
) -> dict[str, Any]:
    """Loss, gradient and curvature statistics (and train/test metrics) of checkpoints.

    Parameters
    ----------
    dataset, data_path, model:
        As in :func:`nets.workflow.compute_eigenspectrum` (the caller's module is
        copied, never changed).
    checkpoint_path:
        One checkpoint, a list of them (one row each), or ``None`` with an
        ``nn.Module``.
    save_path:
        Output ``.npz`` (``None``: not written).
    batch_size:
        Minibatch size of the statistics (and of the evaluation).
    curvature_matrix:
        ``'hessian'`` or ``'ggn'`` (``'ggn-lanczos'``-style spellings accepted).
    bn_mode:
        BatchNorm mode of the statistics (``'train'``: batch statistics, as in
        the paper); the train/test metrics always use eval mode.
    params:
        Parameter subset of gradients, curvature and weight norms.
    subsample:
        Seeded subset (count or fraction) of each split.
    frobenius_probes:
        Rademacher probes of the :math:`\\|\\bar C\\|_F^2` estimate (0 skips it).
    direction:
        The unit direction :math:`z` (length :math:`P`); default Gaussian from ``seed``.
    seed, device, loss_fn, progress:
        Seed of ``z``, subsampling and probes; device; loss (cross-entropy by
        default); a progress bar over checkpoints.
    state_path:
        State file for resumable runs (:mod:`nets.workflow._resume`): the rows of
        finished checkpoints are saved there atomically after each checkpoint, and a
        restarted call with the same arguments (and unchanged checkpoint files)
        computes only the missing ones; a state of other data (its contents),
        another loss (any setting) or another model (a module's parameters and
        buffers) is refused (:class:`spectral.resume.StateMismatchError`).  ``None``:
        no state file.
    process_group:
        Under ``torchrun``: every rank takes its whole batches of each split, the
        statistics and metrics are summed over the group (one ``all_reduce`` per
        reduction), every rank returns the same values and only rank 0 writes
        ``save_path`` (``None``: the default group when ``torch.distributed`` is
        initialised; ``False``: each rank on its own; or a process group).
    output_fn:
        Which tensor of the model's output the loss takes, in the statistics and the
        train/test metrics alike, as for the curvature operators (see
        :mod:`curvops.model_io`): ``None`` for a tensor output, the ``logits`` of a
        dict or Hugging Face ``ModelOutput``, or the first item of a tuple; or a
        callable ``output -> tensor``.  Batches may hold tensor, tuple or dict inputs
        (see :func:`nets.workflow.landscape.evaluate`).

    Returns
    -------
    dict
        The file's arrays (module docstring).

    Raises
    ------
    ValueError, TypeError
        Bad arguments (e.g. ``curvature_matrix='fisher'``, ``batch_size < 1``).
    spectral.resume.StateMismatchError
        ``state_path`` holds the state of another configuration.

    Examples
    --------
    >>> import os, tempfile
    >>> from nets import build_loss_landscape, compute_eigenspectrum, get_model
    >>> out = tempfile.mkdtemp()
    >>> model = get_model("MLP", 10, 1, 8, hidden=(16,), seed=0)   # any nn.Module, or a name
    >>> stats = compute_loss_stats("digits", model=model, batch_size=512,
    ...                            save_path=os.path.join(out, "stats.npz"))
    >>> {"loss_mean", "grad_var", "hess_mu", "alpha"} <= set(stats)
    True
    """
    curvature = parse_curvature(curvature_matrix)
    if curvature not in ("hessian", "ggn"):
        raise argument_error(
            "curvature_matrix", "'hessian' or 'ggn' for the loss statistics", curvature_matrix
        )
    check_int("batch_size", batch_size, 1)
    check_int("frobenius_probes", frobenius_probes, 0)
    check_int("seed", seed, 0)
    mode = check_bn_mode(bn_mode)
    loss = default_loss(loss_fn)
    group, device = resolve_parallel(process_group, device)
    paths = _checkpoint_list(checkpoint_path)
    settings = _StatsSettings(
        curvature, mode, batch_size, params, subsample, frobenius_probes, direction, seed,
        check_output_fn(output_fn),
    )  # fmt: skip
    state = open_state(
        state_path,
        "compute_loss_stats",
        lambda: settings.state_config(dataset, data_path, model, paths, loss),
    )
    table = StatsTable.from_state(None if state is None else state.load(), len(paths))
    with preserve_global_state():
        data = resolve_data(dataset, data_path, seed=seed)
        loss = default_loss(loss_fn, data.task)  # the task's loss (language models)
        splits = stats_loaders(data, batch_size, subsample=subsample, seed=seed, group=group)
        with _progress(progress and is_writer(group), len(paths)) as bar:
            for index, path in enumerate(paths):
                if index >= len(table.epochs):  # else finished in an interrupted run
                    resolved = resolve_model(model, path, data, device=device, seed=seed)
                    stats = checkpoint_stats(
                        resolved.model, loss, splits, group=group, curvature=curvature,
                        direction=direction, seed=seed, frobenius_probes=frobenius_probes,
                        params=params, bn_mode=mode, output_fn=output_fn,
                    )  # fmt: skip
                    table.append(stats, resolved.epoch, resolved.name)
                    logger.info(
                        "%s: loss %.4g, |g|^2 %.4g, mu %.4g",
                        path,
                        stats["loss_mean"],
                        stats["grad_mean_norm_sq"],
                        stats["hess_mu"],
                    )
                    if state is not None:
                        state.save(table.arrays(), {"done": len(table.epochs)})
                if bar is not None:
                    bar.update()
    config = settings.output_config(data.name, data_path, table.names, loss)
    out = table.output(paths, curvature, config)
    if save_path is not None:
        _save(out, save_path, group)
    return out


@dataclass
class StatsTable:
    """The rows of :func:`compute_loss_stats`, one per finished checkpoint."""

    rows: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in STATS_KEYS})
    epochs: list[int] = field(default_factory=list)
    counts: dict[str, list[int]] = field(
        default_factory=lambda: {"num_batches": [], "num_samples": []}
    )
    names: list[str | None] = field(default_factory=list)

    @classmethod
    def from_state(cls, saved: Any, total: int) -> StatsTable:
        """The rows a resumable state holds (``saved``: its loaded state or ``None``)."""
        table = cls()
        if saved is None:
            return table
        done = int(saved.meta["done"])
        for key in STATS_KEYS:
            table.rows[key] = [float(v) for v in saved.arrays[key][:done]]
        table.epochs = [int(v) for v in saved.arrays["epoch"][:done]]
        for key in table.counts:
            table.counts[key] = [int(v) for v in saved.arrays[key][:done]]
        table.names = [str(v) or None for v in saved.arrays["model_names"][:done]]
        logger.info("resuming loss statistics after %d of %d checkpoints", done, total)
        return table

    def append(self, stats: dict[str, Any], epoch: int | None, name: str | None) -> None:
        """Add one checkpoint's row (``epoch = None`` is stored as ``-1``)."""
        self.names.append(name)
        for key in STATS_KEYS:
            self.rows[key].append(float(stats[key]))
        self.counts["num_batches"].append(int(stats["num_batches"]))
        self.counts["num_samples"].append(int(stats["num_samples"]))
        self.epochs.append(-1 if epoch is None else int(epoch))

    def arrays(self) -> dict[str, np.ndarray]:
        """The rows as the state file's arrays."""
        return {
            **{key: np.asarray(self.rows[key], dtype=np.float64) for key in STATS_KEYS},
            "epoch": np.asarray(self.epochs, dtype=np.int64),
            **{k: np.asarray(v, dtype=np.int64) for k, v in self.counts.items()},
            "model_names": np.asarray([n or "" for n in self.names], dtype=np.str_),
        }

    def output(self, paths: list[Any], curvature: str, config: dict[str, Any]) -> dict[str, Any]:
        """The arrays of the output file (module docstring)."""
        out: dict[str, Any] = {
            key: np.asarray(self.rows[key], dtype=np.float64) for key in STATS_KEYS
        }
        out["epoch"] = np.asarray(self.epochs, dtype=np.int64)
        out["checkpoints"] = np.asarray(
            ["" if p is None else os.fspath(p) for p in paths], dtype=np.str_
        )
        out["num_batches"] = np.asarray(self.counts["num_batches"], dtype=np.int64)
        out["num_samples"] = np.asarray(self.counts["num_samples"], dtype=np.int64)
        out["curvature"] = np.str_(curvature)
        out["config_json"] = np.str_(json.dumps(config, sort_keys=True, default=str))
        return out


@dataclass
class StatsLoaders:
    """The loaders of the statistics: all training batches, this rank's shard, the test shard."""

    train_all: Any
    train: Any
    test: Any


def stats_loaders(
    data: Any, batch_size: int, *, subsample: int | float | None, seed: int, group: Any
) -> StatsLoaders:
    """Evaluation loaders of the (subsampled) splits, sharded over ``group``."""
    train_all = make_eval_loader(data.train, batch_size, subsample=subsample, seed=seed)
    test = None
    if data.test is not None:
        test_all = make_eval_loader(data.test, batch_size, subsample=subsample, seed=seed)
        test = shard_loader(test_all, group, raw=True)
    return StatsLoaders(train_all, shard_loader(train_all, group, raw=True), test)


def check_direction(direction: Any, model: torch.nn.Module, params: Any) -> None:
    """Refuse a ``direction`` that is not a non-zero finite vector of one entry per selected
    parameter entry (``None`` is the seeded Gaussian direction).

    >>> check_direction([1.0, 0.0], torch.nn.Linear(1, 1), None)
    >>> check_direction([0.0, 0.0], torch.nn.Linear(1, 1), None)
    Traceback (most recent call last):
    ...
    ValueError: Argument 'direction': expected a non-zero finite vector...
    """
    if direction is None:
        return
    size = sum(p.numel() for _, p in select_params(model, params))
    try:
        z = torch.as_tensor(
            direction if isinstance(direction, torch.Tensor) else np.asarray(direction)
        )
        norm = float(z.detach().double().norm())
    except (TypeError, ValueError, RuntimeError) as exc:
        raise argument_error(
            "direction", f"a numeric vector of length {size}", direction, kind=TypeError
        ) from exc
    if tuple(z.shape) != (size,):
        raise argument_error(
            "direction", f"a vector of length {size} (the selected parameters)", direction
        )
    if not norm > 0 or not math.isfinite(norm):
        raise argument_error("direction", "a non-zero finite vector", direction)


def checkpoint_stats(
    model: torch.nn.Module,
    loss: Any,
    splits: StatsLoaders,
    *,
    group: Any,
    curvature: str,
    direction: Any,
    seed: int,
    frobenius_probes: int,
    params: Any,
    bn_mode: str | None,
    output_fn: OutputFn | None = None,
) -> dict[str, Any]:
    """One checkpoint's row: train/test loss and accuracy (eval mode) and the loss statistics
    (the loss taking the output ``output_fn`` selects, see :mod:`curvops.model_io`)."""
    check_direction(direction, model, params)
    with evaluation_mode(model):  # the statistics below: each module in its mode (bn_mode=None)
        train_loss, train_acc = evaluate(
            model, splits.train, loss, group=group, output_fn=output_fn
        )
        test_loss, test_acc = (
            (math.nan, math.nan)
            if splits.test is None
            else evaluate(model, splits.test, loss, group=group, output_fn=output_fn)
        )
    stats = loss_stats(
        model,
        loss,
        shard_loader(splits.train_all, group),
        curvature=curvature,
        z=direction,
        seed=seed,
        num_probes=frobenius_probes,
        params=params,
        bn_mode=bn_mode,
        process_group=operator_group(group),
        output_fn=output_fn,
    ).as_dict()
    stats.update(train_loss=train_loss, train_acc=train_acc, test_loss=test_loss, test_acc=test_acc)
    return stats


@contextlib.contextmanager
def _progress(show: bool, total: int) -> Iterator[Any]:
    """A tqdm bar over checkpoints when ``show`` (else ``None``), closed on exit."""
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="loss stats", unit="checkpoint")
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


def _save(out: dict[str, Any], save_path: PathLike, group: Any) -> None:
    text = os.fspath(save_path)
    target = text if text.endswith(".npz") else text + ".npz"
    if is_writer(group):
        save_npz(target, **out)
        logger.info("loss statistics written to %s", target)
    written(group)
