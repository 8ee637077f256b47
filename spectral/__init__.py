"""spectral: Lanczos, stochastic Lanczos quadrature and trace estimation on any symmetric operator.

Works on numpy, torch, cupy or any Array-API array; never imports torch.
"""

from __future__ import annotations

from spectral.errors import NumericalError, argument_error
from spectral.io import CorruptFileError, atomic_write, load_npz, save_npz

# --- Lanczos core (lanczos.py, ritz.py, eigen.py, operator.py, probes.py) ---
from spectral.eigen import top_eigenpairs
from spectral.lanczos import LanczosResult, check_symmetric, lanczos
from spectral.operator import SymmetricOperator, as_operator
from spectral.probes import random_probe, random_probes
from spectral.ritz import RitzPairs, ritz_pairs

# --- densities, traces, synthetic matrices (density.py, slq.py, trace.py, functions.py) ---
from spectral.density import SpectralDensity
from spectral.functions import schatten_norm, trace_function
from spectral.slq import slq
from spectral.trace import TraceEstimate, diagonal, frobenius_norm_squared, trace

__all__ = [
    # densities, traces (spectral.synthetic and spectral.plot are imported explicitly)
    "SpectralDensity",
    "TraceEstimate",
    "diagonal",
    "frobenius_norm_squared",
    "schatten_norm",
    "slq",
    "trace",
    "trace_function",
    # Lanczos core
    "LanczosResult",
    "RitzPairs",
    "SymmetricOperator",
    "as_operator",
    "check_symmetric",
    "lanczos",
    "random_probe",
    "random_probes",
    "ritz_pairs",
    "top_eigenpairs",
    "CorruptFileError",
    "NumericalError",
    "argument_error",
    "atomic_write",
    "load_npz",
    "save_npz",
]
