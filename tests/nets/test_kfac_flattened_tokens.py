"""The nets K-FAC optimisers on layers applied to tokens flattened into the batch dimension.

``h.reshape(-1, d)`` of an ``(N, T, d)`` activation gives a layer the same function,
gradients and curvature as ``(N, T, d)``; its ``N T`` rows are ``T`` positions of ``N``
samples, not ``N T`` samples.  Counted as samples, the factors came out ``T`` (``A``) and
up to ``T^2`` (``G``) times off, and E-KFAC's per-sample scalings summed squares over
tokens instead of samples (a different preconditioner).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from curvops.losses import sequence_cross_entropy
from nets.optim.kfac import EKFAC, KFAC

DT = torch.float64
LAYOUTS = ("flat-layers", "flat-out")
N, T, D_IN, D_H, C = 6, 7, 3, 4, 5


class _TokenNet(nn.Module):
    """Linear-tanh-linear on every token; ``layout`` says how the layers see the tokens.

    ``"positions"``: ``(N, T, d)`` throughout, logits ``(N, T, C)``.  ``"flat-layers"``:
    the layers see ``(N T, d)``, logits reshaped back to ``(N, T, C)``.  ``"flat-out"``:
    the layers see ``(N T, d)`` and the logits stay ``(N T, C)``.
    """

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout
        gen = torch.Generator().manual_seed(3)
        self.l1, self.l2 = nn.Linear(D_IN, D_H).to(DT), nn.Linear(D_H, C).to(DT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) * 0.8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "positions":
            return self.l2(torch.tanh(self.l1(x)))
        out = self.l2(torch.tanh(self.l1(x.reshape(-1, x.shape[-1]))))
        return out.reshape(x.shape[0], x.shape[1], -1) if self.layout == "flat-layers" else out


def _data(loss: str, layout: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(N, T, D_IN, generator=gen, dtype=DT)
    if loss == "ce":
        y = torch.randint(0, C, (N, T), generator=gen)
        y[0, 4:] = -100  # padding
        if layout == "flat-out":
            return x, y.reshape(-1), nn.CrossEntropyLoss()
        return x, y, sequence_cross_entropy()
    y = torch.randn(N, T, C, generator=gen, dtype=DT)
    if loss == "bce":
        y = (y > 0).to(DT)
    fn = nn.MSELoss() if loss == "mse" else nn.BCEWithLogitsLoss()
    return x, (y.reshape(-1, C) if layout == "flat-out" else y), fn


def _one_step(
    cls: type, layout: str, fisher: str, dedicated: bool, loss: str
) -> list[torch.Tensor]:
    model = _TokenNet(layout)
    x, y, loss_fn = _data(loss, layout)
    opt = cls(model, lr=0.1, fisher=fisher, factor_update_freq=1, inv_update_freq=1)
    for _ in range(2):  # the second step also uses E-KFAC's scalings of the first
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if dedicated:
            opt.step(curvature_batch=(x, y), loss_fn=loss_fn)
        else:
            opt.step()
    out = [t.clone() for layer in (model.l1, model.l2) for t in opt.factors(layer)]
    if cls is EKFAC:
        out += [opt.eigenbasis(layer)[2].clone() for layer in (model.l1, model.l2)]
    return out + [p.detach().clone() for p in model.parameters()]


CASES = [
    ("empirical", False, "ce", "flat-layers"),
    ("empirical", True, "ce", "flat-layers"),
    ("empirical", True, "ce", "flat-out"),
] + [("mc", True, loss, layout) for loss in ("ce", "mse", "bce") for layout in LAYOUTS]


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize(("fisher", "dedicated", "loss", "layout"), CASES)
def test_flattened_tokens_give_the_factors_and_steps_of_the_positions_form(
    cls: type, fisher: str, dedicated: bool, loss: str, layout: str
) -> None:
    """Factors, E-KFAC scalings and updated weights equal those of the ``(N, T, d)`` form.

    The two forms run the same operations on the same numbers in the same order up to
    reshapes, so they agree to a few rounding errors of the factors' sums
    (``100 eps`` relative covers summation orders over ``N T = 42`` rows).
    """
    reference = _one_step(cls, "positions", fisher, dedicated, loss)
    flattened = _one_step(cls, layout, fisher, dedicated, loss)
    for ref, got in zip(reference, flattened, strict=True):
        torch.testing.assert_close(got, ref, rtol=100 * torch.finfo(DT).eps, atol=1e-14)


def test_a_layer_whose_rows_are_not_a_multiple_of_the_samples_is_refused() -> None:
    """A layer applied to a batch-independent input (one learned query row) is no sample."""

    class Query(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(1, 3, dtype=DT))
            self.proj, self.head = nn.Linear(3, 3).to(DT), nn.Linear(3, 2).to(DT)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x * self.proj(self.query))

    model = Query()
    x = torch.randn(4, 3, dtype=DT)
    y = torch.tensor([0, 1, 1, 0])
    opt = KFAC(model, lr=0.1, fisher="empirical", factor_update_freq=1)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="model") as info:
        opt.step()
    assert "(1, 3)" in str(info.value)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert not opt.state  # nothing written
