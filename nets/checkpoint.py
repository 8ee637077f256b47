"""Training checkpoints: atomic writing and pickle-free loading.

A checkpoint ``checkpoint-XXXXX.pt`` (``XXXXX`` = completed epochs, zero-padded
to five digits) is a ``torch.save`` archive of a dict

==================  ===========================================================
``format``          ``"deep-curvature-checkpoint"``
``format_version``  ``2`` (``1``: written before checksums, see below)
``checksum``        ``"sha256:<hex>"`` of the content (below)
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

Integrity.  torch's zip reader checks no CRC, so a flipped bit in a tensor
would load silently as another weight.  Every checkpoint therefore carries
two SHA-256 digests, both verified by :func:`load_checkpoint`:

* ``checksum``, over the content: every entry but ``checksum`` itself, walked
  in a canonical order (mapping keys sorted by type name and ``repr``; lists
  in order), each tensor as its path, dtype, shape and the bytes of its
  values, every other leaf as its type and ``repr``;
* a file digest, over every byte of the file before its last 86 bytes,
  stored in those 86 bytes as the zip archive's comment
  (``deep-curvature-sha256:<hex>``; zip readers, ``torch.load`` included,
  ignore comments), so that a flip anywhere, zip metadata included, is seen.

A mismatch of either raises :class:`spectral.io.CorruptFileError`.  A
version-2 file without its file digest (e.g. a loaded checkpoint saved again
with a plain ``torch.save``) is accepted only if its content checksum
verifies.  Files without any checksum (format version 1, written by earlier
versions of this package, and bare ``state_dict`` files of other programs)
still load, with a logged warning that their integrity cannot be verified;
saving them again with :func:`save_checkpoint` adds the checksums.

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

import hashlib
import json
import logging
import math
import os
import pickle
import struct
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from spectral.errors import argument_error
from spectral.io import CorruptFileError, atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "UnsafeFileError",
    "checkpoint_name",
    "content_checksum",
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
CHECKPOINT_VERSION = 2

_EOCD = b"PK\x05\x06"  # signature of the zip end-of-central-directory record (22 bytes)
_EOCD_SIZE = 22
_TRAILER_PREFIX = b"deep-curvature-sha256:"
_TRAILER_SIZE = len(_TRAILER_PREFIX) + 64
_CHUNK = 1 << 20


class UnsafeFileError(CorruptFileError):
    """A file asks to unpickle code or objects outside the allowed set; it was not loaded."""


def checkpoint_name(epoch: int) -> str:
    """File name of the checkpoint after ``epoch`` completed epochs.

    Parameters
    ----------
    epoch : int
        Completed epochs (>= 0).

    Returns
    -------
    str
        ``checkpoint-XXXXX.pt`` with five digits.

    Examples
    --------
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


def _update_digest(h: Any, value: Any, path: str) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu")
        if t.layout != torch.strided:  # sparse: hash the values it stands for
            t = t.to_dense()
        t = t.contiguous().reshape(-1)
        h.update(f"T{path}|{t.dtype}|{tuple(value.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the bytes, without a copy
    elif isinstance(value, Mapping):
        items = sorted(value.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        h.update(f"D{path}|{len(items)}|".encode())
        for key, item in items:
            _update_digest(h, item, f"{path}/{type(key).__name__}:{key!r}")
    elif isinstance(value, (list, tuple)):
        h.update(f"L{path}|{len(value)}|".encode())
        for i, item in enumerate(value):
            _update_digest(h, item, f"{path}/{i}")
    else:
        h.update(f"V{path}|{type(value).__name__}|{value!r}|".encode())


def content_checksum(payload: Mapping[str, Any]) -> str:
    """SHA-256 (``"sha256:<hex>"``) of a checkpoint's content, ``checksum`` entry excluded.

    Tensors count by dtype, shape and values (not by device, strides or storage
    sharing), so a loaded checkpoint has the checksum it was saved with.

    >>> a = {"w": torch.ones(2), "epoch": 1}
    >>> content_checksum(a) == content_checksum({"epoch": 1, "w": torch.ones(2)})
    True
    >>> content_checksum(a) == content_checksum({"w": torch.tensor([1.0, 1.0000001]), "epoch": 1})
    False
    """
    h = hashlib.sha256(b"deep-curvature-checkpoint-content/1|")
    _update_digest(h, {k: v for k, v in payload.items() if k != "checksum"}, "")
    return "sha256:" + h.hexdigest()


class _TrailerWriter:
    """Forwards ``torch.save``'s bytes to ``handle``, hashing them, and appends the file digest.

    The last 22 bytes (the zip end record) are held back: :meth:`finish` sets
    its comment length, hashes it and writes it with the digest as comment.
    """

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()
        self._tail = b""

    def _emit(self, data: bytes | memoryview) -> None:
        if len(data):
            self._hash.update(data)
            self._handle.write(data)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= _EOCD_SIZE:
            self._emit(self._tail)
            self._emit(view[:-_EOCD_SIZE])
            self._tail = bytes(view[-_EOCD_SIZE:])
        else:
            joined = self._tail + bytes(view)
            self._emit(joined[:-_EOCD_SIZE] if len(joined) > _EOCD_SIZE else b"")
            self._tail = joined[-_EOCD_SIZE:]
        return len(view)

    def flush(self) -> None:
        self._handle.flush()

    def finish(self) -> None:
        tail = self._tail
        if len(tail) != _EOCD_SIZE or not tail.startswith(_EOCD) or tail[-2:] != b"\0\0":
            raise RuntimeError("torch.save did not end its archive with a plain zip end record")
        end = tail[:-2] + struct.pack("<H", _TRAILER_SIZE)
        self._hash.update(end)
        self._handle.write(end + _TRAILER_PREFIX + self._hash.hexdigest().encode("ascii"))


def _file_digest_status(p: Path) -> str:
    """``"verified"``, ``"absent"`` or raises ``CorruptFileError``.

    ``"absent"``: a zip archive ending with a plain end record (no comment), or
    not a zip archive at all (left to ``torch.load``, e.g. the legacy format).
    """
    size = p.stat().st_size
    with p.open("rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            return "absent"
        handle.seek(max(size - _TRAILER_SIZE - _EOCD_SIZE, 0))
        tail = handle.read()
        body = size - _TRAILER_SIZE
        end = tail[-_TRAILER_SIZE - _EOCD_SIZE : -_TRAILER_SIZE]
        trailer = tail[-_TRAILER_SIZE:]
        if (
            size >= _TRAILER_SIZE + _EOCD_SIZE
            and end.startswith(_EOCD)
            and end[-2:] == struct.pack("<H", _TRAILER_SIZE)
            and trailer.startswith(_TRAILER_PREFIX)
        ):
            h = hashlib.sha256()
            handle.seek(0)
            remaining = body
            while remaining > 0:
                chunk = handle.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                h.update(chunk)
                remaining -= len(chunk)
            if h.hexdigest().encode("ascii") != trailer[len(_TRAILER_PREFIX) :]:
                raise CorruptFileError(
                    f"Checkpoint '{p}' is corrupted: its SHA-256 does not match the digest "
                    "recorded when it was written (a changed or flipped byte); it was not loaded."
                )
            return "verified"
    if len(tail) >= _EOCD_SIZE and tail[-_EOCD_SIZE:].startswith(_EOCD) and tail[-2:] == b"\0\0":
        return "absent"
    raise CorruptFileError(
        f"Checkpoint '{p}' is truncated or corrupted: it does not end with a zip end record "
        "(and a deep-curvature digest); it was not loaded."
    )


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

    Examples
    --------
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), checkpoint_name(1))
    >>> save_checkpoint(path, torch.nn.Linear(2, 1), None, 1, {"lr": 0.1})
    >>> torch.load(path, weights_only=True)["epoch"]  # a plain, safe file
    1
    """
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", model, kind=TypeError)
    if not isinstance(config, dict):
        raise argument_error("config", "a dict", config, kind=TypeError)
    reserved = {
        "format",
        "format_version",
        "checksum",
        "epoch",
        "state_dict",
        "optimizer",
        "config",
    }
    clash = reserved & set(extra)
    if clash:
        raise argument_error("extra", f"keys other than {sorted(reserved)}", sorted(clash))
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "epoch": int(epoch),
        "state_dict": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "config": json.loads(json.dumps(json_safe(config))),
        **extra,
    }
    payload["checksum"] = content_checksum(payload)
    with atomic_write(path, "wb") as handle:
        writer = _TrailerWriter(handle)
        torch.save(payload, writer)  # type: ignore[arg-type]
        writer.finish()
    logger.debug("saved checkpoint %s (epoch %d)", path, epoch)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``, verifying its checksums.

    Both digests of the module docstring are checked; a file without any
    checksum (format version 1 or a bare ``state_dict``) loads with a logged
    warning.  A bare ``state_dict`` (a dict of tensors, as saved by
    ``torch.save(model.state_dict(), path)``) is accepted too and returned as
    ``{"state_dict": ..., "epoch": None, "optimizer": None, "config": {}}``.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint file.
    map_location : str or torch.device
        Where to load the tensors.

    Returns
    -------
    dict
        ``state_dict``, ``optimizer``, ``epoch``, ``config`` and any extra entries.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    UnsafeFileError
        If the file contains pickled objects other than tensors and plain
        containers (it is refused, nothing is executed).
    CorruptFileError
        If the file is truncated, corrupted (a checksum differs) or not a checkpoint.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> net = torch.nn.Linear(2, 1)
    >>> path = os.path.join(tempfile.mkdtemp(), checkpoint_name(3))
    >>> save_checkpoint(path, net, None, 3, {"model": "custom"})
    >>> ckpt = load_checkpoint(path)
    >>> ckpt["epoch"], sorted(ckpt["state_dict"]), ckpt["config"]["model"]
    (3, ['bias', 'weight'], 'custom')
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"No such checkpoint file: '{p}'.")
    file_status = _file_digest_status(p)
    try:
        payload = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(p, exc) from exc
    except Exception as exc:  # any other failure to parse (IndexError, KeyError...) is corruption
        raise CorruptFileError(
            f"Checkpoint '{p}' is truncated, corrupted or not a torch checkpoint ({exc})."
        ) from exc
    if not isinstance(payload, dict):
        raise CorruptFileError(
            f"Checkpoint '{p}' does not hold a dict (found {type(payload).__name__})."
        )
    _check_content(p, payload, file_status)
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


def _is_tarfile(p: Path) -> bool:
    """Whether ``p`` is a tar archive (the checkpoint format of torch before 0.4)."""
    try:
        return tarfile.is_tarfile(p)
    except Exception:  # any failure to read it as one: it is not one
        return False


def _refusal(p: Path, exc: pickle.UnpicklingError) -> CorruptFileError:
    """What a file torch's safe unpickler refused is: not a checkpoint at all (neither a zip
    archive nor a pickle: a JSON or text file given by mistake), or an unsafe one.

    torch's own message advises ``weights_only=False``, which would run the file's code:
    only its reason is kept.
    """
    with open(p, "rb") as handle:
        head = handle.read(16)
    if not head.startswith((b"PK\x03\x04", b"\x80")) and not _is_tarfile(p):
        return CorruptFileError(
            f"File '{p}' is not a checkpoint: a torch checkpoint is a zip archive (or a "
            f"pickle), and this file begins with {head!r}."
        )
    advice = ("weights_only", "Weights only", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(exc).splitlines()]
    reason = " ".join(line for line in lines if line and not any(a in line for a in advice))
    return UnsafeFileError(
        f"Checkpoint '{p}' was refused: it contains objects that torch.load(weights_only=True) "
        "does not allow (only tensors and plain containers are loaded; nothing was executed)"
        + (f": {reason}" if reason else ".")
    )


def _check_content(p: Path, payload: dict[Any, Any], file_status: str) -> None:
    """Verify the content checksum; refuse a version-2 file without any verified digest."""
    stored = payload.get("checksum")
    if stored is not None:
        if not isinstance(stored, str) or stored != content_checksum(payload):
            raise CorruptFileError(
                f"Checkpoint '{p}' is corrupted: the checksum of its tensors and settings does "
                "not match the one recorded when it was written; it was not loaded."
            )
        return
    legacy = payload.get("format") != CHECKPOINT_FORMAT or payload.get("format_version") == 1
    if file_status == "verified" or not legacy:
        raise CorruptFileError(
            f"Checkpoint '{p}' is corrupted: it lacks the content checksum that every "
            f"format-{CHECKPOINT_VERSION} checkpoint carries; it was not loaded."
        )
    logger.warning(
        "checkpoint %s has no checksum (written by an earlier version or another program): "
        "its integrity cannot be verified; save it again with save_checkpoint to add one",
        p,
    )


def load_model_state(model: nn.Module, checkpoint: dict[str, Any] | str | os.PathLike[str]) -> None:
    """Load a checkpoint's weights into ``model`` (strictly), with a clear error on mismatch.

    Parameters
    ----------
    model : torch.nn.Module
        The model to load into (changed in place).
    checkpoint : dict or path
        A loaded checkpoint or its file.

    Raises
    ------
    ValueError
        If the checkpoint is for another architecture (missing/unexpected keys or
        shapes that differ); the message lists the first differences.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> save_checkpoint(path, torch.nn.Linear(2, 1), None, 0, {})
    >>> fresh = torch.nn.Linear(2, 1)
    >>> load_model_state(fresh, path)
    >>> load_model_state(torch.nn.Linear(3, 1), path)
    Traceback (most recent call last):
    ...
    ValueError: ...
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

    Parameters
    ----------
    path : str or os.PathLike
        A checkpoint written by :func:`nets.train_network`.
    device : str or torch.device
        Where to put the model.

    Returns
    -------
    (torch.nn.Module, dict)
        The model (eval mode) and the loaded checkpoint.

    Raises
    ------
    ValueError
        If the checkpoint does not name a registered model (e.g. it was trained
        from a custom ``nn.Module``: build that module yourself and use
        :func:`load_model_state`).

    Examples
    --------
    >>> import tempfile
    >>> from nets import train_network
    >>> run = tempfile.mkdtemp()
    >>> _ = train_network(run, "digits", model="MLP", epochs=1, model_kwargs={"hidden": (8,)},
    ...                   optimizer_kwargs={"lr": 0.1, "batch_size": 512}, progress=False,
    ...                   device="cpu")
    >>> model, ckpt = model_from_checkpoint(f"{run}/checkpoint-00001.pt")
    >>> type(model).__name__, model.training, ckpt["epoch"]
    ('MLP', False, 1)
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
