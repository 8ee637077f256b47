r"""Stochastic Lanczos-Newton: the paper's second-order optimisers ``LancGN`` and ``LancHess``.

The Newton step of Eq. (1)-(2) of the paper, :math:`d = \bar H^{-1} g =
\sum_i u_i u_i^T g / \lambda_i`, restricted to the Ritz pairs that ``k``
Lanczos steps find, with the damping :math:`\delta` standing in for the
curvature of every direction Lanczos has not seen.  At each step:

1. :math:`g = \nabla L_{\rm batch}(p) + \omega p` on the training batch
   (``weight_decay`` :math:`\omega`; the closure computes the gradient);
2. ``k = lanczos_iters`` Lanczos steps on the curvature :math:`B` of the
   *curvature batch* (``'LancGN'``: the generalised Gauss-Newton;
   ``'LancHess'``: the Hessian) give :math:`B Q \approx Q T`, and
   :math:`T = S \Theta S^T` the Ritz pairs :math:`(\theta_i, u_i = Q s_i)`;
3. the step

.. math::

    d = \sum_{i=1}^{k} \frac{u_i u_i^T g}{|\theta_i| + \delta}
        + \frac{1}{\delta}\Bigl(g - \sum_{i=1}^k u_i u_i^T g\Bigr),
    \qquad p \leftarrow p - \alpha\, d ,

with learning rate :math:`\alpha` (``lr``) and damping :math:`\delta`
(``damping``).  :math:`|\theta_i|` makes ``'LancHess'`` the saddle-free
Newton method of Dauphin et al. (2014): negative-curvature directions are
followed downhill instead of towards the saddle; ``saddle_free=False`` uses
:math:`\theta_i` (plain damped Newton).  For the GGN (positive
semi-definite) both agree.

**Start vector.**  By default Lanczos starts from :math:`g` itself, so the
basis spans the Krylov space :math:`\mathcal K_k(B, g)` and contains
:math:`g`: the second term vanishes (up to rounding) and
:math:`d = \|g\|\, Q\, f(T)\, e_1` with :math:`f(\theta) = 1/(|\theta|+\delta)`
is the Lanczos approximation of :math:`f(B)\, g`.  For a positive
semi-definite :math:`B` it is exactly the :math:`k`-th conjugate-gradient
iterate for :math:`(B + \delta I) d = g` (the Galerkin solution in
:math:`\mathcal K_k(B, g)`, optimal in the :math:`(B+\delta I)`-norm), and it
is the exact damped Newton step :math:`(B+\delta I)^{-1} g` once :math:`k`
reaches the number of distinct eigenvalues of :math:`B` that :math:`g`
touches (at most the rank of :math:`B` plus one).  The Krylov space of
:math:`g` is therefore the right space for solving with :math:`B`;
``start='random'`` instead starts from a seeded random unit vector (a fresh
one each step, drawn from ``(seed, step)``), whose Ritz vectors approximate
the extreme eigenvectors of :math:`B` (the paper's spectral view); the part
of :math:`g` outside them then moves with the step :math:`\alpha/\delta`
of SGD.

The model is not changed by the curvature computation (``curvops``
operators are side-effect free: parameters, buffers, ``.grad``, modes).
:attr:`LanczosNewton.last_info` records the Ritz values and the norms of
the last step.

>>> import torch
>>> torch_gen = torch.Generator().manual_seed(0)
>>> model = torch.nn.Linear(3, 1).double()
>>> x = torch.randn(20, 3, generator=torch_gen, dtype=torch.float64)
>>> y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3
>>> opt = LanczosNewton(model, lr=1.0, damping=1e-10, lanczos_iters=4)
>>> def closure():
...     opt.zero_grad()
...     loss = torch.nn.functional.mse_loss(model(x), y)
...     loss.backward()
...     return loss
>>> _ = opt.step(closure, curvature_batch=(x, y), loss_fn=torch.nn.MSELoss())
>>> round(closure().item(), 8)  # one Newton step solves the least-squares problem
0.0
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from nets.optim.registry import register_optimizer
from spectral.errors import NumericalError, argument_error
from spectral.krylov import lanczos
from spectral.ritz import tridiagonal_eigh

__all__ = ["LanczosNewton", "lanczos_newton_direction"]

logger = logging.getLogger(__name__)

_STATE_KEY = "lanczos_newton"
_CURVATURES: dict[str, Callable[..., Any]] = {"ggn": GGNOperator, "hessian": HessianOperator}


def lanczos_newton_direction(
    operator: Any,
    g: torch.Tensor,
    *,
    num_iters: int,
    damping: float,
    saddle_free: bool = True,
    v0: torch.Tensor | None = None,
    seed: int | np.random.Generator | None = None,
    reorth: str | int = "full",
) -> tuple[torch.Tensor, dict[str, Any]]:
    r"""The Lanczos-Newton direction :math:`d` of the module docstring for one gradient.

    Parameters
    ----------
    operator:
        The symmetric curvature :math:`B` (anything :func:`spectral.lanczos`
        accepts; a ``curvops`` operator keeps vectors as torch tensors on its device).
    g:
        The gradient, a 1-D tensor of length ``n`` in the operator's vector format.
    num_iters:
        ``k``; capped at ``n``.  Lanczos may stop earlier on an invariant subspace.
    damping:
        :math:`\delta > 0`.
    saddle_free:
        Use :math:`|\theta_i|` (default) or :math:`\theta_i`.
    v0:
        Start vector; ``None`` starts from ``g`` unless ``seed`` is given, in
        which case a random unit vector is drawn from ``seed``.
    reorth:
        Lanczos reorthogonalisation (``'full'`` keeps the basis orthonormal).

    Returns
    -------
    ``(d, info)`` with ``d`` like ``g`` and ``info`` holding ``ritz_values``
    (float64 numpy), ``num_iters``, ``breakdown``, ``grad_norm``,
    ``residual_fraction`` :math:`\|g - QQ^Tg\|/\|g\|`.

    Raises
    ------
    ValueError
        For a non-positive damping or ``num_iters < 1``.
    spectral.errors.NumericalError
        If the direction is not finite (e.g. :math:`\theta_i + \delta = 0`
        without ``saddle_free``).

    >>> B = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    >>> d, info = lanczos_newton_direction(B, torch.tensor([1.0, 4.0], dtype=torch.float64),
    ...                                    num_iters=2, damping=1e-12)
    >>> d.tolist(), info["num_iters"]
    ([1.0, 1.0], 2)
    """
    if not (isinstance(damping, int | float) and math.isfinite(damping) and damping > 0):
        raise argument_error("damping", "a finite number > 0", damping)
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise argument_error("num_iters", "an integer >= 1", num_iters)
    n = int(g.shape[0])
    k = min(num_iters, n)
    grad_norm = float(torch.linalg.vector_norm(g))
    if v0 is None and seed is None:
        v0 = g
    result = lanczos(operator, k, v0=v0, seed=seed, reorth=reorth)
    theta, S = tridiagonal_eigh(result.alpha, result.beta)
    curv = np.abs(theta) if saddle_free else theta
    Q = result.basis  # n x m, orthonormal
    c = Q.T @ g  # Q^T g
    S_t = torch.as_tensor(S, dtype=g.dtype, device=g.device)
    f = torch.as_tensor(1.0 / (curv + damping), dtype=g.dtype, device=g.device)
    # d = Q S f S^T c + (g - Q c) / delta = g / delta + Q (S f S^T c - c / delta)
    y = S_t @ (f * (S_t.T @ c)) - c / damping
    d = g / damping + Q @ y
    if not bool(torch.isfinite(d).all()):
        raise NumericalError(
            "Lanczos-Newton: non-finite direction (Ritz values "
            f"{np.array2string(theta, precision=3)}, damping {damping})"
        )
    outside = float(torch.linalg.vector_norm(g - Q @ c))
    info = {
        "ritz_values": theta,
        "num_iters": int(result.num_iters),
        "breakdown": bool(result.breakdown),
        "grad_norm": grad_norm,
        "residual_fraction": outside / grad_norm if grad_norm > 0 else 0.0,
    }
    return d, info


class LanczosNewton(torch.optim.Optimizer):
    r"""Stochastic Lanczos-Newton (``LancGN`` / ``LancHess``; see the module docstring).

    Parameters
    ----------
    model:
        The network; all its trainable parameters are optimised.
    lr:
        :math:`\alpha` (the paper's Table 4 uses ``lr=1``).
    damping:
        :math:`\delta > 0` (Table 4: ``damping=10``; the paper keeps :math:`\delta = 10\alpha`).
    weight_decay:
        :math:`\omega`, added to the gradient (not to the curvature).
    lanczos_iters:
        ``k``, the number of Lanczos steps (curvature-vector products) per step.
    curvature:
        ``'ggn'`` (``LancGN``) or ``'hessian'`` (``LancHess``).
    saddle_free:
        :math:`|\theta|` (default) or :math:`\theta` in the denominators.
    start:
        ``'gradient'`` (Krylov space :math:`\mathcal K_k(B, g)`) or ``'random'``.
    seed:
        Seed of the random start vectors (``start='random'``).
    bn_mode:
        BatchNorm mode for the curvature products (``None``: the modules' own
        mode, i.e. batch statistics in training, running statistics untouched).
    reorth:
        Lanczos reorthogonalisation mode.

    ``train_network`` calls ``step(closure=..., curvature_batch=(x_c, y_c),
    loss_fn=...)`` (``curvature_step = True``); in a plain loop call
    ``loss.backward()`` then ``step(curvature_batch=..., loss_fn=...)``.

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(32, 4, dtype=torch.float64, generator=g)
    >>> y = torch.randint(0, 3, (32,), generator=g)
    >>> loss_fn = torch.nn.CrossEntropyLoss()
    >>> opt = LanczosNewton(net, lr=1.0, damping=1.0, lanczos_iters=5)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = loss_fn(net(x), y)
    ...     loss.backward()
    ...     return loss
    >>> before = loss_fn(net(x), y).detach().item()
    >>> _ = opt.step(closure, curvature_batch=(x, y), loss_fn=loss_fn)
    >>> loss_fn(net(x), y).detach().item() < before
    True
    """

    curvature_step = True

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        damping: float = 10.0,
        weight_decay: float = 0.0,
        lanczos_iters: int = 20,
        curvature: str = "ggn",
        saddle_free: bool = True,
        start: str = "gradient",
        seed: int = 0,
        bn_mode: str | None = None,
        reorth: str | int = "full",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise argument_error(
                "model", "an nn.Module (the curvature needs the model)", model, kind=TypeError
            )
        for name, value in (("lr", lr), ("damping", damping)):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not (ok and math.isfinite(value) and value > 0):
                raise argument_error(name, "a finite number > 0", value)
        if not (isinstance(weight_decay, int | float) and weight_decay >= 0):
            raise argument_error("weight_decay", "a number >= 0", weight_decay)
        if isinstance(lanczos_iters, bool) or not isinstance(lanczos_iters, int):
            raise argument_error("lanczos_iters", "an integer >= 1", lanczos_iters, kind=TypeError)
        if lanczos_iters < 1:
            raise argument_error("lanczos_iters", "an integer >= 1", lanczos_iters)
        if curvature not in _CURVATURES:
            raise argument_error("curvature", f"one of {sorted(_CURVATURES)}", curvature)
        if start not in ("gradient", "random"):
            raise argument_error("start", "'gradient' or 'random'", start)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise argument_error("seed", "an integer", seed, kind=TypeError)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise argument_error("model", "a model with trainable parameters", model)
        defaults = {
            "lr": float(lr),
            "damping": float(damping),
            "weight_decay": float(weight_decay),
            "lanczos_iters": lanczos_iters,
        }
        super().__init__(params, defaults)
        self.model = model
        self.curvature = curvature
        self.saddle_free = bool(saddle_free)
        self.start = start
        self.seed = seed
        self.bn_mode = bn_mode
        self.reorth = reorth
        self.steps_taken = 0
        self.last_info: dict[str, Any] = {}

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimiser state plus the step counter (which seeds random starts)."""
        state = super().state_dict()
        state[_STATE_KEY] = {"steps_taken": self.steps_taken}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        if not isinstance(extra, dict) or "steps_taken" not in extra:
            raise argument_error(
                "state_dict", f"a Lanczos-Newton state_dict with '{_STATE_KEY}'", None
            )
        super().load_state_dict(state_dict)
        self.steps_taken = int(extra["steps_taken"])

    # -- the step --------------------------------------------------------------------------
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        curvature_batch: Sequence[Any] | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
    ) -> Any:
        """One Lanczos-Newton step.

        Parameters
        ----------
        closure:
            Zeroes the gradients, computes the training-batch loss, calls
            ``backward`` and returns the loss.  Without it the gradients
            already in ``.grad`` are used.
        curvature_batch:
            ``(inputs, targets)`` whose curvature is used (anything
            ``curvops`` accepts as ``data``).
        loss_fn:
            The loss (reduction ``'mean'``) of the curvature.

        Returns
        -------
        The closure's loss (or ``None``).

        Raises
        ------
        ValueError
            Without ``curvature_batch`` or ``loss_fn``.
        spectral.errors.NumericalError
            For a non-finite gradient or direction (the message names the step).
        """
        if curvature_batch is None:
            raise argument_error(
                "curvature_batch", "a batch (inputs, targets) for the curvature", None
            )
        if loss_fn is None:
            raise argument_error("loss_fn", "the loss function of the curvature", None)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        operator = _CURVATURES[self.curvature](
            self.model, loss_fn, curvature_batch, bn_mode=self.bn_mode
        )
        op_params = [p for _, p in operator.params]
        if {id(p) for p in op_params} != {id(p) for p in group["params"]}:
            raise argument_error(
                "model", "the same trainable parameters as at construction", "a changed set"
            )
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in op_params]
            g = operator.params_to_vector(grads)
            if group["weight_decay"]:
                g = g + group["weight_decay"] * operator.params_to_vector(op_params)
            if not bool(torch.isfinite(g).all()):
                raise NumericalError(
                    f"Lanczos-Newton: non-finite gradient at step {self.steps_taken}"
                )
            if float(torch.linalg.vector_norm(g)) == 0.0:
                self.last_info = {"grad_norm": 0.0, "num_iters": 0}
                self.steps_taken += 1
                return loss
            seed = None
            if self.start == "random":
                seed = np.random.default_rng([self.seed, self.steps_taken])
            try:
                d, info = lanczos_newton_direction(
                    operator,
                    g,
                    num_iters=int(group["lanczos_iters"]),
                    damping=float(group["damping"]),
                    saddle_free=self.saddle_free,
                    seed=seed,
                    reorth=self.reorth,
                )
            except NumericalError as exc:
                raise NumericalError(f"{exc} at step {self.steps_taken}") from exc
            for p, dp in zip(op_params, operator.vector_to_params(d)):
                p.add_(dp.to(p.dtype), alpha=-group["lr"])
        info["step_norm"] = float(torch.linalg.vector_norm(d)) * group["lr"]
        self.last_info = info
        logger.debug(
            "Lanczos-Newton step %d: %d Lanczos steps, Ritz range [%.3g, %.3g]",
            self.steps_taken,
            info["num_iters"],
            float(info["ritz_values"][0]),
            float(info["ritz_values"][-1]),
        )
        self.steps_taken += 1
        return loss


def _lanc_gn(model: nn.Module, **kwargs: Any) -> LanczosNewton:
    """``LancGN``: Lanczos-Newton on the generalised Gauss-Newton."""
    return LanczosNewton(model, curvature="ggn", **kwargs)


def _lanc_hess(model: nn.Module, **kwargs: Any) -> LanczosNewton:
    """``LancHess``: saddle-free Lanczos-Newton on the Hessian's absolute eigenvalues."""
    return LanczosNewton(model, curvature="hessian", **kwargs)


# Their signature is LanczosNewton's (what nets.optim.optimizer_options reads).
functools.update_wrapper(_lanc_gn, LanczosNewton, assigned=(), updated=())
functools.update_wrapper(_lanc_hess, LanczosNewton, assigned=(), updated=())
register_optimizer("LancGN", _lanc_gn, overwrite=True)
register_optimizer("LancHess", _lanc_hess, overwrite=True)
