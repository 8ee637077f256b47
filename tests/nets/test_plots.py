"""Plots of workflow files: each renders a non-empty image from files in the documented formats."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from nets.plots import (
    plot_loss_landscape,
    plot_spectrum,
    plot_spectrum_comparison,
    plot_training,
    spectrum_summary,
)
from spectral.io import save_npz

P = 4000


@pytest.fixture(autouse=True)
def _close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def _ritz(seed: int, m: int = 12, negative: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Ritz values/weights of a diagonal 'bulk + outliers' matrix from an exact Lanczos run."""
    rng = np.random.default_rng(seed)
    bulk = rng.exponential(0.02, P - 4)
    if negative:
        bulk *= np.where(rng.random(P - 4) < 0.3, -1.0, 1.0)
    eigs = np.concatenate([bulk, [0.9, 2.2, 2.3, 6.5]])
    q = rng.standard_normal(P)
    q /= np.linalg.norm(q)
    basis = np.zeros((P, m))
    alpha, beta = np.zeros(m), np.zeros(m)
    for j in range(m):
        basis[:, j] = q
        w = eigs * q
        alpha[j] = q @ w
        w -= basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        w -= basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        beta[j] = np.linalg.norm(w)
        q = w / beta[j]
    t = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
    theta, s = np.linalg.eigh(t)
    return theta, s[0] ** 2


def write_spectrum(path: Path, curvature: str = "hessian", seed: int = 0) -> Path:
    theta, gammas = _ritz(seed, negative=curvature == "hessian")
    m = theta.size
    save_npz(
        path,
        w=theta,
        eigvals=theta,
        gammas=gammas,
        residuals=np.full(m, 1e-3),
        probe_nodes=theta[None],
        probe_weights=gammas[None],
        alpha=np.zeros(m),
        beta=np.ones(m - 1),
        trace=np.float64(P * np.sum(gammas * theta)),
        trace_stderr=np.float64(0.1),
        num_params=np.int64(P),
        lanczos_iters=np.int64(m),
        num_probes=np.int64(1),
        curvature=np.str_(curvature),
        bn_mode=np.str_("train"),
        config_json=np.str_(json.dumps({"model": "SmallCNN", "dataset": "digits"})),
        model_fingerprint=np.str_("0" * 64),
    )
    return path


def write_landscape(path: Path, *, planes: bool = True, n: int = 9) -> Path:
    t = np.linspace(-1.0, 1.0, n)
    curv = np.array([6.5, -0.05, 0.3])
    loss = 0.1 + 0.5 * curv[:, None] * t[None] ** 2 + 0.2 * t[None] ** 4
    arrays = {
        "t": t,
        "direction_names": np.array(["ritz-top-1", "ritz-bottom-1", "random-1"]),
        "direction_values": np.array([6.5, -0.05, np.nan]),
        "train_loss": loss,
        "test_loss": loss + 0.1,
        "train_acc": 100.0 * np.exp(-loss),
        "test_acc": 90.0 * np.exp(-loss),
        "checkpoint_loss": np.float64(0.1),
        "config_json": np.str_("{}"),
        "model_fingerprint": np.str_("0" * 64),
    }
    if planes:
        x, y = np.meshgrid(t, t, indexing="ij")
        plane = (0.1 + 3.0 * x**2 + 0.5 * y**2)[None]
        arrays |= {
            "plane_names": np.array(["ritz-top-1|random-1"]),
            "plane_train_loss": plane,
            "plane_test_loss": plane + 0.1,
            "plane_train_acc": 100.0 * np.exp(-plane),
            "plane_test_acc": 90.0 * np.exp(-plane),
        }
    save_npz(path, **arrays)
    return path


def write_stats(run_dir: Path, epochs: int = 4) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [
        {
            "epoch": e,
            "lr": 0.05 * (1.0 - 0.1 * e),
            "train_loss": 2.0 / e,
            "train_acc": 100.0 - 50.0 / e,
            "train_top5": 100.0 - 5.0 / e,
            "test_loss": 2.1 / e if e % 2 == 0 else None,
            "test_acc": 95.0 - 50.0 / e if e % 2 == 0 else None,
            "test_top5": None,
            "epoch_time": 0.5,
            "peak_memory_mb": 0.0,
        }
        for e in range(1, epochs + 1)
    ]
    path = run_dir / "stats.json"
    path.write_text(
        json.dumps({"config": {"model": "SmallCNN", "dataset": "digits"}, "epochs": records})
    )
    return path


def assert_drawn(path: Path) -> None:
    """The image exists and has non-white pixels."""
    assert path.is_file() and path.stat().st_size > 0
    image = mpimg.imread(path)
    rgb = image[..., :3]
    assert (rgb < 0.9).any(), f"{path} is blank"
    assert not list(path.parent.glob(f".{path.name}.*.tmp")), "temporary file left behind"


def test_plot_spectrum_paper_form(tmp_path: Path) -> None:
    spec = write_spectrum(tmp_path / "spectrum-00100-ggn-lanczos.npz", "ggn")
    fig = plot_spectrum("lanczos", path=str(spec), save_path=tmp_path / "s.png")
    assert isinstance(fig, Figure)
    assert_drawn(tmp_path / "s.png")
    # The suffix may be omitted, as save_spectrum_path is given without it.
    plot_spectrum("lanczos", path=tmp_path / "spectrum-00100-ggn-lanczos")
    # The path alone is accepted too.
    plot_spectrum(spec)


def test_plot_spectrum_stats_box_reports_scaled_trace(tmp_path: Path) -> None:
    spec = write_spectrum(tmp_path / "h.npz", "hessian")
    arrays = np.load(spec, allow_pickle=False)
    w, g = arrays["w"], arrays["gammas"]
    summary = spectrum_summary(spec)
    assert summary["trace"] == pytest.approx(P * float(np.sum(g * w)), rel=1e-12)
    assert summary["top"] == pytest.approx(float(w.max()))
    assert summary["negative_mass"] == pytest.approx(float(g[w < 0].sum()))
    assert summary["negative_mass"] > 0
    pos = w[w > 0]
    assert summary["positive_condition"] == pytest.approx(float(pos.max() / pos.min()))
    fig = plot_spectrum("lanczos", path=spec)
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "negative mass" in texts
    assert f"{summary['trace']:.4g}" in texts
    assert f"{summary['top']:.4g}" in texts


def test_plot_spectrum_log_weights_and_smooth(tmp_path: Path) -> None:
    spec = write_spectrum(tmp_path / "h.npz")
    fig = plot_spectrum("lanczos", path=spec, log_weights=True, save_path=tmp_path / "log.pdf")
    assert fig.axes[0].get_yscale() == "log"
    assert (tmp_path / "log.pdf").read_bytes().startswith(b"%PDF")
    fig = plot_spectrum("lanczos", path=spec, smooth=0.05, save_path=tmp_path / "smooth.png")
    assert len(fig.axes) == 2  # the smoothed density is on a twin axis
    assert_drawn(tmp_path / "smooth.png")


def test_plot_spectrum_into_given_axes_and_diag_kind(tmp_path: Path) -> None:
    fig, axes = plt.subplots(1, 2)
    out = plot_spectrum((np.array([0.0, 1.0]), np.array([0.5, 0.5])), ax=axes[0])
    assert out is fig
    diag = tmp_path / "diag.npz"
    save_npz(diag, diagonal=np.random.default_rng(0).exponential(size=500))
    plot_spectrum("diag", path=diag, ax=axes[1])
    assert axes[1].patches  # histogram bars
    fig.savefig(tmp_path / "both.png")
    assert_drawn(tmp_path / "both.png")


def test_plot_spectrum_errors(tmp_path: Path) -> None:
    spec = write_spectrum(tmp_path / "h.npz")
    with pytest.raises(ValueError, match="kind_or_path"):
        plot_spectrum("eigen", path=spec)
    with pytest.raises(ValueError, match="path"):
        plot_spectrum("lanczos")
    with pytest.raises(FileNotFoundError):
        plot_spectrum("lanczos", path=tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="save_path"):
        plot_spectrum("lanczos", path=spec, save_path=tmp_path / "s.txt")
    bad = tmp_path / "bad.npz"
    save_npz(bad, x=np.zeros(3))
    with pytest.raises(ValueError, match="gammas"):
        plot_spectrum("lanczos", path=bad)


def test_plot_training(tmp_path: Path) -> None:
    stats = write_stats(tmp_path / "run")
    fig = plot_training(tmp_path / "run", save_path=tmp_path / "training.png")
    assert len(fig.axes) == 3
    assert_drawn(tmp_path / "training.png")
    # test_* entries that are null on some epochs are skipped, not drawn as zeros
    test_line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "test")
    assert len(test_line.get_xdata()) == 2
    plot_training(stats, show_top5=True)
    with pytest.raises(FileNotFoundError):
        plot_training(tmp_path / "nowhere")


def test_plot_loss_landscape_curves_and_planes(tmp_path: Path) -> None:
    land = write_landscape(tmp_path / "landscape-100.npz")
    fig = plot_loss_landscape(str(land), save_path=tmp_path / "landscape.png")
    # train/test curves, train/test contours, one shared colour bar
    assert len(fig.axes) == 5
    assert_drawn(tmp_path / "landscape.png")
    fig = plot_loss_landscape(land, metric="both", planes=False)
    assert len(fig.axes) == 4
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert any("ritz-top-1" in lab and "6.5" in lab for lab in labels)


def test_plot_loss_landscape_without_planes_and_errors(tmp_path: Path) -> None:
    land = write_landscape(tmp_path / "l.npz", planes=False)
    fig = plot_loss_landscape(land, directions=[0], save_path=tmp_path / "l.png")
    assert len(fig.axes) == 2
    assert_drawn(tmp_path / "l.png")
    with pytest.raises(ValueError, match="metric"):
        plot_loss_landscape(land, metric="entropy")
    with pytest.raises(ValueError, match="directions"):
        plot_loss_landscape(land, directions=[7])


def test_plot_spectrum_comparison_figure2(tmp_path: Path) -> None:
    hess = write_spectrum(tmp_path / "h.npz", "hessian", seed=0)
    ggn = write_spectrum(tmp_path / "g.npz", "ggn", seed=1)
    rng = np.random.default_rng(0)
    diag = np.concatenate([rng.exponential(0.05, 3000), rng.uniform(2.0, 5.0, 20)])
    fig = plot_spectrum_comparison(hess, ggn, diag, bins=40, save_path=tmp_path / "fig2.png")
    assert_drawn(tmp_path / "fig2.png")
    ax = fig.axes[0]
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "Lanc-Hess" in legend and "Lanc-GGN" in legend and "Diag-GGN" in legend
    assert "area = 1" in legend and "sum to 1" in legend
    # the histogram is a density (area one), not counts
    heights, edges = np.histogram(diag, bins=40, density=True)
    drawn = ax.patches[0].get_path().vertices[:, 1]
    assert float(drawn.max()) == pytest.approx(float(heights.max()))
    assert float(np.sum(heights * np.diff(edges))) == pytest.approx(1.0)
    # several diagonals, linear scale, torch tensors accepted
    fig = plot_spectrum_comparison(
        None,
        np.load(ggn, allow_pickle=False),
        {"exact": torch.as_tensor(diag), "MC": diag * rng.uniform(0.5, 1.5, diag.size)},
        log_scale=False,
    )
    legend = " ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert "Diag-GGN exact" in legend and "Diag-GGN MC" in legend
    with pytest.raises(ValueError, match="bins"):
        plot_spectrum_comparison(hess, ggn, diag, bins=0)
