"""Curvature during training: the top Hessian eigenvalues of an MLP under SGD, step by step.
==================================================================================================

:class:`nets.CurvatureTracker` measures the largest eigenvalues of the Hessian of a fixed
measurement set every few optimiser steps, inside an ordinary training loop, without
changing the run: parameters, buffers, gradients and every random stream are as they
would have been without it. For gradient descent with learning rate :math:`\\eta` on a
quadratic, a direction is stable while its curvature stays below :math:`2/\\eta`; the
figure shows where the sharpest direction goes during training relative to that line.

    python examples/tracking_curvature.py --out results/tracking
"""

# %%
# The run
# -------
# A small MLP on the digits data, plain SGD on minibatches of 64. The tracker gets its own
# measurement set: the first 256 training images, fixed for the whole run.

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import torch

from nets import CurvatureTracker, get_model, load_dataset, make_loader
from spectral.io import atomic_write

parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
parser.add_argument("--out", default="results/tracking", help="output directory")
parser.add_argument("--quick", action="store_true", help="one epoch (smoke test)")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

data = load_dataset("digits")
model = get_model("MLP", 10, 1, 8, hidden=(32,), seed=0)
loss_fn = torch.nn.CrossEntropyLoss()
lr = 0.5
optimizer = torch.optim.SGD(model.parameters(), lr=lr)
measure = next(iter(make_loader(data.train_eval, 256, shuffle=False)))
epochs, every = (1, 4) if args.quick else (6, 8)

# %%
# Tracking inside the loop
# ------------------------
# ``tracker.step()`` counts optimiser steps and measures on every ``every``-th: the top two
# eigenvalues by a block eigen-solve with relative residual ``tol``, warm-started from the
# previous measurement's Ritz vectors, so later measurements cost fewer products. Each
# measurement is a row (also written to ``curvature.jsonl`` as one JSON line).

tracker = CurvatureTracker(
    model,
    loss_fn,
    measure,
    every=every,
    top_k=2,
    optimizer=optimizer,
    path=out / "curvature.jsonl",
    seed=0,
)
loader = make_loader(data.train, 64, shuffle=True, seed=0)
for epoch in range(epochs):
    for inputs, targets in loader:
        optimizer.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        tracker.step(epoch=epoch, loss=loss.item())

rows = tracker.rows
steps = [row["step"] for row in rows]
ranked = [sorted(row["top_eigenvalues"], reverse=True) for row in rows]
top = [values[0] for values in ranked]
print(f"{len(rows)} measurements over {steps[-1]} steps; 2/lr = {2 / lr:g}")
print(f"top eigenvalue: first {top[0]:.3f}, largest {max(top):.3f}, last {top[-1]:.3f}")
cold, warm = rows[0]["products"], [row["products"] for row in rows[1:] if row["warm"]]
if warm:
    print(f"products per measurement: cold start {cold}, warm starts {min(warm)}-{max(warm)}")

# %%
# The figure
# ----------
# The two largest eigenvalues against the optimiser step, with the stability threshold
# :math:`2/\eta` of gradient descent.

fig, ax = plt.subplots(figsize=(6.0, 3.6), layout="constrained")
for k, label in ((0, r"$\lambda_1$"), (1, r"$\lambda_2$")):
    ax.plot(steps, [values[k] for values in ranked], marker="o", ms=3, label=label)
ax.axhline(2 / lr, color="0.4", linestyle="--", label=r"$2/\eta$")
ax.set_xlabel("optimiser step")
ax.set_ylabel("Hessian eigenvalue")
ax.set_title(f"MLP on digits, SGD with lr {lr:g}", fontsize=10)
ax.legend(fontsize=8)
with atomic_write(out / "tracking_curvature.png", "wb") as handle:
    fig.savefig(handle, format="png", dpi=120)
with atomic_write(out / "summary.json", "w") as handle:
    handle.write(json.dumps({"steps": steps, "top": top}))
print(f"figure: {out / 'tracking_curvature.png'}")
