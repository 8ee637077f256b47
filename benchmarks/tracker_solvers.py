"""Which warm-started eigensolver spends the fewest products on the tracker's benchmark run?

Replays the measurements of ``bench_tracker.py`` (SmallCNN on digits, SGD lr 0.05,
momentum 0.9, batch 64, top-3 every 50 steps, tol 1e-4) on the dense Hessians: the
float32 Hessian of the measurement batch at every measurement step is formed column by
column (``HessianOperator.matmat`` of identity blocks), symmetrised and stored in
float64, and each solver is run on the sequence cold (random start) and warm (started
from its own previous vectors), counting products exactly:

* ``spectral.blockeig.block_eigenpairs`` with ``guard`` in {0, 1} and ``keep`` in {3, 6, 9}
  (the tracker uses guard 1, keep 6);
* ``davidson``: the same Rayleigh-Ritz loop as ``block_eigenpairs`` written out here,
  expanding only the ``expand`` in {1, 2, 3} residuals with the largest ratio
  residual / threshold per block (``block_eigenpairs`` expands all unconverged ones);
* SciPy's LOBPCG (block 3 or 4; the warm start is the previous vectors plus random
  columns), absolute residual tolerance ``tol * theta_3``.

It also prints the drift: the relative residual of the previous top-3 eigenvectors
under the next Hessian.  About 4 minutes of CPU with the dense Hessians cached
(``--cache``), plus about 2 minutes to form them.

Usage::

    python benchmarks/tracker_solvers.py [--epochs 20] [--cache hessians.npy]
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, lobpcg

from curvops import HessianOperator
from nets import get_model, load_dataset, make_loader
from spectral.blockeig import block_eigenpairs

K, TOL, EPS32 = 3, 1e-4, 2.0**-23


def dense_hessians(epochs: int, every: int, seed: int = 0) -> np.ndarray:
    """The measurement-batch Hessians (float64 copies of float32 products) every ``every`` steps."""
    torch.manual_seed(seed)
    splits = load_dataset("digits", seed=seed)
    loader = make_loader(splits.train, 64, shuffle=True, seed=seed)
    model = get_model("SmallCNN", num_classes=10, in_channels=1, input_size=8)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    batch = next(iter(make_loader(splits.train_eval, 64, shuffle=False)))
    op = HessianOperator(model, loss_fn, batch)
    n = op.shape[0]
    eye = torch.eye(n)
    found, steps = [], 0
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            steps += 1
            if steps % every == 0:
                cols = [op.matmat(eye[:, i : i + 256]).numpy() for i in range(0, n, 256)]
                H = np.concatenate(cols, axis=1).astype(np.float64)
                found.append(0.5 * (H + H.T))
    return np.stack(found)


def _orthonormal(V: np.ndarray, X: np.ndarray) -> np.ndarray:
    rows: list[np.ndarray] = []
    for x in X:
        x = x / np.linalg.norm(x)
        for _ in range(2):
            B = np.vstack([V, *rows]) if rows else V
            x = x - (B @ x) @ B
        norm = np.linalg.norm(x)
        if norm > 1e-6:
            rows.append(x / norm)
    return np.array(rows).reshape(-1, V.shape[1])


def davidson(
    H: np.ndarray, start: Any, rng: np.random.Generator, *, guard: int, expand: int, keep: int
) -> tuple[int, np.ndarray]:
    """Rayleigh-Ritz on a growing basis; expands the ``expand`` worst residuals per block."""
    n = H.shape[0]
    first = [] if start is None else list(start.T)
    first += [
        rng.standard_normal(n) for _ in range(K + guard - len(first) if start is None else guard)
    ]
    V, W = np.zeros((0, n)), np.zeros((0, n))
    block, products, anorm = _orthonormal(V, np.array(first)), 0, 0.0
    for _ in range(500):
        if len(block) == 0:
            block = _orthonormal(V, rng.standard_normal((1, n)))
        products += len(block)
        V, W = np.vstack([V, block]), np.vstack([W, block @ H])
        theta, S = np.linalg.eigh(0.5 * (V @ W.T + W @ V.T))
        order = np.argsort(-theta)
        anorm = max(anorm, float(np.max(np.abs(theta))))
        Sa = S[:, order[:K]].T
        R = Sa @ W - theta[order[:K]][:, None] * (Sa @ V)
        ratio = np.linalg.norm(R, axis=1) / np.maximum(
            TOL * np.abs(theta[order[:K]]), 100 * EPS32 * anorm
        )
        if np.all(ratio <= 1):
            return products, (S[:, order[:keep]].T @ V).T
        worst = [i for i in np.argsort(-ratio) if ratio[i] > 1][:expand]
        if len(V) + len(worst) > 40:
            Sk = S[:, order[:20]].T
            V, W = Sk @ V, Sk @ W
        block = _orthonormal(V, R[worst])
    raise RuntimeError("davidson: no convergence")


def blockeig(H: np.ndarray, start: Any, rng: np.random.Generator, *, guard: int, keep: int) -> Any:
    found = block_eigenpairs(H, K, start=start, tol=TOL, guard=guard, keep=keep, seed=rng)
    return found.products, found.subspace


def scipy_lobpcg(H: np.ndarray, start: Any, rng: np.random.Generator, *, block: int) -> Any:
    n, count = H.shape[0], [0]

    def product(V: np.ndarray) -> np.ndarray:
        V = V.reshape(n, -1)
        count[0] += V.shape[1]
        return H @ V

    X = rng.standard_normal((n, block))
    if start is not None:
        X[:, :K] = start[:, :K]
    threshold = TOL * np.sort(np.linalg.eigvalsh(H))[-K]  # reference only for the stopping rule
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values, vectors = lobpcg(
            LinearOperator((n, n), matvec=product, matmat=product, dtype=np.float64),
            X, largest=True, tol=threshold, maxiter=500,
        )  # fmt: skip
    return count[0], vectors[:, np.argsort(-values)[:K]]


def replay(
    Hs: np.ndarray, solver: Callable[..., Any], **options: Any
) -> tuple[list[int], list[int]]:
    warm, cold, previous = [], [], None
    for t, H in enumerate(Hs):
        cold.append(solver(H, None, np.random.default_rng(t), **options)[0])
        products, previous = solver(H, previous, np.random.default_rng(t), **options)
        warm.append(products)
    return warm, cold


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--cache", default=None, help="load/save the dense Hessians here (.npy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.cache and os.path.exists(args.cache):
        Hs = np.load(args.cache)
    else:
        Hs = dense_hessians(args.epochs, args.every)
        if args.cache:
            np.save(args.cache, Hs)
    tops = [np.linalg.eigh(H)[1][:, -K:] for H in Hs]
    for t in range(1, len(Hs)):
        U, H = tops[t - 1], Hs[t]
        HU = H @ U
        theta = np.sum(U * HU, axis=0)
        drift = np.linalg.norm(HU - U * theta, axis=0) / np.abs(theta)
        print(f"drift {t}: {np.round(drift[::-1], 3).tolist()}")
    variants: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
        *[
            (f"block_eigenpairs guard={g} keep={k}", blockeig, {"guard": g, "keep": k})
            for g in (1, 0)
            for k in (6, 3, 9)
        ],
        *[
            (
                f"davidson guard={g} expand={e} keep={k}",
                davidson,
                {"guard": g, "expand": e, "keep": k},
            )
            for g in (1, 0)
            for e in (1, 2, 3)
            for k in (3, 6)
        ],
        *[(f"lobpcg block={b}", scipy_lobpcg, {"block": b}) for b in (3, 4)],
    ]
    for name, solver, options in variants:
        warm, cold = replay(Hs, solver, **options)
        ratio = sum(warm[1:]) / sum(cold[1:])
        print(f"{name:40s} warm {warm} cold {cold} warm/cold {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main()
