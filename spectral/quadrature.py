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
import os
from typing import Any

import numpy as np

from spectral import resume
from spectral.density import SpectralDensity
from spectral.errors import argument_error
from spectral.io import CorruptFileError
from spectral.krylov import lanczos
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
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
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
    checkpoint:
        Path of a state file (see :mod:`spectral.resume`): the finished probes' nodes and
        weights, the generator state at the start of the current probe and its Lanczos
        state (every ``checkpoint_every`` steps) are saved there atomically; a restarted
        call with the same arguments resumes (bit-identical on the CPU, including with
        ``seed=None``: the generator state is restored from the file).  A file of other
        arguments or another operator raises :class:`spectral.resume.StateMismatchError`.
    checkpoint_every:
        Save interval in Lanczos steps (a positive integer).

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
    seed_description = resume.describe_seed(seed)  # before the generator is used
    rng = as_generator(seed)
    m = int(num_iters)
    store_basis = reorth != "none"
    probe_nodes = np.full((int(num_probes), m), np.nan)
    probe_weights = np.full((int(num_probes), m), np.nan)
    state: resume.Checkpoint | None = None
    first, pending = 0, None
    if checkpoint is not None:
        every = resume.check_every(checkpoint_every)
        config = {
            "function": "slq",
            "n": op.n,
            "num_iters": m,
            "num_probes": int(num_probes),
            "probe": probe,
            "reorth": reorth if isinstance(reorth, str) else int(reorth),
            "seed": seed_description,
        }
        state = resume.Checkpoint(checkpoint, kind="slq", config=config, operator=op)
        first, pending = _restore(state, rng, probe_nodes, probe_weights)

    def save_probes(index: int, rng_state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        arrays = {"probe_nodes": probe_nodes, "probe_weights": probe_weights}
        return arrays, {"probe_index": index, "rng_state": rng_state}

    for k in range(first, int(num_probes)):
        rng_state = rng.bit_generator.state
        v0 = random_probe(op.n, probe, rng, like=op.template)
        hook = None
        if state is not None:
            hook = resume.LanczosHook(
                state,
                every,
                initial=pending if k == first else None,
                prefix="lz_",
                extra=lambda k=k, s=rng_state: save_probes(k, s),  # type: ignore[misc]
                storage=resume.storage_dtype(op.xp, op.dtype),
            )
        result = lanczos(op, m, v0=v0, reorth=reorth, store_basis=store_basis, checkpoint=hook)
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
        if state is not None:
            state.save(*save_probes(k + 1, rng.bit_generator.state))
    return SpectralDensity.from_probes(probe_nodes, probe_weights)


def _restore(
    state: resume.Checkpoint,
    rng: np.random.Generator,
    probe_nodes: np.ndarray,
    probe_weights: np.ndarray,
) -> tuple[int, resume.LanczosState | None]:
    """Load ``state``: fill the finished probes, restore ``rng``; return (next probe, its state)."""
    saved = state.load()
    if saved is None:
        return 0, None
    try:
        first = int(saved.meta["probe_index"])
        probe_nodes[:first] = saved.arrays["probe_nodes"][:first]
        probe_weights[:first] = saved.arrays["probe_weights"][:first]
        rng.bit_generator.state = saved.meta["rng_state"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"State file '{state.path}' lacks the SLQ state ({exc}).") from exc
    pending = None
    if "lz_iteration" in saved.meta:
        pending = resume.LanczosState.from_payload(saved, "lz_", path=state.path)
    logger.info("slq: resuming at probe %d of %d", first + 1, probe_nodes.shape[0])
    return first, pending
