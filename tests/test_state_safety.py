"""State safety: public entry points leave the caller's model, optimiser and global RNGs untouched.

Around each entry point we snapshot

* the model: every parameter and buffer (values, dtype, device), each module's
  ``training`` flag, each parameter's ``requires_grad`` and ``.grad``;
* the optimiser's ``state_dict`` (a step has been taken, so momentum buffers exist);
* the global random states of ``random``, ``numpy`` and ``torch``;

and assert exact (bitwise) equality afterwards.  The model has BatchNorm
(running statistics are buffers that a forward in train mode would change),
Dropout (train mode draws from torch's global RNG), a frozen parameter, a
submodule left in eval mode and non-``None`` gradients.

It also pins down curvops' behaviour for half-precision models: float16 models
are supported (products in float16, accurate to a few float16 ulps relative to
the float64 reference), and so are bfloat16 models (issue 15: products in bfloat16,
shown to numpy as float32; more in ``tests/curvops/test_mixed_precision.py``).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import curvops
import spectral
from nets import compute_eigenspectrum, compute_loss_stats, train_network
from nets.data import load_dataset
from nets.workflow import build_loss_landscape

N = 24  # samples per batch


class _Net(nn.Module):
    """Digits-shaped (1 x 8 x 8) net with BatchNorm, Dropout, a frozen and an eval submodule."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(6, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(self.flatten(x))))))


def _user_setup() -> tuple[nn.Module, torch.optim.Optimizer, tuple[torch.Tensor, torch.Tensor]]:
    """A model mid-training: a step taken, grads present, one param frozen, one module in eval."""
    net = _Net()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (N,), generator=gen)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    nn.CrossEntropyLoss()(net(x), y).backward()
    opt.step()
    nn.CrossEntropyLoss()(net(x), y).backward()  # leave .grad populated
    net.fc2.bias.requires_grad_(False)
    net.fc2.bias.grad = None
    net.drop.eval()  # a submodule in eval mode inside a model in train mode
    return net, opt, (x, y)


def _snapshot(net: nn.Module, opt: torch.optim.Optimizer | None) -> dict[str, Any]:
    return {
        "params": [(n, p.detach().clone(), p.dtype, p.device) for n, p in net.named_parameters()],
        "buffers": [(n, b.detach().clone()) for n, b in net.named_buffers()],
        "training": [(n, m.training) for n, m in net.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in net.named_parameters()],
        "grads": [
            (n, None if p.grad is None else p.grad.detach().clone())
            for n, p in net.named_parameters()
        ],
        "optimizer": None if opt is None else copy.deepcopy(opt.state_dict()),
        "rng": _global_rng(),
    }


def _global_rng() -> dict[str, Any]:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (saved, never drawn from)
        "torch": torch.random.get_rng_state().clone(),
    }


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b) or (a.isnan() & b.isnan()).all())
        )
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return (
            isinstance(b, list | tuple)
            and len(a) == len(b)
            and all(_equal(x, y) for x, y in zip(a, b))
        )
    return bool(a == b)


def _assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in before:
        assert _equal(before[key], after[key]), f"the call changed the caller's {key}"


def _loss() -> nn.Module:
    return nn.CrossEntropyLoss()


# --------------------------------------------------------------------------- entry points
# Each takes (model, batch, tmp_path) and may do anything a user would do with the result.

ENTRY_POINTS: dict[str, Callable[[nn.Module, Any, Path], Any]] = {
    "HessianOperator": lambda net, b, _: curvops.HessianOperator(net, _loss(), b).matvec(
        torch.ones(sum(p.numel() for p in net.parameters() if p.requires_grad))
    ),
    "GGNOperator-bn-train": lambda net, b, _: curvops.GGNOperator(
        net, _loss(), b, bn_mode="train"
    ).matmat(torch.ones(sum(p.numel() for p in net.parameters() if p.requires_grad), 2)),
    "FisherOperator-mc": lambda net, b, _: curvops.FisherOperator(
        net, _loss(), b, kind="mc", seed=3
    ).matvec(torch.ones(sum(p.numel() for p in net.parameters() if p.requires_grad))),
    "FisherOperator-empirical-eval": lambda net, b, _: curvops.FisherOperator(
        net, _loss(), b, kind="empirical", bn_mode="eval"
    ).matvec(torch.ones(sum(p.numel() for p in net.parameters() if p.requires_grad))),
    "per_layer": lambda net, b, _: curvops.per_layer(curvops.GGNOperator, net, _loss(), b).matvec(
        torch.ones(sum(p.numel() for p in net.parameters() if p.requires_grad))
    ),
    "ggn_diagonal": lambda net, b, _: curvops.ggn_diagonal(net, _loss(), b, method="mc", seed=1),
    "loss_stats": lambda net, b, _: curvops.loss_stats(net, _loss(), b, seed=0, num_probes=2),
    "spectral.lanczos": lambda net, b, _: spectral.lanczos(
        curvops.HessianOperator(net, _loss(), b), 5, seed=0
    ),
    "spectral.slq": lambda net, b, _: spectral.slq(
        curvops.GGNOperator(net, _loss(), b), 4, num_probes=2, seed=0
    ),
    "spectral.trace": lambda net, b, _: spectral.trace(
        curvops.GGNOperator(net, _loss(), b), num_matvecs=6, seed=0
    ),
    "spectral.top_eigenpairs": lambda net, b, _: spectral.top_eigenpairs(
        curvops.GGNOperator(net, _loss(), b), 2, seed=0, tol=1e-4
    ),
    "compute_eigenspectrum": lambda net, b, tmp: compute_eigenspectrum(
        _digits(),
        model=net,
        lanczos_iters=4,
        subsample=N,
        batch_size=N,
        device="cpu",
        save_spectrum_path=tmp / "spec",
        save_eigvec=True,
    ),
    "compute_loss_stats": lambda net, b, _: compute_loss_stats(
        _digits(), model=net, batch_size=N, subsample=N, frobenius_probes=1, device="cpu"
    ),
    "build_loss_landscape": lambda net, b, _: build_loss_landscape(
        _digits(),
        model=net,
        dist=0.5,
        n_points=3,
        random_directions=1,
        subsample=N,
        batch_size=N,
        device="cpu",
        refresh_bn=True,
    ),
}

_DIGITS: list[Any] = []


def _digits() -> Any:
    if not _DIGITS:
        _DIGITS.append(load_dataset("digits"))
    return _DIGITS[0]


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_point_leaves_model_optimiser_and_rng_untouched(name: str, tmp_path: Path) -> None:
    net, opt, batch = _user_setup()
    before = _snapshot(net, opt)
    ENTRY_POINTS[name](net, batch, tmp_path)
    _assert_unchanged(before, _snapshot(net, opt))


def test_train_network_leaves_the_global_rng_untouched(tmp_path: Path) -> None:
    """train_network trains its own model; the caller's global random states are untouched."""
    before = _global_rng()
    train_network(
        tmp_path / "run", "digits", model="MLP", epochs=1, batch_size=64, save_freq=None,
        progress=False, device="cpu", model_kwargs={"hidden": (4,)},
    )  # fmt: skip
    assert _equal(before, _global_rng())


def test_train_network_with_a_module_leaves_the_global_rng_untouched(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # its init draws from the global RNG
    before = _global_rng()
    train_network(
        tmp_path / "run", "digits", model=net, epochs=1, batch_size=64, save_freq=None,
        progress=False, device="cpu",
    )  # fmt: skip
    assert _equal(before, _global_rng())


def test_failed_call_leaves_state_untouched() -> None:
    """An error mid-product (NaN input) must not leave the model in a modified mode."""
    net, opt, (x, y) = _user_setup()
    before = _snapshot(net, opt)
    bad = x.clone()
    bad[-1, 0, 0, 0] = float("nan")  # in the second batch: the first is checked when built
    half = x.shape[0] // 2
    op = curvops.HessianOperator(net, _loss(), [(bad[:half], y[:half]), (bad[half:], y[half:])])
    with pytest.raises((spectral.NumericalError, ValueError)):
        spectral.lanczos(op, 3, seed=0)
    _assert_unchanged(before, _snapshot(net, opt))


# --------------------------------------------------------------------------- half precision


def _small(dtype: torch.dtype) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(8, 3, generator=gen)
    y = torch.randint(0, 2, (8,), generator=gen)
    return net.to(dtype), (x.to(dtype), y)


@pytest.mark.parametrize("cls", [curvops.HessianOperator, curvops.GGNOperator])
def test_float16_models_are_supported_to_float16_accuracy(cls: type) -> None:
    """Products of a float16 model stay in float16 and match float64 to ~float16 rounding.

    The relative error of a product is bounded by a small multiple of the float16 unit
    roundoff (``2^-11``) times the depth of the computation; we allow ``50 * 2^-11``.
    """
    net16, (x16, y) = _small(torch.float16)
    net64 = copy.deepcopy(net16).to(torch.float64)
    op16 = cls(net16, _loss(), (x16, y))
    op64 = cls(net64, _loss(), (x16.to(torch.float64), y))
    assert op16.torch_dtype == torch.float16
    v = torch.linspace(-1, 1, op16.shape[0], dtype=torch.float64)
    out16 = op16.matvec(v.to(torch.float16))
    assert out16.dtype == torch.float16
    ref = op64.matvec(v)
    err = torch.linalg.vector_norm(out16.to(torch.float64) - ref) / torch.linalg.vector_norm(ref)
    assert float(err) < 50 * 2.0**-11


def test_bfloat16_models_are_supported_and_leave_the_model_unchanged() -> None:
    net, batch = _small(torch.bfloat16)
    before = copy.deepcopy(net.state_dict())
    op = curvops.HessianOperator(net, _loss(), batch)
    assert op.torch_dtype == torch.bfloat16
    out = op.matvec(torch.linspace(-1, 1, op.shape[0], dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
