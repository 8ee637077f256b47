"""Diagonal approximations versus Lanczos: a spiked random matrix and a network's GGN.
==================================================================================================

The diagonal entries of a matrix are what a diagonal approximation treats as its
eigenvalues. On a spiked sample covariance (Marchenko-Pastur bulk plus outliers,
``spectral.synthetic``) the diagonal concentrates near the mean eigenvalue and
misses both the bulk's width and the outliers, while 30 Lanczos steps from one
random vector recover the outliers and match the bulk in the 1-Wasserstein
distance. On the GGN of a small trained CNN, the exact and Monte-Carlo GGN
diagonals (``curvops.diagonal.ggn_diagonal``) are compared with the Lanczos GGN
spectrum as in the paper's Figure 2. Weights (stems) and densities (histograms) are
drawn in separate panels.

Time (``time python examples/diagonal_vs_lanczos.py``, default settings,
on 2 cores shared with other jobs at load average ~8-9):
220 s of CPU time (user + sys), 1394 s wall.

    python examples/diagonal_vs_lanczos.py --out results/diagonal_vs_lanczos
"""

# %%
# Settings
# --------
# One figure with two columns: a random matrix whose spectrum we know exactly, and the
# GGN of a small network; Lanczos weights above, densities below. ``--quick`` (used in
# this build) shrinks both.

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch

from curvops.diagonal import ggn_diagonal
from curvops.ggn import GGNOperator
from nets import (
    get_model,
    load_dataset,
    make_loader,
    model_from_checkpoint,
    plot_spectrum_comparison,
    train_network,
)
from nets.plots.spectrum import stem_spectrum
from spectral import SpectralDensity, slq
from spectral.synthetic import spiked_covariance

parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
parser.add_argument("--out", default="results/diagonal_vs_lanczos", help="output directory")
parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
m = 20 if args.quick else 30
fig, grid = plt.subplots(2, 2, figsize=(10.0, 6.4), layout="constrained")


# %%
# A spiked covariance
# -------------------
# :func:`spectral.synthetic.spiked_covariance` draws the sample covariance of
# :math:`2n` Gaussian samples whose population covariance has three spikes: its
# spectrum is a Marchenko-Pastur bulk plus outliers. The diagonal entries
# :math:`A_{ii} = e_i^\top A e_i` are averages over all eigenvalues,
# :math:`A_{ii} = \sum_j \lambda_j (q_j)_i^2`, so for a matrix whose eigenvectors are
# spread out they concentrate at the mean eigenvalue :math:`\operatorname{tr}A / n`:
# they miss the width of the bulk and the outliers. Thirty Lanczos steps from one
# random probe give a quadrature rule whose 1-Wasserstein distance to the exact
# spectrum is several times smaller.


def synthetic(ax: plt.Axes, hist_ax: plt.Axes, n: int, m: int) -> None:
    """Spiked covariance: Lanczos weights above; exact eigenvalues and diagonal densities below."""
    matrix = spiked_covariance(n, 2 * n, [4.0, 8.0, 15.0], seed=0)
    exact = np.linalg.eigvalsh(matrix)
    diagonal = np.diag(matrix)
    lanczos = slq(matrix, m, seed=0)
    w_lanczos = lanczos.wasserstein(exact)
    w_diagonal = SpectralDensity(diagonal, np.full(n, 1.0 / n)).wasserstein(exact)
    print(
        f"spiked covariance (n = {n}): top eigenvalue {exact[-1]:.4g}, largest diagonal "
        f"entry {diagonal.max():.4g}, top Ritz value {lanczos.nodes[-1]:.4g}"
    )
    print(
        f"1-Wasserstein distance to the exact spectrum: Lanczos (m = {m}) {w_lanczos:.3g}, "
        f"diagonal {w_diagonal:.3g}"
    )
    bins = np.linspace(min(exact.min(), diagonal.min()), exact.max() * 1.02, 60)
    hist_ax.hist(exact, bins=bins, density=True, log=True, color="0.75", label="exact eigenvalues")
    hist_ax.hist(
        diagonal,
        bins=bins,
        density=True,
        histtype="step",
        log=True,
        linewidth=1.5,
        color="#009E73",
        label=f"diagonal (W$_1$ = {w_diagonal:.2f})",
    )
    stem_spectrum(
        ax,
        (lanczos.nodes, lanczos.weights),
        log_weights=True,
        label=f"Lanczos, m = {m} (W$_1$ = {w_lanczos:.2f})",
    )
    ax.set_title(f"Spiked covariance, n = {n}", fontsize=10)
    ax.set_xlabel("")
    ax.set_ylabel("weight (stems, sum to 1)")
    hist_ax.set_xlabel(r"eigenvalue $\lambda$ / diagonal entry")
    hist_ax.set_ylabel("density (histograms, area = 1)")
    hist_ax.sharex(ax)
    for panel in (ax, hist_ax):
        panel.legend(fontsize=7, frameon=False, loc="upper right")


synthetic(grid[0, 0], grid[1, 0], 300 if args.quick else 1000, m)

# %%
# The GGN of a network (the paper's Figure 2)
# -------------------------------------------
# For a trained ``SmallCNN`` the same comparison on the generalised Gauss-Newton
# matrix: the exact diagonal (:math:`N C` vector-Jacobian products), a Monte-Carlo
# estimate of it (one sampled label per input) and the Lanczos spectrum. The diagonal
# is what diagonal preconditioners (Adam, diagonal Fisher) treat as the eigenvalues.


def network(axes: tuple[plt.Axes, plt.Axes], out: Path, quick: bool, m: int) -> None:
    """GGN of a trained SmallCNN: Lanczos against the exact and Monte-Carlo diagonals."""
    if quick:  # a smoke test: an untrained (seeded) network
        model = get_model("SmallCNN", num_classes=10, in_channels=1, input_size=8, seed=0)
    else:
        train_network(
            dir=out,
            dataset="digits",
            model="SmallCNN",
            epochs=5,
            batch_size=64,
            optimizer_kwargs={"lr": 0.05, "momentum": 0.9},
            progress=False,
        )
        model, _ = model_from_checkpoint(out / "checkpoint-00005.pt", "cpu")
    n = 64 if quick else 256  # the exact diagonal costs N * C vector-Jacobian products
    batch = next(iter(make_loader(load_dataset("digits").train_eval, n, shuffle=False)))
    loss = torch.nn.CrossEntropyLoss()
    ggn = slq(GGNOperator(model, loss, batch, bn_mode="train"), m, seed=0)
    exact = ggn_diagonal(model, loss, batch, method="exact", bn_mode="train").double().numpy()
    mc = ggn_diagonal(model, loss, batch, method="mc", seed=0, bn_mode="train").double().numpy()
    size = exact.size
    print(
        f"GGN of SmallCNN on {n} digits (P = {size}): top Ritz value {ggn.nodes[-1]:.4g}, "
        f"largest exact diagonal entry {exact.max():.4g}"
    )
    print(
        f"trace: Lanczos {ggn.trace(size):.4g}, exact diagonal {exact.sum():.4g}, "
        f"MC diagonal {mc.sum():.4g}"
    )
    plot_spectrum_comparison(
        None,
        ggn,
        {"exact": exact, "MC": mc},
        axes=axes,
        title=f"GGN of SmallCNN on {n} digits, P = {size:,}",
    )


network((grid[0, 1], grid[1, 1]), out, args.quick, m)
fig.savefig(out / "diagonal_vs_lanczos.png", dpi=150)
print(f"figure: {out / 'diagonal_vs_lanczos.png'}")
