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

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from spectral import _backend, resume
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
    num_probes: int | None = None,
    probe: str = "rademacher",
    seed: int | np.random.Generator | None = None,
    probes: Any = None,
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
        invariant to working precision (residual :math:`\beta \le \sqrt{\varepsilon}\|A\|`,
        see :func:`spectral.lanczos`) stops early and contributes fewer nodes. These are exact
        only for :math:`\beta = 0`. The dropped residual can still hide mass near the nodes
        (:meth:`SpectralDensity.cdf_bounds` accounts for it).
    num_probes:
        Number ``P`` of independent probes (default 1); their measures are averaged with
        weight ``1/P``.
    probe:
        ``"rademacher"``, ``"gaussian"`` or ``"sphere"``.
    seed:
        Integer or :class:`numpy.random.Generator` (advanced in place); ``None`` draws fresh
        entropy.
    probes:
        Explicit probe vectors instead of random ones: an ``(n, P)`` array (or ``(n,)`` for
        one probe) of any namespace and device, real, each column non-zero and finite (of
        any scale: only its direction matters); columns are moved to the operator's
        namespace and dtype. ``probe`` and ``seed`` are then unused
        and ``num_probes``, if given, must equal ``P``. The density's ``probe_kind`` is
        ``"explicit"`` (its :meth:`SpectralDensity.cdf_band` then asks for the
        distribution the columns were drawn from).
    reorth:
        Passed to :func:`spectral.lanczos`. With ``"none"`` the basis is not stored
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
        (NaN-padded after an early stop), ``source="quadrature"``, ``dimension=n``, the
        probe kind, which probes stopped early (``probe_invariant``: the residual
        :math:`\beta_{\text{stop}}` was dropped) and
        each probe's node accuracy :math:`\delta_k = \max(8(m_k + \sqrt n)\,\varepsilon
        \max_i|\theta_i|,\ \beta_{\text{stop}})` (:math:`\varepsilon` of the operator's
        dtype; :math:`\beta_{\text{stop}}` the residual dropped at an early stop), which
        :meth:`SpectralDensity.cdf_bounds` uses.

    Raises
    ------
    ValueError, TypeError
        Invalid arguments.
    spectral.errors.NumericalError
        A product produced NaN or Inf.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.diag([1.0, 1.0, 2.0, 2.0])
    >>> d = slq(A, 4, num_probes=2, seed=1)
    >>> d.num_probes, np.unique(d.nodes.round(10)).tolist()
    (2, [1.0, 2.0])
    """
    op = as_operator(A)
    explicit, host_probes = _explicit_probes(probes, op)
    num_probes = _check_counts(op, num_iters, num_probes, probe, host_probes)
    seed_description = resume.describe_seed(seed)  # before the generator is used
    rng = as_generator(seed)
    m = int(num_iters)
    record = _ProbeRecord.empty(num_probes, m, eps=op.eps, n=op.n)
    state: resume.Checkpoint | None = None
    every, first, pending = 0, 0, None
    if checkpoint is not None:
        every = resume.check_every(checkpoint_every)
        config = _config(op, m, num_probes, probe, reorth, seed_description, host_probes)
        state = resume.Checkpoint(checkpoint, kind="slq", config=config, operator=op)
        first, pending = _restore(state, rng, record)
    for k in range(first, num_probes):
        rng_state = rng.bit_generator.state
        v0 = (
            random_probe(op.n, probe, rng, like=op.template)
            if host_probes is None
            else explicit[:, k]
        )
        hook = None
        if state is not None:
            initial = pending if k == first else None
            hook = _probe_hook(state, every, initial, record, k, rng_state, op)
        result = lanczos(op, m, v0=v0, reorth=reorth, store_basis=reorth != "none", checkpoint=hook)
        record.add(k, result)
        if state is not None:
            state.save(*record.payload(k + 1, rng.bit_generator.state))
    return record.density(probe_kind="explicit" if host_probes is not None else probe)


def _check_counts(
    op: Any, num_iters: Any, num_probes: Any, probe: Any, host_probes: np.ndarray | None
) -> int:
    """Validate ``num_iters``, ``num_probes`` and ``probe``; return the number of probes.

    ``num_probes=None`` means one random probe, or as many as there are explicit
    columns; with explicit probes a given ``num_probes`` must equal their count.
    """
    if num_probes is None:
        num_probes = 1 if host_probes is None else host_probes.shape[1]
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)):
        raise argument_error("num_probes", "a positive integer", num_probes, kind=TypeError)
    if num_probes < 1:
        raise argument_error("num_probes", "a positive integer", num_probes)
    if host_probes is not None and num_probes != host_probes.shape[1]:
        raise argument_error(
            "num_probes", f"None or the number of probe columns {host_probes.shape[1]}", num_probes
        )
    if probe not in PROBE_KINDS:
        raise argument_error("probe", f"one of {PROBE_KINDS}", probe)
    if isinstance(num_iters, bool) or not isinstance(num_iters, (int, np.integer)):
        raise argument_error("num_iters", "an integer", num_iters, kind=TypeError)
    if not 1 <= num_iters <= op.n:
        raise argument_error(
            "num_iters", f"an integer with 1 <= num_iters <= n = {op.n}", num_iters
        )
    return int(num_probes)


def _config(
    op: Any,
    m: int,
    num_probes: int,
    probe: str,
    reorth: str | int,
    seed_description: Any,
    host_probes: np.ndarray | None,
) -> dict[str, Any]:
    """The arguments a state file must match to be resumed (explicit probes by their hash)."""
    config = {
        "function": "slq",
        "n": op.n,
        "num_iters": m,
        "num_probes": num_probes,
        "probe": probe,
        "reorth": reorth if isinstance(reorth, str) else int(reorth),
        "seed": seed_description,
    }
    if host_probes is not None:
        config["seed"] = "explicit"
        config["probes"] = hashlib.sha256(host_probes.tobytes()).hexdigest()
    return config


@dataclass
class _ProbeRecord:
    """What each probe's quadrature rule found: the rows of the ``(P, m)`` result arrays.

    ``nodes``/``weights`` are NaN-padded after an early stop; ``invariant`` marks the
    probes that stopped early (residual at most ``tolerance``); ``tolerance`` is each
    probe's node accuracy :math:`\\delta_k` (see :func:`slq`), computed with the
    operator's machine epsilon ``eps`` and dimension ``n``.
    """

    nodes: np.ndarray
    weights: np.ndarray
    invariant: np.ndarray
    tolerance: np.ndarray
    eps: float
    n: int

    @classmethod
    def empty(cls, num_probes: int, m: int, *, eps: float, n: int) -> _ProbeRecord:
        """Rows for ``num_probes`` probes of at most ``m`` nodes, none filled yet."""
        return cls(
            nodes=np.full((num_probes, m), np.nan),
            weights=np.full((num_probes, m), np.nan),
            invariant=np.zeros(num_probes, dtype=bool),
            tolerance=np.zeros(num_probes),
            eps=eps,
            n=n,
        )

    def add(self, k: int, result: Any) -> None:
        """Fill row ``k`` from probe ``k``'s :class:`spectral.LanczosResult`."""
        pairs = result.ritz()
        size = len(pairs)
        self.nodes[k, :size] = pairs.values
        self.weights[k, :size] = pairs.weights
        self.invariant[k] = bool(result.breakdown)
        rounding = 8.0 * (size + np.sqrt(self.n)) * self.eps * float(np.max(np.abs(pairs.values)))
        stop = float(result.residual_norm) if result.breakdown else 0.0
        self.tolerance[k] = max(rounding, stop)
        logger.debug(
            "slq: probe %d/%d: %d Ritz values in [%.4g, %.4g]%s",
            k + 1,
            self.nodes.shape[0],
            size,
            pairs.values[0],
            pairs.values[-1],
            " (invariant Krylov space)" if result.breakdown else "",
        )

    def payload(self, index: int, rng_state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """State-file arrays and meta: the rows so far, the next probe and its generator state."""
        arrays = {
            "probe_nodes": self.nodes,
            "probe_weights": self.weights,
            "probe_invariant": self.invariant,
            "probe_tolerance": self.tolerance,
        }
        return arrays, {"probe_index": index, "rng_state": rng_state}

    def density(self, *, probe_kind: str) -> SpectralDensity:
        """The pooled :class:`SpectralDensity` of the rows, with their provenance."""
        return SpectralDensity.from_probes(
            self.nodes,
            self.weights,
            source="quadrature",
            dimension=self.n,
            probe_kind=probe_kind,
            probe_invariant=self.invariant,
            probe_tolerance=self.tolerance,
        )


def _probe_hook(
    state: resume.Checkpoint,
    every: int,
    initial: resume.LanczosState | None,
    record: _ProbeRecord,
    k: int,
    rng_state: Any,
    op: Any,
) -> resume.LanczosHook:
    """The Lanczos checkpoint hook of probe ``k``: its state plus the finished rows.

    ``initial`` is the saved Lanczos state to resume probe ``k`` from (``None``:
    start it afresh); ``rng_state`` the generator state at the start of probe ``k``,
    saved so that a restart redraws the same probe.
    """
    return resume.LanczosHook(
        state,
        every,
        initial=initial,
        prefix="lz_",
        extra=lambda: record.payload(k, rng_state),
        storage=resume.storage_dtype(op.xp, op.dtype),
    )


def _explicit_probes(probes: Any, op: Any) -> tuple[Any, np.ndarray | None]:
    """Validate explicit probes: return (columns to slice, their float64 host copy)."""
    if probes is None:
        return None, None
    if isinstance(probes, list | tuple):
        probes = np.asarray(probes, dtype=np.float64)
    if not _backend.is_array(probes):
        raise argument_error("probes", f"an array of shape ({op.n}, P)", probes, kind=TypeError)
    if not _backend.is_real_floating(_backend.namespace(probes), probes.dtype):
        xp = _backend.namespace(probes)
        if not xp.isdtype(probes.dtype, ("integral", "bool")):
            raise argument_error("probes", "a real array", probes, kind=TypeError)
    host = _backend.to_host_float64(probes)
    if host.ndim == 1:
        host = host[:, None]
        probes = _backend.namespace(probes).reshape(probes, (-1, 1))
    if host.ndim != 2 or host.shape[0] != op.n or host.shape[1] < 1:
        raise argument_error("probes", f"an array of shape ({op.n}, P) with P >= 1", probes)
    if not np.all(np.isfinite(host)):
        raise argument_error("probes", "finite entries", probes)
    # only a column's direction matters (lanczos scales it): test for a non-zero entry,
    # not for a non-zero norm, whose squares underflow for entries below 1e-154
    if not np.all(np.any(host != 0.0, axis=0)):
        raise argument_error("probes", "non-zero columns", probes)
    return probes, host


def _restore(
    state: resume.Checkpoint, rng: np.random.Generator, record: _ProbeRecord
) -> tuple[int, resume.LanczosState | None]:
    """Load ``state``: fill the finished probes, restore ``rng``; return (next probe, its state)."""
    saved = state.load()
    if saved is None:
        return 0, None
    try:
        first = int(saved.meta["probe_index"])
        record.nodes[:first] = saved.arrays["probe_nodes"][:first]
        record.weights[:first] = saved.arrays["probe_weights"][:first]
        record.invariant[:first] = saved.arrays["probe_invariant"][:first]
        record.tolerance[:first] = saved.arrays["probe_tolerance"][:first]
        rng.bit_generator.state = saved.meta["rng_state"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"State file '{state.path}' lacks the SLQ state ({exc}).") from exc
    pending = None
    if "lz_iteration" in saved.meta:
        pending = resume.LanczosState.from_payload(saved, "lz_", path=state.path, n=record.n)
    logger.info("slq: resuming at probe %d of %d", first + 1, record.nodes.shape[0])
    return first, pending
