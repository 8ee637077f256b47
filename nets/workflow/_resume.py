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
:class:`spectral.resume.StateMismatchError`.

>>> import tempfile, os
>>> describe_model("MLP"), file_digest(None)
('MLP', None)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nets.workflow._resolve import model_fingerprint
from spectral.resume import Checkpoint

__all__ = ["describe_model", "describe_output_fn", "describe_value", "file_digest", "open_state"]

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
    """A model name as is; an ``nn.Module`` by its class and parameter fingerprint."""
    if isinstance(model, nn.Module):
        return f"{type(model).__qualname__}:{model_fingerprint(model)}"
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
    if isinstance(value, nn.Module):  # a loss module: class and options, no address
        reduction = getattr(value, "reduction", None)
        return f"{type(value).__qualname__}({value.extra_repr()}, reduction={reduction})"
    if callable(value):
        return getattr(value, "__qualname__", type(value).__qualname__)
    return repr(value)


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


def open_state(state_path: PathLike | None, kind: str, config: dict[str, Any]) -> Checkpoint | None:
    """A :class:`spectral.resume.Checkpoint` for ``state_path`` (``None`` when not resuming)."""
    if state_path is None:
        return None
    return Checkpoint(state_path, kind=kind, config=config)
