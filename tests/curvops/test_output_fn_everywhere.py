"""``output_fn=`` in :func:`curvops.ggn_diagonal` and :func:`curvops.stats.loss_stats`, with the
semantics, validation and errors of the operators' ``output_fn`` (:mod:`curvops.model_io`).

The model returns two heads ``{"a": logits_a, "b": logits_b}``; selecting ``"b"`` must give
the curvature of :math:`L(\\text{logits\\_b}, y)`, checked against the operators built with the
same ``output_fn`` and against dense float64 references computed here with
``torch.autograd.functional``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import FisherOperator, GGNOperator, ggn_diagonal
from curvops.stats import loss_stats

select_b = operator.itemgetter("b")


class TwoHeads(nn.Module):
    """``{"a": ..., "b": ...}`` from a shared hidden layer (optionally with BatchNorm)."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.body = nn.Sequential(
            nn.Linear(3, 4), nn.BatchNorm1d(4) if batchnorm else nn.Identity(), nn.Tanh()
        )
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.double()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"a": self.a(h), "b": self.b(h)}


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of unequal size (weighted exactly by the operators)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def dense(op: Any) -> np.ndarray:
    return np.asarray(op @ np.eye(op.shape[1]))


def flat_loss(model: nn.Module, data: list[Any], select: Callable[[Any], torch.Tensor]) -> Any:
    """The mean cross-entropy over ``data`` as a function of the flat parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts, start = {}, 0
        for name, shape in zip(names, shapes):
            n = int(np.prod(shape))
            parts[name] = theta[start : start + n].reshape(shape)
            start += n
        out = torch.func.functional_call(model, parts, (x,))
        return F.cross_entropy(select(out), y)

    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return f, theta0


@pytest.mark.parametrize("batchnorm", [False, True], ids=["per-sample", "batch-coupled"])
def test_ggn_diagonal_with_output_fn_is_the_operators_diagonal(batchnorm: bool) -> None:
    model = TwoHeads(batchnorm)
    data = batches()
    loss = nn.CrossEntropyLoss()
    mode = "train" if batchnorm else None
    d = ggn_diagonal(model, loss, data, output_fn=select_b, bn_mode=mode)
    G = dense(GGNOperator(model, loss, data, output_fn=select_b, bn_mode=mode))
    np.testing.assert_allclose(d.numpy(), np.diag(G), rtol=1e-12, atol=1e-14)
    # the selection matters: head "a" gives another diagonal (and the default is refused
    # below, a dict without "logits" giving its first tensor, head "a")
    other = ggn_diagonal(model, loss, data, output_fn=operator.itemgetter("a"), bn_mode=mode)
    assert float((other - d).abs().max()) > 1e-3
    np.testing.assert_allclose(
        ggn_diagonal(model, loss, data, bn_mode=mode).numpy(), other.numpy(), rtol=1e-12
    )


def test_ggn_diagonal_mc_and_empirical_with_output_fn_are_the_fishers_diagonals() -> None:
    model = TwoHeads()
    data = batches()
    loss = nn.CrossEntropyLoss()
    for method, kind in (("mc", "mc"), ("empirical", "empirical")):
        d = ggn_diagonal(model, loss, data, method=method, mc_samples=2, seed=3, output_fn=select_b)
        extra = {"mc_samples": 2, "seed": 3} if kind == "mc" else {}
        F_ = dense(FisherOperator(model, loss, data, kind=kind, output_fn=select_b, **extra))
        np.testing.assert_allclose(d.numpy(), np.diag(F_), rtol=1e-12, atol=1e-14)


def _message(build: Callable[[], Any]) -> tuple[type, str]:
    with pytest.raises((TypeError, ValueError)) as info:
        build()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("bad", [3, "b", lambda out: "not a tensor"], ids=["int", "str", "str-out"])
def test_a_bad_output_fn_gives_the_operators_error(bad: Any) -> None:
    model, data, loss = TwoHeads(), batches(), nn.CrossEntropyLoss()
    expected = _message(lambda: GGNOperator(model, loss, data, output_fn=bad))
    assert expected[0] is TypeError and "output" in expected[1]
    assert _message(lambda: ggn_diagonal(model, loss, data, output_fn=bad)) == expected
    assert _message(lambda: loss_stats(model, loss, data, output_fn=bad, num_probes=0)) == expected


def test_loss_stats_with_output_fn_matches_dense_references() -> None:
    model, data, loss = TwoHeads(), batches(), nn.CrossEntropyLoss()
    f, theta0 = flat_loss(model, data, select_b)
    P = theta0.numel()
    z = np.random.default_rng(5).standard_normal(P)
    zu = z / np.linalg.norm(z)
    H = torch.autograd.functional.hessian(f, theta0).numpy()
    G = dense(GGNOperator(model, loss, data, output_fn=select_b))
    # the per-batch losses and gradients, by hand (batches weighted by their sizes)
    sizes = np.array([len(b[1]) for b in data], dtype=np.float64)
    w = sizes / sizes.sum()
    losses, grads = [], []
    for b in data:
        fb, _ = flat_loss(model, [b], select_b)
        t = theta0.clone().requires_grad_(True)
        value = fb(t)
        (g,) = torch.autograd.grad(value, t)
        losses.append(float(value.detach()))
        grads.append(g.numpy())
    gbar = np.einsum("b,bp->p", w, np.array(grads))
    for curvature, C in (("hessian", H), ("ggn", G)):
        s = loss_stats(
            model, loss, data, curvature=curvature, z=z, num_probes=3, seed=2, output_fn=select_b
        )
        assert s.loss_mean == pytest.approx(float(f(theta0)), rel=1e-13)
        assert s.loss_mean == pytest.approx(float(w @ np.array(losses)), rel=1e-13)
        assert s.grad_mean_norm_sq == pytest.approx(float(gbar @ gbar), rel=1e-11)
        assert s.hess_mu == pytest.approx(float(zu @ C @ zu), rel=1e-10)
        Cz = C @ zu
        assert s.hess_mean_norm_sq == pytest.approx(float(Cz @ Cz), rel=1e-10)
        # the Frobenius estimate's operator takes the same output (Hutchinson, seed 2)
        R = np.random.default_rng(2).choice(np.array([-1.0, 1.0]), size=(P, 3))
        assert s.frobenius_norm_sq == pytest.approx(float(((C @ R) ** 2).sum(0).mean()), rel=1e-10)
    # Hessian of head "b" is not that of head "a" (the default: first tensor of the dict)
    s_a = loss_stats(model, loss, data, z=z, num_probes=0)
    assert abs(s_a.hess_mu - float(zu @ H @ zu)) > 1e-6


def test_loss_stats_ggn_of_a_loss_selected_by_output_fn_is_refused() -> None:
    class LossInside(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3).double()

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.lin(x)
            return {"logits": logits, "loss": F.cross_entropy(logits, labels)}

    def identity(value: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return value

    x, y = batches()[0]
    data = ({"x": x, "labels": y}, y)
    model = LossInside()
    with pytest.raises(ValueError, match=r"'output_fn'.*loss_stats"):
        loss_stats(model, identity, data, curvature="ggn", output_fn=operator.itemgetter("loss"))
    # the Hessian of the same set-up is that of the cross-entropy of the logits
    s = loss_stats(model, identity, data, output_fn=operator.itemgetter("loss"), num_probes=0)
    ref = loss_stats(model, nn.CrossEntropyLoss(), data, num_probes=0)
    assert s.hess_mu == pytest.approx(ref.hess_mu, rel=1e-12)
