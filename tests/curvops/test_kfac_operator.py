"""K-FAC and E-KFAC operators: exact identities, structure, contracts, curvlinops as oracle."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import EKFACOperator, FisherOperator, KFACOperator, ggn_diagonal
from curvops._model_state import model_state, state_differences
from curvops.data import as_data
from curvops.kronecker import flatten_loss_terms
from curvops.losses import batch_generator, sample_targets
from curvops.testing import check_operator_contract, dense_ggn
from spectral.errors import NumericalError

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class SequenceNet(nn.Module):
    """Linear layers on (N, T, d) inputs; ``pool`` averages over T before the last layer."""

    def __init__(self, pool: bool, seed: int = 0) -> None:
        super().__init__()
        g = _gen(seed)
        self.pool = pool
        self.first = nn.Linear(3, 4)
        self.last = nn.Linear(4, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        if self.pool:
            h = h.mean(dim=1)
        return self.last(h)


def _cnn(seed: int = 0) -> nn.Module:
    g = _gen(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.6)
    return net.to(DT)


def _split(x: torch.Tensor, y: torch.Tensor, sizes: tuple[int, ...]) -> list[Any]:
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def _case(name: str) -> tuple[nn.Module, nn.Module, list[Any]]:
    """Model, loss and two unequal batches; enough samples for non-degenerate factors."""
    g = _gen(5)
    if name == "cnn-ce":
        x = torch.randn(30, 2, 6, 6, generator=g, dtype=DT)
        y = torch.randint(0, 3, (30,), generator=g)
        return _cnn(), nn.CrossEntropyLoss(), _split(x, y, (18, 12))
    if name == "seq-mse":  # (N, T, C) outputs: a loss term per position
        x = torch.randn(14, 5, 3, generator=g, dtype=DT)
        y = torch.randn(14, 5, 2, generator=g, dtype=DT)
        return SequenceNet(pool=False).to(DT), nn.MSELoss(), _split(x, y, (8, 6))
    if name == "seq-pool-ce":  # weight sharing inside, (N, C) outputs
        x = torch.randn(14, 5, 3, generator=g, dtype=DT)
        y = torch.randint(0, 2, (14,), generator=g)
        return SequenceNet(pool=True).to(DT), nn.CrossEntropyLoss(), _split(x, y, (8, 6))
    if name == "mlp-bce":
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
        x = torch.randn(12, 3, generator=g, dtype=DT)
        y = torch.randint(0, 2, (12, 2), generator=g).to(DT)
        return net, nn.BCEWithLogitsLoss(), _split(x, y, (7, 5))
    raise KeyError(name)


# ---------------------------------------------------------------------------- the peer as oracle
_CURVLINOPS_FISHER = {"type2": "type-2", "mc": "mc", "empirical": "empirical"}


def _our_mc_targets(
    model: nn.Module, loss_fn: nn.Module, data: list[Any], seed: int, mc_samples: int
) -> list[torch.Tensor]:
    """The targets our operator draws, batch by batch, one entry per MC sample."""
    draws = []
    for batch in as_data(data):
        with torch.no_grad():
            out = model(batch.inputs)
        flat, targets = flatten_loss_terms(loss_fn, out, batch.targets)
        sampled = sample_targets(
            loss_fn, flat, targets, mc_samples, batch_generator(seed, batch.index)
        )
        draws.extend(sampled.unbind(0))
    return draws


def _peer_shaped(draw: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Regression draws in the peer's output shape; class indices as they are."""
    return draw.reshape(output.shape) if draw.numel() == output.numel() else draw


def _peer_dense(
    cls_name: str,
    model: nn.Module,
    loss_fn: nn.Module,
    data: list[Any],
    *,
    fisher: str,
    approx: str,
    bias: str,
    monkeypatch: pytest.MonkeyPatch,
    seed: int = 3,
    mc_samples: int = 1,
) -> torch.Tensor:
    curvlinops = pytest.importorskip("curvlinops")
    cls = getattr(curvlinops, cls_name)
    if fisher == "mc":  # the same samples on both sides: ours, fed to the peer in its order
        draws = itertools.cycle(_our_mc_targets(model, loss_fn, data, seed, mc_samples))
        monkeypatch.setattr(
            # our MSE/BCE draws are shaped (N, M) (one row per sample), the peer's
            # outputs (N T, C): the same entries in the same order
            curvlinops.KFACLinearOperator,
            "draw_label",
            lambda self, output: _peer_shaped(next(draws), output),
        )
    peer = cls(
        model,
        loss_fn,
        [p for p in model.parameters()],
        data,
        fisher_type=_CURVLINOPS_FISHER[fisher],
        kfac_approx=approx,
        mc_samples=mc_samples,
        separate_weight_and_bias=bias == "separate",
        check_deterministic=False,
    )
    n = peer.shape[0]
    return torch.as_tensor(peer @ torch.eye(n, dtype=DT))


def _assert_close_to_peer(ours: torch.Tensor, peer: torch.Tensor) -> None:
    # both sum the same float64 outer products in different orders: 1e-10 relative
    scale = float(peer.abs().max())
    assert scale > 0
    assert float((ours - peer).abs().max()) <= 1e-10 * scale


@pytest.mark.parametrize("fisher", ["type2", "mc", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("case", ["cnn-ce", "seq-mse", "mlp-bce"])
def test_kfac_equals_curvlinops(
    case: str, bias: str, approx: str, fisher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if case == "mlp-bce" and approx == "reduce":
        pytest.skip("no weight sharing: reduce == expand (covered by the other cases)")
    if case == "seq-mse" and approx == "reduce" and fisher == "type2":
        pytest.skip(
            "our MSE columns are the output elements, the peer's the last axis summed over "
            "positions: reduce's sums over positions differ (test_kfac_mse_columns_*)"
        )
    model, loss_fn, data = _case(case)
    mc = 2 if fisher == "mc" else 1
    K = KFACOperator(
        model, loss_fn, data, fisher=fisher, approx=approx, bias=bias, seed=3, mc_samples=mc
    )
    peer = _peer_dense(
        "KFACLinearOperator",
        model,
        loss_fn,
        data,
        fisher=fisher,
        approx=approx,
        bias=bias,
        monkeypatch=monkeypatch,
        mc_samples=mc,
    )
    _assert_close_to_peer(K.to_dense(), peer)
    if fisher == "type2" and bias == "separate":
        # the products agree with the assembled matrix
        torch.testing.assert_close(
            K @ torch.eye(K.shape[0], dtype=DT), peer, rtol=0, atol=1e-10 * float(peer.abs().max())
        )


@pytest.mark.parametrize("fisher", ["type2", "mc", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("case", ["cnn-ce", "seq-pool-ce"])
def test_ekfac_equals_curvlinops(
    case: str, bias: str, approx: str, fisher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, loss_fn, data = _case(case)
    E = EKFACOperator(model, loss_fn, data, fisher=fisher, approx=approx, bias=bias, seed=3)
    peer = _peer_dense(
        "EKFACLinearOperator",
        model,
        loss_fn,
        data,
        fisher=fisher,
        approx=approx,
        bias=bias,
        monkeypatch=monkeypatch,
    )
    _assert_close_to_peer(E.to_dense(), peer)


# ---------------------------------------------------------------------------- exact identities
def _one_sample_linear(bias: bool) -> tuple[nn.Module, nn.Module, Any]:
    g = _gen(11)
    net = nn.Linear(3, 2, bias=bias).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(1, 3, generator=g, dtype=DT)
    y = torch.randn(1, 2, generator=g, dtype=DT)
    return net, nn.MSELoss(), (x, y)


@pytest.mark.parametrize("bias", [False, True])
def test_kfac_and_ekfac_are_exact_for_one_linear_layer_mse_and_one_sample(bias: bool) -> None:
    net, loss_fn, data = _one_sample_linear(bias)
    exact = dense_ggn(net, loss_fn, data)
    K = KFACOperator(net, loss_fn, data, bias="joint")
    torch.testing.assert_close(K.to_dense(), exact, rtol=0, atol=1e-14)
    E = EKFACOperator(net, loss_fn, data, bias="joint")
    torch.testing.assert_close(E.eigenvalues(), torch.linalg.eigvalsh(exact), rtol=0, atol=1e-14)
    torch.testing.assert_close(E.to_dense(), exact, rtol=0, atol=1e-14)
    if bias:  # separately treated bias blocks drop the weight-bias coupling: not exact
        separate = KFACOperator(net, loss_fn, data, bias="separate").to_dense()
        assert float((separate - exact).abs().max()) > 1e-3


def _mse_mlp() -> tuple[nn.Module, nn.Module, list[Any]]:
    """Full-rank factors (more samples than inputs), so every eigenvalue is positive."""
    g = _gen(21)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(20, 3, generator=g, dtype=DT)
    y = torch.randn(20, 2, generator=g, dtype=DT)
    return net, nn.MSELoss(), _split(x, y, (12, 8))


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("bias", ["separate", "joint"])
def test_eigenvalues_trace_logdet_equal_the_dense_matrix(cls: type, bias: str) -> None:
    net, loss_fn, data = _mse_mlp()
    K = cls(net, loss_fn, data, bias=bias)
    dense = K.to_dense()
    torch.testing.assert_close(dense, dense.T, rtol=0, atol=0)
    # the assembled matrix is the matrix of the products
    torch.testing.assert_close(K @ torch.eye(K.shape[0], dtype=DT), dense, rtol=0, atol=1e-15)
    want = torch.linalg.eigvalsh(dense)
    assert float(want.min()) > 1e-8
    torch.testing.assert_close(K.eigenvalues(), want, rtol=1e-10, atol=1e-15)
    assert math.isclose(K.trace(), float(torch.trace(dense)), rel_tol=1e-12)
    sign, logabs = torch.linalg.slogdet(dense)
    assert float(sign) == 1.0
    assert math.isclose(K.logdet(), float(logabs), rel_tol=1e-10)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_damped_inverse_times_operator_is_the_identity(cls: type) -> None:
    net, loss_fn, data = _case("cnn-ce")
    K = cls(net, loss_fn, data)
    delta = 1e-3
    inv = K.inverse(delta)
    n = K.shape[0]
    product = inv @ (K.damp(delta) @ torch.eye(n, dtype=DT))
    # rounding: cond(K + delta I) * eps
    cond = float(K.eigenvalues().max() + delta) / delta
    torch.testing.assert_close(product, torch.eye(n, dtype=DT), rtol=0, atol=50 * cond * 2.2e-16)
    torch.testing.assert_close(inv.to_dense(), inv @ torch.eye(n, dtype=DT), rtol=0, atol=1e-9)
    assert math.isclose(
        inv.logdet(), -float(torch.log(K.eigenvalues() + delta).sum()), rel_tol=1e-10
    )
    with pytest.raises(ValueError, match="damping"):
        K.inverse(-1.0)


def test_pi_damped_inverse_is_the_product_of_damped_factor_inverses() -> None:
    net, loss_fn, data = _mse_mlp()
    K = KFACOperator(net, loss_fn, data, bias="joint")
    delta = 1e-2
    inv = K.inverse(delta, pi_damping=True).to_dense()
    n = K.shape[0]
    want = torch.zeros(n, n, dtype=DT)
    for block, (G, A) in zip(K.blocks, K.factors()):
        pi = math.sqrt((float(torch.trace(A)) / A.shape[0]) / (float(torch.trace(G)) / G.shape[0]))
        Gi = torch.linalg.inv(G + math.sqrt(delta) / pi * torch.eye(G.shape[0], dtype=DT))
        Ai = torch.linalg.inv(A + pi * math.sqrt(delta) * torch.eye(A.shape[0], dtype=DT))
        pos = block.positions.reshape(-1)
        want[pos.unsqueeze(1), pos.unsqueeze(0)] = torch.kron(Gi, Ai)
    torch.testing.assert_close(inv, want, rtol=1e-10, atol=1e-12)
    # not the inverse of the damped matrix
    exact = torch.linalg.inv(K.to_dense() + delta * torch.eye(n, dtype=DT))
    assert float((inv - exact).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="pi_damping"):
        EKFACOperator(net, loss_fn, data).inverse(delta, pi_damping=True)


# ---------------------------------------------------------------------------- contracts
@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_operator_contract(cls: type) -> None:
    net, loss_fn, data = _mse_mlp()
    K = cls(net, loss_fn, data)
    check_operator_contract(K, K.to_dense())
    check_operator_contract(K.inverse(0.1), K.inverse(0.1).to_dense())


def test_products_follow_the_model_and_leave_it_unchanged() -> None:
    net, loss_fn, data = _case("cnn-ce")
    before = model_state(net)
    K = KFACOperator(net, loss_fn, data, fisher="mc", seed=1)
    v = torch.randn(K.shape[0], generator=_gen(0), dtype=DT)
    first = K @ v
    assert state_differences(before, net) == []
    with torch.no_grad():
        net[3].weight.mul_(1.5)
    second = K @ v
    fresh = KFACOperator(net, loss_fn, data, fisher="mc", seed=1)
    torch.testing.assert_close(second, fresh @ v, rtol=0, atol=0)
    assert float((second - first).abs().max()) > 1e-6
    # same seed, same matrix
    torch.testing.assert_close(fresh.to_dense(), K.to_dense(), rtol=0, atol=0)


def test_batchnorm_train_mode_is_used_and_left_alone() -> None:
    g = _gen(4)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randint(0, 2, (10,), generator=g)
    before = model_state(net)
    params = [net[0].weight, net[0].bias, net[3].weight, net[3].bias]
    train = KFACOperator(net, nn.CrossEntropyLoss(), (x, y), params=params, bn_mode="train")
    evalm = KFACOperator(net, nn.CrossEntropyLoss(), (x, y), params=params, bn_mode="eval")
    assert float((train.to_dense() - evalm.to_dense()).abs().max()) > 1e-6
    assert state_differences(before, net) == []


# ---------------------------------------------------------------------------- remainder and errors
def test_parameters_outside_supported_layers_are_refused_or_an_explicit_diagonal() -> None:
    g = _gen(4)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(10, 3, generator=g, dtype=DT), torch.randint(0, 2, (10,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"1\.weight"):
        KFACOperator(net, loss_fn, (x, y))
    K = KFACOperator(net, loss_fn, (x, y), remainder="diagonal")
    names = [n for n, _ in net.named_parameters()]
    dense = K.to_dense()
    ln = slice(4 * 3 + 4, 4 * 3 + 4 + 8)  # LayerNorm weight and bias in vector order
    diag = ggn_diagonal(net, loss_fn, (x, y), params=["1.weight", "1.bias"])
    torch.testing.assert_close(torch.diagonal(dense)[ln], diag, rtol=1e-12, atol=0)
    off = dense[ln].clone()
    off[:, ln] -= torch.diag(diag)
    assert float(off.abs().max()) == 0.0
    # the other blocks are those of K-FAC on the supported parameters alone
    supported = [n for n in names if not n.startswith("1.")]
    alone = KFACOperator(net, loss_fn, (x, y), params=supported).to_dense()
    keep = torch.tensor([i for i in range(K.shape[0]) if not ln.start <= i < ln.stop])
    torch.testing.assert_close(dense[keep][:, keep], alone, rtol=0, atol=0)
    emp = KFACOperator(net, loss_fn, (x, y), remainder="diagonal", fisher="empirical")
    want = torch.diagonal(FisherOperator(net, loss_fn, (x, y), kind="empirical").to_dense())[ln]
    torch.testing.assert_close(torch.diagonal(emp.to_dense())[ln], want, rtol=1e-12, atol=1e-15)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.layer.weight, self.layer.bias)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fisher": "type-2"}, "fisher"),
        ({"approx": "full"}, "approx"),
        ({"bias": "both"}, "bias"),
        ({"remainder": "drop"}, "remainder"),
        ({"mc_samples": 2}, "mc_samples"),
        ({"fisher": "mc", "mc_samples": 0}, "mc_samples"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    net, loss_fn, data = _mse_mlp()
    with pytest.raises(ValueError, match=match):
        KFACOperator(net, loss_fn, data, **kwargs)


def test_layers_whose_forward_is_never_called_are_an_error_not_zero() -> None:
    net = _Tied().to(DT)
    data = (torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT))
    K = KFACOperator(net, nn.MSELoss(), data)
    with pytest.raises(NumericalError, match="never called"):
        K @ np.ones(K.shape[0])
    with pytest.raises(ValueError, match="loss_fn"):
        KFACOperator(nn.Linear(2, 2).to(DT), nn.L1Loss(), data, fisher="type2")


def test_empirical_kfac_accepts_any_separable_loss() -> None:
    net = nn.Sequential(nn.Linear(3, 2)).to(DT)
    g = _gen(2)
    x, y = torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 4).sum(dim=1).mean()

    K = KFACOperator(net, loss_fn, (x, y), fisher="empirical", bias="joint")
    # empirical K-FAC of one layer = A (x) G with per-sample gradients of the loss
    a = torch.cat([x, torch.ones(5, 1, dtype=DT)], dim=1)
    out = net(x).detach()
    gr = 4 * (out - y) ** 3  # d l_n / d f_n
    A = a.T @ a / 5
    G = gr.T @ gr / 5
    pos = K.blocks[0].positions.reshape(-1)
    want = torch.zeros(8, 8, dtype=DT)
    want[pos.unsqueeze(1), pos.unsqueeze(0)] = torch.kron(G, A)
    torch.testing.assert_close(K.to_dense(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_factors_do_not_depend_on_how_the_data_is_split_into_batches(
    fisher: str, reduction: str
) -> None:
    """A mean loss's batches weighted by their sizes (every factor a mean over samples), a
    summed loss's output factors added up (with reduction="sum" a list of three batches
    gave a third of the concatenated batch's K-FAC before)."""
    model, _, data = _case("seq-mse")
    loss_fn = nn.MSELoss(reduction=reduction)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    whole = KFACOperator(model, loss_fn, (x, y), fisher=fisher, approx="reduce")
    split = KFACOperator(model, loss_fn, _split(x, y, (3, 5, 6)), fisher=fisher, approx="reduce")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    streamed = KFACOperator(model, loss_fn, loader, fisher=fisher, approx="reduce")
    for (G1, A1), (G2, A2), (G3, A3) in zip(whole.factors(), split.factors(), streamed.factors()):
        torch.testing.assert_close(G2, G1, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(A2, A1, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(G3, G1, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(A3, A1, rtol=1e-12, atol=1e-15)
    E_whole = EKFACOperator(model, loss_fn, (x, y), fisher=fisher)
    E_split = EKFACOperator(model, loss_fn, _split(x, y, (3, 5, 6)), fisher=fisher)
    for b1, b2 in zip(E_whole.eigen_blocks(), E_split.eigen_blocks()):
        torch.testing.assert_close(b2.values, b1.values, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fisher", ["type2", "mc", "empirical"])
@pytest.mark.parametrize(
    "loss_fn",
    [
        nn.CrossEntropyLoss(ignore_index=-100),
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5])),
    ],
    ids=["ignore_index", "class-weights"],
)
def test_losses_not_weighting_terms_equally_are_refused(fisher: str, loss_fn: nn.Module) -> None:
    # K-FAC averages over loss terms: with ignored targets or class weights the mean loss
    # divides by something else, and a list of batches would differ from their union.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    loss_fn = (
        loss_fn.double() if hasattr(loss_fn, "weight") and loss_fn.weight is not None else loss_fn
    )
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, -100, 2, -100, 0, 1, 0, 2, 1])
    if loss_fn.weight is not None:
        y = y.clamp_min(0)
    with pytest.raises(ValueError, match=r"Argument 'loss_fn'.*weights its 10 loss terms equally"):
        KFACOperator(model, loss_fn, (x, y), fisher=fisher).to_dense()
    ok = KFACOperator(
        model, nn.CrossEntropyLoss(ignore_index=-100), (x, y.clamp_min(0)), fisher=fisher
    )
    assert bool(torch.isfinite(torch.as_tensor(ok.to_dense())).all())
