r"""Kronecker factors of K-FAC: the one implementation shared by the operators and optimisers.

For a layer with pre-activations :math:`s_{n,t} = W a_{n,t}` at :math:`T` weight-sharing
positions :math:`t` of sample :math:`n` (``nn.Linear`` on ``(N, ..., d_in)`` inputs: the
middle dimensions; ``nn.Conv2d``: the output pixels, :math:`a_{n,t}` an unfolded input
patch, Grosse & Martens 2016), the gradient of a sample's loss is
:math:`\nabla_W \ell_n = \sum_t g_{n,t} a_{n,t}^\top` with :math:`g_{n,t} = \partial\ell_n /
\partial s_{n,t}`.  K-FAC approximates the layer's curvature block by :math:`G \otimes A`
(acting on the row-major ``vec`` of ``W``, shape ``d_out x d_in``), with

.. math::

    \text{expand:}\quad A = \frac1N \sum_n \frac1T \sum_t a_{n,t} a_{n,t}^\top,\qquad
    G = \frac1N \sum_b N_b \sum_{n\in b} \sum_t \sum_j g^{(j)}_{n,t} g^{(j)\top}_{n,t},

    \text{reduce:}\quad A = \frac1N \sum_n \bar a_n \bar a_n^\top,\quad
    \bar a_n = \frac1T\sum_t a_{n,t},\qquad
    G = \frac1N \sum_b N_b \sum_{n\in b} \sum_j \Bigl(\sum_t g^{(j)}_{n,t}\Bigr)
    \Bigl(\sum_t g^{(j)}_{n,t}\Bigr)^\top

(Eschenhagen et al. 2023), where :math:`g^{(j)} = J_s^\top S_{\cdot j}` back-propagates
the columns :math:`j` of an output-space factor :math:`S` of batch :math:`b`'s curvature,
:math:`\sum_j S_{\cdot j} S_{\cdot j}^\top =` the output Hessian of the batch-mean loss
(``"type2"``, :func:`curvops.losses.output_hessian_factor`), or the sampled
(``"mc"``) or true-label (``"empirical"``) NLL gradients of
:func:`curvops.fisher.fisher_output_factor`.  Batches are weighted by their sizes
:math:`N_b/N`, as in the exact operators for losses that weight their terms equally;
a cross-entropy with ignored targets or class weights (normalised by its counted
targets) is refused (:func:`check_equal_term_weights`).  With a bias, :math:`a` is extended by a
constant 1 (weight and bias jointly), or the bias gets its own block :math:`G \otimes [1]`.
Outputs with extra dimensions are flattened first (:func:`flatten_loss_terms`):
cross-entropy ``(N, C, ...)`` into one row per position with the classes as columns, as
in curvlinops; MSE and BCE into one row per sample whose columns are all its output
elements (the same matrix for every layout of the outputs; curvlinops takes the last axis
as the class axis, which differs for ``(N, C, H, W)`` outputs and, with position mixing
or ``"reduce"``, for ``(N, T, C)``).  For ``"type2"`` that is :math:`M` backward passes
for :math:`M` output elements per sample (:math:`TC` for ``(N, T, C)`` instead of
:math:`C`), batched over 32 columns.  A layer called several
times in one forward pass (an unrolled recurrent cell) counts its calls as further
positions :math:`t` of the same sample: :math:`T` is the total over the calls.

Each :math:`g^{(j)}_{n}` above is sample :math:`n`'s part of a column's pullback, which
assumes that a loss sample's column reaches only its own sample; with samples coupled by
train-mode BatchNorm the operators take one column per loss sample instead
(:func:`sample_factor_columns`, found by ``probe_coupling``), see
:mod:`curvops.kfac`.  Parameters used outside their layer's forward are found by
:class:`ForeignUses` (``watch``) and refused.

:func:`batch_statistics` runs one forward pass (with hooks that record each supported
layer's input and output) and one backward pass per factor column (batched), never
changing the model (:func:`curvops._model_state.curvature_mode`, parameters replaced by detached
leaves).  The optimisers in :mod:`nets.optim.kfac` use :func:`layer_inputs`,
:func:`layer_output_grads`, :func:`input_factor` and :func:`grad_factor` on the
activations they capture.

>>> lin = torch.nn.Linear(2, 3)
>>> a = layer_inputs(lin, torch.ones(4, 2), bias=True)
>>> a.shape, input_factor(a, "expand").tolist()[0]
(torch.Size([4, 1, 3]), [4.0, 4.0, 4.0])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from curvops._model_state import curvature_mode, functional_forward
from curvops.data import Batch, move_to
from curvops.fisher import fisher_output_factor
from curvops.losses import (
    LossFn,
    batch_generator,
    batch_normaliser,
    loss_family,
    loss_kind,
    loss_reduction,
    output_hessian_factor,
)
from spectral.errors import NumericalError, argument_error

__all__ = [
    "APPROXIMATIONS",
    "FISHER_TYPES",
    "MAX_FACTOR_COLUMNS",
    "PROBE_SEED",
    "ForeignUses",
    "LayerRecord",
    "batch_statistics",
    "check_choice",
    "check_column_count",
    "check_equal_term_weights",
    "conv_padding",
    "drop_null_column",
    "factor_columns",
    "flatten_loss_terms",
    "foreign_uses",
    "grad_factor",
    "input_factor",
    "is_supported",
    "layer_grad_factor",
    "layer_input_factor",
    "layer_inputs",
    "layer_output_grads",
    "merge_calls",
    "output_factor",
    "padding_masks",
    "per_sample_rows",
    "record_grad_factor",
    "record_grads",
    "record_input_factor",
    "record_inputs",
    "record_layers",
    "refuse_padding",
    "rotated_gradient_squares",
    "rotated_pullback_squares",
    "rounding_floor",
    "sample_factor_columns",
    "sqrt_or_one",
    "zero_rounding",
]

FISHER_TYPES = ("type2", "mc", "empirical")
APPROXIMATIONS = ("expand", "reduce")


def conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric zero padding of a ``Conv2d`` as integers (``None`` if not expressible).

    >>> conv_padding(torch.nn.Conv2d(1, 1, 3, padding="same"))
    (1, 1)
    """
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in totals):
            return None  # asymmetric 'same' padding
        return (totals[0] // 2, totals[1] // 2)
    return (int(padding[0]), int(padding[1]))


def is_supported(module: nn.Module) -> bool:
    """``nn.Linear``, or ``nn.Conv2d`` with ``groups=1``, zero and symmetric padding,
    computing exactly what those classes compute.

    A subclass counts only if it keeps the class's own ``forward`` (and, for
    ``Conv2d``, ``_conv_forward``): the factors assume the output is :math:`W a` with
    :math:`a` the module's input, which a subclass that standardises its weight (timm's
    ``StdConv2d``), normalises it (a cosine classifier), rescales or pads its input
    (``Conv2dSame``) breaks -- K-FAC was 75-99 % off the exact GGN block there, silently.
    Such layers are unsupported (``remainder=`` decides: refused, or their exact diagonal).

    >>> is_supported(torch.nn.Conv2d(2, 2, 3, groups=2)), is_supported(torch.nn.Linear(1, 1))
    (False, True)
    >>> class Scaled(torch.nn.Linear):
    ...     def forward(self, x):
    ...         return super().forward(2 * x)
    >>> is_supported(Scaled(1, 1))
    False
    """
    cls = type(module)
    if isinstance(module, nn.Conv2d):
        return (
            cls.forward is nn.Conv2d.forward
            and getattr(cls, "_conv_forward", None) is nn.Conv2d._conv_forward
            and module.groups == 1
            and module.padding_mode == "zeros"
            and conv_padding(module) is not None
        )
    return isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward


def _mask_marks_padding_by(key: Any) -> str | None:
    """How an input entry named ``key`` marks padding: ``"zero"`` (Hugging Face's
    ``attention_mask``, ``decoder_attention_mask``, ...: 0 / False pads), ``"nonzero"``
    (torch's ``key_padding_mask``, ``src_key_padding_mask``, ...: True / a nonzero
    additive entry pads) or ``None`` (not a padding mask)."""
    if not isinstance(key, str):
        return None
    key = key.lower()
    if key.endswith("attention_mask"):
        return "zero"
    if key.endswith("padding_mask"):
        return "nonzero"
    return None


def padding_masks(inputs: Any, path: str = "inputs") -> Iterator[tuple[str, torch.Tensor, int]]:
    """``(path, mask, padded positions)`` of every recognised 2-D ``[N, T]`` padding mask in
    ``inputs`` (nested mappings, tuples and lists) that marks at least one padded position.

    Recognised by name (:func:`_mask_marks_padding_by`); masks of other shapes (a 4-D
    attention bias, which also holds the causal structure) and masks passed by position
    are not inspected.

    >>> ids = torch.ones(2, 3, dtype=torch.long)
    >>> [(p, n) for p, _, n in padding_masks({"input_ids": ids, "attention_mask": ids})]
    []
    >>> mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    >>> [(p, n) for p, _, n in padding_masks({"input_ids": ids, "attention_mask": mask})]
    [("inputs['attention_mask']", 1)]
    """
    if isinstance(inputs, Mapping):
        for key, value in inputs.items():
            where = f"{path}[{key!r}]"
            marks = _mask_marks_padding_by(key)
            if marks is not None and isinstance(value, torch.Tensor) and value.ndim == 2:
                keep = value.bool() if marks == "zero" else ~value.bool()
                padded = int(keep.numel() - int(keep.sum()))
                if padded:
                    yield where, value, padded
            else:
                yield from padding_masks(value, where)
    elif isinstance(inputs, (tuple, list)):
        for i, value in enumerate(inputs):
            yield from padding_masks(value, f"{path}[{i}]")


def refuse_padding(batch: Batch, operator: str = "K-FAC") -> None:
    r"""Refuse a batch whose inputs carry a padding mask that marks padded positions.

    K-FAC's input factor :math:`A` averages :math:`a_{n,t} a_{n,t}^\top` over every
    position :math:`t` a layer sees, so the activations of padded positions enter it
    although attention ignores them (their :math:`g` is zero, which keeps them out of
    :math:`G` and of E-KFAC's :math:`\Lambda`, not out of :math:`A` or the eigenbasis):
    the factors of a padded BERT classifier changed by 13-15 % with the token ids at
    masked positions, 24-33 % with three more padded positions, where the exact GGN
    changed by 0.  Only counting unmasked positions is not exact by definition for every
    layer (a head on pooled ``[N, D]`` inputs, cross-attention projections of another
    length), so padding is refused rather than guessed: a ``ValueError`` naming
    ``data (batch i)`` and the mask.  An all-ones mask is accepted.  Padding the model
    derives itself (a mask built from pad ids inside ``forward``) is not visible here.
    """
    found = [
        f"{where} marks {n} of {mask.numel()} positions as padding"
        for where, mask, n in padding_masks(batch.inputs)
    ]
    if found:
        raise argument_error(
            f"data (batch {batch.index})",
            f"batches without padded positions for {operator} (its input factor A averages "
            "over every token position a layer sees, so padded positions would enter it "
            "even though attention ignores them and the exact curvature does not depend on "
            "them): give batches of unpadded, equal-length sequences (e.g. group the "
            "sequences by length) with an all-ones or no attention mask, or use the exact "
            "operators (GGNOperator, FisherOperator, HessianOperator) or "
            "curvops.ggn_diagonal, which padding does not change",
            "; ".join(found),
        )


def layer_inputs(module: nn.Module, inputs: torch.Tensor, *, bias: bool = False) -> torch.Tensor:
    """The layer's input rows :math:`a_{n,t}`, shape ``(N, T, d_in[+1])``.

    ``Conv2d``: unfolded patches (channel-major, matching ``weight.reshape(d_out, -1)``);
    ``Linear``: the middle dimensions flattened.  ``bias=True`` appends a column of ones.
    """
    if isinstance(module, nn.Conv2d):
        a = F.unfold(
            inputs,
            kernel_size=module.kernel_size,
            dilation=module.dilation,
            padding=conv_padding(module) or (0, 0),
            stride=module.stride,
        ).transpose(1, 2)  # (N, T, in*kh*kw)
    else:
        a = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    if bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a


def layer_output_grads(module: nn.Module, grad_out: torch.Tensor) -> torch.Tensor:
    """Output gradients :math:`g_{n,t}` shaped ``(N, T, d_out)`` (channels last for Conv2d)."""
    if isinstance(module, nn.Conv2d):
        grad_out = grad_out.movedim(1, -1)
    return grad_out.reshape(grad_out.shape[0], -1, grad_out.shape[-1])


def input_factor(a: torch.Tensor, approx: str) -> torch.Tensor:
    r"""Sum over samples of :math:`\frac1T\sum_t a a^\top` (expand) or :math:`\bar a \bar a^\top`.

    ``a`` has shape ``(N, T, d)``; divide by :math:`N` for the factor :math:`A`.
    """
    if approx == "reduce":
        mean = a.mean(dim=1)
        return mean.T @ mean
    rows = a.reshape(-1, a.shape[-1])
    out = rows.T @ rows
    return out if a.shape[1] == 1 else out.div_(a.shape[1])


def grad_factor(g: torch.Tensor, approx: str) -> torch.Tensor:
    r""":math:`\sum_{n,t} g g^\top` (expand) or :math:`\sum_n (\sum_t g)(\sum_t g)^\top` (reduce).

    ``g`` has shape ``(N, T, d_out)``.
    """
    if approx == "reduce":
        total = g.sum(dim=1)
        return total.T @ total
    rows = g.reshape(-1, g.shape[-1])
    return rows.T @ rows


def _gram_sum(X: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_n X_n X_n^\top` of ``X`` shaped ``(N, D, T)`` (no copy of ``X``).

    Batched matrix products over chunks of samples, each chunk's ``(chunk, D, D)``
    products summed in place: faster than one ``(D, N T) x (N T, D)`` product, which
    would first copy ``X`` into that layout, when ``T`` is not small next to ``D``.
    """
    n, d, t = X.shape
    if 4 * t < d:  # few positions per sample: one large product on a copy is cheaper
        rows = X.transpose(1, 2).reshape(-1, d)
        return rows.T @ rows
    chunk = max(1, min(8, (1 << 20) // (d * d)))
    out = X.new_zeros(d, d)
    for start in range(0, n, chunk):
        part = X[start : start + chunk]
        out += torch.bmm(part, part.transpose(1, 2)).sum(dim=0)
    return out


def layer_input_factor(
    module: nn.Module, inputs: torch.Tensor, approx: str, *, ones: bool = False
) -> torch.Tensor:
    r""":func:`input_factor` of :func:`layer_inputs` (with ``bias=ones``), computed from the input.

    For ``Conv2d`` the unfolded patches ``(N, d_in, T)`` are used in the layout
    ``F.unfold`` returns them (no transposed copy); the column of ones for a joint bias
    adds :math:`\frac1T\sum_{n,t} a_{n,t}` and :math:`N` (expand) without
    materialising it.
    """
    if not isinstance(module, nn.Conv2d):
        return input_factor(layer_inputs(module, inputs, bias=ones), approx)
    patches = F.unfold(
        inputs,
        kernel_size=module.kernel_size,
        dilation=module.dilation,
        padding=conv_padding(module) or (0, 0),
        stride=module.stride,
    )  # (N, d_in, T)
    n, d, t = patches.shape
    if approx == "reduce":
        mean = patches.mean(dim=2)
        if ones:
            mean = torch.cat([mean, mean.new_ones(n, 1)], dim=1)
        return mean.T @ mean
    gram = _gram_sum(patches)
    if t != 1:
        gram.div_(t)
    if not ones:
        return gram
    out = patches.new_empty(d + 1, d + 1)
    out[:d, :d] = gram
    total = patches.sum(dim=(0, 2)) / t
    out[:d, d] = total
    out[d, :d] = total
    out[d, d] = n
    return out


def layer_grad_factor(module: nn.Module, grad_out: torch.Tensor, approx: str) -> torch.Tensor:
    """:func:`grad_factor` of :func:`layer_output_grads` (``Conv2d``: no channels-last copy)."""
    if not isinstance(module, nn.Conv2d):
        return grad_factor(layer_output_grads(module, grad_out), approx)
    g = grad_out.reshape(grad_out.shape[0], grad_out.shape[1], -1)  # (N, d_out, T)
    if approx == "reduce":
        total = g.sum(dim=2)
        return total.T @ total
    return _gram_sum(g)


def flatten_loss_terms(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs ``(rows, C)`` and targets with one row per loss term (or per sample).

    Cross-entropy ``(N, C, d1, ...)`` with targets ``(N, d1, ...)``: one row per
    position, the classes as columns (as curvlinops does); the same for
    :func:`curvops.losses.sequence_cross_entropy`'s ``(N, d1, ..., C)`` (classes last).
    MSE and BCE (elementwise losses with a diagonal output Hessian, no class axis)
    ``(N, ...)``: one row per sample with all ``M`` output elements as its columns, so the
    factor columns of :func:`batch_statistics` are the ``M`` output elements, whatever the layout
    (``(N, C, H, W)`` and ``(N, H, W, C)`` give the same K-FAC; curvlinops instead
    takes the last axis as the class axis, which for ``(N, C, H, W)`` feeds several
    elements of one layer position into one column).  Other losses keep their shapes.

    >>> f = torch.zeros(2, 3, 4, 5)
    >>> [t.shape for t in flatten_loss_terms(torch.nn.MSELoss(), f, f)]
    [torch.Size([2, 60]), torch.Size([2, 60])]
    """
    family = loss_family(loss_fn)
    if outputs.ndim <= 2:
        return outputs, targets
    if family in ("ce", "nll"):
        flat = outputs.movedim(1, -1).reshape(-1, outputs.shape[1])
        return flat, targets.reshape(-1)
    if family == "seq_ce":  # classes last: one row per token
        return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)
    if family in ("mse", "bce") and targets.shape == outputs.shape:
        n = outputs.shape[0]
        return outputs.reshape(n, -1), targets.reshape(n, -1)
    return outputs, targets


def check_equal_term_weights(
    loss_fn: LossFn, inputs: Any, targets: torch.Tensor, terms: int
) -> None:
    """Refuse a loss whose mean does not weight its ``terms`` loss terms equally.

    K-FAC's factors average over the loss terms (samples, or positions after
    :func:`flatten_loss_terms`) and weight batches by their sizes.  A cross-entropy
    that skips ``ignore_index`` targets or weights classes divides by the counted
    targets instead (:func:`curvops.losses.batch_normaliser`): its K-FAC would be
    normalised differently from the exact curvature it approximates, and a list of
    batches would differ from their concatenation (by 3.6 % for the empirical
    Fisher on a small MLP with 4 ignored targets of 10).  Such losses are refused.

    Raises
    ------
    ValueError
        Naming ``loss_fn``, the normaliser and the number of loss terms.
    """
    if loss_family(loss_fn) not in ("ce", "nll", "seq_ce"):
        return
    nu = batch_normaliser(loss_fn, inputs, targets, terms)
    if loss_reduction(loss_fn) == "sum" or nu == float(terms):
        return
    raise argument_error(
        "loss_fn",
        f"a loss whose mean weights its {terms} loss terms equally for K-FAC (this batch's "
        f"normaliser is {nu:g}: ignored targets or class weights); use the exact operators "
        "(GGNOperator, FisherOperator, diagonal_approximation) for such losses",
        loss_fn,
    )


def output_factor(
    loss_fn: LossFn,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    fisher: str,
    mc_samples: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Output-space factor ``S`` (rows, C, r) of the batch-mean curvature of ``fisher`` type.

    Raises
    ------
    ValueError
        ``fisher="type2"`` with a loss that has no closed-form Hessian square root
        (use ``"empirical"``).
    """
    if fisher == "type2":
        kind = loss_kind(loss_fn, outputs, targets)
        if kind not in ("ce", "seq_ce", "mse", "bce"):
            raise argument_error(
                "loss_fn",
                "a loss with a closed-form output Hessian for fisher='type2': "
                "CrossEntropyLoss or sequence_cross_entropy without class weights, label "
                "smoothing or ignored targets, MSELoss, or BCEWithLogitsLoss without "
                "weights (use "
                "fisher='empirical' for other losses and settings)",
                loss_fn,
            )
        factor, _ = output_hessian_factor(loss_fn, outputs, targets)
        if kind in ("ce", "seq_ce"):  # (rows, C) logits, classes last: softmax rank C - 1
            return drop_null_column(factor, torch.softmax(outputs.detach(), dim=-1).sqrt())
        return factor
    kind = "empirical" if fisher == "empirical" else "mc"
    return fisher_output_factor(
        loss_fn, outputs, targets, kind=kind, mc_samples=mc_samples, generator=generator
    )


def drop_null_column(factor: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    r"""A factor with one column fewer and the same :math:`S S^\top`, given :math:`S u = 0`.

    ``factor`` ``(n, C, C)`` with unit null vectors ``null`` ``(n, C)``
    (:math:`u = \sqrt{p}` for the softmax cross-entropy factor
    :math:`\operatorname{diag}(\sqrt p) - p\sqrt p^\top`, whose Hessian has rank
    :math:`C - 1`).  With the Householder reflection :math:`R = I - 2ww^\top/w^\top w`,
    :math:`w = u + e_C`, which maps :math:`e_C` to :math:`-u`, :math:`(SR)(SR)^\top =
    SS^\top` and the last column of :math:`SR` is :math:`-Su = 0`: dropping it saves one
    backward pass per batch of the ``C``.  If :math:`\|S u\|` is not at rounding level
    (not that factor), ``factor`` is returned unchanged.

    >>> p = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    >>> S = torch.diag_embed(p.sqrt()) - p.unsqueeze(-1) * p.sqrt().unsqueeze(-2)
    >>> R = drop_null_column(S, p.sqrt())
    >>> R.shape, bool(torch.allclose(R @ R.mT, S @ S.mT))
    (torch.Size([1, 3, 2]), True)
    """
    c = factor.shape[-1]
    if factor.ndim != 3 or c < 2 or null.shape != factor.shape[::2]:
        return factor
    residual = (factor @ null.unsqueeze(-1)).abs().amax()
    scale = factor.abs().amax()
    if not bool(residual <= 64 * c * torch.finfo(factor.dtype).eps * scale):
        return factor
    w = null.clone()
    w[:, -1] += 1.0
    coef = 2.0 / (w * w).sum(dim=-1)  # w^T w = 2 + 2 u_C >= 2
    Sw = factor @ w.unsqueeze(-1)  # (n, C, 1)
    reflected = factor - (coef.reshape(-1, 1, 1) * Sw) * w.unsqueeze(1)
    return reflected[:, :, :-1]


@dataclass
class LayerRecord:
    """One call of a supported layer: its detached input and the output tensor in the graph.

    With ``rows=True`` (the calls of a layer called several times, merged by
    :func:`merge_calls`) ``inputs`` holds the layer's input rows ``(N, T, d_in)``
    (:func:`layer_inputs`) and each of ``grads`` the output-gradient rows
    ``(N, T, d_out)`` (:func:`layer_output_grads`), the calls' positions concatenated.
    ``coupled`` is set by :func:`batch_statistics` (``probe_coupling``) when a column
    supported on one loss sample reached other samples' rows of this layer's output
    gradient (train-mode BatchNorm between the layer and the loss); ``pullbacks`` when
    each of ``grads`` is the pullback of a column supported on one loss sample
    (``sample_columns``), whose weight gradient sums over all the layer's samples.
    """

    module: nn.Module
    inputs: torch.Tensor
    output: torch.Tensor
    grads: list[torch.Tensor] = field(default_factory=list)
    rows: bool = False
    coupled: bool = False
    pullbacks: bool = False


def record_inputs(record: LayerRecord) -> torch.Tensor:
    """The input rows :math:`a_{n,t}` ``(N, T, d_in)`` of a record (:func:`layer_inputs`)."""
    return record.inputs if record.rows else layer_inputs(record.module, record.inputs)


def record_grads(record: LayerRecord, g: torch.Tensor) -> torch.Tensor:
    """Output-gradient rows :math:`g_{n,t}` ``(N, T, d_out)`` of one of ``record.grads``."""
    return g if record.rows else layer_output_grads(record.module, g)


def record_input_factor(record: LayerRecord, approx: str, *, ones: bool = False) -> torch.Tensor:
    """:func:`layer_input_factor` of a record (of its rows when calls were merged)."""
    if not record.rows:
        return layer_input_factor(record.module, record.inputs, approx, ones=ones)
    a = record.inputs
    if ones:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return input_factor(a, approx)


def record_grad_factor(record: LayerRecord, g: torch.Tensor, approx: str) -> torch.Tensor:
    """:func:`layer_grad_factor` of one of ``record.grads``."""
    if record.rows:
        return grad_factor(g, approx)
    return layer_grad_factor(record.module, g, approx)


def merge_calls(records: Sequence[LayerRecord]) -> list[LayerRecord]:
    r"""One record per layer: the calls of a layer called several times become positions.

    A layer applied :math:`K` times in one forward pass (weight sharing by repeated
    calls, e.g. an unrolled recurrent cell) has the per-sample gradient
    :math:`\sum_k \sum_t g_{n,k,t} a_{n,k,t}^\top`: exactly that of one call on the
    concatenated positions.  Its calls are therefore merged into one record in row form
    (``rows=True``), so the factors' :math:`1/T` (expand), the position means (reduce)
    and E-KFAC's per-sample gradients use all :math:`T = \sum_k T_k` positions, and
    the one-call and the repeated-call forms of a function get the same K-FAC.

    Raises
    ------
    ValueError
        Naming ``model``, if the calls of one layer see different numbers of samples.
    """
    by_module: dict[nn.Module, list[LayerRecord]] = {}
    for record in records:
        by_module.setdefault(record.module, []).append(record)
    out = []
    for module, calls in by_module.items():
        if len(calls) == 1:
            out.append(calls[0])
            continue
        sizes = sorted({int(c.inputs.shape[0]) for c in calls})
        if len(sizes) > 1:
            raise argument_error(
                "model",
                "a layer whose repeated calls in one forward pass all see the batch's "
                "samples along dimension 0 (for K-FAC)",
                f"a {type(module).__name__} called {len(calls)} times on {sizes} samples",
            )
        inputs = torch.cat([record_inputs(c) for c in calls], dim=1)
        grads = [
            torch.cat([record_grads(c, c.grads[j]) for c in calls], dim=1)
            for j in range(len(calls[0].grads))
        ]
        coupled = any(c.coupled for c in calls)
        merged = LayerRecord(module, inputs, calls[0].output, grads, rows=True, coupled=coupled)
        merged.pullbacks = calls[0].pullbacks
        out.append(merged)
    return out


@contextmanager
def record_layers(modules: Sequence[nn.Module]) -> Iterator[list[LayerRecord]]:
    """Forward hooks recording every call of ``modules``; removed on exit.

    The network continues with a copy of each layer's output, so an in-place operation
    after the layer (``ReLU(inplace=True)``) cannot rebase the recorded tensor.
    """
    records: list[LayerRecord] = []

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        records.append(LayerRecord(module, inputs[0].detach(), output))
        return output.clone()

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


#: factor columns back-propagated together (one batched backward pass)
COLUMN_CHUNK = 32

#: the most factor columns one batch back-propagates; each column costs a backward pass
#: and keeps a gradient the size of every K-FAC layer's output, so more is refused
#: (:func:`check_column_count`) rather than left to run for hours or exhaust memory
MAX_FACTOR_COLUMNS = 4096


def check_column_count(S: torch.Tensor, samples: int, *, per_position: bool, fisher: str) -> int:
    """The number of columns :func:`factor_columns` yields for ``S``, refused above
    :data:`MAX_FACTOR_COLUMNS` (``ValueError`` naming ``fisher``).

    Exact type-2 columns are one per output element of a sample for MSE/BCE, and for
    E-KFAC's corrections one per loss position and class: a language model's
    ``T' (V - 1)`` (64 tokens, 256 symbols: 16,320) is far beyond what a backward pass
    per column can afford, while ``fisher="mc"`` needs one column per MC sample.

    >>> check_column_count(torch.zeros(6, 5, 4), 2, per_position=True, fisher="type2")
    12
    """
    rows, _, r = S.shape
    per = rows // samples if samples else 1
    count = r * per if per_position and per > 1 else r
    if count > MAX_FACTOR_COLUMNS:
        how = f"{per} loss positions x {r} columns" if per_position and per > 1 else f"{r} columns"
        raise argument_error(
            "fisher",
            f"a curvature factor of at most {MAX_FACTOR_COLUMNS} columns per batch "
            "(curvops.kronecker.MAX_FACTOR_COLUMNS; each column is a backward pass and "
            "keeps a gradient per layer). Use fisher='mc' (one column per sample of "
            "mc_samples, unbiased), or raise the limit if time and memory allow",
            f"fisher={fisher!r} needing {count} columns ({how})",
        )
    return count


def factor_columns(S: torch.Tensor, samples: int, *, per_position: bool) -> Iterator[torch.Tensor]:
    r"""The factor's columns as gradients of the flat outputs ``(rows, C)``, in chunks.

    ``S`` ``(rows, C, r)`` with the ``rows = samples * T'`` loss terms sample-major.
    Column :math:`j` is :math:`S_{\cdot\cdot j}` on every row: one backward pass serves all
    samples and positions.  With ``per_position`` (and :math:`T' > 1`) each column is
    also restricted to one loss position :math:`t'`: :math:`T' r` columns, each supported
    on a single loss term of every sample, so that :math:`\sum_{t',j} g g^\top` of the
    per-sample gradients is the exact curvature (E-KFAC) rather than containing
    cross-position terms :math:`g_{t'} g_{t''}^\top`.  Yields ``(k, rows, C)`` chunks of at
    most :data:`COLUMN_CHUNK` columns.
    """
    rows, c, r = S.shape
    per = rows // samples if samples else 1
    columns = S.permute(2, 0, 1)  # (r, rows, C)
    if not per_position or per == 1:
        for start in range(0, r, COLUMN_CHUNK):
            yield columns[start : start + COLUMN_CHUNK]
        return
    grouped = columns.reshape(r, samples, per, c)
    todo = [(t, j) for t in range(per) for j in range(r)]
    for start in range(0, len(todo), COLUMN_CHUNK):
        part = todo[start : start + COLUMN_CHUNK]
        chunk = S.new_zeros(len(part), samples, per, c)
        for i, (t, j) in enumerate(part):
            chunk[i, :, t] = grouped[j, :, t]
        yield chunk.reshape(len(part), rows, c)


def _backward_columns(
    flat: torch.Tensor, live: list[LayerRecord], chunks: Iterator[torch.Tensor]
) -> None:
    """Back-propagate every chunk of columns from ``flat`` to the layers' outputs."""
    pending = next(chunks, None)
    while pending is not None:
        following = next(chunks, None)
        with torch.enable_grad():
            grads = torch.autograd.grad(
                [flat],
                [r.output for r in live],
                grad_outputs=[pending.reshape(-1, *flat.shape)],
                retain_graph=following is not None,
                allow_unused=True,
                materialize_grads=True,
                is_grads_batched=True,
            )
        for record, g in zip(live, grads):
            record.grads.extend(g.detach().unbind(0))
        pending = following


def sample_factor_columns(
    S: torch.Tensor, samples: int, sample_range: tuple[int, int], *, per_position: bool
) -> Iterator[torch.Tensor]:
    r"""The factor's columns restricted to one loss sample each, in chunks.

    As :func:`factor_columns`, but column :math:`(n, j)` (with ``per_position``:
    :math:`(n, t', j)`) is :math:`S_{\cdot\cdot j}` on the loss rows of sample :math:`n`
    only, for the samples ``start <= n < stop`` of ``sample_range``.  When the samples of
    a batch are coupled (train-mode BatchNorm) the pullback of such a column to a layer
    reaches every sample's rows, and :math:`\sum_m \sum_t g_{m,t} a_{m,t}^\top` over all
    of them is the pullback of loss sample :math:`n`'s column to the weight: the squares
    of these sum to the exact curvature block (E-KFAC's :math:`\Lambda`).

    >>> S = torch.ones(4, 3, 2)  # 2 samples x 2 positions, 3 classes, 2 columns
    >>> [tuple(c.shape) for c in sample_factor_columns(S, 2, (0, 2), per_position=True)]
    [(8, 4, 3)]
    """
    rows, c, r = S.shape
    per = rows // samples if samples else 1
    grouped = S.permute(2, 0, 1).reshape(r, samples, per, c)
    positions: list[int | None] = list(range(per)) if per_position and per > 1 else [None]
    todo = [(n, t, j) for n in range(*sample_range) for t in positions for j in range(r)]
    for start in range(0, len(todo), COLUMN_CHUNK):
        part = todo[start : start + COLUMN_CHUNK]
        chunk = S.new_zeros(len(part), samples, per, c)
        for i, (n, t, j) in enumerate(part):
            if t is None:
                chunk[i, n] = grouped[j, n]
            else:
                chunk[i, n, t] = grouped[j, n, t]
        yield chunk.reshape(len(part), rows, c)


#: seed of the random probe column of :func:`batch_statistics` (never the global RNG)
PROBE_SEED = 20180613


def _with_probe(flat_2d: torch.Tensor, samples: int, chunks: Iterator[torch.Tensor]) -> Any:
    """``chunks`` with a random column supported on sample 0's loss rows put first."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probe = torch.randn(tuple(flat_2d.shape), generator=generator, dtype=torch.float64)
    probe[int(flat_2d.shape[0]) // samples :] = 0.0
    probe = probe.to(flat_2d.device, flat_2d.dtype).unsqueeze(0)
    first = next(chunks, None)
    yield probe if first is None else torch.cat([probe, first])
    if first is not None:
        yield from chunks


def _split_probe(records: Sequence[LayerRecord], samples: int) -> None:
    """Remove the probe's gradient from every record and set ``coupled`` from it.

    The probe is supported on loss sample 0: a layer whose other samples' rows of its
    output gradient are not all exactly 0 has samples coupled to sample 0 between it
    and the loss.  Without coupling those rows are exact zeros (no rounding: nothing
    flows into them), so the test has no tolerance.
    """
    for record in records:
        g = record.grads.pop(0)
        lead = int(g.shape[0]) if g.ndim else 0
        if samples > 1 and lead and lead % samples == 0:
            record.coupled = bool(g[lead // samples :].ne(0).any())


def _tensor_args(args: Sequence[Any], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The tensors among the arguments of a call (and in its list/tuple arguments)."""
    for value in [*args, *kwargs.values()]:
        items = value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor):
                yield item


def _carries_grad(out: Any) -> bool:
    """Whether a call's result (a tensor, or a list/tuple of them) requires grad."""
    items = out if isinstance(out, (list, tuple)) else (out,)
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in items)


class ForeignUses(TorchFunctionMode):
    """Record calls using a watched parameter outside the forward of the layer owning it.

    ``owners`` maps ``id`` of a parameter tensor (the leaf the forward receives) to
    ``(tensor, layer, name)``.  A call taking the tensor whose result requires grad,
    made while the innermost running layer of ``layers`` is not its owner (a tied
    decoder ``F.linear(h, enc.weight.t())``, ``F.conv2d(x, conv.weight)`` in another
    module's forward), is recorded in :attr:`found` as ``(name, function, layer)``; metadata
    reads (``.shape``) and detached uses (``.detach()``, ``torch.no_grad``) are not
    uses in the graph and are not recorded.
    """

    def __init__(self, owners: dict[int, tuple[torch.Tensor, nn.Module, str]]) -> None:
        super().__init__()
        self.owners = owners
        self.active: list[nn.Module] = []
        self.found: list[tuple[str, str, nn.Module]] = []

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inner = self.active[-1] if self.active else None
        for t in _tensor_args(args, kwargs):
            entry = self.owners.get(id(t))
            if entry is not None and entry[0] is t and entry[1] is not inner:
                if _carries_grad(out):
                    name = getattr(func, "__name__", repr(func))
                    self.found.append((entry[2], name, entry[1]))
        return out


@contextmanager
def foreign_uses(
    layers: Sequence[nn.Module], owners: dict[int, tuple[torch.Tensor, nn.Module, str]]
) -> Iterator[ForeignUses]:
    """A :class:`ForeignUses` mode tracking the running ``layers`` (nothing if no ``owners``)."""
    mode = ForeignUses(owners)
    if not owners:
        yield mode
        return

    def enter(module: nn.Module, inputs: Any) -> None:
        mode.active.append(module)

    def leave(module: nn.Module, inputs: Any, output: Any) -> None:
        if mode.active and mode.active[-1] is module:
            mode.active.pop()

    handles = [m.register_forward_pre_hook(enter) for m in layers]
    handles += [m.register_forward_hook(leave, always_call=True) for m in layers]
    try:
        with mode:
            yield mode
    finally:
        for handle in handles:
            handle.remove()


def _refuse_foreign_uses(
    found: Sequence[tuple[str, str, nn.Module]], records: Sequence[LayerRecord]
) -> None:
    """Raise the ``ValueError`` naming ``model`` for a parameter used outside its layer.

    Only for layers whose forward ran (``records``): a layer never called, its parameters
    used only another way, gets the operators' "never called" error instead.
    """
    called = {id(record.module) for record in records}
    found = [entry for entry in found if id(entry[2]) in called]
    if not found:
        return
    name, func, _ = found[0]
    raise argument_error(
        "model",
        "a model using each K-FAC layer's weight and bias only inside that layer's forward "
        "(K-FAC's and E-KFAC's factors see only the layer's own calls, so the curvature of "
        "another use would be silently missing): leave the parameter out of params= (the "
        "other layers keep their blocks), or use the exact operators (GGNOperator, "
        "FisherOperator, ggn_diagonal)",
        f"parameter {name!r} used by {func!r} outside its layer's forward (functional reuse, "
        "e.g. a tied decoder F.linear(h, enc.weight.t()))",
    )


def _watched_leaves(
    named: Sequence[tuple[str, torch.Tensor]],
    leaves: Sequence[torch.Tensor],
    watch: Sequence[tuple[nn.Module, torch.Tensor]],
) -> dict[int, tuple[torch.Tensor, nn.Module, str]]:
    """``id(leaf) -> (leaf, layer, name)`` for the watched ``(layer, parameter)`` pairs."""
    index = {id(p): i for i, (_, p) in enumerate(named)}
    owners = {}
    for layer, p in watch:
        i = index.get(id(p))
        if i is not None:
            owners[id(leaves[i])] = (leaves[i], layer, named[i][0])
    return owners


def _columns(
    S: torch.Tensor,
    flat_2d: torch.Tensor,
    samples: int,
    *,
    fisher: str,
    per_position: bool,
    probe_coupling: bool,
    sample_columns: tuple[int, int] | None,
) -> Iterator[torch.Tensor]:
    """The chunks of columns :func:`batch_statistics` back-propagates (checked count)."""
    count = check_column_count(S, samples, per_position=per_position, fisher=fisher)
    if sample_columns is None:
        chunks = factor_columns(S, samples, per_position=per_position)
    else:
        if samples * count > MAX_FACTOR_COLUMNS:
            raise argument_error(
                "bn_mode",
                f"at most {MAX_FACTOR_COLUMNS} factor columns per batch: K-FAC's and "
                "E-KFAC's statistics for samples coupled by train-mode BatchNorm need one "
                "backward column per loss sample and factor column; use bn_mode='eval' "
                "(running statistics: samples independent), smaller batches, or fisher='mc'",
                f"{samples} coupled samples x {count} columns = {samples * count}",
            )
        chunks = sample_factor_columns(S, samples, sample_columns, per_position=per_position)
    return _with_probe(flat_2d, samples, chunks) if probe_coupling else chunks


def batch_statistics(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    modules: Sequence[nn.Module],
    *,
    fisher: str,
    mc_samples: int = 1,
    seed: int = 0,
    bn_mode: str | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    per_position: bool = False,
    output_fn: Any = None,
    probe_coupling: bool = False,
    sample_columns: tuple[int, int] | None = None,
    watch: Sequence[tuple[nn.Module, torch.Tensor]] = (),
) -> list[LayerRecord]:
    r"""Inputs and back-propagated factor columns :math:`g^{(j)}` of every layer in ``modules``.

    One forward pass on ``batch`` and one backward pass per column of the output
    factor (:func:`output_factor`, :func:`factor_columns`; ``per_position``: one per
    loss position and column, for E-KFAC's exact type-2 corrections), batched over
    chunks of columns; MC targets come from :func:`curvops.losses.batch_generator`
    seeded by ``(seed, batch.index)``, so every pass over the data draws the same
    targets.  ``output_fn`` selects the output as in the curvature operators
    (:mod:`curvops.model_io`).  Each record's ``grads`` holds one tensor per column, shaped
    like the layer's output; a layer called several times gets one merged record
    (:func:`merge_calls`).  ``probe_coupling``: one more (random) column supported on
    loss sample 0 sets each record's ``coupled`` (its samples are coupled, e.g. by
    train-mode BatchNorm, :func:`_split_probe`).  ``sample_columns=(start, stop)``: the
    columns of :func:`sample_factor_columns` instead (records marked ``pullbacks``).
    ``watch``: ``(layer, parameter)`` pairs whose parameter must not be used outside the
    layer's forward (:class:`ForeignUses`).

    Raises
    ------
    spectral.errors.NumericalError
        If the output factor is not finite.
    ValueError
        Naming ``model``, if a watched parameter is used outside its layer's forward;
        naming ``bn_mode``, if ``sample_columns`` would need more than
        :data:`MAX_FACTOR_COLUMNS` columns for the batch.
    """
    named = list(model.named_parameters())
    first = named[0][1] if named else None
    device = device if device is not None else (first.device if first is not None else None)
    dtype = dtype if dtype is not None else (first.dtype if first is not None else None)
    inputs = move_to(batch.inputs, device or torch.device("cpu"), dtype)
    targets = move_to(batch.targets, device or torch.device("cpu"), dtype)
    names = [n for n, _ in named]
    leaves = [p.detach().requires_grad_(True) for _, p in named]
    owners = _watched_leaves(named, leaves, watch)
    with curvature_mode(model, bn_mode), record_layers(modules) as records:
        with torch.enable_grad(), foreign_uses(modules, owners) as uses:
            outputs = functional_forward(model, names, leaves, inputs, output_fn)
    _refuse_foreign_uses(uses.found, records)
    flat, flat_targets = flatten_loss_terms(loss_fn, outputs, targets)
    check_equal_term_weights(loss_fn, inputs, flat_targets, int(flat.shape[0]))
    generator = batch_generator(seed, batch.index) if fisher == "mc" else None
    S = output_factor(
        loss_fn, flat, flat_targets, fisher=fisher, mc_samples=mc_samples, generator=generator
    )
    if not bool(torch.isfinite(S).all()):
        raise NumericalError(
            f"K-FAC: non-finite output-space curvature factor in batch {batch.index}"
        )
    live = [r for r in records if r.output.requires_grad]
    if not live:
        return live
    S = S.reshape(flat.shape[0], -1, S.shape[-1])
    flat_2d = flat.reshape(S.shape[0], -1)
    samples = int(outputs.shape[0]) if outputs.ndim else 1
    chunks = _columns(
        S,
        flat_2d,
        samples,
        fisher=fisher,
        per_position=per_position,
        probe_coupling=probe_coupling,
        sample_columns=sample_columns,
    )
    _backward_columns(flat_2d, live, chunks)
    if probe_coupling:
        _split_probe(live, samples)
    for record in live:
        record.output = record.output.detach()
        record.pullbacks = sample_columns is not None
    return merge_calls([per_sample_rows(record, batch.size) for record in live])


def per_sample_rows(record: LayerRecord, samples: int) -> LayerRecord:
    r"""A record whose layer saw its input with positions folded into dimension 0, in row
    form with the batch's ``samples`` along dimension 0.

    A model may apply a layer to tokens flattened to ``(N T, d)`` (``h.reshape(-1, d)``)
    instead of ``(N, T, d)``: the same function, gradients and GGN.  The factors average
    over samples, so the ``N T`` rows counted as samples gave an :math:`A` (and K-FAC) ``T``
    times too large.  Such input, with a leading dimension a multiple ``N T`` of the
    batch's ``N`` samples, is read as ``T`` positions per sample, flattened sample-major
    (as ``reshape`` of a batch-first tensor does).  Any other leading dimension is refused.

    >>> lin = nn.Linear(2, 3)
    >>> rec = LayerRecord(lin, torch.zeros(6, 2), torch.zeros(6, 3), [torch.zeros(6, 3)])
    >>> out = per_sample_rows(rec, 2)
    >>> out.rows, tuple(out.inputs.shape), tuple(out.grads[0].shape)
    (True, (2, 3, 2), (2, 3, 3))

    Raises
    ------
    ValueError
        Naming ``model``, for a layer input whose leading dimension is not a multiple of
        the batch's samples.
    """
    lead = int(record.inputs.shape[0]) if record.inputs.ndim else 0
    if record.rows or lead == samples:
        return record
    if lead == 0 or lead % samples:
        raise argument_error(
            "model",
            f"layers whose inputs carry the batch's {samples} samples along dimension 0 "
            "(or samples times positions, flattened sample-major), for K-FAC",
            f"a {type(record.module).__name__} called on an input of shape "
            f"{tuple(record.inputs.shape)}",
        )
    a = layer_inputs(record.module, record.inputs)
    inputs = a.reshape(samples, -1, a.shape[-1])
    grads = []
    for g in record.grads:
        rows = layer_output_grads(record.module, g)
        grads.append(rows.reshape(samples, -1, rows.shape[-1]))
    return LayerRecord(
        record.module,
        inputs,
        record.output,
        grads,
        rows=True,
        coupled=record.coupled,
        pullbacks=record.pullbacks,
    )


def rotated_gradient_squares(
    a: torch.Tensor,
    g: torch.Tensor,
    U_A: torch.Tensor,
    U_G: torch.Tensor,
    *,
    chunk_size: int = 64,
) -> torch.Tensor:
    r""":math:`\sum_n \bigl(U_G^\top (\sum_t g_{n,t} a_{n,t}^\top) U_A\bigr)^{\odot 2}`.

    The squared per-sample gradients in the Kronecker eigenbasis (E-KFAC's
    eigenvalue correction, George et al. 2018), ``a`` of shape ``(N, T, d_in)``, ``g``
    of shape ``(N, T, d_out)``, computed in chunks of ``chunk_size`` samples (memory
    ``chunk_size * d_in * d_out``).
    """
    aU, gU = a @ U_A, g @ U_G
    total = a.new_zeros(U_G.shape[1], U_A.shape[1])
    for start in range(0, a.shape[0], chunk_size):
        rotated = torch.einsum(
            "nto,nti->noi", gU[start : start + chunk_size], aU[start : start + chunk_size]
        )
        total += rotated.square().sum(dim=0)
    return total


def rotated_pullback_squares(
    a: torch.Tensor,
    grads: Sequence[torch.Tensor],
    U_A: torch.Tensor,
    U_G: torch.Tensor,
    *,
    chunk_size: int = 64,
) -> torch.Tensor:
    r""":math:`\sum_k \bigl(U_G^\top (\sum_{m,t} g^{(k)}_{m,t} a_{m,t}^\top) U_A\bigr)^{\odot 2}`.

    :func:`rotated_gradient_squares` for columns whose pullbacks reach every sample of
    the layer (samples coupled by train-mode BatchNorm): each column :math:`k` of
    ``grads`` (``(N, T, d_out)`` each, one loss sample's column,
    :func:`sample_factor_columns`) has the weight gradient
    :math:`\sum_{m,t} g^{(k)}_{m,t} a_{m,t}^\top` summed over all samples :math:`m`, and
    that is squared, not each sample's part.  ``a`` has shape ``(N, T, d_in)``; chunks of
    ``chunk_size`` columns (memory ``chunk_size * N * T * d_out``).

    >>> a, g = torch.ones(2, 1, 1), [torch.tensor([[[1.0]], [[-1.0]]])]
    >>> eye = torch.eye(1)
    >>> rotated_pullback_squares(a, g, eye, eye), rotated_gradient_squares(a, g[0], eye, eye)
    (tensor([[0.]]), tensor([[2.]]))
    """
    aU = a.reshape(-1, a.shape[-1]) @ U_A  # (N T, d_A)
    total = a.new_zeros(U_G.shape[1], U_A.shape[1])
    for start in range(0, len(grads), chunk_size):
        part = torch.stack([g.reshape(-1, g.shape[-1]) for g in grads[start : start + chunk_size]])
        rotated = (part @ U_G).transpose(1, 2) @ aU  # (k, d_G, d_A)
        total += rotated.square().sum(dim=0)
    return total


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ``ValueError`` naming ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise argument_error(name, " or ".join(repr(c) for c in choices), value)
    return value


def sqrt_or_one(value: float) -> float:
    """:math:`\\sqrt{v}` for finite positive ``v``, else 1 (the neutral :math:`\\pi`)."""
    return math.sqrt(value) if value > 0 and math.isfinite(value) else 1.0


def rounding_floor(values: torch.Tensor, size: int) -> float:
    r"""The absolute rounding error of a block's computed eigenvalues: :math:`n\,\varepsilon
    \max|\lambda|`.

    ``eigh`` of a symmetric :math:`d \times d` factor is backward stable: its computed
    eigenvalues are those of a matrix within :math:`d\,\varepsilon\,\|F\|_2` of the factor,
    so each is off by at most about :math:`d\,\varepsilon\max|\lambda_F|` (Weyl; the
    tolerance of ``numpy.linalg.matrix_rank``).  A K-FAC eigenvalue
    :math:`\lambda_{G,i}\lambda_{A,j}` is then off by at most
    :math:`\max|\lambda_G|\,d_A\varepsilon\max|\lambda_A| + \max|\lambda_A|\,d_G\varepsilon
    \max|\lambda_G| = (d_G + d_A)\,\varepsilon\max|\lambda|`, so ``size`` is
    :math:`n = d_G + d_A` for a Kronecker block (E-KFAC's eigenvalues, the curvature's
    diagonal in that eigenbasis, carry the rounding of the same rotation) and 1 for a
    diagonal computed entry by entry.  An eigenvalue with :math:`|\lambda| \le` this floor
    is zero to working precision: its sign and size are rounding noise.  ``eps`` is that
    of ``values``' dtype.

    >>> rounding_floor(torch.tensor([0.0, 2.0], dtype=torch.float64), 3) == 6 * 2.0**-52
    True
    """
    if values.numel() == 0:
        return 0.0
    eps = float(torch.finfo(values.dtype).eps)
    return float(size) * eps * float(values.abs().max())


def zero_rounding(values: torch.Tensor, size: int) -> torch.Tensor:
    r"""``values`` with the entries zero to working precision set to exactly 0.

    Entries with :math:`|\lambda| \le` :func:`rounding_floor` ``(values, size)``: a singular
    factor's zero eigenvalues come out of ``eigh`` as :math:`\pm 10^{-19}`-sized noise
    (E-KFAC's as :math:`10^{-36}`), whose logarithm or reciprocal would be a number, not
    the :math:`-\infty` or error of a singular matrix.

    >>> zero_rounding(torch.tensor([1e-19, -3e-18, 1.0], dtype=torch.float64), 2).tolist()
    [0.0, 0.0, 1.0]
    """
    floor = rounding_floor(values, size)
    return torch.where(values.abs() <= floor, torch.zeros_like(values), values)
