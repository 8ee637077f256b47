"""The paper's pipeline in Python on the embedded digits data (a few minutes on a CPU).

Train a small BatchNorm CNN, compute the Lanczos spectrum of its Hessian at the
last checkpoint, plot it, and look at the loss along the top Ritz vectors:
the calls of the paper's Tables 1-3 with ``from nets import *``.

Time (``time python examples/quickstart_pipeline.py``, default settings,
on 2 cores shared with other jobs at load average ~7-9):
167 s of CPU time (user + sys), 1071 s wall.

    python examples/quickstart_pipeline.py --out results/quickstart
"""

from __future__ import annotations

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/quickstart", help="output directory")
    parser.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    args = parser.parse_args()
    out = Path(args.out)
    epochs = 1 if args.quick else 5

    # Table 1: training (checkpoints and stats.json land in `out`)
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

    # Table 1: the Hessian spectrum at the last checkpoint, with its Ritz vectors
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

    # Table 2: the stem plot
    plot_spectrum(
        "lanczos", path=f"{spectrum_path}.npz", log_weights=True, save_path=out / "spectrum.png"
    )

    # Table 3: the loss along the two top Ritz vectors and a random direction
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


if __name__ == "__main__":
    main()
