"""Synthetic data for theory checks: a Gaussian mixture and a teacher-student regression.

Gaussian mixture (classification): class means ``mu_c ~ N(0, separation^2/dim I)``,
inputs ``x = mu_c + N(0, I)`` with balanced labels.  Teacher-student
(regression): ``x ~ N(0, I_dim)``, ``y = tanh(x W1) W2 + noise * N(0, 1)`` with a
random teacher ``W1 ~ N(0, 1/dim)`` (``dim x width``), ``W2 ~ N(0, 1/width)``.
Both are generated from ``np.random.default_rng(data_seed)``; inputs are
float32 ``(N, dim)`` (models see them as ``in_channels=dim, input_size=1``).

>>> (xtr, ytr), (xte, yte) = gaussian_mixture(n_train=20, n_test=10, dim=3, num_classes=2)
>>> xtr.shape, ytr.dtype, xte.shape
(torch.Size([20, 3]), torch.int64, torch.Size([10, 3]))
>>> (xtr, ytr), _ = teacher_student(n_train=5, n_test=5, dim=4, outputs=2)
>>> ytr.shape
torch.Size([5, 2])
"""

from __future__ import annotations

import numpy as np
import torch

from nets.models._common import check_positive_int
from spectral.errors import argument_error

__all__ = ["gaussian_mixture", "teacher_student"]

TensorPair = tuple[torch.Tensor, torch.Tensor]


def gaussian_mixture(
    *,
    n_train: int = 1000,
    n_test: int = 1000,
    dim: int = 10,
    num_classes: int = 3,
    separation: float = 3.0,
    data_seed: int = 0,
) -> tuple[TensorPair, TensorPair]:
    """Balanced isotropic Gaussian mixture; returns ``((x, y) train, (x, y) test)``."""
    check_positive_int("n_train", n_train)
    check_positive_int("n_test", n_test)
    check_positive_int("dim", dim)
    check_positive_int("num_classes", num_classes, minimum=2)
    if not separation >= 0:
        raise argument_error("separation", "a non-negative number", separation)
    rng = np.random.default_rng(data_seed)
    means = rng.standard_normal((num_classes, dim)) * separation / np.sqrt(dim)

    def draw(n: int) -> TensorPair:
        labels = rng.permutation(np.arange(n) % num_classes)
        x = means[labels] + rng.standard_normal((n, dim))
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(labels.astype(np.int64))

    return draw(n_train), draw(n_test)


def teacher_student(
    *,
    n_train: int = 1000,
    n_test: int = 1000,
    dim: int = 10,
    outputs: int = 1,
    width: int = 8,
    noise: float = 0.1,
    data_seed: int = 0,
) -> tuple[TensorPair, TensorPair]:
    """Regression on a random one-hidden-layer tanh teacher; targets ``(N, outputs)``."""
    check_positive_int("n_train", n_train)
    check_positive_int("n_test", n_test)
    check_positive_int("dim", dim)
    check_positive_int("outputs", outputs)
    check_positive_int("width", width)
    if not noise >= 0:
        raise argument_error("noise", "a non-negative number", noise)
    rng = np.random.default_rng(data_seed)
    w1 = rng.standard_normal((dim, width)) / np.sqrt(dim)
    w2 = rng.standard_normal((width, outputs)) / np.sqrt(width)

    def draw(n: int) -> TensorPair:
        x = rng.standard_normal((n, dim))
        y = np.tanh(x @ w1) @ w2 + noise * rng.standard_normal((n, outputs))
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))

    return draw(n_train), draw(n_test)
