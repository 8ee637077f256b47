"""Training checkpoints: atomic writing and pickle-free loading.

A checkpoint ``checkpoint-XXXXX.pt`` (``XXXXX`` = completed epochs, zero-padded
to five digits) is a ``torch.save`` archive of a dict

==================  ===========================================================
``format``          ``"deep-curvature-checkpoint"``
``format_version``  ``1``
``epoch``           completed epochs (int)
``state_dict``      ``model.state_dict()``
``optimizer``       ``optimizer.state_dict()`` or ``None``
``config``          JSON-safe dict: ``model`` (registered name or ``None``),
                    ``model_class``, ``num_classes``, ``in_channels``,
                    ``input_size``, ``model_kwargs``, ``dataset``, ... (see
                    :func:`nets.training.train_network`)
extra keys          e.g. ``rng_state`` (generator states as uint8 tensors),
                    ``swa_state_dict``
==================  ===========================================================

(``state_dict``/``optimizer``/``epoch`` are the key names of the original
SWA/Deep Curvature code).  Files are written through
:func:`spectral.io.atomic_write` and read with ``torch.load(weights_only=True)``:
only tensors and plain containers can be loaded, never arbitrary objects.

>>> import tempfile, os, torch
>>> d = tempfile.mkdtemp()
>>> net = torch.nn.Linear(2, 1)
>>> path = os.path.join(d, checkpoint_name(3))
>>> save_checkpoint(path, net, None, 3, {"model": None})
>>> ckpt = load_checkpoint(path)
>>> os.path.basename(path), ckpt["epoch"], sorted(ckpt["state_dict"])
('checkpoint-00003.pt', 3, ['bias', 'weight'])
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spectral.errors import argument_error
from spectral.io import CorruptFileError, atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "UnsafeFileError",
    "checkpoint_name",
    "json_safe",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "model_from_checkpoint",
    "save_checkpoint",
    "swa_checkpoint_name",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "deep-curvature-checkpoint"


class UnsafeFileError(CorruptFileError):
    """A file asks to unpickle code or objects outside the allowed set; it was not loaded."""


def checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint after ``epoch`` completed epochs.

    >>> checkpoint_name(5)
    'checkpoint-00005.pt'
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise argument_error("epoch", "a non-negative integer", epoch)
    return f"checkpoint-{epoch:05d}.pt"


def swa_checkpoint_name(epoch: int) -> str:
    """File name of the SWA (averaged-model) checkpoint after ``epoch`` epochs.

    >>> swa_checkpoint_name(12)
    'swa-00012.pt'
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise argument_error("epoch", "a non-negative integer", epoch)
    return f"swa-{epoch:05d}.pt"


def json_safe(value: Any) -> Any:
    """Convert ``value`` to JSON-safe primitives (tuples to lists, others to ``repr``).

    Non-finite floats become strings (``"nan"``, ``"inf"``) so that the result is
    strict JSON.

    >>> json_safe({"betas": (0.9, 0.999), "device": object}) == {
    ...     "betas": [0.9, 0.999], "device": "<class 'object'>"}
    True
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.device | torch.dtype):
        return str(value)
    return repr(value)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    epoch: int,
    config: dict[str, Any],
    **extra: Any,
) -> None:
    """Write a checkpoint atomically (temporary file, fsync, rename).

    Parameters
    ----------
    path:
        Destination, normally ``dir / checkpoint_name(epoch)``.
    model, optimizer:
        Their ``state_dict()`` are stored (``optimizer`` may be ``None``).
    epoch:
        Completed epochs.
    config:
        JSON-safe description of the run (converted with :func:`json_safe`).
    **extra:
        More entries; they must be tensors or plain containers so that the file
        loads with ``weights_only=True``.
    """
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", model, kind=TypeError)
    if not isinstance(config, dict):
        raise argument_error("config", "a dict", config, kind=TypeError)
    reserved = {"format", "format_version", "epoch", "state_dict", "optimizer", "config"}
    clash = reserved & set(extra)
    if clash:
        raise argument_error("extra", f"keys other than {sorted(reserved)}", sorted(clash))
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": 1,
        "epoch": int(epoch),
        "state_dict": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "config": json.loads(json.dumps(json_safe(config))),
        **extra,
    }
    with atomic_write(path, "wb") as handle:
        torch.save(payload, handle)
    logger.debug("saved checkpoint %s (epoch %d)", path, epoch)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    A bare ``state_dict`` (a dict of tensors, as saved by
    ``torch.save(model.state_dict(), path)``) is accepted too and returned as
    ``{"state_dict": ..., "epoch": None, "optimizer": None, "config": {}}``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    UnsafeFileError
        If the file contains pickled objects other than tensors and plain
        containers (it is refused, nothing is executed).
    CorruptFileError
        If the file is truncated, corrupted or not a checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"No such checkpoint file: '{p}'.")
    try:
        payload = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"Checkpoint '{p}' was refused: it contains objects that torch.load(weights_only=True) "
            f"does not allow (only tensors and plain containers are loaded). {exc}"
        ) from exc
    except Exception as exc:  # any other failure to parse (IndexError, KeyError...) is corruption
        raise CorruptFileError(
            f"Checkpoint '{p}' is truncated, corrupted or not a torch checkpoint ({exc})."
        ) from exc
    if not isinstance(payload, dict):
        raise CorruptFileError(
            f"Checkpoint '{p}' does not hold a dict (found {type(payload).__name__})."
        )
    if "state_dict" in payload:
        payload.setdefault("epoch", None)
        payload.setdefault("optimizer", None)
        payload.setdefault("config", {})
        return payload
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return {"state_dict": payload, "epoch": None, "optimizer": None, "config": {}}
    raise CorruptFileError(
        f"File '{p}' is not a checkpoint: it has neither a 'state_dict' entry nor only tensors "
        f"(keys: {sorted(map(str, payload))[:10]})."
    )


def load_model_state(model: nn.Module, checkpoint: dict[str, Any] | str | os.PathLike[str]) -> None:
    """Load a checkpoint's weights into ``model`` (strictly), with a clear error on mismatch.

    Raises
    ------
    ValueError
        If the checkpoint is for another architecture (missing/unexpected keys or
        shapes that differ); the message lists the first differences.
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    state = ckpt["state_dict"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        described = ckpt.get("config", {}).get("model") or "an unknown model"
        raise ValueError(
            f"Argument 'checkpoint': expected a checkpoint of this {type(model).__name__}; "
            f"received one of {described} (missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}, shape mismatches {wrong[:5]})."
        )
    model.load_state_dict(state)


def model_from_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model described by a checkpoint's config and load its weights.

    Uses ``config['model']``, ``num_classes``, ``in_channels``, ``input_size`` and
    ``model_kwargs`` with :func:`nets.models.get_model`; the model is returned in
    eval mode on ``device`` together with the loaded checkpoint dict.

    Raises
    ------
    ValueError
        If the checkpoint does not name a registered model (e.g. it was trained
        from a custom ``nn.Module``: build that module yourself and use
        :func:`load_model_state`).
    """
    from nets.device import resolve_device
    from nets.models import get_model

    ckpt = load_checkpoint(path)
    config = ckpt.get("config") or {}
    name = config.get("model")
    if not isinstance(name, str):
        raise ValueError(
            f"Argument 'checkpoint_path': expected a checkpoint whose config names a registered "
            f"model; received '{path}' with model={name!r} (class "
            f"{config.get('model_class')!r}). Build the model yourself and call "
            f"load_model_state(model, checkpoint)."
        )
    model = get_model(
        name,
        num_classes=int(config.get("num_classes", 10)),
        in_channels=int(config.get("in_channels", 3)),
        input_size=int(config.get("input_size", 32)),
        **dict(config.get("model_kwargs") or {}),
    )
    load_model_state(model, ckpt)
    model.to(resolve_device(device))
    model.eval()
    return model, ckpt


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The ``checkpoint-XXXXX.pt`` in ``directory`` with the largest epoch, or ``None``.

    >>> import tempfile
    >>> latest_checkpoint(tempfile.mkdtemp()) is None
    True
    """
    d = Path(directory)
    if not d.is_dir():
        return None
    found = []
    for p in d.glob("checkpoint-*.pt"):
        stem = p.stem.split("-", 1)[1]
        if stem.isdigit():
            found.append((int(stem), p))
    return max(found)[1] if found else None
