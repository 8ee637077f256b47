"""Certified spectral densities: quadrature bounds, a confidence band and a bulk fit.
==================================================================================================

Stochastic Lanczos quadrature gives more than a picture: each probe's Gauss rule bounds
its spectral distribution function *deterministically* (Chebyshev-Markov-Stieltjes), and
the probes' spread bounds the distance to the true distribution function with a stated
confidence. On a spiked sample covariance, whose eigenvalues we can compute exactly, the
example draws the band around the truth, fits the Marchenko-Pastur law to the bulk and
lists the outliers with their predicted positions (BBP).

    python examples/certified_density.py --out results/certified_density
"""

# %%
# A matrix with a known answer
# ----------------------------
# :func:`spectral.synthetic.spiked_covariance` draws the sample covariance of ``p`` Gaussian
# samples in dimension ``n`` whose population covariance has three spikes. Its bulk follows
# the Marchenko-Pastur law with ratio :math:`q = n/p`; a spike :math:`\theta > \sqrt q`
# leaves the bulk near :math:`(1 + \theta)(1 + q/\theta)`.

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from spectral import rmt, slq
from spectral.io import atomic_write
from spectral.plot import plot_bulk_fit, plot_cdf_band
from spectral.synthetic import spiked_covariance

parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
parser.add_argument("--out", default="results/certified_density", help="output directory")
parser.add_argument("--quick", action="store_true", help="smaller matrix (smoke test)")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

n = 400 if args.quick else 2000
spikes = [4.0, 8.0, 15.0]
A = spiked_covariance(n, 4 * n, spikes, seed=0)
exact = np.linalg.eigvalsh(A)
print(f"n = {n}, q = n/p = 0.25: top eigenvalues {np.round(exact[-4:], 3).tolist()}")

# %%
# SLQ and its certified band
# --------------------------
# Four Rademacher probes of 40 Lanczos steps. For every :math:`x` the band contains the
# spectral distribution function :math:`F(x) = \#\{\lambda_j \le x\}/n` with probability
# at least 95 % (pointwise): the certified quadrature bounds of the probe average, widened
# by Chebyshev's inequality for the average of :math:`P` probes, whose variance is at most
# :math:`2F(1-F)/(nP)`.

density = slq(A, 40, num_probes=4, seed=0)
grid = np.linspace(exact.min() - 0.1, exact.max() + 0.5, 400)
low, high = density.cdf_band(grid, 0.95)
truth = np.searchsorted(exact, grid, side="right") / n
inside = np.mean((low <= truth) & (truth <= high))
print(
    f"band: mean width {np.mean(high - low):.3f}, contains the exact F at {inside:.0%} of the grid"
)

# %%
# The bulk and its outliers
# -------------------------
# :func:`spectral.rmt.fit_marchenko_pastur` fits the law by the density's first two
# moments (exact for each probe's Gauss rule), trimming points beyond the edges;
# :func:`spectral.rmt.outliers` then lists the Ritz values (of the first probe: every probe
# finds the same outliers) beyond the fitted edge by more than four Tracy-Widom edge scales
# plus the probes' own fluctuation of the edge.

fit = rmt.fit_marchenko_pastur(density)
margin = rmt.probe_margin(fit, n, density.num_probes)
first = density.probe_nodes[0][np.isfinite(density.probe_nodes[0])]
found = rmt.outliers(first, fit, n=n, margin=margin)
predicted = [rmt.bbp_covariance(theta, 0.25) for theta in spikes]
print(
    f"fitted ratio {fit.ratio:.3f}, variance {fit.variance:.3f}, edges {np.round(fit.support, 3)}"
)
print(f"outliers {np.round(found.values, 2).tolist()}, BBP predictions {np.round(predicted, 2)}")

# %%
# The figure
# ----------
# Left, the distribution function over the bulk: the SLQ estimate, its certified quadrature
# bounds (dashed), the 95 % band (shaded) and the exact one. Right, the smoothed density
# with the fitted law, its edges and the outliers (red).

fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.8), layout="constrained")
bulk = grid[grid <= fit.support[1] + 0.5]  # the band is drawn over the bulk
plot_cdf_band(density, left, grid=bulk, exact=exact)
plot_bulk_fit(density, fit, right, outliers=found)
right.set_ylim(0.0, 1.5 * float(fit.pdf(np.linspace(*fit.support, 200)).max()))
with atomic_write(out / "certified_density.png", "wb") as handle:
    fig.savefig(handle, format="png", dpi=120)
print(f"figure: {out / 'certified_density.png'}")
