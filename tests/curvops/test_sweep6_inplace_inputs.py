"""A forward that writes to its input tensors in place is refused, data untouched.

``x /= 255`` or ``x.sub_(mean)`` inside ``forward`` changed the caller's batch when an
operator was built and again at every product: two ``H @ v`` with the same ``v``
differed by 34 %, and the user's ``x`` was divided by 8 after construction and two
products.  The construction checks now run the forward on clones of the inputs and
refuse such a model (``ValueError`` naming ``model``, the message pointing at the
data), leaving the caller's tensors bitwise as they were; every later forward pass
reads the inputs' version counters and refuses a write it sees (after the fact).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvops import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    diagonal_approximation,
    ggn_diagonal,
)
from curvops.testing import dense_hessian

F64 = torch.float64
MESSAGE = "writes to its input tensor in place"


def _write(x: torch.Tensor, how: str) -> torch.Tensor:
    """Write to ``x`` in place as a preprocessing forward would."""
    if how == "div":
        x /= 2.0
    elif how == "sub_":
        x.sub_(0.25)
    elif how == "view":
        x[:, 0] = 0.0
    elif how == "relu":
        F.relu(x, inplace=True)
    elif how == "data":
        x.data.mul_(3.0)  # no version bump: found on the copies only
    return x


class _Net(nn.Module):
    """Linear-Tanh-Linear (3 -> 4 -> 3); ``how`` selects the in-place preprocessing
    (None: none), applied to the input named ``x`` of a tensor, tuple or keyword form."""

    def __init__(self, how: str | None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.how = how

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if self.how is not None:
            x = _write(x, self.how)
        h = torch.tanh(self.a(x))
        return self.b(h if z is None else h * z)


def _x(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=F64)


def _y(n: int = 6) -> torch.Tensor:
    return torch.arange(n) % 3


def _layouts() -> dict[str, Callable[[], tuple[Any, list[torch.Tensor]]]]:
    """Data layouts: (data, the caller's tensors that must stay unchanged)."""

    def tensor() -> tuple[Any, list[torch.Tensor]]:
        x = _x()
        return (x, _y()), [x]

    def pair() -> tuple[Any, list[torch.Tensor]]:
        x, z = _x(), torch.ones(6, 4, dtype=F64)
        return ((x, z), _y()), [x, z]

    def mapping() -> tuple[Any, list[torch.Tensor]]:
        x = _x()
        return ({"x": x}, _y()), [x]

    def batches() -> tuple[Any, list[torch.Tensor]]:
        x = _x()
        return [(x[:3], _y()[:3]), (x[3:], _y()[3:])], [x]

    def loader() -> tuple[Any, list[torch.Tensor]]:
        x = _x()
        return DataLoader(TensorDataset(x, _y()), batch_size=3), [x]

    return {
        "tensor": tensor,
        "tuple": pair,
        "dict": mapping,
        "batches": batches,
        "loader": loader,
    }


_LAYOUTS = _layouts()

_BUILDERS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "hessian": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d),
    "ggn": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d),
    "fisher-mc": lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), d, kind="mc"),
    "fisher-empirical": lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), d, kind="empirical"),
    "ggn_diagonal": lambda m, d: ggn_diagonal(m, nn.CrossEntropyLoss(), d),
    "diagonal_approximation": lambda m, d: diagonal_approximation(m, nn.CrossEntropyLoss(), d),
    "hutchinson": lambda m, d: diagonal_approximation(
        m, nn.CrossEntropyLoss(), d, method="hutchinson", num_matvecs=2
    ),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("builder", sorted(_BUILDERS))
def test_refused_at_construction_with_the_data_untouched(layout: str, builder: str) -> None:
    data, tensors = _LAYOUTS[layout]()
    saved = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match=MESSAGE) as info:
        _BUILDERS[builder](_Net("div").double(), data)
    assert "'model'" in str(info.value) and "data" in str(info.value)
    assert "your data is unchanged" in str(info.value)
    assert all(torch.equal(t, s) and t._version == 0 for t, s in zip(tensors, saved))


@pytest.mark.parametrize("how", ["div", "sub_", "view", "relu", "data"])
def test_every_kind_of_write_is_refused(how: str) -> None:
    x = _x()
    saved = x.clone()
    with pytest.raises(ValueError, match=MESSAGE):
        HessianOperator(_Net(how).double(), nn.CrossEntropyLoss(), (x, _y()))
    assert torch.equal(x, saved)


def test_a_write_that_starts_after_construction_is_refused_at_the_product() -> None:
    """Found by the version counter (the caller's tensor has changed by then: the
    message says so), never a silent product."""
    model = _Net(None).double()
    x = _x()
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, _y()))
    model.how = "div"
    with pytest.raises(ValueError, match="already changed your data"):
        H @ torch.ones(H.shape[0], dtype=F64)


def test_the_message_names_the_input() -> None:
    x, z = _x(), torch.ones(6, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"inputs\[0\]"):
        GGNOperator(_Net("sub_").double(), nn.CrossEntropyLoss(), ((x, z), _y()))
    with pytest.raises(ValueError, match=r"inputs\['x'\]"):
        GGNOperator(_Net("sub_").double(), nn.CrossEntropyLoss(), ({"x": x}, _y()))


class _CopiesFirst(_Net):
    """Preprocesses a copy of its input in place: allowed."""

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x.clone().sub_(0.5), z)


def test_in_place_on_a_copy_is_fine_and_exact() -> None:
    model, x, y = _CopiesFirst(None).double(), _x(), _y()
    saved = x.clone()
    H = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2), dtype=F64)
    first, second = H @ v, H @ v
    assert torch.equal(first, second)
    want = dense_hessian(model, nn.CrossEntropyLoss(), (x, y)) @ v
    assert float((first - want).norm() / want.norm()) <= 1e-12
    assert torch.equal(x, saved) and x._version == 0
