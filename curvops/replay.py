"""Replay a DataLoader identically on every pass, or refuse it.

A curvature operator is one fixed matrix, so every pass over its ``data`` must see
the same batches with the same samples in the same order.  A DataLoader with a
random sampler (``shuffle=True``), random augmentation in its dataset or
worker processes draws from random streams that advance from one pass to the
next.  :class:`ReplayStreams` makes every pass draw the same numbers:

* each call into the loader (``iter(loader)`` and every ``next``) runs with the
  global torch (CPU), numpy and Python ``random`` streams, and the loader's own
  generators (``loader.generator``, its sampler's and batch sampler's), swapped
  for private ones; between calls the user's streams are back in place, so
  the user's streams are never advanced, even when a pass stops at an error;
* at the start of each pass the private streams restart from the same states:
  the global ones from :data:`REPLAY_SEED`, the loader's generators from their
  states when the operator was built.  Worker processes are seeded by PyTorch
  from a base seed drawn in ``iter(loader)`` (and seed their own torch, numpy and
  Python streams from it), so they replay too.

:class:`PassFingerprint` checks it: the first complete pass records the size
and an exact checksum of the bytes of every batch; each later pass is compared
batch by batch, and the first difference raises a ``ValueError`` naming ``data``
with the likely causes (a transform with its own generator such as
``np.random.default_rng()``, augmentation on a GPU, a dataset that changes) and the
fix.  A loader with ``persistent_workers=True`` gets fresh workers of its own in each
pass (:func:`curvops.data.pass_iterator`), so it replays like any other.  The
checksum (CRC-32 of the batch's bytes) costs about 1-2 ms for 256 CIFAR-shaped
images, less than loading them.

>>> import torch
>>> from torch.utils.data import DataLoader, TensorDataset
>>> loader = DataLoader(TensorDataset(torch.arange(6.0)), batch_size=3, shuffle=True)
>>> streams = ReplayStreams(loader)
>>> def one_pass():
...     streams.new_pass()
...     with streams.active():
...         return [b[0].tolist() for b in loader]
>>> state = torch.get_rng_state()
>>> one_pass() == one_pass(), bool(torch.equal(state, torch.get_rng_state()))
(True, True)
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from curvops.snapshot import tensors_in

__all__ = ["REPLAY_SEED", "PassFingerprint", "ReplayStreams", "batch_checksum"]

#: Seed of the private global streams each pass over a loader starts from.
REPLAY_SEED = 0


def _loader_generators(loader: Any) -> list[torch.Generator]:
    """``torch.Generator`` objects a loader draws from (deduplicated)."""
    found: dict[int, torch.Generator] = {}
    candidates = [
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
        getattr(getattr(loader, "batch_sampler", None), "generator", None),
        getattr(
            getattr(getattr(loader, "batch_sampler", None), "sampler", None), "generator", None
        ),
    ]
    for g in candidates:
        if isinstance(g, torch.Generator):
            found.setdefault(id(g), g)
    return list(found.values())


class ReplayStreams:
    """Private random streams for a loader, restarted identically at every pass.

    Parameters
    ----------
    loader:
        The re-iterable (a DataLoader or anything drawing from the global streams).
    """

    def __init__(self, loader: Any) -> None:
        self._generators = _loader_generators(loader)
        self._initial_generators = [g.get_state() for g in self._generators]
        torch_generator = torch.Generator().manual_seed(REPLAY_SEED)
        self._initial = (
            torch_generator.get_state(),
            np.random.RandomState(REPLAY_SEED).get_state(),
            random.Random(REPLAY_SEED).getstate(),
            self._initial_generators,
        )
        self._current = self._initial

    def new_pass(self) -> None:
        """Restart the private streams (call at the start of every pass)."""
        self._current = self._initial

    @staticmethod
    def _capture(generators: list[torch.Generator]) -> tuple[Any, ...]:
        return (
            torch.get_rng_state(),
            np.random.get_state(),  # noqa: NPY002
            random.getstate(),
            [g.get_state() for g in generators],
        )

    @staticmethod
    def _install(state: tuple[Any, ...], generators: list[torch.Generator]) -> None:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])  # noqa: NPY002
        random.setstate(state[2])
        for g, s in zip(generators, state[3]):
            g.set_state(s)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Run the block on the private streams; the user's are restored on exit."""
        user = self._capture(self._generators)
        try:
            self._install(self._current, self._generators)
            try:
                yield
            finally:
                self._current = self._capture(self._generators)
        finally:
            self._install(user, self._generators)


def batch_checksum(inputs: Any, targets: torch.Tensor) -> int:
    """CRC-32 of the bytes, shapes and dtypes of a batch's tensors (position-sensitive).

    About 1-2 ms for a batch of 256 CIFAR-shaped float32 images on one CPU core,
    less than loading it; tensors on an accelerator are copied to the host first.

    >>> a = batch_checksum(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
    >>> a == batch_checksum(torch.tensor([2.0, 1.0]), torch.tensor([0, 1]))
    False
    """
    crc = 0
    for t in (*tensors_in(inputs), targets):
        flat = t.detach().reshape(-1).contiguous().cpu()
        crc = zlib.crc32(f"{tuple(t.shape)}{t.dtype}".encode(), crc)
        crc = zlib.crc32(flat.view(torch.uint8).numpy().data, crc)
    return crc


class PassFingerprint:
    """Sizes and checksums of the batches of the first complete pass, checked later.

    Parameters
    ----------
    source:
        The loader (named in error messages).
    """

    def __init__(self, source: Any) -> None:
        self._source = source
        self._recorded: list[tuple[int, int]] | None = None
        self._recording: list[tuple[int, int]] = []
        self._passes = 0

    def new_pass(self) -> None:
        """Start a pass."""
        self._passes += 1
        self._recording = []

    def check(self, index: int, size: int, inputs: Any, targets: torch.Tensor) -> None:
        """Record or compare batch ``index`` of the current pass.

        Raises
        ------
        ValueError
            If it differs from the first complete pass (or that pass ended earlier).
        """
        entry = (size, batch_checksum(inputs, targets))
        if self._recorded is None:
            self._recording.append(entry)
            return
        if index >= len(self._recorded):
            self._fail(f"pass {self._passes} yields more than the {len(self._recorded)} batches")
        elif entry != self._recorded[index]:
            what = "size" if entry[0] != self._recorded[index][0] else "samples or their order"
            self._fail(f"batch {index} of pass {self._passes} differs ({what}) from the first pass")

    def finish(self, count: int) -> None:
        """End a complete pass of ``count`` batches (records the first one)."""
        if self._recorded is None:
            self._recorded = self._recording
            return
        if count != len(self._recorded):
            self._fail(
                f"pass {self._passes} yields {count} batches, the first pass {len(self._recorded)}"
            )

    def _fail(self, what: str) -> None:
        raise ValueError(
            "Argument 'data': expected a loader that yields the same batches on every "
            f"pass (a curvature operator is one fixed matrix); received one whose {what}. "
            "Shuffling, random augmentation and worker processes that draw from "
            "torch/numpy/Python random streams or the loader's generator are replayed; "
            "this loader draws from something else (a transform with its own "
            "generator such as np.random.default_rng(), "
            "augmentation on a GPU, a dataset that changes). Fix: make that "
            "randomness seeded per pass, or pass the batches as a list."
        )
