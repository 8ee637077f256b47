"""SGD, Adam and stochastic Lanczos-Newton on the digits data (the paper's Figure 1, in small).
==================================================================================================

Trains the digits MLP with ``train_network`` (the paper's Table 4 calls) using

* SGD (momentum 0.9) and Adam as baselines,
* ``LancGN`` (Lanczos-Newton on the generalised Gauss-Newton) at several learning
  rates ``alpha`` with the damping tied to it, ``delta = 10 * alpha``, as in the paper,

and saves a figure of the training error (100 - running training accuracy of
each epoch, as ``train_network`` records it) against the epoch.  A constant
learning rate keeps ``delta / alpha`` fixed.

Time (``time python examples/optimisers_on_digits.py``, default settings, on 2 cores
shared with other jobs at load average ~8): 25 s of CPU time (user + sys), 58 s wall.
Run::

    python examples/optimisers_on_digits.py --out results/optimisers-digits

The longer run (more epochs and learning rates, LancHess, an SGD grid) is
``benchmarks/bench_optimisers_figure1.py``.
"""

# %%
# The runs
# --------
# Each run is one call of :func:`nets.train_network` in the form of the paper's
# Table 4: the optimiser by name and its keyword arguments as a dictionary. The
# Lanczos-Newton optimiser ``LancGN`` takes, at every step, ``lanczos_iters`` Lanczos
# steps on the GGN :math:`G` of a curvature batch and moves along
# :math:`-\alpha (G_m + \delta I)^{-1} g`, with :math:`G_m = V_m T_m V_m^\top` the
# Krylov approximation; the paper ties the damping to the learning rate,
# :math:`\delta = 10\,\alpha`.

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from nets.training import train_network
from spectral.io import atomic_write


def runs(lanczos_iters: int, lrs: list[float]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Label -> (optimiser name, optimizer_kwargs in the paper's Table 4 form)."""
    table: dict[str, tuple[str, dict[str, Any]]] = {
        "SGD lr=0.05": ("SGD", {"lr": 0.05, "momentum": 0.9, "weight_decay": 0}),
        "Adam lr=1e-3": ("Adam", {"lr": 1e-3}),
        "Adam lr=1e-2": ("Adam", {"lr": 1e-2}),
    }
    for lr in lrs:
        table[f"LancGN lr={lr:g}"] = (
            "LancGN",
            {
                "lr": lr,
                "damping": 10 * lr,
                "weight_decay": 0,
                "lanczos_iters": lanczos_iters,
                "batch_size": 128,
                "curvature_batch_size": 128,
            },
        )
    return table


# %%
# Settings
# --------
# ``--quick`` (used in this build) trains for one epoch with SGD, one Adam and two
# learning rates of LancGN; without it, four epochs and three learning rates.

parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
parser.add_argument("--out", default="results/optimisers-digits", help="output directory")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--lanczos-iters", type=int, default=5)
parser.add_argument("--lrs", type=float, nargs="+", default=[1.0, 0.1, 0.01])
parser.add_argument(
    "--quick", action="store_true", help="smoke test: one epoch, one Adam, two LancGN runs"
)
args = parser.parse_args()
out = Path(args.out)
epochs, lrs = (1, args.lrs[:2]) if args.quick else (args.epochs, args.lrs)

# %%
# Training
# --------
# The digits MLP (one hidden layer of 64 units) with a constant learning rate, so
# :math:`\delta/\alpha` stays fixed; ``train_network`` records the running training
# accuracy of each epoch.

errors: dict[str, list[float]] = {}
table = runs(args.lanczos_iters, lrs)
if args.quick:
    del table["Adam lr=1e-3"]
for label, (name, kwargs) in table.items():
    start = time.perf_counter()
    result = train_network(
        dir=out / label.replace(" ", "_").replace("=", ""),
        dataset="digits",
        model="MLP",
        model_kwargs={"hidden": (64,)},
        optimizer=name,
        optimizer_kwargs=dict(kwargs),
        epochs=epochs,
        schedule="constant",
        save_freq=None,
        progress=False,
    )
    errors[label] = [100.0 - e["train_acc"] for e in result.stats]
    per_epoch = " ".join(f"{v:5.1f}" for v in errors[label])
    seconds = time.perf_counter() - start
    print(f"{label:>18}: training error per epoch {per_epoch} %   ({seconds:.1f} s)")

# %%
# Training error against the epoch
# --------------------------------

fig, ax = plt.subplots(figsize=(6, 4))
for label, values in errors.items():
    style = "-" if label.startswith("LancGN") else "--"
    ax.plot(range(1, len(values) + 1), values, style, marker="o", label=label)
ax.set_xlabel("epoch")
ax.set_ylabel("training error (%)")
ax.set_yscale("log")
ax.set_title("digits MLP: LancGN (delta = 10 alpha), SGD, Adam", fontsize=10)
ax.xaxis.get_major_locator().set_params(integer=True)
ax.legend(fontsize=7)
fig.tight_layout()
with atomic_write(out / "training_error.png", "wb") as handle:
    fig.savefig(handle, format="png", dpi=120)
plt.close(fig)
with atomic_write(out / "training_error.json", "wb") as handle:
    handle.write(json.dumps(errors, indent=1).encode())
print(f"figure: {out / 'training_error.png'}")
