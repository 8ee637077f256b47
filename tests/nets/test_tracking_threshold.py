"""The edge-of-stability line of the tracking figure (an adversarial sweep found it always
labelled and drawn as 2/η, also for SGD with momentum β, whose threshold is (2+2β)/η,
and for Adam, which has no such threshold on the Hessian's eigenvalues; and a change of
the learning rate drawn one row late)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from nets.plots.tracking import close_figure, plot_curvature_tracking

ROWS = [{"step": s, "epoch": 1 + (s > 2), "top_eigenvalues": [1.0], "lr": 0.1 if s <= 2 else 0.05}
        for s in (1, 2, 3, 4)]  # fmt: skip


def _run(tmp_path: Path, optimizer: str, kwargs: dict[str, Any]) -> Path:
    (tmp_path / "curvature.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    config = {"optimizer": optimizer, "optimizer_kwargs": kwargs}
    (tmp_path / "stats.json").write_text(json.dumps({"config": config, "epochs": []}))
    return tmp_path


def _edge(fig: Any) -> Any:
    lines = [ln for ln in fig.axes[0].get_lines() if "stability" in str(ln.get_label())]
    return lines[0] if lines else None


def test_heavy_ball_threshold_and_step_alignment(tmp_path: Path) -> None:
    fig = plot_curvature_tracking(_run(tmp_path, "SGD", {"lr": 0.1, "momentum": 0.9}))
    edge = _edge(fig)
    assert "2+2" in edge.get_label() and "0.9" in edge.get_label()
    assert edge.get_drawstyle() == "steps-pre"  # the lr of row 3 holds from row 2 on
    np.testing.assert_allclose(edge.get_ydata(), [38.0, 38.0, 76.0, 76.0])
    close_figure(fig)


def test_no_edge_line_for_adam(tmp_path: Path) -> None:
    fig = plot_curvature_tracking(_run(tmp_path, "Adam", {"lr": 0.001}))
    assert _edge(fig) is None
    assert any("Adam" in t.get_text() for t in fig.axes[0].texts)
    close_figure(fig)


def test_plain_gradient_descent_keeps_two_over_eta(tmp_path: Path) -> None:
    fig = plot_curvature_tracking(_run(tmp_path, "SGD", {"lr": 0.1}))
    edge = _edge(fig)
    assert "without momentum" in edge.get_label() and edge.get_drawstyle() == "steps-pre"
    np.testing.assert_allclose(edge.get_ydata(), [20.0, 20.0, 40.0, 40.0])
    close_figure(fig)
