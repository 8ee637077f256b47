"""In-memory datasets with on-the-fly normalisation and deterministic augmentation.

:class:`ArrayDataset` keeps the raw inputs (e.g. ``uint8`` CIFAR images, 150 MB
for the training set) and returns ``((x * scale [augmented]) - mean) / std``.
Augmentation randomness is a pure function of ``(seed, epoch, indices)``: each
fetched batch uses a :class:`torch.Generator` seeded by a hash of the dataset's
seed, the epoch set with :meth:`ArrayDataset.set_epoch` and the requested
indices.  Results therefore do not depend on ``num_workers`` and a resumed run
reproduces the augmentation of an uninterrupted one.  Batched fetching is
implemented through ``__getitems__``, which ``torch.utils.data.DataLoader`` uses.

>>> import torch
>>> ds = ArrayDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 0]))
>>> len(ds), ds[1]
(3, (tensor([2., 3.]), tensor(1)))
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from spectral.errors import argument_error

__all__ = ["ArrayDataset", "BatchTransform"]

BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class ArrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Inputs and targets held as tensors, normalised (and augmented) when fetched.

    Parameters
    ----------
    inputs:
        ``(N, ...)`` raw inputs (any real or integer dtype).
    targets:
        ``(N,)`` integer class labels or ``(N, k)`` regression targets.
    scale:
        Multiplier applied first (``1/255`` for ``uint8`` images).
    mean, std:
        Per-channel normalisation constants for ``(N, C, H, W)`` images (or one
        value per feature for ``(N, d)`` vectors); ``None`` skips normalisation.
    transform:
        Batch augmentation ``transform(x, generator)`` applied after scaling and
        before normalisation; ``None`` for none.
    seed:
        Base seed of the augmentation.
    classes:
        Optional class names.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        scale: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        transform: BatchTransform | None = None,
        seed: int = 0,
        classes: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1:
            raise argument_error("inputs", "a tensor of shape (N, ...)", inputs, kind=TypeError)
        if not isinstance(targets, torch.Tensor) or targets.shape[:1] != inputs.shape[:1]:
            raise argument_error(
                "targets", f"a tensor with {inputs.shape[0]} rows (one per input)", targets
            )
        self.inputs = inputs
        self.targets = targets
        self.scale = float(scale)
        shape = (-1,) + (1,) * max(inputs.dim() - 2, 0)
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(shape)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(shape)
        if self.std is not None and not bool((self.std > 0).all()):
            raise argument_error("std", "positive standard deviations", std)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.classes = None if classes is None else list(classes)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch`` (called by the training loop)."""
        self.epoch = int(epoch)

    def with_transform(self, transform: BatchTransform | None) -> ArrayDataset:
        """A view sharing the storage with a different augmentation (``None`` for none)."""
        view = ArrayDataset.__new__(ArrayDataset)
        view.__dict__.update(self.__dict__)
        view.transform = transform
        return view

    def _generator(self, indices: torch.Tensor) -> torch.Generator:
        digest = hashlib.blake2b(digest_size=8)
        digest.update(np.asarray([self.seed, self.epoch], dtype=np.int64).tobytes())
        digest.update(indices.numpy().astype(np.int64).tobytes())
        key = int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)
        return torch.Generator().manual_seed(key)

    def get_batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``(B, ...)`` (float32, normalised, augmented) and targets ``(B, ...)``."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.inputs[idx].to(torch.float32)
        if self.scale != 1.0:
            x = x * self.scale
        if self.transform is not None:
            x = self.transform(x, self._generator(idx))
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return x, self.targets[idx]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.get_batch([int(index)])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.get_batch(list(indices))
        return list(zip(x.unbind(0), y.unbind(0)))
