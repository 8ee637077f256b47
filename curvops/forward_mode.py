"""Forward-mode differentiation without torch's internal deprecation notices.

The first forward-mode product of a process (``torch.autograd.forward_ad.make_dual``,
``torch.func.jvp``, ``torch.func.linearize``, ``torch.func.hessian``) makes torch import
``torch._decomp.decompositions_for_jvp``, which compiles its decompositions with
``torch.jit.script``.  Every such compilation issues ```torch.jit.script` is
deprecated`` from inside torch (a ``DeprecationWarning`` in torch 2.13, hidden by
Python's default filters; a ``FutureWarning``, shown to every user, from torch 2.14): a notice about
torch's own code that a user of this package cannot act on.

:func:`prepare_forward_mode` performs that import once, with exactly this warning
(its message, category and issuing module) silenced for the duration of the import.
No process-wide filter is installed: every other warning, and this one when it is
issued by anything else, reaches the user as usual.  Every forward-mode path of
:mod:`curvops` calls it before its first dual tensor.

Examples
--------
>>> from curvops.forward_mode import prepare_forward_mode
>>> prepare_forward_mode()  # idempotent and cheap after the first call
"""

from __future__ import annotations

import functools
import importlib
import warnings

__all__ = ["prepare_forward_mode"]

#: The one notice silenced while torch loads its forward-mode decompositions.
_JIT_SCRIPT_DEPRECATION = r"`torch\.jit\.script` is deprecated"


@functools.cache
def prepare_forward_mode() -> None:
    """Load torch's forward-mode decompositions once, without its deprecation notice.

    Returns
    -------
    None
        After the first call the decompositions are registered, so later forward-mode
        products trigger no import (and no warning) at all.

    Examples
    --------
    >>> import torch
    >>> import torch.autograd.forward_ad as fwAD
    >>> prepare_forward_mode()
    >>> with fwAD.dual_level():
    ...     x = fwAD.make_dual(torch.tensor([1.0]), torch.tensor([2.0]))
    ...     float(fwAD.unpack_dual(torch.tanh(x)).tangent)
    0.83...
    """
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):  # torch 2.13, torch >= 2.14
            warnings.filterwarnings(
                "ignore", message=_JIT_SCRIPT_DEPRECATION, category=category, module=r"torch\.jit"
            )
        try:
            importlib.import_module("torch._decomp.decompositions_for_jvp")
        except ImportError:  # a torch without this private module: nothing to load
            pass
