"""Optimisers: the registry of torch's and the suite's optimisers.

>>> from nets.optim import get_optimizer
>>> import torch
>>> type(get_optimizer("Adam", torch.nn.Linear(2, 1), lr=1e-3)).__name__
'Adam'
"""

from __future__ import annotations

from nets.optim.registry import available_optimizers, get_optimizer, register_optimizer

# Optimiser modules that call register_optimizer(...) on import are imported below this line
# (importing nets.optim.registry runs this file first, so they are always registered).

# isort: split
# --- O1 optimisers (importing registers 'SWATS', 'KFAC', 'EKFAC', 'LancGN', 'LancHess') ---
from nets.optim.kfac import EKFAC, KFAC
from nets.optim.lanczos_newton import LanczosNewton
from nets.optim.swats import SWATS

__all__ = ["available_optimizers", "get_optimizer", "register_optimizer"]
__all__ += ["EKFAC", "KFAC", "SWATS", "LanczosNewton"]  # O1
