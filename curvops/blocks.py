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
projections (per head with ``heads=``; under grouped-query attention the key and value
per key/value head, from ``kv_heads=`` or the model's config), the attention output
projection, and each MLP, for torch's own layers (``nn.MultiheadAttention`` in all its
layouts), nets' ``gpt-tiny`` and the Hugging Face layouts with separate projections
(BERT, Llama, ...) or a fused one of a known layout (GPT-2, MPT, Phi-3, GPTBigCode,
CodeGen; other fused projections are left whole).  Per-block spectra then take one
call each::

    B = per_block(HessianOperator, model, loss_fn, data, transformer_blocks(model, heads=4))
    spectra = {label: lanczos(b, 20).ritz().values for label, b in zip(B.labels, B.blocks)}
"""

from __future__ import annotations

import hashlib
import logging
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

logger = logging.getLogger(__name__)

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
@dataclass(frozen=True, eq=False, init=False)
class ParamSlice:
    """Part of one parameter: ``index`` holds flat (row-major) positions, ``None`` all of it.

    ``index`` may be given as integer positions (a tensor, numpy array, list or
    ``range`` of integers, or a ``slice`` with a ``stop``; ``slice(None)`` is the whole
    parameter) or as a boolean mask of the parameter's ``numel()`` entries (any shape,
    read row-major; :func:`per_block` checks its size), and is stored as a CPU
    ``int64`` tensor of positions (``mask_size`` remembers a mask's size).  Positions
    must be non-negative and distinct (a repeated position would count its coordinate
    twice); floating-point indices are refused, not truncated.

    The positions' order is the order of the coordinates of this parameter in a block
    of :func:`per_block`; the parameters of one block always come in the model's
    order, whatever the order of the block's list of slices.

    >>> ParamSlice("0.weight", torch.tensor([0, 1])).index.tolist()
    [0, 1]
    >>> ParamSlice("0.weight", [[False, True], [True, False]]).index.tolist()
    [1, 2]
    >>> ParamSlice("0.weight", slice(2, 6, 2)).index.tolist()
    [2, 4]
    """

    name: str
    index: torch.Tensor | None = None
    mask_size: int | None = field(default=None, init=False, repr=False)

    def __init__(self, name: str, index: Any = None) -> None:
        if not isinstance(name, str) or not name:
            raise argument_error("name", "a parameter name (a non-empty str)", name, kind=TypeError)
        positions, mask_size = _flat_positions(index)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "index", positions)
        object.__setattr__(self, "mask_size", mask_size)


def _flat_positions(index: Any) -> tuple[torch.Tensor | None, int | None]:
    """``ParamSlice``'s ``index`` as ``(int64 positions or None, size of a boolean mask)``."""
    if index is None:
        return None, None
    if isinstance(index, slice):
        return _slice_positions(index), None
    try:
        t = (index.detach() if isinstance(index, torch.Tensor) else torch.as_tensor(index)).cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise argument_error(
            "index", "integer flat positions or a boolean mask", index, kind=TypeError
        ) from error
    if t.numel() == 0:
        raise argument_error("index", "at least one position (or a mask with a True)", index)
    mask_size = None
    if t.dtype == torch.bool:
        mask_size = t.numel()
        t = t.reshape(-1).nonzero().reshape(-1)
    elif t.is_floating_point() or t.is_complex():
        raise argument_error(
            "index",
            "integer flat positions or a boolean mask (floating-point indices are not "
            "truncated to positions)",
            index,
            kind=TypeError,
        )
    t = t.reshape(-1).to(torch.int64)
    if t.numel() == 0:
        raise argument_error("index", "at least one position (or a mask with a True)", index)
    if int(t.min()) < 0:
        raise argument_error(
            "index", "non-negative flat positions (negative ones do not count from the end)", index
        )
    if torch.unique(t).numel() != t.numel():
        raise argument_error(
            "index", "distinct positions (a repeated one would count its coordinate twice)", index
        )
    return t, mask_size


def _slice_positions(index: slice) -> torch.Tensor | None:
    """A ``slice`` as positions (``None``: the whole parameter, ``slice(None)``)."""
    start, stop, step = index.start, index.stop, index.step
    bounds = [v for v in (start, stop, step) if v is not None]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in bounds):
        raise argument_error("index", "a slice of integers", index, kind=TypeError)
    if stop is None and start in (None, 0) and step in (None, 1):
        return None
    if stop is None or min(bounds) < 0 or step == 0:
        raise argument_error(
            "index",
            "a slice with non-negative start and stop and a positive step (the parameter's "
            "size is not known here: slice(None) for all of it)",
            index,
        )
    positions = torch.arange(start or 0, stop, step or 1, dtype=torch.int64)
    if positions.numel() == 0:
        raise argument_error("index", "a slice of at least one position", index)
    return positions


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
    ``q_proj``/``k_proj``/``v_proj``).  ``dim`` may count from the end (``-1``: the last).

    Raises
    ------
    TypeError
        If ``num_heads``, ``dim``, ``num_parts`` or ``part`` is not an integer.
    ValueError
        If ``shape`` is not a non-empty sequence of sizes, ``dim`` is not one of its
        dimensions, ``num_heads`` or ``num_parts`` is not positive, ``part`` is not in
        ``[0, num_parts)``, or ``shape[dim]`` is not divisible by ``num_parts * num_heads``.

    >>> [s.index.tolist() for s in head_slices((4, 2), "q.weight", 2)]
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> [s.index.tolist() for s in head_slices((4,), "q.bias", 2)]
    [[0, 1], [2, 3]]
    >>> [s.index.tolist() for s in head_slices((6,), "qkv.bias", 1, num_parts=3, part=2)]
    [[4, 5]]
    """
    shape, dim = _head_slices_arguments(shape, num_heads, dim, num_parts, part)
    size = shape[dim]
    if size % (num_heads * num_parts):
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


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _head_slices_arguments(
    shape: Any, num_heads: Any, dim: Any, num_parts: Any, part: Any
) -> tuple[tuple[int, ...], int]:
    """:func:`head_slices`' arguments checked: ``(shape as a tuple, dim counted from 0)``."""
    try:
        items = () if isinstance(shape, str | bytes) else tuple(shape)
    except TypeError:
        items = ()
    if not items or not all(_is_integer(s) and s >= 0 for s in items):
        raise argument_error("shape", "a sequence of non-negative integer sizes", shape)
    sizes = tuple(int(s) for s in items)
    for label, value in (("num_heads", num_heads), ("dim", dim), ("num_parts", num_parts)):
        if not _is_integer(value):
            raise argument_error(label, "an integer", value, kind=TypeError)
    if not _is_integer(part):
        raise argument_error("part", "an integer", part, kind=TypeError)
    if not -len(sizes) <= dim < len(sizes):
        raise argument_error(
            "dim",
            f"a dimension of shape {sizes} (an integer in [{-len(sizes)}, {len(sizes)}))",
            dim,
        )
    if num_heads < 1:
        raise argument_error("num_heads", "a positive head count", num_heads)
    if num_parts < 1:
        raise argument_error("num_parts", "a positive number of parts", num_parts)
    if not 0 <= part < num_parts:
        raise argument_error(
            "part", f"a part in [0, num_parts) = [0, {num_parts}) (counted from 0)", part
        )
    return sizes, int(dim) % len(sizes)


# ---------------------------------------------------------------------- transformer partition
_Q = {"q_proj", "q", "query", "wq", "q_lin"}
_K = {"k_proj", "k", "key", "wk", "k_lin"}
_V = {"v_proj", "v", "value", "wv", "v_lin"}
_FUSED = {"c_attn", "qkv", "qkv_proj", "wqkv", "in_proj"}
_OUT = {"o_proj", "out_proj", "c_proj", "dense", "o", "wo", "out_lin", "output"}
_MLP = ("mlp", "ffn", "feed_forward", "feedforward")
#: ``nn.MultiheadAttention``'s separate projections (``kdim``/``vdim`` other than
#: ``embed_dim``) and its key/value biases (``add_bias_kv``): role and the split dimension.
_MHA = {
    "q_proj_weight": ("q", 0),
    "k_proj_weight": ("k", 0),
    "v_proj_weight": ("v", 0),
    "bias_k": ("k", 2),
    "bias_v": ("v", 2),
}

Parts = list[tuple[str, ParamSlice]]


def _is_attention(segments: list[str]) -> bool:
    return any("attn" in s.lower() or "attention" in s.lower() for s in segments)


def _mlp_ancestor(segments: list[str]) -> str | None:
    for i, seg in enumerate(segments):
        if seg.lower() in _MLP:
            return ".".join(segments[: i + 1])
    return None


def transformer_blocks(
    model: nn.Module,
    *,
    heads: int | None = None,
    kv_heads: int | None = None,
    params: Any = None,
) -> dict[str, list[ParamSlice]]:
    """The labelled partition of a transformer's parameters for :func:`per_block`.

    Every selected parameter (default all trainable, shared ones once) goes to one
    block, in the model's order:

    * embeddings (``nn.Embedding``): ``"<module> (embedding)"``;
    * normalisation layers (a module type with ``Norm`` in its name): ``"<module> (norm)"``;
    * under an attention module (a name part containing ``attn``/``attention``, or an
      ``nn.MultiheadAttention``): query, key and value projections
      (``q_proj``/``query``/``q``..., ``nn.MultiheadAttention``'s ``in_proj_*`` or,
      with ``kdim``/``vdim``, ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``
      with the thirds of ``in_proj_bias``, and ``bias_k``/``bias_v`` with the
      key/value, and the fused projections of a known layout: GPT-2's ``c_attn`` (and
      any ``Conv1D`` ``c_attn``: ``[q; k; v]`` thirds), MPT's ``Wqkv``, Phi-3's
      ``qkv_proj``, GPTBigCode's ``c_attn`` (multi-query ``[q; k; v]``, else per head
      ``[q_h; k_h; v_h]``) and CodeGen's sharded ``qkv_proj``) ``"<module> (q)"``
      etc., per head ``"<module> (q, head 3)"`` when ``heads`` is given; the output
      projection (``o_proj``/``out_proj``/``c_proj``/``dense``/``output``)
      ``"<module> (attn out)"``.  A fused projection of another layout (any other
      ``c_attn``/``qkv``/``qkv_proj``/``wqkv``/``in_proj``, GPT-NeoX's
      ``query_key_value``) is one block ``"<module>"``, noted in the log
      (``curvops.blocks``); :func:`head_slices` cuts one whose layout you know;
    * everything under an ``mlp``/``ffn``/``feed_forward`` module: ``"<mlp module> (mlp)"``;
    * any other module's parameters: ``"<module>"`` (``"(model)"`` for the model's own).

    A block's coordinates (in :func:`per_block`) are its parameters in the model's
    order, each parameter's entries in the order of its slice's ``index``.

    Parameters
    ----------
    model:
        The transformer.
    heads:
        Split query, key and value into this many heads (``None``: one block each);
        the rows (output features) of a separate projection are its heads' consecutive
        ranges.  It must be the head count that the model declares where it declares
        one (the attention module's ``num_heads``/``n_head``/``n_heads``/
        ``num_attention_heads``, else the config's ``num_attention_heads``): another
        would label parts of heads as heads.  Refused when it splits nothing: no
        query/key/value projection of a known layout among the selected parameters
        (the error names the attention modules left whole).
    kv_heads:
        The number of key/value heads under grouped-query attention (fewer key/value
        heads than query heads, each shared by ``heads // kv_heads`` query heads); key
        and value blocks are then ``"<module> (k, kv-head j)"``.  ``None``: read from
        the model's config (Hugging Face ``num_key_value_heads``, where ``heads`` must
        be ``num_attention_heads``), else ``heads``; a key projection narrower than the
        query projection is then refused (grouped-query attention without a known
        key/value head count).  A ``kv_heads`` other than the count the model declares
        (``num_key_value_heads``, GPTBigCode's one multi-query head, as many as query
        heads for GPT-2, MPT and CodeGen) or its widths allow is refused.
    params:
        Parameter selection (see :func:`curvops.params.select_params`).

    Returns
    -------
    dict
        ``label -> list of ParamSlice``, in the model's order.

    Raises
    ------
    ValueError
        If ``heads`` does not divide a projection, splits nothing, or is not the model's
        declared head count, or ``kv_heads`` is given without ``heads``, does not divide
        ``heads`` or the key/value projections, contradicts the model's key/value head
        count, or applies to nothing.

    Examples
    --------
    >>> layer = torch.nn.TransformerEncoderLayer(4, 2, dim_feedforward=8)
    >>> list(transformer_blocks(layer))  # doctest: +NORMALIZE_WHITESPACE
    ['self_attn (q)', 'self_attn (k)', 'self_attn (v)', 'self_attn.out_proj (attn out)',
     'linear1', 'linear2', 'norm1 (norm)', 'norm2 (norm)']
    >>> len(transformer_blocks(layer, heads=2))  # q, k, v of 2 heads each, and the 5 others
    11
    """
    _check_heads(heads, kv_heads)
    blocks: dict[str, list[ParamSlice]] = {}
    kinds: set[str] = set()
    unsplit: list[str] = []
    notes: dict[str, str] = {}
    for name, p in select_params(model, params):
        parts, kind = _classify(model, name, tuple(p.shape), heads, kv_heads, notes)
        kinds.add(kind)
        if kind == "attention" and name.rpartition(".")[0] not in unsplit:
            unsplit.append(name.rpartition(".")[0])
        for label, piece in parts:
            blocks.setdefault(label, []).append(piece)
    for module_name, why in notes.items():
        (logger.info if heads is None else logger.warning)(
            "transformer_blocks: the fused projection %s is left whole (%s); its query, key "
            "and value blocks can be built with head_slices where its layout is known",
            module_name,
            why,
        )
    if heads is not None and not kinds & {"qkv", "grouped"}:
        raise argument_error(
            "heads",
            "None for a model without query/key/value projections of a known layout among "
            "the selected parameters (nothing to split per head; attention modules left "
            f"whole: {unsplit or 'none'})",
            heads,
        )
    if kv_heads is not None and "grouped" not in kinds:
        raise argument_error(
            "kv_heads",
            "None for a model without separate or fused [q; k; v] key/value projections "
            "among the selected parameters (nothing it applies to)",
            kv_heads,
        )
    return blocks


def _check_heads(heads: Any, kv_heads: Any) -> None:
    for name, value in (("heads", heads), ("kv_heads", kv_heads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise argument_error(name, "None or a positive integer", value, kind=TypeError)
        if value is not None and value < 1:
            raise argument_error(name, "None or a positive integer", value)
    if kv_heads is not None and (heads is None or heads % kv_heads):
        raise argument_error(
            "kv_heads",
            f"a divisor of heads = {heads} (each key/value head is shared by a group of "
            "query heads)",
            kv_heads,
        )


def _classify(
    model: nn.Module,
    name: str,
    shape: tuple[int, ...],
    heads: int | None,
    kv_heads: int | None,
    notes: dict[str, str],
) -> tuple[Parts, str]:
    """The ``(label, slice)`` parts of parameter ``name`` and its kind: ``"qkv"`` (a query,
    key or value projection), ``"grouped"`` (one split with ``kv_heads``), ``"attention"``
    (another parameter of an attention module, or a fused projection of an unknown layout,
    noted in ``notes``) or ``"other"``."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    where = module_name or "(model)"
    segments = module_name.split(".") if module_name else []
    last = segments[-1].lower() if segments else ""
    dim = 1 if type(module).__name__ == "Conv1D" and leaf == "weight" else 0
    parent = model.get_submodule(module_name.rpartition(".")[0]) if module_name else None
    attention = _is_attention(segments) or isinstance(parent, nn.MultiheadAttention)
    if isinstance(module, nn.Embedding):
        return [(f"{where} (embedding)", ParamSlice(name))], "other"
    if "norm" in type(module).__name__.lower():
        return [(f"{where} (norm)", ParamSlice(name))], "other"
    if isinstance(module, nn.MultiheadAttention):
        parts, kind = _mha_parts(where, name, leaf, shape, heads)
        if kind == "qkv":
            _check_declared_heads(model, module_name, heads)
        return parts, kind
    if attention and last in _Q | _K | _V:
        return _separate_parts(model, module_name, name, shape, dim, heads, kv_heads)
    if attention and last in _FUSED:
        return _fused_projection(model, module_name, name, shape, dim, (heads, kv_heads), notes)
    if attention and last in _OUT:
        return [(f"{where} (attn out)", ParamSlice(name))], "other"
    if (ancestor := _mlp_ancestor(segments)) is not None:
        return [(f"{ancestor} (mlp)", ParamSlice(name))], "other"
    return [(where, ParamSlice(name))], "attention" if attention else "other"


def _separate_parts(
    model: nn.Module,
    module_name: str,
    name: str,
    shape: tuple[int, ...],
    dim: int,
    heads: int | None,
    kv_heads: int | None,
) -> tuple[Parts, str]:
    """A separate query, key or value projection ``module_name``, per head with ``heads``
    (the key and value per key/value head under grouped-query attention)."""
    last = module_name.rpartition(".")[2].lower()
    role = "q" if last in _Q else "k" if last in _K else "v"
    blame = ("kv_heads", kv_heads) if kv_heads is not None else ("heads", heads)
    if role == "q":
        count, blame = heads, ("heads", heads)
        if heads is not None and kv_heads is None:
            _grouped_config(model, module_name, heads)  # a heads that breaks the groups
    else:
        count = _kv_count(model, module_name, heads, kv_heads)
    pieces = _split(shape, name, dim, (1,), (count,), blame)[0]
    _check_declared_heads(model, module_name.rpartition(".")[0], heads)
    kind = "grouped" if kv_heads is not None and role != "q" else "qkv"
    return _labelled(module_name, role, pieces, count, grouped=count != heads), kind


def _mha_parts(
    where: str, name: str, leaf: str, shape: tuple[int, ...], heads: int | None
) -> tuple[Parts, str]:
    """``nn.MultiheadAttention``'s own parameters: ``in_proj_weight``/``in_proj_bias`` in
    thirds, or (``kdim``/``vdim`` other than ``embed_dim``) ``q_proj_weight``,
    ``k_proj_weight``, ``v_proj_weight`` by rows; ``bias_k``/``bias_v`` (shape ``(1, 1, E)``)
    with the key/value, each head its ``E / heads`` consecutive entries."""
    blame = ("heads", heads)
    if leaf in ("in_proj_weight", "in_proj_bias"):
        return _fused_parts(where, name, shape, 0, (1, 1, 1), (heads, heads, heads), blame), "qkv"
    if leaf not in _MHA:
        return [(where, ParamSlice(name))], "attention"
    role, dim = _MHA[leaf]
    return _labelled(where, role, _split(shape, name, dim, (1,), (heads,), blame)[0], heads), "qkv"


def _labelled(
    where: str, role: str, pieces: list[ParamSlice], count: int | None, *, grouped: bool = False
) -> Parts:
    """``"<where> (role)"`` for a part not split (``count`` None), else ``"<where> (role,
    head h)"`` per head (``kv-head j`` for the key/value heads of grouped-query attention)."""
    if count is None:
        return [(f"{where} ({role})", pieces[0])]
    word = "kv-head" if grouped else "head"
    return [(f"{where} ({role}, {word} {h})", piece) for h, piece in enumerate(pieces)]


def _fused_parts(
    where: str,
    name: str,
    shape: tuple[int, ...],
    dim: int,
    units: tuple[int, ...],
    counts: tuple[int | None, ...],
    blame: tuple[str, Any],
) -> Parts:
    """A fused ``[q; k; v]`` projection: consecutive query, key and value parts along
    ``dim`` in the ratio ``units``, each split into ``counts`` heads."""
    out: Parts = []
    for role, pieces, count in zip("qkv", _split(shape, name, dim, units, counts, blame), counts):
        out += _labelled(where, role, pieces, count, grouped=count != counts[0])
    return out


def _split(
    shape: tuple[int, ...],
    name: str,
    dim: int,
    units: tuple[int, ...],
    counts: tuple[int | None, ...],
    blame: tuple[str, Any],
) -> list[list[ParamSlice]]:
    """Consecutive parts of ``shape[dim]`` in the ratio ``units``, part ``j`` cut into
    ``counts[j]`` equal heads (``None``: one piece); a single part not cut is the whole
    parameter (``index=None``).  An uneven cut is refused naming ``blame``'s argument."""
    if len(units) == 1 and counts[0] is None:
        return [[ParamSlice(name)]]
    size = shape[dim] if dim < len(shape) else 0
    total = sum(units)
    widths = [size // total * u for u in units] if total else []
    if not size or size % total or any(c and w % c for w, c in zip(widths, counts)):
        split = " : ".join(f"{u} part(s) of {c or 1} head(s)" for u, c in zip(units, counts))
        raise argument_error(
            blame[0],
            f"a head count dividing dimension {dim} of {name} (size {size}) evenly into {split}",
            blame[1],
        )
    flat = torch.arange(math.prod(shape)).reshape(shape)
    groups, start = [], 0
    for width, count in zip(widths, counts):
        step = width // (count or 1)
        groups.append(
            [
                ParamSlice(name, flat.narrow(dim, start + h * step, step).reshape(-1))
                for h in range(count or 1)
            ]
        )
        start += width
    return groups


@dataclass(frozen=True)
class _Fused:
    """The layout of a fused query/key/value projection along its output features.

    ``order``: ``"blocked"`` (``[q; k; v]``: the query's ``heads`` heads, then the key's
    and the value's ``kv`` heads, each ``head_dim`` wide), ``"per-head"`` (``[q_h; k_h;
    v_h]`` for each head ``h`` in turn) or ``"sharded"`` (consecutive shards of ``[q_s;
    v_s; k_s]``, each part ``shard`` wide; the query's features, and so its heads, are
    the ``q_s`` in turn, the same for key and value).  ``heads``/``kv``/``head_dim``
    ``None``: not declared by the model (taken from ``heads=`` and the width).
    """

    order: str
    heads: int | None
    kv: int | None
    head_dim: int | None
    source: str
    shard: int | None = None


def _positive_attr(obj: Any, attr: str) -> int | None:
    value: Any = getattr(obj, attr, None)
    return int(value) if _is_integer(value) and value > 0 else None


def _gpt2_layout(attn: nn.Module) -> _Fused | str:
    """GPT-2's ``c_attn``: ``split(embed_dim)`` into query, key and value thirds."""
    if getattr(attn, "is_cross_attention", False):
        return "cross-attention: it holds the key and value only"
    n, d = _positive_attr(attn, "num_heads"), _positive_attr(attn, "head_dim")
    return _Fused("blocked", n, n, d, "GPT-2's [q; k; v]") if n and d else "no num_heads"


def _mpt_layout(attn: nn.Module) -> _Fused | str:
    """MPT's ``Wqkv``: ``chunk(3)`` into query, key and value thirds."""
    n, d = _positive_attr(attn, "n_heads"), _positive_attr(attn, "head_dim")
    return _Fused("blocked", n, n, d, "MPT's [q; k; v]") if n and d else "no n_heads"


def _phi3_layout(attn: nn.Module) -> _Fused | str:
    """Phi-3's ``qkv_proj``: the query's ``num_attention_heads`` heads, then the key's and
    the value's ``num_key_value_heads``."""
    n = _positive_attr(getattr(attn, "config", None), "num_attention_heads")
    k, d = _positive_attr(attn, "num_key_value_heads"), _positive_attr(attn, "head_dim")
    return _Fused("blocked", n, k, d, "Phi-3's [q; k; v]") if n and k and d else "no config"


def _bigcode_layout(attn: nn.Module) -> _Fused | str:
    """GPTBigCode's ``c_attn``: ``[q; k; v]`` with one key/value head (``multi_query``),
    else viewed as ``(num_heads, 3 * head_dim)``: ``[q_h; k_h; v_h]`` per head."""
    if getattr(attn, "is_cross_attention", False):
        return "cross-attention: it holds the key and value only"
    n, k = _positive_attr(attn, "num_heads"), _positive_attr(attn, "kv_heads")
    d = _positive_attr(attn, "head_dim")
    if not (n and k and d):
        return "no num_heads"
    if getattr(attn, "multi_query", False):
        return _Fused("blocked", n, k, d, "GPTBigCode's multi-query [q; k; v]")
    return _Fused("per-head", n, k, d, "GPTBigCode's per-head [q_h; k_h; v_h]")


def _codegen_layout(attn: nn.Module) -> _Fused | str:
    """CodeGen's ``qkv_proj``: ``mp_num`` model-parallel shards ``[q_s; v_s; k_s]`` of
    ``embed_dim // mp_num`` features each (note the order: query, value, key)."""
    n = _positive_attr(attn, "num_attention_heads") or 0
    d = _positive_attr(attn, "head_dim") or 0
    shards = _positive_attr(attn, "mp_num")
    shard = (n * d) // shards if shards else 0
    if not shard or (n * d) % shard:  # HF's view(..., -1, 3 * shard) needs shard | n * d
        return "no num_attention_heads, head_dim and mp_num of shards dividing its width"
    return _Fused("sharded", n, n, d, "CodeGen's sharded [q_s; v_s; k_s]", shard)


#: Fused projections of a known layout: (attention module class, projection) -> layout.
_KNOWN_FUSED = {
    ("GPT2Attention", "c_attn"): _gpt2_layout,
    ("MptAttention", "Wqkv"): _mpt_layout,
    ("Phi3Attention", "qkv_proj"): _phi3_layout,
    ("GPTBigCodeAttention", "c_attn"): _bigcode_layout,
    ("CodeGenAttention", "qkv_proj"): _codegen_layout,
}


def _fused_layout(model: nn.Module, module_name: str, width: int) -> _Fused | str:
    """The layout of the fused projection ``module_name`` (``width`` output features), or
    why it is not known: only the layouts of :data:`_KNOWN_FUSED` (by the attention
    module's class) and a ``Conv1D`` ``c_attn`` (GPT-2's ``[q; k; v]`` thirds) are."""
    attn_name, _, leaf = module_name.rpartition(".")
    attn = model.get_submodule(attn_name)
    module = model.get_submodule(module_name)
    layout: _Fused | str = f"{type(attn).__name__}.{leaf} is not a layout known to curvops"
    for cls in type(attn).__mro__:
        if (cls.__name__, leaf) in _KNOWN_FUSED:
            layout = _KNOWN_FUSED[cls.__name__, leaf](attn)
            break
    else:
        if leaf == "c_attn" and type(module).__name__ == "Conv1D":
            layout = _Fused("blocked", None, None, None, "GPT-2's Conv1D c_attn [q; k; v]")
            if getattr(attn, "is_cross_attention", False):
                layout = "cross-attention: it holds the key and value only"
            elif width % 3:
                layout = f"{width} output features, not [q; k; v] thirds"
    if isinstance(layout, _Fused) and layout.heads and layout.kv and layout.head_dim:
        expected = (layout.heads + 2 * layout.kv) * layout.head_dim
        if width != expected:
            return f"{width} output features, not the {expected} of {layout.source}"
    return layout


def _fused_projection(
    model: nn.Module,
    module_name: str,
    name: str,
    shape: tuple[int, ...],
    dim: int,
    counts: tuple[int | None, int | None],
    notes: dict[str, str],
) -> tuple[Parts, str]:
    """A fused query/key/value projection: split by its known layout (per head with
    ``heads``), else left whole and noted in ``notes``; ``counts`` is ``(heads, kv_heads)``,
    checked against the counts the model declares."""
    heads, kv_heads = counts
    width = shape[dim] if dim < len(shape) else 0
    layout = _fused_layout(model, module_name, width)
    if isinstance(layout, str):
        notes[module_name] = layout
        return [(module_name, ParamSlice(name))], "attention"
    attn_name = module_name.rpartition(".")[0]
    _check_declared_heads(model, attn_name, heads)
    n = layout.heads or heads or 1
    k = layout.kv or n
    if kv_heads is not None and kv_heads != k:
        raise argument_error(
            "kv_heads",
            f"{k}, the key/value head count of {attn_name or '(model)'} ({layout.source} "
            f"with {n} query and {k} key/value head(s))",
            kv_heads,
        )
    if width % (n + 2 * k):
        raise argument_error(
            "heads",
            f"a head count dividing dimension {dim} of {name} (size {width}) into "
            f"{layout.source} parts",
            heads,
        )
    rows = _role_rows(layout, n, k, width // (n + 2 * k))
    flat = torch.arange(math.prod(shape)).reshape(shape)
    out: Parts = []
    for role in "qkv":
        groups = [rows[role].reshape(-1)] if heads is None else list(rows[role])
        pieces = [
            ParamSlice(name, flat.index_select(dim, g.sort().values).reshape(-1)) for g in groups
        ]
        count = None if heads is None else len(groups)
        out += _labelled(module_name, role, pieces, count, grouped=count != heads)
    return out, "grouped" if kv_heads is not None else "qkv"


def _role_rows(layout: _Fused, n: int, k: int, d: int) -> dict[str, torch.Tensor]:
    """The output features of the query, key and value of a fused projection of layout
    ``layout`` with ``n`` query and ``k`` key/value heads of width ``d``: ``role ->
    (heads, d)`` tensor, row ``h`` the features of head ``h`` in the model's order."""
    if layout.order == "per-head":
        base = 3 * d * torch.arange(n)[:, None] + torch.arange(d)
        return {"q": base, "k": base + d, "v": base + 2 * d}
    if layout.order == "sharded":
        shard = layout.shard or n * d
        feature = torch.arange(n * d)
        base = (feature // shard) * 3 * shard + feature % shard
        return {
            "q": base.reshape(n, d),
            "v": (base + shard).reshape(n, d),
            "k": (base + 2 * shard).reshape(n, d),
        }
    q = torch.arange(n * d).reshape(n, d)
    key = n * d + torch.arange(k * d).reshape(k, d)
    return {"q": q, "k": key, "v": key + k * d}


_HEAD_ATTRS = ("num_heads", "n_head", "n_heads", "num_attention_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_HEAD_KEY = "num_attention_heads"


def _declared(
    model: nn.Module, attn_name: str, attrs: Sequence[str], key: str
) -> tuple[int, str] | None:
    """The count that the attention module ``attn_name`` declares in one of its
    attributes ``attrs``, else the nearest config in ``key``, and where it was read."""
    attn = model.get_submodule(attn_name)
    for attr in attrs:
        if (value := _positive_attr(attn, attr)) is not None:
            return value, f"{attn_name or '(model)'}.{attr} = {value}"
    if (value := _positive_attr(_nearest_config(model, attn_name), key)) is not None:
        return value, f"{key} = {value} of the model's config"
    return None


def _check_declared_heads(model: nn.Module, attn_name: str, heads: int | None) -> None:
    """Refuse a ``heads`` other than the head count that ``attn_name`` declares."""
    declared = None if heads is None else _declared(model, attn_name, _HEAD_ATTRS, _HEAD_KEY)
    if declared is not None and declared[0] != heads:
        raise argument_error(
            "heads",
            f"{declared[0]}, the attention head count of {attn_name or '(model)'} "
            f"({declared[1]}): a block '(q, head h)' is one head of the model's own, and "
            "another count would cut or merge them",
            heads,
        )


def _kv_count(
    model: nn.Module, module_name: str, heads: int | None, kv_heads: int | None
) -> int | None:
    """The head count of the key or value projection ``module_name``: ``kv_heads``, the
    config's ``num_key_value_heads`` or ``heads``; refused where the key heads would not
    be as wide as the query heads (grouped-query attention with an unknown count), or
    ``kv_heads`` is not the count the model declares."""
    if heads is None:
        return None
    config = None if kv_heads is not None else _grouped_config(model, module_name, heads)
    count = kv_heads if kv_heads is not None else heads if config is None else config[1]
    attn_name = module_name.rpartition(".")[0]
    declared = _declared(model, attn_name, _KV_ATTRS, "num_key_value_heads")
    if kv_heads is not None and declared is not None and declared[0] != kv_heads:
        raise argument_error(
            "kv_heads",
            f"{declared[0]}, the key/value head count of {attn_name or '(model)'} ({declared[1]})",
            kv_heads,
        )
    q_rows = _projection_rows(model, attn_name, _Q)
    k_rows = _projection_rows(model, attn_name, _K)
    if q_rows is None or k_rows is None or k_rows * heads == q_rows * count:
        return count
    if kv_heads is not None:
        raise argument_error(
            "kv_heads",
            f"the key/value head count of {attn_name or '(model)'}: its key projection has "
            f"{k_rows} output features, heads of {q_rows} // {heads} = {q_rows // heads} like "
            f"the query's make {k_rows * heads / q_rows:g} heads",
            kv_heads,
        )
    raise argument_error(
        "heads",
        f"a head count for {attn_name or '(model)'}, whose key projection has {k_rows} output "
        f"features and its query projection {q_rows}: grouped-query attention (fewer "
        "key/value heads than query heads, each shared by a group of query heads); pass "
        "kv_heads= (the number of key/value heads) as well, or heads=None",
        heads,
    )


def _projection_rows(model: nn.Module, attn_name: str, names: set[str]) -> int | None:
    """Output features of the child of ``attn_name`` called one of ``names`` (None: none)."""
    attn = model.get_submodule(attn_name)
    for child_name, child in attn.named_children():
        weight = getattr(child, "weight", None)
        if child_name.lower() in names and isinstance(weight, torch.Tensor) and weight.ndim:
            return int(weight.shape[-1 if type(child).__name__ == "Conv1D" else 0])
    return None


def _nearest_config(model: nn.Module, module_name: str) -> Any:
    """The Hugging Face style ``config`` of ``module_name`` or its nearest ancestor (None)."""
    segments = module_name.split(".") if module_name else []
    for i in range(len(segments), -1, -1):
        config = getattr(model.get_submodule(".".join(segments[:i])), "config", None)
        if config is not None:
            return config
    return None


def _grouped_config(
    model: nn.Module, module_name: str, heads: int | None
) -> tuple[int, int] | None:
    """``(num_attention_heads, num_key_value_heads)`` of the nearest Hugging Face style
    ``config`` above ``module_name`` when it has grouped-query attention (None otherwise);
    a ``heads`` other than ``num_attention_heads`` is refused there."""
    config = _nearest_config(model, module_name)
    n = getattr(config, "num_attention_heads", None)
    k = getattr(config, "num_key_value_heads", None)
    if not (isinstance(n, int) and isinstance(k, int) and 0 < k < n and n % k == 0):
        return None
    if heads is not None and heads != n:
        raise argument_error(
            "heads",
            f"num_attention_heads = {n} of the model's config: its attention is grouped-query "
            f"({k} key/value heads, each shared by {n // k} query heads), so the heads of "
            "query and key/value are only paired for that count",
            heads,
        )
    return n, k


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
    kv_heads: int | None = None,
    params: Any = None,
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
        ``heads``, ``kv_heads`` and ``params``.  Blocks must not overlap: the operator
        is the block-diagonal part :math:`\\sum_b P_b P_b^\\top A P_b P_b^\\top` of the
        curvature :math:`A` of their union, with rows and columns in the union's
        parameter order (that of the full operator over the same parameters, so
        ``compare(B, A)`` and ``B + A`` pair the right entries).  Labels must be distinct
        after ``str()``.
    heads, kv_heads:
        Passed to :func:`transformer_blocks` when ``blocks`` is ``None``; refused with
        ``blocks`` (build them with ``transformer_blocks(model, heads=...)``).
    params:
        Parameter selection (as for :func:`per_layer`): only the selected parameters'
        entries of each block are kept, and a block with none of them is left out;
        refused when no block keeps any.
    kwargs:
        Passed to every block's operator (``bn_mode``, ``output_fn``, ``seed``, ...).

    Returns
    -------
    LabelledBlockDiagonal
        One operator per block, in the order of ``blocks``; ``.blocks[i]`` is block
        ``i``'s, on the coordinates ``.positions[i]`` of the union.  A block's own rows
        and columns are its parameters **in the model's parameter order, not the order
        of its list** of selections or :class:`ParamSlice`, each parameter's entries in
        the order of its slices' ``index`` (ascending for whole parameters).

    Raises
    ------
    TypeError
        A bad ``operator_cls`` or ``blocks``.
    ValueError
        An empty ``blocks``, labels equal after ``str()``, unknown parameter names,
        out-of-range slices, overlapping blocks, ``heads``/``kv_heads`` with ``blocks``,
        or a ``params`` that keeps nothing of ``blocks``.

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
    restrict = params
    if blocks is None:
        blocks = transformer_blocks(model, heads=heads, kv_heads=kv_heads, params=params)
        restrict = None  # already restricted
    elif heads is not None or kv_heads is not None:
        which, value = ("heads", heads) if heads is not None else ("kv_heads", kv_heads)
        raise argument_error(
            which,
            "None when blocks is given (it splits transformer_blocks' partition: pass "
            f"blocks=transformer_blocks(model, {which}=...))",
            value,
        )
    if not isinstance(blocks, Mapping) or not blocks:
        raise argument_error(
            "blocks", "a non-empty mapping label -> parameter selection", blocks, kind=TypeError
        )
    labels = [str(label) for label in blocks]
    if len(set(labels)) != len(labels):
        raise argument_error("blocks", "labels distinct after str()", list(blocks))
    chosen = _restricted(model, blocks, restrict)
    stream = as_data(data)
    ops: list[CurvatureOperator] = []
    pieces: list[list[tuple[str, torch.Tensor]]] = []
    for label, spec in chosen.items():
        op, block_pieces = _block_operator(
            operator_cls, model, loss_fn, stream, (label, spec), kwargs
        )
        ops.append(op)
        pieces.append(block_pieces)
    positions, names = _coordinates(model, pieces)
    return LabelledBlockDiagonal(ops, list(chosen), positions=positions, param_names=names)


def _restricted(model: nn.Module, blocks: Mapping[Any, Any], params: Any) -> dict[Any, Any]:
    """``blocks`` restricted to the parameters ``params`` (``None``: unchanged); blocks with
    nothing left are left out, and refused naming ``params`` when none is left."""
    if params is None:
        return dict(blocks)
    keep = {name for name, _ in select_params(model, params)}
    out: dict[Any, Any] = {}
    for label, spec in blocks.items():
        if _is_slices(spec):
            _block_params(model, label, [s.name for s in spec])  # unknown names are errors
            part: list[Any] = [s for s in spec if _canonical(model, s.name) in keep]
        else:
            part = [name for name, _ in _block_params(model, label, spec) if name in keep]
        if part:
            out[label] = part
    if not out:
        raise argument_error(
            "params", f"a selection sharing parameters with the blocks {list(blocks)}", params
        )
    return out


def _block_operator(
    operator_cls: type[ModelCurvatureOperator],
    model: nn.Module,
    loss_fn: LossFn,
    stream: Any,
    block: tuple[Any, Any],
    kwargs: dict[str, Any],
) -> tuple[CurvatureOperator, list[tuple[str, torch.Tensor]]]:
    """One block's operator and its coordinates as ``(parameter, flat indices)`` pieces,
    the parameters in the model's order (each one's slices in the order given);
    ``block`` is ``(label, selection)``."""
    label, spec = block
    if not _is_slices(spec):
        chosen = _block_params(model, label, spec)
        op = operator_cls(model, loss_fn, stream, params=[n for n, _ in chosen], **kwargs)
        return op, [(n, torch.arange(p.numel())) for n, p in chosen]
    chosen = _block_params(model, label, [s.name for s in spec])
    order = [n for n, _ in chosen]
    offsets = dict(zip(order, [0, *torch.tensor([p.numel() for _, p in chosen]).cumsum(0)]))
    sizes = {n: p.numel() for n, p in chosen}
    pieces = []
    for s in sorted(spec, key=lambda s: order.index(_canonical(model, s.name))):
        key = _canonical(model, s.name)
        if s.mask_size is not None and s.mask_size != sizes[key]:
            raise argument_error(
                "blocks",
                f"a boolean mask of {s.name}'s {sizes[key]} entries (ParamSlice index)",
                f"a mask of {s.mask_size} entries",
            )
        idx = torch.arange(sizes[key]) if s.index is None else s.index
        if int(idx.max()) >= sizes[key]:
            raise argument_error(
                "blocks", f"slice indices in [0, {sizes[key]}) for {s.name}", s.index
            )
        pieces.append((key, idx.cpu()))
    for key in order:
        listed = torch.cat([idx for k, idx in pieces if k == key])
        if torch.unique(listed).numel() != listed.numel():
            raise argument_error(
                "blocks", f"non-overlapping blocks (entries of {key} are twice in one)", key
            )
    base = operator_cls(model, loss_fn, stream, params=order, **kwargs)
    index = torch.cat([idx + int(offsets[key]) for key, idx in pieces])
    whole = index.numel() == base.shape[0] and bool(torch.equal(index, torch.arange(base.shape[0])))
    return (base if whole else Compressed(base, index)), pieces


def _block_params(model: nn.Module, label: Any, spec: Any) -> list[tuple[str, nn.Parameter]]:
    """``select_params(model, spec)`` for the block ``label``: a bad selection is refused
    naming ``blocks`` and the block (``select_params`` names its own ``params``)."""
    try:
        return select_params(model, spec)
    except (ValueError, TypeError) as error:
        found = re.fullmatch(r"Argument 'params': expected (.*?); received .*", str(error), re.S)
        if found is None:
            raise
        raise argument_error(
            "blocks",
            f"for block {str(label)!r}, {found.group(1)}",
            spec,
            kind=TypeError if isinstance(error, TypeError) else ValueError,
        ) from error


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
                "blocks",
                f"non-overlapping blocks (entries of {name} are in two blocks, or twice in one)",
                name,
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
