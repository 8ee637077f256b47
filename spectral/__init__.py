"""spectral: Lanczos, stochastic Lanczos quadrature and trace estimation on any symmetric operator.

Works on numpy, torch, cupy or any Array-API array; never imports torch.
"""

from __future__ import annotations

from spectral.errors import NumericalError, argument_error
from spectral.io import CorruptFileError, atomic_write, load_npz, save_npz

# --- Lanczos core (lanczos.py, ritz.py, eigen.py, operator.py, probes.py) ---

# --- densities, traces, synthetic matrices (density.py, slq.py, trace.py, functions.py) ---

__all__ = [
    "CorruptFileError",
    "NumericalError",
    "argument_error",
    "atomic_write",
    "load_npz",
    "save_npz",
]
