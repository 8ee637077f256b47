"""The analysis workflow: eigenspectra, loss statistics and loss landscapes of checkpoints.

Thin functions over :mod:`curvops` (curvature operators) and :mod:`spectral`
(Lanczos, quadrature): each accepts names as in the paper's Tables 1-4 or
objects (``nn.Module``, ``Dataset``/``DataLoader``, a loss), writes its
``.npz`` atomically and leaves the caller's model and the global random
states exactly as it found them.

>>> from nets.workflow import parse_curvature
>>> parse_curvature("ggn-lanczos")
'ggn'
"""

from __future__ import annotations

from nets.workflow._resolve import CURVATURES, model_fingerprint, parse_curvature
from nets.workflow.block_spectra import (
    BlockSpectraResult,
    BlockSpectrum,
    compute_block_spectra,
    load_block_spectra,
)
from nets.workflow.compare import compare_curvatures
from nets.workflow.directions import (
    Direction,
    ParamSpace,
    filter_normalised_directions,
    random_directions,
    ritz_directions,
)
from nets.workflow.landscape import LandscapeResult, build_loss_landscape, evaluate
from nets.workflow.loss_stats import STATS_KEYS, compute_loss_stats
from nets.workflow.spectrum import (
    SpectrumResult,
    compute_eigenspectrum,
    lanczos_spectrum,
    load_spectrum,
)

__all__ = [
    "CURVATURES",
    "STATS_KEYS",
    "BlockSpectraResult",
    "BlockSpectrum",
    "Direction",
    "LandscapeResult",
    "ParamSpace",
    "SpectrumResult",
    "build_loss_landscape",
    "compare_curvatures",
    "compute_block_spectra",
    "compute_eigenspectrum",
    "compute_loss_stats",
    "evaluate",
    "filter_normalised_directions",
    "lanczos_spectrum",
    "load_block_spectra",
    "load_spectrum",
    "model_fingerprint",
    "parse_curvature",
    "random_directions",
    "ritz_directions",
]
