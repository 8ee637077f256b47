"""The paper's pipeline in Python on the embedded digits data (a few minutes on a CPU).
==================================================================================================

Train a small BatchNorm CNN, compute the Lanczos spectrum of its Hessian at the
last checkpoint, plot it, and look at the loss along the top Ritz vectors:
the calls of the paper's Tables 1-3 with ``from nets import *``.

Time (``time python examples/quickstart_pipeline.py``, default settings,
on 2 cores shared with other jobs at load average ~7-9):
167 s of CPU time (user + sys), 1071 s wall.

    python examples/quickstart_pipeline.py --out results/quickstart
"""

# %%
# Settings
# --------
# The calls below are those of the paper's Tables 1-3, with ``from nets import *`` in
# place of ``from core import *``. Everything lands in ``--out``; ``--quick`` (used in
# this build) trains one epoch and runs 10 Lanczos steps.

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from nets import (
    build_loss_landscape,
    compute_eigenspectrum,
    plot_loss_landscape,
    plot_spectrum,
    plot_training,
    train_network,
)
from spectral.io import load_npz

parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
parser.add_argument("--out", default="results/quickstart", help="output directory")
parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
args = parser.parse_args()
out = Path(args.out)
epochs = 1 if args.quick else 5

# %%
# Training (Table 1)
# ------------------
# A small BatchNorm CNN on the digits data, SGD with momentum and weight decay; one
# checkpoint per epoch (``checkpoint-XXXXX.pt``, loadable with
# ``torch.load(weights_only=True)``) and ``stats.json`` with losses and accuracies.

train_network(
    dir=out,
    dataset="digits",
    model="SmallCNN",
    epochs=epochs,
    optimizer="SGD",
    optimizer_kwargs={"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    batch_size=64,
    progress=False,
)
plot_training(out, save_path=out / "training.png")

# %%
# The Hessian spectrum at the last checkpoint (Table 1)
# -----------------------------------------------------
# :func:`nets.compute_eigenspectrum` runs Lanczos on the Hessian of the mean training
# loss over the whole training set. The Ritz values :math:`\theta_i` and weights
# :math:`w_i` form the quadrature rule :math:`\sum_i w_i \delta_{\theta_i}` of the
# spectral density; :math:`P \sum_i w_i \theta_i` estimates the trace. With
# ``save_eigvec=True`` the Ritz vectors are saved beside the spectrum for the loss
# landscape.

checkpoint = out / f"checkpoint-{epochs:05d}.pt"
spectrum_path = out / "spectra" / f"spectrum-{epochs:05d}-hessian-lanczos"
result = compute_eigenspectrum(
    dataset="digits",
    model="SmallCNN",
    checkpoint_path=checkpoint,
    save_spectrum_path=spectrum_path,
    save_eigvec=True,
    lanczos_iters=10 if args.quick else 40,
    curvature_matrix="hessian-lanczos",
)
print(
    f"P = {result.num_params}, top Ritz value = {result.values.max():.4g}, "
    f"trace estimate = {result.trace:.4g} +- {result.trace_stderr:.2g}"
)

# %%
# The stem plot (Table 2)
# -----------------------

plot_spectrum(
    "lanczos", path=f"{spectrum_path}.npz", log_weights=True, save_path=out / "spectrum.png"
)

# %%
# The loss along the top Ritz vectors (Table 3)
# ---------------------------------------------
# The training loss at :math:`\theta + t\,u` for :math:`t \in [-1, 1]` along the two
# top Ritz vectors :math:`u` and a random unit direction: the sharp directions of the
# Hessian are the steep ones.

build_loss_landscape(
    dataset="digits",
    model="SmallCNN",
    dist=1.0,
    n_points=5 if args.quick else 21,
    spectrum_path=spectrum_path,
    checkpoint_path=checkpoint,
    save_path=out / "landscape.npz",
    random_directions=1,
)
plot_loss_landscape(out / "landscape.npz", save_path=out / "landscape.png")
landscape = load_npz(out / "landscape.npz")
for name, curve in zip(landscape["direction_names"], landscape["train_loss"]):
    print(
        f"{name:>14}: train loss {curve[0]:.3f} (t=-1)  {curve[len(curve) // 2]:.3f} "
        f"(t=0)  {curve[-1]:.3f} (t=+1)"
    )
print(f"figures and files in {out}/")
