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

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from spectral.errors import argument_error

__all__ = [
    "LossFn",
    "batch_generator",
    "check_loss",
    "loss_family",
    "loss_kind",
    "nll_scale",
    "output_hessian_factor",
    "output_hessian_matmat",
    "per_sample_nll_grads",
    "per_sample_nll_values",
    "sample_targets",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_ACCEPTED_REDUCTIONS = ("mean", "batchmean")


def check_loss(loss_fn: Any) -> LossFn:
    """Validate ``loss_fn``: a callable ``(outputs, targets) -> scalar`` with mean reduction.

    Raises
    ------
    TypeError
        Not callable.
    ValueError
        ``reduction`` other than ``"mean"`` (``"none"`` and ``"sum"`` are refused: the
        operators are curvatures of the mean loss).

    >>> check_loss(torch.nn.MSELoss(reduction="none"))
    Traceback (most recent call last):
    ...
    ValueError: Argument 'loss_fn.reduction': expected 'mean' ...
    """
    if not callable(loss_fn):
        raise argument_error(
            "loss_fn", "a callable (outputs, targets) -> scalar", loss_fn, kind=TypeError
        )
    keywords = getattr(loss_fn, "keywords", None)  # functools.partial(F.cross_entropy, ...)
    default = keywords.get("reduction", "mean") if isinstance(keywords, dict) else "mean"
    reduction = getattr(loss_fn, "reduction", default)
    if reduction not in _ACCEPTED_REDUCTIONS:
        raise argument_error(
            "loss_fn.reduction",
            "'mean' (the operators are curvatures of the mean loss over samples)",
            reduction,
        )
    return loss_fn


_FAMILIES: tuple[tuple[str, type[nn.Module], Callable[..., torch.Tensor]], ...] = (
    ("ce", nn.CrossEntropyLoss, nn.functional.cross_entropy),
    ("mse", nn.MSELoss, nn.functional.mse_loss),
    ("bce", nn.BCEWithLogitsLoss, nn.functional.binary_cross_entropy_with_logits),
    ("nll", nn.NLLLoss, nn.functional.nll_loss),
)


def loss_family(loss_fn: Any) -> str | None:
    """``"ce"``, ``"mse"``, ``"bce"`` or ``"nll"`` for the torch loss modules *and* functions.

    Exact types only (a subclass may override ``forward``); the plain functions
    (``torch.nn.functional.cross_entropy`` ...) are used with their defaults.

    >>> loss_family(torch.nn.functional.cross_entropy), loss_family(torch.nn.L1Loss())
    ('ce', None)
    """
    for name, module_type, function in _FAMILIES:
        if type(loss_fn) is module_type or loss_fn is function:
            return name
    return None


def loss_kind(loss_fn: Any, outputs: torch.Tensor, targets: torch.Tensor) -> str:
    """Return ``"ce"``, ``"mse"``, ``"bce"`` when a closed form applies, else ``"autograd"``.

    >>> loss_kind(torch.nn.MSELoss(), torch.zeros(2, 3), torch.zeros(2, 3))
    'mse'
    >>> loss_kind(torch.nn.functional.mse_loss, torch.zeros(2, 3), torch.zeros(2, 3))
    'mse'
    """
    family = loss_family(loss_fn)
    weight = getattr(loss_fn, "weight", None)
    if family == "ce":
        if (
            weight is None
            and getattr(loss_fn, "label_smoothing", 0.0) == 0.0
            and outputs.ndim == 2
            and targets.ndim == 1
            and not targets.dtype.is_floating_point
            and not bool((targets == getattr(loss_fn, "ignore_index", -100)).any())
        ):
            return "ce"
    elif family == "mse":
        if outputs.shape == targets.shape:
            return "mse"
    elif family == "bce":
        if (
            weight is None
            and getattr(loss_fn, "pos_weight", None) is None
            and outputs.shape == targets.shape
        ):
            return "bce"
    return "autograd"


def nll_scale(kind: str, outputs: torch.Tensor) -> float:
    """The factor :math:`c` with loss per sample :math:`= c\\,\\mathrm{NLL}` (1 for autograd)."""
    if kind in ("mse", "bce"):
        return 1.0 / (outputs[0].numel())
    return 1.0


def output_hessian_matmat(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor, U: torch.Tensor
) -> torch.Tensor:
    """Apply :math:`\\nabla^2_f L_b` (batch-mean loss) to ``U`` of shape ``(k, *outputs.shape)``."""
    kind = loss_kind(loss_fn, outputs, targets)
    f = outputs.detach()
    if kind == "ce":
        p = torch.softmax(f, dim=-1)
        pu = p * U
        return (pu - p * pu.sum(-1, keepdim=True)) / f.shape[0]
    if kind == "mse":
        return U * (2.0 / f.numel())
    if kind == "bce":
        s = torch.sigmoid(f)
        return U * (s * (1 - s) / f.numel())
    with torch.enable_grad():
        o = f.clone().requires_grad_(True)
        loss = loss_fn(o, targets)
        (g,) = torch.autograd.grad(loss, o, create_graph=True)
        if not g.requires_grad:
            return torch.zeros_like(U)
        cols = [
            torch.autograd.grad(
                g, o, u, retain_graph=True, allow_unused=True, materialize_grads=True
            )[0]
            for u in U
        ]
    return torch.stack(cols)


def output_hessian_factor(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample factors ``A`` (N, C, r) and signs (N, r) with
    :math:`\\nabla^2_{f_n} L_b = \\sum_j s_{nj} a_{nj} a_{nj}^\\top` (outputs flattened per sample).

    Closed forms give symmetric square roots (signs all +1); the autograd fallback
    takes the diagonal blocks of the full output Hessian (losses separable over
    samples) and their eigendecompositions.
    """
    f = outputs.detach().reshape(outputs.shape[0], -1)
    n, c = f.shape
    kind = loss_kind(loss_fn, outputs, targets)
    if kind == "ce":
        p = torch.softmax(f, dim=-1)
        sp = p.sqrt()
        A = torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)
        return A / math.sqrt(n), torch.ones(n, c, dtype=f.dtype, device=f.device)
    if kind == "mse":
        eye = torch.eye(c, dtype=f.dtype, device=f.device).expand(n, c, c)
        return eye * math.sqrt(2.0 / f.numel()), torch.ones(n, c, dtype=f.dtype, device=f.device)
    if kind == "bce":
        s = torch.sigmoid(f)
        A = torch.diag_embed((s * (1 - s) / f.numel()).sqrt())
        return A, torch.ones(n, c, dtype=f.dtype, device=f.device)
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

    Cross-entropy: :math:`\\hat y \\sim \\mathrm{Cat}(\\mathrm{softmax}(f_n))` (class indices);
    MSE: :math:`\\hat y = f_n + \\varepsilon/\\sqrt{2}`, :math:`\\varepsilon \\sim N(0, I)`;
    BCE: :math:`\\hat y \\sim \\mathrm{Bernoulli}(\\sigma(f_n))`.  Sampling happens on the CPU
    with ``generator`` (bitwise reproducible on every device).  Returns ``(M, *targets.shape)``.

    Raises
    ------
    ValueError
        For a loss without a known likelihood.
    """
    kind = loss_kind(loss_fn, outputs, targets)
    f = outputs.detach().to("cpu")
    if kind == "ce":
        p = torch.softmax(f, dim=-1)
        idx = torch.multinomial(p, mc_samples, replacement=True, generator=generator)
        return idx.T.contiguous().to(device=targets.device, dtype=targets.dtype)
    if kind == "mse":
        eps = torch.randn((mc_samples, *f.shape), generator=generator, dtype=f.dtype)
        return (f.unsqueeze(0) + eps / math.sqrt(2.0)).to(outputs.device)
    if kind == "bce":
        s = torch.sigmoid(f).unsqueeze(0).expand(mc_samples, *f.shape).contiguous()
        return torch.bernoulli(s, generator=generator).to(outputs.device, dtype=targets.dtype)
    raise argument_error(
        "loss_fn",
        "a likelihood to sample for kind='mc': CrossEntropyLoss without weight/label "
        "smoothing/ignored targets on (N, C) outputs with (N,) class indices, or MSELoss / "
        "BCEWithLogitsLoss (no weights) with targets shaped like the outputs "
        "(use kind='empirical' otherwise)",
        f"{loss_fn!r} with outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}",
    )


def per_sample_nll_grads(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Gradients :math:`\\nabla_{f_n}\\mathrm{NLL}(f_n, y_n)`, shape ``(N, C)`` (outputs flattened).

    For the autograd fallback (assumed separable over samples, mean reduction)
    :math:`\\mathrm{NLL} = \\ell_n` and :math:`\\nabla_{f_n}\\ell_n = N \\nabla_{f_n} L_b`.
    """
    kind = loss_kind(loss_fn, outputs, targets)
    f = outputs.detach()
    n = f.shape[0]
    if kind == "ce":
        p = torch.softmax(f, dim=-1)
        return p - nn.functional.one_hot(targets, f.shape[-1]).to(p.dtype)
    if kind == "mse":
        return (2.0 * (f - targets)).reshape(n, -1)
    if kind == "bce":
        return (torch.sigmoid(f) - targets).reshape(n, -1)
    with torch.enable_grad():
        o = f.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(o, targets), o)
    return (g * n).reshape(n, -1)


def per_sample_nll_values(
    loss_fn: LossFn, outputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Per-sample :math:`\\mathrm{NLL}(f_n, y_n)`, shape ``(N,)``, differentiable in ``outputs``.

    Written independently of :func:`per_sample_nll_grads` (used by the dense references).
    """
    kind = loss_kind(loss_fn, outputs, targets)
    n = outputs.shape[0]
    if kind == "ce":
        return nn.functional.cross_entropy(outputs, targets, reduction="none")
    if kind == "mse":
        return ((outputs - targets) ** 2).reshape(n, -1).sum(1)
    if kind == "bce":
        bce = nn.functional.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
        return bce.reshape(n, -1).sum(1)
    return torch.stack([loss_fn(outputs[i : i + 1], targets[i : i + 1]) for i in range(n)])
