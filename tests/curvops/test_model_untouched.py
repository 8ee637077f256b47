"""Contract 3 ("nothing changes"): models whose forward writes state, or whose
parameters are reachable under several names, come out of products, Lanczos and
errors with every object, type and buffer as before, and products are repeatable.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
    ggn_diagonal,
    loss_stats,
)
from curvops._model_state import functional_forward, model_state, state_differences
from curvops.testing import check_model_contract
from spectral import lanczos


class Aliased(nn.Module):
    """``self.alias = self.enc``: one sub-module under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.alias = self.enc
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.alias(torch.tanh(self.enc(x))))


class Tied(nn.Module):
    """An embedding-like input weight tied to the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 3, bias=False)
        self.mid = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2, bias=False)
        self.inp2 = nn.Linear(3, 2, bias=False)
        self.inp2.weight = self.head.weight  # tied: one Parameter, two modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.mid(self.inp(x)))
        return self.head(z) + self.inp2(z).sin()


class Counter(nn.Module):
    """A forward that increments a buffer in place and reassigns another one."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.lin(x)
        self.ema = 0.9 * self.ema + 0.1 * out.detach().mean(0)
        return out * (1 + self.ema.sum().detach() * 0)


def _spectral_old() -> nn.Module:
    return nn.Sequential(
        torch.nn.utils.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)
    ).train()


def _spectral_new() -> nn.Module:
    return nn.Sequential(
        torch.nn.utils.parametrizations.spectral_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2)
    ).train()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "aliased": Aliased,
    "tied": Tied,
    "counter": Counter,
    "spectral_norm": _spectral_old,
    "parametrizations.spectral_norm": _spectral_new,
}
OPERATORS = {
    "hessian": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d),
    "hessian-uncached": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d, cache=False),
    "ggn": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d),
    "ggn-uncached": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d, cache=False),
    "fisher": lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), d, kind="mc"),
}


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]().double()
    with torch.no_grad():  # one user forward: spectral norms compute their weight
        model(torch.randn(2, 3, dtype=torch.float64))
    return model


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return [(x[:4], torch.tensor([0, 1, 1, 0])), (x[4:], torch.tensor([1, 0]))]


def _objects(model: nn.Module) -> dict[str, tuple[int, type]]:
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    return {n: (id(t), type(t)) for n, t in named}


@pytest.mark.parametrize("op_name", sorted(OPERATORS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_products_and_lanczos_change_nothing(model_name: str, op_name: str) -> None:
    model = _model(model_name)
    objects = _objects(model)
    before = model_state(model)
    params_before = [(n, type(p)) for n, p in model.named_parameters(remove_duplicate=False)]
    op = OPERATORS[op_name](model, _data())
    v = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    first = op @ v
    second = op @ v
    assert torch.equal(first, second)
    lanczos(op, 4, seed=0)
    assert state_differences(before, model) == []
    assert _objects(model) == objects
    assert [
        (n, type(p)) for n, p in model.named_parameters(remove_duplicate=False)
    ] == params_before
    assert all(t is nn.Parameter for _, t in params_before)
    assert torch.equal(op @ v, first)
    check_model_contract(op)


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_error_mid_product_changes_nothing(model_name: str) -> None:
    model = _model(model_name)
    objects = _objects(model)
    before = model_state(model)
    calls = {"n": 0}

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(out, y)

    op = HessianOperator(model, loss, _data(), cache=False)
    calls["n"] = 1  # the construction's calls of the loss (its checks) count as one
    with pytest.raises(RuntimeError, match="boom"):
        op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert state_differences(before, model) == []
    assert _objects(model) == objects


def test_state_differences_sees_identity_and_type() -> None:
    model = Aliased()
    before = model_state(model)
    model.enc._parameters["weight"] = model.enc.weight.detach()  # same values, a plain Tensor
    diffs = state_differences(before, model)
    assert "param_objects: enc.weight" in diffs and "param_objects: alias.weight" in diffs
    model = Aliased()
    before = model_state(model)
    model.out.bias = nn.Parameter(model.out.bias.detach().clone())  # same values, new object
    assert state_differences(before, model) == ["param_objects: out.bias"]


def test_counter_buffer_written_by_forward_is_never_written() -> None:
    model = _model("counter")
    calls = model.calls.clone()
    version = model.calls._version
    op = HessianOperator(model, nn.CrossEntropyLoss(), _data(), cache=False)
    op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert torch.equal(model.calls, calls) and model.calls._version == version


def test_functional_forward_unknown_name_refused() -> None:
    with pytest.raises(ValueError, match="names"):
        functional_forward(nn.Linear(1, 1), ["nope"], [torch.zeros(1)], torch.zeros(1, 1))


@pytest.mark.parametrize("model_name", ["spectral_norm", "parametrizations.spectral_norm"])
def test_spectral_norm_product_paths_agree(model_name: str) -> None:
    """The dual-number GGN path (power iteration on primals) equals the recorded one."""
    model = _model(model_name)
    data = _data()
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64)
    cached = GGNOperator(model, nn.CrossEntropyLoss(), data, cache=True) @ v
    dual = GGNOperator(model, nn.CrossEntropyLoss(), data, cache=False) @ v
    torch.testing.assert_close(dual, cached, rtol=1e-12, atol=1e-13)


class ClipsItsWeights(nn.Module):
    """A forward that constrains its own weight in place (WGAN-style clipping, max-norm).

    ``how``: ``"no_grad"`` (``clamp_`` under ``torch.no_grad``: bumps the version
    counter), ``"data"`` (through ``.data``: no version bump), or ``"when_large"``
    (clamps only once a weight exceeds the bound).
    """

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.inner = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)
        with torch.no_grad():
            self.inner.weight.mul_(0.1)  # within the bound: clamping changes no value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.inner.weight
        if self.how == "data":
            w.data.clamp_(-0.05, 0.05)
        elif self.how == "no_grad" or bool(w.abs().max() > 1.0):
            with torch.no_grad():
                w.clamp_(-0.05, 0.05)
        return self.out(torch.tanh(self.inner(x)))


BUILDERS: dict[str, Callable[[nn.Module], object]] = {
    "hessian": lambda m: HessianOperator(m, nn.CrossEntropyLoss(), _data()),
    "ggn": lambda m: GGNOperator(m, nn.CrossEntropyLoss(), _data()),
    "fisher-mc": lambda m: FisherOperator(m, nn.CrossEntropyLoss(), _data(), kind="mc"),
    "kfac": lambda m: KFACOperator(m, nn.CrossEntropyLoss(), _data()),
    "ggn_diagonal": lambda m: ggn_diagonal(m, nn.CrossEntropyLoss(), _data()),
    "loss_stats": lambda m: loss_stats(m, nn.CrossEntropyLoss(), _data(), num_probes=1),
}


@pytest.mark.parametrize("how", ["no_grad", "data"])
@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_forward_writing_its_parameters_is_refused_and_changes_nothing(
    how: str, builder: str
) -> None:
    """Before, building an operator clipped the user's weights (by up to 0.47 here)."""
    model = ClipsItsWeights(how).double()
    with torch.no_grad():
        model.inner.weight[0, 0] = 0.7  # outside the bound: the forward would change it
    before = model_state(model)
    version = model.inner.weight._version
    with pytest.raises(ValueError, match=r"'model'.*in place to parameter\(s\) \['inner.weight'\]"):
        BUILDERS[builder](model)
    assert state_differences(before, model) == []
    assert model.inner.weight._version == version


def test_forward_writing_its_parameters_later_is_an_error_naming_the_change() -> None:
    """A write the construction could not see (the weights were within the bound then)."""
    model = ClipsItsWeights("when_large").double()
    H = HessianOperator(model, nn.CrossEntropyLoss(), _data())
    with torch.no_grad():
        model.inner.weight[0, 0] = 2.0
    with pytest.raises(ValueError, match="already changed your weights"):
        H @ torch.ones(H.shape[0], dtype=torch.float64)


GENERATORS = {
    "torch": lambda: torch.Generator().manual_seed(0),
    "numpy": lambda: np.random.default_rng(0),
    "numpy-legacy": lambda: np.random.RandomState(0),
    "python": lambda: random.Random(0),
}


def _noise(gen: Any, shape: tuple[int, ...]) -> torch.Tensor:
    if isinstance(gen, torch.Generator):
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    if isinstance(gen, random.Random):
        return torch.tensor([gen.gauss(0, 1) for _ in range(int(np.prod(shape)))]).view(shape)
    return torch.as_tensor(gen.standard_normal(shape))


def _state(gen: Any) -> Any:
    if isinstance(gen, torch.Generator):
        return gen.get_state().tolist()
    if isinstance(gen, np.random.Generator):
        return repr(gen.bit_generator.state)
    if isinstance(gen, np.random.RandomState):
        return repr(gen.get_state())
    return gen.getstate()


class OwnGenerator(nn.Module):
    """Input noise from a generator the model keeps (seeded for reproducibility)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 2)
        self.gen = GENERATORS[kind]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + 0.3 * _noise(self.gen, tuple(x.shape)).to(x.dtype))


@pytest.mark.parametrize("kind", sorted(GENERATORS))
def test_model_own_generator_gives_fixed_products_and_is_left_as_it_was(kind: str) -> None:
    """Before, the same operator's products differed by 10 % from one call to the next
    and the model's generator advanced."""
    model = OwnGenerator(kind).double()
    state = _state(model.gen)
    V = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for cls in (HessianOperator, GGNOperator, FisherOperator):
        op = cls(model, nn.CrossEntropyLoss(), _data())
        first = op @ V
        assert torch.equal(op @ V, first), cls.__name__
        assert torch.equal(cls(model, nn.CrossEntropyLoss(), _data()) @ V, first)
    assert _state(model.gen) == state


class CountsItsCalls(nn.Module):
    """A forward that updates a plain number it also uses (a warm-up schedule)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x) * (1 + 0.1 * min(self.calls, 10))


def test_numbers_a_forward_updates_are_put_back() -> None:
    """Before, the counter advanced with every forward of every product (the model
    changed) and the same operator's products differed by 12 % between calls."""
    model = CountsItsCalls().double()
    V = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for cls in (HessianOperator, GGNOperator):
        op = cls(model, nn.CrossEntropyLoss(), _data())
        first = op @ V
        assert torch.equal(op @ V, first), cls.__name__
        assert model.calls == 0
