r"""The eigenspectrum of a network's curvature by (stochastic) Lanczos quadrature.

:func:`compute_eigenspectrum` builds the Hessian, generalised Gauss-Newton or
Fisher operator of a checkpoint on the training set (without augmentation),
runs ``lanczos_iters`` Lanczos steps from ``num_probes`` Rademacher probes
(one by default, as the paper argues) and returns the Ritz values
:math:`\theta_i` with their Gauss quadrature weights :math:`\gamma_i`: the
moment-matched discrete approximation
:math:`\frac1P\sum_j\delta_{\lambda_j}\approx\sum_i\gamma_i\delta_{\theta_i}`.

With probe :math:`v\in\{\pm1\}^P` the first moment is the Hutchinson estimate:
:math:`P\sum_i\gamma_i\theta_i = P\,q_1^\top A q_1 = v^\top A v`, so the stored
``trace`` is :math:`P\sum_i\gamma_i\theta_i` averaged over probes.  Its
``trace_stderr`` is :math:`\sqrt{2P m_2/K}` with :math:`m_2=\sum_i\gamma_i\theta_i^2`
and :math:`K` probes: the Rademacher variance :math:`2(\lVert A\rVert_F^2-\sum_j
a_{jj}^2)\le 2\lVert A\rVert_F^2` with :math:`\lVert A\rVert_F^2 = P\,m_2` (an
upper-bound estimate, available with a single probe).

File format (``save_spectrum_path``, ``.npz`` appended when missing), all
arrays loadable with ``allow_pickle=False``:

====================  =================================================================
key                   content
====================  =================================================================
``w``, ``eigvals``    float64[m] Ritz values, ascending (pooled over probes)
``gammas``            float64[m] weights (sum 1; probe k's weights / K when K > 1)
``residuals``         float64[m] :math:`|\beta_m s_{mi}|` of each Ritz pair
``probe_nodes``       float64[K, iters] per-probe Ritz values, NaN-padded
``probe_weights``     float64[K, iters] per-probe weights, NaN-padded
``alpha``, ``beta``   float64 recurrence coefficients of the first probe
``trace``             float64 scalar :math:`P\sum\gamma_i\theta_i`
``trace_stderr``      float64 scalar (see above)
``num_params``        int64 scalar :math:`P`
``lanczos_iters``     int64 scalar, ``num_probes`` int64 scalar
``curvature``         str ``'hessian'``, ``'ggn'`` or ``'fisher'``
``bn_mode``           str ``'train'``, ``'eval'`` or ``'none'`` (modules' own modes)
``config_json``       str: model, dataset, checkpoint, seed, params, subsample, ...
``model_fingerprint`` str: sha256 of the selected parameters' names, shapes and values
``pair_id``           str: the pair's identifier (below), ``''`` when no vectors were saved
``bulk_*``            with ``fit``: the bulk fit, and ``outlier_*`` (:mod:`nets.workflow.bulk`)
====================  =================================================================

With ``save_eigvec=True`` the Ritz vectors of the first probe go to the same
stem + ``-eigvec.npz``: ``vectors`` float32[m, P] (row i is the unit Ritz
vector of ``w[i]``), ``w`` float64[m], ``model_fingerprint``, ``param_names``
str[k], ``param_shapes_json`` (the coordinates of the rows), ``config_json`` and
``pair_id``.

The two files are bound by ``pair_id``, the SHA-256 of both files' arrays
(every key but ``pair_id``, sorted, each as dtype, shape and bytes), written
in both.  :func:`load_spectrum` recomputes it and refuses
(:class:`spectral.io.CorruptFileError`) a vector file of another run: after a
kill between the two writes, or a stale file beside a spectrum saved without
vectors.  Saving with ``save_eigvec=False`` removes an existing vector file
of the same stem.  Spectrum files written before ``pair_id`` existed load
their vector file with a logged warning (the pairing cannot be checked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curvops.model_io import OutputFn, check_output_fn
from nets.workflow._resolve import (
    build_operator,
    check_bn_mode,
    check_int,
    curvature_kind,
    default_loss,
    eigvec_file,
    is_writer,
    make_eval_loader,
    model_fingerprint,
    operator_group,
    parse_curvature,
    preserve_global_state,
    resolve_data,
    resolve_model,
    resolve_parallel,
    shard_loader,
    spectrum_file,
    state_digest,
    written,
)
from nets.workflow._resume import (
    describe_data,
    describe_loss,
    describe_model,
    describe_output_fn,
    file_digest,
)
from nets.workflow.bulk import LAWS, bulk_summary, spectrum_density
from nets.workflow.directions import ParamSpace
from spectral.density import SpectralDensity
from spectral.errors import argument_error
from spectral.io import CorruptFileError, load_npz, save_npz
from spectral.krylov import lanczos
from spectral.operator import as_operator
from spectral.probes import as_generator, random_probe
from spectral.resume import Checkpoint, LanczosHook, LanczosState, storage_dtype
from spectral.ritz import ritz_pairs

__all__ = [
    "SpectrumResult",
    "compute_eigenspectrum",
    "lanczos_spectrum",
    "load_spectrum",
    "pair_digest",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@dataclass
class SpectrumResult:
    """A computed (or loaded) spectrum; the fields mirror the file keys (module docstring).

    ``vectors`` (float32[m, P], first probe) and ``vector_values`` are set when
    Ritz vectors were kept; ``path``/``eigvec_path`` when files were written or read.

    Attributes
    ----------
    values, weights, residuals : numpy.ndarray
        Pooled Ritz values (the paper's ``w``), weights (``gammas``) and residual norms.
    probe_nodes, probe_weights : numpy.ndarray
        Per probe, NaN-padded.
    alpha, beta : numpy.ndarray
        The Lanczos coefficients (first probe).
    trace, trace_stderr : float
        Trace estimate and its standard error.
    num_params, lanczos_iters, num_probes : int
        Size of the run.
    curvature, bn_mode : str
        What was computed.
    config : dict
        The run's settings.
    vectors, vector_values : numpy.ndarray or None
        Ritz vectors and their values when kept.
    path, eigvec_path : pathlib.Path or None
        The files written or read.

    Examples
    --------
    >>> from nets import compute_eigenspectrum, get_model
    >>> model = get_model("MLP", 10, 1, 8, hidden=(16,), seed=0)
    >>> res = compute_eigenspectrum("digits", model=model, lanczos_iters=5)
    >>> type(res).__name__, res.values.shape, round(float(res.weights.sum()), 12), res.curvature
    ('SpectrumResult', (5,), 1.0, 'hessian')
    """

    values: np.ndarray
    weights: np.ndarray
    residuals: np.ndarray
    probe_nodes: np.ndarray
    probe_weights: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    trace: float
    trace_stderr: float
    num_params: int
    lanczos_iters: int
    num_probes: int
    curvature: str
    bn_mode: str
    model_fingerprint: str
    config: dict[str, Any] = field(default_factory=dict)
    vectors: np.ndarray | None = None
    vector_values: np.ndarray | None = None
    param_names: tuple[str, ...] = ()
    param_shapes_json: str = "{}"
    path: Path | None = None
    eigvec_path: Path | None = None
    pair_id: str = ""
    bulk: dict[str, Any] = field(default_factory=dict)

    def density(self) -> SpectralDensity:
        """The pooled quadrature measure (per-probe rules kept: bounds and bands apply)."""
        return spectrum_density(self)

    def to_arrays(self) -> dict[str, Any]:
        """The spectrum file's arrays (see the module docstring)."""
        return {
            "w": np.asarray(self.values, dtype=np.float64),
            "eigvals": np.asarray(self.values, dtype=np.float64),
            "gammas": np.asarray(self.weights, dtype=np.float64),
            "residuals": np.asarray(self.residuals, dtype=np.float64),
            "probe_nodes": np.asarray(self.probe_nodes, dtype=np.float64),
            "probe_weights": np.asarray(self.probe_weights, dtype=np.float64),
            "alpha": np.asarray(self.alpha, dtype=np.float64),
            "beta": np.asarray(self.beta, dtype=np.float64),
            "trace": np.float64(self.trace),
            "trace_stderr": np.float64(self.trace_stderr),
            "num_params": np.int64(self.num_params),
            "lanczos_iters": np.int64(self.lanczos_iters),
            "num_probes": np.int64(self.num_probes),
            "curvature": np.str_(self.curvature),
            "bn_mode": np.str_(self.bn_mode),
            "config_json": np.str_(json.dumps(self.config, sort_keys=True)),
            "model_fingerprint": np.str_(self.model_fingerprint),
            "pair_id": np.str_(self.pair_id),
            **self.bulk,
        }

    def eigvec_arrays(self) -> dict[str, Any]:
        """The ``-eigvec.npz`` arrays; raises ``ValueError`` when no vectors were kept."""
        if self.vectors is None or self.vector_values is None:
            raise argument_error("save_eigvec", "True when the spectrum was computed", False)
        return {
            "vectors": np.asarray(self.vectors, dtype=np.float32),
            "w": np.asarray(self.vector_values, dtype=np.float64),
            "model_fingerprint": np.str_(self.model_fingerprint),
            "param_names": np.asarray(self.param_names, dtype=np.str_),
            "param_shapes_json": np.str_(self.param_shapes_json),
            "config_json": np.str_(json.dumps(self.config, sort_keys=True)),
            "pair_id": np.str_(self.pair_id),
        }

    def save(self, path: PathLike, *, save_eigvec: bool | None = None) -> Path:
        """Write the spectrum (and, if kept and wanted, the Ritz vectors) atomically.

        Both files get the same ``pair_id`` (module docstring); without vectors
        the spectrum's ``pair_id`` is ``''`` and an existing vector file of the
        same stem (an earlier run's) is removed.
        """
        target = spectrum_file(path)
        vec_path = eigvec_file(target)
        if save_eigvec is None:
            save_eigvec = self.vectors is not None
        if save_eigvec:
            vec_arrays = self.eigvec_arrays()
            self.pair_id = pair_digest(self.to_arrays(), vec_arrays)
            save_npz(target, **self.to_arrays())
            save_npz(vec_path, **self.eigvec_arrays())
            self.eigvec_path = vec_path
        else:
            self.pair_id = ""
            save_npz(target, **self.to_arrays())
            if vec_path.is_file():
                vec_path.unlink()
                logger.info("removed the Ritz vectors of an earlier run: %s", vec_path)
            self.eigvec_path = None
        self.path = target
        return target


def pair_digest(spectrum: Mapping[str, Any], vectors: Mapping[str, Any]) -> str:
    """The ``pair_id`` binding a spectrum file's arrays to its Ritz-vector file's arrays.

    SHA-256 (hex) over both mappings' keys except ``pair_id`` (sorted), each
    as its dtype, shape and bytes.

    >>> a, b = {"w": np.ones(2)}, {"vectors": np.eye(2, dtype=np.float32)}
    >>> pair_digest(a, b) == pair_digest({**a, "pair_id": "x"}, b)
    True
    >>> pair_digest(a, b) == pair_digest({"w": np.array([1.0, 2.0])}, b)
    False
    """
    h = hashlib.sha256(b"deep-curvature-spectrum-pair/1|")
    for label, arrays in (("spectrum", spectrum), ("eigvec", vectors)):
        for key in sorted(k for k in arrays if k != "pair_id"):
            a = np.ascontiguousarray(np.asarray(arrays[key]))
            h.update(f"{label}|{key}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def load_spectrum(path: PathLike, *, with_vectors: bool = True) -> SpectrumResult:
    """Read a spectrum file (``.npz`` may be omitted) and, if present, its ``-eigvec.npz``.

    With ``with_vectors`` the vector file is loaded only if its ``pair_id``
    binds it to this spectrum (module docstring); a spectrum saved with
    vectors whose vector file is gone loads without vectors (logged).

    Parameters
    ----------
    path : str or os.PathLike
        The spectrum file (``.npz`` may be omitted).
    with_vectors : bool
        Also load the Ritz vectors of its ``-eigvec.npz``.

    Returns
    -------
    SpectrumResult
        The spectrum (with ``vectors`` when loaded).

    Raises
    ------
    FileNotFoundError, spectral.io.CorruptFileError
        Missing or unreadable file; a vector file that belongs to another run
        (the message names both files; delete the stale one or pass
        ``with_vectors=False``).
    ValueError
        A file without the spectrum keys.

    Examples
    --------
    >>> import os, tempfile
    >>> from nets import build_loss_landscape, compute_eigenspectrum, get_model
    >>> out = tempfile.mkdtemp()
    >>> model = get_model("MLP", 10, 1, 8, hidden=(16,), seed=0)   # any nn.Module, or a name
    >>> _ = compute_eigenspectrum("digits", model=model, lanczos_iters=5, save_eigvec=True,
    ...                           save_spectrum_path=os.path.join(out, "spectrum"))
    >>> res = load_spectrum(os.path.join(out, "spectrum"))
    >>> res.values.shape, res.vectors.shape
    ((5,), (5, 1210))
    """
    target = spectrum_file(path)
    if not target.is_file() and Path(os.fspath(path)).is_file():
        target = Path(os.fspath(path))
    arrays = load_npz(target)
    missing = [k for k in ("w", "gammas", "num_params") if k not in arrays]
    if missing:
        raise argument_error("path", "a spectrum file written by compute_eigenspectrum", target)

    def scalar(key: str, default: Any) -> Any:
        return arrays[key].item() if key in arrays else default

    w = np.asarray(arrays["w"], dtype=np.float64)
    nan = np.full(w.shape, np.nan)
    result = SpectrumResult(
        values=w,
        weights=np.asarray(arrays["gammas"], dtype=np.float64),
        residuals=np.asarray(arrays.get("residuals", nan), dtype=np.float64),
        probe_nodes=np.asarray(arrays.get("probe_nodes", w[None]), dtype=np.float64),
        probe_weights=np.asarray(arrays.get("probe_weights", arrays["gammas"][None])),
        alpha=np.asarray(arrays.get("alpha", np.empty(0)), dtype=np.float64),
        beta=np.asarray(arrays.get("beta", np.empty(0)), dtype=np.float64),
        trace=float(scalar("trace", np.nan)),
        trace_stderr=float(scalar("trace_stderr", np.nan)),
        num_params=int(scalar("num_params", 0)),
        lanczos_iters=int(scalar("lanczos_iters", w.size)),
        num_probes=int(scalar("num_probes", 1)),
        curvature=str(scalar("curvature", "unknown")),
        bn_mode=str(scalar("bn_mode", "unknown")),
        model_fingerprint=str(scalar("model_fingerprint", "")),
        config=json.loads(str(scalar("config_json", "{}"))),
        path=target,
        pair_id=str(scalar("pair_id", "")),
        bulk={k: arrays[k] for k in arrays if k.startswith(("bulk_", "outlier_"))},
    )
    vec_path = eigvec_file(target)
    if with_vectors and "pair_id" in arrays and result.pair_id and not vec_path.is_file():
        logger.warning("spectrum %s was saved with Ritz vectors, but %s is gone", target, vec_path)
    if with_vectors and vec_path.is_file():
        vec = load_npz(vec_path)
        check_pair(target, arrays, vec_path, vec)
        result.vectors = np.asarray(vec["vectors"])
        result.vector_values = np.asarray(vec["w"], dtype=np.float64)
        result.param_names = tuple(str(n) for n in np.asarray(vec["param_names"]).tolist())
        result.param_shapes_json = str(vec["param_shapes_json"])
        result.eigvec_path = vec_path
    return result


def check_pair(
    target: Path, arrays: Mapping[str, Any], vec_path: Path, vec: Mapping[str, Any]
) -> None:
    """Refuse a vector file that is not the one saved with this spectrum.

    ``arrays`` and ``vec`` are the loaded contents of the spectrum file ``target`` and of
    the vector file ``vec_path`` (see the module docstring for ``pair_id``); used by
    :func:`load_spectrum` and by the landscape's Ritz directions.
    """
    if "pair_id" not in arrays:
        logger.warning(
            "spectrum %s predates pair identifiers: %s is assumed to belong to it", target, vec_path
        )
        return
    stored = str(arrays["pair_id"])
    if not stored:
        reason = "the spectrum was saved without Ritz vectors, so this file is an earlier run's"
    elif "pair_id" not in vec or str(vec["pair_id"]) != stored:
        reason = "the two files carry different pair identifiers (written by different runs)"
    elif pair_digest(arrays, vec) != stored:
        reason = "their contents do not hash to the pair identifier they carry (edited files)"
    else:
        return
    raise CorruptFileError(
        f"Spectrum '{target}' and Ritz-vector file '{vec_path}' do not belong together: "
        f"{reason}. Delete the stale vector file (or recompute with save_eigvec=True), or "
        "load with with_vectors=False."
    )


def lanczos_spectrum(
    operator: Any,
    lanczos_iters: int,
    *,
    num_probes: int = 1,
    seed: int = 0,
    keep_vectors: bool = False,
    progress: bool = False,
    state: Checkpoint | None = None,
    checkpoint_every: int = 10,
) -> dict[str, Any]:
    """Lanczos from ``num_probes`` Rademacher probes on any symmetric operator.

    The probes are those of :func:`spectral.slq` with the same ``seed``
    (drawn in turn from ``numpy.random.default_rng(seed)``), so the pooled
    measure equals ``slq(operator, lanczos_iters, num_probes=..., seed=seed)``.
    Returns a dict with ``values``, ``weights``, ``residuals``, ``probe_nodes``,
    ``probe_weights``, ``alpha``, ``beta``, ``trace``, ``trace_stderr``,
    ``num_params`` and (``keep_vectors``) ``vectors`` float32[m, P] and
    ``vector_values`` of the first probe.  ``progress`` shows a bar over the
    ``num_probes * lanczos_iters`` products.  ``state`` (a
    :class:`spectral.resume.Checkpoint` bound to ``operator``) makes the run
    resumable: each finished probe and, every ``checkpoint_every`` steps, the
    Lanczos state of the current one are saved; a saved state is resumed.

    >>> out = lanczos_spectrum(np.diag([1.0, 2.0, 3.0, 4.0]), 4, seed=0)
    >>> out["values"].round(12).tolist(), round(out["trace"], 12)
    ([1.0, 2.0, 3.0, 4.0], 10.0)
    """
    op = as_operator(operator)
    n = op.n
    m = check_int("lanczos_iters", lanczos_iters, 1, n)
    k = check_int("num_probes", num_probes, 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=k * m, desc="Lanczos", unit="product")
        base = op

        def counted(x: Any) -> Any:
            y = base.matvec(x)
            bar.update()
            return y

        op = as_operator(counted, size=n, like=base.template)
    try:
        return _probes(op, m, k, seed, keep_vectors, state, checkpoint_every)
    finally:
        if bar is not None:
            bar.close()


_PROBE_OUTPUTS = ("alpha", "beta", "vectors", "vector_values")


def _probes(
    op: Any,
    m: int,
    k: int,
    seed: int,
    keep_vectors: bool,
    state: Checkpoint | None = None,
    every: int = 10,
) -> dict[str, Any]:
    n = op.n
    rng = as_generator(seed)
    probe_nodes = np.full((k, m), np.nan)
    probe_weights = np.full((k, m), np.nan)
    probe_residuals = np.full((k, m), np.nan)
    out: dict[str, Any] = {}
    first, pending = 0, None
    saved = None if state is None else state.load()
    if saved is not None and state is not None:
        probes = (probe_nodes, probe_weights, probe_residuals)
        first = _restore_probes(saved, state.path, probes, out, rng, keep_vectors)
        if "lz_iteration" in saved.meta:
            pending = LanczosState.from_payload(saved, "lz_", path=state.path, n=n)
        logger.info("resuming the spectrum at probe %d of %d", first + 1, k)

    def payload(index: int, rng_state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        arrays = {
            "probe_nodes": probe_nodes,
            "probe_weights": probe_weights,
            "probe_residuals": probe_residuals,
            **{key: out[key] for key in _PROBE_OUTPUTS if key in out},
        }
        return arrays, {"probe_index": index, "rng_state": rng_state}

    for j in range(first, k):
        rng_state = rng.bit_generator.state
        v0 = random_probe(n, "rademacher", rng, like=op.template)
        hook = None
        if state is not None:
            hook = LanczosHook(
                state,
                every,
                initial=pending if j == first else None,
                prefix="lz_",
                extra=lambda j=j, s=rng_state: payload(j, s),  # type: ignore[misc]
                storage=storage_dtype(op.xp, op.dtype),
            )
        result = lanczos(op, m, v0=v0, reorth="full", store_basis=True, checkpoint=hook)
        with_vectors = keep_vectors and j == 0
        # Ritz vectors (basis @ S, P x m) only where they are kept
        pairs = ritz_pairs(
            result.alpha, result.beta, result.residual_norm, result.basis if with_vectors else None
        )
        size = len(pairs)
        probe_nodes[j, :size] = pairs.values
        probe_weights[j, :size] = pairs.weights
        probe_residuals[j, :size] = pairs.residuals
        if j == 0:
            out.update(_first_probe_outputs(result, pairs, with_vectors))
        logger.info(
            "probe %d/%d: %d Ritz values in [%.4g, %.4g]%s",
            j + 1,
            k,
            size,
            pairs.values[0],
            pairs.values[-1],
            " (invariant Krylov space)" if result.breakdown else "",
        )
        if state is not None:
            state.save(*payload(j + 1, rng.bit_generator.state))
    out.update(_pooled(probe_nodes, probe_weights, probe_residuals, n))
    return out


_PROBE_ARRAYS = ("probe_nodes", "probe_weights", "probe_residuals")


def _restore_probes(
    saved: Any,
    path: Path,
    probes: tuple[np.ndarray, ...],
    out: dict[str, Any],
    rng: np.random.Generator,
    keep_vectors: bool,
) -> int:
    """Put the finished probes of a saved state into ``probes`` (the arrays of
    :data:`_PROBE_ARRAYS`), the first probe's outputs into ``out`` and the random stream
    into ``rng``; return the number of finished probes.

    A state that lacks any of them (a hand edit, another writer) is a
    :class:`~spectral.io.CorruptFileError` naming the file and the key.
    """
    k, m = probes[0].shape
    try:
        first = int(saved.meta["probe_index"])
        rng.bit_generator.state = saved.meta["rng_state"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptFileError(
            f"File '{path}': its meta_json lacks a valid probe index or random state ({exc!r})."
        ) from exc
    needed = list(_PROBE_ARRAYS)
    if first > 0:  # the first probe's outputs were saved with it
        needed += ["alpha", "beta"] + (["vectors", "vector_values"] if keep_vectors else [])
    missing = [key for key in needed if key not in saved.arrays]
    if missing or not 0 <= first <= k:
        what = f"lacks {', '.join(map(repr, missing))}" if missing else f"says {first} probes"
        raise CorruptFileError(
            f"File '{path}' is not a state of this spectrum: it {what} (a state of "
            f"{k} probes of {m} Lanczos steps has {', '.join(map(repr, needed))}). "
            "Delete it to start anew."
        )
    for name, arr in zip(_PROBE_ARRAYS, probes, strict=True):
        got = np.asarray(saved.arrays[name])
        if got.ndim != 2 or got.shape[0] < first or got.shape[1] != m:
            raise CorruptFileError(
                f"File '{path}': {name!r} has shape {got.shape}; expected ({k}, {m})."
            )
        arr[:first] = got[:first]
    out.update({key: saved.arrays[key] for key in _PROBE_OUTPUTS if key in saved.arrays})
    return first


def _first_probe_outputs(result: Any, pairs: Any, with_vectors: bool) -> dict[str, Any]:
    """The first probe's tridiagonal (``alpha``, ``beta``) and, if kept, its Ritz vectors."""
    out: dict[str, Any] = {
        "alpha": np.asarray(result.alpha, dtype=np.float64),
        "beta": np.asarray(result.beta, dtype=np.float64),
    }
    if with_vectors:
        vectors = pairs.vectors
        if isinstance(vectors, torch.Tensor):
            host = vectors.detach().to("cpu", torch.float32).numpy()
        else:
            host = np.asarray(vectors, dtype=np.float32)
        out["vectors"] = np.ascontiguousarray(host.T)
        out["vector_values"] = pairs.values.copy()
    return out


def _pooled(
    probe_nodes: np.ndarray, probe_weights: np.ndarray, probe_residuals: np.ndarray, n: int
) -> dict[str, Any]:
    """The ``k`` probes' quadratures pooled into one density (sorted nodes, weights summing to 1),
    with the trace estimate ``n * sum(w * theta)`` and its standard error."""
    k = probe_nodes.shape[0]
    keep = ~np.isnan(probe_nodes)
    nodes = probe_nodes[keep]
    order = np.argsort(nodes, kind="stable")
    weights = (probe_weights[keep] / k)[order]
    values = nodes[order]
    weights = weights / weights.sum()
    return {
        "values": values,
        "weights": weights,
        "residuals": probe_residuals[keep][order],
        "probe_nodes": probe_nodes,
        "probe_weights": probe_weights,
        "trace": float(n * np.sum(weights * values)),
        "trace_stderr": float(np.sqrt(2.0 * n * np.sum(weights * values**2) / k)),
        "num_params": n,
    }


def compute_eigenspectrum(
    dataset: Any = "digits",
    data_path: PathLike | None = None,
    model: Any = None,
    checkpoint_path: PathLike | None = None,
    save_spectrum_path: PathLike | None = None,
    save_eigvec: bool = False,
    lanczos_iters: int = 20,
    curvature_matrix: str = "hessian",
    num_probes: int = 1,
    bn_mode: str | None = "train",
    params: Any = None,
    subsample: int | float | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "auto",
    loss_fn: Callable[..., torch.Tensor] | None = None,
    progress: bool = False,
    process_group: Any = None,
    state_path: PathLike | None = None,
    checkpoint_every: int = 10,
    fit: str | None = None,
    output_fn: OutputFn | None = None,
) -> SpectrumResult:
    """Lanczos spectrum of a network's Hessian, GGN or Fisher at a checkpoint.

    Parameters
    ----------
    dataset, data_path:
        A dataset name (loaded from ``data_path``), a ``DatasetSplits`` (its
        ``train_eval`` split is used), a ``Dataset`` or a ``DataLoader``.
    model:
        A registered model name, an ``nn.Module`` (never modified) or ``None``
        (rebuilt from the checkpoint's config).  A name without a checkpoint is
        initialised with ``seed``.
    checkpoint_path:
        Checkpoint whose weights are analysed (optional with an ``nn.Module``).
    save_spectrum_path:
        Where to write the spectrum (``.npz`` appended when missing); ``None``
        writes nothing.
    save_eigvec:
        Also keep the Ritz vectors and write them to ``<stem>-eigvec.npz``.
    lanczos_iters:
        Lanczos steps ``m`` per probe, ``1 <= m <= P``.
    curvature_matrix:
        ``'hessian'``, ``'ggn'``, ``'fisher'``, ``'empirical-fisher'``;
        ``'ggn-lanczos'``, ``'hessian_lanczos'`` and other spellings are
        accepted (case-insensitive).
    num_probes:
        Number of Rademacher start vectors (default one, as in the paper).
    bn_mode:
        BatchNorm during products: ``'train'`` (batch statistics, the paper's
        default), ``'eval'`` (running statistics) or ``None`` (modules' modes).
    params:
        Parameter subset (``None``: all trainable; names, modules or a
        predicate as ``curvops`` accepts).
    subsample:
        Use a seeded random subset of the training set: a count or a fraction.
    batch_size, seed, device, loss_fn, progress:
        Batch size of the curvature products; seed of probes, subsampling and
        Monte-Carlo Fisher; ``'auto'``/``'cpu'``/``'cuda'``; the loss
        (cross-entropy by default, reduction ``'mean'``); a progress bar over
        the Lanczos products.
    process_group:
        Under ``torchrun`` (``torch.distributed`` initialised) each rank takes
        every W-th batch of the training loader and products are summed over
        the group (:mod:`curvops.distributed`); vectors and the Lanczos recurrence
        are replicated, so every rank returns the same result and only rank 0
        writes the files.  ``None``: the default group when initialised;
        ``False``: no communication (each rank on its own); or a process group.
        ``device='auto'`` then means ``cuda:LOCAL_RANK`` (or the CPU).

    state_path:
        State file for resumable runs (see :mod:`spectral.resume` and
        :mod:`nets.workflow._resume`): every ``checkpoint_every`` Lanczos steps and
        after each probe the recurrence state is saved atomically; a killed run
        restarted with the same arguments resumes and returns bit-identical
        results on the CPU.  A state of another configuration, checkpoint, model
        (parameters and buffers), data (its contents) or loss (any setting) is
        refused (:class:`spectral.resume.StateMismatchError`).  Costs
        one extra product (the operator fingerprint).  ``None``: no state file.
    checkpoint_every:
        Save interval in Lanczos steps.
    fit:
        ``'mp'`` (Marchenko–Pastur) or ``'semicircle'``: fit the bulk of the density and
        list the outliers with their Ritz residuals (:func:`nets.workflow.bulk.bulk_summary`),
        stored in ``result.bulk`` and the file; ``None``: no fit.
    output_fn:
        Which tensor of the model's output the loss takes (see
        :mod:`curvops.model_io`, passed to the operator): ``None`` for a tensor
        output, the ``logits`` of a dict or Hugging Face ``ModelOutput``, or the first
        item of a tuple; or a callable ``output -> tensor``.

    Returns
    -------
    SpectrumResult
        Also written to ``save_spectrum_path`` (format in the module docstring).

    Raises
    ------
    ValueError, TypeError
        Bad arguments (unknown curvature name, ``lanczos_iters <= 0`` or > P, ...).
    FileNotFoundError, spectral.io.CorruptFileError
        Missing or unreadable checkpoint.
    spectral.errors.NumericalError
        A curvature product produced NaN/Inf.

    Examples
    --------
    >>> import os, tempfile
    >>> from nets import build_loss_landscape, compute_eigenspectrum, get_model
    >>> out = tempfile.mkdtemp()
    >>> model = get_model("MLP", 10, 1, 8, hidden=(16,), seed=0)   # any nn.Module, or a name
    >>> res = compute_eigenspectrum("digits", model=model, lanczos_iters=5,
    ...                              save_spectrum_path=os.path.join(out, "spectrum"))
    >>> res.num_params, len(res.values), res.curvature, res.path.name
    (1210, 5, 'hessian', 'spectrum.npz')
    """
    curvature, mode = _checked_arguments(
        curvature_matrix, bn_mode, fit, save_eigvec, lanczos_iters=lanczos_iters,
        num_probes=num_probes, checkpoint_every=checkpoint_every, batch_size=batch_size, seed=seed,
    )  # fmt: skip
    settings = _SpectrumSettings(
        curvature, lanczos_iters, num_probes, mode, params, subsample, batch_size, seed,
        save_eigvec, check_output_fn(output_fn),
    )  # fmt: skip
    loss = default_loss(loss_fn)
    group, device = resolve_parallel(process_group, device)
    with preserve_global_state():
        data = resolve_data(dataset, data_path, seed=seed)
        loss = default_loss(loss_fn, data.task)  # the task's loss (language models)
        resolved = resolve_model(
            model, checkpoint_path, data, device=device, seed=seed, copy_module=False
        )
        loader = make_eval_loader(data.train, batch_size, subsample=subsample, seed=seed)
        operator = build_operator(
            curvature, resolved.model, loss, shard_loader(loader, group),
            params=params, bn_mode=mode, seed=seed, process_group=operator_group(group),
            output_fn=output_fn,
        )  # fmt: skip
        names = [name for name, _ in operator.params]
        space = ParamSpace.from_model(resolved.model, names)
        fingerprint = model_fingerprint(resolved.model, names)
        state = None
        if state_path is not None:
            state_config = settings.state_config(
                dataset, data_path, model, checkpoint_path,
                fingerprint=fingerprint, names=names, loss=loss, work=resolved.model,
            )  # fmt: skip
            state = Checkpoint(
                state_path, kind="compute_eigenspectrum", config=state_config,
                operator=as_operator(operator),
            )  # fmt: skip
        out = lanczos_spectrum(
            operator,
            lanczos_iters,
            num_probes=num_probes,
            seed=seed,
            keep_vectors=save_eigvec,
            progress=progress and is_writer(group),
            state=state,
            checkpoint_every=checkpoint_every,
        )
    config = settings.output_config(resolved, data, data_path, names, loader, loss)
    result = spectrum_result(
        out, config, space, fingerprint, curvature=curvature, bn_mode=mode,
        lanczos_iters=lanczos_iters, num_probes=num_probes,
    )  # fmt: skip
    if fit is not None:
        result.bulk = bulk_summary(result, fit)
    if save_spectrum_path is not None:
        _save_spectrum(result, save_spectrum_path, save_eigvec=save_eigvec, group=group)
    return result


@dataclass(frozen=True)
class _SpectrumSettings:
    """The spectrum's settings, as :func:`compute_eigenspectrum` received them (checked).

    One place for the two records of them: the resumable state's configuration
    (which a restarted run must match) and the result's ``config``.
    """

    curvature: str
    lanczos_iters: int
    num_probes: int
    bn_mode: str | None
    params: Any
    subsample: Any
    batch_size: int
    seed: int
    save_eigvec: bool
    output_fn: OutputFn | None = None

    def state_config(
        self,
        dataset: Any,
        data_path: Any,
        model: Any,
        checkpoint_path: Any,
        *,
        fingerprint: str,
        names: list[str],
        loss: Any,
        work: Any = None,
    ) -> dict[str, Any]:
        """What a resumable state must match to be resumed: the data's contents
        (:func:`nets.workflow._resume.describe_data`), the loss's full configuration
        (``loss_fn``), the working model's parameters and buffers (``model_state``:
        :func:`nets.workflow._resolve.state_digest` of ``work``, after the checkpoint is
        loaded), the checkpoint's digest and every setting."""
        return {
            "function": "compute_eigenspectrum",
            "dataset": describe_data(dataset),
            "data_path": None if data_path is None else os.fspath(data_path),
            "model": describe_model(model),
            "model_fingerprint": fingerprint,
            "model_state": None if work is None else state_digest(work),
            "checkpoint": file_digest(checkpoint_path),
            "curvature": self.curvature,
            "lanczos_iters": int(self.lanczos_iters),
            "num_probes": int(self.num_probes),
            "bn_mode": self.bn_mode,
            "params": names,
            "subsample": self.subsample,
            "batch_size": int(self.batch_size),
            "seed": int(self.seed),
            "loss_fn": describe_loss(loss),
            "save_eigvec": self.save_eigvec,
            "output_fn": describe_output_fn(self.output_fn),
        }

    def output_config(
        self, resolved: Any, data: Any, data_path: Any, names: list[str], loader: Any, loss: Any
    ) -> dict[str, Any]:
        """The result's ``config``: the run's settings, model, checkpoint and data."""
        return {
            "function": "compute_eigenspectrum",
            "model": resolved.name,
            "dataset": data.name,
            "data_path": None if data_path is None else os.fspath(data_path),
            "checkpoint": resolved.checkpoint_path,
            "epoch": resolved.epoch,
            "curvature": self.curvature,
            "lanczos_iters": int(self.lanczos_iters),
            "num_probes": int(self.num_probes),
            "probe": "rademacher",
            "reorth": "full",
            "bn_mode": self.bn_mode,
            "params": None if self.params is None else names,
            "subsample": self.subsample,
            "num_samples": len(loader.dataset),
            "batch_size": loader.batch_size,
            "seed": int(self.seed),
            "device": str(next(iter(resolved.model.parameters())).device),
            "loss": type(loss).__name__,
            "output_fn": describe_output_fn(self.output_fn),
        }


def _checked_arguments(
    curvature_matrix: str, bn_mode: str | None, fit: str | None, save_eigvec: Any, **counts: int
) -> tuple[str, str | None]:
    """The curvature kind and BatchNorm mode; ``ValueError``/``TypeError`` naming bad arguments."""
    curvature = parse_curvature(curvature_matrix)
    for name, minimum in (
        ("lanczos_iters", 1), ("num_probes", 1), ("checkpoint_every", 1), ("batch_size", 1),
        ("seed", 0),
    ):  # fmt: skip
        check_int(name, counts[name], minimum)
    mode = check_bn_mode(bn_mode)
    if fit is not None and fit not in LAWS:
        raise argument_error("fit", f"None or one of {tuple(LAWS)}", fit)
    if not isinstance(save_eigvec, bool):
        raise argument_error("save_eigvec", "a bool", save_eigvec, kind=TypeError)
    return curvature, mode


def spectrum_result(
    out: dict[str, Any],
    config: dict[str, Any],
    space: ParamSpace,
    fingerprint: str,
    *,
    curvature: str,
    bn_mode: str | None,
    lanczos_iters: int,
    num_probes: int,
) -> SpectrumResult:
    """The :class:`SpectrumResult` of a :func:`lanczos_spectrum` output ``out``."""
    return SpectrumResult(
        values=out["values"],
        weights=out["weights"],
        residuals=out["residuals"],
        probe_nodes=out["probe_nodes"],
        probe_weights=out["probe_weights"],
        alpha=out["alpha"],
        beta=out["beta"],
        trace=out["trace"],
        trace_stderr=out["trace_stderr"],
        num_params=out["num_params"],
        lanczos_iters=int(lanczos_iters),
        num_probes=int(num_probes),
        curvature=curvature_kind(curvature),
        bn_mode="none" if bn_mode is None else bn_mode,
        model_fingerprint=fingerprint,
        config=config,
        vectors=out.get("vectors"),
        vector_values=out.get("vector_values"),
        param_names=space.names,
        param_shapes_json=space.shapes_json(),
    )


def _save_spectrum(result: SpectrumResult, path: Any, *, save_eigvec: bool, group: Any) -> None:
    """Rank 0 writes the spectrum (and Ritz vectors); every rank records the paths."""
    if is_writer(group):
        result.save(path, save_eigvec=save_eigvec)
        logger.info("spectrum written to %s", result.path)
    else:
        result.path = spectrum_file(path)
        result.eigvec_path = eigvec_file(result.path) if save_eigvec else None
    written(group)
