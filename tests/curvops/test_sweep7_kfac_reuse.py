"""K-FAC and E-KFAC refuse a layer parameter reused functionally outside its layer.

K-FAC's factors see only the calls of the layer owning a parameter; another use in the
forward (a tied decoder ``F.linear(h, enc.weight.t())``, a convolution weight reused with
``F.conv2d``) adds curvature they miss (43-67 % off the exact GGN block at N = 1, where
K-FAC is otherwise exact).  Such models are refused with a ``ValueError`` naming
``model`` and the parameter; models without reuse, and the same model with the reused
parameter left out of ``params=``, are not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvops import EKFACOperator, KFACOperator
from curvops.testing import dense_ggn

DT = torch.float64
EPS = torch.finfo(DT).eps


class TiedAE(nn.Module):
    """A tied autoencoder: the decoder is ``enc.weight`` transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.dec_b = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.dec_b)


class ConvReuse(nn.Module):
    """A convolution whose weight is applied a second time with ``F.conv2d``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        return self.head(torch.tanh(F.conv2d(h, self.conv.weight, padding=1)).flatten(1))


class BiasReuse(nn.Module):
    """A Linear whose bias is also added after the activation."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(x)) + self.lin.bias)


class Harmless(nn.Module):
    """Reads a weight's shape, uses it detached and calls its layer twice: no reuse."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / self.lin.weight.shape[0]
        with torch.no_grad():
            norm = self.lin.weight.norm()
        h = self.lin(torch.tanh(self.lin(x))) * scale + 0.0 * norm
        return self.head(torch.tanh(h + self.lin.weight.detach().sum()))


def _data(shape: tuple[int, ...], out: int, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randn(n, out, generator=g, dtype=DT)


CASES = [
    (TiedAE, (4,), 4, ["enc.weight", "enc.bias"], "enc.weight", "'t'"),
    (ConvReuse, (2, 3, 3), 3, None, "conv.weight", "'conv2d'"),
    (BiasReuse, (3,), 2, None, "lin.bias", "'add'"),
]


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize(("model", "shape", "out", "params", "name", "func"), CASES)
def test_functional_reuse_is_refused_naming_model_and_parameter(
    cls: type[KFACOperator],
    model: type[nn.Module],
    shape: tuple[int, ...],
    out: int,
    params: list[str] | None,
    name: str,
    func: str,
) -> None:
    torch.manual_seed(0)
    net = model().double()
    data = _data(shape, out, n=2)
    op = cls(net, nn.MSELoss(), data, params=params)
    with pytest.raises(ValueError, match="'model'") as info:
        op.trace()
    message = str(info.value)
    assert f"parameter {name!r} used by {func}" in message
    assert "outside its layer's forward" in message and "params=" in message


def test_reused_parameter_left_out_of_params_is_accepted_and_exact() -> None:
    """Without enc.weight the enc.bias block is exact at N = 1 (K-FAC and E-KFAC)."""
    torch.manual_seed(1)
    net = TiedAE().double()
    data = _data((4,), 4)
    G = dense_ggn(net, nn.MSELoss(), data, params=["enc.bias"])
    for cls in (KFACOperator, EKFACOperator):
        dense = cls(net, nn.MSELoss(), data, params=["enc.bias"]).to_dense()
        assert torch.allclose(dense, G, rtol=1e-12, atol=64 * EPS * float(G.abs().max()))


def test_models_without_reuse_are_not_refused_and_stay_exact() -> None:
    torch.manual_seed(2)
    net = Harmless().double()
    data = _data((3,), 2)
    K = KFACOperator(net, nn.MSELoss(), data)
    E = EKFACOperator(net, nn.MSELoss(), data)
    assert K.trace() > 0 and E.trace() > 0
    # the head alone (called once, nothing coupled): K-FAC = E-KFAC = GGN at N = 1
    params = ["head.weight", "head.bias"]
    G = dense_ggn(net, nn.MSELoss(), data, params=params)
    dense = KFACOperator(net, nn.MSELoss(), data, params=params, bias="joint").to_dense()
    assert torch.allclose(dense, G, rtol=1e-12, atol=64 * EPS * float(G.abs().max()))


def test_parameter_registered_twice_is_still_handled_by_params_check() -> None:
    """Sharing by registration keeps its own error (naming ``params``)."""
    net = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    net[2].weight = net[0].weight
    data = _data((3,), 3)
    with pytest.raises(ValueError, match="'params'"):
        KFACOperator(net, nn.MSELoss(), data).trace()
