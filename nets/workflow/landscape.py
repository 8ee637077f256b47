r"""Loss landscapes: loss and accuracy along directions and on planes around a checkpoint.

For a checkpoint :math:`\theta_0`, a direction :math:`d` and
:math:`t\in[-\text{dist},\text{dist}]` (``n_points`` evenly spaced values,
symmetric, :math:`t=0` exactly when ``n_points`` is odd) the landscape records
:math:`L(\theta_0+t\,d)` and the accuracy on the training split (without
augmentation) and the test split; a plane spanned by :math:`d_a, d_b` records
:math:`L(\theta_0+s\,d_a+t\,d_b)` on the ``n_points x n_points`` grid.  The
model is evaluated in eval mode, on one sequential pass over each split (a
shuffled or ``drop_last`` DataLoader is rebuilt as one, see
:func:`nets.workflow._resolve.make_eval_loader`); with ``refresh_bn=True`` the
BatchNorm running statistics are recomputed on the training split at every
perturbed point: the exact mean and unbiased variance of each module's inputs over
one pass, the batches forwarded in train mode (:func:`_refresh_bn`).  At
:math:`t=0` the checkpoint's own statistics are used, so :math:`t=0` always
reproduces the checkpoint's loss.

Directions (see :mod:`nets.workflow.directions`): Ritz vectors of a spectrum
saved with ``save_eigvec=True`` (``'ritz-top'``, ``'ritz-bottom'``,
``'ritz-min-abs'``), unit-norm random directions, filter-normalised directions
(Li et al., 2017), or user vectors of length :math:`P`.

File format (``save_path``, written atomically, ``allow_pickle=False``):

==========================  ======================================================
key                         content
==========================  ======================================================
``t``                       float64[n_points] in ``[-dist, dist]``
``direction_names``         str[d] (``'ritz-top-1'``, ``'random-1'``, ...)
``direction_values``        float64[d] Ritz value, NaN for other directions
``train_loss``, ``train_acc``, ``test_loss``, ``test_acc``
                            float64[d, n_points] (accuracy in %, NaN without
                            class labels or without a test split)
``plane_names``             str[q] ``'a|b'`` (only with planes)
``plane_train_loss`` ...    float64[q, n_points, n_points]; entry [i, j] is at
                            :math:`s=t_i` along ``a`` and :math:`t=t_j` along ``b``
``checkpoint_loss``         float64: training loss at :math:`\theta_0`
``checkpoint_acc``          float64: training accuracy at :math:`\theta_0`
``config_json``             str; ``model_fingerprint`` str
==========================  ======================================================
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from curvops.data import move_to
from curvops.losses import counted_mask
from curvops.model_io import OutputFn, check_output_fn
from nets.batchnorm_statistics import batchnorm_modules, refresh_batchnorm
from nets.loss_means import LossMean
from nets.workflow._forward import batch_pair, model_output
from nets.workflow._resolve import (
    check_int,
    check_positive_float,
    default_loss,
    eigvec_file,
    is_writer,
    make_eval_loader,
    model_fingerprint,
    preserve_global_state,
    resolve_data,
    resolve_model,
    resolve_parallel,
    shard_loader,
    state_digest,
    written,
)
from nets.workflow._resume import (
    describe_data,
    describe_loss,
    describe_output_fn,
    describe_value,
    file_digest,
    open_state,
)
from nets.workflow.directions import (
    Direction,
    ParamSpace,
    eigvec_space,
    filter_normalised_directions,
    parse_planes,
    parse_ritz_spec,
    random_directions,
    ritz_directions,
)
from nets.workflow.spectrum import check_pair
from spectral.errors import NumericalError, argument_error
from spectral.io import load_npz, save_npz
from spectral.resume import Checkpoint

__all__ = [
    "LandscapeResult",
    "build_loss_landscape",
    "direction_normalisation",
    "evaluate",
    "landscape_definitions",
    "landscape_grid",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def landscape_grid(dist: float, n_points: int) -> np.ndarray:
    """``n_points`` symmetric values in ``[-dist, dist]`` (exactly 0 in the middle when odd).

    >>> landscape_grid(1.0, 5).tolist()
    [-1.0, -0.5, 0.0, 0.5, 1.0]
    """
    d = check_positive_float("dist", dist)
    n = check_int("n_points", n_points, 2)
    i = np.arange(n, dtype=np.float64)
    return d * (2.0 * i - (n - 1)) / (n - 1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[..., torch.Tensor],
    *,
    group: Any = None,
    output_fn: OutputFn | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy (%) of ``model`` over ``loader``.

    Batches are ``(inputs, targets)`` in the forms the curvature operators take
    (:mod:`nets.workflow._forward`): tensor, positional tuple or keyword mapping
    inputs (a Hugging Face model's ``{"input_ids", "attention_mask"}``), and the loss
    takes the output tensor :func:`curvops.model_io.select_output` chooses (the
    ``logits`` of a dict or ``ModelOutput``, the first item of a tuple, or
    ``output_fn(output)``).

    Each batch's mean loss is weighted by the loss's own normaliser
    (:class:`nets.loss_means.LossMean`: its counted targets for cross-entropy with
    ``ignore_index`` padding), so the result is the loss over all of ``loader``; the
    accuracy counts the targets the loss counts.  Accuracy is NaN when targets are not
    class labels.  The model is used as it is (call ``model.eval()`` first for evaluation
    mode).  With a ``torch.distributed`` ``group`` each rank evaluates its own shard and
    the sums (loss, weight, correct, count) are added over the group in one
    ``all_reduce``; ``None``: this process only.

    Raises
    ------
    spectral.errors.NumericalError
        If a counted batch's loss is NaN/Inf (names the batch).
    ValueError, TypeError
        A batch that is not ``(inputs, targets)`` (names ``dataset (batch i)``), an
        ``output_fn`` that is not callable or a model output without a tensor to take.

    >>> class Net(torch.nn.Module):  # keyword inputs, a dict output
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.bias = torch.nn.Parameter(torch.tensor([2.0, 0.0]))
    ...     def forward(self, x, scale):
    ...         return {"features": x, "logits": scale * x + self.bias}
    >>> batch = ({"x": torch.zeros(4, 2), "scale": torch.ones(4, 1)}, torch.tensor([0, 0, 0, 1]))
    >>> loss, acc = evaluate(Net(), [batch], torch.nn.CrossEntropyLoss())
    >>> acc
    75.0
    """
    output_fn = check_output_fn(output_fn)
    first = next(iter(model.parameters()))
    device, dtype = first.device, first.dtype
    mean = LossMean(loss_fn, device)
    correct = 0
    count = 0
    classification = True
    for index, batch in enumerate(loader):
        x, y = batch_pair(batch, index)
        x, y = move_to(x, device, dtype), move_to(y, device, dtype)
        out = model_output(model, x, output_fn)
        loss = loss_fn(out, y)
        weight = float(mean.add(loss, x, y, int(y.shape[0])))
        value = float(loss)
        if weight > 0 and not math.isfinite(value):
            raise NumericalError(f"evaluate: the loss of batch {index} is {value}.")
        if classification and out.ndim == 2 and y.ndim == 1 and not y.is_floating_point():
            counted = counted_mask(loss_fn, y)
            correct += int(((out.argmax(dim=1) == y) & counted).sum())
            count += int(counted.sum())
        else:
            classification = False
    sums = torch.stack(
        [
            mean.total,
            mean.weight,
            torch.tensor(float(correct), dtype=torch.float64, device=device),
            torch.tensor(float(count), dtype=torch.float64, device=device),
            torch.tensor(0.0 if classification else 1.0, dtype=torch.float64, device=device),
        ]
    )
    if group is not None:
        torch.distributed.all_reduce(sums, group=group)
    total, weight, hits, counted_total = (float(v) for v in sums[:4])
    classification = float(sums[4]) == 0.0
    if weight <= 0 and not (classification and counted_total > 0):
        raise argument_error("dataset", "a non-empty evaluation set", loader)
    accuracy = 100.0 * hits / counted_total if classification and counted_total > 0 else math.nan
    return (total / weight if weight > 0 else math.nan), accuracy


def _refresh_bn(model: nn.Module, loader: DataLoader[Any], group: Any = None) -> None:
    """:func:`nets.batchnorm_statistics.refresh_batchnorm` over the inputs of ``loader``'s
    batches (in the forms of :func:`evaluate`), the BatchNorm modules left in eval mode."""
    batches = (batch_pair(batch, index)[0] for index, batch in enumerate(loader))
    refresh_batchnorm(model, batches, group)
    for m in batchnorm_modules(model):
        m.eval()


@dataclass
class LandscapeResult:
    """Landscape arrays (see the module docstring for the file keys)."""

    t: np.ndarray
    direction_names: list[str]
    direction_values: np.ndarray
    train_loss: np.ndarray
    train_acc: np.ndarray
    test_loss: np.ndarray
    test_acc: np.ndarray
    checkpoint_loss: float
    checkpoint_acc: float
    model_fingerprint: str
    config: dict[str, Any] = field(default_factory=dict)
    plane_names: list[str] = field(default_factory=list)
    plane_train_loss: np.ndarray | None = None
    plane_train_acc: np.ndarray | None = None
    plane_test_loss: np.ndarray | None = None
    plane_test_acc: np.ndarray | None = None
    path: Path | None = None

    def to_arrays(self) -> dict[str, Any]:
        """The file's arrays."""
        arrays: dict[str, Any] = {
            "t": np.asarray(self.t, dtype=np.float64),
            "direction_names": np.asarray(self.direction_names, dtype=np.str_),
            "direction_values": np.asarray(self.direction_values, dtype=np.float64),
            "train_loss": np.asarray(self.train_loss, dtype=np.float64),
            "train_acc": np.asarray(self.train_acc, dtype=np.float64),
            "test_loss": np.asarray(self.test_loss, dtype=np.float64),
            "test_acc": np.asarray(self.test_acc, dtype=np.float64),
            "checkpoint_loss": np.float64(self.checkpoint_loss),
            "checkpoint_acc": np.float64(self.checkpoint_acc),
            "config_json": np.str_(json.dumps(self.config, sort_keys=True)),
            "model_fingerprint": np.str_(self.model_fingerprint),
        }
        if self.plane_names:
            arrays["plane_names"] = np.asarray(self.plane_names, dtype=np.str_)
            for key in ("plane_train_loss", "plane_train_acc", "plane_test_loss", "plane_test_acc"):
                arrays[key] = np.asarray(getattr(self, key), dtype=np.float64)
        return arrays

    def save(self, path: PathLike) -> Path:
        """Write the landscape atomically (``.npz`` appended when missing)."""
        text = os.fspath(path)
        target = Path(text if text.endswith(".npz") else text + ".npz")
        save_npz(target, **self.to_arrays())
        self.path = target
        return target


def _load_ritz(
    spectrum_path: PathLike, model: nn.Module
) -> tuple[ParamSpace, np.ndarray, np.ndarray]:
    """Ritz values and vectors saved beside ``spectrum_path``, checked against ``model``."""
    text = os.fspath(spectrum_path)
    path = Path(text) if text.endswith("-eigvec.npz") else eigvec_file(spectrum_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Argument 'spectrum_path': no Ritz vectors '{path}' beside the spectrum "
            f"'{spectrum_path}'; compute the spectrum with save_eigvec=True."
        )
    archive = load_npz(path)
    spectrum = path.with_name(path.name[: -len("-eigvec.npz")] + ".npz")
    if spectrum.is_file():  # a vector file of another run beside it (a kill between writes)
        check_pair(spectrum, load_npz(spectrum), path, archive)
    for key in ("vectors", "w", "model_fingerprint", "param_names", "param_shapes_json"):
        if key not in archive:
            raise argument_error(
                "spectrum_path", "Ritz vectors written by compute_eigenspectrum", f"{path}"
            )
    space = eigvec_space(archive)
    space.check_model(model, "spectrum_path")
    vectors = archive["vectors"]
    if vectors.ndim != 2 or vectors.shape[1] != space.numel:
        raise argument_error(
            "spectrum_path", f"Ritz vectors of shape (m, {space.numel})", f"{path} {vectors.shape}"
        )
    expected = str(archive["model_fingerprint"])
    actual = model_fingerprint(model, space.names)
    if expected != actual:
        raise ValueError(
            f"Argument 'spectrum_path': expected Ritz vectors computed at this checkpoint; "
            f"received '{path}' whose model_fingerprint {expected[:12]}... differs from the "
            f"model's {actual[:12]}... (same parameter names and shapes, different values: "
            "a spectrum of another checkpoint or model)."
        )
    return space, np.asarray(archive["w"], dtype=np.float64), vectors


def _collect_directions(
    model: nn.Module,
    directions: Sequence[Any] | None,
    spectrum_path: PathLike | None,
    num_directions: int,
    random_count: int,
    filter_count: int,
    seed: int,
) -> tuple[ParamSpace, list[Direction]]:
    if directions is None:
        directions = ["ritz-top"] if spectrum_path is not None else []
    elif isinstance(directions, str | np.ndarray | torch.Tensor):
        directions = [directions]
    params = list(model.parameters())
    dtype, device = params[0].dtype, params[0].device
    strings = [d for d in directions if isinstance(d, str)]
    customs = [d for d in directions if not isinstance(d, str)]
    keys = [
        d.strip().lower().replace("_", "-").replace("normalized", "normalised") for d in strings
    ]
    random_count += keys.count("random")
    filter_count += keys.count("filter-normalised")
    specs = [d for d, k in zip(strings, keys) if k not in ("random", "filter-normalised")]
    chosen: list[Direction] = []
    parsed = [(spec, *parse_ritz_spec(spec, num_directions)) for spec in specs]
    if specs:
        if spectrum_path is None:
            raise argument_error(
                "spectrum_path", "a spectrum saved with save_eigvec=True for Ritz directions", None
            )
        space, values, vectors = _load_ritz(spectrum_path, model)
        for spec, kind, indices in parsed:
            explicit = spec.strip()[-1:].isdigit()
            if not explicit and len(indices) > values.shape[0]:
                logger.warning("only %d Ritz vectors saved; using them all", values.shape[0])
                indices = indices[: values.shape[0]]
            chosen += ritz_directions(values, vectors, kind, indices, device=device, dtype=dtype)
    else:
        space = ParamSpace.from_model(model)
    for i, vec in enumerate(customs, start=1):
        tensor = torch.as_tensor(
            vec.detach().cpu().numpy() if isinstance(vec, torch.Tensor) else np.asarray(vec)
        )
        if tensor.ndim != 1 or tensor.shape[0] != space.numel:
            raise argument_error(
                "directions", f"1-D arrays of length P = {space.numel} (or Ritz names)", vec
            )
        if not bool(torch.isfinite(tensor).all()):
            raise argument_error("directions", "finite arrays (no NaN or Inf entry)", vec)
        chosen.append(Direction(f"custom-{i}", tensor.to(device=device, dtype=dtype)))
    chosen += random_directions(space, random_count, seed=seed, device=device, dtype=dtype)
    chosen += filter_normalised_directions(model, space, filter_count, seed=seed)
    if not chosen:
        raise argument_error(
            "directions",
            "at least one direction: a spectrum_path saved with save_eigvec=True, "
            "random_directions >= 1 or filter_normalised >= 1",
            directions,
        )
    names = [d.name for d in chosen]
    if len(set(names)) != len(names):
        raise argument_error("directions", "distinct directions", names)
    return space, chosen


@dataclass(frozen=True)
class _LandscapeSettings:
    """The landscape's settings, as :func:`build_loss_landscape` received them (checked).

    One place for the two records of them: the resumable state's configuration
    (which a restarted run must match) and the result's ``config``.  ``t`` is the
    grid of :func:`landscape_grid` built from ``dist`` and ``n_points``.
    """

    t: np.ndarray
    dist: float
    n_points: int
    spectrum_path: PathLike | None
    refresh_bn: bool
    subsample: int | float | None
    batch_size: int
    seed: int
    output_fn: OutputFn | None = None

    def state_config(
        self,
        dataset: Any,
        data_path: PathLike | None,
        model: Any,
        checkpoint_path: PathLike | None,
        *,
        fingerprint: str,
        chosen: list[Any],
        plane_pairs: list[Any],
        loss: Any,
        work: nn.Module | None = None,
    ) -> dict[str, Any]:
        """What a resumable state must match to be resumed: the data's contents
        (:func:`nets.workflow._resume.describe_data`), the loss's full configuration
        (``loss_fn``), the working model's parameters and buffers (``model_state``:
        :func:`nets.workflow._resolve.state_digest` of ``work``, after the checkpoint is
        loaded), the checkpoint's digest and every setting."""
        return {
            "dataset": describe_data(dataset),
            "data_path": None if data_path is None else os.fspath(data_path),
            "model": model if model is None or isinstance(model, str) else "module",
            "model_fingerprint": fingerprint,
            "model_state": None if work is None else state_digest(work),
            "checkpoint": file_digest(checkpoint_path),
            "t": self.t.tolist(),
            "directions": [[d.name, describe_value(d.vector)] for d in chosen],
            "planes": [list(pair) for pair in plane_pairs],
            "refresh_bn": self.refresh_bn,
            "subsample": self.subsample,
            "batch_size": int(self.batch_size),
            "seed": int(self.seed),
            "loss_fn": describe_loss(loss),
            "output_fn": describe_output_fn(self.output_fn),
        }

    def output_config(
        self, resolved: Any, data: Any, data_path: PathLike | None, chosen: list[Any], loss: Any
    ) -> dict[str, Any]:
        """The result's ``config``: the run's settings, model, checkpoint, data and directions."""
        spectrum_path = self.spectrum_path
        return {
            "function": "build_loss_landscape",
            "model": resolved.name,
            "dataset": data.name,
            "data_path": None if data_path is None else os.fspath(data_path),
            "checkpoint": resolved.checkpoint_path,
            "epoch": resolved.epoch,
            "spectrum_path": None if spectrum_path is None else os.fspath(spectrum_path),
            "dist": float(self.dist),
            "n_points": int(self.n_points),
            "directions": [d.name for d in chosen],
            "refresh_bn": self.refresh_bn,
            "subsample": self.subsample,
            "batch_size": int(self.batch_size),
            "seed": int(self.seed),
            "device": str(next(iter(resolved.model.parameters())).device),
            "loss": type(loss).__name__,
            "accuracy_unit": "percent",
            "definitions": landscape_definitions(self.subsample, self.refresh_bn),
            "direction_normalisation": {d.name: direction_normalisation(d.name) for d in chosen},
            "output_fn": describe_output_fn(self.output_fn),
        }


def build_loss_landscape(
    dataset: Any = "digits",
    data_path: PathLike | None = None,
    model: Any = None,
    dist: float = 1.0,
    n_points: int = 21,
    spectrum_path: PathLike | None = None,
    checkpoint_path: PathLike | None = None,
    save_path: PathLike | None = None,
    *,
    directions: Sequence[Any] | None = None,
    num_directions: int = 2,
    random_directions: int = 0,
    filter_normalised: int = 0,
    planes: Any = None,
    refresh_bn: bool = False,
    subsample: int | float | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "auto",
    loss_fn: Callable[..., torch.Tensor] | None = None,
    progress: bool = False,
    state_path: PathLike | None = None,
    process_group: Any = None,
    output_fn: OutputFn | None = None,
) -> LandscapeResult:
    """Train/test loss and accuracy along directions (and planes) around a checkpoint.

    Parameters
    ----------
    dataset, data_path, model, checkpoint_path:
        As in :func:`nets.workflow.compute_eigenspectrum` (the caller's module is
        copied, never perturbed).
    dist, n_points:
        Perturbations :math:`t` are ``n_points >= 2`` values in ``[-dist, dist]``, ``dist > 0``.
    spectrum_path:
        A spectrum written with ``save_eigvec=True`` (``.npz`` may be omitted);
        its Ritz vectors must belong to this checkpoint (fingerprint checked).
    save_path:
        Output ``.npz`` (``None``: not written).
    directions:
        Ritz specs ``'ritz-top'``, ``'ritz-bottom'``, ``'ritz-min-abs'`` (each
        the first ``num_directions``; ``'ritz-top-3'`` for one), ``'random'``
        and ``'filter-normalised'`` (one more of each kind) and/or 1-D arrays
        of length :math:`P`; default ``['ritz-top']`` with a spectrum.
    random_directions, filter_normalised:
        Numbers of seeded unit-norm random and filter-normalised directions.
    planes:
        ``True`` (the first two directions) or pairs ``'a|b'`` / ``(a, b)``
        of direction names or indices: 2-D grids of ``n_points**2`` points.
    refresh_bn:
        Recompute BatchNorm running statistics on the training split at each
        perturbed point: each module's running mean and unbiased running variance
        become those of all its inputs (samples and positions) over one pass of
        train-mode forwards, pooled exactly over batches of any size (:func:`_refresh_bn`).
    subsample:
        Evaluate on a seeded subset (count or fraction) of each split.
    batch_size, seed, device, loss_fn, progress:
        Evaluation batch size, seed of random directions and subsampling,
        device, loss (cross-entropy by default), a progress bar.
    state_path:
        State file for resumable runs (:mod:`nets.workflow._resume`): the curve of
        each finished direction and each finished row of a plane are saved there
        atomically; a restarted call with the same arguments evaluates only the
        missing points.  A state of other data (its contents), another loss (any
        setting) or another model state (parameters and buffers) is refused with a
        :class:`spectral.resume.StateMismatchError` naming ``dataset``, ``loss_fn`` or
        ``model_state``.  ``None``: no state file.
    process_group:
        Under ``torchrun``: every rank evaluates its whole batches of each split
        and the sums are added over the group (``None``: the default group when
        ``torch.distributed`` is initialised; ``False``: each rank on its own);
        directions are replicated (seeded or read from the spectrum file) and only
        rank 0 writes ``save_path``.
    output_fn:
        Which tensor of the model's output the loss takes, as for the curvature
        operators (see :mod:`curvops.model_io`): ``None`` for a tensor output, the
        ``logits`` of a dict or Hugging Face ``ModelOutput``, or the first item of a
        tuple; or a callable ``output -> tensor``.  Batches may hold tensor, tuple or
        dict inputs (see :func:`evaluate`).

    Returns
    -------
    LandscapeResult

    Raises
    ------
    ValueError, TypeError
        Bad arguments (``dist <= 0``, ``n_points < 2``, no direction, a
        spectrum of another model or checkpoint, ...).
    FileNotFoundError
        Missing checkpoint or Ritz vectors.

    Examples
    --------
    >>> import os, tempfile
    >>> from nets import build_loss_landscape, compute_eigenspectrum, get_model
    >>> out = tempfile.mkdtemp()
    >>> model = get_model("MLP", 10, 1, 8, hidden=(16,), seed=0)   # any nn.Module, or a name
    >>> spec = compute_eigenspectrum("digits", model=model, lanczos_iters=5, save_eigvec=True,
    ...                               save_spectrum_path=os.path.join(out, "spectrum"))
    >>> land = build_loss_landscape("digits", model=model, dist=0.5, n_points=3,
    ...                             spectrum_path=spec.path,
    ...                             save_path=os.path.join(out, "land.npz"))
    >>> list(land.direction_names), land.train_loss.shape
    (['ritz-top-1', 'ritz-top-2'], (2, 3))
    """
    t = landscape_grid(dist, n_points)
    check_int("num_directions", num_directions, 1)
    check_int("random_directions", random_directions, 0)
    check_int("filter_normalised", filter_normalised, 0)
    check_int("batch_size", batch_size, 1)
    check_int("seed", seed, 0)
    if not isinstance(refresh_bn, bool):
        raise argument_error("refresh_bn", "a bool", refresh_bn, kind=TypeError)
    settings = _LandscapeSettings(
        t, dist, n_points, spectrum_path, refresh_bn, subsample, batch_size, seed,
        check_output_fn(output_fn),
    )  # fmt: skip
    loss = default_loss(loss_fn)
    group, device = resolve_parallel(process_group, device)
    with preserve_global_state():
        data = resolve_data(dataset, data_path, seed=seed)
        loss = default_loss(loss_fn, data.task)  # the task's loss (language models)
        resolved = resolve_model(model, checkpoint_path, data, device=device, seed=seed)
        work = resolved.model
        space, chosen = _collect_directions(
            work,
            directions,
            spectrum_path,
            num_directions,
            random_directions,
            filter_normalised,
            seed,
        )
        plane_pairs = parse_planes(planes, [d.name for d in chosen])
        train_loader, test_loader = _loaders(data, batch_size, subsample, seed, group)
        state = open_state(
            state_path,
            "build_loss_landscape",
            lambda: settings.state_config(
                dataset, data_path, model, checkpoint_path,
                fingerprint=model_fingerprint(work, space.names), chosen=chosen,
                plane_pairs=plane_pairs, loss=loss, work=work,
            ),
        )  # fmt: skip
        result = _sweep(
            work, space, chosen, plane_pairs, t, train_loader, test_loader, loss, refresh_bn,
            progress and is_writer(group), state, group, output_fn=output_fn,
        )  # fmt: skip
    config = settings.output_config(resolved, data, data_path, chosen, loss)
    result.config = config
    result.model_fingerprint = model_fingerprint(work, space.names)
    if save_path is not None:
        _save_landscape(result, save_path, group)
    return result


def _loaders(
    data: Any, batch_size: int, subsample: int | float | None, seed: int, group: Any
) -> tuple[DataLoader[Any], DataLoader[Any] | None]:
    """Evaluation loaders of the (subsampled) training and test splits, sharded over ``group``."""
    train = make_eval_loader(data.train, batch_size, subsample=subsample, seed=seed)
    test = None
    if data.test is not None:
        test_all = make_eval_loader(data.test, batch_size, subsample=subsample, seed=seed)
        test = shard_loader(test_all, group, raw=True)
    return shard_loader(train, group, raw=True), test


def _save_landscape(result: LandscapeResult, save_path: Any, group: Any) -> None:
    """Rank 0 writes the landscape file; every rank records its path."""
    if is_writer(group):
        result.save(save_path)
        logger.info("landscape written to %s", result.path)
    else:
        text = os.fspath(save_path)
        result.path = Path(text if text.endswith(".npz") else text + ".npz")
    written(group)


def landscape_definitions(subsample: int | float | None, refresh_bn: bool) -> dict[str, str]:
    """What the losses and accuracies of a landscape file are, in words (``config_json``).

    >>> print(landscape_definitions(None, False)["train_loss"])  # doctest: +ELLIPSIS
    one full pass over the training split (no augmentation), model in eval mode ...
    """
    statistics = (
        "BatchNorm running statistics recomputed on the training split at each perturbed point: "
        "mean and unbiased variance of each BatchNorm's inputs over one pass of train-mode "
        "forwards"
        if refresh_bn
        else "the checkpoint's BatchNorm running statistics"
    )
    part = "" if subsample is None else f", subsample {subsample} drawn with the seed"
    split = "one full pass over the {} split" + part
    mode = f"model in eval mode ({statistics})"
    train = f"{split.format('training')} (no augmentation), {mode}"
    test = f"{split.format('test')}, {mode}"
    return {
        "train_loss": train,
        "train_acc": f"top-1 accuracy (%), {train}",
        "test_loss": test,
        "test_acc": f"top-1 accuracy (%), {test}",
        "checkpoint_loss": f"train_loss at t = 0: {train}",
    }


def direction_normalisation(name: str) -> str:
    """How the direction called ``name`` is normalised (the landscape's ``t`` is in its units).

    >>> direction_normalisation("ritz-top-1"), direction_normalisation("filter-normalised-1")
    ('unit Euclidean norm', 'filter-normalised (Li et al., 2017)')
    """
    if name.startswith("filter-normalised"):
        return "filter-normalised (Li et al., 2017)"
    if name.startswith(("ritz-", "random-")):
        return "unit Euclidean norm"
    return "as given"


def _sweep(
    model: nn.Module,
    space: ParamSpace,
    chosen: list[Direction],
    plane_pairs: list[tuple[int, int]],
    t: np.ndarray,
    train_loader: DataLoader[Any],
    test_loader: DataLoader[Any] | None,
    loss_fn: Callable[..., torch.Tensor],
    refresh_bn: bool,
    progress: bool,
    state: Checkpoint | None = None,
    group: Any = None,
    *,
    output_fn: OutputFn | None = None,
) -> LandscapeResult:
    theta0 = space.get_vector(model)
    at_point = _point_evaluator(
        model, space, theta0, train_loader, test_loader, loss_fn, refresh_bn, group,
        output_fn=output_fn,
    )  # fmt: skip
    total = len(chosen) * len(t) + len(plane_pairs) * len(t) ** 2
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="landscape", unit="pt")
    try:
        origin = at_point(None)
        d, n = len(chosen), len(t)
        curves = np.full((4, d, n), np.nan)
        grids = np.full((4, len(plane_pairs), n, n), np.nan)
        done_dirs, done_rows = 0, 0  # finished directions and plane rows (q * n + i)
        saved = None if state is None else state.load()
        if saved is not None:
            curves, grids = saved.arrays["curves"], saved.arrays["grids"]
            done_dirs, done_rows = int(saved.meta["directions"]), int(saved.meta["plane_rows"])
            logger.info("resuming the landscape after %d directions", done_dirs)
            if bar is not None:
                bar.update(done_dirs * n + done_rows * n)

        def save() -> None:
            if state is not None:
                state.save(
                    {"curves": curves, "grids": grids},
                    {"directions": done_dirs, "plane_rows": done_rows},
                )

        for i, direction in enumerate(chosen):
            if i < done_dirs:
                continue
            for j, tj in enumerate(t):
                curves[:, i, j] = origin if tj == 0.0 else at_point(float(tj) * direction.vector)
                if bar is not None:
                    bar.update()
            done_dirs = i + 1
            save()
        for q, (a, b) in enumerate(plane_pairs):
            da, db = chosen[a].vector, chosen[b].vector
            for i, s in enumerate(t):
                if q * n + i < done_rows:
                    continue
                for j, tj in enumerate(t):
                    if s == 0.0 and tj == 0.0:
                        grids[:, q, i, j] = origin
                    else:
                        grids[:, q, i, j] = at_point(float(s) * da + float(tj) * db)
                    if bar is not None:
                        bar.update()
                done_rows = q * n + i + 1
                save()
    finally:
        space.set_vector(model, theta0)
        if bar is not None:
            bar.close()
    return _landscape_result(t, chosen, plane_pairs, curves, grids, origin)


def _point_evaluator(
    model: nn.Module,
    space: ParamSpace,
    theta0: torch.Tensor,
    train_loader: DataLoader[Any],
    test_loader: DataLoader[Any] | None,
    loss_fn: Callable[..., torch.Tensor],
    refresh_bn: bool,
    group: Any,
    *,
    output_fn: OutputFn | None = None,
) -> Callable[[torch.Tensor | None], tuple[float, float, float, float]]:
    """``at_point(offset)``: train/test loss and accuracy (eval mode) at ``theta0 + offset``
    (``None``: at ``theta0``); with ``refresh_bn`` the BatchNorm statistics are recomputed
    there and the buffers restored afterwards."""
    buffers0 = {name: b.detach().clone() for name, b in model.named_buffers()}

    def at_point(offset: torch.Tensor | None) -> tuple[float, float, float, float]:
        if offset is None:
            space.set_vector(model, theta0)
        else:
            space.set_vector(model, theta0 + offset)
            if refresh_bn:
                _refresh_bn(model, train_loader, group)
        model.eval()
        try:
            tr = evaluate(model, train_loader, loss_fn, group=group, output_fn=output_fn)
            te = (
                (math.nan, math.nan)
                if test_loader is None
                else evaluate(model, test_loader, loss_fn, group=group, output_fn=output_fn)
            )
        finally:
            if offset is not None and refresh_bn:
                with torch.no_grad():
                    for name, b in model.named_buffers():
                        b.copy_(buffers0[name])
        return tr[0], tr[1], te[0], te[1]

    return at_point


def _landscape_result(
    t: np.ndarray,
    chosen: list[Direction],
    plane_pairs: list[tuple[int, int]],
    curves: np.ndarray,
    grids: np.ndarray,
    origin: tuple[float, float, float, float],
) -> LandscapeResult:
    """The :class:`LandscapeResult` of a finished sweep (``curves``/``grids``: train loss,
    train accuracy, test loss, test accuracy first)."""
    planes = bool(plane_pairs)
    return LandscapeResult(
        t=t,
        direction_names=[c.name for c in chosen],
        direction_values=np.array([c.value for c in chosen], dtype=np.float64),
        train_loss=curves[0],
        train_acc=curves[1],
        test_loss=curves[2],
        test_acc=curves[3],
        checkpoint_loss=float(origin[0]),
        checkpoint_acc=float(origin[1]),
        model_fingerprint="",
        plane_names=[f"{chosen[a].name}|{chosen[b].name}" for a, b in plane_pairs],
        plane_train_loss=grids[0] if planes else None,
        plane_train_acc=grids[1] if planes else None,
        plane_test_loss=grids[2] if planes else None,
        plane_test_acc=grids[3] if planes else None,
    )
