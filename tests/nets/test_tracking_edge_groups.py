"""The edge-of-stability line of the tracking figure reads the optimiser's real settings.

An adversarial sweep found: an SGD *object* with momentum 0.9 given to ``train_network``
was recorded as ``optimizer_kwargs: {}``, so the figure drew 2/η labelled "GD without
momentum" (40 at η = 0.05) instead of (2+2β)/η = 76; a Nesterov object got that line too;
with parameter groups at different rates the line used the first group's rate alone, and
its label did not say so.  Each threshold here is checked against torch's own SGD on a
quadratic: below the line it converges, above it diverges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from nets import load_dataset, train_network
from nets.plots.tracking import (
    EDGE_LABEL,
    UNRECORDED_LABEL,
    edge_of_stability,
    plot_curvature_tracking,
)
from nets.training import optimizer_param_groups

ROWS = [{"step": s, "top_eigenvalues": [1.0], "lr": 0.001} for s in (1, 2, 3)]


@pytest.fixture(autouse=True)
def _close_figures() -> Any:
    yield
    plt.close("all")


def _edges(fig: Any) -> dict[str, Any]:
    """The edge-of-stability lines of the eigenvalue panel (drawn as steps), by label."""
    return {
        str(line.get_label()): line
        for line in fig.axes[0].get_lines()
        if line.get_drawstyle() == "steps-pre"
    }


def _notes(fig: Any) -> str:
    return " ".join(t.get_text() for t in fig.axes[0].texts)


def _diverges(opt_kwargs: dict[str, Any], curvature: float, steps: int = 3000) -> bool:
    """Whether torch's SGD with ``opt_kwargs`` diverges on ``curvature * x**2 / 2``."""
    x = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = torch.optim.SGD([x], **opt_kwargs)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * curvature * x**2).sum().backward()
        opt.step()
    return not bool(x.abs().item() < 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9},
        {"lr": 0.1, "momentum": 0.5, "dampening": 0.3},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    ],
)
def test_each_sgd_threshold_is_where_torch_sgd_turns_unstable(kwargs: dict[str, Any]) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], **kwargs)
    config = {"optimizer": "SGD", "optimizer_param_groups": optimizer_param_groups(opt)}
    factor, label = edge_of_stability(config)  # type: ignore[misc]
    threshold = factor / kwargs["lr"]
    assert not _diverges(kwargs, 0.97 * threshold)
    assert _diverges(kwargs, 1.03 * threshold)
    if kwargs.get("nesterov"):
        assert "Nesterov" in label and "0.9" in label


def test_sgd_object_given_to_train_network_draws_its_momentum(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    train_network(
        tmp_path, load_dataset("digits"), model=net, optimizer=opt, epochs=1, batch_size=512,
        schedule="constant", progress=False, device="cpu",
        track={"every": 2, "top_k": 1, "samples": 64},
    )  # fmt: skip
    config = json.loads((tmp_path / "stats.json").read_text())["config"]
    assert config["optimizer"] == "SGD" and config["optimizer_kwargs"] == {}
    (group,) = config["optimizer_param_groups"]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.05, 0.9, False)
    (edge,) = _edges(plot_curvature_tracking(tmp_path)).values()
    assert "2+2" in edge.get_label() and "0.9" in edge.get_label()
    np.testing.assert_allclose(edge.get_ydata(), 76.0)  # (2 + 2 * 0.9) / 0.05, not 2 / 0.05


def test_resuming_an_object_run_still_matches(tmp_path: Path) -> None:
    def optimiser() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
        return net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    data = load_dataset("digits")
    common: dict[str, Any] = {"batch_size": 512, "progress": False, "device": "cpu", "save_freq": 1}
    net, opt = optimiser()
    train_network(tmp_path, data, model=net, optimizer=opt, epochs=1, **common)
    net, opt = optimiser()
    train_network(tmp_path, data, model=net, optimizer=opt, epochs=2, resume=True, **common)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [e["epoch"] for e in stats["epochs"] if e["epoch"] > 0] == [1, 2]
    assert stats["config"]["optimizer_param_groups"][0]["momentum"] == 0.9


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"lr": 0.1, "momentum": 0.9, "nesterov": "false"}, "cannot be read"),
        ({"lr": 0.1, "maximize": True}, "maximises"),
        ({"lr": 0.1, "momentum": 1.0}, "no such threshold"),
    ],
)
def test_settings_that_give_no_known_threshold_draw_no_line(
    settings: dict[str, Any], reason: str
) -> None:
    config = {"optimizer": "SGD", "optimizer_param_groups": [settings]}
    fig = plot_curvature_tracking(ROWS, config=config)
    assert _edges(fig) == {}
    assert "no edge-of-stability line" in _notes(fig) and reason in _notes(fig)


def test_groups_at_different_rates_draw_the_two_bounds_naming_the_groups() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(
        [{"params": net[0].parameters(), "lr": 0.001}, {"params": net[2].parameters(), "lr": 0.5}]
    )
    fig = plot_curvature_tracking(ROWS, config=opt)  # the rows' lr: group 0's
    edges = _edges(fig)
    assert len(edges) == 2
    stable = next(line for label, line in edges.items() if "stable below" in label)
    unstable = next(line for label, line in edges.items() if "unstable above" in label)
    assert "largest" in stable.get_label() and "group 1" in stable.get_label()
    assert "smallest" in unstable.get_label() and "group 0" in unstable.get_label()
    np.testing.assert_allclose(stable.get_ydata(), 2 / 0.5)
    np.testing.assert_allclose(unstable.get_ydata(), 2 / 0.001)
    assert "between the two lines" in _notes(fig)
    assert edge_of_stability(opt) is None  # two bounds, not one threshold


def test_the_two_bounds_hold_for_torch_sgd_with_two_groups() -> None:
    rng = np.random.default_rng(0)
    rates = (0.02, 0.1)
    seen = {"below": 0, "above": 0}
    for i in range(12):
        q, _ = np.linalg.qr(rng.standard_normal((2, 2)))
        spectrum = rng.uniform(1.0, 150.0 if i % 2 else 22.0, 2)
        hessian = torch.tensor(q @ np.diag(spectrum) @ q.T)
        a, b = (nn.Parameter(torch.ones(1, dtype=torch.float64)) for _ in range(2))
        opt = torch.optim.SGD([{"params": [a], "lr": rates[0]}, {"params": [b], "lr": rates[1]}])
        lines, _ = _edge_lines(opt)
        below, above = lines[0][0] / rates[0], lines[1][0] / rates[0]  # rows' lr: group 0's
        top = float(torch.linalg.eigvalsh(hessian)[-1])
        for _ in range(2000):
            opt.zero_grad()
            x = torch.cat([a, b])
            (0.5 * x @ hessian @ x).backward()
            opt.step()
        size = float(torch.cat([a, b]).detach().norm())
        if top < 0.97 * below:
            seen["below"] += 1
            assert size < 0.1, (top, below)
        if top > 1.03 * above:
            seen["above"] += 1
            assert not size < 10.0, (top, above)
    assert min(seen.values()) > 0, seen


def _edge_lines(opt: torch.optim.Optimizer) -> Any:
    from nets.plots.tracking import _as_config, _edge_lines

    return _edge_lines(_as_config(opt))


def test_groups_of_different_momentum_draw_no_line() -> None:
    config = {
        "optimizer": "SGD",
        "optimizer_param_groups": [{"lr": 0.1, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.0}],
    }
    fig = plot_curvature_tracking(ROWS, config=config)
    assert _edges(fig) == {} and "different momentum" in _notes(fig)


def test_groups_at_one_rate_draw_one_line_and_rows_alone_say_whose_rate() -> None:
    config = {
        "optimizer": "SGD",
        "optimizer_param_groups": [{"lr": 0.001, "momentum": 0.5}, {"lr": 0.001, "momentum": 0.5}],
    }
    (edge,) = _edges(plot_curvature_tracking(ROWS, config=config)).values()
    np.testing.assert_allclose(edge.get_ydata(), 3.0 / 0.001)
    (edge,) = _edges(plot_curvature_tracking(ROWS)).values()  # no configuration: assumed
    assert edge.get_label() == EDGE_LABEL
    assert "not recorded" in EDGE_LABEL and "group 0" in EDGE_LABEL


def test_a_configuration_without_settings_draws_an_assumption_so_labelled() -> None:
    # written before the groups were recorded: an SGD object's settings were lost
    config = {"optimizer": "SGD", "optimizer_kwargs": {}}
    (edge,) = _edges(plot_curvature_tracking(ROWS, config=config)).values()
    assert edge.get_label() == UNRECORDED_LABEL and "not recorded" in UNRECORDED_LABEL
    # a name's keywords: the others are SGD's defaults (no momentum), as before
    config = {"optimizer": "SGD", "optimizer_kwargs": {"lr": 0.001}}
    (edge,) = _edges(plot_curvature_tracking(ROWS, config=config)).values()
    assert "GD without momentum" in edge.get_label() and "not recorded" not in edge.get_label()
