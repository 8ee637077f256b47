"""Error construction shared by the three packages.

Every user-facing error names the argument, what was expected and what was
received, so that a message can be acted on without reading the source:

>>> raise argument_error("num_iters", "an integer with 1 <= num_iters <= 10", 0)
Traceback (most recent call last):
...
ValueError: Argument 'num_iters': expected an integer with 1 <= num_iters <= 10; received 0.

Numerical failures (NaN/Inf in a product, loss of symmetry) raise
:class:`NumericalError`, whose message says where the failure appeared.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

__all__ = ["NumericalError", "argument_error", "check_integer", "check_real", "describe"]


class NumericalError(ArithmeticError):
    """A computation produced a non-finite or inconsistent value.

    The message names where it happened (iteration, batch, parameter).

    Examples
    --------
    >>> import numpy as np
    >>> from spectral import lanczos
    >>> try:
    ...     lanczos(np.diag([1.0, np.nan, 2.0]), 2, seed=0)
    ... except NumericalError as error:
    ...     print(type(error).__name__, "iteration" in str(error))
    NumericalError True
    """


def describe(value: Any) -> str:
    """Return a short, informative description of ``value`` for an error message.

    Arrays are described by type, shape and dtype rather than by their content.

    >>> import numpy as np
    >>> describe(np.zeros((2, 3)))
    'numpy.ndarray of shape (2, 3) and dtype float64'
    >>> describe("abc")
    "'abc'"
    """
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None and dtype is not None and not isinstance(value, type):
        cls = type(value)
        module = cls.__module__.split(".")[0]
        device = getattr(value, "device", None)
        text = f"{module}.{cls.__name__} of shape {tuple(shape)} and dtype {dtype}"
        if device is not None and module != "numpy" and str(device) not in ("cpu", "CPU_DEVICE"):
            text += f" on device {device}"
        return text
    text = repr(value)
    if len(text) > 200:
        text = text[:197] + "..."
    return text


def argument_error(
    name: str,
    expected: str,
    received: Any,
    *,
    kind: type[Exception] = ValueError,
) -> Exception:
    """Build (not raise) an exception for a bad argument.

    Parameters
    ----------
    name:
        The argument's name as the caller spelt it.
    expected:
        What would have been accepted, in words ("a positive integer").
    received:
        The offending value; arrays are summarised by :func:`describe`.
    kind:
        The exception class, ``ValueError`` by default (``TypeError`` for a
        wrong type).

    Returns
    -------
    Exception
        An instance of ``kind`` whose message names the argument, what was expected and what was
        received (the caller raises it).

    Examples
    --------
    >>> error = argument_error("num_iters", "a positive integer", -3)
    >>> type(error).__name__, str(error)
    ('ValueError', "Argument 'num_iters': expected a positive integer; received -3.")
    """
    return kind(f"Argument '{name}': expected {expected}; received {describe(received)}.")


def check_real(
    name: str,
    value: Any,
    expected: str,
    valid: Callable[[float], bool] = math.isfinite,
) -> float:
    """Return ``float(value)`` for a real number ``value`` for which ``valid`` holds.

    Python and numpy reals (``1e-6``, ``np.float32(1e-6)``, ``3``) are accepted; a
    ``bool``, a string, ``None`` or any other object raises a ``TypeError``, and a real
    number for which ``valid(float(value))`` is false (by default: NaN or infinite) a
    ``ValueError``, both built by :func:`argument_error` with ``name`` and ``expected``.

    Parameters
    ----------
    name:
        The argument's name as the caller spelt it.
    value:
        The argument.
    expected:
        What would have been accepted, in words ("a positive finite number").
    valid:
        The condition on ``float(value)`` (``math.isfinite`` by default).

    Returns
    -------
    float
        The value as a Python float.

    Examples
    --------
    >>> import numpy as np
    >>> check_real("tol", np.float32(0.5), "a positive finite number", lambda t: 0 < t < math.inf)
    0.5
    >>> check_real("sigma", None, "a positive number")
    Traceback (most recent call last):
    ...
    TypeError: Argument 'sigma': expected a positive number; received None.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise argument_error(name, expected, value, kind=TypeError)
    number = float(value)
    if not valid(number):
        raise argument_error(name, expected, value)
    return number


def check_integer(name: str, value: Any, expected: str, valid: Callable[[int], bool]) -> int:
    """Return ``int(value)`` for a Python or numpy integer ``value`` for which ``valid`` holds.

    A ``bool``, a float (even ``2.0``) or any other object raises a ``TypeError``, an
    integer for which ``valid(int(value))`` is false a ``ValueError``, both built by
    :func:`argument_error` with ``name`` and ``expected``.

    Parameters
    ----------
    name:
        The argument's name as the caller spelt it.
    value:
        The argument.
    expected:
        What would have been accepted, in words ("an integer >= 2").
    valid:
        The condition on ``int(value)``.

    Returns
    -------
    int
        The value as a Python int.

    Examples
    --------
    >>> check_integer("resolution", 33, "an integer >= 2", lambda k: k >= 2)
    33
    >>> check_integer("resolution", 2.5, "an integer >= 2", lambda k: k >= 2)
    Traceback (most recent call last):
    ...
    TypeError: Argument 'resolution': expected an integer >= 2; received 2.5.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise argument_error(name, expected, value, kind=TypeError)
    number = int(value)
    if not valid(number):
        raise argument_error(name, expected, value)
    return number
