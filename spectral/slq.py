r"""Stochastic Lanczos quadrature (SLQ): a moment-matched spectral density from a few probes.

For a symmetric :math:`n\times n` operator :math:`A = \sum_j \lambda_j u_j u_j^\top` and a probe
:math:`v`, the measure :math:`\mu_v = \sum_j \frac{(u_j^\top v)^2}{\|v\|^2}\delta_{\lambda_j}` has
expectation :math:`\frac1n\sum_j\delta_{\lambda_j}` for Rademacher, Gaussian and spherical probes.
``m`` Lanczos steps from :math:`v` give its ``m``-point Gauss quadrature rule: the Ritz values
:math:`\theta_i` with weights :math:`w_i = S_{1i}^2`, matching the moments
:math:`\int x^p\,d\mu_v = v^\top A^p v/\|v\|^2` for all :math:`p \le 2m-1`. SLQ averages
the rules of ``num_probes`` independent probes. The paper shows that for large ``n`` a single
probe already concentrates around the spectral density (variance :math:`O(1/n)` of every
moment), so ``num_probes=1`` is the default.

>>> import numpy as np
>>> d = slq(np.diag(np.arange(1.0, 11.0)), 10, seed=0)  # Rademacher: v^T D v / n = tr(D) / n
>>> round(d.moment(1), 10), len(d)
(5.5, 10)
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from spectral.density import SpectralDensity
from spectral.errors import argument_error
from spectral.lanczos import lanczos
from spectral.operator import as_operator
from spectral.probes import PROBE_KINDS, as_generator, random_probe

__all__ = ["slq"]

logger = logging.getLogger(__name__)


def slq(
    A: Any,
    num_iters: int,
    *,
    num_probes: int = 1,
    probe: str = "rademacher",
    seed: int | np.random.Generator | None = None,
    reorth: str | int = "full",
) -> SpectralDensity:
    r"""Estimate the spectral density of ``A`` by stochastic Lanczos quadrature.

    Parameters
    ----------
    A:
        Anything :func:`spectral.operator.as_operator` accepts (dense array of any namespace,
        ``LinearOperator``, curvops operator...). Probes are drawn on the host from ``seed``
        and moved once to the operator's namespace and device.
    num_iters:
        Lanczos steps ``m`` per probe, ``1 <= m <= n``; a probe whose Krylov space becomes
        invariant stops early and contributes fewer nodes (exact ones).
    num_probes:
        Number ``P`` of independent probes; their measures are averaged with weight ``1/P``.
    probe:
        ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
    seed:
        Integer or :class:`numpy.random.Generator` (advanced in place); ``None`` draws fresh
        entropy.
    reorth:
        Passed to :func:`spectral.lanczos.lanczos`. With ``"none"`` the basis is not stored
        (memory :math:`O(n)`); ghost Ritz values then share the weight of the eigenvalue they
        copy, so quadrature stays accurate.

    Returns
    -------
    SpectralDensity
        Pooled nodes and weights, with the per-probe ``(P, m)`` nodes and weights
        (NaN-padded after an early stop).

    Raises
    ------
    ValueError, TypeError
        Invalid arguments.
    spectral.errors.NumericalError
        A product produced NaN or Inf.

    >>> import numpy as np
    >>> A = np.diag([1.0, 1.0, 2.0, 2.0])
    >>> d = slq(A, 4, num_probes=2, seed=1)
    >>> d.num_probes, np.unique(d.nodes.round(10)).tolist()
    (2, [1.0, 2.0])
    """
    op = as_operator(A)
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)):
        raise argument_error("num_probes", "a positive integer", num_probes, kind=TypeError)
    if num_probes < 1:
        raise argument_error("num_probes", "a positive integer", num_probes)
    if probe not in PROBE_KINDS:
        raise argument_error("probe", f"one of {PROBE_KINDS}", probe)
    if isinstance(num_iters, bool) or not isinstance(num_iters, (int, np.integer)):
        raise argument_error("num_iters", "an integer", num_iters, kind=TypeError)
    if not 1 <= num_iters <= op.n:
        raise argument_error(
            "num_iters", f"an integer with 1 <= num_iters <= n = {op.n}", num_iters
        )
    rng = as_generator(seed)
    m = int(num_iters)
    store_basis = reorth != "none"
    probe_nodes = np.full((int(num_probes), m), np.nan)
    probe_weights = np.full((int(num_probes), m), np.nan)
    for k in range(int(num_probes)):
        v0 = random_probe(op.n, probe, rng, like=op.template)
        result = lanczos(op, m, v0=v0, reorth=reorth, store_basis=store_basis)
        pairs = result.ritz()
        size = len(pairs)
        probe_nodes[k, :size] = pairs.values
        probe_weights[k, :size] = pairs.weights
        logger.debug(
            "slq: probe %d/%d: %d Ritz values in [%.4g, %.4g]%s",
            k + 1,
            num_probes,
            size,
            pairs.values[0],
            pairs.values[-1],
            " (invariant Krylov space)" if result.breakdown else "",
        )
    return SpectralDensity.from_probes(probe_nodes, probe_weights)
