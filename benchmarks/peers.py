"""Adapters that expose the same timed quantities for this project and for each peer.

Every adapter binds a library to one model copy, loss and data layout and returns a
:class:`Bound` with

* ``hvp(v)``: Hessian-vector product, flat float32 torch vector in and out;
* ``ggn(v)``: GGN-vector product (``None`` where the library has none);
* ``lanczos(m)``: one Lanczos run of ``m`` steps with full reorthogonalisation,
  returning a :class:`LanczosTiming` (``None`` where the library has none);
* ``notes``: results that are not timings (e.g. a routine that fails).

Libraries:

* ``ours``: :class:`curvops.HessianOperator` / :class:`curvops.GGNOperator` with
  ``spectral.lanczos(..., reorth="full")``.
* ``curvlinops``: ``HessianLinearOperator`` / ``GGNLinearOperator``; curvlinops has no
  Lanczos with reorthogonalisation of its own (``papyan2020traces.fast_lanczos`` has
  none), its documented route to eigenvalues is ``scipy.sparse.linalg.eigsh`` on
  ``.to_scipy()``, i.e. ARPACK's implicitly restarted Lanczos (which reorthogonalises
  fully); we run it with ``ncv=m`` and stop it after its ``m``-th product (the
  Lanczos factorisation of length ``m`` that precedes its first restart).
* ``pyhessian``: ``hessian.density`` (SLQ with full reorthogonalisation) crashes on
  current torch at its final ``torch.eig`` call, after all its Lanczos steps; we time
  the steps up to that point and report the failure.  Hessian products through its
  ``hessian_vector_product`` (single batch: reusing the gradient graph built in its
  constructor) and ``dataloader_hv_product`` (full dataset).  No GGN.
* ``hessian-eigenthings`` (>= 1.0, on PyPI since 2026): ``HessianOperator.matvec``,
  ``GGNOperator.matvec`` and its own ``lanczos`` (full reorthogonalisation); used
  when importable, otherwise reported unavailable.

A peer that is not importable or raises is reported with its error, never skipped
silently.
"""

from __future__ import annotations

import importlib
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

Vec = torch.Tensor
Batch = tuple[torch.Tensor, torch.Tensor]

__all__ = ["LIBRARIES", "Bound", "LanczosTiming", "bind", "library_versions"]

LIBRARIES = ("ours", "ours-opt-in", "curvlinops", "pyhessian", "hessian-eigenthings")


@dataclass
class LanczosTiming:
    """One Lanczos run: wall time, number of products and the time spent inside them."""

    seconds: float
    num_products: int
    product_seconds: float | None
    method: str

    @property
    def per_step(self) -> float:
        return self.seconds / max(self.num_products, 1)

    @property
    def overhead(self) -> float | None:
        """Fraction of the run spent outside the products."""
        if self.product_seconds is None or self.seconds <= 0:
            return None
        return (self.seconds - self.product_seconds) / self.seconds


@dataclass
class Bound:
    """A library bound to one model copy, loss and data layout."""

    library: str
    hvp: Callable[[Vec], Vec] | None = None
    ggn: Callable[[Vec], Vec] | None = None
    lanczos: Callable[[int], LanczosTiming] | None = None
    notes: dict[str, str] = field(default_factory=dict)


class Unavailable(RuntimeError):
    """The library is not importable (message: the import error)."""


def describe_error(exc: BaseException) -> str:
    """``Type: message`` on one line, plus the innermost frame."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" [{tb[-1].filename.split('site-packages/')[-1]}:{tb[-1].lineno}]" if tb else ""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg[:160]}{where}"


def library_versions() -> dict[str, str]:
    """Installed versions (or the import error) of every library."""
    from importlib import metadata

    out = {"torch": torch.__version__, "numpy": np.__version__}
    for lib, dist, module in [
        ("curvlinops", "curvlinops-for-pytorch", "curvlinops"),
        ("pyhessian", "pyhessian", "pyhessian"),
        ("hessian-eigenthings", "hessian-eigenthings", "hessian_eigenthings"),
    ]:
        try:
            importlib.import_module(module)
        except Exception as exc:  # report, do not fail
            out[lib] = f"unavailable ({describe_error(exc)})"
            continue
        try:
            out[lib] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[lib] = "installed (version unknown)"
    return out


def _split(model: nn.Module, v: Vec) -> list[Vec]:
    out, i = [], 0
    for p in model.parameters():
        out.append(v[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


def _flat(tensors: Any) -> Vec:
    return torch.cat([t.reshape(-1) for t in tensors])


def _timed(fn: Callable[..., Any], acc: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        acc.append(time.perf_counter() - t0)
        return out

    return wrapper


# ---------------------------------------------------------------------------- ours
def _bind_ours(
    model: nn.Module, loss_fn: nn.Module, batches: list[Batch], *, opt_in: bool = False
) -> Bound:
    """Our operators; ``opt_in`` turns on the memory-for-speed options.

    Those are the per-batch graph caches of the Hessian and the GGN for in-memory
    lists of batches (``cache=True``; with one batch both cache by default, so the
    single-batch rows of ``ours`` and ``ours-opt-in`` run the same code).  The graphs
    are built in the untimed warm-up round.
    """
    from curvops.ggn import GGNOperator
    from curvops.hessian import HessianOperator
    from spectral.krylov import lanczos
    from spectral.operator import as_operator

    data: Any = batches[0] if len(batches) == 1 else batches
    extra: dict[str, Any] = {"cache": True} if opt_in else {}
    H = HessianOperator(model, loss_fn, data, bn_mode="eval", **extra)
    G = GGNOperator(model, loss_fn, data, bn_mode="eval", **extra)

    def run_lanczos(m: int) -> LanczosTiming:
        times: list[float] = []
        op = as_operator(_timed(H.matvec, times), size=H.shape[0], like=H.template_vector())
        t0 = time.perf_counter()
        res = lanczos(op, m, reorth="full", seed=0)
        total = time.perf_counter() - t0
        return LanczosTiming(total, res.num_iters, sum(times), "spectral.lanczos(full)")

    name = "ours-opt-in" if opt_in else "ours"
    return Bound(name, hvp=H.matvec, ggn=G.matvec, lanczos=run_lanczos)


def _bind_ours_opt_in(model: nn.Module, loss_fn: nn.Module, batches: list[Batch]) -> Bound:
    return _bind_ours(model, loss_fn, batches, opt_in=True)


# ---------------------------------------------------------------------------- curvlinops
class _StopAfter(Exception):
    """Raised by a product wrapper once ``m`` products are done."""


def _stop_after(fn: Callable[..., Any], m: int, acc: list[float]) -> Callable[..., Any]:
    """Time ``fn``; on the ``m + 1``-th call raise :class:`_StopAfter` instead."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if len(acc) >= m:
            raise _StopAfter
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        acc.append(time.perf_counter() - t0)
        return out

    return wrapper


def _arpack_run(
    scipy_matvec: Callable[[np.ndarray], np.ndarray], n: int, m: int, method: str
) -> LanczosTiming:
    """``m`` steps of ARPACK's Lanczos (``eigsh`` with ``ncv=m``), stopped at product m + 1."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    times: list[float] = []
    op = LinearOperator((n, n), matvec=_stop_after(scipy_matvec, m, times), dtype=np.float32)
    v0 = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    t0 = time.perf_counter()
    try:
        eigsh(op, k=2, ncv=m, which="LA", maxiter=2, tol=0.0, v0=v0)
    except (_StopAfter, ArpackNoConvergence):
        pass
    total = time.perf_counter() - t0
    return LanczosTiming(total, len(times), sum(times), method)


def _bind_curvlinops(model: nn.Module, loss_fn: nn.Module, batches: list[Batch]) -> Bound:
    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator
    except Exception as exc:
        raise Unavailable(describe_error(exc)) from exc
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {"check_deterministic": False, "progressbar": False}
    H = HessianLinearOperator(model, loss_fn, params, batches, **kw)
    G = GGNLinearOperator(model, loss_fn, params, batches, **kw)
    n = H.shape[0]

    def hvp(v: Vec) -> Vec:
        out: Vec = H @ v
        return out

    def ggn(v: Vec) -> Vec:
        out: Vec = G @ v
        return out

    def run_lanczos(m: int) -> LanczosTiming:
        return _arpack_run(H.to_scipy().matvec, n, m, "scipy eigsh (ARPACK) on to_scipy()")

    return Bound("curvlinops", hvp=hvp, ggn=ggn, lanczos=run_lanczos)


# ---------------------------------------------------------------------------- PyHessian
def _bind_pyhessian(model: nn.Module, loss_fn: nn.Module, batches: list[Batch]) -> Bound:
    try:
        phess = importlib.import_module("pyhessian.hessian")
    except Exception as exc:
        raise Unavailable(describe_error(exc)) from exc
    single = len(batches) == 1
    # PyHessian calls loss.backward(create_graph=True); torch warns about the
    # parameter <-> .grad reference cycle that creates (on PyHessian's own model copy).
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    if single:
        hess = phess.hessian(model, loss_fn, data=batches[0], cuda=False)
    else:
        hess = phess.hessian(model, loss_fn, dataloader=batches, cuda=False)
    notes: dict[str, str] = {}

    def hvp(v: Vec) -> Vec:
        vs = _split(model, v)
        if single:
            return _flat(phess.hessian_vector_product(hess.gradsH, hess.params, vs))
        return _flat(hess.dataloader_hv_product(vs)[1])

    def run_lanczos(m: int) -> LanczosTiming:
        times: list[float] = []
        original_single = phess.hessian_vector_product
        original_full = hess.dataloader_hv_product
        phess.hessian_vector_product = _timed(original_single, times)
        hess.dataloader_hv_product = _timed(original_full, times)
        torch.manual_seed(0)  # PyHessian draws its probe from the global RNG
        t0 = time.perf_counter()
        try:
            hess.density(iter=m, n_v=1)
            notes["density"] = "ran"
        except Exception as exc:  # the known failure on current torch is a result
            notes["density"] = f"fails after its Lanczos steps: {describe_error(exc)}"
        finally:
            total = time.perf_counter() - t0
            phess.hessian_vector_product = original_single
            hess.dataloader_hv_product = original_full
        return LanczosTiming(total, len(times), sum(times), "hessian.density (SLQ, full reorth)")

    return Bound("pyhessian", hvp=hvp, lanczos=run_lanczos, notes=notes)


# ---------------------------------------------------------------------------- hessian-eigenthings
def _bind_eigenthings(model: nn.Module, loss_fn: nn.Module, batches: list[Batch]) -> Bound:
    """hessian-eigenthings >= 1.0 (the 0.x API was removed upstream).

    ``HessianOperator`` recomputes the gradient graph of every batch in every product
    (forward + ``create_graph`` gradient + double backward) and averages batches with
    equal weights; ``GGNOperator`` from ``supervised_forward`` and the loss of the
    outputs; its own ``lanczos`` (full reorthogonalisation for ``max_iter <= 50``, here
    forced on) for ``m`` steps.
    """
    try:
        he = importlib.import_module("hessian_eigenthings")
    except Exception as exc:
        raise Unavailable(describe_error(exc)) from exc
    if not hasattr(he, "HessianOperator"):
        version = getattr(he, "__version__", "0.x")
        raise Unavailable(f"hessian-eigenthings {version}: the adapter needs the 1.x API")
    H = he.HessianOperator(model, batches, he.supervised_loss(loss_fn), full_dataset=True)
    G = he.GGNOperator(
        model,
        batches,
        he.supervised_forward,
        he.supervised_loss_of_output(loss_fn),
        full_dataset=True,
    )

    def hvp(v: Vec) -> Vec:
        out: Vec = H.matvec(v)
        return out

    def ggn(v: Vec) -> Vec:
        out: Vec = G.matvec(v)
        return out

    def run_lanczos(m: int) -> LanczosTiming:
        times: list[float] = []
        original = H.matvec
        H.matvec = _timed(original, times)
        t0 = time.perf_counter()
        try:
            he.lanczos(H, k=2, max_iter=m, reorthogonalize=True, which="LA", seed=0)
        finally:
            H.matvec = original
        total = time.perf_counter() - t0
        return LanczosTiming(total, len(times), sum(times), "hessian_eigenthings.lanczos")

    return Bound("hessian-eigenthings", hvp=hvp, ggn=ggn, lanczos=run_lanczos)


_BINDERS: dict[str, Callable[[nn.Module, nn.Module, list[Batch]], Bound]] = {
    "ours": _bind_ours,
    "ours-opt-in": _bind_ours_opt_in,
    "curvlinops": _bind_curvlinops,
    "pyhessian": _bind_pyhessian,
    "hessian-eigenthings": _bind_eigenthings,
}


def bind(library: str, model: nn.Module, loss_fn: nn.Module, batches: list[Batch]) -> Bound:
    """Bind ``library`` to a model copy (it may change the copy: PyHessian calls ``.eval()``).

    Raises
    ------
    Unavailable
        The library is not importable.
    Exception
        Whatever the library raises while setting up.
    """
    return _BINDERS[library](model, loss_fn, batches)
