"""Resuming refuses a state of another operator: exact fingerprints on the CPU, in every dtype."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import curvops
from spectral.krylov import lanczos
from spectral.operator import as_operator
from spectral.resume import StateMismatchError, operator_fingerprint


def _net(seed: int, dtype: torch.dtype) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return net.to(dtype)


def _batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100)
    return torch.randn(16, 3, generator=gen).to(dtype), torch.randint(0, 3, (16,), generator=gen)


def _operator(net: nn.Module, dtype: torch.dtype) -> Any:
    return as_operator(curvops.HessianOperator(net, nn.CrossEntropyLoss(), _batch(dtype)))


class _Stop(Exception):
    """Raised by the interrupted operator (a stand-in for a SIGKILL mid-run)."""


def _interrupted(op: Any, after: int) -> Any:
    """``op`` that fails at its ``after + 1``-th product."""
    count = 0

    def matvec(v: Any) -> Any:
        nonlocal count
        count += 1
        if count > after:
            raise _Stop
        return op.matvec(v)

    return as_operator(matvec, size=op.n, like=op.template)


def _run(op: Any, path: Path) -> Any:
    return lanczos(op, 8, seed=0, checkpoint=path, checkpoint_every=2, reorth="full")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_the_same_operator_resumes_bit_identically(dtype: torch.dtype, tmp_path: Path) -> None:
    net = _net(0, dtype)
    reference = lanczos(_operator(net, dtype), 8, seed=0, reorth="full")
    state = tmp_path / "state.npz"
    with pytest.raises(_Stop):  # fingerprint + 5 Lanczos products, saved after step 4
        _run(_interrupted(_operator(net, dtype), 6), state)
    assert state.is_file()
    resumed = _run(_operator(copy.deepcopy(net), dtype), state)  # a rebuilt, equal operator
    np.testing.assert_array_equal(resumed.alpha, reference.alpha)
    np.testing.assert_array_equal(resumed.beta, reference.beta)


def _changed(net: nn.Module, change: str, dtype: torch.dtype) -> nn.Module:
    if change == "another initialisation":
        return _net(1, dtype)
    other = copy.deepcopy(net)
    with torch.no_grad():
        w = other[0].weight
        if change == "weights changed by 1e-5":
            w[0, 0] += 1e-5
        else:  # "one weight moved by one unit in the last place"
            w[0, 0] = torch.nextafter(w[0, 0], torch.tensor(10.0, dtype=dtype))
    assert not torch.equal(other[0].weight, net[0].weight)  # the change is representable
    return other


CHANGES = [
    (torch.float16, "another initialisation"),
    (torch.float16, "one weight moved by one unit in the last place"),
    (torch.float32, "another initialisation"),
    (torch.float32, "weights changed by 1e-5"),
    (torch.float64, "weights changed by 1e-5"),
]


@pytest.mark.parametrize(("dtype", "change"), CHANGES)
def test_a_state_of_another_operator_is_refused(
    dtype: torch.dtype, change: str, tmp_path: Path
) -> None:
    net = _net(0, dtype)
    state = tmp_path / "state.npz"
    with pytest.raises(_Stop):
        _run(_interrupted(_operator(net, dtype), 6), state)
    other = _changed(net, change, dtype)
    with pytest.raises(StateMismatchError, match="no difference is tolerated") as info:
        _run(_operator(other, dtype), state)
    assert "'checkpoint'" in str(info.value) and str(state) in str(info.value)


@pytest.mark.parametrize(
    ("dtype", "change"),
    [
        (torch.float16, "one weight moved by one unit in the last place"),
        (torch.float32, "weights changed by 1e-5"),
    ],
)
def test_these_changes_are_within_the_accelerator_tolerance(
    dtype: torch.dtype, change: str
) -> None:
    """The refusals above are the CPU rule at work: these changes move the probe's product by
    less than the rounding tolerance allowed where products are not reproducible."""
    net = _net(0, dtype)
    a = operator_fingerprint(_operator(net, dtype))
    b = operator_fingerprint(_operator(_changed(net, change, dtype), dtype))
    assert a.platform == b.platform == "cpu" and a.digest != b.digest
    assert a.difference(b) is not None
    assert dataclasses.replace(a, platform="cuda").difference(b) is None
