"""Bulk + outliers in the workflow: certified bounds of a network's spectrum, the fit, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from curvops.ggn import GGNOperator
from nets.checkpoint import save_checkpoint
from nets.cli import main
from nets.data import load_dataset
from nets.models import get_model, model_spec
from nets.plots.band import plot_spectrum_band
from nets.workflow import compute_eigenspectrum, load_spectrum
from nets.workflow._resolve import make_eval_loader
from nets.workflow.bulk import bulk_rows, bulk_summary, spectrum_density
from spectral.io import CorruptFileError, load_npz, save_npz
from spectral.probes import as_generator, random_probe

N_SAMPLES = 96
BATCH = 96


def tiny_mlp(seed: int = 0) -> nn.Module:
    """460 parameters: 64 -> 6 -> 10."""
    return get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(6,), seed=seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = tiny_mlp(seed=1)
    path = tmp_path_factory.mktemp("bulk") / "checkpoint-00003.pt"
    save_checkpoint(path, net, None, 3, dict(model_spec(net) or {}, dataset="digits"))
    return path


def test_workflow_density_bounds_hold_for_the_dense_ggn(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "spectrum"
    result = compute_eigenspectrum(
        model="MLP",
        checkpoint_path=str(checkpoint),
        save_spectrum_path=str(out),
        lanczos_iters=12,
        num_probes=2,
        curvature_matrix="ggn",
        subsample=N_SAMPLES,
        batch_size=BATCH,
        device="cpu",
        fit="mp",
    )
    # The dense GGN the workflow sees (float32 model, columns of the same operator), and
    # the workflow's two Rademacher probes.
    net = tiny_mlp()
    net.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    loader = make_eval_loader(load_dataset("digits").train_eval, BATCH, subsample=N_SAMPLES, seed=0)
    op = GGNOperator(net, nn.CrossEntropyLoss(), loader, bn_mode="train")
    dense = np.asarray(op.matmat(np.eye(460, dtype=np.float32)), dtype=np.float64)
    lam, U = np.linalg.eigh((dense + dense.T) / 2)
    rng = as_generator(0)
    probes = [random_probe(460, "rademacher", rng) for _ in range(2)]
    density = result.density()
    assert density.source == "quadrature" and density.dimension == 460
    xs = np.concatenate([np.linspace(lam[0] - 0.1, lam[-1] + 0.1, 801), lam])
    for k, v in enumerate(probes):
        w = (U.T @ v) ** 2 / 460.0
        truth = np.concatenate([[0.0], np.cumsum(w)])[np.searchsorted(lam, xs, side="right")]
        lower, upper = density.cdf_bounds(xs, probe=k)
        assert np.all(lower <= truth + 1e-12) and np.all(truth <= upper + 1e-12)
    # The bulk summary is stored, reloaded and equal to a recomputation from the file.
    again = load_spectrum(out)
    assert str(again.bulk["bulk_law"]) == "marchenko-pastur"
    recomputed = bulk_summary(load_npz(Path(str(out) + ".npz")), "mp")
    for key, value in recomputed.items():
        np.testing.assert_array_equal(np.asarray(again.bulk[key]), np.asarray(value))
    assert again.bulk["outlier_values"].shape == again.bulk["outlier_residuals"].shape
    # every outlier is one of the Ritz values, with that Ritz value's residual
    for value, res in zip(again.bulk["outlier_values"], again.bulk["outlier_residuals"]):
        i = int(np.flatnonzero(result.values == value)[0])
        assert res == result.residuals[i]
    assert np.all(again.bulk["outlier_values"] > again.bulk["bulk_support"][1])


def test_bulk_summary_finds_spikes_of_a_known_spectrum() -> None:
    from spectral import rmt, slq, synthetic

    A = synthetic.spiked_covariance(600, 1200, [0.3, 3.0, 6.0], seed=1)
    d = slq(A, 40, num_probes=1, seed=2)
    arrays = {
        "w": d.nodes,
        "gammas": d.weights,
        "num_params": 600,
        "probe_nodes": d.probe_nodes,
        "probe_weights": d.probe_weights,
        "residuals": np.zeros(len(d)),
    }
    summary = bulk_summary(arrays, "mp")
    assert summary["outlier_values"].shape == (2,)  # the spike 0.3 < sqrt(1/2) stays hidden
    for value, theta in zip(summary["outlier_values"], (3.0, 6.0)):
        # BBP position; Gaussian fluctuation sd sqrt(2 l^2 (1 - q/theta^2)/p) (Paul 2007)
        sd = np.sqrt(2 * (1 + theta) ** 2 * (1 - 0.5 / theta**2) / 1200)
        assert abs(value - rmt.bbp_covariance(theta, 0.5)) <= 4 * sd
    ratio, variance = summary["bulk_parameters"]
    assert ratio == pytest.approx(0.5, abs=0.1) and variance == pytest.approx(1.0, abs=0.1)
    rows = dict(bulk_rows(summary))
    assert rows["bulk law"].startswith("marchenko-pastur (ratio")
    assert spectrum_density(arrays).probe_kind == "rademacher"
    with pytest.raises(ValueError, match="law"):
        bulk_summary(arrays, "gumbel")


def test_bulk_summary_lists_an_outlier_found_by_every_probe_once() -> None:
    # was: each of the 2 spikes listed once per probe (6 values for 3 probes)
    from spectral import slq, synthetic

    A = synthetic.spiked_covariance(400, 800, [5.0, 10.0], seed=2)
    exact = np.linalg.eigvalsh(A)
    d = slq(A, 40, num_probes=3, seed=0)
    nodes, weights = np.asarray(d.probe_nodes), np.asarray(d.probe_weights)
    order = np.argsort(nodes.ravel(), kind="stable")  # pooled, not in probe order
    arrays = {
        "w": nodes.ravel()[order],
        "gammas": weights.ravel()[order] / 3,
        "num_params": 400,
        "probe_nodes": nodes,
        "probe_weights": weights,
    }
    summary = bulk_summary(arrays, "mp")
    spikes = exact[exact > summary["bulk_support"][1] + 1.0]
    assert spikes.size == 2
    # converged Ritz values: within a few eps * ||A|| * m of the eigenvalues
    tol = 100 * 40 * np.finfo(np.float64).eps * exact[-1]
    np.testing.assert_allclose(summary["outlier_values"], spikes, rtol=0, atol=tol)
    # two Ritz values of one probe are never merged, however close
    one = {**arrays, "probe_nodes": nodes.ravel()[None], "probe_weights": weights.ravel()[None] / 3}
    assert bulk_summary(one, "mp")["outlier_values"].size == 6


def test_cli_spectrum_fit_and_band_plot(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s.npz"
    rc = main(
        ["spectrum", "--checkpoint", str(checkpoint), "--curvature", "ggn", "--iters", "8",
         "--subsample", str(N_SAMPLES), "--out", str(out), "--fit", "mp", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "bulk law" in text and "marchenko-pastur" in text and "outliers" in text
    assert "bulk_wasserstein" in load_npz(out)
    png = tmp_path / "band.png"
    rc = main(["plot", "band", str(out), "--out", str(png), "--confidence", "0.9"])
    assert rc == 0 and png.stat().st_size > 0
    assert "figure" in capsys.readouterr().out


@pytest.mark.parametrize("key", ["w", "gammas", "num_params"])
def test_band_plot_of_a_spectrum_without_a_key_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    """Before: a spectrum file with a valid checksum but without ``num_params`` (``w``,
    ``gammas``) gave a bare ``KeyError`` traceback from ``plot band``."""
    arrays = {"w": np.linspace(0.0, 4.0, 8), "gammas": np.full(8, 1 / 8), "num_params": 80}
    del arrays[key]
    path = tmp_path / "s.npz"
    save_npz(path, **arrays)
    with pytest.raises(CorruptFileError, match=rf"s\.npz'.*lacks '{key}'"):
        plot_spectrum_band(path)
    assert main(["plot", "band", str(path), "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err
    assert f"lacks '{key}'" in err and "Traceback" not in err, err
    with pytest.raises(ValueError, match=rf"Argument 'source'.*without '{key}'"):
        spectrum_density(arrays)
