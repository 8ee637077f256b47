"""What a :class:`nets.CurvatureTracker` row measures, recorded in the row.

Every row of a tracker's JSON-lines file carries ``settings``: the measurement's
cadence and accuracy (``every``, ``trace_probes``, ``tol``, ``seed``, ``bn_mode``,
``density_every``), the matrix (a digest of the selected parameters' names and shapes,
the block names, the operator's extra keyword arguments) and a digest of the measurement
set's tensors.  A tracker that resumes a file compares its own settings with the rows':
rows of another matrix or measurement set in one file would read as one curve, so a
difference is refused, naming the argument (before, only ``kind`` and ``top_k`` were
compared, and a resumed file silently mixed measurements of different matrices).

>>> import torch
>>> a = measurement_settings(every=2, trace_probes=0, tol=1e-4, seed=0, bn_mode=None,
...     density_every=None, parameters=[("w", (2,))], blocks=[], operator_kwargs={},
...     data=(torch.ones(2), torch.zeros(2)))
>>> b = dict(a, every=3)
>>> settings_difference(a, b)
('every', 'every = 2 in the file, 3 now')
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["ARGUMENT_OF", "data_digest", "measurement_settings", "settings_difference"]

#: settings key -> the tracker argument it comes from (for error messages).
ARGUMENT_OF = {
    "every": "every",
    "trace_probes": "trace_probes",
    "tol": "tol",
    "seed": "seed",
    "bn_mode": "bn_mode",
    "density_every": "density_every",
    "parameters": "params",
    "blocks": "blocks",
    "operator": "operator_kwargs",
    "data": "data",
}


def _feed(hasher: Any, value: Any) -> None:
    """Hash tensors by dtype, shape and bytes, containers element by element."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        hasher.update(f"tensor:{t.dtype}:{tuple(value.shape)}:".encode())
        hasher.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            hasher.update(f"key:{key}:".encode())
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(f"seq:{len(value)}:".encode())
        for item in value:
            _feed(hasher, item)
    else:
        hasher.update(f"value:{value!r}:".encode())


def data_digest(data: Any) -> str:
    """A SHA-256 digest of a measurement set (a batch or a list of batches of tensors).

    >>> data_digest((torch.ones(2), torch.zeros(2))) == data_digest((torch.ones(2), torch.zeros(2)))
    True
    """
    hasher = hashlib.sha256()
    _feed(hasher, data)
    return hasher.hexdigest()[:16]


def measurement_settings(
    *,
    every: int,
    trace_probes: int,
    tol: float,
    seed: int,
    bn_mode: str | None,
    density_every: int | None,
    parameters: Sequence[tuple[str, Sequence[int]]],
    blocks: Sequence[str],
    operator_kwargs: Mapping[str, Any],
    data: Any,
) -> dict[str, Any]:
    """The JSON-safe ``settings`` of a tracker's rows (module docstring)."""
    names = json.dumps([[n, list(s)] for n, s in parameters])
    return {
        "every": int(every),
        "trace_probes": int(trace_probes),
        "tol": float(tol),
        "seed": int(seed),
        "bn_mode": bn_mode,
        "density_every": density_every,
        "parameters": hashlib.sha256(names.encode()).hexdigest()[:16],
        "blocks": sorted(str(b) for b in blocks),
        "operator": repr(sorted(operator_kwargs.items())),
        "data": data_digest(data),
    }


def settings_difference(
    recorded: Mapping[str, Any], current: Mapping[str, Any]
) -> tuple[str, str] | None:
    """The first setting in which a file's rows and a tracker differ: ``(argument, what)``.

    >>> settings_difference({"tol": 1e-4}, {"tol": 1e-4}) is None
    True
    """
    for key in ARGUMENT_OF:
        if recorded.get(key) != current.get(key):
            before, now = recorded.get(key), current.get(key)
            if key in ("parameters", "data", "operator"):
                what = f"another {key} selection" if key == "parameters" else f"another {key}"
                return ARGUMENT_OF[key], f"{what} than the file's rows were measured with"
            return ARGUMENT_OF[key], f"{key} = {before} in the file, {now} now"
    return None
