"""What a :class:`nets.CurvatureTracker` row measures, recorded in the row.

Every row of a tracker's JSON-lines file carries ``settings``: the measurement's
cadence and accuracy (``every``, ``trace_probes``, ``tol``, ``seed``, ``bn_mode``,
``density_every``), the matrix (a digest of the selected parameters' names and
shapes, the block names, the operator's extra keyword arguments, the loss's full
configuration from :func:`describe_loss`) and a digest of the measurement set's
tensors.  A tracker that resumes a file compares its own settings with the rows':
rows of another matrix or measurement set in one file would read as one curve, so a
difference is refused, naming the argument (before, only ``kind`` and ``top_k`` were
compared, and a resumed file silently mixed measurements of different matrices; the
loss was not recorded, so a file continued with ``label_smoothing`` or class weights
mixed two matrices in one curve).  Rows written before the loss was recorded are
continued with a warning (their loss cannot be checked).

:func:`describe_loss` is shared with the resumable workflow runs
(:mod:`nets.workflow._resume`): a loss module by its class and every setting
(``reduction``, ``ignore_index``, ``label_smoothing``, the ``weight`` tensor...), a
function by its qualified name and a digest of its code, closure and defaults.

>>> import torch
>>> a = measurement_settings(every=2, trace_probes=0, tol=1e-4, seed=0, bn_mode=None,
...     density_every=None, parameters=[("w", (2,))], blocks=[], operator_kwargs={},
...     data=(torch.ones(2), torch.zeros(2)))
>>> b = dict(a, every=3)
>>> settings_difference(a, b)
('every', 'every = 2 in the file, 3 now')
"""

from __future__ import annotations

import enum
import functools
import hashlib
import inspect
import json
import logging
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from spectral.errors import argument_error

__all__ = [
    "ARGUMENT_OF",
    "data_digest",
    "describe_callable",
    "describe_loss",
    "feed_hash",
    "measurement_settings",
    "settings_difference",
    "tensor_digest",
]

logger = logging.getLogger(__name__)

#: settings key -> the tracker argument it comes from (for error messages).
ARGUMENT_OF = {
    "every": "every",
    "trace_probes": "trace_probes",
    "tol": "tol",
    "seed": "seed",
    "bn_mode": "bn_mode",
    "density_every": "density_every",
    "density_iters": "density_iters",
    "density_probes": "density_probes",
    "parameters": "params",
    "blocks": "blocks",
    "operator": "operator_kwargs",
    "loss": "loss_fn",
    "data": "data",
}

#: Containers nested deeper than this in a loss are described by their type only.
_MAX_DEPTH = 8


def feed_hash(hasher: Any, value: Any, argument: str = "data") -> None:
    """Feed ``value`` to ``hasher``: tensors and arrays by dtype, shape and bytes, containers
    element by element, numbers and strings by ``repr``.

    An object whose ``repr`` holds a memory address (it would hash differently in every
    process) is refused with a ``TypeError`` naming ``argument``; an object with an
    ``__array__`` (a PIL image) is hashed as that array.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"tensor:{t.dtype}:{tuple(value.shape)}:".encode())
        hasher.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray) and value.dtype != object:
        array = np.ascontiguousarray(value)
        hasher.update(f"array:{array.dtype.str}:{array.shape}:".encode())
        hasher.update(array.tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            hasher.update(f"key:{key}:".encode())
            feed_hash(hasher, value[key], argument)
    elif isinstance(value, list | tuple):
        hasher.update(f"seq:{len(value)}:".encode())
        for item in value:
            feed_hash(hasher, item, argument)
    elif value is None or isinstance(value, bool | int | float | complex | str | bytes):
        hasher.update(f"value:{value!r}:".encode())
    elif hasattr(value, "__array__"):
        feed_hash(hasher, np.asarray(value), argument)
    else:
        text = repr(value)
        if " at 0x" in text:
            raise argument_error(
                argument,
                "tensors, arrays, numbers, strings or containers of them (to fingerprint)",
                f"an object of type {type(value).__qualname__}",
                kind=TypeError,
            )
        hasher.update(f"value:{type(value).__qualname__}:{text}:".encode())


def data_digest(data: Any) -> str:
    """A SHA-256 digest of a measurement set (a batch or a list of batches of tensors).

    >>> data_digest((torch.ones(2), torch.zeros(2))) == data_digest((torch.ones(2), torch.zeros(2)))
    True
    """
    hasher = hashlib.sha256()
    feed_hash(hasher, data)
    return hasher.hexdigest()[:16]


def tensor_digest(value: torch.Tensor | np.ndarray) -> str:
    """``'sha256:<hex>'`` of a tensor's (array's) dtype, shape and bytes, exactly as stored.

    >>> tensor_digest(torch.ones(2)) == tensor_digest(torch.ones(2, dtype=torch.float64))
    False
    """
    hasher = hashlib.sha256()
    feed_hash(hasher, value)
    return "sha256:" + hasher.hexdigest()[:32]


def _qualified(obj: Any) -> str:
    """``module.qualname`` of a class or function (``repr`` for anything without one)."""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if name is None:
        return type(obj).__qualname__
    module = getattr(obj, "__module__", None)
    return f"{module}.{name}" if module else str(name)


def _code_digest(code: types.CodeType) -> str:
    """sha256 of a code object's bytecode, names and constants (nested code included):
    the same source gives the same digest in every process of one Python version."""
    hasher = hashlib.sha256()

    def feed(c: types.CodeType) -> None:
        hasher.update(c.co_code)
        hasher.update(repr((c.co_names, c.co_varnames, c.co_argcount)).encode())
        for const in c.co_consts:
            if isinstance(const, types.CodeType):
                feed(const)
            elif isinstance(const, frozenset):  # set order depends on string hashing
                hasher.update(repr(sorted(repr(v) for v in const)).encode())
            else:
                hasher.update(repr(const).encode())

    feed(code)
    return "sha256:" + hasher.hexdigest()[:32]


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


@dataclass(frozen=True)
class _Walk:
    """Where :func:`_describe` is: its nesting depth and the objects it names instead of
    describing (``id -> name``: the tracked model's modules, parameters and buffers)."""

    depth: int
    named: Mapping[int, str]

    def deeper(self) -> _Walk:
        return _Walk(self.depth + 1, self.named)


def _describe_function(fn: types.FunctionType, walk: _Walk) -> dict[str, Any]:
    """A Python function: its qualified name, a digest of its code, and the values it
    reads that are not code: closure cells, defaults and the plain data (tensors,
    arrays, numbers, strings, tuples) among the globals it names."""
    out: dict[str, Any] = {"function": _qualified(fn), "code": _code_digest(fn.__code__)}
    if fn.__closure__:
        cells = []
        for cell in fn.__closure__:
            try:
                cells.append(_describe(cell.cell_contents, walk.deeper()))
            except ValueError:  # an empty cell
                cells.append("<empty>")
        out["closure"] = cells
    if fn.__defaults__:
        out["defaults"] = _describe(list(fn.__defaults__), walk.deeper())
    if fn.__kwdefaults__:
        out["kwdefaults"] = _describe(dict(fn.__kwdefaults__), walk.deeper())
    plain = (torch.Tensor, np.ndarray, bool, int, float, str, tuple)
    namespace = fn.__globals__
    data = {n: namespace[n] for n in sorted(_global_names(fn.__code__)) if n in namespace}
    data = {n: v for n, v in data.items() if isinstance(v, plain)}
    if data:
        out["globals"] = _describe(data, walk.deeper())
    return out


def _describe_module(module: nn.Module, walk: _Walk) -> dict[str, Any]:
    """An ``nn.Module`` (a loss): its class, every public attribute (``reduction``,
    ``ignore_index``, ``label_smoothing``, ...), every parameter and buffer (``weight``,
    ``pos_weight``) by digest and its submodules, recursively; never its address."""
    out: dict[str, Any] = {"type": _qualified(type(module))}
    for key, value in sorted(vars(module).items()):
        if not key.startswith("_") and key != "training":
            out[key] = _describe(value, walk.deeper())
    for kind, entries in (("parameter", module._parameters), ("buffer", module._buffers)):
        for name, tensor in entries.items():
            out[f"{kind} {name}"] = None if tensor is None else _describe(tensor, walk)
    for name, sub in module._modules.items():
        out[f"module {name}"] = None if sub is None else _describe(sub, walk.deeper())
    return out


def _describe(value: Any, walk: _Walk) -> Any:
    """JSON-safe description of ``value`` (see :func:`describe_loss`)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if id(value) in walk.named:
        return walk.named[id(value)]
    if isinstance(value, torch.Tensor | np.ndarray):
        return tensor_digest(value)
    if isinstance(value, np.generic):
        return value.item()
    if walk.depth > _MAX_DEPTH:
        return f"<{_qualified(type(value))} nested too deeply>"
    if isinstance(value, Mapping):
        return {str(k): _describe(v, walk.deeper()) for k, v in sorted(value.items(), key=str)}
    if isinstance(value, list | tuple):
        return [_describe(v, walk.deeper()) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_describe(v, walk.deeper()) for v in value), key=repr)
    if isinstance(value, torch.dtype | torch.device | enum.Enum | complex | bytes):
        return repr(value)
    if isinstance(value, nn.Module):
        return _describe_module(value, walk)
    if isinstance(value, functools.partial):
        return {
            "partial": _describe(value.func, walk.deeper()),
            "args": _describe(list(value.args), walk.deeper()),
            "keywords": _describe(dict(value.keywords), walk.deeper()),
        }
    if inspect.ismethod(value):
        return {
            "method": _qualified(value.__func__),
            "self": _describe(value.__self__, walk.deeper()),
        }
    if isinstance(value, types.FunctionType):
        return _describe_function(value, walk)
    if isinstance(value, type) or inspect.isbuiltin(value) or inspect.isroutine(value):
        return _qualified(value)
    text = repr(value)
    if hasattr(value, "__dict__"):  # a callable object: its class and public attributes
        attributes = {k: v for k, v in vars(value).items() if not k.startswith("_")}
        return {"type": _qualified(type(value)), **_describe(attributes, walk.deeper())}
    return _qualified(type(value)) if " at 0x" in text else f"{_qualified(type(value))}:{text}"


def describe_loss(loss_fn: Any, *, model: nn.Module | None = None) -> Any:
    """JSON-safe description of everything that determines a loss's values.

    * an ``nn.Module`` (``nn.CrossEntropyLoss``, a custom loss): ``{"type": module.class,
      <every public attribute>, "buffer weight": digest, ...}``: ``reduction``,
      ``ignore_index``, ``label_smoothing``, the class ``weight`` and ``pos_weight``
      tensors (SHA-256 of dtype, shape and bytes), submodules recursively;
    * a function: its qualified name and a digest of its bytecode, with its closure
      values, defaults and the plain data among the globals it reads (two lambdas of
      one module differ);
    * ``functools.partial``: the function, positional and keyword arguments; a bound
      method: the function and its object; another callable object: its class and
      public attributes.

    Two losses with equal descriptions compute the same values on the same inputs (up
    to code outside the description: the library functions they call).  With a
    ``model``, the model and its modules, parameters and buffers met inside the loss
    (a regulariser's closure) are described by their names in it, not by their values:
    the tracker compares its loss across training steps, where those values change.

    >>> a = describe_loss(nn.CrossEntropyLoss(label_smoothing=0.1))
    >>> a["type"], a["label_smoothing"], a["reduction"], a["buffer weight"]
    ('torch.nn.modules.loss.CrossEntropyLoss', 0.1, 'mean', None)
    >>> a == describe_loss(nn.CrossEntropyLoss())
    False
    >>> describe_loss(torch.nn.functional.mse_loss)["function"]
    'torch.nn.functional.mse_loss'
    """
    named: dict[int, str] = {}
    if model is not None:
        named[id(model)] = "<the model>"
        for kind, entries in (
            ("parameter", model.named_parameters()),
            ("buffer", model.named_buffers()),
        ):
            named.update((id(t), f"<the model's {kind} {n}>") for n, t in entries)
        named.update((id(m), f"<the model's module {n}>") for n, m in model.named_modules() if n)
    return _describe(loss_fn, _Walk(0, named))


def describe_callable(fn: Any) -> Any:
    """JSON-safe description of any callable (a learning-rate schedule), as
    :func:`describe_loss` describes a loss: a function by its qualified name and a digest
    of its code, closure, defaults and the plain data among its globals; a ``partial``,
    bound method or callable object by its parts.

    The digest of a function's code is that of one Python version: the same function
    under another version is described differently.

    >>> def half(epoch, total, lr0, ratio):
    ...     return lr0 / 2
    >>> describe_callable(half)["function"]
    'nets.measurement_settings.half'
    """
    return _describe(fn, _Walk(0, {}))


def measurement_settings(
    *,
    every: int,
    trace_probes: int,
    tol: float,
    seed: int,
    bn_mode: str | None,
    density_every: int | None,
    parameters: Sequence[tuple[str, Sequence[int]]],
    density_iters: int | None = None,
    density_probes: int | None = None,
    blocks: Sequence[str],
    operator_kwargs: Mapping[str, Any],
    data: Any,
    loss_fn: Any = None,
    model: nn.Module | None = None,
) -> dict[str, Any]:
    """The JSON-safe ``settings`` of a tracker's rows (module docstring); ``loss`` is
    :func:`describe_loss` of ``loss_fn`` (the trained ``model`` met inside it named, not
    hashed: its values change from row to row).  The density snapshots' resolution
    (``density_iters``, ``density_probes``) is recorded only when there are snapshots
    (``density_every`` set): without them it measures nothing."""
    names = json.dumps([[n, list(s)] for n, s in parameters])
    snapshots = density_every is not None
    return {
        "every": int(every),
        "trace_probes": int(trace_probes),
        "tol": float(tol),
        "seed": int(seed),
        "bn_mode": bn_mode,
        "density_every": density_every,
        "density_iters": density_iters if snapshots else None,
        "density_probes": density_probes if snapshots else None,
        "parameters": hashlib.sha256(names.encode()).hexdigest()[:16],
        "blocks": sorted(str(b) for b in blocks),
        "operator": repr(sorted(operator_kwargs.items())),
        "loss": describe_loss(loss_fn, model=model),
        "data": data_digest(data),
    }


def settings_difference(
    recorded: Mapping[str, Any], current: Mapping[str, Any]
) -> tuple[str, str] | None:
    """The first setting in which a file's rows and a tracker differ: ``(argument, what)``.

    Rows written before the loss was recorded (no ``loss`` key) are not compared on
    it: a warning says so.  Rows written before the density snapshots' resolution was
    recorded are not compared on it.

    >>> settings_difference({"tol": 1e-4}, {"tol": 1e-4}) is None
    True
    """
    for key in ARGUMENT_OF:
        if key == "loss" and key not in recorded:
            logger.warning(
                "tracker: the file's rows do not record their loss (written by an older "
                "version); the loss_fn cannot be checked against them"
            )
            continue
        if key in ("density_iters", "density_probes") and key not in recorded:
            continue
        if recorded.get(key) != current.get(key):
            before, now = recorded.get(key), current.get(key)
            if key in ("parameters", "data", "operator"):
                what = f"another {key} selection" if key == "parameters" else f"another {key}"
                return ARGUMENT_OF[key], f"{what} than the file's rows were measured with"
            if key == "loss":
                return ARGUMENT_OF[key], (
                    f"another loss than the file's rows were measured with ({before} in the "
                    f"file, {now} now)"
                )
            return ARGUMENT_OF[key], f"{key} = {before} in the file, {now} now"
    return None
