r"""Per-block curvature spectra: why transformers need adaptive optimisers, in one call.

:func:`compute_block_spectra` cuts the Hessian (GGN, Fisher) :math:`A` of a checkpoint's
mean training loss into the diagonal blocks :math:`A_{bb} = P_b^\top A P_b` of a
partition of the parameters (:math:`P_b` selects block :math:`b`'s :math:`n_b`
coordinates): one block per layer (:func:`curvops.per_layer`), the transformer partition
of :func:`curvops.transformer_blocks` (embeddings, norms, query/key/value per head,
attention output, MLPs) or any labelled partition (:func:`curvops.per_block`).  Each
block's spectral density

.. math::
    \mu_b = \frac{1}{n_b}\sum_{j=1}^{n_b} \delta_{\lambda_j(A_{bb})}
    \;\approx\; \frac1K \sum_{k=1}^{K} \sum_{i=1}^{m_b} \gamma^{(k)}_{i}\,
    \delta_{\theta^{(k)}_{i}}

is estimated by stochastic Lanczos quadrature (:func:`spectral.slq`): :math:`m_b =
\min(m, n_b)` Lanczos steps on the block operator from each of :math:`K` Rademacher
probes :math:`v^{(k)}`, whose Ritz values :math:`\theta^{(k)}_i` and squared first
components :math:`\gamma^{(k)}_i` of the Ritz vectors are the Gauss quadrature rule of
the probe's spectral measure (exact for polynomials of degree :math:`\le 2m_b - 1`).
Block :math:`b` (0-based, in order) draws its probes from its own seed
``np.random.SeedSequence([seed, b]).generate_state(1)[0]`` (stored as ``seed`` of the block),
so the blocks' probes are independent and
``slq(block_operator, m_b, num_probes=K, seed=result.blocks[label].seed)`` reproduces a block.

Per block the file and :class:`BlockSpectrum` report:

* ``size`` :math:`n_b` and the pooled Ritz values and weights;
* ``trace`` :math:`n_b \sum_i \gamma_i\theta_i` (:math:`=\frac1K\sum_k
  v^{(k)\top} A_{bb} v^{(k)}`, Hutchinson's estimate) with its standard error
  :math:`\sqrt{2 n_b m_2 / K}`, :math:`m_2 = \sum_i\gamma_i\theta_i^2` (as for
  :func:`nets.compute_eigenspectrum`); ``mean`` :math:`=\mathrm{tr}(A_{bb})/n_b`;
* ``top``: the largest Ritz value, a lower bound on :math:`\lambda_{\max}(A_{bb})`
  (Cauchy interlacing) within its Ritz residual :math:`|\beta_{m} s_{m i}|` of an
  eigenvalue, and exact when :math:`m_b = n_b`;
* ``negative_mass`` :math:`\sum_{\theta_i < 0}\gamma_i`: the estimated fraction of the
  block's eigenvalues below zero (non-convex directions; zero for the GGN and Fisher).

**Block heterogeneity** (Zhang et al. 2024, "Why Transformers Need Adam: A Hessian
Perspective").  Where the blocks' spectra differ by orders of magnitude (a transformer's
query/key blocks against its value, MLP and embedding blocks), no single learning rate
suits every block: SGD's step is limited by the sharpest block while the flattest barely
move, and Adam's per-coordinate (hence per-block) scaling helps; in a CNN the blocks'
spectra are alike and SGD does as well.  :meth:`BlockSpectraResult.heterogeneity` measures
it: ``top_spread`` :math:`\log_{10}(\max_b \theta^{b}_{\max} / \min_b \theta^{b}_{\max})`
(the decades between the sharpest and the flattest block), and the Jensen-Shannon distances
:math:`\mathrm{JS}(\rho_b, \rho_c) = \sqrt{\tfrac12 \mathrm{KL}(\rho_b\Vert \bar\rho)
+ \tfrac12 \mathrm{KL}(\rho_c\Vert \bar\rho)}`, :math:`\bar\rho = \tfrac12(\rho_b +
\rho_c)` (base 2, so in :math:`[0, 1]`), between the blocks' densities smoothed with a
Gaussian of width ``sigma`` in the symmetric logarithmic coordinate
:math:`u = \operatorname{sign}(\lambda)\log_{10}(1 + |\lambda|/\tau)` (:func:`symlog`),
the coordinate of the figure (:func:`nets.plots.plot_block_spectra`), in which densities
of any scale compare.  Zhang et al. report pairwise JS distances between the blocks'
smoothed SLQ densities at initialisation: large for transformers, small for CNNs.

File format (``save_path``, ``.npz`` appended when missing; written atomically, loadable
with ``allow_pickle=False``), ``B`` blocks, ``K`` probes, ``M = max_b m_b``:

=========================  ===============================================================
key                        content
=========================  ===============================================================
``labels``                 str[B] the blocks' labels, in order
``sizes``, ``block_iters`` int64[B] :math:`n_b` and :math:`m_b`
``seeds``                  int64[B] each block's probe seed
``w``, ``gammas``          float64[B, K*M] pooled Ritz values (ascending) and weights,
                           NaN-padded on the right
``residuals``              float64[B, K*M] Ritz residual of each pooled value
``probe_nodes``            float64[B, K, M] per-probe Ritz values, NaN-padded
``probe_weights``          float64[B, K, M] per-probe weights, NaN-padded
``trace``, ``trace_stderr`` float64[B]
``top``, ``negative_mass`` float64[B]
``num_params``             int64 :math:`\sum_b n_b`
``lanczos_iters``          int64 :math:`m`; ``num_probes`` int64 :math:`K`
``curvature``, ``bn_mode`` str, as in spectrum files
``partition``              str ``'layers'``, ``'transformer'``, ``'transformer:heads=N'``
                           or ``'custom'``
``block_params_json``      str: label -> the parameters (or parts) of the block
``config_json``            str: model, dataset, checkpoint, seed, subsample, ...
``model_fingerprint``      str: sha256 of the trainable parameters' names, shapes, values
=========================  ===============================================================

>>> symlog(np.array([-10.0, 0.0, 9.0]), 1.0).round(6).tolist()
[-1.041393, 0.0, 1.0]
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from curvops.model_io import OutputFn, check_output_fn
from nets.workflow._resolve import (
    curvature_kind,
    default_loss,
    is_writer,
    make_eval_loader,
    model_fingerprint,
    operator_group,
    preserve_global_state,
    resolve_data,
    resolve_model,
    resolve_parallel,
    shard_loader,
    spectrum_file,
    written,
)
from nets.workflow.spectrum import _checked_arguments, _SpectrumSettings, lanczos_spectrum
from spectral.density import SpectralDensity
from spectral.errors import argument_error
from spectral.io import load_npz, save_npz
from spectral.operator import as_operator
from spectral.resume import Checkpoint

__all__ = [
    "BlockSpectraResult",
    "BlockSpectrum",
    "block_partition",
    "block_seed",
    "compute_block_spectra",
    "load_block_spectra",
    "symlog",
    "symlog_scale",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

_PARTITIONS = "'layers', 'transformer', 'transformer:heads=N' or a mapping label -> parameters"


def symlog(x: Any, scale: float) -> np.ndarray:
    r"""The symmetric logarithmic coordinate :math:`\operatorname{sign}(x)\log_{10}(1 + |x|/\tau)`.

    Linear (slope :math:`1/(\tau\ln 10)`) for :math:`|x| \ll \tau`, one unit per decade
    for :math:`|x| \gg \tau`; odd and increasing, so it keeps the sign and order of
    eigenvalues of any scale.

    Parameters
    ----------
    x : array_like
        Values (eigenvalues).
    scale : float
        :math:`\tau > 0`, where the coordinate turns from linear to logarithmic.

    Returns
    -------
    numpy.ndarray
        float64 of the shape of ``x``.

    Examples
    --------
    >>> symlog([0.0, 99.0, -0.999], 1.0).round(6).tolist()
    [0.0, 2.0, -0.300813]
    """
    values = np.asarray(x, dtype=np.float64)
    return np.sign(values) * np.log10(1.0 + np.abs(values) / float(scale))


def symlog_scale(values: Any) -> float:
    r"""A default :math:`\tau` for :func:`symlog` of several blocks' Ritz values.

    A thousandth of the smallest block scale :math:`\min_b \max_i |\theta^b_i|` (so every
    block's extreme values lie three decades into the logarithmic part), at least
    :math:`10^{-12}\max|\theta|` (a block that is exactly zero does not set it) and 1 when
    every value is 0.

    Parameters
    ----------
    values : sequence of array_like
        The blocks' Ritz values (NaN ignored).

    Returns
    -------
    float
        :math:`\tau > 0`.

    Examples
    --------
    >>> symlog_scale([[1.0, 2.0], [-0.5, 0.01]])
    0.0005
    """
    scales = [float(np.nanmax(np.abs(np.asarray(v, dtype=np.float64)))) for v in values]
    largest = max(scales, default=0.0)
    if not largest > 0:
        return 1.0
    positive = [s for s in scales if s > 0]
    return max(1e-3 * min(positive), 1e-12 * largest)


@dataclass(frozen=True)
class BlockSpectrum:
    """One block's SLQ spectrum (module docstring).

    Attributes
    ----------
    label : str
        The block's label.
    size : int
        :math:`n_b`, the block's number of coordinates.
    lanczos_iters : int
        :math:`m_b = \\min(m, n_b)`.
    seed : int
        The seed of the block's probes.
    values, weights, residuals : numpy.ndarray
        Pooled Ritz values (ascending), weights (sum 1) and Ritz residuals.
    probe_nodes, probe_weights : numpy.ndarray
        ``(K, m_b)`` per probe, NaN-padded.
    trace, trace_stderr : float
        Hutchinson trace estimate :math:`n_b\\sum_i w_i\\theta_i` and its standard error.
    params : tuple of str
        The parameters (or parts of them) in the block.

    Examples
    --------
    >>> b = BlockSpectrum("fc", 4, 2, 0, np.array([-1.0, 3.0]), np.array([0.25, 0.75]),
    ...                   np.zeros(2), np.array([[-1.0, 3.0]]), np.array([[0.25, 0.75]]),
    ...                   8.0, 1.0)
    >>> b.top, b.negative_mass, b.mean
    (3.0, 0.25, 2.0)
    """

    label: str
    size: int
    lanczos_iters: int
    seed: int
    values: np.ndarray
    weights: np.ndarray
    residuals: np.ndarray
    probe_nodes: np.ndarray
    probe_weights: np.ndarray
    trace: float
    trace_stderr: float
    params: tuple[str, ...] = ()

    @property
    def top(self) -> float:
        """The largest Ritz value (a lower bound on the block's largest eigenvalue)."""
        return float(np.max(self.values))

    @property
    def bottom(self) -> float:
        """The smallest Ritz value (an upper bound on the block's smallest eigenvalue)."""
        return float(np.min(self.values))

    @property
    def negative_mass(self) -> float:
        """The weight of the negative Ritz values: the estimated share of negative eigenvalues."""
        return float(np.sum(self.weights[self.values < 0]))

    @property
    def mean(self) -> float:
        """The mean eigenvalue ``trace / size``."""
        return float(self.trace) / self.size

    def density(self) -> SpectralDensity:
        """The block's quadrature measure, with its per-probe rules (bounds and bands apply)."""
        return SpectralDensity(
            self.values,
            self.weights,
            self.probe_nodes,
            self.probe_weights,
            source="quadrature",
            dimension=self.size,
            probe_kind="rademacher",
        )


@dataclass
class BlockSpectraResult:
    """The per-block spectra of :func:`compute_block_spectra` (or :func:`load_block_spectra`).

    Attributes
    ----------
    blocks : dict
        ``label -> BlockSpectrum``, in the partition's order.
    lanczos_iters, num_probes : int
        :math:`m` (before the cap :math:`m_b \\le n_b`) and :math:`K`.
    curvature, bn_mode, partition : str
        What was computed (``partition``: ``'layers'``, ``'transformer'``,
        ``'transformer:heads=N'`` or ``'custom'``).
    model_fingerprint : str
        sha256 of the trainable parameters.
    config : dict
        The run's settings.
    path : pathlib.Path or None
        The file written or read.

    Examples
    --------
    >>> from nets import compute_block_spectra, get_model
    >>> model = get_model("MLP", 10, 1, 8, hidden=(8,), seed=0)
    >>> res = compute_block_spectra("digits", model=model, lanczos_iters=4, subsample=64)
    >>> list(res.blocks), res.blocks["layers.0"].size
    (['layers.0', 'layers.2'], 520)
    """

    blocks: dict[str, BlockSpectrum]
    lanczos_iters: int
    num_probes: int
    curvature: str
    bn_mode: str
    partition: str
    model_fingerprint: str
    config: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_params(self) -> int:
        """:math:`\\sum_b n_b`."""
        return sum(b.size for b in self.blocks.values())

    def heterogeneity(self, *, sigma: float = 0.1, scale: float | None = None) -> dict[str, Any]:
        """Block heterogeneity (module docstring): the spread of the top eigenvalues and the
        Jensen-Shannon distances between the smoothed densities.

        ``sigma`` is the Gaussian width in decades of :func:`symlog` with ``scale``
        (default :func:`symlog_scale`).  Returns ``top_spread`` (decades; NaN unless two
        blocks have a positive top), ``js_distance`` (float64[B, B], symmetric, zero
        diagonal) and ``mean_js_distance`` (over pairs; 0 for one block).
        """
        labels = list(self.blocks)
        tops = np.array([b.top for b in self.blocks.values()])
        positive = tops[tops > 0]
        spread = float(np.log10(positive.max() / positive.min())) if positive.size > 1 else np.nan
        tau = symlog_scale([b.values for b in self.blocks.values()]) if scale is None else scale
        nodes = [symlog(b.values, tau) for b in self.blocks.values()]
        lo = min(float(u.min()) for u in nodes) - 6 * sigma
        hi = max(float(u.max()) for u in nodes) + 6 * sigma
        grid = np.linspace(lo, hi, 1024)
        rho = [SpectralDensity(u, b.weights).smooth(grid, sigma) for u, b in
               zip(nodes, self.blocks.values())]  # fmt: skip
        dist = np.zeros((len(labels), len(labels)))
        for i in range(len(labels)):
            for j in range(i):
                dist[i, j] = dist[j, i] = _js_distance(rho[i], rho[j])
        pairs = dist[np.triu_indices(len(labels), 1)]
        return {
            "labels": labels,
            "top_spread": spread,
            "js_distance": dist,
            "mean_js_distance": float(pairs.mean()) if pairs.size else 0.0,
        }

    def to_arrays(self) -> dict[str, Any]:
        """The file's arrays (module docstring)."""
        blocks = list(self.blocks.values())
        k = self.num_probes
        width = max(b.lanczos_iters for b in blocks)

        def padded(rows: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
            out = np.full((len(rows), *shape), np.nan)
            for i, row in enumerate(rows):
                index: tuple[Any, ...] = (i, *(slice(0, s) for s in row.shape))
                out[index] = row
            return out

        return {
            "labels": np.asarray([b.label for b in blocks], dtype=np.str_),
            "sizes": np.asarray([b.size for b in blocks], dtype=np.int64),
            "block_iters": np.asarray([b.lanczos_iters for b in blocks], dtype=np.int64),
            "seeds": np.asarray([b.seed for b in blocks], dtype=np.int64),
            "w": padded([b.values for b in blocks], (k * width,)),
            "gammas": padded([b.weights for b in blocks], (k * width,)),
            "residuals": padded([b.residuals for b in blocks], (k * width,)),
            "probe_nodes": padded([b.probe_nodes for b in blocks], (k, width)),
            "probe_weights": padded([b.probe_weights for b in blocks], (k, width)),
            "trace": np.asarray([b.trace for b in blocks], dtype=np.float64),
            "trace_stderr": np.asarray([b.trace_stderr for b in blocks], dtype=np.float64),
            "top": np.asarray([b.top for b in blocks], dtype=np.float64),
            "negative_mass": np.asarray([b.negative_mass for b in blocks], dtype=np.float64),
            "num_params": np.int64(self.num_params),
            "lanczos_iters": np.int64(self.lanczos_iters),
            "num_probes": np.int64(self.num_probes),
            "curvature": np.str_(self.curvature),
            "bn_mode": np.str_(self.bn_mode),
            "partition": np.str_(self.partition),
            "block_params_json": np.str_(
                json.dumps({b.label: list(b.params) for b in blocks}, sort_keys=False)
            ),
            "config_json": np.str_(json.dumps(self.config, sort_keys=True)),
            "model_fingerprint": np.str_(self.model_fingerprint),
        }

    def save(self, path: PathLike) -> Path:
        """Write the file atomically (``.npz`` appended when missing); return its path."""
        target = spectrum_file(path)
        save_npz(target, **self.to_arrays())
        self.path = target
        return target


def _js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two non-negative grids of a density.

    Masses below 1e-300 are left out of the sums (their mean with a zero would underflow
    to 0 and their logarithm ratio to infinity; their contribution is below 1e-297).

    >>> _js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    1.0
    >>> _js_distance(np.ones(2), np.ones(2))
    0.0
    """
    if not (p.sum() > 0 and q.sum() > 0):
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    mid = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        keep = a > 1e-300
        return float(np.sum(a[keep] * np.log2(a[keep] / mid[keep])))

    return float(np.sqrt(np.clip(0.5 * (kl(p) + kl(q)), 0.0, 1.0)))


_BLOCK_KEYS = ("labels", "sizes", "w", "gammas", "probe_nodes", "probe_weights", "trace")


def load_block_spectra(path: PathLike) -> BlockSpectraResult:
    """Read a per-block spectra file (``.npz`` may be omitted).

    Parameters
    ----------
    path : str or os.PathLike
        The file :func:`compute_block_spectra` wrote.

    Returns
    -------
    BlockSpectraResult
        The blocks as they were saved (``path`` set).

    Raises
    ------
    FileNotFoundError, spectral.io.CorruptFileError
        A missing or unreadable file.
    ValueError
        A file without the per-block keys (a spectrum file, say).

    Examples
    --------
    >>> import os, tempfile
    >>> from nets import compute_block_spectra, get_model
    >>> target = os.path.join(tempfile.mkdtemp(), "blocks")
    >>> model = get_model("MLP", 10, 1, 8, hidden=(8,), seed=0)
    >>> res = compute_block_spectra("digits", model=model, lanczos_iters=3, subsample=32,
    ...                             save_path=target)
    >>> list(load_block_spectra(target).blocks) == list(res.blocks)
    True
    """
    target = spectrum_file(path)
    if not target.is_file() and Path(os.fspath(path)).is_file():
        target = Path(os.fspath(path))
    arrays = load_npz(target)
    missing = [k for k in _BLOCK_KEYS if k not in arrays]
    if missing:
        raise argument_error(
            "path", "a per-block spectra file written by compute_block_spectra",
            f"{target} (without {', '.join(map(repr, missing))})",
        )  # fmt: skip
    params = json.loads(str(arrays.get("block_params_json", "{}")))
    blocks = {}
    for i, label in enumerate(str(x) for x in arrays["labels"].tolist()):
        keep = ~np.isnan(arrays["w"][i])
        m = int(arrays["block_iters"][i])
        blocks[label] = BlockSpectrum(
            label=label,
            size=int(arrays["sizes"][i]),
            lanczos_iters=m,
            seed=int(arrays["seeds"][i]),
            values=np.asarray(arrays["w"][i][keep], dtype=np.float64),
            weights=np.asarray(arrays["gammas"][i][keep], dtype=np.float64),
            residuals=np.asarray(arrays["residuals"][i][keep], dtype=np.float64),
            probe_nodes=np.asarray(arrays["probe_nodes"][i][:, :m], dtype=np.float64),
            probe_weights=np.asarray(arrays["probe_weights"][i][:, :m], dtype=np.float64),
            trace=float(arrays["trace"][i]),
            trace_stderr=float(arrays["trace_stderr"][i]),
            params=tuple(params.get(label, ())),
        )
    return BlockSpectraResult(
        blocks=blocks,
        lanczos_iters=int(arrays["lanczos_iters"]),
        num_probes=int(arrays["num_probes"]),
        curvature=str(arrays["curvature"]),
        bn_mode=str(arrays["bn_mode"]),
        partition=str(arrays["partition"]),
        model_fingerprint=str(arrays["model_fingerprint"]),
        config=json.loads(str(arrays["config_json"])),
        path=target,
    )


# ---------------------------------------------------------------------------- the partition


def _parse_partition(blocks: str, heads: int | None) -> tuple[str, int | None]:
    """``('layers'|'transformer', heads)`` of a partition name such as ``'transformer:heads=4'``
    (``N`` in ASCII digits; an option after ``:`` may not be empty)."""
    name, colon, option = blocks.strip().lower().partition(":")
    if name not in ("layers", "transformer") or (name == "layers" and colon):
        raise argument_error("blocks", _PARTITIONS, blocks)
    if colon:
        key, _, value = option.partition("=")
        digits = value.strip()
        if key.strip() != "heads" or not (digits.isascii() and digits.isdigit()) or int(digits) < 1:
            raise argument_error(
                "blocks", "'transformer:heads=N' with an integer N >= 1 (ASCII digits)", blocks
            )
        if heads is not None and heads != int(digits):
            raise argument_error("heads", f"None or {int(digits)} (as blocks={blocks!r})", heads)
        heads = int(digits)
    if heads is not None:
        if isinstance(heads, bool) or not isinstance(heads, int | np.integer) or heads < 1:
            raise argument_error("heads", "None or a positive integer", heads)
        if name == "layers":
            raise argument_error("heads", "None with blocks='layers'", heads)
    return name, None if heads is None else int(heads)


def block_partition(
    model: nn.Module, blocks: Any = "layers", *, heads: int | None = None, params: Any = None
) -> tuple[dict[str, Any], str]:
    """The labelled partition of ``model``'s parameters that :func:`compute_block_spectra` uses.

    Parameters
    ----------
    model : torch.nn.Module
        The network.
    blocks : str or mapping
        ``'layers'`` (one block per module owning parameters, labelled by the module's
        name, as :func:`curvops.per_layer`), ``'transformer'``, ``'transformer:heads=N'``
        (:func:`curvops.transformer_blocks`) or a mapping ``label -> parameter selection``
        (names, name patterns such as ``"*.attn.*"``, modules, or lists of
        :class:`curvops.blocks.ParamSlice`; see :func:`curvops.per_block`).
    heads : int, optional
        Heads of ``'transformer'`` (the same as ``'transformer:heads=N'``).
    params : optional
        Restrict ``'layers'``/``'transformer'`` to these parameters (default all trainable).

    Returns
    -------
    tuple
        ``(label -> selection, description)``; the description is ``'layers'``,
        ``'transformer'``, ``'transformer:heads=N'`` or ``'custom'``.

    Raises
    ------
    ValueError, TypeError
        An unknown partition, bad ``heads``, or ``heads``/``params`` with a mapping.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    >>> block_partition(net)
    ({'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}, 'layers')
    """
    from curvops.blocks import transformer_blocks
    from curvops.params import group_by_layer, select_params

    if isinstance(blocks, Mapping):
        if not blocks:
            raise argument_error("blocks", _PARTITIONS, blocks)
        for name, value in (("heads", heads), ("params", params)):
            if value is not None:
                raise argument_error(name, "None with a mapping of blocks", value)
        return dict(blocks), "custom"
    if not isinstance(blocks, str):
        raise argument_error("blocks", _PARTITIONS, blocks, kind=TypeError)
    name, heads = _parse_partition(blocks, heads)
    if name == "transformer":
        described = "transformer" if heads is None else f"transformer:heads={heads}"
        return transformer_blocks(model, heads=heads, params=params), described
    groups = group_by_layer(select_params(model, params))
    partition = {g[0][0].rpartition(".")[0] or "(model)": [n for n, _ in g] for g in groups}
    return partition, "layers"


def _describe_block(model: nn.Module, spec: Any) -> tuple[str, ...]:
    """The parameters of a block: names, and ``name[k of n]`` for parts of one."""
    from curvops.blocks import ParamSlice
    from curvops.params import select_params

    if isinstance(spec, list | tuple) and spec and all(isinstance(s, ParamSlice) for s in spec):
        sizes = dict((n, p.numel()) for n, p in model.named_parameters(remove_duplicate=False))
        return tuple(
            s.name if s.index is None else f"{s.name}[{s.index.numel()} of {sizes.get(s.name)}]"
            for s in spec
        )
    return tuple(n for n, _ in select_params(model, spec))


def _operator_class(curvature: str, seed: int) -> tuple[Any, dict[str, Any]]:
    """The curvops operator class of a canonical curvature name and its extra keywords."""
    from curvops.fisher import FisherOperator
    from curvops.ggn import GGNOperator
    from curvops.hessian import HessianOperator

    if curvature == "hessian":
        return HessianOperator, {}
    if curvature == "ggn":
        return GGNOperator, {}
    kind = "empirical" if curvature == "empirical-fisher" else "mc"
    return FisherOperator, {"kind": kind, "seed": seed}


def block_seed(seed: int, index: int) -> int:
    """The probe seed of block ``index``: ``SeedSequence([seed, index]).generate_state(1)[0]``.

    >>> block_seed(0, 0) == block_seed(0, 0) != block_seed(0, 1)
    True
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


# ---------------------------------------------------------------------------- the workflow


def compute_block_spectra(
    dataset: Any = "digits",
    data_path: PathLike | None = None,
    model: Any = None,
    checkpoint_path: PathLike | None = None,
    save_path: PathLike | None = None,
    blocks: Any = "layers",
    heads: int | None = None,
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
    output_fn: OutputFn | None = None,
    process_group: Any = None,
    state_path: PathLike | None = None,
    checkpoint_every: int = 10,
) -> BlockSpectraResult:
    """SLQ spectrum of every diagonal block of a network's Hessian, GGN or Fisher.

    The model, data, checkpoint, subsample, loss and curvature are resolved as by
    :func:`nets.compute_eigenspectrum` (same arguments, same meaning); the blocks are
    the diagonal blocks of that curvature for the partition ``blocks``, each estimated
    by stochastic Lanczos quadrature (the module docstring states the mathematics and
    the block-heterogeneity statistics).

    Parameters
    ----------
    dataset, data_path, model, checkpoint_path:
        As for :func:`nets.compute_eigenspectrum`.
    save_path:
        Where to write the per-block file (``.npz`` appended when missing); ``None``
        writes nothing.
    blocks:
        ``'layers'``, ``'transformer'``, ``'transformer:heads=N'`` or a mapping ``label ->
        parameter selection`` (:func:`block_partition`).
    heads:
        Heads of ``'transformer'`` (same as ``'transformer:heads=N'``).
    lanczos_iters:
        Lanczos steps :math:`m` per probe; a block of :math:`n_b < m` coordinates takes
        :math:`n_b` (its spectrum is then exact up to rounding).
    curvature_matrix, num_probes, bn_mode, params, subsample, batch_size:
        As for :func:`nets.compute_eigenspectrum` (``params`` restricts ``'layers'`` and
        ``'transformer'``; a mapping of blocks selects its parameters itself).
    seed:
        Seeds the subsample, a Monte-Carlo Fisher and every block's probes (block ``b``:
        :func:`block_seed`); the same seed gives the same result, bit for bit on the CPU.
    device, loss_fn, output_fn:
        As for :func:`nets.compute_eigenspectrum`.
    progress:
        A progress bar over the blocks.
    process_group:
        As for :func:`nets.compute_eigenspectrum`: under ``torchrun`` each rank takes
        every W-th batch, the products are summed over the group, every rank returns
        the same result and only rank 0 writes ``save_path``; ``False`` keeps every rank
        on its own.
    state_path:
        A directory for resumable runs: block ``b`` keeps its Lanczos state in
        ``block-<b>.npz`` there (:class:`spectral.resume.Checkpoint`, saved every
        ``checkpoint_every`` steps and after each probe), so a killed run restarted with
        the same arguments skips the finished blocks and resumes the current one, bit
        for bit on the CPU.  A state of another configuration, partition, block,
        checkpoint, model (parameters and buffers), data or loss is refused
        (:class:`spectral.resume.StateMismatchError`).  Costs one extra product per
        block (its operator fingerprint).  ``None``: no state.
    checkpoint_every:
        Save interval of the state in Lanczos steps.

    Returns
    -------
    BlockSpectraResult
        ``.blocks`` maps each label to its :class:`BlockSpectrum`; also written to
        ``save_path`` (format in the module docstring).

    Raises
    ------
    ValueError, TypeError
        Bad arguments (an unknown partition or curvature, ``lanczos_iters < 1``, heads
        that do not divide a projection, ...), naming the argument.
    FileNotFoundError, spectral.io.CorruptFileError
        A missing or unreadable checkpoint.
    spectral.errors.NumericalError
        A curvature product produced NaN/Inf.
    spectral.resume.StateMismatchError
        A state file in ``state_path`` of another run.

    Examples
    --------
    >>> import os, tempfile
    >>> from nets import compute_block_spectra, get_model
    >>> model = get_model("MLP", 10, 1, 8, hidden=(8,), seed=0)
    >>> res = compute_block_spectra("digits", model=model, lanczos_iters=5, subsample=64,
    ...                             save_path=os.path.join(tempfile.mkdtemp(), "blocks"))
    >>> [(label, b.size, b.lanczos_iters) for label, b in res.blocks.items()]
    [('layers.0', 520, 5), ('layers.2', 90, 5)]
    >>> res.path.name, res.partition
    ('blocks.npz', 'layers')
    """
    curvature, mode = _checked_arguments(
        curvature_matrix, bn_mode, None, False, lanczos_iters=lanczos_iters,
        num_probes=num_probes, checkpoint_every=checkpoint_every, batch_size=batch_size,
        seed=seed,
    )  # fmt: skip
    if isinstance(blocks, str):
        _parse_partition(blocks, heads)  # a bad partition fails before any data is loaded
    settings = _SpectrumSettings(
        curvature, lanczos_iters, num_probes, mode, params, subsample, batch_size, seed,
        False, check_output_fn(output_fn),
    )  # fmt: skip
    group, device = resolve_parallel(process_group, device)
    with preserve_global_state():
        data = resolve_data(dataset, data_path, seed=seed)
        loss = default_loss(loss_fn, data.task)
        resolved = resolve_model(
            model, checkpoint_path, data, device=device, seed=seed, copy_module=False
        )
        loader = make_eval_loader(data.train, batch_size, subsample=subsample, seed=seed)
        partition, described = block_partition(resolved.model, blocks, heads=heads, params=params)
        states = None
        if state_path is not None:
            names = [n for n, p in resolved.model.named_parameters() if p.requires_grad]
            state = settings.state_config(
                dataset, data_path, model, checkpoint_path, loss=loss, work=resolved.model,
                fingerprint=model_fingerprint(resolved.model), names=names,
            )  # fmt: skip
            states = _BlockStates(state_path, state, described, checkpoint_every)
        spectra = _block_spectra(
            resolved.model, loss, shard_loader(loader, group), partition, curvature=curvature,
            bn_mode=mode, lanczos_iters=lanczos_iters, num_probes=num_probes, seed=seed,
            output_fn=output_fn, progress=progress and is_writer(group),
            group=operator_group(group), states=states,
        )  # fmt: skip
    names = [name for name, p in resolved.model.named_parameters() if p.requires_grad]
    config = settings.output_config(resolved, data, data_path, names, loader, loss)
    chosen = None if params is None else [n for b in spectra.values() for n in b.params]
    config.update(function="compute_block_spectra", partition=described, params=chosen)
    result = BlockSpectraResult(
        blocks=spectra,
        lanczos_iters=int(lanczos_iters),
        num_probes=int(num_probes),
        curvature=curvature_kind(curvature),
        bn_mode="none" if mode is None else mode,
        partition=described,
        model_fingerprint=model_fingerprint(resolved.model),
        config=config,
    )
    if save_path is not None:
        _save_blocks(result, save_path, group)
    return result


def _save_blocks(result: BlockSpectraResult, path: PathLike, group: Any) -> None:
    """Rank 0 writes the file; every rank records its path once it exists."""
    if is_writer(group):
        result.save(path)
        logger.info("per-block spectra written to %s", result.path)
    else:
        result.path = spectrum_file(path)
    written(group)


@dataclass(frozen=True)
class _BlockStates:
    """The resumable states of :func:`compute_block_spectra`: one file per block.

    ``config`` is the run's state configuration (what a restart must match); each
    block's :class:`~spectral.resume.Checkpoint` adds the partition, the block's
    index, label, parameters and probe seed, and is bound to the block operator.
    """

    directory: PathLike
    config: dict[str, Any]
    partition: str
    every: int

    def __post_init__(self) -> None:
        if not isinstance(self.directory, str | os.PathLike):
            raise argument_error("state_path", "a directory path", self.directory, kind=TypeError)
        if Path(self.directory).exists() and not Path(self.directory).is_dir():
            raise argument_error(
                "state_path", "a directory (one state file per block)", os.fspath(self.directory)
            )

    def checkpoint(
        self, index: int, label: str, params: tuple[str, ...], seed: int, operator: Any
    ) -> Checkpoint:
        """The state file of block ``index``."""
        config = dict(self.config, function="compute_block_spectra", partition=self.partition)
        config.update(block_index=index, block=label, block_params=list(params), block_seed=seed)
        path = Path(self.directory) / f"block-{index:05d}.npz"
        return Checkpoint(
            path, kind="compute_block_spectra", config=config, operator=as_operator(operator)
        )


def _block_spectra(
    model: nn.Module,
    loss: Any,
    loader: Any,
    partition: dict[str, Any],
    *,
    curvature: str,
    bn_mode: str | None,
    lanczos_iters: int,
    num_probes: int,
    seed: int,
    output_fn: Any,
    progress: bool,
    group: Any = False,
    states: _BlockStates | None = None,
) -> dict[str, BlockSpectrum]:
    """SLQ on each block of :func:`curvops.per_block` (module docstring)."""
    from curvops.blocks import per_block

    cls, extra = _operator_class(curvature, seed)
    operator = per_block(
        cls, model, loss, loader, partition, bn_mode=bn_mode, output_fn=output_fn,
        process_group=group, **extra,
    )  # fmt: skip
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(partition), desc="blocks", unit="block")
    out: dict[str, BlockSpectrum] = {}
    try:
        for index, (label, block) in enumerate(zip(operator.labels, operator.blocks)):
            size = int(block.shape[0])
            m = min(int(lanczos_iters), size)
            block_seed_ = block_seed(seed, index)
            described = _describe_block(model, partition[label])
            state, every = None, 10
            if states is not None:
                state = states.checkpoint(index, label, described, block_seed_, block)
                every = states.every
            found = lanczos_spectrum(
                block, m, num_probes=num_probes, seed=block_seed_, state=state,
                checkpoint_every=every,
            )  # fmt: skip
            out[label] = BlockSpectrum(
                label=label, size=size, lanczos_iters=m, seed=block_seed_,
                values=found["values"], weights=found["weights"], residuals=found["residuals"],
                probe_nodes=found["probe_nodes"], probe_weights=found["probe_weights"],
                trace=float(found["trace"]), trace_stderr=float(found["trace_stderr"]),
                params=described,
            )  # fmt: skip
            logger.info(
                "block %d/%d %s: n=%d, top Ritz value %.4g, trace %.4g",
                index + 1, len(partition), label, size, out[label].top, out[label].trace,
            )  # fmt: skip
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return out
