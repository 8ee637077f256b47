"""Block-diagonal curvature operators: per layer, per named block, per attention head.

:func:`per_layer` builds one curvature operator per layer (the parameters owned by
one module) and stacks them into a :class:`curvops.algebra.BlockDiagonal`, the
block-diagonal approximation

.. math::
    \\mathrm{diag}(A_{11}, \\dots, A_{LL}), \\qquad A_{ll} = \\text{curvature w.r.t. layer } l,

so per-layer spectra take one call: ``per_layer(...).blocks[l]`` is layer ``l``'s
operator.  Each block loops over the data separately (a product costs ``L`` passes).

>>> import torch
>>> from curvops.hessian import HessianOperator
>>> nn = torch.nn
>>> net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).double()
>>> data = (torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
>>> B = per_layer(HessianOperator, net, torch.nn.MSELoss(), data)
>>> [b.shape for b in B.blocks]
[(6, 6), (3, 3)]

:func:`per_block` takes any labelled partition: parameter selections (names, name
patterns such as ``"transformer.h.*.attn.*"``, modules) or :class:`ParamSlice` lists
that cut a parameter into parts, e.g. the rows of one attention head.  A sliced
block is the compression :math:`A_{II} = P_I^\top A P_I` of the curvature
:math:`A` of the sliced parameters to the index set :math:`I` (:class:`Compressed`):
exact, at the cost of one product of :math:`A` per product.
:func:`transformer_blocks` builds the partition of a transformer that the study of
Hessian block heterogeneity uses (Zhang et al. 2024, "Why Transformers Need Adam:
A Hessian Perspective"): embeddings, normalisation layers, the query, key and value
projections (per head with ``heads=``), the attention output projection, and each
MLP, for torch's own layers, nets' ``gpt-tiny`` and the Hugging Face GPT-2, BERT
and Llama layouts.  Per-block spectra then take one call each::

    B = per_block(HessianOperator, model, loss_fn, data, transformer_blocks(model, heads=4))
    spectra = {label: lanczos(b, 20).ritz().values for label, b in zip(B.labels, B.blocks)}
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from curvops.algebra import BlockDiagonal
from curvops.curvature import ModelCurvatureOperator
from curvops.data import as_data
from curvops.losses import LossFn
from curvops.operator import CurvatureOperator
from curvops.params import group_by_layer, select_params
from spectral.errors import argument_error

__all__ = [
    "Compressed",
    "LabelledBlockDiagonal",
    "ParamSlice",
    "head_slices",
    "per_block",
    "per_layer",
    "transformer_blocks",
]


def per_layer(
    operator_cls: type[ModelCurvatureOperator],
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    params: Any = None,
    **kwargs: Any,
) -> BlockDiagonal:
    """Block-diagonal operator with one ``operator_cls`` block per layer.

    Parameters
    ----------
    operator_cls:
        :class:`~curvops.HessianOperator`, :class:`~curvops.GGNOperator`,
        :class:`~curvops.FisherOperator` (or another subclass of
        :class:`~curvops.curvature.ModelCurvatureOperator`).
    params:
        Parameter selection (default all trainable), grouped by owning module.
    kwargs:
        Passed to every block (``bn_mode``, ``kind``, ``seed``, ...).

    Returns
    -------
    BlockDiagonal
        One operator per layer; ``.blocks[l]`` is layer ``l``'s.

    Raises
    ------
    TypeError
        If ``operator_cls`` is not a model curvature operator class.

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> from curvops import GGNOperator
    >>> B = per_layer(GGNOperator, net, loss, (x, y))
    >>> [b.shape[0] for b in B.blocks], B.shape
    ([16, 10], (26, 26))
    """
    if not (isinstance(operator_cls, type) and issubclass(operator_cls, ModelCurvatureOperator)):
        raise argument_error(
            "operator_cls", "a ModelCurvatureOperator subclass", operator_cls, kind=TypeError
        )
    stream = as_data(data)
    groups = group_by_layer(select_params(model, params))
    blocks = [
        operator_cls(model, loss_fn, stream, params=[n for n, _ in g], **kwargs) for g in groups
    ]
    return BlockDiagonal(blocks)


# ---------------------------------------------------------------------- slices of parameters
@dataclass(frozen=True, eq=False)
class ParamSlice:
    """Part of one parameter: ``index`` holds flat (row-major) positions, ``None`` all of it.

    >>> ParamSlice("0.weight", torch.tensor([0, 1])).index.tolist()
    [0, 1]
    """

    name: str
    index: torch.Tensor | None = None


def head_slices(
    shape: Sequence[int],
    name: str,
    num_heads: int,
    *,
    dim: int = 0,
    num_parts: int = 1,
    part: int = 0,
) -> list[ParamSlice]:
    """One :class:`ParamSlice` per head of a projection parameter of shape ``shape``.

    Along ``dim`` the parameter holds ``num_parts`` consecutive parts (3 for a fused
    query/key/value projection) of ``num_heads`` heads of :math:`d_h` entries each;
    head :math:`h` of part :math:`j` is the range
    :math:`[(jH + h) d_h, (jH + h + 1) d_h)` (the layout of torch's
    ``MultiheadAttention.in_proj_weight``, GPT-2's ``c_attn`` and every separate
    ``q_proj``/``k_proj``/``v_proj``).

    Raises
    ------
    ValueError
        If ``shape[dim]`` is not divisible by ``num_parts * num_heads``.

    >>> [s.index.tolist() for s in head_slices((4, 2), "q.weight", 2)]
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> [s.index.tolist() for s in head_slices((4,), "q.bias", 2)]
    [[0, 1], [2, 3]]
    """
    shape = tuple(int(s) for s in shape)
    size = shape[dim]
    if num_heads < 1 or num_parts < 1 or size % (num_heads * num_parts):
        raise argument_error(
            "num_heads",
            f"a head count dividing dimension {dim} of {name} (size {size}) into "
            f"{num_parts} part(s)",
            num_heads,
        )
    width = size // (num_heads * num_parts)
    flat = torch.arange(int(torch.Size(shape).numel())).reshape(shape)
    slices = []
    for h in range(num_heads):
        start = (part * num_heads + h) * width
        slices.append(ParamSlice(name, flat.narrow(dim, start, width).reshape(-1)))
    return slices


# ---------------------------------------------------------------------- transformer partition
_Q = {"q_proj", "q", "query", "wq", "q_lin"}
_K = {"k_proj", "k", "key", "wk", "k_lin"}
_V = {"v_proj", "v", "value", "wv", "v_lin"}
_FUSED = {"c_attn", "qkv", "qkv_proj", "wqkv", "in_proj"}
_OUT = {"o_proj", "out_proj", "c_proj", "dense", "o", "wo", "out_lin", "output"}
_MLP = ("mlp", "ffn", "feed_forward", "feedforward")


def _is_attention(segments: list[str]) -> bool:
    return any("attn" in s.lower() or "attention" in s.lower() for s in segments)


def _mlp_ancestor(segments: list[str]) -> str | None:
    for i, seg in enumerate(segments):
        if seg.lower() in _MLP:
            return ".".join(segments[: i + 1])
    return None


def transformer_blocks(
    model: nn.Module, *, heads: int | None = None, params: Any = None
) -> dict[str, list[ParamSlice]]:
    """The labelled partition of a transformer's parameters for :func:`per_block`.

    Every selected parameter (default all trainable, shared ones once) goes to one
    block, in the model's order:

    * embeddings (``nn.Embedding``): ``"<module> (embedding)"``;
    * normalisation layers (a module type with ``Norm`` in its name): ``"<module> (norm)"``;
    * under an attention module (a name part containing ``attn``/``attention``):
      query, key and value projections (``q_proj``/``query``/``q``..., or fused
      ``c_attn``/``qkv``/``in_proj_*`` split in three) ``"<module> (q)"`` etc., per
      head ``"<module> (q, head 3)"`` when ``heads`` is given; the output projection
      (``o_proj``/``out_proj``/``c_proj``/``dense``/``output``) ``"<module> (attn out)"``;
    * everything under an ``mlp``/``ffn``/``feed_forward`` module: ``"<mlp module> (mlp)"``;
    * any other module's parameters: ``"<module>"``.

    Parameters
    ----------
    model:
        The transformer.
    heads:
        Split query, key and value into this many heads (``None``: one block each).
        With grouped-query attention (Llama's ``num_key_value_heads`` below
        ``num_attention_heads``) key and value have fewer heads: build their blocks
        with :func:`head_slices` and pass the mapping to :func:`per_block` yourself.
    params:
        Parameter selection (see :func:`curvops.params.select_params`).

    Returns
    -------
    dict
        ``label -> list of ParamSlice``, in the model's order.

    Raises
    ------
    ValueError
        If ``heads`` does not divide a projection.

    Examples
    --------
    >>> layer = torch.nn.TransformerEncoderLayer(4, 2, dim_feedforward=8)
    >>> list(transformer_blocks(layer))  # doctest: +NORMALIZE_WHITESPACE
    ['self_attn (q)', 'self_attn (k)', 'self_attn (v)', 'self_attn.out_proj (attn out)',
     'linear1', 'linear2', 'norm1 (norm)', 'norm2 (norm)']
    >>> len(transformer_blocks(layer, heads=2))  # q, k, v of 2 heads each, and the 5 others
    11
    """
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int)):
        raise argument_error("heads", "None or a positive integer", heads, kind=TypeError)
    blocks: dict[str, list[ParamSlice]] = {}
    for name, p in select_params(model, params):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        segments = module_name.split(".") if module_name else []
        last = segments[-1].lower() if segments else ""
        type_name = type(module).__name__
        parts: list[tuple[str, ParamSlice]]
        if isinstance(module, nn.Embedding):
            parts = [(f"{module_name} (embedding)", ParamSlice(name))]
        elif "norm" in type_name.lower():
            parts = [(f"{module_name} (norm)", ParamSlice(name))]
        elif isinstance(module, nn.MultiheadAttention) and leaf.startswith("in_proj"):
            parts = _qkv_parts(module_name, name, p.shape, 0, 3, heads)
        elif _is_attention(segments) and last in _Q | _K | _V:
            role = "q" if last in _Q else "k" if last in _K else "v"
            dim = 1 if type_name == "Conv1D" and leaf == "weight" else 0
            parts = _role_parts(module_name, name, p.shape, dim, heads, role)
        elif _is_attention(segments) and last in _FUSED:
            dim = 1 if type_name == "Conv1D" and leaf == "weight" else 0
            parts = _qkv_parts(module_name, name, p.shape, dim, 3, heads)
        elif _is_attention(segments) and last in _OUT:
            parts = [(f"{module_name} (attn out)", ParamSlice(name))]
        elif (ancestor := _mlp_ancestor(segments)) is not None:
            parts = [(f"{ancestor} (mlp)", ParamSlice(name))]
        else:
            parts = [(module_name or "(model)", ParamSlice(name))]
        for label, piece in parts:
            blocks.setdefault(label, []).append(piece)
    return blocks


def _role_parts(
    module_name: str, name: str, shape: Any, dim: int, heads: int | None, role: str
) -> list[tuple[str, ParamSlice]]:
    if heads is None:
        return [(f"{module_name} ({role})", ParamSlice(name))]
    return [
        (f"{module_name} ({role}, head {h})", piece)
        for h, piece in enumerate(head_slices(shape, name, heads, dim=dim))
    ]


def _qkv_parts(
    module_name: str, name: str, shape: Any, dim: int, num_parts: int, heads: int | None
) -> list[tuple[str, ParamSlice]]:
    out = []
    for part, role in enumerate("qkv"):
        pieces = head_slices(shape, name, heads or 1, dim=dim, num_parts=num_parts, part=part)
        if heads is None:
            out.append((f"{module_name} ({role})", pieces[0]))
        else:
            out += [(f"{module_name} ({role}, head {h})", x) for h, x in enumerate(pieces)]
    return out


# ---------------------------------------------------------------------- operators
class Compressed(CurvatureOperator):
    """:math:`P_I^\top A P_I`: ``base`` restricted to the coordinates ``index``.

    :math:`P_I` is the :math:`n \times |I|` selection matrix of the (distinct)
    indices :math:`I`; a product embeds the vector with zeros, applies ``base``
    once and reads the entries :math:`I`.  Symmetric (psd) when ``base`` is.

    >>> from curvops.structured import Dense
    >>> import numpy as np
    >>> C = Compressed(Dense(np.arange(9.0).reshape(3, 3)), [0, 2])
    >>> C @ np.array([1.0, 0.0])
    array([0., 6.])
    """

    def __init__(self, base: CurvatureOperator, index: Any) -> None:
        if not isinstance(base, CurvatureOperator) or base.shape[0] != base.shape[1]:
            raise argument_error("base", "a square CurvatureOperator", base, kind=TypeError)
        idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        n = base.shape[0]
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
            raise argument_error("index", f"a non-empty set of indices in [0, {n})", index)
        if torch.unique(idx).numel() != idx.numel():
            raise argument_error("index", "distinct indices", index)
        super().__init__(
            shape=(idx.numel(), idx.numel()),
            torch_dtype=base.torch_dtype,
            device=base.device,
            symmetric=base.symmetric,
            psd=base.psd,
        )
        self._base = base
        self._index = idx.to(base.device)
        self.args = (base,)

    @property
    def base(self) -> CurvatureOperator:
        """The uncompressed operator."""
        return self._base

    @property
    def index(self) -> torch.Tensor:
        """The kept coordinates :math:`I` of ``base``."""
        return self._index

    def _embed(self, X: torch.Tensor) -> torch.Tensor:
        Y = X.new_zeros((self._base.shape[1], X.shape[1]))
        Y[self._index] = X
        return Y

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._base._apply(self._embed(X), adjoint=False)[self._index]

    def _rmatmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        return self._base._apply(self._embed(X), adjoint=True)[self._index]


class LabelledBlockDiagonal(BlockDiagonal):
    """A :class:`~curvops.algebra.BlockDiagonal` whose blocks carry labels (``labels``).

    ``positions`` and ``param_names`` (as :func:`per_block` passes them) place the
    blocks on the coordinates of the parameters ``param_names`` in the model's order,
    those of the full curvature operator over the same parameters (see
    :func:`curvops.algebra.parameter_names_of`).
    """

    def __init__(
        self,
        blocks: Sequence[CurvatureOperator],
        labels: Sequence[str],
        *,
        positions: Sequence[Any] | None = None,
        param_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(blocks, positions=positions)
        if len(labels) != len(self.blocks):
            raise argument_error("labels", f"{len(self.blocks)} labels", labels)
        self._labels = tuple(str(label) for label in labels)
        self._param_names = None if param_names is None else [str(n) for n in param_names]

    @property
    def labels(self) -> tuple[str, ...]:
        """The blocks' labels, in order."""
        return self._labels

    @property
    def param_names(self) -> list[str] | None:
        """The parameters that the rows and columns stand for, in order (None: unknown)."""
        return None if self._param_names is None else list(self._param_names)

    def block(self, label: str) -> CurvatureOperator:
        """The block called ``label``.

        Raises
        ------
        KeyError
            For an unknown label.
        """
        if label not in self._labels:
            raise KeyError(f"No block {label!r}; the labels are {list(self._labels)}.")
        return self.blocks[self._labels.index(label)]


def _is_slices(spec: Any) -> bool:
    return (
        isinstance(spec, Sequence)
        and not isinstance(spec, str)
        and len(spec) > 0
        and all(isinstance(s, ParamSlice) for s in spec)
    )


def per_block(
    operator_cls: type[ModelCurvatureOperator],
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    blocks: Mapping[str, Any] | None = None,
    *,
    heads: int | None = None,
    **kwargs: Any,
) -> LabelledBlockDiagonal:
    """Block-diagonal operator with one block per entry of ``blocks``.

    Parameters
    ----------
    operator_cls:
        As for :func:`per_layer`.
    blocks:
        ``label -> selection``: a parameter selection (names, name patterns,
        modules, a predicate; see :func:`curvops.params.select_params`) or a list of
        :class:`ParamSlice`.  ``None``: :func:`transformer_blocks` of ``model`` with
        ``heads``.  Blocks must not overlap: the operator is the block-diagonal
        part :math:`\\sum_b P_b P_b^\\top A P_b P_b^\\top` of the curvature :math:`A` of
        their union, with rows and columns in the union's parameter order (that of
        the full operator over the same parameters, so ``compare(B, A)`` and
        ``B + A`` pair the right entries); each block keeps its own order.
    kwargs:
        Passed to every block's operator (``bn_mode``, ``output_fn``, ``seed``, ...).

    Returns
    -------
    LabelledBlockDiagonal
        One operator per block, in the order of ``blocks``; ``.blocks[i]`` is block
        ``i``'s, on the coordinates ``.positions[i]`` of the union.

    Raises
    ------
    TypeError
        A bad ``operator_cls`` or ``blocks``.
    ValueError
        An empty ``blocks``, unknown parameter names, out-of-range slices or
        overlapping blocks.

    Examples
    --------
    >>> layer = torch.nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0).double()
    >>> x = torch.randn(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> from curvops import GGNOperator
    >>> from curvops.losses import declare_loss
    >>> loss = declare_loss(lambda f, y: (f - y).square().mean())
    >>> B = per_block(GGNOperator, layer, loss, (x, torch.zeros_like(x)), heads=2)
    >>> len(B.blocks), B.shape[0] == sum(p.numel() for p in layer.parameters())
    (11, True)
    """
    if not (isinstance(operator_cls, type) and issubclass(operator_cls, ModelCurvatureOperator)):
        raise argument_error(
            "operator_cls", "a ModelCurvatureOperator subclass", operator_cls, kind=TypeError
        )
    if blocks is None:
        blocks = transformer_blocks(model, heads=heads)
    if not isinstance(blocks, Mapping) or not blocks:
        raise argument_error(
            "blocks", "a non-empty mapping label -> parameter selection", blocks, kind=TypeError
        )
    stream = as_data(data)
    ops: list[CurvatureOperator] = []
    pieces: list[list[tuple[str, torch.Tensor]]] = []
    for spec in blocks.values():
        op, block_pieces = _block_operator(operator_cls, model, loss_fn, stream, spec, kwargs)
        ops.append(op)
        pieces.append(block_pieces)
    positions, names = _coordinates(model, pieces)
    return LabelledBlockDiagonal(ops, list(blocks), positions=positions, param_names=names)


def _block_operator(
    operator_cls: type[ModelCurvatureOperator],
    model: nn.Module,
    loss_fn: LossFn,
    stream: Any,
    spec: Any,
    kwargs: dict[str, Any],
) -> tuple[CurvatureOperator, list[tuple[str, torch.Tensor]]]:
    """One block's operator and its coordinates as ``(parameter, flat indices)`` pieces."""
    if not _is_slices(spec):
        chosen = select_params(model, spec)
        op = operator_cls(model, loss_fn, stream, params=[n for n, _ in chosen], **kwargs)
        return op, [(n, torch.arange(p.numel())) for n, p in chosen]
    chosen = select_params(model, [s.name for s in spec])
    order = [n for n, _ in chosen]
    offsets = dict(zip(order, [0, *torch.tensor([p.numel() for _, p in chosen]).cumsum(0)]))
    sizes = {n: p.numel() for n, p in chosen}
    pieces = []
    for s in sorted(spec, key=lambda s: order.index(_canonical(model, s.name))):
        key = _canonical(model, s.name)
        idx = torch.arange(sizes[key]) if s.index is None else s.index.to(torch.int64)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= sizes[key]:
            raise argument_error(
                "blocks", f"slice indices in [0, {sizes[key]}) for {s.name}", s.index
            )
        pieces.append((key, idx.cpu()))
    base = operator_cls(model, loss_fn, stream, params=order, **kwargs)
    index = torch.cat([idx + int(offsets[key]) for key, idx in pieces])
    whole = index.numel() == base.shape[0] and bool(torch.equal(index, torch.arange(base.shape[0])))
    return (base if whole else Compressed(base, index)), pieces


def _coordinates(
    model: nn.Module, pieces: list[list[tuple[str, torch.Tensor]]]
) -> tuple[list[torch.Tensor], list[str]]:
    """Each block's coordinates in the union of the blocks' entries, in parameter order.

    The union lists every parameter that a block touches in the model's order, and
    within one the covered flat entries ascending; a parameter covered only in part
    is named ``"name[k of m entries #digest]"`` (:func:`_part_name`), so it pairs
    only with the same entries of the same parameter.

    Raises
    ------
    ValueError
        If two blocks share an entry (``blocks`` must not overlap).
    """
    touched = {name for block in pieces for name, _ in block}
    chosen = select_params(model, sorted(touched))
    covered: dict[str, torch.Tensor] = {}
    for block in pieces:
        for name, idx in block:
            covered[name] = torch.cat([covered.get(name, idx.new_empty(0)), idx])
    start, rank, names = 0, {}, []
    for name, p in chosen:
        entries = covered[name]
        kept = torch.unique(entries)
        if kept.numel() != entries.numel():
            raise argument_error(
                "blocks", f"non-overlapping blocks (entries of {name} are in two blocks)", name
            )
        lookup = torch.full((p.numel(),), -1, dtype=torch.int64)
        lookup[kept] = torch.arange(start, start + kept.numel())
        rank[name] = lookup
        start += kept.numel()
        names.append(name if kept.numel() == p.numel() else _part_name(name, kept, p.numel()))
    positions = [torch.cat([rank[name][idx] for name, idx in block]) for block in pieces]
    return positions, names


def _part_name(name: str, entries: torch.Tensor, size: int) -> str:
    """``"name[k of m entries #digest]"``: a name for the sorted flat ``entries`` of a parameter.

    The digest (a hash of the entries) tells parts of equal size apart, e.g. the query
    and key rows of one head.
    """
    digest = hashlib.sha1(entries.to(torch.int64).numpy().tobytes()).hexdigest()[:8]
    return f"{name}[{entries.numel()} of {size} entries #{digest}]"


def _canonical(model: nn.Module, name: str) -> str:
    """The first name of the parameter called ``name`` (aliases of shared parameters)."""
    target = dict(model.named_parameters(remove_duplicate=False))[name]
    return next(n for n, p in model.named_parameters() if p is target)
