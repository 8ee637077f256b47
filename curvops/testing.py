"""Dense float64 references and the operator contract every curvops operator passes.

The references are computed independently of :mod:`curvops.products`: with
``torch.autograd.functional.hessian`` of the loss as a function of the flat
parameter vector (``torch.func.hessian`` and ``jacrev(jacrev)`` return wrong second
derivatives through BatchNorm in training mode in torch 2.13), and with Jacobians
built row by row with ``torch.autograd.functional.jacobian`` (one plain backward
pass per output entry) for the GGN and Fisher -- never through ``vmap``, whose
batching rules PyTorch does not always get right (``jacrev`` through ``torch.cdist``
gave a GGN 100 % off in torch 2.13) -- on a float64 copy of the model (the original
is never touched).  Batches are
weighted exactly as the operators do, :math:`A = \\sum_b w_b A_b / \\sum_b w_b` with the
loss's own weights (:func:`curvops.losses.batch_weight`; :math:`A = \\sum_b A_b` for
``reduction="sum"``).
They cost :math:`O(P)` products and :math:`O(P^2)` memory: for tests on tiny models.

>>> import torch
>>> net = torch.nn.Linear(2, 1).double()
>>> x, y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
>>> H = dense_hessian(net, torch.nn.MSELoss(), (x, y))
>>> bool(torch.allclose(H, dense_ggn(net, torch.nn.MSELoss(), (x, y))))   # linear model
True
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from curvops._model_state import (
    check_bn_mode,
    curvature_mode,
    functional_forward,
    model_state,
    state_differences,
)
from curvops.data import as_data, move_to
from curvops.inert_hooks import evaluate_loss
from curvops.losses import (
    LossFn,
    batch_generator,
    batch_weight,
    check_loss,
    fisher_scale,
    loss_reduction,
    per_sample_nll_values,
    sample_targets,
)
from curvops.params import select_params
from spectral.errors import argument_error

__all__ = [
    "check_model_contract",
    "check_operator_contract",
    "dense_fisher",
    "dense_ggn",
    "dense_hessian",
    "model_state",
    "state_differences",
]

_BatchFn = Callable[
    [Callable[[torch.Tensor], torch.Tensor], torch.Tensor, Any, torch.Tensor, int], torch.Tensor
]


def _dense(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    params: Any,
    bn_mode: str | None,
    per_batch: _BatchFn,
) -> torch.Tensor:
    check_loss(loss_fn)
    check_bn_mode(bn_mode)
    names = [n for n, _ in select_params(model, params)]
    model64 = copy.deepcopy(model).to(torch.float64)
    by_name = dict(model64.named_parameters())
    w0 = torch.cat([by_name[n].detach().reshape(-1) for n in names])
    shapes = [by_name[n].shape for n in names]
    device = w0.device

    def split(w: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for s in shapes:
            out.append(w[start : start + s.numel()].reshape(s))
            start += s.numel()
        return out

    stream = as_data(data)
    total = torch.zeros(w0.numel(), w0.numel(), dtype=torch.float64, device=device)
    count = 0.0
    with curvature_mode(model64, bn_mode):
        for batch in stream:
            inputs = move_to(batch.inputs, device, torch.float64)
            targets = move_to(batch.targets, device, torch.float64)

            def forward(w: torch.Tensor, inputs: Any = inputs) -> torch.Tensor:
                return functional_forward(model64, names, split(w), inputs)

            w = batch_weight(loss_fn, batch.inputs, batch.targets, batch.size)
            if w == 0:
                continue
            total += w * per_batch(forward, w0, loss_fn, targets, batch.index)
            count += w
    return total if loss_reduction(loss_fn) == "sum" else total / count


def _rows_jacobian(fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """The Jacobian of ``fn`` at ``w`` (``(*fn(w).shape, w.numel())``), one plain backward
    pass per output entry (``torch.autograd.functional.jacobian`` without ``vectorize``:
    no ``vmap`` batching rule is involved)."""
    return torch.autograd.functional.jacobian(fn, w, vectorize=False)


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    params: Any = None,
    bn_mode: str | None = None,
) -> torch.Tensor:
    """Dense float64 Hessian :math:`\\frac{1}{N}\\sum_b N_b \\nabla^2_w L_b` (``P x P`` tensor).

    Parameters
    ----------
    model : torch.nn.Module
        A small model.
    loss_fn : callable
        The loss (mean reduction).
    data : batch, sequence of batches or DataLoader
        As for the operators.
    params : optional
        Parameter selection.
    bn_mode : str, optional
        ``"train"``, ``"eval"`` or ``None``.

    Returns
    -------
    torch.Tensor
        The ``P x P`` float64 Hessian.

    Examples
    --------
    >>> import torch
    >>> from curvops import HessianOperator
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).double()
    >>> data = (torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64))
    >>> H = dense_hessian(net, torch.nn.MSELoss(), data)
    >>> v = torch.randn(H.shape[0], dtype=torch.float64)
    >>> bool(torch.allclose(HessianOperator(net, torch.nn.MSELoss(), data) @ v, H @ v))
    True
    """

    def per_batch(
        forward: Callable[[torch.Tensor], torch.Tensor],
        w0: torch.Tensor,
        loss_fn: LossFn,
        targets: torch.Tensor,
        index: int,
    ) -> torch.Tensor:
        # torch.autograd.functional.hessian (row by row): torch.func.hessian and
        # jacrev(jacrev) give wrong second derivatives through BatchNorm in training
        # mode (torch 2.13; first derivatives are right).
        H = torch.autograd.functional.hessian(
            lambda w: evaluate_loss(loss_fn, forward(w), targets), w0
        )
        return H

    return _dense(model, loss_fn, data, params, bn_mode, per_batch)


def dense_ggn(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    params: Any = None,
    bn_mode: str | None = None,
) -> torch.Tensor:
    """Dense float64 GGN :math:`\\frac{1}{N}\\sum_b N_b J_b^\\top \\nabla^2_f L_b J_b`.

    Parameters
    ----------
    model : torch.nn.Module
        A small model.
    loss_fn : callable
        The loss (mean reduction).
    data : batch, sequence of batches or DataLoader
        As for the operators.
    params : optional
        Parameter selection.
    bn_mode : str, optional
        ``"train"``, ``"eval"`` or ``None``.

    Returns
    -------
    torch.Tensor
        The ``P x P`` float64 GGN.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(2, 1).double()
    >>> x = torch.randn(6, 2, dtype=torch.float64)
    >>> G = dense_ggn(net, torch.nn.MSELoss(), (x, torch.zeros(6, 1, dtype=torch.float64)))
    >>> X = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)  # weights, then bias
    >>> bool(torch.allclose(G, 2 * X.T @ X / 6))
    True
    """

    def per_batch(
        forward: Callable[[torch.Tensor], torch.Tensor],
        w0: torch.Tensor,
        loss_fn: LossFn,
        targets: torch.Tensor,
        index: int,
    ) -> torch.Tensor:
        out = forward(w0).detach()
        J = _rows_jacobian(forward, w0).reshape(out.numel(), -1)
        HL = torch.autograd.functional.hessian(lambda o: evaluate_loss(loss_fn, o, targets), out)
        HL = HL.reshape(out.numel(), out.numel())
        return J.T @ HL @ J

    return _dense(model, loss_fn, data, params, bn_mode, per_batch)


def dense_fisher(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    kind: str = "mc",
    mc_samples: int = 1,
    seed: int = 0,
    params: Any = None,
    bn_mode: str | None = None,
) -> torch.Tensor:
    """Dense float64 Fisher :math:`\\frac{1}{\\nu_b M}\\sum_{n,m} g_{nm} g_{nm}^\\top` per batch.

    Here :math:`g_{nm} = \\nabla_w \\mathrm{NLL}(f_n, \\tilde y_{nm})`.

    Per-sample gradients are rows of the Jacobian of the vector of per-sample NLLs
    (one plain backward pass per row, no ``vmap``), at
    the targets sampled exactly as :class:`curvops.FisherOperator` samples them
    (``kind="mc"``) or at the true targets (``kind="empirical"``, ``M = 1``).

    Parameters
    ----------
    model : torch.nn.Module
        A small model.
    loss_fn : callable
        The loss (mean reduction).
    data : batch, sequence of batches or DataLoader
        As for the operators.
    kind : str
        ``"mc"`` or ``"empirical"``.
    mc_samples : int
        Targets sampled per input (``kind="mc"``).
    seed : int
        Seed of the sampled targets (as :class:`curvops.FisherOperator` uses it).
    params : optional
        Parameter selection.
    bn_mode : str, optional
        ``"train"``, ``"eval"`` or ``None``.

    Returns
    -------
    torch.Tensor
        The ``P x P`` float64 Fisher.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(2, 3).double()
    >>> data = (torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    >>> F = dense_fisher(net, torch.nn.CrossEntropyLoss(), data, kind="empirical")
    >>> F.shape, bool(torch.allclose(F, F.T))
    (torch.Size([9, 9]), True)
    """
    if kind not in ("mc", "empirical"):
        raise argument_error("kind", "'mc' or 'empirical'", kind)

    def per_batch(
        forward: Callable[[torch.Tensor], torch.Tensor],
        w0: torch.Tensor,
        loss_fn: LossFn,
        targets: torch.Tensor,
        index: int,
    ) -> torch.Tensor:
        out = forward(w0).detach()
        c = fisher_scale(loss_fn, out, targets, samples=mc_samples if kind == "mc" else 1)
        if kind == "mc":
            draws = sample_targets(loss_fn, out, targets, mc_samples, batch_generator(seed, index))
        else:
            draws = targets.unsqueeze(0)
        total = torch.zeros(w0.numel(), w0.numel(), dtype=torch.float64, device=w0.device)
        true_targets = targets if kind == "mc" else None
        for t in draws:

            def nll(w: torch.Tensor, t: torch.Tensor = t) -> torch.Tensor:
                return per_sample_nll_values(loss_fn, forward(w), t, true_targets=true_targets)

            G = _rows_jacobian(nll, w0)
            total += G.T @ G
        return total * c

    return _dense(model, loss_fn, data, params, bn_mode, per_batch)


def _fail(what: str, err: float, tol: float) -> None:
    raise AssertionError(f"operator contract: {what} (error {err:.3e} > tolerance {tol:.3e})")


def _check_close(what: str, got: Any, want: np.ndarray, tol: float) -> None:
    if isinstance(got, torch.Tensor):
        got = got.detach().cpu().numpy()
    got = np.asarray(got, dtype=np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"operator contract: {what}: shape {got.shape} != {want.shape}")
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    if not err <= tol:
        _fail(what, err, tol)


def check_operator_contract(
    op: Any,
    dense: Any,
    *,
    rtol: float | None = None,
    seed: int = 0,
    num_columns: int = 3,
) -> None:
    """Check a curvops operator against its dense matrix; raise ``AssertionError`` on failure.

    Checks: shape and declared dtype; numpy matvec/matmat against ``dense``; matvec
    of each column against matmat; the torch path (tensor in, tensor out on the
    operator's device, same values); the dot test :math:`y^\\top(Ax) = (A^\\top y)^\\top x`;
    ``.T``/``.H``/``adjoint()`` returning the operator when symmetric and ``rmatvec``
    agreeing with ``matvec``; ``template_vector()``; the psd flag against the
    spectrum; and the algebra (``2*A``, ``A + A``, ``A - A/2``, ``-A``, ``shift``,
    ``damp``, ``A @ A``, ``A ** 2``, deflation) against the dense matrix.

    Tolerances are :math:`\\mathrm{rtol}\\,\\|A\\|_2\\,\\|x\\|` (squared norms for
    products), ``rtol`` defaulting to :math:`10^{3} n\\,\\epsilon` of the operator dtype.

    Parameters
    ----------
    op : CurvatureOperator
        The operator to check.
    dense : array_like or torch.Tensor
        Its dense matrix (compared in float64).
    rtol : float, optional
        Relative tolerance (default :math:`10^3 n\\epsilon` of the operator's dtype).
    seed : int
        Seed of the test vectors.
    num_columns : int
        Columns of the block products checked.

    Examples
    --------
    >>> import numpy as np
    >>> from curvops.structured import Dense
    >>> M = np.array([[2.0, 1.0], [1.0, 3.0]])
    >>> check_operator_contract(Dense(M), M)
    """
    A = dense.detach().cpu().numpy() if isinstance(dense, torch.Tensor) else np.asarray(dense)
    A = np.asarray(A, dtype=np.float64)
    n = A.shape[0]
    if tuple(op.shape) != A.shape:
        raise AssertionError(f"operator contract: shape {op.shape} != dense {A.shape}")
    if op.dtype is None or np.dtype(op.dtype) != np.dtype(str(op.torch_dtype).split(".")[-1]):
        raise AssertionError(f"operator contract: declared dtype {op.dtype} / {op.torch_dtype}")
    eps = float(np.finfo(np.dtype(op.dtype)).eps)
    rtol = 1e3 * max(n, 1) * eps if rtol is None else rtol
    norm = max(float(np.linalg.norm(A, 2)) if n else 0.0, 1e-300)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,))
    X = rng.standard_normal((n, num_columns))
    ctx = _ContractCase(
        A=A,
        dtype=np.dtype(op.dtype),
        rtol=rtol,
        norm=norm,
        x=x,
        X=X,
        tol_x=rtol * norm * float(np.linalg.norm(x)),
        tol_X=rtol * norm * float(np.linalg.norm(X)),
        rng=rng,
    )
    y = _check_numpy_products(op, ctx)
    _check_torch_products(op, ctx, y)
    _check_adjoint_and_flags(op, ctx)
    _check_algebra(op, ctx)


@dataclass
class _ContractCase:
    """The dense reference, test vectors and tolerances of :func:`check_operator_contract`."""

    A: np.ndarray
    dtype: np.dtype[Any]
    rtol: float
    norm: float
    x: np.ndarray
    X: np.ndarray
    tol_x: float
    tol_X: float
    rng: np.random.Generator

    @property
    def n(self) -> int:
        """The operator's size."""
        return int(self.A.shape[0])


def _check_numpy_products(op: Any, ctx: _ContractCase) -> np.ndarray:
    """numpy ``matvec``/``@``/``matmat`` against the dense matrix; return ``op.matvec(x)``."""
    A, x, X, dtype = ctx.A, ctx.x, ctx.X, ctx.dtype
    y = op.matvec(x.astype(dtype))
    if not isinstance(y, np.ndarray):
        raise AssertionError(f"operator contract: numpy matvec returned {type(y)}")
    _check_close("matvec vs dense", y, A @ x, ctx.tol_x)
    _check_close("@ vs dense", op @ x.astype(dtype), A @ x, ctx.tol_x)
    Y = op.matmat(X.astype(dtype))
    _check_close("matmat vs dense", Y, A @ X, ctx.tol_X)
    for j in range(X.shape[1]):
        _check_close(
            f"matvec of column {j} vs matmat", op.matvec(X[:, j].astype(dtype)), Y[:, j], ctx.tol_X
        )
    return y


def _check_torch_products(op: Any, ctx: _ContractCase, y: np.ndarray) -> None:
    """Tensor in, tensor out on the operator's device and dtype, with the numpy path's values."""
    xt = torch.as_tensor(ctx.x, dtype=op.torch_dtype, device=op.device)
    yt = op.matvec(xt)
    if not isinstance(yt, torch.Tensor) or yt.device != op.device or yt.dtype != op.torch_dtype:
        raise AssertionError("operator contract: torch matvec must return a tensor on the device")
    _check_close("torch matvec vs numpy matvec", yt, np.asarray(y, dtype=np.float64), ctx.tol_x)
    Yt = op.matmat(torch.as_tensor(ctx.X, dtype=op.torch_dtype, device=op.device))
    _check_close("torch matmat vs dense", Yt, ctx.A @ ctx.X, ctx.tol_X)


def _check_adjoint_and_flags(op: Any, ctx: _ContractCase) -> None:
    """The dot test, the symmetric and psd flags, and ``template_vector()``."""
    A, X, dtype, n = ctx.A, ctx.X, ctx.dtype, ctx.n
    rtol, norm = ctx.rtol, ctx.norm
    u, v = X[:, 0], X[:, 1 % X.shape[1]]
    lhs = float(v @ np.asarray(op.matvec(u.astype(dtype)), dtype=np.float64))
    rhs = float(np.asarray(op.rmatvec(v.astype(dtype)), dtype=np.float64) @ u)
    dot_tol = rtol * norm * float(np.linalg.norm(u) * np.linalg.norm(v))
    if not abs(lhs - rhs) <= dot_tol:
        _fail("dot test", abs(lhs - rhs), dot_tol)
    if op.symmetric:
        if op.T is not op or op.H is not op or op.adjoint() is not op:
            raise AssertionError("operator contract: symmetric operator must be its own adjoint")
        sym_err = float(np.max(np.abs(A - A.T))) if n else 0.0
        if not sym_err <= rtol * norm:
            _fail("dense reference is not symmetric", sym_err, rtol * norm)
    if op.psd and n:
        lam_min = float(np.linalg.eigvalsh(0.5 * (A + A.T))[0])
        if not lam_min >= -rtol * norm:
            _fail("psd flag but negative eigenvalue", -lam_min, rtol * norm)
    t = op.template_vector()
    if not (
        isinstance(t, torch.Tensor)
        and tuple(t.shape) == (n,)
        and t.dtype == op.torch_dtype
        and t.device == op.device
    ):
        raise AssertionError("operator contract: template_vector has wrong shape/dtype/device")


def _check_algebra(op: Any, ctx: _ContractCase) -> None:
    """``2*A``, ``A + A``, ``A - A/2``, ``-A``, shift, damp, ``A @ A``, ``A ** 2``, deflation."""
    A, x, dtype, n, norm = ctx.A, ctx.x, ctx.dtype, ctx.n, ctx.norm
    mu = 0.75 * norm
    cases: list[tuple[str, Any, np.ndarray, float]] = [
        ("2 * A", 2.0 * op, 2.0 * A, 2.0),
        ("A + A", op + op, 2.0 * A, 2.0),
        ("A - A / 2", op - op / 2.0, 0.5 * A, 1.5),
        ("-A", -op, -A, 1.0),
        ("A.shift(mu)", op.shift(mu), A + mu * np.eye(n), 2.0),
        ("A.damp(0.1 |A|)", op.damp(0.1 * norm), A + 0.1 * norm * np.eye(n), 1.1),
        ("A @ A", op @ op, A @ A, 2.0 * norm),
        ("A ** 2", op**2, A @ A, 2.0 * norm),
    ]
    if n > 2:
        Q, _ = np.linalg.qr(ctx.rng.standard_normal((n, 2)))
        P = np.eye(n) - Q @ Q.T
        cases.append(("A.deflate(V)", op.deflate(Q.astype(dtype)), P @ A @ P, 4.0))
    for name, combo, ref, factor in cases:
        _check_close(f"{name} matvec", combo.matvec(x.astype(dtype)), ref @ x, factor * ctx.tol_x)


def check_model_contract(op: Any, *, seed: int = 0, num_columns: int = 2) -> None:
    """Check contracts 1 and 3 of a model curvature operator; ``AssertionError`` on failure.

    Two products with the same vectors are bitwise equal (one fixed matrix, nothing
    random), and afterwards the model is unchanged (:func:`state_differences`:
    values, identities and types of every parameter and buffer under every name,
    modes, ``.grad``, ``requires_grad``) and so are the global torch (CPU), numpy and
    Python random streams.

    Parameters
    ----------
    op : ModelCurvatureOperator
        The operator to check (its model, data and parameters).
    seed : int
        Seed of the test vectors.
    num_columns : int
        Columns of the block product checked.

    Examples
    --------
    >>> import torch
    >>> from curvops import GGNOperator
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Dropout(0.5)).double()
    >>> x, y = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    >>> check_model_contract(GGNOperator(net, torch.nn.CrossEntropyLoss(), (x, y)))
    """
    import random

    model = op.model
    before = model_state(model)
    streams: tuple[Any, ...] = (torch.get_rng_state(), np.random.get_state(), random.getstate())  # noqa: NPY002
    g = torch.Generator(device=op.device).manual_seed(seed)
    V = torch.randn(op.shape[0], num_columns, generator=g, dtype=op.torch_dtype, device=op.device)
    first = op.matmat(V)
    second = op.matmat(V)
    if not torch.equal(first, second):
        raise AssertionError("operator contract: two products with the same vectors differ")
    diffs = state_differences(before, model)
    if diffs:
        raise AssertionError(f"operator contract: the products changed the model: {diffs[:8]}")
    now: tuple[Any, ...] = (torch.get_rng_state(), np.random.get_state(), random.getstate())  # noqa: NPY002
    if not (
        torch.equal(streams[0], now[0])
        and np.array_equal(streams[1][1], now[1][1])
        and streams[1][2:] == now[1][2:]
        and streams[2] == now[2]
    ):
        raise AssertionError("operator contract: the products advanced a global random stream")
