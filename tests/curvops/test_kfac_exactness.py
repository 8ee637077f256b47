"""K-FAC/E-KFAC where the maths is exact: per-position E-KFAC columns, layouts, repeated calls.

References are dense float64 GGNs (:func:`curvops.testing.dense_ggn`); E-KFAC's eigenvalues
must be :math:`\\operatorname{diag}(U^\\top G_{\\rm block} U)` in its own eigenbasis
:math:`U = U_G \\otimes U_A`, whatever the model (position mixing included).  Tolerances are
rounding bounds :math:`c\\,n\\,\\varepsilon\\,\\|G\\|` for blocks of size :math:`n`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import EKFACOperator, GGNOperator, KFACOperator, ggn_diagonal
from curvops.testing import dense_ggn

DT = torch.float64
EPS = torch.finfo(DT).eps


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _init(net: nn.Module, seed: int, scale: float = 0.7) -> nn.Module:
    g = _gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * scale)
    return net.to(DT)


class TinyAttention(nn.Module):
    """One softmax self-attention layer and a per-token head: positions mix."""

    def __init__(self, d: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2) / x.shape[-1] ** 0.5
        h = torch.softmax(scores, dim=-1) @ self.v(x)
        return self.head(torch.tanh(h)).transpose(1, 2)  # (N, C, T) for cross-entropy


def _conv_conv(channels_out: int = 2) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, channels_out, 3, padding=1)
    )


def _ekfac_case(name: str) -> tuple[nn.Module, Any, Any]:
    g = _gen(1)
    if name == "linear-seq-mse":  # one layer, per-token loss: E-KFAC = K-FAC = GGN
        x, y = torch.randn(4, 5, 3, generator=g, dtype=DT), torch.randn(4, 5, 2, generator=g)
        return _init(nn.Linear(3, 2), 0), nn.MSELoss(), (x, y.to(DT))
    if name == "attention-ce":
        x = torch.randn(3, 4, 3, generator=g, dtype=DT)
        return _init(TinyAttention(), 0), nn.CrossEntropyLoss(), (x, torch.randint(0, 3, (3, 4)))
    if name == "conv-conv-pixel-ce":
        x = torch.randn(2, 2, 4, 4, generator=g, dtype=DT)
        y = torch.randint(0, 3, (2, 4, 4), generator=g)
        return _init(_conv_conv(3), 0), nn.CrossEntropyLoss(), (x, y)
    if name == "conv-conv-nchw-mse":
        x = torch.randn(2, 2, 4, 4, generator=g, dtype=DT)
        return _init(_conv_conv(), 0), nn.MSELoss(), (x, torch.randn(2, 2, 4, 4, generator=g))
    raise KeyError(name)


def _rotated_diagonals(E: EKFACOperator, G: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(E-KFAC's eigenvalues, diag(U^T G_block U), bound) for every block."""
    out = []
    scale = float(torch.linalg.matrix_norm(G, 2))
    for block, e in zip(E.blocks, E.eigen_blocks()):
        pos = block.positions.reshape(-1)
        U = torch.kron(e.U_G, e.U_A)
        Gb = G[pos.unsqueeze(1), pos.unsqueeze(0)]
        # a block that vanishes (a key bias under softmax) is rounding of order eps ||G||
        norm = max(float(torch.linalg.matrix_norm(Gb, 2)), EPS * scale)
        bound = 64 * pos.numel() * EPS * norm
        out.append((e.values.reshape(-1), torch.diagonal(U.T @ Gb @ U), torch.tensor(bound)))
    return out


@pytest.mark.parametrize(
    "case", ["linear-seq-mse", "attention-ce", "conv-conv-pixel-ce", "conv-conv-nchw-mse"]
)
@pytest.mark.parametrize("bias", ["separate", "joint"])
def test_ekfac_type2_eigenvalues_are_the_exact_rotated_diagonal(case: str, bias: str) -> None:
    """Per-position loss with weight sharing: no cross-position terms in the corrections."""
    model, loss_fn, data = _ekfac_case(case)
    G = dense_ggn(model, loss_fn, data)
    E = EKFACOperator(model, loss_fn, data, bias=bias)
    for values, want, bound in _rotated_diagonals(E, G):
        assert float((values - want).abs().max()) <= float(bound)


def test_ekfac_is_the_ggn_for_one_linear_layer_on_a_sequence() -> None:
    model, loss_fn, data = _ekfac_case("linear-seq-mse")
    G = dense_ggn(model, loss_fn, data)
    E = EKFACOperator(model, loss_fn, data, bias="joint")
    bound = 64 * G.shape[0] * EPS * float(torch.linalg.matrix_norm(G, 2))
    assert float((E.to_dense() - G).abs().max()) <= bound


# ---------------------------------------------------------------------------- #2 layouts
class ChannelsLast(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).permute(0, 2, 3, 1)


@pytest.mark.parametrize("loss_name", ["mse", "bce"])
@pytest.mark.parametrize("depth", [1, 2])
def test_kfac_mse_columns_do_not_depend_on_the_output_layout(loss_name: str, depth: int) -> None:
    """NCHW and NHWC outputs of an elementwise loss: the same GGN, the same K-FAC."""
    g = _gen(2)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    net = _init(conv if depth == 1 else _conv_conv(3), 0)
    x = torch.randn(2, 2, 4, 4, generator=g, dtype=DT)
    y = torch.randn(2, 3, 4, 4, generator=g, dtype=DT)
    loss_fn: nn.Module = nn.MSELoss()
    if loss_name == "bce":
        y, loss_fn = (y > 0).to(DT), nn.BCEWithLogitsLoss()
    nchw = KFACOperator(net, loss_fn, (x, y), bias="joint").to_dense()
    nhwc = KFACOperator(ChannelsLast(net), loss_fn, (x, y.permute(0, 2, 3, 1)), bias="joint")
    scale = float(nchw.abs().max())
    assert float((nchw - nhwc.to_dense()).abs().max()) <= 64 * nchw.shape[0] * EPS * scale
    if depth == 1 and loss_name == "mse":  # one layer, MSE, expand: K-FAC is the GGN
        G = dense_ggn(net, loss_fn, (x, y))
        assert float((nchw - G).abs().max()) <= 64 * G.shape[0] * EPS * float(G.abs().max())


# ---------------------------------------------------------------------------- #4 repeated calls
class OneCall(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


class TwoCalls(OneCall):
    """The same function, the layer called once per position (an unrolled cell)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.stack([self.lin(x[:, 0]), self.lin(x[:, 1])], dim=1))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_a_layer_called_twice_counts_its_calls_as_positions(cls: type, approx: str) -> None:
    g = _gen(3)
    lin = _init(nn.Linear(3, 2), 0)
    x = torch.randn(4, 2, 3, generator=g, dtype=DT)
    y = torch.randn(4, 2, 2, generator=g, dtype=DT)
    loss_fn = nn.MSELoss()
    one = cls(OneCall(lin), loss_fn, (x, y), bias="joint", approx=approx)
    two = cls(TwoCalls(lin), loss_fn, (x, y), bias="joint", approx=approx)
    G = dense_ggn(TwoCalls(lin), loss_fn, (x, y))
    bound = 64 * G.shape[0] * EPS * float(G.abs().max())
    assert float((one.to_dense() - two.to_dense()).abs().max()) <= bound
    if cls is EKFACOperator:
        for values, want, tol in _rotated_diagonals(two, G):
            assert float((values - want).abs().max()) <= float(tol)
    else:  # the trace of the one-call form (exact for expand without the tanh's mixing)
        assert abs(two.trace() - one.trace()) <= bound * G.shape[0]


def test_a_linear_layer_called_twice_without_nonlinearity_is_exact() -> None:
    g = _gen(4)
    lin = _init(nn.Linear(3, 2), 0)

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([self.lin(x[:, 0]), self.lin(x[:, 1])], dim=1)

    x, y = torch.randn(4, 2, 3, generator=g, dtype=DT), torch.randn(4, 2, 2, generator=g)
    G = dense_ggn(Plain(), nn.MSELoss(), (x, y.to(DT)))
    K = KFACOperator(Plain(), nn.MSELoss(), (x, y.to(DT)), bias="joint").to_dense()
    assert float((K - G).abs().max()) <= 64 * G.shape[0] * EPS * float(G.abs().max())


# ---------------------------------------------------------------------------- #6 tied weights
class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(t))).mean(1)


def test_a_weight_tied_to_another_module_is_refused_or_kept_exactly() -> None:
    model = _init(Tied(), 0)
    g = _gen(5)
    data = (torch.randint(0, 5, (3, 2), generator=g), torch.randint(0, 5, (3,), generator=g))
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match=r"'emb.weight' of layer 'out'.*\['emb'\]"):
        KFACOperator(model, loss_fn, data)
    K = KFACOperator(model, loss_fn, data, remainder="diagonal")
    assert K.blocks == []
    want = ggn_diagonal(model, loss_fn, data)
    torch.testing.assert_close(torch.diagonal(K.to_dense()), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------- #8, #9, #11
def test_kl_divergence_on_log_probabilities_is_refused_like_nll() -> None:
    net = _init(nn.Sequential(nn.Linear(3, 3), nn.LogSoftmax(-1)), 0)
    x = torch.randn(4, 3, generator=_gen(6), dtype=DT)
    p = torch.softmax(torch.randn(4, 3, generator=_gen(7), dtype=DT), dim=-1)
    for loss_fn in (nn.KLDivLoss(reduction="batchmean"), torch.nn.functional.kl_div):
        with pytest.raises(ValueError, match="KLDivLoss is linear"):
            GGNOperator(net, loss_fn, (x, p))
        with pytest.raises(ValueError, match="KLDivLoss is linear"):
            ggn_diagonal(net, loss_fn, (x, p))
        with pytest.raises(ValueError, match="loss_fn"):
            KFACOperator(net, loss_fn, (x, p))


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_non_finite_vectors_and_empty_blocks(cls: type) -> None:
    net = _init(nn.Linear(3, 2), 0)
    g = _gen(8)
    data = (torch.randn(5, 3, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT))
    K = cls(net, nn.MSELoss(), data)
    v = torch.ones(8, dtype=DT)
    v[3] = float("nan")
    for op in (K, K.inverse(0.1)):
        with pytest.raises(ValueError, match="Argument 'x': expected finite entries"):
            op @ v
        out = op @ np.zeros((8, 0))
        assert isinstance(out, np.ndarray) and out.shape == (8, 0)
        assert tuple((op @ torch.zeros(8, 0, dtype=DT)).shape) == (8, 0)


def test_more_factor_columns_than_the_limit_are_refused_naming_fisher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """E-KFAC's exact type-2 corrections take T'(C - 1) columns (a language model: tens of
    thousands of backward passes); above the limit a clear error points to fisher='mc'."""
    import curvops.kronecker as kronecker

    model, loss_fn, (x, y) = _ekfac_case("attention-ce")  # T' = 4 positions, C = 3 classes
    monkeypatch.setattr(kronecker, "MAX_FACTOR_COLUMNS", 7)
    v = np.ones(sum(p.numel() for p in model.parameters()))
    KFACOperator(model, loss_fn, (x, y)) @ v  # 2 columns: within the limit
    EKFACOperator(model, loss_fn, (x, y), fisher="mc") @ v  # 1 column per MC sample
    with pytest.raises(ValueError, match=r"Argument 'fisher'.*fisher='mc'.*'type2' needing 8"):
        EKFACOperator(model, loss_fn, (x, y)) @ v
    monkeypatch.setattr(kronecker, "MAX_FACTOR_COLUMNS", 8)
    EKFACOperator(model, loss_fn, (x, y)) @ v
