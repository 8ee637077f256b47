"""Lanczos-Newton against dense float64 linear algebra.

* on a linear least-squares model (MSE, GGN = Hessian = (2/M) X^T X) with k >= rank and
  delta -> 0 the step is the exact Newton step ``numpy.linalg.solve(H, g)``;
* with delta > 0 and k >= n it is the damped Newton step ``solve(H + delta I, g)``; with
  fewer steps it is the k-th conjugate-gradient iterate (the Krylov space of ``g``);
* on the saddle ``L = (p1^2 - p2^2)/2`` saddle-free Newton (``LancHess``) moves away from the
  saddle while plain Newton jumps onto it.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn

from nets.optim import get_optimizer
from nets.optim.lanczos_newton import LanczosNewton, lanczos_newton_direction

DT = torch.float64


def _least_squares(n_samples: int, n_features: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, n_features, generator=gen, dtype=DT)
    y = torch.randn(n_samples, 1, generator=gen, dtype=DT)
    model = nn.Linear(n_features, 1).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, n_features, generator=gen, dtype=DT))
        model.bias.fill_(0.5)
    xbar = np.concatenate([x.numpy(), np.ones((n_samples, 1))], axis=1)  # (weight, bias) order
    H = 2.0 / n_samples * xbar.T @ xbar  # MSE mean over N*1 elements
    return model, x, y, H


def _params(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()


def _closure(opt: torch.optim.Optimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("name", ["LancGN", "LancHess"])
def test_exact_newton_step_on_least_squares(name: str) -> None:
    model, x, y, H = _least_squares(40, 6)
    p0, g = _params(model), _grad(model, x, y)
    newton = np.linalg.solve(H, g)
    opt = get_optimizer(name, model, lr=1.0, damping=1e-9, lanczos_iters=7)
    opt.step(_closure(opt, model, x, y), curvature_batch=(x, y), loss_fn=nn.MSELoss())
    step = p0 - _params(model)
    # rounding of the Lanczos basis is amplified by 1/delta in the (g - QQ^T g) term
    np.testing.assert_allclose(step, newton, rtol=1e-5, atol=1e-7 * np.abs(newton).max())
    # one Newton step solves the least-squares problem
    lstsq = np.linalg.lstsq(np.concatenate([x.numpy(), np.ones((40, 1))], 1), y.numpy(), rcond=None)
    np.testing.assert_allclose(_params(model), lstsq[0].ravel(), rtol=1e-5, atol=1e-6)


def test_damped_newton_step_and_lr() -> None:
    model, x, y, H = _least_squares(30, 5, seed=1)
    p0, g = _params(model), _grad(model, x, y)
    delta, lr = 0.3, 0.7
    opt = LanczosNewton(model, lr=lr, damping=delta, lanczos_iters=50)  # capped at n = 6
    opt.step(_closure(opt, model, x, y), curvature_batch=(x, y), loss_fn=nn.MSELoss())
    expected = lr * np.linalg.solve(H + delta * np.eye(6), g)
    np.testing.assert_allclose(p0 - _params(model), expected, rtol=1e-10)
    assert opt.last_info["num_iters"] <= 6
    assert opt.last_info["residual_fraction"] < 1e-12  # g lies in K(B, g)


def test_rank_deficient_newton_step_is_the_pseudo_inverse_step() -> None:
    # 4 samples, 10 parameters: H has rank 4 and g lies in its range
    model, x, y, H = _least_squares(4, 9, seed=2)
    p0, g = _params(model), _grad(model, x, y)
    opt = LanczosNewton(model, lr=1.0, damping=1e-9, lanczos_iters=5)  # k = rank + 1
    opt.step(_closure(opt, model, x, y), curvature_batch=(x, y), loss_fn=nn.MSELoss())
    expected = np.linalg.pinv(H, rcond=1e-10) @ g
    np.testing.assert_allclose(p0 - _params(model), expected, rtol=1e-5, atol=1e-7)


def _cg(A: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    x, r = np.zeros_like(b), b.copy()
    p = r.copy()
    for _ in range(k):
        Ap = A @ p
        a = (r @ r) / (p @ Ap)
        x, r_new = x + a * p, r - a * Ap
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    return x


def test_gradient_start_equals_conjugate_gradients() -> None:
    """d = ||g|| Q f(T) e1 with f = 1/(theta + delta) is the k-th CG iterate on (H + delta I)."""
    gen = torch.Generator().manual_seed(3)
    M = torch.randn(30, 30, generator=gen, dtype=DT)
    B = M @ M.T / 30
    g = torch.randn(30, generator=gen, dtype=DT)
    for k in (1, 3, 8):
        d, info = lanczos_newton_direction(B, g, num_iters=k, damping=0.5)
        expected = _cg(B.numpy() + 0.5 * np.eye(30), g.numpy(), k)
        np.testing.assert_allclose(d.numpy(), expected, rtol=1e-9, atol=1e-12)
        assert info["residual_fraction"] < 1e-12


def test_random_start_projects_the_rest_with_one_over_delta() -> None:
    gen = torch.Generator().manual_seed(4)
    M = torch.randn(12, 12, generator=gen, dtype=DT)
    B = M @ M.T
    g = torch.randn(12, generator=gen, dtype=DT)
    # complete Krylov space: the exact damped Newton step, whatever the start
    d, _ = lanczos_newton_direction(B, g, num_iters=12, damping=0.1, seed=0)
    np.testing.assert_allclose(
        d.numpy(), np.linalg.solve(B.numpy() + 0.1 * np.eye(12), g.numpy()), rtol=1e-8
    )
    # partial: d = U f U^T g + (g - U U^T g)/delta with the Ritz pairs of that start
    from spectral.krylov import lanczos

    rng = np.random.default_rng(7)
    v0 = torch.from_numpy(rng.standard_normal(12))
    d, info = lanczos_newton_direction(B, g, num_iters=4, damping=0.1, v0=v0)
    ritz = lanczos(B, 4, v0=v0).ritz()
    U, theta = ritz.vectors.numpy(), ritz.values
    c = U.T @ g.numpy()
    expected = U @ (c / (np.abs(theta) + 0.1)) + (g.numpy() - U @ c) / 0.1
    np.testing.assert_allclose(d.numpy(), expected, rtol=1e-9)
    assert info["residual_fraction"] > 0.1


class _Coordinates(nn.Module):
    """out_n = x_n . p with a 2-vector parameter p."""

    def __init__(self, p: tuple[float, float]) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.p).unsqueeze(-1)


class _SignedSquare(nn.Module):
    """mean_n y_n out_n^2 / ... : with rows e1 (y=+1), e2 (y=-1) L = (p1^2 - p2^2) / 2."""

    reduction = "mean"

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y * out.squeeze(-1) ** 2).mean()


@pytest.mark.parametrize("saddle_free", [True, False])
def test_saddle_free_newton_escapes_where_newton_converges(saddle_free: bool) -> None:
    x = torch.eye(2, dtype=DT)
    y = torch.tensor([1.0, -1.0], dtype=DT)
    loss_fn = _SignedSquare()
    p0 = np.array([0.4, 0.3])
    model = _Coordinates((0.4, 0.3))
    opt = LanczosNewton(
        model, lr=1.0, damping=1e-8, lanczos_iters=2, curvature="hessian", saddle_free=saddle_free
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    loss0 = closure().item()
    opt.step(closure, curvature_batch=(x, y), loss_fn=loss_fn)
    p1 = model.p.detach().numpy()
    np.testing.assert_allclose(np.sort(opt.last_info["ritz_values"]), [-1.0, 1.0], atol=1e-12)
    H, g = np.diag([1.0, -1.0]), np.array([p0[0], -p0[1]])
    if saddle_free:
        # p - |H|^{-1} g = (0, 2 p2): away from the saddle, downhill
        np.testing.assert_allclose(p1, [0.0, 2 * p0[1]], atol=1e-7)
        assert np.linalg.norm(p1) > np.linalg.norm(p0)
        assert loss_fn(model(x), y).item() < loss0
    else:
        # plain Newton: p - H^{-1} g, straight onto the saddle at the origin
        np.testing.assert_allclose(p1, p0 - np.linalg.solve(H, g), atol=1e-7)
        np.testing.assert_allclose(p1, [0.0, 0.0], atol=1e-7)


def test_weight_decay_is_added_to_the_gradient() -> None:
    model, x, y, H = _least_squares(30, 5, seed=5)
    p0, g = _params(model), _grad(model, x, y)
    wd, delta = 0.1, 0.2
    opt = LanczosNewton(model, lr=1.0, damping=delta, weight_decay=wd, lanczos_iters=6)
    opt.step(_closure(opt, model, x, y), curvature_batch=(x, y), loss_fn=nn.MSELoss())
    expected = np.linalg.solve(H + delta * np.eye(6), g + wd * p0)
    np.testing.assert_allclose(p0 - _params(model), expected, rtol=1e-9)


def test_curvature_does_not_touch_buffers_and_state_dict_roundtrip() -> None:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(16, 4, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    xc = torch.randn(16, 4, generator=gen)
    opt = LanczosNewton(model, lr=0.1, damping=1.0, lanczos_iters=5, start="random", seed=3)
    loss_fn = nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    closure()
    buffers = [b.clone() for b in model.buffers()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step(curvature_batch=(xc, y), loss_fn=loss_fn)  # uses the gradients in .grad
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    opt2 = LanczosNewton(model, lr=0.1, damping=1.0, lanczos_iters=5, start="random", seed=3)
    opt2.load_state_dict(state)
    assert opt2.steps_taken == 1


def test_errors() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="'damping'"):
        LanczosNewton(model, damping=0.0)
    with pytest.raises(ValueError, match="'curvature'"):
        LanczosNewton(model, curvature="fisher")
    with pytest.raises(TypeError, match="'model'"):
        LanczosNewton(list(model.parameters()))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'curvature_batch'"):
        LanczosNewton(model).step()
