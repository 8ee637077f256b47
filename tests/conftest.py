"""Shared test configuration: hypothesis profiles, the Agg backend, one torch thread."""

from __future__ import annotations

import os
from collections.abc import Iterator

import matplotlib
import pytest
from hypothesis import HealthCheck, settings

matplotlib.use("Agg")

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=25,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: object) -> None:
    """Limit BLAS and torch to one thread per test process.

    The suite works on small matrices; on a 2-core machine oversubscribed
    threads cost far more than they gain (a 120x120 QR went from 1 ms to 0.4 s).
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _reproducible_global_rng() -> None:
    """Seed the global RNGs before every test, so a test that draws data from them
    (``torch.randn`` without a generator) sees the same numbers in every run.

    The library itself never uses global RNG state; tests of that snapshot the state
    inside the test, after this fixture has run.
    """
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 - deliberately the legacy global state
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run every test on one intra-op torch thread and put the count back afterwards
    (code under test may set it, e.g. the CLI's ``--threads``); close all figures.

    Tiny models on a shared 2-core machine: two spinning OpenMP threads slowed tiny
    double-backward products down 10-50x.
    """
    import matplotlib.pyplot as plt
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        plt.close("all")
