"""Output-space curvature of the common losses: closed forms and an autograd fallback.

For a batch with network outputs :math:`f \\in \\mathbb{R}^{N \\times C}` and a loss with
``reduction="mean"``, :math:`L_b(f)`, the GGN of the batch is :math:`J^\\top \\nabla^2_f L_b\\, J`
(the first term of the paper's Eq. 3).  The output Hessians in closed form are

* ``CrossEntropyLoss`` (class-index targets, no weights/smoothing):
  :math:`\\nabla^2_{f_n} L_b = \\tfrac{1}{N}(\\mathrm{diag}(p_n) - p_n p_n^\\top)`,
  :math:`p_n = \\mathrm{softmax}(f_n)`;
* ``MSELoss`` (mean over **all** :math:`M = N C` elements, as torch does):
  :math:`\\nabla^2_f L_b = \\tfrac{2}{M} I`;
* ``BCEWithLogitsLoss`` (no weights):
  :math:`\\nabla^2_f L_b = \\tfrac{1}{M}\\mathrm{diag}(\\sigma(f)(1 - \\sigma(f)))`;

every other twice-differentiable loss uses autograd (double backward at the outputs).

The loss's own reduction is honoured (:func:`loss_reduction`): with ``reduction="sum"``
the factors :math:`1/N` and :math:`1/M` above are 1, and the curvature over several
batches is the sum of the batch curvatures.  With ``reduction="mean"`` a batch's loss is
:math:`L_b = S_b/\\nu_b`, the sum :math:`S_b` of its terms over the loss's own normaliser
:math:`\\nu_b` (:func:`batch_normaliser`: the number of samples, of counted targets for
``ignore_index``, the sum of the targets' class weights for ``weight=``), and the loss over
all data is :math:`\\sum_b S_b / \\sum_b \\nu_b = \\sum_b \\nu_b L_b / \\sum_b \\nu_b`, so
batches are weighted by :math:`\\nu_b` (:func:`batch_weight`) and a list of batches is
exactly one concatenated batch.  Plain functions whose reduction or normaliser cannot
be read are declared with :func:`declare_loss`; :func:`sequence_cross_entropy` is a
declared token-level cross-entropy for ``[B, T, V]`` logits.

Each closed-form loss is :math:`c` times a negative log-likelihood per sample,
:math:`L_b = \\tfrac{1}{N}\\sum_n c\\,\\mathrm{NLL}(f_n, y_n)`, with :math:`c = 1` for
cross-entropy (categorical), :math:`c = 1/C` for MSE (Gaussian with variance 1/2,
:math:`\\mathrm{NLL} = \\|f_n - y_n\\|^2`) and for BCE (independent Bernoullis).  The Fisher
uses the same scaling,
:math:`F = \\tfrac{1}{N}\\sum_n c\\,\\mathbb{E}[\\nabla\\mathrm{NLL}\\,\\nabla\\mathrm{NLL}^\\top]`,
so that its Monte-Carlo estimate is unbiased for the GGN.

>>> import torch
>>> f = torch.zeros(1, 2, dtype=torch.float64)
>>> U = torch.eye(2, dtype=torch.float64).reshape(2, 1, 2)
>>> output_hessian_matmat(torch.nn.CrossEntropyLoss(), f, torch.tensor([0]), U)
tensor([[[ 0.2500, -0.2500]],
<BLANKLINE>
        [[-0.2500,  0.2500]]], dtype=torch.float64)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from curvops.differentiability import check_twice_differentiable
from curvops.inert_hooks import evaluate_loss
from spectral.errors import argument_error

__all__ = [
    "DeclaredLoss",
    "LossFn",
    "SequenceCrossEntropy",
    "batch_generator",
    "batch_normaliser",
    "batch_weight",
    "check_curved_loss",
    "check_loss",
    "class_dim",
    "counted_mask",
    "declare_loss",
    "fisher_scale",
    "loss_family",
    "loss_kind",
    "loss_reduction",
    "loss_setting",
    "nll_scale",
    "normaliser_is_known",
    "output_gradient",
    "output_hessian_factor",
    "output_hessian_matmat",
    "output_hessian_operator",
    "per_sample_nll_grads",
    "per_sample_nll_values",
    "sample_targets",
    "sequence_cross_entropy",
    "target_weights",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_ACCEPTED_REDUCTIONS = ("mean", "sum", "batchmean")
_NORMALISERS = ("samples", "targets")


class DeclaredLoss:
    """A plain-function loss with its reduction and normaliser declared; build with
    :func:`declare_loss`.  Calling it calls the function.

    Parameters
    ----------
    fn : callable
        ``(outputs, targets) -> scalar``.
    reduction : str
        ``"mean"`` or ``"sum"``.
    normaliser : str or callable
        ``"samples"``, ``"targets"`` or ``(inputs, targets) -> number``.
    ignore_index : int
        Target value not counted by ``normaliser="targets"``.

    Examples
    --------
    >>> import torch
    >>> loss = declare_loss(lambda f, y: (f - y).square().sum(), reduction="sum")
    >>> type(loss).__name__, loss_reduction(loss), float(loss(torch.ones(2), torch.zeros(2)))
    ('DeclaredLoss', 'sum', 2.0)
    """

    def __init__(
        self,
        fn: LossFn,
        *,
        reduction: str = "mean",
        normaliser: Any = "samples",
        ignore_index: int = -100,
    ) -> None:
        if not callable(fn) or isinstance(fn, type):
            raise argument_error(
                "fn", "a loss callable (outputs, targets) -> scalar", fn, kind=TypeError
            )
        if reduction not in ("mean", "sum"):
            raise argument_error("reduction", "'mean' or 'sum'", reduction)
        if not (callable(normaliser) or normaliser in _NORMALISERS):
            raise argument_error(
                "normaliser",
                "'samples', 'targets' or a callable (inputs, targets) -> number",
                normaliser,
            )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise argument_error("ignore_index", "an integer", ignore_index, kind=TypeError)
        self.fn = fn
        self.reduction = reduction
        self.normaliser = normaliser
        self.ignore_index = ignore_index

    def __call__(self, outputs: Any, targets: Any) -> torch.Tensor:
        return self.fn(outputs, targets)

    def __repr__(self) -> str:
        return (
            f"DeclaredLoss({self.fn!r}, reduction={self.reduction!r}, "
            f"normaliser={self.normaliser!r})"
        )


def declare_loss(
    fn: LossFn,
    *,
    reduction: str = "mean",
    normaliser: Any = "samples",
    ignore_index: int = -100,
) -> DeclaredLoss:
    """Declare how a plain-function loss reduces, so batches combine exactly.

    With ``reduction="mean"`` the function returns :math:`S_b/\\nu_b`, a sum of terms over
    a normaliser: ``normaliser="samples"`` (:math:`\\nu_b = N_b`, the default for any loss
    not declared), ``"targets"`` (the number of target entries other than
    ``ignore_index``, e.g. the tokens a padded sequence cross-entropy counts) or a
    callable ``(inputs, targets) -> number``.  With ``reduction="sum"`` the function
    returns :math:`S_b` and the curvature over several batches is their sum.

    Parameters
    ----------
    fn : callable
        ``(outputs, targets) -> scalar``.
    reduction : str
        ``"mean"`` or ``"sum"``.
    normaliser : str or callable
        ``"samples"``, ``"targets"`` or ``(inputs, targets) -> number``.
    ignore_index : int
        Target value not counted by ``normaliser="targets"``.

    Returns
    -------
    DeclaredLoss
        The function with its declaration; calling it calls ``fn``.

    Examples
    --------
    >>> import torch.nn.functional as F
    >>> ce = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())
    >>> loss = declare_loss(ce, normaliser="targets")
    >>> batch_normaliser(loss, None, torch.tensor([[1, -100], [2, 0]]), 2)
    3.0
    """
    return DeclaredLoss(fn, reduction=reduction, normaliser=normaliser, ignore_index=ignore_index)


class SequenceCrossEntropy(nn.Module):
    """Token-level cross-entropy of ``[B, T, V]`` logits against ``[B, T]`` class indices.

    :math:`L_b = \\frac{1}{\\nu_b}\\sum_{n,t:\\, y_{nt} \\ne \\text{ignore}} \\ell(f_{nt}, y_{nt})`
    with :math:`\\nu_b` the number of counted tokens (``reduction="mean"``), or the sum
    (``reduction="sum"``); ``label_smoothing`` as in :func:`torch.nn.functional.cross_entropy`.
    Build with :func:`sequence_cross_entropy`.

    Parameters
    ----------
    ignore_index : int
        Target value of tokens not counted (padding).
    label_smoothing : float
        As in :func:`torch.nn.functional.cross_entropy`.
    reduction : str
        ``"mean"`` (over counted tokens) or ``"sum"``.

    Examples
    --------
    >>> import torch
    >>> loss = SequenceCrossEntropy()
    >>> logits, tokens = torch.zeros(2, 3, 4), torch.tensor([[0, 1, -100], [2, 3, 1]])
    >>> round(float(loss(logits, tokens)), 4), batch_normaliser(loss, None, tokens, 2)
    (1.3863, 5.0)
    """

    def __init__(
        self, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise argument_error("reduction", "'mean' or 'sum'", reduction)
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise argument_error("label_smoothing", "a number in [0, 1]", label_smoothing)
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` ``[..., V]`` against ``targets`` ``[...]``.

        Raises
        ------
        ValueError
            If ``logits`` is not ``(..., V)`` with ``targets`` of shape ``logits.shape[:-1]``.
        """
        if logits.dim() < 2 or tuple(targets.shape) != tuple(logits.shape[:-1]):
            raise argument_error(
                "targets", f"token ids of shape {tuple(logits.shape[:-1])}", targets
            )
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )


def sequence_cross_entropy(
    ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean"
) -> SequenceCrossEntropy:
    """A declared token-level cross-entropy for ``[B, T, V]`` logits (language models).

    Batches are weighted by their counted tokens, so padded batches combine exactly;
    the GGN uses the closed-form softmax curvature per token (ignored tokens excluded)
    when ``label_smoothing == 0``.

    Parameters
    ----------
    ignore_index : int
        Target value of tokens not counted (padding).
    label_smoothing : float
        As in :func:`torch.nn.functional.cross_entropy`.
    reduction : str
        ``"mean"`` or ``"sum"``.

    Returns
    -------
    SequenceCrossEntropy
        The loss.

    Examples
    --------
    >>> loss = sequence_cross_entropy(ignore_index=0)
    >>> logits, y = torch.zeros(2, 3, 4), torch.tensor([[1, 2, 0], [0, 0, 3]])
    >>> round(float(loss(logits, y)), 4), batch_normaliser(loss, logits, y, 2)
    (1.3863, 3.0)
    """
    return SequenceCrossEntropy(ignore_index, label_smoothing, reduction)


def loss_setting(loss_fn: Any, name: str, default: Any = None) -> Any:
    """A keyword setting of a loss (module attribute, ``functools.partial`` keyword).

    Parameters
    ----------
    loss_fn : Any
        The loss.
    name : str
        The setting, e.g. ``"ignore_index"``.
    default : Any
        Returned when the loss has no such setting.

    Returns
    -------
    Any
        The setting's value.

    Examples
    --------
    >>> loss_setting(functools.partial(nn.functional.cross_entropy, ignore_index=3), "ignore_index")
    3
    """
    if isinstance(loss_fn, functools.partial):
        return loss_fn.keywords.get(name, default)
    return getattr(loss_fn, name, default)


def loss_reduction(loss_fn: Any) -> str:
    """``"mean"`` or ``"sum"``: how the loss reduces its terms (``"batchmean"`` is a mean).

    Parameters
    ----------
    loss_fn : Any
        The loss.

    Returns
    -------
    str
        ``"mean"`` or ``"sum"``.

    Examples
    --------
    >>> loss_reduction(nn.MSELoss(reduction="sum")), loss_reduction(lambda f, y: f.sum())
    ('sum', 'mean')
    """
    reduction = loss_setting(loss_fn, "reduction", "mean")
    return "sum" if reduction == "sum" else "mean"


def check_loss(loss_fn: Any) -> LossFn:
    """Validate ``loss_fn``: a loss instance ``(outputs, targets) -> scalar``, mean or sum.

    Parameters
    ----------
    loss_fn : Any
        The candidate loss.

    Returns
    -------
    callable
        ``loss_fn`` itself.

    Raises
    ------
    TypeError
        Not callable, or a class instead of an instance.
    ValueError
        ``reduction`` other than ``"mean"``/``"sum"`` (``"none"`` gives a tensor, not
        a loss to take the curvature of); class weights (``weight``, ``pos_weight``)
        that are NaN, infinite or negative; a loss module with trainable parameters
        (e.g. ``nn.LinearCrossEntropyLoss``'s classifier, or a learnt temperature): the
        operators differentiate with respect to the model's parameters only, so the
        loss's would silently be constants.

    Examples
    --------
    >>> check_loss(torch.nn.MSELoss(reduction="none"))
    Traceback (most recent call last):
    ...
    ValueError: Argument 'loss_fn.reduction': expected 'mean' or 'sum' ...
    """
    if isinstance(loss_fn, type):
        raise argument_error(
            "loss_fn",
            f"a loss instance, e.g. {loss_fn.__name__}() (a class was given, not an instance)",
            loss_fn,
            kind=TypeError,
        )
    if not callable(loss_fn):
        raise argument_error(
            "loss_fn", "a callable (outputs, targets) -> scalar", loss_fn, kind=TypeError
        )
    _refuse_trainable_loss_parameters(loss_fn)
    reduction = loss_setting(loss_fn, "reduction", "mean")
    if reduction not in _ACCEPTED_REDUCTIONS:
        raise argument_error(
            "loss_fn.reduction",
            "'mean' or 'sum' (the operators are curvatures of the loss as written, a "
            "scalar; 'none' returns one loss per element)",
            reduction,
        )
    for key in ("weight", "pos_weight"):  # rescaling weights of classes / positives
        value = loss_setting(loss_fn, key, None)
        if not isinstance(value, torch.Tensor):
            continue
        w = value.detach()
        if not bool(((w >= 0) & torch.isfinite(w)).all()):
            shown = w.tolist() if w.numel() <= 12 else value
            raise argument_error(
                f"loss_fn.{key}",
                "finite, non-negative weights (a NaN or infinite weight makes the loss "
                "NaN, a negative one makes it non-convex, so that its GGN and Fisher are "
                "not positive semi-definite)",
                shown,
            )
    return loss_fn


def _refuse_trainable_loss_parameters(loss_fn: Any) -> None:
    """Refuse a loss module holding parameters that require gradients."""
    if not isinstance(loss_fn, nn.Module):
        return
    trainable = [name for name, p in loss_fn.named_parameters() if p.requires_grad]
    if trainable:
        shown = ", ".join(repr(n) for n in trainable[:4]) + (", ..." if len(trainable) > 4 else "")
        raise argument_error(
            "loss_fn",
            "a loss without trainable parameters (the curvature is taken with respect to "
            "the model's parameters, so the loss's own would silently be held constant, "
            "and a parameter shared with the model would lose its path through the loss); "
            "move them into the model (e.g. let the model compute the logits and use "
            "nn.CrossEntropyLoss), or mark them constant with requires_grad_(False)",
            f"{type(loss_fn).__name__} with trainable parameters {shown}",
        )


_FAMILIES: tuple[tuple[str, type[nn.Module], Callable[..., torch.Tensor]], ...] = (
    ("ce", nn.CrossEntropyLoss, nn.functional.cross_entropy),
    ("mse", nn.MSELoss, nn.functional.mse_loss),
    ("bce", nn.BCEWithLogitsLoss, nn.functional.binary_cross_entropy_with_logits),
    ("nll", nn.NLLLoss, nn.functional.nll_loss),
)


# torch losses whose "mean" is over every element (their other settings keep it so)
_ELEMENTWISE_MEANS: tuple[type[nn.Module], ...] = (
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.SoftMarginLoss,
    nn.PoissonNLLLoss,
)


def loss_family(loss_fn: Any) -> str | None:
    """``"ce"``, ``"mse"``, ``"bce"``, ``"nll"`` or ``"seq_ce"`` for the recognised losses.

    Exact types only (a subclass may override ``forward``); the plain functions
    (``torch.nn.functional.cross_entropy`` ...) with their defaults or through
    ``functools.partial`` with keyword settings; :class:`SequenceCrossEntropy`.

    Parameters
    ----------
    loss_fn : Any
        The loss.

    Returns
    -------
    str or None
        The family, or ``None`` for an unrecognised loss.

    Examples
    --------
    >>> loss_family(torch.nn.functional.cross_entropy), loss_family(torch.nn.L1Loss())
    ('ce', None)
    """
    if type(loss_fn) is SequenceCrossEntropy:
        return "seq_ce"
    for name, module_type, function in _FAMILIES:
        if type(loss_fn) is module_type or loss_fn is function:
            return name
        if isinstance(loss_fn, functools.partial) and loss_fn.func is function and not loss_fn.args:
            return name
    return None


def check_curved_loss(loss_fn: Any) -> None:
    """Refuse a loss linear in the model's outputs, whose GGN is the zero matrix.

    ``NLLLoss`` and ``KLDivLoss`` take log-probabilities and are linear in them;
    ``L1Loss`` is linear wherever it is differentiable.  Their output Hessian vanishes, so the GGN
    :math:`J^\top H_L J` is identically zero: almost always the trap of a model
    ending in ``LogSoftmax`` whose softmax cross-entropy GGN was meant.

    Parameters
    ----------
    loss_fn : Any
        The loss of a GGN (or of an exact GGN diagonal).

    Raises
    ------
    ValueError
        Naming ``loss_fn``, with the remedy.

    Examples
    --------
    >>> check_curved_loss(torch.nn.NLLLoss())
    Traceback (most recent call last):
    ...
    ValueError: Argument 'loss_fn': expected a loss with curvature in the model's outputs ...
    """
    family = loss_family(loss_fn)
    if family == "nll":
        remedy = (
            "NLLLoss is linear in the log-probabilities it takes, so the GGN is zero; for "
            "the GGN of the softmax cross-entropy, drop the model's final LogSoftmax and "
            "use CrossEntropyLoss on the logits"
        )
    elif type(loss_fn) is nn.L1Loss or loss_fn is nn.functional.l1_loss:
        remedy = "L1Loss is piecewise linear in the outputs, so the GGN is zero"
    elif _is_kl_div(loss_fn):
        remedy = (
            "KLDivLoss is linear in the log-probabilities it takes (sum p (log p - input)), "
            "so the GGN is zero; for the GGN of the softmax cross-entropy with soft "
            "targets, drop the model's final LogSoftmax and use CrossEntropyLoss on the "
            "logits with probability targets"
        )
    else:
        return
    raise argument_error(
        "loss_fn",
        f"a loss with curvature in the model's outputs ({remedy}; the Hessian and the "
        "empirical Fisher are defined)",
        loss_fn,
    )


def _is_kl_div(loss_fn: Any) -> bool:
    """``nn.KLDivLoss``, ``F.kl_div`` or a keyword ``functools.partial`` of it."""
    function = nn.functional.kl_div
    if type(loss_fn) is nn.KLDivLoss or loss_fn is function:
        return True
    return isinstance(loss_fn, functools.partial) and loss_fn.func is function


def class_dim(loss_fn: Any, outputs: torch.Tensor) -> int:
    """The class (or output-feature) dimension of ``outputs``: 1 for cross-entropy and
    NLL (torch's ``[N, C, d1, ...]`` layout), the last one otherwise.

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    outputs : torch.Tensor
        The model's outputs on the batch.

    Returns
    -------
    int
        The dimension of ``outputs`` that holds the classes.

    Examples
    --------
    >>> import torch
    >>> outputs = torch.zeros(4, 3, 5)
    >>> class_dim(torch.nn.CrossEntropyLoss(), outputs), class_dim(torch.nn.MSELoss(), outputs)
    (1, 2)
    """
    if loss_family(loss_fn) in ("ce", "nll") and outputs.ndim >= 2:
        return 1
    return outputs.ndim - 1


def _class_weights(loss_fn: Any) -> torch.Tensor | None:
    weight = loss_setting(loss_fn, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def counted_mask(loss_fn: Any, targets: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the class-index targets the loss counts: those other than its
    ``ignore_index`` (-100 by default).

    Parameters
    ----------
    loss_fn : callable
        The loss (its ``ignore_index`` setting, if any, is read).
    targets : torch.Tensor
        Class-index targets.

    Returns
    -------
    torch.Tensor
        A boolean tensor shaped like ``targets``.

    Examples
    --------
    >>> counted_mask(nn.CrossEntropyLoss(), torch.tensor([1, -100])).tolist()
    [True, False]
    """
    return targets != loss_setting(loss_fn, "ignore_index", -100)


def target_weights(loss_fn: Any, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Each class-index target's weight in the loss's mean: :math:`w_{y}` (1 without class
    weights) where counted, 0 at ``ignore_index``; on the targets' device.

    Parameters
    ----------
    loss_fn : callable
        The loss (its ``ignore_index`` and ``weight`` settings, if any, are read).
    targets : torch.Tensor
        Class-index targets.
    dtype : torch.dtype
        The weights' dtype.

    Returns
    -------
    torch.Tensor
        The weights, shaped like ``targets``; their sum is the mean's normaliser.

    Examples
    --------
    >>> w = torch.tensor([1.0, 0.5, 2.0])
    >>> target_weights(nn.CrossEntropyLoss(weight=w), torch.tensor([2, -100, 1]), w.dtype)
    tensor([2.0000, 0.0000, 0.5000])
    """
    counted = counted_mask(loss_fn, targets)
    weight = _class_weights(loss_fn)
    if weight is None:
        return counted.to(dtype)
    safe = torch.where(counted, targets, torch.zeros_like(targets))
    return weight.to(targets.device, dtype)[safe] * counted


def _counted_targets(loss_fn: Any, targets: torch.Tensor) -> torch.Tensor:
    """Targets other than ``ignore_index`` (summed class weights with ``weight=``), a
    0-d tensor on the targets' device."""
    weight = _class_weights(loss_fn)
    if weight is None:
        return counted_mask(loss_fn, targets).sum()
    return target_weights(loss_fn, targets, weight.dtype).sum()


def batch_normaliser(loss_fn: Any, inputs: Any, targets: torch.Tensor, size: int) -> float:
    """:math:`\\nu_b`, what the mean loss of a batch divides its summed terms by (1 for sums).

    Cross-entropy / NLL with class-index targets: the number of targets other than
    ``ignore_index`` (weighted by ``weight[y]`` when class weights are given);
    :class:`SequenceCrossEntropy`: its counted tokens; MSE, BCE and the other
    elementwise torch losses (L1, smooth L1, Huber, ``BCELoss``, soft margin, Poisson
    NLL, ``KLDivLoss(reduction="mean")``): the number of elements; a
    :class:`DeclaredLoss`: its declared normaliser; any other loss: the number of
    samples ``size``.

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    inputs : Any
        The batch's inputs.
    targets : torch.Tensor
        The batch's targets.
    size : int
        The number of samples in the batch.

    Returns
    -------
    float
        The normaliser :math:`\\nu_b`.

    Examples
    --------
    >>> batch_normaliser(nn.CrossEntropyLoss(ignore_index=0), None, torch.tensor([0, 1, 2]), 3)
    2.0
    """
    if loss_reduction(loss_fn) == "sum":
        return 1.0
    if isinstance(loss_fn, DeclaredLoss):
        if callable(loss_fn.normaliser):
            return float(loss_fn.normaliser(inputs, targets))
        if loss_fn.normaliser == "targets":
            if targets.dtype.is_floating_point:
                return float(targets.numel())
            return float((targets != loss_fn.ignore_index).sum())
        return float(size)
    family = loss_family(loss_fn)
    if family in ("ce", "nll", "seq_ce") and not targets.dtype.is_floating_point:
        return float(_counted_targets(loss_fn, targets))
    if family in ("ce", "nll"):  # class probabilities: mean over samples and positions
        return float(targets.numel() // max(int(targets.shape[1]), 1)) if targets.ndim > 1 else 1.0
    if family in ("mse", "bce") or type(loss_fn) in _ELEMENTWISE_MEANS:
        return float(targets.numel())
    if type(loss_fn) is nn.KLDivLoss and loss_setting(loss_fn, "reduction") == "mean":
        return float(targets.numel())
    return float(size)


def batch_weight(
    loss_fn: Any, inputs: Any, targets: torch.Tensor, size: int, *, lazy: bool = False
) -> Any:
    """The weight of a batch's curvature in the curvature over all data.

    ``reduction="sum"``: 1 (curvatures add up, no normalisation); otherwise the loss's
    own normaliser :func:`batch_normaliser` (the number of counted targets, of elements,
    a declared normaliser, and the batch size ``size`` for a loss whose normaliser is
    not known: see :func:`normaliser_is_known`).  Weighted so, a list of batches is
    exactly one concatenated batch, also when batches differ past the sample dimension
    (sequences padded to each batch's own length).  A float, or with ``lazy`` a 0-d
    tensor on the targets' device where it is counted there (no host synchronisation).

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    inputs : Any
        The batch's inputs.
    targets : torch.Tensor
        The batch's targets.
    size : int
        The number of samples in the batch.
    lazy : bool
        Return a 0-d tensor on the targets' device instead of a float when it is counted there.

    Returns
    -------
    float or torch.Tensor
        The batch's weight.

    Examples
    --------
    >>> batch_weight(nn.MSELoss(), None, torch.zeros(4, 3), 4)  # the mean is over 12 elements
    12.0
    """
    if loss_reduction(loss_fn) == "sum":
        return 1.0
    family = loss_family(loss_fn)
    if lazy and family in ("ce", "nll", "seq_ce") and not targets.dtype.is_floating_point:
        return _counted_targets(loss_fn, targets)
    return batch_normaliser(loss_fn, inputs, targets, size)


def normaliser_is_known(loss_fn: Any) -> bool:
    """Whether :func:`batch_normaliser` knows the loss's normaliser, not only assumes it.

    Known: ``reduction="sum"``, the recognised families (:func:`loss_family`), the
    elementwise torch losses and :class:`DeclaredLoss`.  Any other loss (a plain
    function) is assumed to divide by its number of samples, which holds across
    batches that differ past the sample dimension only if it divides by samples
    exactly (a per-token mean would not): such batches need a declared normaliser
    (:func:`curvops.validation.check_shapes_weighable`).

    Parameters
    ----------
    loss_fn : Any
        The loss.

    Returns
    -------
    bool
        True when the normaliser is read from the loss, not assumed.

    Examples
    --------
    >>> normaliser_is_known(nn.MSELoss()), normaliser_is_known(lambda f, y: (f - y).pow(2).mean())
    (True, False)
    """
    return (
        isinstance(loss_fn, DeclaredLoss)
        or loss_family(loss_fn) is not None
        or type(loss_fn) in _ELEMENTWISE_MEANS
        or type(loss_fn) is nn.KLDivLoss  # "mean": elements, "batchmean": samples
        or loss_reduction(loss_fn) == "sum"
    )


def loss_kind(loss_fn: Any, outputs: torch.Tensor, targets: torch.Tensor) -> str:
    """Return ``"ce"``, ``"ce_tokens"``, ``"mse"``, ``"bce"``, ``"seq_ce"`` when a closed form
    applies, else ``"autograd"``.

    ``"ce_tokens"``: cross-entropy with classes in dimension 1 and a target per position
    (``[N, C, d1, ...]`` outputs, or ``(N, C)`` with ignored targets); ``"seq_ce"``:
    :class:`SequenceCrossEntropy` (classes last).  Both are the softmax curvature per
    position over the counted targets.

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    outputs : torch.Tensor
        The model's outputs on the batch.
    targets : torch.Tensor
        The batch's targets.

    Returns
    -------
    str
        The kind of output curvature used.

    Examples
    --------
    >>> loss_kind(torch.nn.MSELoss(), torch.zeros(2, 3), torch.zeros(2, 3))
    'mse'
    >>> loss_kind(torch.nn.functional.mse_loss, torch.zeros(2, 3), torch.zeros(2, 3))
    'mse'
    """
    family = loss_family(loss_fn)
    weight = loss_setting(loss_fn, "weight", None)
    if family == "ce":
        if (
            weight is None
            and loss_setting(loss_fn, "label_smoothing", 0.0) == 0.0
            and outputs.ndim == 2
            and targets.ndim == 1
            and not targets.dtype.is_floating_point
            and not bool((targets == loss_setting(loss_fn, "ignore_index", -100)).any())
        ):
            return "ce"
        if (
            weight is None
            and loss_setting(loss_fn, "label_smoothing", 0.0) == 0.0
            and outputs.ndim >= 2
            and not targets.dtype.is_floating_point
            and tuple(targets.shape) == (outputs.shape[0], *outputs.shape[2:])
        ):
            return "ce_tokens"  # classes in dimension 1, one target per position, ignore mask
    elif family == "seq_ce":
        if (
            loss_setting(loss_fn, "label_smoothing", 0.0) == 0.0
            and not targets.dtype.is_floating_point
            and tuple(targets.shape) == tuple(outputs.shape[:-1])
        ):
            return "seq_ce"
    elif family == "mse":
        if outputs.shape == targets.shape:
            return "mse"
    elif family == "bce":
        if (
            weight is None
            and loss_setting(loss_fn, "pos_weight", None) is None
            and outputs.shape == targets.shape
        ):
            return "bce"
    return "autograd"


def nll_scale(kind: str, outputs: torch.Tensor) -> float:
    """The factor :math:`c` with loss per sample :math:`= c\\,\\mathrm{NLL}` (1 for autograd).

    Parameters
    ----------
    kind : str
        As returned by :func:`loss_kind`.
    outputs : torch.Tensor
        The model's outputs on the batch.

    Returns
    -------
    float
        The factor :math:`c`.

    Examples
    --------
    >>> import torch
    >>> f = torch.zeros(2, 4)
    >>> nll_scale("ce", f), nll_scale("mse", f)  # MSE also averages over the 4 outputs
    (1.0, 0.25)
    """
    if kind in ("mse", "bce"):
        return 1.0 / (outputs[0].numel())
    return 1.0


def _closed_form_divisor(loss_fn: Any, kind: str, f: torch.Tensor, targets: torch.Tensor) -> float:
    """:math:`\\nu_b` of a closed-form loss with mean reduction (1 with sum); the closed
    forms divide by it (a product by its reciprocal would round differently)."""
    if loss_reduction(loss_fn) == "sum":
        return 1.0
    if kind == "ce":
        return float(f.shape[0])
    if kind in ("seq_ce", "ce_tokens"):
        return float((targets != loss_setting(loss_fn, "ignore_index", -100)).sum())
    return float(f.numel())


def fisher_scale(
    loss_fn: Any,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    normaliser: float | None = None,
    samples: int = 1,
) -> float:
    """:math:`1/(\\nu_b M)` (mean) or :math:`1/M` (sum): the Fisher of a batch is
    :math:`\\tfrac{1}{\\nu_b M}\\sum_{n,m} J_n^\\top s_{nm} s_{nm}^\\top J_n` with the NLL
    gradients :math:`s_{nm}` of :func:`per_sample_nll_grads` at ``samples`` (:math:`M`)
    targets per sample.

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    outputs : torch.Tensor
        The model's outputs on the batch.
    targets : torch.Tensor
        The batch's targets.
    normaliser : float, optional
        The batch normaliser :math:`\\nu_b` (computed when ``None``).
    samples : int
        Targets :math:`M` sampled per input.

    Returns
    -------
    float
        The scale of the batch's Fisher.

    Examples
    --------
    >>> import torch
    >>> f = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    >>> y = torch.tensor([0, 1])
    >>> ce = torch.nn.CrossEntropyLoss()
    >>> fisher_scale(ce, f, y), fisher_scale(ce, f, y, samples=2)
    (0.5, 0.25)
    """
    if loss_reduction(loss_fn) == "sum":
        return 1.0 / samples
    kind = loss_kind(loss_fn, outputs, targets)
    if kind in ("ce", "mse", "bce"):
        return nll_scale(kind, outputs) / (outputs.shape[0] * samples)
    if kind != "autograd":
        nu = _closed_form_divisor(loss_fn, kind, outputs, targets)
    elif normaliser is None:
        nu = batch_normaliser(loss_fn, None, targets, outputs.shape[0])
    else:
        nu = normaliser
    return 1.0 / (nu * samples) if nu > 0 else 0.0


def _class_last(kind: str, x: torch.Tensor, lead: int = 0) -> torch.Tensor:
    """``ce_tokens`` tensors with the class dimension (1 after ``lead``) moved last."""
    return x.movedim(lead + 1, -1) if kind == "ce_tokens" else x


def _class_back(kind: str, x: torch.Tensor, lead: int = 0) -> torch.Tensor:
    return x.movedim(-1, lead + 1) if kind == "ce_tokens" else x


def output_hessian_matmat(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor, U: torch.Tensor
) -> torch.Tensor:
    """Apply :math:`\\nabla^2_f L_b` (the batch loss as written) to ``U`` of shape
    ``(k, *outputs.shape)``.

    The same as ``output_hessian_operator(loss_fn, outputs, targets)(U)``; prepare
    the operator once (:func:`output_hessian_operator`) when it is applied repeatedly
    at the same outputs.

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    outputs : torch.Tensor
        The model's outputs on the batch.
    targets : torch.Tensor
        The batch's targets.
    U : torch.Tensor
        ``(k, *outputs.shape)`` directions.

    Returns
    -------
    torch.Tensor
        The products, shaped like ``U``.

    Examples
    --------
    >>> import torch
    >>> f = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    >>> y = torch.tensor([0, 1])
    >>> U = torch.ones(1, 2, 2, dtype=torch.float64)
    >>> output_hessian_matmat(torch.nn.MSELoss(), f, torch.zeros_like(f), U)  # 2 / 4 * U
    tensor([[[0.5000, 0.5000],
             [0.5000, 0.5000]]], dtype=torch.float64)
    """
    return output_hessian_operator(loss_fn, outputs, targets)(U)


def output_hessian_operator(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """:math:`U \\mapsto \\nabla^2_f L_b\\, U` at fixed ``outputs``, prepared once.

    What depends on the outputs only is computed here, once: the loss's normaliser
    :math:`\\nu` and, for softmax cross-entropy, the probabilities :math:`p` (and the
    mask of counted tokens), so that each application costs a few elementwise passes,
    :math:`H U = (p \\odot U - p\\,\\langle p, U\\rangle) / \\nu` per sample or token;
    for a loss without a closed form, the gradient graph of the loss in the outputs
    is recorded once and each column is one backward pass through it.  The
    applications give the same bits as :func:`output_hessian_matmat`.

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    outputs : torch.Tensor
        The model's outputs on the batch (read now: later changes are not seen).
    targets : torch.Tensor
        The batch's targets.

    Returns
    -------
    callable
        ``U -> H U`` for ``U`` of shape ``(k, *outputs.shape)``, shaped like ``U``.

    Examples
    --------
    >>> import torch
    >>> f = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    >>> H = output_hessian_operator(torch.nn.CrossEntropyLoss(), f, torch.tensor([0]))
    >>> H(torch.tensor([[[1.0, 0.0]]], dtype=torch.float64))  # p = (1/2, 1/2)
    tensor([[[ 0.2500, -0.2500]]], dtype=torch.float64)
    """
    kind = loss_kind(loss_fn, outputs, targets)
    f = outputs.detach()
    if kind == "autograd":
        return _autograd_output_hessian(loss_fn, f, targets)
    nu = max(_closed_form_divisor(loss_fn, kind, f, targets), 1.0)  # 0: nothing counted
    if kind in ("ce", "seq_ce", "ce_tokens"):
        p = torch.softmax(_class_last(kind, f), dim=-1)
        mask = None if kind == "ce" else counted_mask(loss_fn, targets).unsqueeze(-1)

        def softmax_hessian(U: torch.Tensor) -> torch.Tensor:
            pu = p * _class_last(kind, U, 1)
            out = (pu - p * pu.sum(-1, keepdim=True)) / nu
            if mask is not None:
                out = out * mask.to(out.dtype)
            return _class_back(kind, out, 1)

        return softmax_hessian
    if kind == "mse":
        return lambda U: U * (2.0 / nu)
    if kind == "bce":
        s = torch.sigmoid(f)
        scale = s * (1 - s) / nu
        return lambda U: U * scale
    raise AssertionError(f"unhandled loss kind {kind!r}")  # pragma: no cover


def _autograd_output_hessian(
    loss_fn: LossFn, f: torch.Tensor, targets: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The output Hessian of a loss without a closed form, by double backward."""
    with torch.enable_grad():
        o = f.clone().requires_grad_(True)
        loss = evaluate_loss(loss_fn, o, targets)
        (g,) = torch.autograd.grad(loss, o, create_graph=True)
    check_twice_differentiable([g], forward_roots=[loss], what="the loss's output Hessian")

    def by_autograd(U: torch.Tensor) -> torch.Tensor:
        if not g.requires_grad:
            return torch.zeros_like(U)
        with torch.enable_grad():
            cols = [
                torch.autograd.grad(
                    g, o, u, retain_graph=True, allow_unused=True, materialize_grads=True
                )[0]
                for u in U
            ]
        return torch.stack(cols)

    return by_autograd


def output_hessian_factor(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample factors ``A`` (N, C, r) and signs (N, r) with
    :math:`\\nabla^2_{f_n} L_b = \\sum_j s_{nj} a_{nj} a_{nj}^\\top` (outputs flattened per sample).

    Closed forms give symmetric square roots (signs all +1); the autograd fallback
    takes the diagonal blocks of the full output Hessian (losses separable over
    samples) and their eigendecompositions.

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    outputs : torch.Tensor
        The model's outputs on the batch.
    targets : torch.Tensor
        The batch's targets.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        The factors ``(N, C, r)`` and signs ``(N, r)``.

    Examples
    --------
    >>> import torch
    >>> f = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    >>> y = torch.tensor([0, 1])
    >>> A, signs = output_hessian_factor(torch.nn.MSELoss(), f, torch.zeros_like(f))
    >>> A.shape, signs.shape
    (torch.Size([2, 2, 2]), torch.Size([2, 2]))
    """
    f = outputs.detach().reshape(outputs.shape[0], -1)
    n, c = f.shape
    kind = loss_kind(loss_fn, outputs, targets)
    ones = torch.ones(n, c, dtype=f.dtype, device=f.device)
    if kind != "autograd":
        nu = max(_closed_form_divisor(loss_fn, kind, outputs, targets), 1.0)
    if kind == "ce":
        p = torch.softmax(f, dim=-1)
        sp = p.sqrt()
        A = torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)
        return A / math.sqrt(nu), ones
    if kind in ("seq_ce", "ce_tokens"):
        last = _class_last(kind, outputs.detach())
        v = last.shape[-1]
        p = torch.softmax(last, dim=-1).reshape(n, -1, v)
        sp = p.sqrt() * counted_mask(loss_fn, targets).reshape(n, -1, 1).to(f.dtype)
        tokens = torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)  # (n, T, V, V)
        t = tokens.shape[1]
        eye = torch.eye(t, dtype=f.dtype, device=f.device)
        A = torch.einsum("ntab,ts->ntasb", tokens, eye).reshape(n, t, v, c)
        if kind == "ce_tokens":  # rows in the outputs' own order: class, then position
            A = A.transpose(1, 2)
        return A.reshape(n, c, c) / math.sqrt(nu), ones
    if kind == "mse":
        eye = torch.eye(c, dtype=f.dtype, device=f.device).expand(n, c, c)
        return eye * math.sqrt(2.0 / nu), ones
    if kind == "bce":
        s = torch.sigmoid(f)
        A = torch.diag_embed((s * (1 - s) / nu).sqrt())
        return A, ones
    blocks = torch.empty(n, c, c, dtype=f.dtype, device=f.device)
    for j in range(c):
        U = torch.zeros(n, c, dtype=f.dtype, device=f.device)
        U[:, j] = 1.0
        HU = output_hessian_matmat(loss_fn, outputs, targets, U.reshape(1, *outputs.shape))
        blocks[:, :, j] = HU.reshape(n, c)
    blocks = 0.5 * (blocks + blocks.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(blocks)
    return evecs * evals.abs().sqrt().unsqueeze(1), torch.sign(evals)


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """A CPU generator for batch ``batch_index`` derived from ``seed`` (order independent).

    Parameters
    ----------
    seed : int
        The operator's seed.
    batch_index : int
        The (global) index of the batch.

    Returns
    -------
    torch.Generator
        A CPU generator seeded from both.

    Examples
    --------
    >>> int(batch_generator(0, 1).initial_seed()) == int(batch_generator(0, 1).initial_seed())
    True
    """
    state = np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(2, np.uint32)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return g


def sample_targets(
    loss_fn: LossFn,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    mc_samples: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Draw ``mc_samples`` targets per sample from the model's predictive distribution.

    Cross-entropy: :math:`\\hat y \\sim \\mathrm{Cat}(\\mathrm{softmax}(f_n))` (class indices;
    for :class:`SequenceCrossEntropy` one class per token, ignored tokens stay ignored);
    MSE: :math:`\\hat y = f_n + \\varepsilon/\\sqrt{2}`, :math:`\\varepsilon \\sim N(0, I)`;
    BCE: :math:`\\hat y \\sim \\mathrm{Bernoulli}(\\sigma(f_n))`.  Sampling happens on the CPU
    with ``generator`` (bitwise reproducible on every device).  Returns ``(M, *targets.shape)``.

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    outputs : torch.Tensor
        The model's outputs on the batch.
    targets : torch.Tensor
        The batch's targets.
    mc_samples : int
        Targets :math:`M` per sample.
    generator : torch.Generator
        CPU generator (e.g. :func:`batch_generator`).

    Returns
    -------
    torch.Tensor
        ``(M, *targets.shape)`` sampled targets.

    Raises
    ------
    ValueError
        For a loss without a known likelihood.

    Examples
    --------
    >>> import torch
    >>> f = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    >>> y = torch.tensor([0, 1])
    >>> sample_targets(torch.nn.CrossEntropyLoss(), f, y, 3, batch_generator(0, 0)).shape
    torch.Size([3, 2])
    """
    kind = loss_kind(loss_fn, outputs, targets)
    f = outputs.detach().to("cpu")
    if kind == "ce":
        p = torch.softmax(f, dim=-1)
        idx = torch.multinomial(p, mc_samples, replacement=True, generator=generator)
        return idx.T.contiguous().to(device=targets.device, dtype=targets.dtype)
    if kind in ("seq_ce", "ce_tokens"):
        last = _class_last(kind, f)
        p = torch.softmax(last, dim=-1).reshape(-1, last.shape[-1])
        idx = torch.multinomial(p, mc_samples, replacement=True, generator=generator)
        drawn = idx.T.reshape(mc_samples, *targets.shape).to(targets.device, targets.dtype)
        ignore = loss_setting(loss_fn, "ignore_index", -100)
        return torch.where(counted_mask(loss_fn, targets), drawn, torch.full_like(drawn, ignore))
    if kind == "mse":
        eps = torch.randn((mc_samples, *f.shape), generator=generator, dtype=f.dtype)
        return (f.unsqueeze(0) + eps / math.sqrt(2.0)).to(outputs.device)
    if kind == "bce":
        s = torch.sigmoid(f).unsqueeze(0).expand(mc_samples, *f.shape).contiguous()
        return torch.bernoulli(s, generator=generator).to(outputs.device, dtype=targets.dtype)
    raise argument_error(
        "loss_fn",
        "a likelihood to sample for kind='mc': CrossEntropyLoss without weight/label "
        "smoothing on (N, C, ...) outputs with (N, ...) class indices, "
        "sequence_cross_entropy without label smoothing, or MSELoss / "
        "BCEWithLogitsLoss (no weights) with targets shaped like the outputs "
        "(use kind='empirical' otherwise)",
        f"{loss_fn!r} with outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}",
    )


def output_gradient(loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:math:`\\partial L_b / \\partial f`, the gradient of the batch loss as written at the
    outputs (shape of ``outputs``).

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    outputs : torch.Tensor
        The model's outputs on the batch.
    targets : torch.Tensor
        The batch's targets.

    Returns
    -------
    torch.Tensor
        The gradient, shaped like ``outputs``.

    Examples
    --------
    >>> import torch
    >>> f = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    >>> y = torch.tensor([0, 1])
    >>> output_gradient(torch.nn.MSELoss(), f, torch.zeros_like(f))  # 2 f / 4
    tensor([[ 0.0000,  0.0000],
            [ 0.5000, -0.5000]], dtype=torch.float64)
    """
    with torch.enable_grad():
        o = outputs.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(
            evaluate_loss(loss_fn, o, targets), o, allow_unused=True, materialize_grads=True
        )
    return g


def per_sample_nll_grads(
    loss_fn: LossFn,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    normaliser: float | None = None,
    *,
    true_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradients :math:`s_n = \\nabla_{f_n}\\mathrm{NLL}(f_n, y_n)`, shape ``(N, C)`` (outputs
    flattened), with :math:`F_b = \\mathrm{scale}\\sum_n J_n^\\top s_n s_n^\\top J_n`
    (:func:`fisher_scale`).

    For the autograd fallback (a loss separable over samples)
    :math:`s_n = \\nu_b\\, \\nabla_{f_n} L_b` with the normaliser :math:`\\nu_b`
    (:func:`batch_normaliser`; 1 for ``reduction="sum"``), the gradient of the sum of the
    sample's terms.

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    outputs : torch.Tensor
        The model's outputs on the batch.
    targets : torch.Tensor
        The batch's targets.
    normaliser : float, optional
        The batch normaliser (computed when ``None``).
    true_targets : torch.Tensor, optional
        The batch's own targets when ``targets`` were sampled (:func:`sample_targets`):
        the closed form and the counted positions come from them, and every sampled
        class is a label, also one equal to ``ignore_index`` (a pad id that is a real
        class, e.g. ``sequence_cross_entropy(ignore_index=0)``) -- masking the draws
        would bias the Monte-Carlo Fisher.

    Returns
    -------
    torch.Tensor
        ``(N, C)`` gradients :math:`s_n`.

    Examples
    --------
    >>> import torch
    >>> f = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    >>> y = torch.tensor([0, 1])
    >>> per_sample_nll_grads(torch.nn.CrossEntropyLoss(), f, y)  # softmax(f) - onehot(y)
    tensor([[-0.5000,  0.5000],
            [ 0.8808, -0.8808]], dtype=torch.float64)
    """
    truth = targets if true_targets is None else true_targets
    kind = loss_kind(loss_fn, outputs, truth)
    f = outputs.detach()
    n = f.shape[0]
    if kind == "ce":
        p = torch.softmax(f, dim=-1)
        return p - nn.functional.one_hot(targets, f.shape[-1]).to(p.dtype)
    if kind in ("seq_ce", "ce_tokens"):
        p = torch.softmax(_class_last(kind, f), dim=-1)
        mask = counted_mask(loss_fn, truth)  # the loss's counted positions, never the draws
        safe = torch.where(mask, targets, torch.zeros_like(targets))
        s = (p - nn.functional.one_hot(safe, p.shape[-1]).to(p.dtype)) * mask.unsqueeze(-1)
        return _class_back(kind, s).reshape(n, -1)
    if kind == "mse":
        return (2.0 * (f - targets)).reshape(n, -1)
    if kind == "bce":
        return (torch.sigmoid(f) - targets).reshape(n, -1)
    g = output_gradient(loss_fn, f, targets)
    if loss_reduction(loss_fn) == "mean":
        nu = batch_normaliser(loss_fn, None, targets, n) if normaliser is None else normaliser
        g = g * nu
    return g.reshape(n, -1)


def _sampled_token_nll(
    loss_fn: LossFn,
    kind: str,
    outputs: torch.Tensor,
    sampled: torch.Tensor,
    true_targets: torch.Tensor,
) -> torch.Tensor:
    """Per-sample token NLL of ``sampled`` labels over the positions ``true_targets`` count."""
    mask = counted_mask(loss_fn, true_targets)
    safe = torch.where(mask, sampled, torch.zeros_like(sampled))
    logits = _class_last(kind, outputs)
    per_token = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none"
    )
    return (per_token * mask.reshape(-1)).reshape(outputs.shape[0], -1).sum(1)


def per_sample_nll_values(
    loss_fn: LossFn,
    outputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    true_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample :math:`\\mathrm{NLL}(f_n, y_n)`, shape ``(N,)``, differentiable in ``outputs``.

    Written independently of :func:`per_sample_nll_grads` (used by the dense references):
    for the autograd fallback the sum of the sample's terms, :math:`\\nu_n L(f_n, y_n)` with
    the normaliser :math:`\\nu_n` of the sample alone (mean) or :math:`L(f_n, y_n)` (sum).

    Parameters
    ----------
    loss_fn : callable
        The loss (a torch loss module, a functional loss or a :class:`DeclaredLoss`).
    outputs : torch.Tensor
        The model's outputs on the batch.
    targets : torch.Tensor
        The batch's targets.
    true_targets : torch.Tensor, optional
        As for :func:`per_sample_nll_grads`: the batch's own targets when ``targets``
        were sampled (they choose the closed form and the counted positions; a sampled
        class equal to ``ignore_index`` is a label).

    Returns
    -------
    torch.Tensor
        ``(N,)`` negative log-likelihoods.

    Examples
    --------
    >>> import torch
    >>> f = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    >>> y = torch.tensor([0, 1])
    >>> per_sample_nll_values(torch.nn.CrossEntropyLoss(), f, y)
    tensor([0.6931, 2.1269], dtype=torch.float64)
    """
    kind = loss_kind(loss_fn, outputs, targets if true_targets is None else true_targets)
    n = outputs.shape[0]
    if kind == "ce":
        return nn.functional.cross_entropy(outputs, targets, reduction="none")
    if true_targets is not None and kind in ("seq_ce", "ce_tokens"):
        return _sampled_token_nll(loss_fn, kind, outputs, targets, true_targets)
    if kind == "ce_tokens":
        per_position = nn.functional.cross_entropy(
            outputs,
            targets,
            ignore_index=loss_setting(loss_fn, "ignore_index", -100),
            reduction="none",
        )
        return per_position.reshape(n, -1).sum(1)
    if kind == "seq_ce":
        per_token = nn.functional.cross_entropy(
            outputs.reshape(-1, outputs.shape[-1]),
            targets.reshape(-1),
            ignore_index=loss_setting(loss_fn, "ignore_index", -100),
            reduction="none",
        )
        return per_token.reshape(n, -1).sum(1)
    if kind == "mse":
        return ((outputs - targets) ** 2).reshape(n, -1).sum(1)
    if kind == "bce":
        bce = nn.functional.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        return bce.reshape(n, -1).sum(1)
    values = []
    for i in range(n):
        y = targets[i : i + 1]
        if loss_reduction(loss_fn) == "sum":
            values.append(evaluate_loss(loss_fn, outputs[i : i + 1], y))
            continue
        nu = batch_normaliser(loss_fn, None, y, 1)
        value = evaluate_loss(loss_fn, outputs[i : i + 1], y)
        values.append(value * nu if nu > 0 else outputs[i].sum() * 0.0)
    return torch.stack(values)
