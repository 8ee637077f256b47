r"""Data-parallel curvature with :mod:`torch.distributed`: groups, reductions, sharding.

Every rank of a distributed job holds the *same* model and its *own shard* of the
data.  A curvature product is a size-weighted mean over batches,

.. math::
    A v = \frac{\sum_r S_r}{\sum_r N_r}, \qquad
    S_r = \sum_{b \in \text{shard}_r} N_b A_b v, \quad N_r = \sum_{b \in \text{shard}_r} N_b,

where :math:`N_b` is the batch's weight (:func:`curvops.losses.batch_weight`: its sample
count, or the loss's own normaliser -- counted targets with ``ignore_index``, summed class
weights with ``weight=`` -- so shards whose batches count different numbers of targets
combine exactly; for ``reduction="sum"`` the curvatures add up, :math:`A v = \sum_r S_r`
with unit weights and no division),
so each rank forms its partial sum :math:`S_r` and weight :math:`N_r`, and **one**
``all_reduce`` (the weight packed at the end of the same buffer,
:func:`all_reduce_weighted`) gives every rank the product of the operator on the
union of the shards.  Shards may have unequal sizes; when the shards are whole
batches of one loader (:func:`shard_batches`) the operator is exactly the
single-process one (same batches, so the same BatchNorm statistics; only the
order of the floating-point summation differs).

Process groups (:func:`resolve_group`): an operator's ``process_group`` is

* ``None`` (default): the default group when :mod:`torch.distributed` is
  initialised with more than one process, otherwise no communication;
* ``False``: never communicate (a rank-local operator, e.g. rank 0 alone);
* a ``ProcessGroup`` (``torch.distributed.new_group``): reduce over that group.

Every rank of the group must then call the same products in the same order
(collectives block until all members arrive).

Agreement at construction (:func:`check_ranks_agree`): an operator built with a
communicating group exchanges one fixed-size fingerprint per rank (one ``all_gather``
of 11 float64 numbers): the selected parameters' names, shapes and dtype, the loss's
type, reduction and settings, every setting that changes the matrix (the operator type,
``bn_mode``, ``output_fn``, the Fisher's ``kind``, ``per``, Monte-Carlo ``seed`` and
``mc_samples``, ``ggn_diagonal``'s ``method``, ``loss_stats``' direction and probes, ...),
this rank's total batch weight and a 64-bit hash of the bits of all the model's
parameters (a few integer passes over them on their device, :math:`O(P)`, once).  Every
rank takes the same decision from the same gathered numbers, so ranks that disagree all
raise the same error (naming what differs: a setting by its name, with the values of each
rank when they are plain numbers or strings) instead of mixing two models, returning
different products on different ranks or aborting inside the backend; a rank whose shard
has no counted target contributes zeros, and only a job with no counted target on any
rank is refused (on every rank).  Weights are compared at construction only.

Callables (a loss function, ``output_fn``, a declared loss's function and normaliser) are
compared by their qualified name, a hash of their code (bytecode, names, constants, nested
functions; not line numbers), their defaults, ``functools.partial`` arguments and the values
in their closures, and -- for functions outside the libraries -- the global numbers,
strings, tensors and functions they read; numbers, strings, booleans, ``None`` and tensors
(by their bits) are compared by value, containers item by item, loss modules by their
public attributes and buffers.  What cannot be compared reliably is not: an arbitrary
object captured in a closure or kept as an attribute (a config object, a device, the model
itself) is compared by its type only, and so is anything nested deeper than
:data:`_MAX_DEPTH` levels; the functions of different Python versions differ in bytecode.

Failures stop every rank.  A rank whose own checks fail before the construction's
collective (empty data, an unknown parameter name, a bad ``bn_mode``, loss or setting) still
joins it as a failed rank; a rank whose part of a product, of ``loss_gradient``,
``ggn_diagonal`` or ``loss_stats`` raises (a non-finite batch, a one-sample batch under
train-mode BatchNorm) still joins the reduction, with zeros and a failure flag in the same
buffer (:func:`all_reduce_weighted`, :func:`all_reduce_sum`, :func:`stop_if_failed`).  The
failing rank raises its own error and every other rank a ``RuntimeError`` naming it, at
once, instead of waiting for it in a collective.

Why Lanczos needs no change
---------------------------
Vectors are *replicated*: every rank runs :func:`spectral.lanczos` itself,
from the same seeded probe (drawn on the host by ``numpy.random.default_rng``).
After the ``all_reduce`` every rank holds the *bitwise identical* product: ring
(Gloo, NCCL ring) and tree (NCCL) all-reduce algorithms add each chunk of the
buffer once, on one rank, and then copy the finished chunk to all others.  The
rest of a Lanczos step (dot products, CGS2 reorthogonalisation, the tridiagonal
eigenproblem) is a deterministic function of identical inputs on identical
software, so the coefficients :math:`\alpha_j, \beta_j` and the next vector are
bitwise identical too, by induction over the steps: there is no drift to
correct and no broadcast is needed (``tests/curvops/test_distributed.py`` checks
bit equality across ranks).  This holds as long as every rank runs the same
kernels (same library versions, same thread counts on CPU, same GPU model); on a
heterogeneous cluster, where a dot product may round differently, compare ranks
with :func:`check_replicated` and, if they differ, broadcast the start vector
and results from rank 0.  Running the recurrence on rank 0 with broadcasts would
cost two extra collectives per step and leave the other ranks idle; replicated
vectors cost only :math:`O(Pm)` memory per rank.

Backends: ``"gloo"`` for CPU tensors (tested), ``"nccl"`` for CUDA tensors (one
GPU per process, ``torch.cuda.set_device(local_rank)``; see :func:`local_device`).

>>> resolve_group(None) is None          # torch.distributed not initialised here
True
>>> get_rank(), get_world_size(), is_main_process()
(0, 1, True)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import logging
import os
import types
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler

from curvops.data import Batch, Data, close_pass_iterator, pass_iterator
from spectral.errors import argument_error

__all__ = [
    "ShardedData",
    "all_reduce_sum",
    "all_reduce_weighted",
    "check_ranks_agree",
    "check_replicated",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "local_device",
    "resolve_group",
    "shard_batches",
    "stop_if_failed",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

#: Integer weights are split into two float32 "digits" of base 2**12 when the
#: product buffer is not float64 (exact for weights < 2**36 and < 4096 ranks).
_DIGIT = 4096.0


# ---------------------------------------------------------------------------- groups


def is_distributed() -> bool:
    """True when :mod:`torch.distributed` is available and its default group is initialised.

    Returns
    -------
    bool
        Whether a default group is initialised.

    Examples
    --------
    >>> is_distributed()
    False
    """
    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: Any = None) -> Any:
    """The group a product must be reduced over, or ``None`` for no communication.

    Parameters
    ----------
    process_group:
        ``None`` (the default group when initialised with more than one process),
        ``False`` (never communicate) or a ``torch.distributed`` ``ProcessGroup``.

    Returns
    -------
    ProcessGroup or None
        ``None`` when nothing is to be reduced: not initialised, ``False``, or a
        group of a single process.

    Raises
    ------
    TypeError
        ``process_group`` is neither ``None``, ``False`` nor a process group.
    RuntimeError
        A process group was given but :mod:`torch.distributed` is not initialised.

    Examples
    --------
    >>> resolve_group(False) is None
    True
    """
    if process_group is False or (process_group is None and not is_distributed()):
        return None
    if process_group is None:
        group = dist.group.WORLD
    elif isinstance(process_group, dist.ProcessGroup):
        group = process_group
    else:
        raise argument_error(
            "process_group",
            "None (default group if initialised), False (no communication) or a "
            "torch.distributed ProcessGroup",
            process_group,
            kind=TypeError,
        )
    if not is_distributed():
        raise RuntimeError(
            "Argument 'process_group': a process group was given but torch.distributed is "
            "not initialised (call torch.distributed.init_process_group first)."
        )
    return group if dist.get_world_size(group) > 1 else None


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (the default group if None); 0 when not distributed.

    Parameters
    ----------
    group : ProcessGroup or None
        The group (``None``: the default group when initialised).

    Returns
    -------
    int
        The rank.

    Examples
    --------
    >>> get_rank()
    0
    """
    if not is_distributed() or group is False:
        return 0
    return int(dist.get_rank(group))


def get_world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (the default group if None); 1 when not distributed.

    Parameters
    ----------
    group : ProcessGroup or None
        The group (``None``: the default group when initialised).

    Returns
    -------
    int
        The number of processes.

    Examples
    --------
    >>> get_world_size()
    1
    """
    if not is_distributed() or group is False:
        return 1
    return int(dist.get_world_size(group))


def is_main_process(group: Any = None) -> bool:
    """True on rank 0 of ``group`` (and when not distributed): the rank that writes files.

    Parameters
    ----------
    group : ProcessGroup or None
        The group (``None``: the default group when initialised).

    Returns
    -------
    bool
        Whether this is rank 0.

    Examples
    --------
    >>> is_main_process()
    True
    """
    return get_rank(group) == 0


def local_device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.

    ``LOCAL_RANK`` is set by ``torchrun`` (0 when absent).  With NCCL, call
    ``torch.cuda.set_device(local_device())`` before creating the process group.

    Returns
    -------
    torch.device
        This process's device.

    Examples
    --------
    >>> local_device().type in ("cpu", "cuda")
    True
    """
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default group from ``torchrun``'s environment, if launched by it.

    Reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (``env://``).  The
    backend defaults to ``"nccl"`` when CUDA is available, else ``"gloo"``.  Returns
    True when the default group is (now) initialised; does nothing and returns
    False outside a distributed launch.

    Parameters
    ----------
    backend : str, optional
        ``"nccl"`` or ``"gloo"`` (default: NCCL with CUDA, else Gloo).

    Returns
    -------
    bool
        Whether the default group is initialised.

    Examples
    --------
    >>> "RANK" in os.environ or init_from_env() is False
    True
    """
    if is_distributed():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend)
    logger.info(
        "torch.distributed initialised: rank %d of %d (%s)",
        dist.get_rank(),
        dist.get_world_size(),
        backend,
    )
    return True


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile``.

    Curvature products must run on the underlying module: calling a DDP wrapper
    would broadcast buffers and arm its gradient all-reduce hooks for a backward
    pass that a product never makes, and a compiled module (``torch.compile``) has
    no double backward; its ``_orig_mod`` is the same function with the same
    parameters.  Compiled or TorchScript *submodules* are refused (they cannot be
    unwrapped without changing the user's model).

    Parameters
    ----------
    model : torch.nn.Module
        A model, possibly wrapped.

    Returns
    -------
    torch.nn.Module
        The innermost module.

    Raises
    ------
    TypeError, ValueError
        A TorchScript model, or a model with a compiled or scripted submodule
        (naming it).

    Examples
    --------
    >>> lin = torch.nn.Linear(1, 1)
    >>> unwrap_model(torch.nn.DataParallel(lin)) is lin
    True
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers) or _is_compiled(model):
        inner: Any = model._orig_mod if _is_compiled(model) else model.module
        model = inner
    if isinstance(model, torch.jit.ScriptModule):
        raise argument_error(
            "model",
            "an eager nn.Module (TorchScript modules are not supported: pass the module "
            "before torch.jit.script/trace)",
            model,
            kind=TypeError,
        )
    for name, sub in model.named_modules():
        if _is_compiled(sub) or isinstance(sub, torch.jit.ScriptModule):
            what = "compiled with torch.compile" if _is_compiled(sub) else "a TorchScript module"
            raise argument_error(
                "model",
                f"a model without compiled submodules (submodule {name!r} is {what}; its "
                "graph has no second derivatives: use the eager module, e.g. "
                f"{'its _orig_mod' if _is_compiled(sub) else 'the module before scripting'})",
                model,
            )
    return model


def _is_compiled(module: nn.Module) -> bool:
    """A ``torch.compile`` wrapper (``OptimizedModule``), told by its ``_orig_mod``.

    Compiled graphs (AOT autograd) have no double backward; the wrapped eager module is
    the same function with the same parameters, so the operators use it.
    """
    return type(module).__name__ == "OptimizedModule" and isinstance(
        getattr(module, "_orig_mod", None), nn.Module
    )


# ---------------------------------------------------------------------------- reductions


def all_reduce_sum(
    tensors: Sequence[torch.Tensor],
    group: Any,
    *,
    error: Exception | None = None,
    where: str = "The computation",
) -> list[torch.Tensor]:
    """Sum tensors over ``group`` with one ``all_reduce`` of a packed buffer.

    The tensors are flattened into one buffer of the first tensor's dtype and
    device (scalars and vectors of different lengths may be mixed) and returned
    with their shapes.  With ``group=None`` (see :func:`resolve_group`) they are
    returned unchanged.  The buffer also carries a failure flag (:func:`stop_if_failed`):
    a rank whose own work before this collective raised passes its ``error`` (and
    tensors of the right shapes, e.g. zeros), so that every rank stops -- the failing
    one with ``error``, the others with a ``RuntimeError`` naming it -- instead of
    the others waiting for it in the next collective.

    Parameters
    ----------
    tensors : sequence of torch.Tensor
        The tensors to sum.
    group : ProcessGroup or None
        The group (``None``: the default group when initialised).
    error : Exception, optional
        This rank's own failure, raised here after the collective.
    where : str
        What failed, for the other ranks' message (e.g. ``"loss_stats"``).

    Returns
    -------
    list of torch.Tensor
        The sums, with the input shapes.

    Raises
    ------
    Exception
        ``error`` on the rank that passed it; ``RuntimeError`` naming the failing
        rank(s) on the others.

    Examples
    --------
    >>> all_reduce_sum([torch.ones(2), torch.zeros(())], None)[0]
    tensor([1., 1.])
    """
    parts = list(tensors)
    if group is None or not parts:
        if error is not None:
            raise error
        return parts
    first = parts[0]
    flag = first.new_tensor([0 if error is None else 1])
    buf = torch.cat([*(t.reshape(-1).to(first.dtype) for t in parts), flag])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    stop_if_failed(float(buf[-1]), error, group, where)
    out, start = [], 0
    for t in parts:
        out.append(buf[start : start + t.numel()].reshape(t.shape).to(t.dtype))
        start += t.numel()
    return out


def all_reduce_weighted(
    acc: torch.Tensor,
    weight: float,
    group: Any,
    *,
    error: Exception | None = None,
    where: str = "The computation",
) -> tuple[torch.Tensor, float]:
    """Return :math:`(\\sum_r S_r, \\sum_r N_r)` over ``group`` with one ``all_reduce``.

    ``acc`` is this rank's weighted product sum :math:`S_r` (any shape) and
    ``weight`` its total weight :math:`N_r` (a sample or target count, or a sum of
    class weights).  The weight travels in the same buffer: appended as is for
    float64, otherwise the buffer is float32 (float16/bfloat16 sums are accumulated
    in float32) and the weight is split into two base-4096 digits, so integer counts
    stay exact up to :math:`2^{36}` and 4096 ranks (fractional class-weight sums to
    float32 precision of the low digit).  A failure flag travels last
    (:func:`stop_if_failed`): a rank whose own work raised passes its ``error`` and a
    zero ``acc`` of the agreed shape, and every rank stops instead of the others
    waiting for it.  ``group=None`` returns the inputs unchanged (or raises
    ``error``).  The result is bitwise identical on every rank (see the module
    docstring).

    Parameters
    ----------
    acc : torch.Tensor
        This rank's weighted sum :math:`S_r`.
    weight : float
        This rank's total weight :math:`N_r`.
    group : ProcessGroup or None
        The group (``None``: the default group when initialised).
    error : Exception, optional
        This rank's own failure, raised here after the collective.
    where : str
        What failed, for the other ranks' message (e.g. ``"HessianOperator product"``).

    Returns
    -------
    (torch.Tensor, float)
        The sums over the group.

    Raises
    ------
    Exception
        ``error`` on the rank that passed it; ``RuntimeError`` naming the failing
        rank(s) on the others.

    Examples
    --------
    >>> s, n = all_reduce_weighted(torch.ones(3), 4.0, None)
    >>> s.tolist(), n
    ([1.0, 1.0, 1.0], 4.0)
    """
    if group is None:
        if error is not None:
            raise error
        return acc, float(weight)
    flat = acc.reshape(-1)
    flag = 0.0 if error is None else 1.0
    if acc.dtype == torch.float64:
        buf = torch.cat([flat, flat.new_tensor([float(weight), flag])])
    else:
        hi = float(np.floor(weight / _DIGIT))
        lo = float(weight) - hi * _DIGIT
        buf = torch.cat([flat.float(), flat.new_tensor([hi, lo, flag], dtype=torch.float32)])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    tail = 2 if acc.dtype == torch.float64 else 3  # (weight or its two digits, flag)
    tail_host = buf[-tail:].double().cpu().tolist()
    stop_if_failed(tail_host[-1], error, group, where)
    if acc.dtype == torch.float64:
        total = tail_host[0]
        summed = buf[:-tail]
    else:
        total = tail_host[0] * _DIGIT + tail_host[1]
        summed = buf[:-tail].to(acc.dtype)
    return summed.reshape(acc.shape), total


def stop_if_failed(flags: float, error: Exception | None, group: Any, where: str) -> None:
    """Raise on every rank when the reduced failure flags of a collective are not zero.

    ``flags`` is the sum over the ranks of each rank's failure flag (1 where its own work
    before the collective raised ``error``), so every rank takes the same decision.  When
    some rank failed, one more ``all_gather`` tells every rank which (only on this error
    path); the failing ranks raise their own ``error``, the others a ``RuntimeError``
    naming them and ``where``.  Nothing happens when no rank failed.

    Parameters
    ----------
    flags : float
        The reduced flags (the same on every rank).
    error : Exception or None
        This rank's own failure.
    group : ProcessGroup
        The group the flags were reduced over.
    where : str
        What failed, for the message.

    Raises
    ------
    Exception
        ``error`` here; ``RuntimeError`` naming the failing ranks elsewhere.

    Examples
    --------
    >>> stop_if_failed(0.0, None, None, "A product")  # no rank failed: nothing happens
    """
    if flags == 0 and error is None:
        return
    mine = torch.tensor([0.0 if error is None else 1.0], device=_comm_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    if error is not None:
        raise error
    failed = [r for r, t in enumerate(gathered) if float(t) != 0]
    raise RuntimeError(
        f"{where} failed on rank(s) {failed} of the process group (see the error raised "
        "there); the other ranks stop here instead of waiting for them."
    )


def _comm_device(group: Any) -> torch.device:
    backend = str(dist.get_backend(group))
    if "nccl" in backend:  # "nccl" or a mixed "cpu:gloo,cuda:nccl" group
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_replicated(value: Any, group: Any = None) -> bool:
    """True on every rank iff ``value`` is bitwise identical on all ranks of ``group``.

    ``value`` is a tensor or a numpy array (shape and dtype must agree across ranks).
    Rank 0's bytes are broadcast, compared locally and the verdicts combined with
    a MIN all-reduce, so all ranks return the same answer.  Outside a distributed
    job (or for a one-process group) it returns True.

    Parameters
    ----------
    value : torch.Tensor or numpy.ndarray
        The value to compare.
    group : ProcessGroup or None
        The group (``None``: the default group when initialised).

    Returns
    -------
    bool
        Whether every rank holds the same bits.

    Examples
    --------
    >>> check_replicated(np.arange(3.0))
    True
    """
    if isinstance(group, bool) or not is_distributed():
        return True
    grp = dist.group.WORLD if group is None else group
    if dist.get_world_size(grp) == 1:
        return True
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        tensor = torch.from_numpy(np.array(value, copy=True, order="C"))
    raw = tensor.contiguous().reshape(-1).view(torch.uint8)
    mine = raw.to(_comm_device(grp), copy=True)
    theirs = mine.clone()
    dist.broadcast(theirs, group=grp, group_src=0)
    verdict = torch.tensor([int(torch.equal(mine, theirs))], device=mine.device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=grp)
    return bool(verdict.item())


# ---------------------------------------------------------------------------- agreement

#: The fields of a rank's fingerprint (:func:`check_ranks_agree`), in buffer order, with
#: how a disagreement is reported: ``"value"`` fields are shown per rank, ``"hash"`` fields
#: (48-bit hashes, or the two 32-bit words of the parameter hash) only name the ranks.
#: Every entry is exact in float64.
_FIELDS: tuple[tuple[str, str], ...] = (
    ("failed", "flag"),
    ("weight", "weight"),
    ("number of selected parameters", "value"),
    ("number of selected tensors", "value"),
    ("names and shapes of the selected parameters", "hash"),
    ("parameter dtype", "dtype"),
    ("loss reduction", "reduction"),
    ("loss function and its settings", "hash"),
    ("operator settings", "hash"),
    ("model parameter values (bitwise)", "hash"),
    ("model parameter values (bitwise)", "hash"),
)
#: The index of the caller's settings (:func:`check_ranks_agree`) in :data:`_FIELDS`.
_SETTINGS_FIELD = 8
_DTYPES = (
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex128,
    torch.complex64,
)
_REDUCTIONS = ("mean", "sum")
#: Multiplier and increment of Knuth's MMIX linear congruential generator (odd, < 2**63).
_MULT, _INC = 6364136223846793005, 1442695040888963407
_CHUNK = 1 << 22  # elements hashed at a time (bounds the temporary int64 buffers)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _text_hash(text: str) -> float:
    """A 48-bit hash of ``text``, the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b(text.encode(), digest_size=6).digest()
    return float(int.from_bytes(digest, "little"))


#: Depth to which settings are described inside containers, closures and attributes
#: (deeper values are described by their type only).
_MAX_DEPTH = 4
#: Modules whose functions are the same library code on every rank: their code and
#: closures are still described, but the values of their global names are not read.
_LIBRARIES = (
    "torch",
    "numpy",
    "functools",
    "operator",
    "builtins",
    "math",
    "curvops",
    "spectral",
    "transformers",
)


def _describe_setting(value: Any, depth: int = 0, seen: frozenset[int] = frozenset()) -> str:
    """A process-independent description of a loss or operator setting (no addresses).

    Numbers, strings, booleans, ``None``, dtypes and enums by value; tensors and numpy
    arrays by a hash of their bits (with shape and dtype; not their device, which may
    differ between ranks); containers item by item; callables by
    :func:`_describe_callable` (code, closure, defaults, ``functools.partial``
    arguments, a loss's public attributes).  Anything else -- an arbitrary object
    captured in a closure, a device -- by its type only: such values are not compared.
    Containers and callables are followed to depth :data:`_MAX_DEPTH` (cycles stop).
    """
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if isinstance(value, torch.Tensor):
        raw = value.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.blake2b(raw.view(torch.uint8).numpy().tobytes(), digest_size=8)
        return f"tensor{tuple(value.shape)}:{value.dtype}:{digest.hexdigest()}"
    if isinstance(value, np.ndarray):
        blob = np.ascontiguousarray(value).tobytes() if value.dtype != object else b"object"
        digest = hashlib.blake2b(blob, digest_size=8)
        return f"array{value.shape}:{value.dtype}:{digest.hexdigest()}"
    if isinstance(value, np.generic):
        return repr(value.item())
    if isinstance(value, (torch.dtype, enum.Enum)):
        return repr(value)
    if isinstance(value, type) or depth >= _MAX_DEPTH or id(value) in seen:
        return _type_name(value)
    inner = seen | {id(value)}
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(_describe_setting(v, depth + 1, inner) for v in value) + ")"
    if isinstance(value, (set, frozenset)):
        items = sorted(_describe_setting(v, depth + 1, inner) for v in value)
        return "{" + ",".join(items) + "}"
    if isinstance(value, dict):
        items = sorted(
            f"{_describe_setting(k, depth + 1, inner)}:{_describe_setting(v, depth + 1, inner)}"
            for k, v in value.items()
        )
        return "{" + ",".join(items) + "}"
    if callable(value):
        return _describe_callable(value, depth, inner)
    return _type_name(value)


def _type_name(value: Any) -> str:
    kind = value if isinstance(value, type) else type(value)
    return f"<{kind.__module__}.{getattr(kind, '__qualname__', kind.__name__)}>"


def _describe_callable(fn: Any, depth: int, seen: frozenset[int]) -> str:
    """A function's qualified name, code, defaults and closure; a ``functools.partial``'s
    function and arguments; a bound method's object and function; a module's type, public
    attributes and buffers (below the top level -- a module captured in a closure, the
    owner of a bound method -- only its own buffers and its plain attributes: numbers,
    strings, tensors); another callable object's type, name and public attributes (its
    ``repr`` too when it has none and shows no address: ``operator.itemgetter(1)``)."""
    deeper = depth + 1
    if isinstance(fn, functools.partial):
        args = _describe_setting(fn.args, deeper, seen)
        keywords = _describe_setting(dict(fn.keywords), deeper, seen)
        return f"partial {_describe_setting(fn.func, deeper, seen)} {args} {keywords}"
    if isinstance(fn, types.MethodType):
        owner = _describe_setting(fn.__self__, deeper, seen)
        return f"method {owner} {_describe_setting(fn.__func__, deeper, seen)}"
    if isinstance(fn, types.FunctionType):
        return _describe_function(fn, depth, seen)
    label = _type_name(fn)
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if isinstance(name, str):  # builtins (torch.tanh), C functions
        label += f" {getattr(fn, '__module__', None)}.{name}"
    settings = dict(getattr(fn, "__dict__", {}))
    if isinstance(fn, nn.Module):
        settings.update(dict(fn.named_buffers(recurse=depth == 0)))
        if depth > 0:  # e.g. a model: not its bookkeeping (HF's warnings_issued)
            settings = {k: v for k, v in settings.items() if isinstance(v, _PLAIN_VALUES)}
    elif not settings and " at 0x" not in repr(fn):
        label += f" {fn!r}"
    items = sorted((k, v) for k, v in settings.items() if not k.startswith("_") and k != "training")
    return f"{label} " + ";".join(f"{k}={_describe_setting(v, deeper, seen)}" for k, v in items)


#: The attribute values of a module below the top level that its description includes.
_PLAIN_VALUES = (type(None), bool, int, float, complex, str, torch.Tensor, np.generic)


def _describe_function(fn: types.FunctionType, depth: int, seen: frozenset[int]) -> str:
    """A Python function: its qualified name, a hash of its code (bytecode, names and
    constants, nested functions' too; not line numbers), its defaults, the values in its
    closure and -- for functions outside the libraries (:data:`_LIBRARIES`: a script's
    lambda, a user module's loss) -- the values of the global names it reads that are
    numbers, strings, tensors, functions or modules (``TEMPERATURE = 2.0``, a loss module
    called inside it)."""
    deeper = depth + 1
    code = fn.__code__
    digest = hashlib.blake2b(_code_text(code).encode(), digest_size=8).hexdigest()
    parts = [f"{fn.__module__}.{fn.__qualname__}", digest]
    parts.append(f"defaults={_describe_setting(fn.__defaults__, deeper, seen)}")
    parts.append(f"kwdefaults={_describe_setting(fn.__kwdefaults__, deeper, seen)}")
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            contents = _describe_setting(cell.cell_contents, deeper, seen)
        except ValueError:  # an empty cell
            contents = "<empty>"
        parts.append(f"{name}={contents}")
    if str(fn.__module__).split(".")[0] not in _LIBRARIES:
        for name in sorted(n for n in _global_names(code) if n in fn.__globals__):
            value = fn.__globals__[name]
            if isinstance(value, _GLOBAL_VALUES):
                parts.append(f"global {name}={_describe_setting(value, deeper, seen)}")
    return " ".join(parts)


#: The kinds of global values a user function's description includes.
_GLOBAL_VALUES = (
    bool,
    int,
    float,
    complex,
    str,
    torch.Tensor,
    np.ndarray,
    np.generic,
    types.FunctionType,
    functools.partial,
    nn.Module,
)


def _global_names(code: types.CodeType) -> set[str]:
    """The names ``code`` (and the code of functions defined inside it) looks up."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _code_text(code: types.CodeType) -> str:
    """Bytecode, names and constants of ``code`` (nested code included), no line numbers."""
    consts = ",".join(_const_text(c) for c in code.co_consts)
    return f"{code.co_code.hex()}|{','.join(code.co_names)}|{consts}"


def _const_text(const: Any) -> str:
    if isinstance(const, types.CodeType):
        return "code:" + _code_text(const)
    if isinstance(const, tuple):
        return "(" + ",".join(_const_text(c) for c in const) + ")"
    if isinstance(const, frozenset):  # its iteration order depends on the string hash seed
        return "{" + ",".join(sorted(_const_text(c) for c in const)) + "}"
    return repr(const)


def _loss_description(loss_fn: Any) -> str:
    """The loss's type and settings (:func:`_describe_setting`): a module's public
    attributes and buffers, a function's code, defaults and closure, ``partial`` arguments,
    a declared loss's function and normaliser."""
    return _describe_setting(loss_fn)


def _bits_hash(tensors: Iterable[torch.Tensor]) -> int:
    """A 64-bit hash of the tensors' bits, independent of summation order and thread count.

    :math:`\\sum_i b_i c_i \\bmod 2^{64}` over the elements' bit patterns :math:`b_i`, with
    odd pseudo-random coefficients :math:`c_i` of the global element index (integer
    arithmetic wraps and is associative, so any reduction order gives the same bits).  A
    change of any single element always changes the hash.  Runs on the tensors' device:
    a few elementwise integer passes, one host synchronisation per device.
    """
    totals: dict[torch.device, torch.Tensor] = {}
    offset = 0
    for tensor in tensors:
        flat = tensor.detach()
        if flat.is_complex():
            flat = torch.view_as_real(flat)
        flat = flat.contiguous().reshape(-1)
        bits = flat.view(_INT_OF_SIZE[flat.element_size()])
        total = totals.setdefault(
            flat.device, torch.zeros((), dtype=torch.int64, device=flat.device)
        )
        for start in range(0, bits.numel(), _CHUNK):
            part = bits[start : start + _CHUNK].to(torch.int64)
            index = torch.arange(offset + start, offset + start + part.numel(), device=part.device)
            coef = index * _MULT + _INC
            coef = (coef ^ (coef >> 29)) | 1
            total += (part * coef).sum()
        offset += bits.numel()
    return sum(int(t) for t in totals.values()) % (1 << 64)


def _fingerprint(
    model: nn.Module,
    params: Sequence[tuple[str, torch.Tensor]],
    loss_fn: Any,
    weight: float | None,
    failed: bool,
    settings: dict[str, Any],
) -> list[float]:
    """This rank's values of :data:`_FIELDS` (only the failure flag on a failed rank)."""
    if failed:
        return [1.0] + [0.0] * (len(_FIELDS) - 1)
    from curvops.losses import loss_reduction

    shapes = ";".join(f"{name}:{tuple(p.shape)}" for name, p in params)
    dtype = params[0][1].dtype if params else None
    code = _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)
    described = ";".join(f"{k}={_describe_setting(v)}" for k, v in sorted(settings.items()))
    bits = _bits_hash(p for _, p in model.named_parameters())
    return [
        0.0,
        float("nan") if weight is None else float(weight),
        float(sum(p.numel() for _, p in params)),
        float(len(params)),
        _text_hash(shapes),
        float(code),
        float(_REDUCTIONS.index(loss_reduction(loss_fn))),
        _text_hash(_loss_description(loss_fn)),
        _text_hash(described),
        float(bits >> 32),
        float(bits & 0xFFFFFFFF),
    ]


def _decode(kind: str, value: float) -> str:
    if kind == "dtype":
        return str(_DTYPES[int(value)]) if int(value) < len(_DTYPES) else "another dtype"
    if kind == "reduction":
        return repr(_REDUCTIONS[int(value)])
    return str(int(value))


def _disagreements(table: np.ndarray) -> list[str]:
    """One phrase per field (other than the weight) whose value differs between ranks."""
    found: list[str] = []
    for j, (field, kind) in enumerate(_FIELDS):
        column = table[:, j].tolist()
        if kind in ("flag", "weight") or all(v == column[0] for v in column):
            continue
        groups: dict[float, list[int]] = {}
        for rank, value in enumerate(column):
            groups.setdefault(value, []).append(rank)
        if kind == "hash":
            text = f"{field} differ between " + " and ".join(f"ranks {r}" for r in groups.values())
        else:
            values = ", ".join(f"{_decode(kind, v)} on ranks {r}" for v, r in groups.items())
            text = f"{field}: {values}"
        if text not in found:  # the two words of the parameter hash
            found.append(text)
    return found


def check_ranks_agree(
    model: nn.Module,
    params: Sequence[tuple[str, torch.Tensor]],
    loss_fn: Any,
    process_group: Any = None,
    *,
    weight: float | None = None,
    failed: bool = False,
    settings: dict[str, Any] | None = None,
) -> float | None:
    """Check, with one small collective, that every rank builds the same operator.

    Each rank sends a fixed-size fingerprint (one ``all_gather`` of 11 float64
    numbers): the number, names, shapes and dtype of the selected parameters, the
    loss's reduction, type and settings (public attributes, buffers such as class
    weights, ``functools.partial`` arguments, a function's code and closure:
    :func:`_describe_setting`), the caller's ``settings`` (e.g. the operator type,
    ``bn_mode`` and ``output_fn``), a 64-bit hash of the bits of *all* the model's
    parameters (:func:`_bits_hash`: a few integer passes over the parameters on their
    device, :math:`O(P)`, nothing copied to the host), this rank's total batch weight
    and whether its own checks failed.  Every rank receives every fingerprint and
    takes the same decision from the same numbers, so either all ranks return or all
    raise: no rank is left waiting in a collective.  When the ``settings`` differ, one
    more collective (an ``all_gather_object`` of their descriptions, on every rank alike)
    names the settings that differ.  Buffers (e.g. BatchNorm running statistics) are not
    compared.  Ranks are numbered within the group.

    Parameters
    ----------
    model : torch.nn.Module
        The (unwrapped) model.
    params : sequence of (str, torch.Tensor)
        The selected ``(name, parameter)`` pairs (may be empty on a failed rank).
    loss_fn : Any
        The loss.
    process_group : ProcessGroup, None or False
        As for the operators (:func:`resolve_group`); no communication when it
        resolves to ``None``.
    weight : float, optional
        This rank's total batch weight (counted targets, samples) when known
        (``None`` for a DataLoader, whose batches are not read at construction).
    failed : bool
        This rank's own construction checks raised: it still joins the collective
        (so that the others do not hang), then the caller re-raises its own error.
    settings : dict, optional
        Further settings that must agree (values: numbers, strings, tensors, types,
        callables; see :func:`_describe_setting`), named in the error when they differ.

    Returns
    -------
    float or None
        The total weight over all ranks (``None`` when some rank did not know its
        own, and on a failed rank); ``weight`` itself without communication.

    Raises
    ------
    RuntimeError
        On the other ranks, when the checks of some rank failed (naming those ranks).
    ValueError
        The same message on every rank: the ranks disagree (naming what differs and
        the ranks of each value), or no rank has a counted target.

    Examples
    --------
    >>> net = nn.Linear(2, 3)
    >>> check_ranks_agree(net, list(net.named_parameters()), nn.CrossEntropyLoss(), weight=4.0)
    4.0
    """
    group = resolve_group(process_group)
    if group is None:
        return None if failed else weight
    if settings and "bn_mode" in settings and settings["bn_mode"] is None:
        # each module in its own mode: the modes are part of the matrix (a train-mode
        # rank and an eval-mode rank gave the sum of two matrices of different models)
        settings = {**settings, "module modes": module_modes(model)}
    mine = _fingerprint(model, params, loss_fn, weight, failed, settings or {})
    local = torch.tensor(mine, dtype=torch.float64, device=_comm_device(group))
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu().numpy()
    bad = [int(r) for r in np.flatnonzero(table[:, 0])]
    if failed:
        return None
    if bad:
        raise RuntimeError(
            f"The construction checks failed on rank(s) {bad} of the process group (see the "
            "error raised there); the other ranks stop here instead of waiting for them."
        )
    differences = _disagreements(table)
    if len(set(table[:, _SETTINGS_FIELD].tolist())) > 1:  # the same test on every rank
        named = _settings_differences(settings or {}, group)
        differences = [
            d + named if d.startswith(_FIELDS[_SETTINGS_FIELD][0]) else d for d in differences
        ]
    if differences:
        raise ValueError(
            "The ranks of the process group disagree: every rank must build the operator "
            "from the same model weights, parameter selection, dtype and loss (each on its "
            "own shard of the data); " + "; ".join(differences) + "."
        )
    return _total_weight(table[:, 1], len(gathered))


def module_modes(model: nn.Module) -> str:
    """The train/eval modes of ``model``'s modules, as compared across ranks for
    ``bn_mode=None``: which modules (by name) are in train mode, dropout modules left out
    (products switch dropout off whatever its mode).

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    >>> module_modes(net), module_modes(net.eval())
    ("train: '', '0', '1'", 'train: none')
    """
    names = [
        repr(name)
        for name, m in model.named_modules()
        if m.training and not isinstance(m, nn.modules.dropout._DropoutNd)
    ]
    return "train: " + (", ".join(names) if names else "none")


def _settings_differences(settings: dict[str, Any], group: Any) -> str:
    """Which of the caller's ``settings`` differ between the ranks, e.g. `` (kind: 'mc' on
    ranks [0], 'empirical' on ranks [1]; output_fn differs between ranks [0] and ranks
    [1])``: one ``all_gather_object`` of every setting's description, made only when the
    fingerprints' settings hashes differ (the same decision on every rank)."""
    mine = {key: (_describe_setting(value), _shown(value)) for key, value in settings.items()}
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    found = []
    for key in sorted(set().union(*gathered)):
        values = [g.get(key, ("<not set>", "not set")) for g in gathered]
        groups: dict[tuple[str, str | None], list[int]] = {}
        for rank, value in enumerate(values):
            groups.setdefault(value, []).append(rank)
        if len(groups) == 1:
            continue
        if all(shown is not None for _, shown in groups):
            found.append(f"{key}: " + ", ".join(f"{v[1]} on ranks {r}" for v, r in groups.items()))
        else:
            found.append(
                f"{key} differs between " + " and ".join(f"ranks {r}" for r in groups.values())
            )
    return f" ({'; '.join(found)})" if found else ""


def _shown(value: Any) -> str | None:
    """``repr`` of a short number, string, boolean or ``None``, for messages (else None)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value)
        return text if len(text) <= 60 else None
    return None


def _total_weight(weights: np.ndarray, world: int) -> float | None:
    """The sum of the ranks' weights in rank order (the same bits on every rank)."""
    if np.isnan(weights).any():
        return None
    total = float(sum(weights.tolist()))
    if total <= 0:
        raise argument_error(
            "data",
            "at least one counted target over all ranks of the process group (every target "
            "of every shard equals ignore_index or has class weight 0, so the mean loss is 0/0)",
            f"{world} shards without a counted target",
        )
    return total


# ---------------------------------------------------------------------------- sharding


class ShardedData(Data):
    """One rank's shard of a stream of batches, with *global* batch indices.

    Batch ``k`` of this shard is batch ``rank + k * world_size`` of the full stream,
    and :class:`~curvops.data.Batch` objects carry that global index (so seeded
    per-batch randomness, e.g. the Monte-Carlo Fisher's targets, and error
    messages match a single-process run).  Build it with :func:`shard_batches`.

    Parameters
    ----------
    local : Any
        This rank's batches (a loader or a sequence).
    rank, world_size : int
        This process's rank and the number of processes.
    num_samples : int, optional
        Total number of samples over all ranks, when known.

    Examples
    --------
    >>> import torch
    >>> batches = [(torch.zeros(2, 1), torch.zeros(2)) for _ in range(5)]
    >>> shard = shard_batches(batches, rank=1, world_size=2)
    >>> type(shard).__name__, [b.index for b in shard]
    ('ShardedData', [1, 3])
    """

    def __init__(
        self,
        local: Any,
        rank: int,
        world_size: int,
        *,
        num_samples: int | None = None,
    ) -> None:
        super().__init__(local)
        #: The local stream of raw ``(inputs, targets)`` batches (a list or a DataLoader).
        self.source = local
        self.rank = rank
        self.world_size = world_size
        self._shard_samples = num_samples

    def global_index(self, local_index: int) -> int:
        """Index in the full stream of this shard's batch ``local_index``."""
        return self.rank + self.world_size * local_index

    def __iter__(self) -> Iterator[Batch]:
        for batch in super().__iter__():
            yield dataclasses.replace(batch, index=self.global_index(batch.index))

    @property
    def num_samples(self) -> int:
        """Number of samples in this shard (not in the full stream)."""
        if self._shard_samples is None:
            self._shard_samples = super().num_samples
        return self._shard_samples


class _ShardBatchSampler(Sampler[list[int]]):
    """Every ``world_size``-th batch of a batch sampler, starting at ``rank``."""

    def __init__(self, base: Iterable[list[int]], rank: int, world_size: int) -> None:
        self.base, self.rank, self.world_size = base, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for i, indices in enumerate(self.base):
            if i % self.world_size == self.rank:
                yield indices

    def __len__(self) -> int:
        total = len(self.base)  # type: ignore[arg-type]
        return max(0, (total - self.rank + self.world_size - 1) // self.world_size)


class _SkipBatches:
    """Re-iterable view of every ``world_size``-th item of a re-iterable, from ``rank``.

    The wrapped loader's random streams (``generator``, ``sampler``, ``batch_sampler``)
    are forwarded, so that :class:`curvops.replay.ReplayStreams` replays them (a
    ``DataLoader(batch_size=None, shuffle=True)`` sharded here changed the user's next
    epoch), and each pass reads it through :func:`curvops.data.pass_iterator`.
    """

    def __init__(self, source: Iterable[Any], rank: int, world_size: int) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size

    @property
    def generator(self) -> Any:
        """The wrapped loader's ``generator`` (``None`` when it has none)."""
        return getattr(self.source, "generator", None)

    @property
    def sampler(self) -> Any:
        """The wrapped loader's ``sampler`` (``None`` when it has none)."""
        return getattr(self.source, "sampler", None)

    @property
    def batch_sampler(self) -> Any:
        """The wrapped loader's ``batch_sampler`` (``None`` when it has none)."""
        return getattr(self.source, "batch_sampler", None)

    def __iter__(self) -> Iterator[Any]:
        iterator = pass_iterator(self.source)
        try:
            for i, item in enumerate(iterator):
                if i % self.world_size == self.rank:
                    yield item
        finally:
            close_pass_iterator(iterator)


def _check_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise argument_error("world_size", "an integer >= 1", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise argument_error("rank", f"an integer with 0 <= rank < {world_size}", rank)
    return rank, world_size


def _too_few(num_batches: int, rank: int, world_size: int) -> Exception:
    return argument_error(
        "data",
        f"at least {world_size} batches to shard over {world_size} processes "
        f"(rank {rank} would get none; use a smaller batch size)",
        f"{num_batches} batches",
    )


def _shard_sample_count(base: Any, rank: int, world_size: int) -> int | None:
    """Samples in a shard of a plain ``BatchSampler``, by arithmetic (no data loaded)."""
    if type(base) is not BatchSampler:
        return None
    try:
        n, num_batches = len(base.sampler), len(base)  # type: ignore[arg-type]
    except TypeError:
        return None
    size = base.batch_size
    last = size if base.drop_last else n - size * (num_batches - 1)
    mine = range(rank, num_batches, world_size)
    return sum(last if i == num_batches - 1 else size for i in mine)


def shard_batches(data: Any, rank: int | None = None, world_size: int | None = None) -> ShardedData:
    """This rank's shard of ``data``: whole batches ``rank, rank + W, rank + 2W, ...``.

    Sharding whole batches (round robin) keeps every batch as in a single-process
    run, so the distributed operator is the single-process operator on the full
    data, BatchNorm batch statistics included; shards may differ in size by one
    batch and the last batch may be smaller (weights are exact).

    Parameters
    ----------
    data:
        A sequence of ``(inputs, targets)`` batches or a re-iterable of them.  For a
        :class:`~torch.utils.data.DataLoader` with a batch sampler a new loader is
        built over the same dataset (same ``collate_fn``, workers, pinning) whose
        batch sampler keeps this rank's batches, so other ranks' samples are never
        loaded; any other iterable is walked in full and the other batches skipped.
        The batch order must be the same on every rank (``shuffle=False`` or the
        same generator seed).
    rank, world_size:
        This process's position; default :func:`get_rank` / :func:`get_world_size`
        of the default group.

    Returns
    -------
    ShardedData
        Accepted as ``data`` by every curvature operator; its batches carry their
        global indices.

    Raises
    ------
    ValueError
        Bad ``rank``/``world_size``; a single ``(inputs, targets)`` batch (split it
        into a list of batches first); fewer batches than processes.

    Notes
    -----
    A :class:`~torch.utils.data.distributed.DistributedSampler` also works (give each
    rank's loader as ``data`` directly, without this function) but differs from the
    single-process operator: it pads the shards to equal length by repeating up to
    ``W - 1`` samples (or drops them with ``drop_last=True``), shuffles unless
    ``shuffle=False``, and changes the composition of every batch.

    Examples
    --------
    >>> batches = [(torch.zeros(2, 1), torch.zeros(2)) for _ in range(5)]
    >>> shard = shard_batches(batches, rank=1, world_size=2)
    >>> [b.index for b in shard], shard.num_samples
    ([1, 3], 4)
    """
    rank = get_rank() if rank is None else rank
    world_size = get_world_size() if world_size is None else world_size
    rank, world_size = _check_rank(rank, world_size)
    if isinstance(data, ShardedData):
        raise argument_error("data", "unsharded data", data)
    if isinstance(data, Data):
        data = data._source  # the raw stream; indices are recomputed below
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor):
        raise argument_error(
            "data",
            "a sequence of batches or a DataLoader (split a single (inputs, targets) batch "
            "into a list of batches before sharding)",
            data,
        )
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes, torch.Tensor)):
        if len(data) <= rank:
            raise _too_few(len(data), rank, world_size)
        return ShardedData(list(data[rank::world_size]), rank, world_size)
    if isinstance(data, DataLoader) and data.batch_sampler is not None:
        base = data.batch_sampler
        sampler = _ShardBatchSampler(base, rank, world_size)
        try:
            count = len(sampler)
        except TypeError:
            count = None
        if count == 0:
            raise _too_few(len(base), rank, world_size)  # type: ignore[arg-type]
        workers: dict[str, Any] = {}
        if data.num_workers > 0:
            workers = {
                "prefetch_factor": data.prefetch_factor,
                "persistent_workers": data.persistent_workers,
                "multiprocessing_context": data.multiprocessing_context,
            }
        loader: DataLoader[Any] = DataLoader(
            data.dataset,
            batch_sampler=sampler,
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=data.pin_memory,
            timeout=data.timeout,
            worker_init_fn=data.worker_init_fn,
            generator=data.generator,
            **workers,
        )
        samples = _shard_sample_count(base, rank, world_size)
        return ShardedData(loader, rank, world_size, num_samples=samples)
    # a DataLoader is re-iterable: iter() on it would draw its workers' base seed from its
    # generator (and start the workers), changing the user's next epoch
    if isinstance(data, DataLoader) or (isinstance(data, Iterable) and iter(data) is not data):
        return ShardedData(_SkipBatches(data, rank, world_size), rank, world_size)
    raise argument_error(
        "data", "a sequence of batches or a re-iterable DataLoader", data, kind=TypeError
    )
