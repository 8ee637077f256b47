"""SWATS against an independent NumPy transcription of Keskar & Socher's Algorithm 1."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch

from nets.optim.swats import SWATS

Grad = Callable[[np.ndarray], np.ndarray]


def swats_reference(
    grad_fn: Grad,
    x0: np.ndarray,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    tol: float,
    steps: int,
) -> tuple[list[np.ndarray], int | None, float | None, list[float]]:
    """Algorithm 1 of the paper, line by line; returns iterates, switch step, Lambda, criteria."""
    x = x0.copy()
    m = np.zeros_like(x)
    a = np.zeros_like(x)
    lam = 0.0
    phase, v, big_lambda, switch = "adam", np.zeros_like(x), None, None
    iterates, criteria = [], []
    for k in range(1, steps + 1):
        g = grad_fn(x)
        if phase == "sgd":
            v = beta1 * v + g
            x = x - (1 - beta1) * big_lambda * v
            iterates.append(x.copy())
            criteria.append(np.nan)
            continue
        m = beta1 * m + (1 - beta1) * g
        a = beta2 * a + (1 - beta2) * g * g
        p = -lr * np.sqrt(1 - beta2**k) / (1 - beta1**k) * m / (np.sqrt(a) + eps)
        x = x + p
        iterates.append(x.copy())
        gamma = (p @ p) / (-(p @ g))
        lam = beta2 * lam + (1 - beta2) * gamma
        crit = abs(lam / (1 - beta2**k) - gamma)
        criteria.append(crit)
        if k > 1 and crit < tol:
            phase, switch, big_lambda = "sgd", k, lam / (1 - beta2**k)
            v = np.zeros_like(x)
    return iterates, switch, big_lambda, criteria


# f(u, w) = c.u + 0.5 sum d w^2: the gradient becomes constant once w has converged,
# so the projected learning rate stabilises and SWATS must switch.
C = np.array([1.0, 0.5])
D = np.array([4.0, 1.0])
X0 = np.array([0.0, 0.0, 3.0, -2.0])


def _grad(x: np.ndarray) -> np.ndarray:
    return np.concatenate([C, D * x[2:]])


def _torch_run(
    steps: int, **kwargs: float | tuple[float, float]
) -> tuple[SWATS, list[np.ndarray], list[str]]:
    w = torch.nn.Parameter(torch.tensor(X0, dtype=torch.float64))
    opt = SWATS([w], **kwargs)  # type: ignore[arg-type]
    iterates, phases = [], []
    for _ in range(steps):
        opt.zero_grad()
        w.grad = torch.from_numpy(_grad(w.detach().numpy()))
        opt.step()
        iterates.append(w.detach().numpy().copy())
        phases.append(opt.phase)
    return opt, iterates, phases


def test_switch_step_and_iterates_match_algorithm_1() -> None:
    kw = {"lr": 0.1, "beta1": 0.9, "beta2": 0.9, "eps": 1e-9, "tol": 1e-5}
    ref_x, ref_switch, ref_lambda, criteria = swats_reference(_grad, X0, steps=260, **kw)
    assert ref_switch is not None and ref_switch > 100  # a non-trivial switch
    # the reference criterion is not borderline: it fails clearly before, holds at the switch
    before = np.array(criteria[1 : ref_switch - 1])
    assert before.min() > 1.1 * kw["tol"]
    assert criteria[ref_switch - 1] < kw["tol"]

    opt, xs, phases = _torch_run(260, lr=0.1, betas=(0.9, 0.9), eps=1e-9, switch_tol=1e-5)
    assert opt.switch_step == ref_switch
    assert opt.sgd_lr == pytest.approx(ref_lambda, rel=1e-12)
    # not before the criterion holds: Adam phase up to step switch-1, SGD from the switch on
    assert phases[: ref_switch - 1] == ["adam"] * (ref_switch - 1)
    assert set(phases[ref_switch - 1 :]) == {"sgd"}
    np.testing.assert_allclose(np.array(xs), np.array(ref_x), rtol=1e-11, atol=1e-12)
    info = opt.switch_info()[0]
    assert info["switch_step"] == ref_switch and info["phase"] == "sgd"


def test_constant_gradient_switches_at_step_two_with_paper_tolerance() -> None:
    # f = c.x: Adam's bias-corrected step is constant, so gamma_k is constant and the
    # criterion (with the paper's eps) holds at the first step where it is evaluated, k = 2.
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    opt = SWATS([w], lr=0.01)
    for _ in range(4):
        opt.zero_grad()
        (w * c).sum().backward()
        opt.step()
    assert opt.switch_step == 2
    # Lambda is the projected learning rate: the SGD step along -g has Adam's component
    step = -0.01 * c / c.abs()
    expected = float(step @ step / -(step @ c))
    assert opt.sgd_lr == pytest.approx(expected, rel=1e-6)


def test_never_switches_with_zero_tolerance() -> None:
    _, _, phases = _torch_run(150, lr=0.1, betas=(0.9, 0.9), switch_tol=0.0)
    assert set(phases) == {"adam"}


def test_adam_phase_matches_reference_with_weight_decay() -> None:
    wd = 0.1

    def grad_wd(x: np.ndarray) -> np.ndarray:
        return _grad(x) + wd * x

    ref_x, _, _, _ = swats_reference(
        grad_wd, X0, lr=0.05, beta1=0.9, beta2=0.999, eps=1e-9, tol=0.0, steps=20
    )
    _, xs, _ = _torch_run(20, lr=0.05, weight_decay=wd, switch_tol=0.0)
    np.testing.assert_allclose(np.array(xs), np.array(ref_x), rtol=1e-12, atol=1e-13)


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_resumes_bit_identically_across_the_switch() -> None:
    kwargs = {"lr": 0.1, "betas": (0.9, 0.9), "switch_tol": 1e-5}

    def run(w: torch.nn.Parameter, opt: SWATS, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            w.grad = torch.from_numpy(_grad(w.detach().numpy()))
            opt.step()

    w = torch.nn.Parameter(torch.tensor(X0, dtype=torch.float64))
    opt = SWATS([w], **kwargs)  # type: ignore[arg-type]
    run(w, opt, 150)  # before the switch (at 166)
    saved_w, saved_state = w.detach().clone(), _roundtrip(opt.state_dict())
    run(w, opt, 60)
    assert opt.phase == "sgd"

    w2 = torch.nn.Parameter(saved_w)
    opt2 = SWATS([w2], **kwargs)  # type: ignore[arg-type]
    opt2.load_state_dict(saved_state)
    run(w2, opt2, 60)
    assert torch.equal(w2, w)
    assert opt2.switch_step == opt.switch_step and opt2.sgd_lr == opt.sgd_lr


def test_invalid_arguments() -> None:
    w = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="'lr'"):
        SWATS(w, lr=-1.0)
    with pytest.raises(ValueError, match="'betas'"):
        SWATS(w, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="'state_dict'"):
        SWATS(w).load_state_dict({"state": {}, "param_groups": []})


def test_accepts_a_module_and_the_registry_name() -> None:
    from nets.optim import get_optimizer

    model = torch.nn.Linear(2, 1)
    assert isinstance(SWATS(model, lr=0.1), SWATS)
    assert isinstance(get_optimizer("swats", model, lr=0.1), SWATS)
