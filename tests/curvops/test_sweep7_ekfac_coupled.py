"""E-KFAC and K-FAC with samples coupled by train-mode BatchNorm.

With BatchNorm's batch statistics a column of loss sample :math:`n` reaches every sample
:math:`m` of a layer before the BatchNorm, and its pullback to the weight is
:math:`\\sum_m g_m a_m^\\top`.  E-KFAC's eigenvalues must still be
:math:`\\operatorname{diag}(U^\\top G_{\\rm block} U)` in its own eigenbasis
:math:`U = U_G \\otimes U_A` (the exact GGN block, :func:`curvops.testing.dense_ggn`, or the
exact empirical Fisher block from per-loss-sample gradients); K-FAC's :math:`G` is its
documented definition, :math:`\\sum_m [J_s^\\top H J_s]_{mm}` with the Jacobian :math:`J_s`
of the batch's outputs with respect to the layer's outputs :math:`s`.  Tolerances are
rounding bounds :math:`c\\,n\\,\\varepsilon\\,\\|G\\|` for blocks of size :math:`n`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import curvops.kronecker as kronecker
from curvops import EKFACOperator, KFACOperator
from curvops.data import as_data
from curvops.testing import dense_ggn

DT = torch.float64
EPS = torch.finfo(DT).eps


class BNMLP(nn.Module):
    """``Linear(3, 5) -> BatchNorm1d -> tanh -> Linear(5, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.bn, self.l2 = nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.bn(self.l1(x))))


class BNCNN(nn.Module):
    """``Conv2d(2, 3, 3) -> BatchNorm2d -> tanh -> flatten -> Linear(12, 3)`` on 4x4 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.bn, self.l2 = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.bn(self.l1(x))).flatten(1))


NAMES = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]


def _case(kind: str, loss: str, n: int = 6, seed: int = 0) -> tuple[BNMLP | BNCNN, Any, Any]:
    torch.manual_seed(seed)
    net: BNMLP | BNCNN = BNMLP() if kind == "mlp" else BNCNN()
    net.double()
    g = torch.Generator().manual_seed(seed + 1)
    bn = net.bn
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        bn.weight.uniform_(0.5, 1.5, generator=g)
    shape = (n, 3) if kind == "mlp" else (n, 2, 4, 4)
    x = torch.randn(shape, generator=g, dtype=DT)
    if loss == "ce":
        return net, nn.CrossEntropyLoss(), (x, torch.arange(n) % 3)
    return net, nn.MSELoss(), (x, torch.randn(n, 3, generator=g, dtype=DT))


def _check_lambda(E: EKFACOperator, G: torch.Tensor) -> None:
    """Every block's eigenvalues are diag(U^T G_block U) and its trace the block's trace.

    Rounding is relative to the whole matrix: a bias before BatchNorm has an exactly
    zero block (the normalisation removes shifts), computed as rounding noise.
    """
    scale = float(torch.linalg.matrix_norm(G, 2))
    for block, e in zip(E.blocks, E.eigen_blocks()):
        pos = block.positions.reshape(-1)
        Gb = G[pos][:, pos]
        U = torch.kron(e.U_G, e.U_A)
        want = torch.diagonal(U.T @ Gb @ U)
        tol = 64 * pos.numel() * EPS * scale
        assert float((e.values.reshape(-1) - want).abs().max()) <= tol, block.layer
        assert abs(float(e.values.sum()) - float(torch.trace(Gb))) <= tol * pos.numel()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("bn_mode", ["train", None, "eval"])
def test_ekfac_lambda_is_the_exact_ggn_diagonal_with_batchnorm(
    kind: str, loss: str, bn_mode: str | None
) -> None:
    net, loss_fn, data = _case(kind, loss)
    net.train()  # bn_mode=None: batch statistics, coupled samples
    G = dense_ggn(net, loss_fn, data, params=NAMES, bn_mode=bn_mode)
    E = EKFACOperator(net, loss_fn, data, params=NAMES, bn_mode=bn_mode, bias="joint")
    _check_lambda(E, G)


def _empirical_fisher(net: nn.Module, data: Any, train: bool) -> torch.Tensor:
    """Cross-entropy's (1/N) sum_n grad l_n grad l_n^T, each l_n's gradient through the batch."""
    x, y = data
    params = {n: p.detach().clone().requires_grad_(True) for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    mode = net.training
    net.train(train)
    try:
        out = functional_call(net, {**params, **buffers}, (x,))
    finally:
        net.train(mode)
    terms = F.cross_entropy(out, y, reduction="none")
    rows = []
    for term in terms:
        grads = torch.autograd.grad(term, [params[n] for n in NAMES], retain_graph=True)
        rows.append(torch.cat([gr.reshape(-1) for gr in grads]))
    J = torch.stack(rows)
    return J.T @ J / len(rows)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_ekfac_empirical_lambda_is_exact_with_batchnorm(kind: str, bn_mode: str) -> None:
    net, loss_fn, data = _case(kind, "ce", n=5, seed=3)
    Fe = _empirical_fisher(net, data, train=bn_mode == "train")
    E = EKFACOperator(
        net, loss_fn, data, params=NAMES, bn_mode=bn_mode, bias="joint", fisher="empirical"
    )
    _check_lambda(E, Fe)


def test_ekfac_coupled_samples_in_groups_and_batches_agree() -> None:
    """Sample groups of the pullback pass (memory budget) give the same eigenvalues."""
    net, loss_fn, data = _case("mlp", "ce", n=8, seed=5)
    E = EKFACOperator(net, loss_fn, data, params=NAMES, bn_mode="train")
    small = EKFACOperator(net, loss_fn, data, params=NAMES, bn_mode="train")
    small.pullback_budget = 1  # one loss sample per group
    for e, s in zip(E.eigen_blocks(), small.eigen_blocks()):
        assert torch.allclose(e.values, s.values, rtol=1e-13, atol=1e-16)
    G = dense_ggn(net, loss_fn, data, params=NAMES, bn_mode="train")
    _check_lambda(small, G)


def test_probe_marks_only_the_layers_before_batchnorm_coupled() -> None:
    net, loss_fn, data = _case("mlp", "ce")
    batch = next(iter(as_data(data)))
    for bn_mode, expected in [("train", {net.l1: True, net.l2: False}), ("eval", None)]:
        records = kronecker.batch_statistics(
            net, loss_fn, batch, [net.l1, net.l2], fisher="type2", bn_mode=bn_mode,
            probe_coupling=True,
        )  # fmt: skip
        got = {r.module: r.coupled for r in records}
        assert got == (expected or {net.l1: False, net.l2: False})
        assert all(len(r.grads) == 2 for r in records)  # the probe column is removed


def _kfac_g_reference(net: BNMLP, data: Any, train: bool) -> torch.Tensor:
    """K-FAC's documented G of l1: sum_m [J_s^T H J_s]_{mm} (J_s through the whole batch)."""
    x, y = data
    s0 = net.l1(x).detach()
    bn = net.bn

    def head(s: torch.Tensor) -> torch.Tensor:
        stats = (None, None) if train else (bn.running_mean, bn.running_var)
        h = F.batch_norm(s, *stats, bn.weight, bn.bias, training=train, eps=bn.eps)
        return net.l2(torch.tanh(h))

    with torch.no_grad():
        out = head(s0)
    n, d = s0.shape
    J = torch.autograd.functional.jacobian(head, s0).reshape(out.numel(), n * d)
    H = torch.autograd.functional.hessian(
        lambda o: F.cross_entropy(o.reshape(out.shape), y), out.reshape(-1)
    )
    Gs = (J.T @ H @ J).reshape(n, d, n, d)
    return torch.stack([Gs[m, :, m, :] for m in range(n)]).sum(dim=0)


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
def test_kfac_g_is_its_documented_definition_with_batchnorm(bn_mode: str) -> None:
    """K-FAC's G with coupled samples: one column per loss sample, no cross-sample terms.

    Before the fix the columns spanned every loss sample, so G of the layer before the
    BatchNorm held the cross terms of different loss samples (78 % off here) and
    depended on the choice of the output Hessian's square root; eval mode (and every
    layer after the BatchNorm) is unchanged.
    """
    net, loss_fn, data = _case("mlp", "ce", n=6, seed=2)
    K = KFACOperator(net, loss_fn, data, params=NAMES, bn_mode=bn_mode, bias="joint")
    E = EKFACOperator(net, loss_fn, data, params=NAMES, bn_mode=bn_mode, bias="joint")
    G1 = K.factors()[0][0]
    with torch.no_grad():
        assert isinstance(net, BNMLP)
        want = _kfac_g_reference(net, data, train=bn_mode == "train")
    assert torch.allclose(G1, want, rtol=1e-12, atol=1e-15)
    for (Gk, Ak), (Ge, Ae) in zip(K.factors(), E.factors()):  # E-KFAC keeps these bases
        assert torch.equal(Gk, Ge) and torch.equal(Ak, Ae)


def test_too_many_coupled_columns_are_refused_naming_bn_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net, loss_fn, data = _case("mlp", "ce", n=6)
    monkeypatch.setattr(kronecker, "MAX_FACTOR_COLUMNS", 8)  # 6 samples x 2 columns = 12
    for cls in (KFACOperator, EKFACOperator):
        op = cls(net, loss_fn, data, params=NAMES, bn_mode="train")
        with pytest.raises(ValueError, match=r"'bn_mode'.*bn_mode='eval'"):
            op.trace()
        assert cls(net, loss_fn, data, params=NAMES, bn_mode="eval").trace() > 0


def test_coupled_ekfac_leaves_the_model_untouched() -> None:
    net, loss_fn, data = _case("cnn", "mse")
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    EKFACOperator(net, loss_fn, data, params=NAMES).trace()
    assert net.training and net.bn.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_several_batches_with_coupled_samples(cls: type[KFACOperator]) -> None:
    """Every batch of a coupled model is probed; the operator is that of the batches."""
    net, loss_fn, (x, y) = _case("cnn", "mse", n=9, seed=4)  # BatchNorm2d: N = 1 runs
    batches = [(x[:1], y[:1]), (x[1:5], y[1:5]), (x[5:], y[5:])]
    op = cls(net, loss_fn, batches, params=NAMES, bn_mode="train", bias="joint")
    records = [r for _, rs in op._passes(probe_coupling=True) for r in rs]
    assert [r.coupled for r in records] == [False, False, True, False, True, False]
    if cls is EKFACOperator:
        G = dense_ggn(net, loss_fn, batches, params=NAMES, bn_mode="train")
        assert isinstance(op, EKFACOperator)
        _check_lambda(op, G)


def test_a_model_without_coupling_is_probed_on_its_first_batch_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net, loss_fn, (x, y) = _case("mlp", "ce", n=9, seed=4)
    batches = [(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:], y[6:])]
    calls = []
    probe = kronecker._with_probe

    def counted(*args: Any) -> Any:
        calls.append(1)
        return probe(*args)

    monkeypatch.setattr(kronecker, "_with_probe", counted)
    K = KFACOperator(net, loss_fn, batches, params=NAMES, bn_mode="eval")
    K.trace()
    assert len(calls) == 1
    calls.clear()
    KFACOperator(net, loss_fn, batches, params=NAMES, bn_mode="train").trace()
    assert len(calls) == 3
