"""scikit-learn's bundled 8x8 handwritten digits: real data, no download.

1,797 grey-scale images of shape ``(1, 8, 8)`` in 10 classes.  A fixed split
(``data_seed``, default 0) keeps 20% for testing (359 test, 1,438 training
images).  Pixels (0..16) are scaled to [0, 1] and standardised with the
training set's mean and standard deviation.  No augmentation is applied
(flips and shifts change a digit's meaning).

>>> train, test = load_digits_tensors()
>>> train[0].shape, test[0].shape, int(train[1].max())
(torch.Size([1438, 1, 8, 8]), torch.Size([359, 1, 8, 8]), 9)
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from spectral.errors import argument_error

__all__ = ["load_digits_tensors"]

TensorPair = tuple[torch.Tensor, torch.Tensor]


def _sklearn_load_digits() -> Any:
    """``sklearn.datasets.load_digits``, imported without touching the global RNGs.

    scikit-learn is imported on first use only.  Its import chain can draw from
    Python's global generator (``rich``, which recent scikit-learn imports, seeds an
    id counter with ``random.getrandbits`` at import time), which would change the
    caller's random stream on the first call of this function only.  The states of
    Python's and numpy's global generators are restored around the import.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (saved, never drawn from)
    try:
        from sklearn.datasets import load_digits
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
    return load_digits


def load_digits_tensors(
    *, data_seed: int = 0, test_fraction: float = 0.2
) -> tuple[TensorPair, TensorPair]:
    """Return ``((x_train, y_train), (x_test, y_test))`` with pixels in [0, 1].

    ``x`` is float32 ``(N, 1, 8, 8)``; ``y`` is int64 ``(N,)``.
    """
    load_digits = _sklearn_load_digits()
    if not 0.0 < test_fraction < 1.0:
        raise argument_error("test_fraction", "a fraction in (0, 1)", test_fraction)
    images, labels = load_digits(return_X_y=True)
    n = images.shape[0]
    order = np.random.default_rng(data_seed).permutation(n)
    n_test = round(test_fraction * n)
    test_idx, train_idx = order[:n_test], order[n_test:]
    x = torch.from_numpy((images / 16.0).astype(np.float32)).reshape(n, 1, 8, 8)
    y = torch.from_numpy(labels.astype(np.int64))
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])
