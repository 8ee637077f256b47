"""The K-FAC and E-KFAC optimisers against curvops.KFACOperator and EKFACOperator.

At the first update (``stat_decay=0``, factors and inverses refreshed, no momentum,
KL-clip or weight decay) the optimiser's step is :math:`-\\alpha` times its
preconditioned gradient, which is determined by the batch factors alone; float64
throughout, so directions agree to rounding where the definitions coincide.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from curvops import EKFACOperator, KFACOperator
from nets.optim.kfac import EKFAC, KFAC

DT = torch.float64
DAMPING = 0.1
RTOL = 1e-10  # float64 solves of well-conditioned (damped) systems of size < 100


def _init(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = model.to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) * 0.6)
    return model


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _gradient(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]


def _first_direction(
    cls: type[KFAC], model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor, KFAC, nn.Module]:  # fmt: skip
    """The preconditioned gradient of the first step (lr = 1), the optimiser, its model."""
    net = copy.deepcopy(model)
    before = _flat(net)
    settings = {"fisher": "empirical", "damping": DAMPING, "stat_decay": 0.0}
    opt = cls(net, lr=1.0, momentum=0.0, kl_clip=None, factor_update_freq=1,
              inv_update_freq=1, **{**settings, **kwargs})  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        return loss

    opt.step(closure=closure, curvature_batch=(x, y), loss_fn=loss_fn)
    return before - _flat(net), opt, net


def _assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    err = float((a - b).norm() / b.norm())
    assert err < rtol, f"relative error {err:.3e}"


class _Twice(nn.Module):
    """One Linear applied twice per forward (an unrolled recurrent cell)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.cell(torch.tanh(self.cell(x)))))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize("make", [_mlp, _Twice], ids=["mlp", "linear-called-twice"])
def test_first_step_is_the_curvops_preconditioned_gradient(make: Any) -> None:
    """Empirical Fisher, (N, C) cross-entropy: the optimisers' step is exactly the
    operators' (pi-damped K-FAC inverse, exact damped E-KFAC inverse) applied to the
    gradient.  A layer called twice counts its calls as positions (was 2x in A:
    16 % off in the K-FAC direction)."""
    gen = torch.Generator().manual_seed(1)
    model = _init(make(), 0)
    x = torch.randn(12, 5 if make is _mlp else 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    g = _gradient(model, loss_fn, x, y)
    ops = {"fisher": "empirical", "bias": "joint", "approx": "expand"}
    K = KFACOperator(model, loss_fn, (x, y), **ops)
    direction, _, _ = _first_direction(KFAC, model, loss_fn, x, y)
    _assert_close(direction, K.inverse(DAMPING, pi_damping=True) @ g)
    E = EKFACOperator(model, loss_fn, (x, y), **ops)
    direction, _, _ = _first_direction(EKFAC, model, loss_fn, x, y)
    _assert_close(direction, E.inverse(DAMPING) @ g)


class _Tokens(nn.Module):
    """Position-wise layers on ``[B, T, D]``, logits ``[B, C, T]`` for a per-token loss."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))).transpose(1, 2)


def test_token_level_mc_fisher_is_that_of_the_flattened_batch() -> None:
    """A per-token cross-entropy on ``[B, T, D]`` is the same mean loss as the ``B T``
    tokens as samples, so with the same sampled labels (the same draws, in the same
    order) the MC K-FAC must be the same: :math:`A \\otimes G` is, and so is the
    pi-damped direction (pi scales by T, the damped factors by T and 1/T).  Before, the
    sampled labels gave the token loss's per-sample Fisher, T = 4 times too small."""
    gen = torch.Generator().manual_seed(2)
    model = _init(_Tokens(), 3)
    b, t = 6, 4
    x = torch.randn(b, t, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (b, t), generator=gen)
    flat = nn.Sequential(model.a, nn.Tanh(), model.b)
    for seed in (0, 1):
        d_tok, opt_tok, net = _first_direction(
            KFAC, model, nn.CrossEntropyLoss(), x, y, fisher="mc", seed=seed
        )
        d_flat, opt_flat, net_flat = _first_direction(
            KFAC, flat, nn.CrossEntropyLoss(), x.reshape(b * t, 4), y.reshape(-1),
            fisher="mc", seed=seed,
        )  # fmt: skip
        _assert_close(d_tok, d_flat)
        for layer, layer_flat in ((net.a, net_flat[0]), (net.b, net_flat[2])):
            A, G = opt_tok.factors(layer)
            A_f, G_f = opt_flat.factors(layer_flat)
            _assert_close(torch.kron(A, G), torch.kron(A_f, G_f))


def test_token_level_empirical_fisher_is_per_sample() -> None:
    """The optimisers' empirical Fisher uses the per-sample losses (mean over tokens):
    for position-wise layers it is :math:`1/T` of the operators' per-token one,
    :math:`A = T A_{\\rm op}`, :math:`G = G_{\\rm op}/T^2`, exactly."""
    gen = torch.Generator().manual_seed(4)
    model = _init(_Tokens(), 5)
    b, t = 5, 4
    x = torch.randn(b, t, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (b, t), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    _, opt, net = _first_direction(KFAC, model, loss_fn, x, y)
    K = KFACOperator(model, loss_fn, (x, y), fisher="empirical", bias="joint")
    for layer, (G_op, A_op) in zip((net.a, net.b), K.factors()):
        A, G = opt.factors(layer)
        _assert_close(A, t * A_op)
        _assert_close(G, G_op / t**2)


def test_conv_nchw_into_mse() -> None:
    """Conv2d outputs ``(N, C, H, W)`` into ``MSELoss``: the factors are those of the
    operators (per output element) up to the documented normalisations: A over samples
    (not positions, :math:`T = HW`), the empirical Fisher of the per-sample losses
    (:math:`1/M` of the operators', :math:`M = CHW` elements per sample).  E-KFAC's
    corrections likewise, :math:`S = \\Lambda_{\\rm op}/M`."""
    gen = torch.Generator().manual_seed(6)
    model = _init(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1)),
        7,
    )
    x = torch.randn(4, 2, 5, 5, generator=gen, dtype=DT)
    y = torch.randn(4, 2, 5, 5, generator=gen, dtype=DT)
    loss_fn = nn.MSELoss()
    t, m = 25, 2 * 25
    _, opt, net = _first_direction(KFAC, model, loss_fn, x, y)
    K = KFACOperator(model, loss_fn, (x, y), fisher="empirical", bias="joint")
    for layer, (G_op, A_op) in zip((net[0], net[2]), K.factors()):
        A, G = opt.factors(layer)
        _assert_close(A, t * A_op)
        _assert_close(G, G_op / (t * m))
    _, eopt, enet = _first_direction(EKFAC, model, loss_fn, x, y)
    E = EKFACOperator(model, loss_fn, (x, y), fisher="empirical", bias="joint")
    for layer, block in zip((enet[0], enet[2]), E.eigen_blocks()):
        _, _, S = eopt.eigenbasis(layer)  # type: ignore[attr-defined]
        _assert_close(S, block.values / m)


class _Tied(nn.Module):
    """An embedding and an output layer sharing one weight (GPT's tied head)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_tied_weights_take_the_plain_gradient(cls: type[KFAC]) -> None:
    """A weight registered in another module too is used outside the layer's calls
    (the operators refuse it): the layer is not K-FAC-preconditioned, its weight takes
    the plain gradient, the other layers keep K-FAC."""
    gen = torch.Generator().manual_seed(8)
    model = _init(_Tied(), 9)
    ids = torch.randint(0, 6, (10,), generator=gen)
    y = torch.randint(0, 6, (10,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    g = _gradient(model, loss_fn, ids, y)
    direction, opt, net = _first_direction(cls, model, loss_fn, ids, y)
    with pytest.raises(ValueError, match="module"):
        opt.factors(net.head)
    opt.factors(net.mid)
    tied = slice(0, net.emb.weight.numel())  # emb.weight is the first parameter
    torch.testing.assert_close(direction[tied], g[tied], rtol=1e-14, atol=1e-15)


def _mc_factors(
    loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0
) -> list[torch.Tensor]:
    """The MC K-FAC output factors G of both layers of :class:`_Tokens` after one update."""
    _, opt, net = _first_direction(KFAC, _init(_Tokens(), 3), loss_fn, x, y, fisher="mc", seed=seed)
    return [opt.factors(layer)[1] for layer in (net.a, net.b)]


def _padded_tokens() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 5, 4, generator=gen, dtype=DT)
    y = torch.randint(1, 3, (6, 5), generator=gen)  # classes 1 and 2 counted
    pad = torch.zeros(6, 5, dtype=torch.bool)
    pad[0, 3:], pad[2, 1:], pad[5, 4] = True, True, True
    return x, y, pad


def test_mc_fisher_leaves_padded_positions_out() -> None:
    """Padded tokens (``ignore_index``) count for nothing: what the model computes there
    does not change the MC factors (the draws at the other tokens are the same).  Before,
    labels were drawn and counted at padded positions too."""
    x, y, pad = _padded_tokens()
    y = y.masked_fill(pad, -100)
    other = x.clone()
    other[pad] = torch.randn(int(pad.sum()), 4, generator=torch.Generator().manual_seed(9)).to(DT)
    for seed in (0, 1):
        for G, G_other in zip(
            _mc_factors(nn.CrossEntropyLoss(), x, y, seed),
            _mc_factors(nn.CrossEntropyLoss(), other, y, seed),
        ):
            _assert_close(G, G_other)


def test_mc_fisher_keeps_drawn_labels_equal_to_a_real_ignore_class() -> None:
    """A padding id that is also a class (``ignore_index=0``) marks padding in the true
    targets only: a label 0 drawn at a counted token is a label.  The MC factors equal
    those of the same padding marked with -100.  Before, draws of class 0 were dropped."""
    x, y, pad = _padded_tokens()
    for seed in (0, 1):
        for G_zero, G_default in zip(
            _mc_factors(nn.CrossEntropyLoss(ignore_index=0), x, y.masked_fill(pad, 0), seed),
            _mc_factors(nn.CrossEntropyLoss(), x, y.masked_fill(pad, -100), seed),
        ):
            _assert_close(G_zero, G_default)


def test_mc_fisher_of_uniform_class_weights_is_the_unweighted_one() -> None:
    """``weight=c * ones`` leaves the mean loss, hence its Fisher, unchanged; unequal
    weights change the factors (they enter through the true targets)."""
    x, y, pad = _padded_tokens()
    y = y.masked_fill(pad, -100)
    plain = _mc_factors(nn.CrossEntropyLoss(), x, y)
    uniform = _mc_factors(nn.CrossEntropyLoss(weight=torch.full((3,), 2.5, dtype=DT)), x, y)
    unequal = _mc_factors(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 0.2, 3.0], dtype=DT)), x, y)
    for G, G_uniform, G_unequal in zip(plain, uniform, unequal):
        _assert_close(G_uniform, G)
        assert float((G_unequal - G).norm() / G.norm()) > 0.1
