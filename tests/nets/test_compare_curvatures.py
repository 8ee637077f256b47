"""compare_curvatures (workflow), make_proxy names, and the one-unit comparison figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import EKFACOperator, KFACOperator, LowRank, Sum
from curvops._model_state import model_state, state_differences
from curvops.proxies import make_proxy
from nets.plots._figure import close_figure
from nets.plots.approximations import plot_approximations
from nets.workflow import compare_curvatures


def _case() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    return net, nn.CrossEntropyLoss(), (x, y)


def test_compare_curvatures_writes_reports_and_figure_and_leaves_the_model(tmp_path: Path) -> None:
    net, loss_fn, data = _case()
    before = model_state(net)
    reports = compare_curvatures(
        net,
        loss_fn,
        data,
        approximations=("kfac", "ekfac-joint", "diag-ggn", "low-rank-3"),
        k=2,
        num_iters=15,
        save_path=tmp_path / "cmp.npz",
        figure_path=tmp_path / "cmp.png",
    )
    assert state_differences(before, net) == []
    assert set(reports) == {"kfac", "ekfac-joint", "diag-ggn", "low-rank-3"}
    with np.load(tmp_path / "cmp.npz", allow_pickle=False) as z:
        assert list(z["names"]) == list(reports)
        assert float(z["kfac/wasserstein"]) == reports["kfac"].wasserstein
        assert z["low-rank-3/top_eigenvalue_errors"].shape == (2,)
    assert (tmp_path / "cmp.png").stat().st_size > 0
    # the low-rank proxy holds the exact top pairs: top-k errors tiny, angles ~ 0
    assert np.all(reports["low-rank-3"].top_eigenvalue_errors < 1e-5)
    assert np.all(reports["low-rank-3"].principal_angles < 1e-3)
    with pytest.raises(ValueError, match="exact"):
        compare_curvatures(net, loss_fn, data, exact="fisher")
    # provenance goes into the file beside the settings, never over them
    with pytest.raises(ValueError, match="provenance"):
        compare_curvatures(net, loss_fn, data, provenance={"seed": 3}, save_path=tmp_path / "x")
    assert not (tmp_path / "x.npz").exists()


def test_make_proxy_names() -> None:
    net, loss_fn, data = _case()
    K = make_proxy("kfac-reduce-mc", net, loss_fn, data, seed=3)
    assert isinstance(K, KFACOperator) and (K.approx, K.fisher, K.remainder) == (
        "reduce",
        "mc",
        "diagonal",
    )
    assert isinstance(make_proxy("ekfac-empirical", net, loss_fn, data), EKFACOperator)
    from curvops import GGNOperator

    G = GGNOperator(net, loss_fn, data)
    assert isinstance(make_proxy("low-rank-2", net, loss_fn, data, exact=G), LowRank)
    assert isinstance(make_proxy("low-rank-2-diag", net, loss_fn, data, exact=G), Sum)
    for bad in ("kfac-full", "diag-kfac", "low-rank-x", "svd"):
        with pytest.raises(ValueError, match="spec"):
            make_proxy(bad, net, loss_fn, data, exact=G)
    with pytest.raises(ValueError, match="exact"):
        make_proxy("low-rank-2", net, loss_fn, data)


@pytest.mark.parametrize("kind", ["cdf", "density"])
def test_the_figure_has_one_unit_on_its_density_axis(kind: str) -> None:
    net, loss_fn, data = _case()
    reports = compare_curvatures(
        net, loss_fn, data, approximations=("kfac", "diag-mc"), k=2, num_iters=15
    )
    fig = plot_approximations(reports, kind=kind, sigma=0.05 if kind == "density" else None)
    try:
        ax = fig.axes[0]
        assert not ax.patches and not ax.containers  # no histogram bars, no stems
        lines = ax.get_lines()
        assert len(lines) == 3  # exact + two proxies, all drawn the same way
        for line in lines:
            x, y = (np.asarray(a, dtype=float) for a in line.get_data())
            if kind == "cdf":
                assert ax.get_ylabel() == "cumulative fraction of eigenvalues"
                assert np.all(np.diff(y) >= 0) and y[0] >= 0 and abs(y[-1] - 1.0) < 1e-12
            else:
                assert ax.get_ylabel() == "spectral density (1 / eigenvalue)"
                area = float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)
                assert abs(area - 1.0) < 5e-3  # each curve is a probability density
    finally:
        close_figure(fig)
    with pytest.raises(ValueError, match="kind"):
        plot_approximations(reports, kind="histogram")


def test_a_float32_low_rank_proxy_is_solved_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 rank-3 proxy's damped Newton step went through conjugate gradients to
    tol=1e-8, which float32 products cannot always reach (``curvature compare --approx
    low-rank-3`` failed on an MLP checkpoint); it is now inverted exactly (Woodbury), so
    only the exact side runs an iterative solve."""
    import curvops.comparison as comparison

    solved: list[object] = []
    iterative = comparison.inverse

    def counting(A: object, *args: object, **kwargs: object) -> object:
        solved.append(A)
        return iterative(A, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(comparison, "inverse", counting)
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(64, 8, generator=g)
    y = torch.randint(0, 4, (64,), generator=g)
    reports = compare_curvatures(
        net, nn.CrossEntropyLoss(), (x, y), approximations=("low-rank-3",), k=2, num_iters=12
    )
    assert np.isfinite(reports["low-rank-3"].newton_step_error)
    assert len(solved) == 1  # the exact GGN's solve; none for the proxy


def _float32_case() -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))  # float32
        x = torch.randn(64, 4) * 3
    return net, nn.CrossEntropyLoss(), (x, torch.arange(64) % 5)


def test_float32_hessian_comparison_solves_to_a_float32_tolerance(tmp_path: Path) -> None:
    """The exact Hessian's MINRES solve had to reach a fixed tol=1e-8, below float32's
    attainable relative residual (eps * kappa): it raised.  The default is now sqrt(eps)
    of the operator's dtype, and ``solve_tol`` is passed through (and saved)."""
    from spectral.errors import NumericalError

    net, loss_fn, data = _float32_case()
    kwargs: dict[str, Any] = {
        "approximations": ("diag-ggn",),
        "exact": "hessian",
        "k": 2,
        "num_iters": 20,
    }
    reports = compare_curvatures(net, loss_fn, data, save_path=tmp_path / "r.npz", **kwargs)
    assert np.isfinite(reports["diag-ggn"].newton_step_error)
    with np.load(tmp_path / "r.npz", allow_pickle=False) as z:
        assert '"solve_tol": null' in str(z["config_json"])
    with pytest.raises(NumericalError, match="tol=1e-08"):
        compare_curvatures(net, loss_fn, data, solve_tol=1e-8, **kwargs)
    loose = compare_curvatures(net, loss_fn, data, solve_tol=1e-3, **kwargs)
    assert np.isfinite(loose["diag-ggn"].newton_step_error)
