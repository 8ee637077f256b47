"""Contract 2 beyond tensors: a module attribute, a tensor kept as a plain attribute, a
hook or a module type changed after construction reaches the next product of every
caching operator (bitwise equal to a freshly built operator's, and to the dense
reference), while products of an unchanged model keep reusing their graphs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

from curvops import EKFACOperator, FisherOperator, GGNOperator, HessianOperator, KFACOperator
from curvops.testing import dense_ggn, dense_hessian

F64 = torch.float64


class Tempered(nn.Module):
    """A network with configuration outside its parameters and buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh())
        self.head = nn.Linear(5, 3)
        self.temperature = 1.0
        self.scale = torch.ones(3, dtype=F64)  # a plain tensor attribute, not a buffer
        self.last_logits: torch.Tensor | None = None  # written by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.body(x)) * self.scale / self.temperature
        self.last_logits = out  # an activation kept by forward: not configuration
        return out


def _model() -> Tempered:
    torch.manual_seed(0)
    return Tempered().double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=g, dtype=F64), torch.tensor([0, 1, 2, 2, 1, 0, 1, 2])


def _temperature(m: Tempered) -> None:
    m.temperature = 2.5


def _eps(m: Tempered) -> None:
    m.body[1].eps = 0.5


def _tensor_attribute(m: Tempered) -> None:
    m.scale.data[0] = 3.0  # no version bump


def _forward_hook(m: Tempered) -> None:
    m.head.register_forward_hook(lambda mod, args, out: out * 1.7)


def _pre_hook(m: Tempered) -> None:
    m.head.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5,))


def _swapped_activation(m: Tempered) -> None:
    m.body[2] = nn.Sigmoid()  # a parameter-free module replaced


EDITS: dict[str, Callable[[Tempered], None]] = {
    "attribute": _temperature,
    "LayerNorm eps": _eps,
    "tensor attribute through .data": _tensor_attribute,
    "forward hook": _forward_hook,
    "forward pre-hook": _pre_hook,
    "parameter-free module replaced": _swapped_activation,
}

KINDS: dict[str, Callable[[nn.Module, Any], Any]] = {
    "hessian": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d, cache=True),
    "ggn": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d, cache=True),
    "fisher-mc": lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), d, seed=0, cache=True),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("edit", list(EDITS))
def test_a_changed_configuration_reaches_the_next_product(edit: str, kind: str) -> None:
    model, data = _model(), _batch()
    op = KINDS[kind](model, data)
    v = torch.randn(op.shape[0], dtype=F64, generator=torch.Generator().manual_seed(2))
    before = op @ v
    EDITS[edit](model)
    after = op @ v
    assert not torch.allclose(after, before)  # the edit matters
    assert torch.equal(after, KINDS[kind](model, data) @ v)
    if kind != "fisher-mc":
        dense = {"hessian": dense_hessian, "ggn": dense_ggn}[kind]
        want = dense(model, nn.CrossEntropyLoss(), data) @ v
        assert torch.allclose(after, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("edit", ["attribute", "tensor attribute through .data", "forward hook"])
def test_kfac_factors_follow_a_changed_configuration(cls: type, edit: str) -> None:
    model, data = _model(), _batch()
    op = cls(model, nn.CrossEntropyLoss(), data, remainder="diagonal")  # the LayerNorm
    v = torch.randn(op.shape[0], dtype=F64, generator=torch.Generator().manual_seed(2))
    before = op @ v
    EDITS[edit](model)
    after = op @ v
    assert not torch.allclose(after, before)
    assert torch.equal(after, cls(model, nn.CrossEntropyLoss(), data, remainder="diagonal") @ v)


@pytest.fixture
def global_hook() -> Iterator[Callable[[], Any]]:
    handles: list[Any] = []

    def register() -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            return out * 2.0 if isinstance(module, nn.Tanh) else out

        handles.append(nn.modules.module.register_module_forward_hook(hook))

    yield register
    for handle in handles:
        handle.remove()


def test_a_global_module_hook_reaches_the_next_product(global_hook: Callable[[], Any]) -> None:
    model, data = _model(), _batch()
    op = HessianOperator(model, nn.CrossEntropyLoss(), data)
    v = torch.randn(op.shape[0], dtype=F64, generator=torch.Generator().manual_seed(2))
    before = op @ v
    global_hook()
    after = op @ v
    assert not torch.allclose(after, before)
    assert torch.allclose(
        after, dense_hessian(model, nn.CrossEntropyLoss(), data) @ v, rtol=1e-10, atol=1e-12
    )


def test_an_unchanged_model_keeps_its_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The activation that forward keeps as an attribute is not configuration: the
    graph recorded at the first product serves every later one."""
    import curvops.hessian

    builds: list[int] = []
    original = curvops.hessian.hessian_linearization

    def counting(*args: Any, **kwargs: Any) -> Any:
        builds.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(curvops.hessian, "hessian_linearization", counting)
    model, data = _model(), _batch()
    op = HessianOperator(model, nn.CrossEntropyLoss(), data)
    v = torch.ones(op.shape[0], dtype=F64)
    for _ in range(4):
        op @ v
    assert len(builds) == 1
    _temperature(model)
    op @ v
    op @ v
    assert len(builds) == 2
