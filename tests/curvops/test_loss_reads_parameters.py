"""A loss that computes with the model's parameters is refused.

Before: ``lambda f, y: F.cross_entropy(f, y) + lam * sum(p.pow(2).sum() for p in
model.parameters())`` was accepted and its Hessian was exactly that of the cross-entropy
(the regulariser's ``2 lam I`` silently missing): the operators differentiate the
parameters where the forward pass uses them, and the loss reads the module's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator, KFACOperator
from curvops.diagonal import ggn_diagonal
from curvops.stats import loss_stats

DT = torch.float64
LAM = 0.1


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, dtype=DT, generator=gen), torch.randint(0, 3, (8,), generator=gen)


BUILDERS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "hessian": lambda m, f: HessianOperator(m, f, _data()),
    "ggn": lambda m, f: GGNOperator(m, f, _data()),
    "fisher": lambda m, f: FisherOperator(m, f, _data(), kind="empirical"),
    "kfac": lambda m, f: KFACOperator(m, f, _data(), fisher="empirical"),
    "diagonal": lambda m, f: ggn_diagonal(m, f, _data()),
    "stats": lambda m, f: loss_stats(m, f, _data(), num_probes=0),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_regulariser_inside_the_loss_is_refused(kind: str) -> None:
    net = _net()

    def regularised(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y) + LAM * sum(p.pow(2).sum() for p in net.parameters())

    with pytest.raises(ValueError, match=r"Argument 'loss_fn'.*parameter\(s\) '0\.weight'"):
        BUILDERS[kind](net, regularised)


def test_a_tied_head_applied_inside_the_loss_is_refused() -> None:
    """The "linear cross-entropy" pattern: the model returns hidden states and the loss
    applies the (tied) output weight, whose curvature through the loss was missing."""
    torch.manual_seed(0)
    emb = nn.Embedding(5, 4).to(DT)
    model = nn.Sequential(emb, nn.Tanh()).to(DT)
    tokens = torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(2))
    head = lambda h, y: F.cross_entropy(F.linear(h, emb.weight), y)  # noqa: E731
    with pytest.raises(ValueError, match=r"parameter\(s\) '0\.weight'"):
        HessianOperator(model, head, (tokens, tokens))


def test_the_suggested_remedy_is_exact_and_unselected_parameters_may_be_read() -> None:
    net, (x, y) = _net(), _data()
    H = HessianOperator(net, nn.CrossEntropyLoss(), (x, y)).shift(2 * LAM).to_dense()
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def objective(w: torch.Tensor) -> torch.Tensor:  # the regularised loss, by hand
        parts = torch.split(w, [s.numel() for s in shapes])
        values = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        out = torch.func.functional_call(net, values, (x,))
        return F.cross_entropy(out, y) + LAM * w.pow(2).sum()

    ref = torch.autograd.functional.hessian(objective, w0)
    assert float((H - ref).abs().max()) <= 1e-12 * float(ref.abs().max())
    # reading a parameter outside the selection is reading a constant, which it is
    reads_last = lambda out, t: F.cross_entropy(out, t) + LAM * net[2].weight.sum()  # noqa: E731
    HessianOperator(net, reads_last, (x, y), params=["0.weight", "0.bias"])


@pytest.mark.parametrize(
    "read",
    [
        lambda W: sum((c**2).sum() for c in W.chunk(2)),
        lambda W: sum((r**2).sum() for r in W.unbind(0)),
        lambda W: (torch.linalg.svd(W, full_matrices=False).S ** 2).sum(),
        lambda W: torch.max(W, dim=1).values.sum(),
    ],
    ids=["chunk", "unbind", "svd", "max-dim"],
)
def test_reads_through_calls_returning_tuples_are_refused(read: Any) -> None:
    """Before: a call returning a tuple (chunk, unbind, svd, max(dim=...)) escaped the
    check, and the Hessian missed the regulariser (48 % off)."""
    net = _net()
    W = net[0].weight
    with pytest.raises(ValueError, match=r"parameter\(s\) '0\.weight'"):
        HessianOperator(net, lambda o, t: F.cross_entropy(o, t) + LAM * read(W), _data())


def test_reads_through_views_taken_before_are_refused() -> None:
    net = _net()
    Wt, flat = net[0].weight.t(), net[0].weight.view(-1)
    for view in (Wt, flat):
        with pytest.raises(ValueError, match=r"parameter\(s\) '0\.weight'"):
            HessianOperator(
                net, lambda o, t, v=view: F.cross_entropy(o, t) + LAM * v.pow(2).sum(), _data()
            )


def test_a_parameter_used_for_its_dtype_or_device_only_is_accepted() -> None:
    """Before: ``type_as(p)``, ``to(p)``, ``p.new_tensor`` and ``zeros_like(p)`` were refused
    as regularisers; they use the parameter's dtype and device, not its values."""
    net, data = _net(), _data()
    W = net[0].weight
    ce = nn.CrossEntropyLoss()
    ref = HessianOperator(net, ce, data).to_dense()
    for loss in (
        lambda o, t: ce(o.type_as(W), t),
        lambda o, t: ce(o.to(W), t),
        lambda o, t: ce(o, t) * W.new_tensor(1.0),
        lambda o, t: ce(o, t) + torch.zeros_like(W).sum(),
    ):
        H = HessianOperator(net, loss, data).to_dense()
        assert torch.equal(H, ref)
