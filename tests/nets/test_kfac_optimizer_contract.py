"""Contract of the K-FAC / E-KFAC / SWATS optimisers: every parameter group is stepped,
non-finite gradients are refused before anything is written, and ``fisher='mc'``
supports :func:`curvops.losses.sequence_cross_entropy` exactly like
``nn.CrossEntropyLoss`` on ``[B, V, T]`` logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops.losses import sequence_cross_entropy
from nets.optim import EKFAC, KFAC, SWATS
from spectral.errors import NumericalError

DT = torch.float64


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).to(DT)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, generator=gen, dtype=DT), torch.tensor([0, 1, 1, 0, 1, 0])


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list, dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _same_state(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_state(u, v) for u, v in zip(a, b))  # type: ignore[arg-type]
    return a == b


# -- 1. every parameter group is stepped with its own hyperparameters ------------------------
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_added_param_group_gets_its_own_momentum_sgd(cls: type[KFAC]) -> None:
    x, y = _batch()
    model, reference = _mlp(), _mlp()
    opt = cls(model, lr=0.1, fisher="empirical", kl_clip=None, momentum=0.5)
    ref_opt = cls(reference, lr=0.1, fisher="empirical", kl_clip=None, momentum=0.5)
    extra = nn.Parameter(torch.tensor([1.0, -2.0], dtype=DT))
    opt.add_param_group({"params": [extra], "lr": 0.25, "momentum": 0.9, "weight_decay": 0.1})
    expected, buf = extra.detach().clone(), None
    for _ in range(3):
        for net, o, add in ((model, opt, True), (reference, ref_opt, False)):
            o.zero_grad()
            loss = F.cross_entropy(net(x), y)
            if add:
                loss = loss + (extra**2).sum()
            loss.backward()
            o.step()
        d = 2 * expected + 0.1 * expected  # gradient plus weight decay
        buf = d if buf is None else 0.9 * buf + d
        expected = expected - 0.25 * buf
    torch.testing.assert_close(extra.detach(), expected, rtol=0, atol=1e-15)
    for p, q in zip(model.parameters(), reference.parameters()):  # group 0 as before
        assert torch.equal(p, q)


def test_added_param_group_bad_hyperparameter_is_refused() -> None:
    opt = KFAC(_mlp(), lr=0.1, fisher="empirical")
    with pytest.raises(ValueError, match="param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": -1.0})


# -- 2. non-finite gradients: an error, and nothing written -----------------------------------
@pytest.mark.parametrize(
    ("cls", "kl_clip", "layer"),
    [(KFAC, None, 0), (KFAC, 1e-3, 1), (EKFAC, None, 0), (EKFAC, 1e-3, 1), (KFAC, 1e-3, 2)],
)
def test_kfac_nan_gradient_raises_before_any_write(
    cls: type[KFAC], kl_clip: float | None, layer: int
) -> None:
    x, y = _batch()
    model = _mlp()
    opt = cls(model, lr=0.1, fisher="empirical", kl_clip=kl_clip, factor_update_freq=10)
    for _ in range(2):  # the second step refreshes nothing
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if _ == 1:
            model[layer].weight.grad[0, ...] = float("nan")
            params, state = _snapshot(model, opt)
            with pytest.raises(NumericalError, match="non-finite gradient"):
                opt.step()
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
            assert _same_state(opt.state_dict(), state)
        else:
            opt.step()


@pytest.mark.parametrize("switch_tol", [0.0, 1e-6])  # Adam phase throughout / SGD phase
def test_swats_nan_gradient_raises_before_any_write(switch_tol: float) -> None:
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=DT))
    opt = SWATS([w], lr=0.1, switch_tol=switch_tol)
    scale = torch.tensor([1.0, 3.0], dtype=DT)
    for _ in range(3):
        opt.zero_grad()
        (w * scale).sum().backward()
        opt.step()
    assert opt.phase == ("adam" if switch_tol == 0.0 else "sgd")
    opt.zero_grad()
    (w * scale).sum().backward()
    w.grad[0] = float("nan")
    before, state = w.detach().clone(), copy.deepcopy(opt.state_dict())
    with pytest.raises(NumericalError, match="non-finite gradient"):
        opt.step()
    assert torch.equal(w.detach(), before)
    assert _same_state(opt.state_dict(), state)


# -- 3. fisher='mc' with sequence_cross_entropy == CrossEntropyLoss on [B, V, T] --------------
class _TokenNet(nn.Module):
    def __init__(self, classes_last: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.emb, self.mid, self.head = nn.Embedding(6, 4), nn.Linear(4, 5), nn.Linear(5, 6)
        self.classes_last = classes_last

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.mid(self.emb(tokens))))  # [B, T, V]
        return logits if self.classes_last else logits.transpose(1, 2)


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_mc_sequence_cross_entropy_matches_cross_entropy_over_positions(
    cls: type[KFAC],
) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 6, (3, 5), generator=gen)
    y = torch.randint(0, 6, (3, 5), generator=gen)
    y[1, 3:] = -100  # padding
    y[2, 0] = -100
    runs = []
    for classes_last, loss_fn in ((True, sequence_cross_entropy()), (False, nn.CrossEntropyLoss())):
        model = _TokenNet(classes_last).to(DT)
        opt = cls(model, lr=0.1, seed=7, factor_update_freq=1, inv_update_freq=1)
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step(curvature_batch=(x, y), loss_fn=loss_fn)
        factors = [t for layer in (model.mid, model.head) for t in opt.factors(layer)]
        runs.append((factors, [p.detach().clone() for p in model.parameters()]))
    (fa, pa), (fb, pb) = runs
    # The two layouts sum the 15 positions in different orders (and BLAS kernels may take
    # other paths by memory alignment, i.e. by what ran before): rounding of O(n eps) in
    # the factors, amplified by the damped inverses (E-KFAC: by its eigenbasis) over two
    # steps.  So a bound relative to each tensor's largest entry, not elementwise (an
    # element near 0 differed by 5.7e-13 relative in a run in random order); measured: up
    # to 26 eps (E-KFAC's parameters), 1e4 eps leaves a wide margin.
    eps = torch.finfo(DT).eps
    for u, v in zip(fa + pa, fb + pb):
        assert u.shape == v.shape
        assert float((u - v).abs().max()) <= 1e4 * eps * float(v.abs().max())
    assert float(fa[3].trace()) > 0  # the head's MC G is not empty


def test_mc_sequence_cross_entropy_refuses_mismatched_targets() -> None:
    model = _TokenNet(True).to(DT)
    opt = KFAC(model, lr=0.1)
    x = torch.randint(0, 6, (3, 5))
    with pytest.raises(ValueError, match="curvature_batch"):
        opt.step(curvature_batch=(x, torch.zeros(3, 4, dtype=torch.long)),
                 loss_fn=sequence_cross_entropy())  # fmt: skip
