"""K-FAC, E-KFAC, diagonals and low rank graded against the exact GGN of a CNN.
==================================================================================================

Curvature proxies are operators too, so they can be measured against the matrix they
approximate in every way the exact curvature can be studied: spectra, top eigenpairs,
quadratic forms, traces, log-determinants and damped Newton steps.
:func:`nets.workflow.compare_curvatures` builds the exact GGN of a small BatchNorm CNN on
the digits data and each named proxy, and grades them all against one measurement of the
exact side (:func:`curvops.compare_all`).

    python examples/approximations_versus_exact.py --out results/approximations
"""

# %%
# The network and the proxies
# ---------------------------
# An untrained, seeded ``SmallCNN`` in float64 and one batch of digits. The proxies, by
# name: K-FAC (:class:`curvops.KFACOperator`, one Kronecker block :math:`G \otimes A` per
# layer), E-KFAC (K-FAC's eigenbasis with eigenvalues refitted to the exact curvature),
# the exact GGN diagonal and its Monte-Carlo estimate, and the rank-10 approximation from
# the converged top eigenpairs.

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import torch

from nets import get_model, load_dataset, make_loader
from nets.workflow import compare_curvatures

parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
parser.add_argument("--out", default="results/approximations", help="output directory")
parser.add_argument("--quick", action="store_true", help="fewer samples (smoke test)")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

n = 64 if args.quick else 256
model = get_model("SmallCNN", 10, 1, 8, widths=(4, 8), seed=0).double()
inputs, targets = next(iter(make_loader(load_dataset("digits").train_eval, n, shuffle=False)))
batch = (inputs.double(), targets)
names = ("kfac", "ekfac", "diag-ggn", "diag-mc", "low-rank-10")

# %%
# One call grades them all
# ------------------------
# Each side's spectrum is exact where its structure gives it (K-FAC's eigenvalues are the
# products :math:`\lambda_{G,i}\lambda_{A,j}` of its factors' eigenvalues; a diagonal's are
# its entries) and estimated by stochastic Lanczos quadrature otherwise. The damped Newton
# step :math:`(A + \delta I)^{-1} g` uses each proxy's structured inverse and CG on the
# exact side. The figure, written by the same call, overlays the spectral distribution
# functions of the exact GGN and of every proxy.

reports = compare_curvatures(
    model,
    torch.nn.CrossEntropyLoss(),
    batch,
    approximations=names,
    k=5,
    num_iters=40 if args.quick else 80,
    seed=0,
    save_path=out / "reports.npz",
    figure_path=out / "approximations.png",
)

# %%
# The grades
# ----------
# :math:`W_1` between the spectral densities, the relative error of the largest eigenvalue,
# the largest principal angle between the top-5 eigenspaces (radians), the relative error
# of quadratic forms on random directions (median) and of the damped Newton step.

print(f"{'proxy':>12} {'W1':>8} {'top eig':>8} {'angle':>7} {'v^T A v':>8} {'Newton':>8}")
for name, report in reports.items():
    print(
        f"{name:>12} {report.wasserstein:8.3g} {report.top_eigenvalue_errors[0]:8.2g} "
        f"{np.max(report.principal_angles):7.2f} {np.median(report.quadratic_form_errors):8.2g} "
        f"{report.newton_step_error:8.2g}"
    )
print(f"figure: {out / 'approximations.png'}")
