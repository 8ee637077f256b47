"""spectral: Lanczos, stochastic Lanczos quadrature and trace estimation on any symmetric operator.

Works on numpy, torch, cupy or any Array-API array; never imports torch.
``spectral.synthetic`` (random matrices with known spectra) and ``spectral.plot``
(matplotlib) are imported explicitly; ``spectral.rmt`` (Marchenko–Pastur and semicircle
fits, outliers) and ``spectral.bounds`` (quadrature bounds, confidence bands) come with the
package.
"""

from __future__ import annotations

from spectral import bounds, rmt
from spectral.density import SpectralDensity
from spectral.eigen import top_eigenpairs
from spectral.errors import NumericalError, argument_error
from spectral.estimators import TraceEstimate, diagonal, frobenius_norm_squared, trace
from spectral.functions import schatten_norm, trace_function
from spectral.io import CorruptFileError, atomic_write, load_npz, save_npz
from spectral.krylov import LanczosResult, check_symmetric, lanczos
from spectral.operator import SymmetricOperator, as_operator
from spectral.probes import random_probe, random_probes
from spectral.quadrature import slq
from spectral.resume import StateMismatchError
from spectral.ritz import RitzPairs, ritz_pairs

__all__ = [
    "CorruptFileError",
    "LanczosResult",
    "NumericalError",
    "RitzPairs",
    "SpectralDensity",
    "StateMismatchError",
    "SymmetricOperator",
    "TraceEstimate",
    "argument_error",
    "as_operator",
    "atomic_write",
    "bounds",
    "check_symmetric",
    "diagonal",
    "frobenius_norm_squared",
    "lanczos",
    "load_npz",
    "random_probe",
    "random_probes",
    "ritz_pairs",
    "rmt",
    "save_npz",
    "schatten_norm",
    "slq",
    "top_eigenpairs",
    "trace",
    "trace_function",
]
