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
from spectral.io import CorruptFileError, save_npz

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
        config_json=np.str_(
            json.dumps(
                {
                    "model": "SmallCNN",
                    "dataset": "digits",
                    "checkpoint": "/runs/a/checkpoint-00010.pt",
                    "epoch": 10,
                    "bn_mode": "train",
                }
            )
        ),
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
    # weights and the smoothed density have different units: two panels, one x axis
    stems_ax, density_ax = fig.axes
    assert "weight" in stems_ax.get_ylabel() and "density" in density_ax.get_ylabel()
    assert not density_ax.containers and stems_ax.containers
    assert not [ln for ln in stems_ax.get_lines() if "smoothed" in str(ln.get_label())]
    assert "smoothed density" in str(density_ax.get_lines()[0].get_label())
    assert stems_ax.get_shared_x_axes().joined(stems_ax, density_ax)
    assert_drawn(tmp_path / "smooth.png")
    fig = plot_spectrum("lanczos", path=spec, log_weights=False)
    assert fig.axes[0].get_yscale() == "linear" and fig.axes[0].get_ylim()[0] == 0.0
    with pytest.raises(ValueError, match="smooth"):
        plot_spectrum(spec, ax=plt.subplots()[1], smooth=0.1)


def test_plot_spectrum_default_shows_outliers_and_titles_the_run(tmp_path: Path) -> None:
    """The default weight axis is logarithmic: outliers (weight ~1/P) sit inside the limits."""
    spec = write_spectrum(tmp_path / "h.npz")
    s = np.load(spec, allow_pickle=False)
    fig = plot_spectrum("lanczos", path=spec)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    weights = s["gammas"][s["gammas"] > 0]
    assert low < weights.min() and high > weights.max()
    top = int(np.argmax(s["w"]))  # the top outlier (6.5) carries a tiny weight, drawn
    assert s["gammas"][top] < 0.05 and low < s["gammas"][top]
    left, right = ax.get_xlim()
    assert left < s["w"].min() and right > s["w"].max()
    title = ax.get_title()
    for part in ("Hessian", "m = 12", "SmallCNN", "checkpoint-00010.pt", "epoch 10"):
        assert part in title, part


def test_smoothing_a_psd_spectrum_puts_no_mass_below_zero(tmp_path: Path) -> None:
    from nets.plots.spectrum import halfline_density

    ggn = write_spectrum(tmp_path / "g.npz", "ggn", seed=1)
    s = np.load(ggn, allow_pickle=False)
    assert s["w"].min() < 0.1  # Ritz values near 0, where a plain Gaussian spills below 0
    sigma = 0.2
    fig = plot_spectrum(ggn, smooth=sigma)
    line = fig.axes[1].get_lines()[0]
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    assert x.min() >= 0.0 and (y >= 0).all()
    assert fig.axes[1].get_xlim()[0] <= 0.0  # drawn from 0: nothing hidden
    assert "reflected at 0" in line.get_label()
    # the half-line density has mass one, all of it on [0, inf)
    below = halfline_density(s["w"], s["gammas"], np.linspace(-3.0, -1e-12, 1001), sigma)
    assert np.all(below == 0.0)
    grid = np.linspace(0.0, s["w"].max() + 10 * sigma, 200_001)  # trapezoid error O(h^2)
    rho = halfline_density(s["w"], s["gammas"], grid, sigma)
    assert float(np.trapezoid(rho, grid)) == pytest.approx(float(s["gammas"].sum()), abs=1e-8)
    # a plain Gaussian would have put mass below 0: what the reflection prevents
    from scipy.stats import norm

    spill = float(np.sum(s["gammas"] * norm.cdf(0.0, loc=s["w"], scale=sigma)))
    assert spill > 0.1
    # far from 0 it is the ordinary Gaussian smoothing
    far = np.array([6.5])
    plain = np.sum(s["gammas"] * norm.pdf(far[:, None], loc=s["w"], scale=sigma), axis=1)
    assert halfline_density(s["w"], s["gammas"], far, sigma) == pytest.approx(plain, rel=1e-9)
    # the Hessian keeps its negative side
    hess = write_spectrum(tmp_path / "h.npz", "hessian")
    fig = plot_spectrum(hess, smooth=sigma)
    assert float(np.min(fig.axes[1].get_lines()[0].get_xdata())) < 0.0


def test_plot_spectrum_into_given_axes_and_diag_kind(tmp_path: Path) -> None:
    fig, axes = plt.subplots(1, 2)
    out = plot_spectrum((np.array([0.0, 1.0]), np.array([0.5, 0.5])), ax=axes[0])
    assert out is fig
    diag = tmp_path / "diag.npz"
    save_npz(diag, diagonal=np.random.default_rng(0).exponential(size=500))
    plot_spectrum("diag", path=diag, ax=axes[1])
    assert axes[1].patches  # histogram bars
    assert axes[1].get_yscale() == "log" and "density" in axes[1].get_ylabel()
    assert axes[1].get_title() == "Histogram of the curvature diagonal"
    config = {"method": "mc", "model": "SmallCNN", "checkpoint": "r/checkpoint-00002.pt"}
    save_npz(diag, diagonal=np.ones(5), config_json=np.str_(json.dumps(config)))
    title = plot_spectrum("diag", path=diag).axes[0].get_title()
    assert title == "Histogram of the GGN diagonal (MC)\nSmallCNN, checkpoint-00002.pt"
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
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert labels == [
        "train (running mean over the epoch, train mode)",
        "test (full pass after the epoch, eval mode)",
    ]
    assert [ln.get_label() for ln in fig.axes[1].get_lines()] == labels  # same names
    test_line = fig.axes[0].get_lines()[1]
    assert len(test_line.get_xdata()) == 2
    assert fig.get_suptitle() == "SmallCNN / digits"
    plot_training(stats, show_top5=True)
    with pytest.raises(FileNotFoundError):
        plot_training(tmp_path / "nowhere")
    # a truncated stats.json is a corrupt file named as such (before: "Argument
    # 'path_or_dir'", a name the command line's user never gave)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "stats.json").write_text('{"epochs": [')
    with pytest.raises(CorruptFileError, match=r"bad/stats\.json': not valid JSON") as info:
        plot_training(tmp_path / "bad")
    assert "path_or_dir" not in str(info.value)


def test_plot_loss_landscape_curves_and_planes(tmp_path: Path) -> None:
    land = write_landscape(tmp_path / "landscape-100.npz")
    fig = plot_loss_landscape(str(land), save_path=tmp_path / "landscape.png")
    # train/test curves, train/test contours, one shared colour bar
    assert len(fig.axes) == 5
    assert_drawn(tmp_path / "landscape.png")
    assert "plane" in fig.axes[2].get_title() and fig.get_suptitle().startswith("Loss landscape")
    fig = plot_loss_landscape(land, metric="both", planes=False)
    assert len(fig.axes) == 4
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert any("ritz-top-1" in lab and "6.5" in lab for lab in labels)


def test_plot_loss_landscape_marks_the_checkpoint_in_every_panel(tmp_path: Path) -> None:
    land = write_landscape(tmp_path / "l.npz", n=9)
    arrays = dict(np.load(land, allow_pickle=False))
    arrays["config_json"] = np.str_(
        json.dumps(
            {
                "model": "SmallCNN",
                "checkpoint": "/r/checkpoint-00010.pt",
                "epoch": 10,
                "refresh_bn": False,
                "subsample": None,
                "direction_normalisation": {
                    "ritz-top-1": "unit Euclidean norm",
                    "ritz-bottom-1": "unit Euclidean norm",
                    "random-1": "unit Euclidean norm",
                },
            }
        )
    )
    fig = plot_loss_landscape(arrays, metric="both")
    curve_axes = fig.axes[:4]
    for ax, key in zip(curve_axes, ("train_loss", "test_loss", "train_acc", "test_acc")):
        stars = [ln for ln in ax.get_lines() if ln.get_label() == "checkpoint (t = 0)"]
        assert len(stars) == 1, ax.get_title()
        assert stars[0].get_xdata()[0] == 0.0
        assert stars[0].get_ydata()[0] == pytest.approx(arrays[key][0, 4])
        assert "unit Euclidean norm" in ax.get_xlabel()
    for part in ("SmallCNN", "checkpoint-00010.pt", "epoch 10", "eval mode"):
        assert part in fig.get_suptitle(), part
    plane_axes = [ax for ax in fig.axes[4:] if "plane" in ax.get_title()]
    assert len(plane_axes) == 2 and all("checkpoint" in ax.get_title() for ax in plane_axes)
    fig = plot_loss_landscape(arrays, curves=False)  # the plane alone is titled too
    assert "SmallCNN" in fig.get_suptitle()


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
    # weights and densities never share an axis: stems above, histogram below
    stem_ax, hist_ax = fig.axes
    assert stem_ax.get_shared_x_axes().joined(stem_ax, hist_ax)
    assert "weight" in stem_ax.get_ylabel() and "sum to 1" in stem_ax.get_ylabel()
    assert "density" in hist_ax.get_ylabel() and "area = 1" in hist_ax.get_ylabel()
    assert len(stem_ax.containers) == 2 and not stem_ax.patches
    assert hist_ax.patches and not hist_ax.containers[1:]
    legend = " ".join(t.get_text() for t in stem_ax.get_legend().get_texts())
    assert "Lanc-Hess (m = 12)" in legend and "Lanc-GGN (m = 12)" in legend
    assert "Diag-GGN" in " ".join(t.get_text() for t in hist_ax.get_legend().get_texts())
    title = fig.get_suptitle()
    assert "m = 12" in title and "SmallCNN" in title and "checkpoint-00010.pt" in title
    ax = hist_ax
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
    legend = " ".join(t.get_text() for t in fig.axes[1].get_legend().get_texts())
    assert "Diag-GGN exact" in legend and "Diag-GGN MC" in legend
    assert fig.axes[0].get_ylim()[0] == 0.0 and fig.axes[1].get_ylim()[0] == 0.0
    # a diagonal file says what it holds: the same legend names as the demo's
    diag_file = tmp_path / "ggn-diagonal.npz"
    save_npz(
        diag_file,
        diagonal=diag,
        diagonal_exact=diag,
        mc_samples=np.int64(1),
        config_json=np.str_(json.dumps({"method": "mc", "mc_samples": 1})),
    )
    fig = plot_spectrum_comparison(hess, ggn, diag_file)
    names = [t.get_text().split(" (")[0] for t in fig.axes[1].get_legend().get_texts()]
    assert names == ["Diag-GGN MC", "Diag-GGN exact"]
    with pytest.raises(ValueError, match="bins"):
        plot_spectrum_comparison(hess, ggn, diag, bins=0)
    # into two given Axes (a column of a larger figure): same split, same x range
    fig, grid = plt.subplots(2, 2)
    out = plot_spectrum_comparison(hess, ggn, diag, axes=(grid[0, 1], grid[1, 1]), title="T")
    assert out is fig and grid[0, 1].get_title() == "T"
    assert grid[0, 1].containers and grid[1, 1].patches and not grid[0, 1].patches
    assert grid[0, 1].get_xlim() == grid[1, 1].get_xlim()
    with pytest.raises(ValueError, match="axes"):
        plot_spectrum_comparison(hess, ggn, diag, axes=(grid[0, 0],))
