"""Grade curvature proxies against the exact GGN/Hessian of a model: ``compare_curvatures``.

Builds the exact operator and each proxy named in ``approximations`` (the vocabulary
of :func:`curvops.proxies.make_proxy`: ``kfac``, ``ekfac``, ``diag-ggn``, ``diag-mc``,
``low-rank-20``, ...), grades them all against one measurement of the exact side
(:func:`curvops.compare_all`), and optionally writes the reports to an ``.npz``
(keys ``<name>/<field>``, loadable with ``allow_pickle=False``) and the overlay of
all spectra in one unit (:func:`nets.plots.approximations.plot_approximations`).
The model is never changed and the global random states are left as they were.

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
>>> net = net.double()
>>> x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
>>> data = (x, torch.arange(16) % 2)
>>> reports = compare_curvatures(net, torch.nn.CrossEntropyLoss(), data,
...                              approximations=("kfac", "diag-ggn"), k=2, num_iters=10)
>>> sorted(reports), reports["kfac"].spectrum_approximation
(['diag-ggn', 'kfac'], 'exact')
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from curvops import GGNOperator, HessianOperator, LowRank, ggn_diagonal
from curvops.comparison import ApproximationReport, compare_all
from curvops.proxies import make_proxies
from curvops.structured import Diagonal
from nets.workflow._resolve import preserve_global_state
from spectral.errors import argument_error
from spectral.io import save_npz

__all__ = ["compare_curvatures", "save_reports"]

_EXACT = {"ggn": GGNOperator, "hessian": HessianOperator}


def save_reports(
    path: str | os.PathLike[str],
    reports: dict[str, ApproximationReport],
    *,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Write reports to one ``.npz`` with keys ``<name>/<field>`` (atomic, no pickles).

    ``config`` (the settings that produced them) is stored as JSON under ``config_json``.
    """
    arrays: dict[str, np.ndarray] = {"names": np.array(list(reports))}
    if config is not None:
        arrays["config_json"] = np.array(json.dumps(dict(config), sort_keys=True, default=str))
    for name, report in reports.items():
        for key, value in report.as_arrays().items():
            arrays[f"{name}/{key}"] = value
    save_npz(path, **arrays)


#: The keys of a report file's ``config_json`` that :func:`compare_curvatures` writes itself.
_SETTINGS = frozenset(
    {
        "function", "approximations", "exact", "bn_mode", "k", "num_iters", "num_probes",
        "damping", "solve_tol", "seed", "loss", "params",
    }
)  # fmt: skip


def _shown(params: Any) -> Any:
    """``params`` as a file records it: names as they are, anything else by its ``repr``."""
    return params if params is None or isinstance(params, list | tuple) else repr(params)


def compare_curvatures(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    approximations: Sequence[str] = ("kfac", "ekfac", "diag-ggn", "diag-mc", "low-rank-20"),
    exact: str = "ggn",
    params: Any = None,
    bn_mode: str | None = "eval",
    k: int = 10,
    num_iters: int = 50,
    num_probes: int = 1,
    damping: float | None = None,
    solve_tol: float | None = None,
    seed: int = 0,
    save_path: str | os.PathLike[str] | None = None,
    figure_path: str | os.PathLike[str] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, ApproximationReport]:
    """Compare each named proxy with the exact ``"ggn"`` or ``"hessian"`` of ``model``.

    Parameters
    ----------
    model, loss_fn, data:
        The network (never changed), a mean-reduced loss and the data (one batch, a
        sequence of batches or a DataLoader).
    approximations:
        Proxy names (see :func:`curvops.proxies.make_proxy`).
    exact:
        ``"ggn"`` (default) or ``"hessian"``.
    params, bn_mode:
        As for the operators.
    k, num_iters, num_probes, damping, seed:
        As for :func:`curvops.compare`.
    solve_tol:
        Relative-residual tolerance of the Newton-step solves, as for
        :func:`curvops.compare`; ``None`` (default): :math:`\\sqrt\\varepsilon` of each
        operator's dtype (:func:`curvops.comparison.default_solve_tol`), which a float32
        model's Hessian reaches where a fixed ``1e-8`` could not.
    save_path, figure_path:
        Where to write the reports (``.npz``, with these settings as ``config_json``)
        and the spectra figure (png/pdf).
    provenance:
        Where ``model`` and ``data`` come from (e.g. ``checkpoint``, ``model``,
        ``dataset``, ``subsample``, ``batch_size``: what the command line knows), stored in
        ``config_json`` beside the settings; a key that is also a setting is refused.

    Raises
    ------
    ValueError
        Unknown ``exact`` or proxy names, and the errors of :func:`curvops.compare_all`.
    """
    if exact not in _EXACT:
        raise argument_error("exact", "'ggn' or 'hessian'", exact)
    clash = sorted(set(provenance or {}) & _SETTINGS)
    if clash:
        raise argument_error("provenance", "keys other than the settings' names", clash)
    if isinstance(approximations, str) or not approximations:
        raise argument_error(
            "approximations", "a non-empty sequence of proxy names", approximations
        )
    with preserve_global_state():
        A = _EXACT[exact](model, loss_fn, data, params=params, bn_mode=bn_mode)
        proxies = make_proxies(
            approximations, model, loss_fn, data, exact=A, params=params, bn_mode=bn_mode, seed=seed
        )
        # a low-rank proxy was built from the exact operator's converged top eigenpairs
        # (tolerance 1e-8): they are the exact side's top-k too, no second eigensolve
        ranked = [op for op in proxies.values() if isinstance(op, LowRank) and op.rank >= k]
        exact_pairs = (ranked[0].weights, ranked[0].factor) if ranked else None
        # the GGN's trace is known exactly: the sum of its diagonal (about C backward
        # passes), already computed when the exact-diagonal proxy is among the proxies
        trace = None
        if exact == "ggn":
            known = proxies.get("diag-ggn")
            diagonal = (
                known.diagonal
                if isinstance(known, Diagonal)
                else ggn_diagonal(model, loss_fn, data, params=params, bn_mode=bn_mode)
            )
            trace = float(diagonal.sum())
        reports = compare_all(
            proxies,
            A,
            k=k,
            num_iters=num_iters,
            num_probes=num_probes,
            damping=damping,
            solve_tol=solve_tol,
            seed=seed,
            exact_pairs=exact_pairs,
            exact_trace=trace,
        )
    if save_path is not None:
        settings = {
            "approximations": list(approximations), "exact": exact, "bn_mode": bn_mode, "k": k,
            "num_iters": num_iters, "num_probes": num_probes, "damping": damping,
            "solve_tol": solve_tol, "seed": seed, "loss": type(loss_fn).__name__,
            "params": _shown(params),
        }  # fmt: skip
        config = {"function": "compare_curvatures", **settings, **(provenance or {})}
        save_reports(save_path, reports, config=config)
    if figure_path is not None:
        from nets.plots._figure import close_figure
        from nets.plots.approximations import plot_approximations

        label = {"ggn": "Lanc-GGN", "hessian": "Lanc-Hess"}[exact]
        fig = plot_approximations(reports, exact_label=label, save_path=figure_path)
        close_figure(fig)
    return reports
