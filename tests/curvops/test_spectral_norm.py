"""Spectral normalisation in training mode: products are the train-mode network's.

``nn.utils.parametrizations.spectral_norm`` and ``nn.utils.spectral_norm`` compute
``W / (u^T W v)`` with ``u, v`` from power steps run under ``torch.no_grad`` in
training mode, so PyTorch's derivatives hold the vectors constant.  Before products ran
the steps with gradients, the Hessian was 12-26 % away from the second differences of
the train-mode loss on a fresh model and 50-70 % on one whose iteration had converged;
the GGN 2e-4 to 1e-3 on the fresh one.  The oracle here is independent of autograd:
central second differences of loss values, with the buffers reset before each
evaluation so every evaluation computes the same function.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as parametrized_spectral_norm

from curvops import GGNOperator, HessianOperator
from curvops._model_state import (
    curvature_mode,
    functional_forward,
    model_state,
    state_differences,
)

from .conftest import relative_error

EPS = float(np.finfo(np.float64).eps)

VARIANTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "parametrizations": lambda m: parametrized_spectral_norm(m, n_power_iterations=2),
    "hook": lambda m: torch.nn.utils.spectral_norm(m, n_power_iterations=2),
}


def _model(variant: str, warm_up: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(VARIANTS[variant](nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():  # training-mode forward passes advance the power iteration
        for _ in range(warm_up):
            model(torch.randn(2, 4, dtype=torch.float64))
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.arange(16) % 3


LOSS = nn.CrossEntropyLoss()


def _second_differences(model: nn.Module, v: np.ndarray, h: float) -> tuple[float, float]:
    """``v^T H v`` (loss values) and ``v^T G v`` (outputs) by central differences."""
    x, y = _data()
    params = list(model.parameters())
    w0 = torch.nn.utils.parameters_to_vector(params).detach().clone()
    state = copy.deepcopy(model.state_dict())
    direction = torch.from_numpy(v)

    def outputs(step: float) -> torch.Tensor:
        model.load_state_dict(state)  # the stored vectors of every evaluation
        torch.nn.utils.vector_to_parameters(w0 + step * direction, params)
        with torch.no_grad():
            return model(x)

    plus, zero, minus = outputs(h), outputs(0.0), outputs(-h)
    model.load_state_dict(state)
    torch.nn.utils.vector_to_parameters(w0, params)
    vhv = (LOSS(plus, y) - 2 * LOSS(zero, y) + LOSS(minus, y)).item() / h**2
    jv = (plus - minus) / (2 * h)
    z = zero.clone().requires_grad_()
    (g,) = torch.autograd.grad(LOSS(z, y), z, create_graph=True)
    (hjv,) = torch.autograd.grad((g * jv).sum(), z)
    return vhv, float((jv * hjv).sum())


@pytest.mark.parametrize("warm_up", [1, 300])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_products_match_second_differences_of_the_loss(
    variant: str, warm_up: int, mode: str
) -> None:
    model = _model(variant, warm_up).train(mode == "train")
    H = HessianOperator(model, LOSS, _data())
    G = GGNOperator(model, LOSS, _data())
    rng = np.random.default_rng(0)
    h = 1e-4
    for _ in range(3):
        v = rng.standard_normal(H.shape[0])
        v /= np.linalg.norm(v)
        vhv, vgv = _second_differences(model, v, h)
        scale = max(abs(vhv), float(np.linalg.norm(H @ v)))
        # truncation O(h^2 |f''''|) ~ 1e-8 and rounding O(eps |f| / h^2) ~ 1e-8, relative
        # to curvatures of order 0.01-0.1 on this model: 1e-5 leaves a margin of 10-100
        assert abs(v @ (H @ v) - vhv) <= 1e-5 * scale
        assert abs(v @ (G @ v) - vgv) <= 1e-7 * max(abs(vgv), 1e-3)  # Jv: O(h^2) only


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_hessian_is_symmetric_and_the_model_untouched(variant: str) -> None:
    model = _model(variant, 5)
    before = model_state(model)
    H = HessianOperator(model, LOSS, _data())
    dense = H @ np.eye(H.shape[0])
    assert relative_error(dense, dense.T) <= 1e3 * EPS
    assert state_differences(before, model) == []
    sn_modules = [m for m in model.modules() if type(m).__name__ == "_SpectralNorm"]
    hooks = [h for m in model.modules() for h in m._forward_pre_hooks.values()]
    # the exact forms were instance attributes during products only
    assert all("forward" not in vars(m) for m in sn_modules)
    assert all("compute_weight" not in vars(h) for h in hooks)
    # the user's own training-mode forward pass still advances the stored vectors
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model(_data()[0])
    assert any(not torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_products_forward_pass_computes_the_train_mode_value(variant: str) -> None:
    """The same operations as PyTorch's power steps: the same outputs, bitwise."""
    model = _model(variant, 3)
    state = copy.deepcopy(model.state_dict())
    x = _data()[0]
    named = list(model.named_parameters())
    with curvature_mode(model):
        got = functional_forward(
            model, [n for n, _ in named], [p.detach().clone() for _, p in named], x
        )
    model.load_state_dict(state)
    with torch.no_grad():
        want = model(x)
    assert torch.equal(got, want)
