r"""Learning-rate schedules.

The paper's linear schedule (Eq. 8), for epoch ``t`` (0-based) of ``T``:

.. math::

    \alpha_t = \begin{cases}
        \alpha_0, & t/T \le 0.5 \\
        \alpha_0 \left[1 - \frac{(1-r)(t/T - 0.5)}{0.4}\right], & 0.5 < t/T \le 0.9 \\
        \alpha_0 r, & t/T > 0.9
    \end{cases}

with ``r = 0.01``.  With stochastic weight averaging the decay ends at the
SWA learning rate: ``T = swa_start`` and ``r = swa_lr / alpha_0`` (as in the SWA code).

>>> [round(linear_schedule(t, 10, 0.1), 6) for t in (0, 5, 7, 9)]
[0.1, 0.1, 0.0505, 0.001]
>>> constant_schedule(7, 10, 0.1)
0.1
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from spectral.errors import argument_error

__all__ = ["SCHEDULES", "Schedule", "constant_schedule", "get_schedule", "linear_schedule"]

Schedule = Callable[..., float]


def _check(epoch: float, total_epochs: float, lr0: float) -> None:
    if not total_epochs > 0:
        raise argument_error("total_epochs", "a positive number", total_epochs)
    if not epoch >= 0:
        raise argument_error("epoch", "a non-negative number", epoch)
    if not lr0 >= 0:
        raise argument_error("lr0", "a non-negative learning rate", lr0)


def linear_schedule(epoch: float, total_epochs: float, lr0: float, ratio: float = 0.01) -> float:
    """Eq. 8: flat until half-way, linear decay to ``ratio * lr0`` at 90%, then flat.

    Parameters
    ----------
    epoch:
        The epoch about to be trained (0-based; fractional values allowed).
    total_epochs:
        ``T``.
    lr0:
        Initial learning rate ``alpha_0``.
    ratio:
        Final ratio ``r``.

    Returns
    -------
    float
        The learning rate :math:`\\alpha_t` of the epoch.

    Examples
    --------
    >>> [round(linear_schedule(t, 10, 0.1), 6) for t in (0, 5, 7, 9)]
    [0.1, 0.1, 0.0505, 0.001]
    """
    _check(epoch, total_epochs, lr0)
    if not ratio >= 0:
        raise argument_error("ratio", "a non-negative ratio", ratio)
    t = epoch / total_epochs
    if t <= 0.5:
        factor = 1.0
    elif t <= 0.9:
        factor = 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4
    else:
        factor = ratio
    return lr0 * factor


def constant_schedule(
    epoch: float, total_epochs: float, lr0: float, ratio: float | None = None
) -> float:
    """``lr0`` at every epoch (``ratio`` is ignored; with SWA the trainer switches to swa_lr).

    Parameters
    ----------
    epoch : float
        The epoch about to be trained (ignored).
    total_epochs : float
        ``T`` (ignored).
    lr0 : float
        The learning rate.
    ratio : float, optional
        Ignored.

    Returns
    -------
    float
        ``lr0``.

    Examples
    --------
    >>> constant_schedule(7, 10, 0.1)
    0.1
    """
    _check(epoch, total_epochs, lr0)
    return lr0


def _check_signature(fn: Schedule) -> None:
    """Refuse a callable that cannot be called as ``fn(epoch, total_epochs, lr0, ratio)``."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: not checked
        return
    try:
        signature.bind(0, 1, 0.1, 0.01)
    except TypeError as exc:
        raise argument_error(
            "schedule",
            f"a callable f(epoch, total_epochs, lr0, ratio) -> lr (its signature {signature} "
            f"cannot take these four arguments: {exc})",
            fn,
            kind=TypeError,
        ) from None


SCHEDULES: dict[str, Schedule] = {"linear": linear_schedule, "constant": constant_schedule}


def get_schedule(name: str | Schedule) -> Schedule:
    """Look up a schedule by name (``"linear"``, ``"constant"``) or pass a callable through.

    A callable must have the signature ``f(epoch, total_epochs, lr0, ratio) -> lr``: one
    that cannot take these four arguments is refused here (it failed at the first epoch
    with Python's "takes 2 positional arguments but 4 were given").  Its rates are checked
    where they are used (:class:`nets.training.LearningRateSchedule`).

    >>> get_schedule("linear") is linear_schedule
    True
    >>> get_schedule(lambda epoch, total: 0.1)
    Traceback (most recent call last):
    ...
    TypeError: Argument 'schedule': expected a callable f(epoch, total_epochs, lr0, ratio) -> lr...
    """
    if callable(name):
        _check_signature(name)
        return name
    if not isinstance(name, str) or name.lower() not in SCHEDULES:
        raise argument_error("schedule", f"one of {sorted(SCHEDULES)} or a callable", name)
    return SCHEDULES[name.lower()]
