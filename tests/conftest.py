"""Shared test configuration: hypothesis profiles, the Agg backend, one torch thread,
and the launcher of multi-process (torch.distributed) test jobs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

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

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL = 4000  # characters of a failed worker's output shown in the failure


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


def _run_worker_processes(rank_args: list[list[str]], timeout_s: float) -> None:
    """Start one ``python *args`` process per entry of ``rank_args`` and wait for all.

    The workers get one BLAS/OpenMP thread and the repository root first on
    ``PYTHONPATH`` (so they import the code of this checkout); their stdout and stderr
    are captured together. The test fails if they are not all done within
    ``timeout_s`` seconds (a hang: every worker is killed) or if any exits non-zero
    (naming each such rank, with the tail of its output).
    """
    __tracebackhide__ = True  # a failure points at the test's call, not in here
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    procs = [
        subprocess.Popen(
            [sys.executable, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in rank_args
    ]
    deadline, logs = time.monotonic() + timeout_s, []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed workers timed out after {timeout_s:g} s (a hang)")
    finally:  # on a hang, or an interrupt: no worker outlives the test
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.communicate()  # reap it and close its pipe
    failed = [
        f"rank {r} failed (exit code {p.returncode}):\n{log[-LOG_TAIL:]}"
        for r, (p, log) in enumerate(zip(procs, logs))
        if p.returncode != 0
    ]
    if failed:
        pytest.fail("\n\n".join(failed))


@pytest.fixture
def run_worker_processes() -> Callable[[list[list[str]], float], None]:
    """The launcher of multi-process jobs: ``run(rank_args, timeout_s)``.

    ``rank_args[r]`` is the command line of rank ``r`` after the interpreter (e.g.
    ``[__file__, "--worker", str(r), ...]``). A fixture rather than an importable
    function, since the worker processes run the test files as scripts, without pytest.
    """
    return _run_worker_processes
