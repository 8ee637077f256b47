r"""SWATS: Adam that switches to SGD (Keskar & Socher, 2017, Algorithm 1).

Each parameter group is treated as one vector :math:`x` (pass one group per
layer for a per-layer switch).  In the Adam phase, at step :math:`k` with
gradient :math:`g_k` (plus ``weight_decay * x``),

.. math::

    m_k = \beta_1 m_{k-1} + (1-\beta_1) g_k, \qquad
    a_k = \beta_2 a_{k-1} + (1-\beta_2) g_k^2,

    p_k = -\alpha \frac{\sqrt{1-\beta_2^k}}{1-\beta_1^k}
          \frac{m_k}{\sqrt{a_k} + \epsilon}, \qquad x_k = x_{k-1} + p_k .

The *projected learning rate* is the SGD step length that would have the
same component along :math:`g_k` as the Adam step,

.. math::

    \gamma_k = \frac{p_k^T p_k}{-p_k^T g_k}, \qquad
    \lambda_k = \beta_2 \lambda_{k-1} + (1-\beta_2) \gamma_k ,

and the optimiser switches to SGD at the first :math:`k > 1` with
:math:`|\lambda_k / (1-\beta_2^k) - \gamma_k| < \epsilon_{\rm switch}`
(the paper uses :math:`\epsilon_{\rm switch} = \epsilon`), with the SGD
learning rate :math:`\Lambda = \lambda_k / (1-\beta_2^k)`.  From then on

.. math::

    v_k = \beta_1 v_{k-1} + g_k, \qquad x_k = x_{k-1} - (1-\beta_1)\Lambda v_k ,

with :math:`v` starting at zero.  If the group's ``lr`` is changed after the
switch (a learning-rate schedule), :math:`\Lambda` is scaled by the same
factor (``lr / lr_at_switch``); with a constant ``lr`` this is Algorithm 1
exactly.  The switch step and :math:`\Lambda` are exposed as
:attr:`SWATS.switch_step` and :attr:`SWATS.sgd_lr` (first group) or
:meth:`SWATS.switch_info` (all groups).

>>> import torch
>>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
>>> opt = SWATS([w], lr=0.1, switch_tol=1e-6)
>>> for _ in range(3):
...     opt.zero_grad()
...     (w * torch.tensor([1.0, 3.0])).sum().backward()  # constant gradient
...     opt.step()
>>> opt.switch_step, opt.phase, round(opt.sgd_lr, 6)
(2, 'sgd', 0.1)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from nets.optim.registry import register_optimizer
from spectral.errors import NumericalError, argument_error

__all__ = ["SWATS"]

logger = logging.getLogger(__name__)

_STATE_KEY = "swats_groups"


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > 0 or (allow_zero and value == 0)):
        return float(value)
    expected = "a finite number >= 0" if allow_zero else "a finite number > 0"
    raise argument_error(name, expected, value)


class SWATS(torch.optim.Optimizer):
    """Adam switching to SGD when the projected learning rate stabilises.

    Parameters
    ----------
    params:
        Parameters or parameter groups (an ``nn.Module`` is accepted too).
    lr:
        Adam's learning rate :math:`\\alpha`.
    betas:
        :math:`(\\beta_1, \\beta_2)`; :math:`\\beta_1` is also the SGD momentum.
    eps:
        Adam's :math:`\\epsilon` (added to :math:`\\sqrt{a_k}`).
    weight_decay:
        L2 coefficient added to the gradient in both phases.
    switch_tol:
        :math:`\\epsilon_{\\rm switch}` of the switching criterion; ``None``
        uses ``eps`` as in the paper.

    Raises
    ------
    ValueError
        For a non-positive ``lr``/``eps``, betas outside ``[0, 1)`` or a
        negative ``weight_decay``/``switch_tol``.
    NumericalError
        If a gradient is not finite.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Linear(2, 1)
    >>> opt = SWATS(net.parameters(), lr=1e-3)
    >>> loss = net(torch.ones(4, 2)).square().mean()
    >>> loss.backward()
    >>> opt.step()
    >>> type(opt).__name__, opt.defaults["lr"]
    ('SWATS', 0.001)
    """

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-9,
        weight_decay: float = 0.0,
        switch_tol: float | None = None,
    ) -> None:
        _check_positive("lr", lr)
        _check_positive("eps", eps)
        _check_positive("weight_decay", weight_decay, allow_zero=True)
        if switch_tol is not None:
            _check_positive("switch_tol", switch_tol, allow_zero=True)
        if (
            not isinstance(betas, tuple | list)
            or len(betas) != 2
            or not all(isinstance(b, int | float) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise argument_error("betas", "two numbers in [0, 1)", betas)
        if isinstance(params, nn.Module):
            params = params.parameters()
        defaults = {
            "lr": lr,
            "betas": (float(betas[0]), float(betas[1])),
            "eps": eps,
            "weight_decay": weight_decay,
            "switch_tol": switch_tol,
        }
        super().__init__(params, defaults)
        self._groups_state: list[dict[str, Any]] = [self._fresh() for _ in self.param_groups]

    @staticmethod
    def _fresh() -> dict[str, Any]:
        return {
            "step": 0,
            "phase": "adam",
            "lambda": 0.0,
            "gamma": math.nan,
            "switch_step": None,
            "sgd_lr": None,
            "lr_at_switch": None,
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group (it starts in the Adam phase)."""
        super().add_param_group(param_group)
        if hasattr(self, "_groups_state"):
            self._groups_state.append(self._fresh())

    # -- exposed switch information -------------------------------------------------------
    def switch_info(self) -> list[dict[str, Any]]:
        """Per group: ``phase``, ``step``, ``switch_step``, ``sgd_lr`` and last ``gamma``.

        >>> SWATS([torch.nn.Parameter(torch.zeros(1))]).switch_info()[0]["phase"]
        'adam'
        """
        keys = ("phase", "step", "switch_step", "sgd_lr", "gamma")
        return [{k: s[k] for k in keys} for s in self._groups_state]

    @property
    def phase(self) -> str:
        """``'adam'`` or ``'sgd'`` for the first parameter group."""
        return str(self._groups_state[0]["phase"])

    @property
    def switch_step(self) -> int | None:
        """Step (1-based) at which the first group switched to SGD, or ``None``."""
        value = self._groups_state[0]["switch_step"]
        return None if value is None else int(value)

    @property
    def sgd_lr(self) -> float | None:
        """The SGD learning rate :math:`\\Lambda` of the first group, or ``None``."""
        value = self._groups_state[0]["sgd_lr"]
        return None if value is None else float(value)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimiser state plus the per-group phase information."""
        state = super().state_dict()
        state[_STATE_KEY] = [dict(s) for s in self._groups_state]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (including the phase and switch information)."""
        state_dict = dict(state_dict)
        groups = state_dict.pop(_STATE_KEY, None)
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise argument_error(
                "state_dict",
                f"a SWATS state_dict with '{_STATE_KEY}' for {len(self.param_groups)} groups",
                None if groups is None else f"{len(groups)} groups",
            )
        super().load_state_dict(state_dict)
        self._groups_state = [{**self._fresh(), **dict(g)} for g in groups]

    # -- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one SWATS step; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        for group, gstate in zip(self.param_groups, self._groups_state):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            gstate["step"] += 1
            k = gstate["step"]
            grads = []
            for p in params:
                if p.grad.is_sparse:
                    raise argument_error("params", "dense gradients", "a sparse gradient")
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                grads.append(g)
            if gstate["phase"] == "sgd":
                self._sgd_step(group, gstate, params, grads)
            else:
                self._adam_step(group, gstate, params, grads, k)
        return loss

    def _check_gradients(self) -> None:
        """Raise :class:`NumericalError` for a non-finite gradient, before any write."""
        present = [
            p.grad
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and not p.grad.is_sparse  # sparse: refused in the step
        ]
        if not present:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in present])
        if not bool(finite.all()):
            raise NumericalError(
                "SWATS: non-finite gradient; parameters and optimiser state are unchanged"
            )

    def _sgd_step(
        self,
        group: dict[str, Any],
        gstate: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
    ) -> None:
        beta1 = group["betas"][0]
        scale = group["lr"] / gstate["lr_at_switch"]
        step_size = (1.0 - beta1) * gstate["sgd_lr"] * scale
        for p, g in zip(params, grads):
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.zeros_like(p)
                state["momentum_buffer"] = buf
            buf.mul_(beta1).add_(g)
            p.add_(buf, alpha=-step_size)

    def _adam_step(
        self,
        group: dict[str, Any],
        gstate: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        k: int,
    ) -> None:
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        tol = eps if group["switch_tol"] is None else group["switch_tol"]
        factor = group["lr"] * math.sqrt(1.0 - beta2**k) / (1.0 - beta1**k)
        pp = torch.zeros((), dtype=torch.float64, device=params[0].device)
        pg = torch.zeros_like(pp)
        for p, g in zip(params, grads):
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            m, a = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(beta1).add_(g, alpha=1.0 - beta1)
            a.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            step = m / (a.sqrt() + eps) * (-factor)
            p.add_(step)
            pp += step.double().pow(2).sum()
            pg += (step.double() * g.double()).sum()
        pp_value, pg_value = float(pp), float(pg)
        if not (math.isfinite(pp_value) and math.isfinite(pg_value)):
            raise NumericalError(f"SWATS: non-finite Adam step or gradient at step {k}")
        if pg_value == 0.0:
            return
        gamma = pp_value / (-pg_value)
        gstate["gamma"] = gamma
        gstate["lambda"] = beta2 * gstate["lambda"] + (1.0 - beta2) * gamma
        corrected = gstate["lambda"] / (1.0 - beta2**k)
        if k > 1 and abs(corrected - gamma) < tol:
            gstate["phase"] = "sgd"
            gstate["switch_step"] = k
            gstate["sgd_lr"] = corrected
            gstate["lr_at_switch"] = group["lr"]
            logger.info("SWATS: switched to SGD at step %d with lr %.6g", k, corrected)


register_optimizer("SWATS", SWATS, overwrite=True)
