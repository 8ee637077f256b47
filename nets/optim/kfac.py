r"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015; Grosse & Martens 2016).

For a layer with pre-activations :math:`s = W \bar a` (``nn.Linear``; for
``nn.Conv2d`` :math:`\bar a` is an unfolded input patch and the layer is
applied at :math:`T` spatial positions), with :math:`\bar a = [a; 1]` when
the layer has a bias, the Fisher block of the combined parameter
:math:`\bar W = [W, b]` (shape ``out x (in+1)``) is approximated by
:math:`A \otimes G` with

.. math::

    A = \frac1N \sum_{n=1}^N \sum_{t=1}^{T} \bar a_{n,t} \bar a_{n,t}^T, \qquad
    G = \frac1{NT} \sum_{n=1}^N \sum_{t=1}^{T} g_{n,t} g_{n,t}^T,
    \qquad g_{n,t} = \frac{\partial \ell_n}{\partial s_{n,t}},

where :math:`\ell_n` is sample :math:`n`'s loss (the batch loss is their
mean, so :math:`g_{n,t} = N\,\partial L/\partial s_{n,t}`).  For a
``Linear`` layer (:math:`T=1`) these are exactly :math:`E[\bar a\bar a^T]`
and :math:`E[g g^T]`.  A layer called several times in one forward pass counts
its calls as further positions :math:`t` (:math:`T` is the total), as in
:class:`curvops.KFACOperator`; so does a layer applied to positions flattened into the
batch dimension (``h.reshape(-1, d)`` of ``(N, T, d)``, sample-major:
:func:`curvops.kronecker.per_sample_rows`), :math:`N` being the samples of the batch
the model was called on.  With ``fisher='mc'`` the targets in :math:`\ell_n`
are sampled from the model's predictive distribution and :math:`\ell_n` is
scaled so that :math:`E[g g^T]` is its output Hessian (by :math:`\sqrt{T'}` for a
cross-entropy over :math:`T'` positions, ``(N, C, d1, ...)`` logits or the
``(N, T', C)`` logits of :func:`curvops.losses.sequence_cross_entropy` -- with padding
(``ignore_index`` in the data's targets) or class weights, each position by its
weight in the mean loss and padded positions not at all (:func:`_mc_cross_entropy`) --
and
:math:`\sqrt{M}` for ``BCEWithLogitsLoss`` over :math:`M` outputs; ``MSELoss``
samples with variance :math:`M/2`): the true Fisher, equal to the GGN of the
mean loss in expectation, as :class:`curvops.KFACOperator` with ``fisher='mc'``.
With ``fisher='empirical'`` they are the data's labels, unscaled: the empirical
Fisher of the per-sample losses, which for :math:`T'` loss positions or :math:`M`
outputs per sample differs from :class:`curvops.KFACOperator`'s per-term one
(:math:`1/T'` of it for position-wise layers, :math:`1/M` for ``MSELoss``); for
``(N, C)`` outputs they are the same.  Both factors are exponential running averages,
:math:`A \leftarrow \rho A + (1-\rho) A_{\rm batch}` (the first estimate
initialises them), refreshed every ``factor_update_freq`` steps.

**Damping split** (factored Tikhonov damping with the :math:`\pi`-correction,
Martens & Grosse 2015, Section 6.3): with damping :math:`\lambda`,

.. math::

    \pi = \sqrt{\frac{\operatorname{tr}(A)/\dim A}{\operatorname{tr}(G)/\dim G}},\qquad
    A_\lambda = A + \pi\sqrt{\lambda}\, I, \qquad
    G_\lambda = G + \frac{\sqrt{\lambda}}{\pi}\, I

(``damping_split='sqrt'`` uses :math:`\pi = 1`).  The inverses
:math:`A_\lambda^{-1}, G_\lambda^{-1}` are recomputed every
``inv_update_freq`` steps.  With :math:`M = \nabla_{\bar W} L + \omega \bar W`
(``weight_decay`` :math:`\omega`), the preconditioned gradient is

.. math::

    V = G_\lambda^{-1}\, M\, A_\lambda^{-1}
    \quad\bigl(= \operatorname{mat}\bigl((A_\lambda \otimes G_\lambda)^{-1}
    \operatorname{vec} M\bigr)\bigr),

**KL-clip** (Ba et al. 2017): :math:`\nu = \min\bigl(1,
\sqrt{\kappa / (\alpha^2 \sum_{\rm layers} \langle V, M\rangle)}\bigr)`
and the step direction is :math:`\nu V`; parameters of other modules
(BatchNorm, ...) use their plain gradient, and so do layers whose weight or bias
another module registers too (a tied weight, as GPT's output layer and token
embedding: its other use is not in the layer's factors).  Finally SGD with momentum
:math:`\mu`: :math:`b \leftarrow \mu b + d`, :math:`p \leftarrow p - \alpha b`.

Usage.  ``train_network(optimizer='KFAC')`` calls ``step(closure=...,
curvature_batch=(x, y), loss_fn=...)`` (``curvature_step = True``); the
factors are then estimated by an extra forward/backward on the curvature
batch (BatchNorm running statistics and ``.grad`` untouched).  In a plain
loop (``loss.backward(); opt.step()``) with ``fisher='empirical'`` the
factors come from hooks on that forward/backward.

The factor computations (unfolded patches, outer-product sums, E-KFAC's rotated
per-sample squares) are those of :mod:`curvops.kronecker`, the one implementation
shared with :class:`curvops.KFACOperator` and :class:`curvops.EKFACOperator`
(which use the normalisation :math:`A/T`, :math:`G\,T` of curvlinops; the product
:math:`A \otimes G` is the same).

:class:`EKFAC` (``optimizer='EKFAC'``) keeps the eigenbasis of :math:`A \otimes G`
and re-estimates the diagonal in it from per-sample gradients (George et al. 2018).

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
>>> opt = KFAC(model, lr=0.1, fisher="empirical")
>>> x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 2
>>> loss = torch.nn.functional.cross_entropy(model(x), y)
>>> loss.backward()
>>> opt.step()
>>> opt.factors(model[0])[0].shape, opt.steps_taken
(torch.Size([4, 4]), 1)
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from curvops.data import batch_size_of, first_tensor
from curvops.kronecker import (
    LayerRecord,
    grad_factor,
    input_factor,
    is_supported,
    merge_calls,
    per_sample_rows,
    record_grads,
    record_inputs,
    rotated_gradient_squares,
)
from curvops.losses import SequenceCrossEntropy, target_weights
from nets.optim.registry import register_optimizer
from spectral.errors import NumericalError, argument_error

__all__ = ["EKFAC", "KFAC", "kfac_factors"]

logger = logging.getLogger(__name__)

_STATE_KEY = "kfac"
_SUPPORTED = (nn.Linear, nn.Conv2d)


def _number(name: str, value: Any, *, low: float = 0.0, strict: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > low or (not strict and value == low)):
        return float(value)
    raise argument_error(name, f"a finite number {'>' if strict else '>='} {low}", value)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise argument_error(name, "an integer >= 1", value)


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise argument_error("module", "a layer with a weight tensor", module, kind=TypeError)
    return weight


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = module.bias
    return bias if isinstance(bias, torch.Tensor) else None


def kfac_factors(
    module: nn.Module, inputs: torch.Tensor, grad_out: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The batch estimates :math:`(A, G)` of one layer (see the module docstring).

    Parameters
    ----------
    module:
        An ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``, zero padding).
    inputs:
        The layer's input, ``(N, ..., in)`` or ``(N, C, H, W)``.
    grad_out:
        :math:`\partial L / \partial s` for the *mean* batch loss :math:`L`,
        shaped like the layer's output.
    batch_size:
        :math:`N`, the number of samples the mean runs over.

    Returns
    -------
    ``A`` of shape ``(in[+1], in[+1])`` and ``G`` of shape ``(out, out)``.

    >>> lin = torch.nn.Linear(2, 3)
    >>> A, G = kfac_factors(lin, torch.ones(4, 2), torch.ones(4, 3) / 4, 4)
    >>> A.tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    >>> G[0, 0].item()
    1.0
    """
    a, g = _layer_rows(module, [(inputs, grad_out)], batch_size)
    return _row_factors(a, g * batch_size, batch_size)


def _layer_rows(
    module: nn.Module, calls: Sequence[tuple[torch.Tensor, torch.Tensor]], samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Rows :math:`(\bar a_{n,t}, \partial L/\partial s_{n,t})` of a layer's calls in one pass.

    ``calls`` holds ``(inputs, grad_out)`` per call of ``module`` in one forward pass.
    A layer called several times (weight sharing by repeated calls) has the per-sample
    gradient :math:`\sum_{\rm calls}\sum_t g_{n,t}\bar a_{n,t}^T`: its calls are further
    positions :math:`t` of the same sample (:func:`curvops.kronecker.merge_calls`, as in
    :class:`curvops.KFACOperator`), so :math:`T` is the total over the calls.  A call on
    positions flattened into dimension 0 (``N T`` rows for the ``samples`` :math:`N`)
    is read as :math:`T` positions per sample (:func:`curvops.kronecker.per_sample_rows`).

    Returns
    -------
    ``a`` ``(N, T, in[+1])`` (a column of ones with a bias) and ``g`` ``(N, T, out)``.

    Raises
    ------
    ValueError
        Naming ``model``, if a call's leading dimension is not a multiple of ``samples``.
    """
    records = [
        per_sample_rows(LayerRecord(module, inputs, grad, [grad]), samples)
        for inputs, grad in calls
    ]
    (record,) = merge_calls(records)
    a = record_inputs(record)
    if _bias(module) is not None:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    return a, record_grads(record, record.grads[0])


def _row_factors(
    a: torch.Tensor, g: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(A, G)`` from rows ``a`` and the per-sample-loss gradients ``g = N dL/ds``."""
    positions = a.shape[1]
    # the shared expand factors, in Grosse & Martens' normalisation (T moved from A to G)
    A = input_factor(a, "expand") * (positions / batch_size)
    G = grad_factor(g, "expand") / (batch_size * positions)
    return A, G


def _cross_entropy_term_weights(
    loss_fn: nn.CrossEntropyLoss | SequenceCrossEntropy,
    logits: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, float]:
    r"""Per-position weights :math:`\omega_t` and normaliser :math:`Z` of ``loss_fn``'s
    mean, :math:`L = Z^{-1} \sum_t \omega_t\, \mathrm{ce}_t` (``logits`` ``(rows, C)``).

    Class labels: :math:`\omega_t = w_{y_t}` (1 without class weights) at counted
    positions, 0 where ``y_t`` is ``ignore_index``, and :math:`Z = \sum_t \omega_t`.
    Soft targets (probabilities): :math:`\omega_t = \sum_c w_c y_{tc}`, :math:`Z` the
    number of positions.  (Label smoothing leaves the output Hessian unchanged.)
    """
    rows, classes = logits.shape
    weight = getattr(loss_fn, "weight", None)
    if targets.is_floating_point():  # soft targets, shaped like the logits
        soft = targets.movedim(1, -1).reshape(rows, classes) if targets.ndim > 2 else targets
        if weight is None:
            return logits.new_ones(rows), float(rows)
        return soft.to(logits.dtype) @ weight.to(logits), float(rows)
    omega = target_weights(loss_fn, targets.reshape(rows), logits.dtype).to(logits.device)
    return omega, float(omega.sum())


def _mc_cross_entropy(
    loss_fn: nn.CrossEntropyLoss | SequenceCrossEntropy,
    output: torch.Tensor,
    targets: torch.Tensor,
    generator: torch.Generator,
    samples: int,
) -> torch.Tensor:
    r"""The sampled cross-entropy whose gradients give the MC Fisher of ``loss_fn``'s mean.

    With labels :math:`\hat y_t` drawn from the model's softmax at every position,
    :math:`\hat L = (N Z)^{-1/2} \sum_t \omega_t^{1/2}\, \mathrm{ce}(s_t, \hat y_t)`
    (:func:`_cross_entropy_term_weights`).  The factors use :math:`g_{n,t} = N\,
    \partial \hat L / \partial s_{n,t}`, whose second moment
    :math:`(N/Z)\,\omega_t (\operatorname{diag} p_t - p_t p_t^\top)` is the output
    Hessian of the per-sample loss :math:`l_n = (N/Z) \sum_{t \in n} \omega_t
    \mathrm{ce}_t` of the mean :math:`L = N^{-1} \sum_n l_n`: padded positions
    (``ignore_index`` in ``targets``) count for nothing, a drawn label equal to
    ``ignore_index`` (a real class) is a label, and class weights enter through the true
    targets, as in :class:`curvops.FisherOperator`.  Without padding or weights this is
    ``loss_fn(output, labels) * sqrt(T')`` for :math:`T'` positions per sample.
    :func:`curvops.losses.sequence_cross_entropy` (``[B, T, V]`` logits, classes last,
    padding at its ``ignore_index``) is the same loss with the classes moved last.
    """
    if isinstance(loss_fn, SequenceCrossEntropy):  # [B, T, V] logits, classes last
        if output.ndim < 2 or tuple(targets.shape) != tuple(output.shape[:-1]):
            raise argument_error(
                "curvature_batch",
                f"targets of shape {tuple(output.shape[:-1])} (token ids) for the "
                f"model's {tuple(output.shape)} logits and {loss_fn}",
                tuple(targets.shape),
            )
        out = output
    else:
        out = output.movedim(1, -1) if output.ndim > 2 else output
    logits = out.reshape(-1, out.shape[-1])
    probs = torch.softmax(logits.detach().double(), dim=-1).cpu()
    labels = torch.multinomial(probs, 1, generator=generator).reshape(-1).to(output.device)
    omega, normaliser = _cross_entropy_term_weights(loss_fn, logits.detach(), targets)
    if normaliser <= 0.0:  # nothing counted: no curvature from this batch
        return logits.sum() * 0.0
    per_position = nn.functional.cross_entropy(logits, labels, reduction="none")
    scale = 1.0 / math.sqrt(samples * normaliser)
    return (omega.sqrt() * per_position).sum() * scale


def _sampled_loss(
    loss_fn: Callable[..., torch.Tensor],
    output: torch.Tensor,
    targets: torch.Tensor,
    generator: torch.Generator,
    samples: int,
) -> torch.Tensor:
    """The loss on targets drawn from the model's predictive distribution (``mc``), for a
    batch of ``samples`` samples (whose outputs may be flattened into more rows)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss | SequenceCrossEntropy):
        return _mc_cross_entropy(loss_fn, output, targets, generator, samples)
    out = output.detach()
    per_sample = max(out.numel() // samples, 1)  # outputs per sample
    if isinstance(loss_fn, nn.MSELoss):
        # l_n = |f_n - y_n|^2 / D has output Hessian (2/D) I; y = f + sqrt(D/2) z matches it.
        noise = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
        return loss_fn(output, out + math.sqrt(per_sample / 2.0) * noise)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        probs = torch.sigmoid(out).cpu()
        labels = torch.bernoulli(probs, generator=generator).to(out.device)
        return loss_fn(output, labels) * math.sqrt(per_sample)
    raise argument_error(
        "loss_fn",
        "CrossEntropyLoss, sequence_cross_entropy, MSELoss or BCEWithLogitsLoss for "
        "fisher='mc' "
        "(use fisher='empirical' for other losses)",
        loss_fn,
    )


def _check_arguments(
    model: Any,
    *,
    lr: Any,
    momentum: Any,
    damping: Any,
    weight_decay: Any,
    stat_decay: Any,
    kl_clip: Any,
    fisher: Any,
    damping_split: Any,
    seed: Any,
) -> None:
    """:class:`KFAC`'s argument checks: ``TypeError``/``ValueError`` naming the bad one."""
    if not isinstance(model, nn.Module):
        raise argument_error(
            "model", "an nn.Module (K-FAC needs the layers)", model, kind=TypeError
        )
    _number("lr", lr, strict=True)
    _number("momentum", momentum)
    _number("damping", damping, strict=True)
    _number("weight_decay", weight_decay)
    if not (isinstance(stat_decay, int | float) and 0.0 <= stat_decay < 1.0):
        raise argument_error("stat_decay", "a number in [0, 1)", stat_decay)
    if kl_clip is not None:
        _number("kl_clip", kl_clip)
    if fisher not in ("mc", "empirical"):
        raise argument_error("fisher", "'mc' or 'empirical'", fisher)
    if damping_split not in ("pi", "sqrt"):
        raise argument_error("damping_split", "'pi' or 'sqrt'", damping_split)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise argument_error("seed", "an integer", seed, kind=TypeError)


def _tied_layers(model: nn.Module, layers: list[nn.Module]) -> set[nn.Module]:
    """The ``layers`` with a weight or bias that another module of ``model`` registers too.

    A tied parameter (GPT's output layer shares the token embedding's weight) is also
    used outside the layer's calls: its gradient has a part the layer's factors do
    not see (:class:`curvops.KFACOperator` refuses such parameters with
    ``remainder="error"``), and two tracked layers sharing it would share one state.
    Such layers take the plain gradient, like the parameters of other modules.
    """
    owners: dict[int, set[int]] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(module))
    return {
        m
        for m in layers
        if any(p is not None and len(owners.get(id(p), ())) > 1 for p in (_weight(m), _bias(m)))
    }


def _register_hooks(optimizer: KFAC, model: nn.Module, layers: list[nn.Module]) -> list[Any]:
    """A forward hook on every layer that calls ``optimizer._forward_hook``, and a forward
    pre-hook on ``model`` that notes the samples of the batch it is called on.

    The hooks hold the optimiser by a weak reference, so a dropped optimiser is
    collected and its hooks then do nothing.
    """
    self_ref = weakref.ref(optimizer)

    def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        opt = self_ref()
        if opt is not None:
            first = first_tensor((args, kwargs))
            opt._forward_samples = None if first is None or first.ndim == 0 else int(first.shape[0])

    def post_hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        opt = self_ref()
        if opt is not None:  # a layer called outside the model's forward has no batch
            opt._forward_samples = None

    hooks = [
        model.register_forward_pre_hook(pre_hook, with_kwargs=True),
        model.register_forward_hook(post_hook, always_call=True),
    ]
    for module in layers:

        def hook(
            mod: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor
        ) -> torch.Tensor | None:
            opt = self_ref()
            return None if opt is None else opt._forward_hook(mod, inputs, output)

        hooks.append(module.register_forward_hook(hook))
    return hooks


class KFAC(torch.optim.Optimizer):
    """K-FAC for the ``Linear`` and ``Conv2d`` layers of a model (see the module docstring).

    Parameters
    ----------
    model:
        The network; all its trainable parameters are optimised, those of
        ``Linear``/``Conv2d`` layers (``groups=1``) with K-FAC, others with
        momentum SGD on the plain gradient.
    lr, momentum, weight_decay:
        :math:`\\alpha`, :math:`\\mu`, :math:`\\omega`.
    damping:
        :math:`\\lambda` (Tikhonov damping, split between the factors).
    stat_decay:
        :math:`\\rho \\in [0, 1)` of the factors' running averages.
    factor_update_freq, inv_update_freq:
        Refresh the factors / their inverses every so many steps (both at
        step 0).
    kl_clip:
        :math:`\\kappa`; ``None`` or 0 disables the KL-clip.
    fisher:
        ``'mc'`` (sampled targets; needs ``curvature_batch`` and ``loss_fn``
        in :meth:`step`) or ``'empirical'``.
    damping_split:
        ``'pi'`` (:math:`\\pi`-corrected) or ``'sqrt'`` (:math:`\\pi = 1`).
    seed:
        Seed of the generator that samples the MC targets (its state is part
        of :meth:`state_dict`).

    Groups added with :meth:`add_param_group` are stepped with momentum SGD on their
    plain gradient, each with its own ``lr``, ``momentum`` and ``weight_decay``; the
    first group's hyperparameters drive the K-FAC layers (and ``damping``/``kl_clip``).

    Raises
    ------
    ValueError / TypeError
        For invalid arguments, or a model without trainable parameters.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> opt = KFAC(net, lr=0.01, damping=1e-2, factor_update_freq=1, inv_update_freq=1,
    ...            fisher="empirical")  # factors from the plain backward pass
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> torch.nn.functional.cross_entropy(net(x), y).backward()
    >>> opt.step()
    >>> type(opt).__name__
    'KFAC'
    """

    curvature_step = True
    #: the state entry whose absence makes the next step recompute the inverses
    _inverse_key = "A_inv"

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.01,
        momentum: float = 0.9,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        factor_update_freq: int = 10,
        inv_update_freq: int = 100,
        kl_clip: float | None = 1e-3,
        fisher: str = "mc",
        damping_split: str = "pi",
        seed: int = 0,
    ) -> None:
        _check_arguments(
            model, lr=lr, momentum=momentum, damping=damping, weight_decay=weight_decay,
            stat_decay=stat_decay, kl_clip=kl_clip, fisher=fisher, damping_split=damping_split,
            seed=seed,
        )  # fmt: skip
        self._factor_freq = _positive_int("factor_update_freq", factor_update_freq)
        self._inv_freq = _positive_int("inv_update_freq", inv_update_freq)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise argument_error("model", "a model with trainable parameters", model)
        defaults = {
            "lr": float(lr),
            "momentum": float(momentum),
            "damping": float(damping),
            "weight_decay": float(weight_decay),
            "kl_clip": None if kl_clip is None else float(kl_clip),
        }
        super().__init__(params, defaults)
        self.stat_decay = float(stat_decay)
        self.fisher = fisher
        self.damping_split = damping_split
        self.seed = seed
        self.steps_taken = 0
        self._model_ref = weakref.ref(model)
        self._layers: list[nn.Module] = [
            m
            for m in model.modules()
            if is_supported(m)
            and _weight(m).requires_grad
            and (_bias(m) is None or _bias(m).requires_grad)  # type: ignore[union-attr]
        ]
        tied = _tied_layers(model, self._layers)
        self._layers = [m for m in self._layers if m not in tied]
        skipped = [
            m for m in model.modules() if isinstance(m, _SUPPORTED) and m not in self._layers
        ]
        if skipped:
            logger.info(
                "K-FAC: %d layer(s) use plain gradients (grouped conv, padding mode, "
                "frozen or tied parameters)",
                len(skipped),
            )
        self._layer_set = set(self._layers)
        # MC targets are drawn on the CPU (then moved): the same seed gives the same
        # targets on every device, and the generator survives moving the model.
        self._generator = torch.Generator()
        self._generator.manual_seed(seed)
        self._capture_mode: str | None = "plain"
        self._captured: dict[nn.Module, list[list[Any]]] = {}
        self._samples: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        #: samples of the batch of the model's latest call (its forward pre-hook)
        self._forward_samples: int | None = None
        self._hooks = _register_hooks(self, model, self._layers)

    # -- capture ---------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        """Remove the forward hooks this optimiser placed on the model."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _factors_due(self) -> bool:
        return self.steps_taken % self._factor_freq == 0

    def _forward_hook(
        self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        mode = self._capture_mode
        if mode is None or module not in self._layer_set or not torch.is_grad_enabled():
            return None
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return None
        if mode == "dedicated":
            self._captured.setdefault(module, []).append([inputs[0].detach(), output, None])
            # The network continues with a copy: an in-place operation after the layer
            # (``ReLU(inplace=True)``) then cannot rebase ``output``'s autograd history, so
            # ``autograd.grad(loss, output)`` is dL/ds of the layer's own output.
            return output.clone()
        # plain loop: only on factor-update steps, training mode, empirical Fisher
        # (a tensor hook registered now sees the gradient of this value of ``output``,
        # even if the tensor is later modified in place)
        if self.fisher != "empirical" or not module.training or not self._factors_due():
            return None
        if module in self._captured and self._captured[module][-1][2] is not None:
            self._captured[module] = []  # a new forward pass after a completed one
        record: list[Any] = [inputs[0].detach(), None, None, self._forward_samples]
        self._captured.setdefault(module, []).append(record)

        def grad_hook(grad: torch.Tensor) -> None:
            record[2] = grad.detach()

        output.register_hook(grad_hook)
        return None

    # -- public helpers --------------------------------------------------------------------
    def factors(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The running factors ``(A, G)`` of ``module`` (a tracked layer).

        Raises ``ValueError`` if the module is not tracked or has no factors yet.
        """
        if module not in self._layer_set:
            raise argument_error("module", "a Linear/Conv2d layer tracked by this K-FAC", module)
        state = self.state[_weight(module)]
        if "A" not in state:
            raise argument_error("module", "a layer whose factors were estimated", module)
        return state["A"], state["G"]

    def damped_inverses(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The current :math:`(A_\\lambda^{-1}, G_\\lambda^{-1})` of ``module``."""
        self.factors(module)
        state = self.state[_weight(module)]
        if "A_inv" not in state:
            raise argument_error("module", "a layer with K-FAC inverses", module)
        return state["A_inv"], state["G_inv"]

    # -- factor estimation -----------------------------------------------------------------
    def _dedicated_pass(
        self, curvature_batch: Sequence[Any], loss_fn: Callable[..., torch.Tensor]
    ) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("K-FAC: the model this optimiser was built for no longer exists")
        if not isinstance(curvature_batch, Sequence) or len(curvature_batch) != 2:
            raise argument_error("curvature_batch", "a pair (inputs, targets)", curvature_batch)
        reduction = getattr(loss_fn, "reduction", "mean")
        if reduction != "mean":
            raise argument_error("loss_fn", "a loss with reduction='mean'", loss_fn)
        x, y = curvature_batch
        samples = batch_size_of(x)
        buffers = [b.detach().clone() for b in model.buffers()]
        self._captured = {}
        self._capture_mode = "dedicated"
        try:
            with torch.enable_grad():
                output = model(x)
                if self.fisher == "mc":
                    loss = _sampled_loss(loss_fn, output, y, self._generator, samples)
                else:
                    loss = loss_fn(output, y)
                records = [(m, r) for m, recs in self._captured.items() for r in recs]
                grads = torch.autograd.grad(loss, [r[1] for _, r in records], allow_unused=True)
        finally:
            self._capture_mode = "plain"
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
        calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for (module, record), grad in zip(records, grads):
            if grad is not None:
                calls.setdefault(module, []).append((record[0], grad))
        self._captured = {}
        return self._factors_of_calls(calls, samples)

    def _plain_factors(self) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        out: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        for module, records in self._captured.items():
            done = [r for r in records if r[2] is not None]
            if done:
                # the samples of the model's batch (a layer may see them flattened with
                # positions); a layer called outside the model's forward: its own rows
                samples = done[0][3] or int(done[0][0].shape[0])
                calls = [(r[0], r[2]) for r in done]
                out.update(self._factors_of_calls({module: calls}, samples))
        self._captured = {}
        return out

    def _factors_of_calls(
        self, calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]], batch_size: int
    ) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """Batch factors of every layer from its calls' ``(inputs, dL/ds)`` (calls = positions)."""
        out: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for module, pairs in calls.items():
                a, g = _layer_rows(module, pairs, batch_size)
                g = g * batch_size  # per-sample losses: g_{n,t} = N dL/ds_{n,t}
                out[module] = _row_factors(a, g, batch_size)
                self._record_samples(module, a, g, batch_size)
        return out

    def _record_samples(
        self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, batch_size: int
    ) -> None:
        """Per-sample rows hook (E-KFAC keeps them; K-FAC needs only the factors)."""

    def _update_scales(self) -> None:
        """Update per-sample scalings after the factors and their inverses (E-KFAC)."""

    def _precondition(
        self, state: dict[str, Any], m: torch.Tensor, group: dict[str, Any]
    ) -> torch.Tensor:
        """:math:`G_\\lambda^{-1} M A_\\lambda^{-1}` for one layer's ``out x (in[+1])`` gradient."""
        out: torch.Tensor = state["G_inv"] @ m @ state["A_inv"]
        return out

    def _update_factors(
        self, batch_factors: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        rho = self.stat_decay
        for module, (A, G) in batch_factors.items():  # all checked before any is written
            if not (torch.isfinite(A).all() and torch.isfinite(G).all()):
                raise NumericalError(
                    f"K-FAC: non-finite factor for layer {module} at step {self.steps_taken}"
                )
        for module, (A, G) in batch_factors.items():
            state = self.state[_weight(module)]
            dtype = _weight(module).dtype
            A, G = A.to(dtype), G.to(dtype)
            if "A" not in state:
                state["A"], state["G"] = A.clone(), G.clone()
            else:
                state["A"].mul_(rho).add_(A, alpha=1.0 - rho)
                state["G"].mul_(rho).add_(G, alpha=1.0 - rho)

    def _update_inverses(self, damping: float) -> None:
        for module in self._layers:
            state = self.state[_weight(module)]
            if "A" not in state:
                continue
            A, G = state["A"].double(), state["G"].double()
            pi = 1.0
            if self.damping_split == "pi":
                ta, tg = float(torch.trace(A)) / A.shape[0], float(torch.trace(G)) / G.shape[0]
                if ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg):
                    pi = math.sqrt(ta / tg)
            root = math.sqrt(damping)
            state["A_inv"] = self._spd_inverse(A, pi * root, module).to(_weight(module).dtype)
            state["G_inv"] = self._spd_inverse(G, root / pi, module).to(_weight(module).dtype)

    def _spd_inverse(self, M: torch.Tensor, shift: float, module: nn.Module) -> torch.Tensor:
        eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        chol, info = torch.linalg.cholesky_ex(M + shift * eye)
        if int(info) != 0:
            raise NumericalError(
                f"K-FAC: damped factor of layer {module} is not positive definite "
                f"at step {self.steps_taken}; increase damping"
            )
        return torch.cholesky_inverse(chol)

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimiser state (factors, inverses, momentum) plus step and RNG state."""
        state = super().state_dict()
        state[_STATE_KEY] = {
            "steps_taken": self.steps_taken,
            "rng_state": self._generator.get_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; resuming is bit-identical."""
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        if not isinstance(extra, dict) or "steps_taken" not in extra:
            raise argument_error("state_dict", f"a K-FAC state_dict with '{_STATE_KEY}'", None)
        super().load_state_dict(state_dict)
        self.steps_taken = int(extra["steps_taken"])
        self._generator.set_state(extra["rng_state"].cpu())

    # -- the step --------------------------------------------------------------------------
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        curvature_batch: Sequence[Any] | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
    ) -> Any:
        """One K-FAC step.

        Parameters
        ----------
        closure:
            Optional: zeroes the gradients, computes the loss, calls
            ``backward`` and returns the loss (the ``torch.optim`` convention).
        curvature_batch, loss_fn:
            ``(inputs, targets)`` and the (mean-reduced) loss on which the
            factors are estimated on factor-update steps.  Required for
            ``fisher='mc'``; without them the empirical factors come from the
            hooks on the last forward/backward.

        Raises
        ------
        ValueError
            If factors are due but neither a curvature batch nor captured
            statistics are available.
        NumericalError
            For non-finite factors or gradients (a non-finite ``.grad`` of any
            parameter, in any group, is refused before anything is written: the
            parameters and the optimiser's state are then unchanged).
        """
        loss = None
        if closure is not None:
            previous = self._capture_mode
            if curvature_batch is not None:
                self._capture_mode = None  # the curvature batch provides the factors
            try:
                with torch.enable_grad():
                    loss = closure()
            finally:
                self._capture_mode = previous
        with torch.no_grad():
            group = self.param_groups[0]
            self._check_gradients()
            if self._factors_due():
                self._samples = {}  # per-sample rows of this step only (E-KFAC)
                if curvature_batch is not None and loss_fn is not None:
                    batch_factors = self._dedicated_pass(curvature_batch, loss_fn)
                elif self.fisher == "mc":
                    raise argument_error(
                        "curvature_batch",
                        "a batch (inputs, targets) and loss_fn for fisher='mc' "
                        "(or fisher='empirical' in a plain backward/step loop)",
                        curvature_batch,
                    )
                else:
                    batch_factors = self._plain_factors()
                    if not batch_factors and self._layers:
                        raise argument_error(
                            "step",
                            "a preceding forward/backward in training mode (empirical K-FAC "
                            "statistics) or curvature_batch and loss_fn",
                            "no captured statistics",
                        )
                self._update_factors(batch_factors)
            key = self._inverse_key
            if self.steps_taken % self._inv_freq == 0 or any(
                "A" in self.state[_weight(m)] and key not in self.state[_weight(m)]
                for m in self._layers
            ):
                self._update_inverses(group["damping"])
            self._update_scales()
            self._apply(group)
        self.steps_taken += 1
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add parameters stepped with momentum SGD on their plain gradient.

        The group's own ``lr``, ``momentum`` and ``weight_decay`` (defaults: the
        optimiser's) apply to it; only the model's ``Linear``/``Conv2d`` layers in the
        first group are K-FAC preconditioned.

        Raises
        ------
        ValueError
            Naming ``param_group``, for a bad hyperparameter in it.
        """
        if isinstance(param_group, dict):
            for name, low, strict in (
                ("lr", 0.0, True), ("momentum", 0.0, False), ("weight_decay", 0.0, False),
                ("damping", 0.0, True),
            ):  # fmt: skip
                if name in param_group:
                    _number(f"param_group['{name}']", param_group[name], low=low, strict=strict)
            if param_group.get("kl_clip") is not None:
                _number("param_group['kl_clip']", param_group["kl_clip"])
        super().add_param_group(param_group)

    def _check_gradients(self) -> None:
        """Raise :class:`NumericalError` for a non-finite gradient, before any write."""
        grads = [p.grad for group in self.param_groups for p in group["params"]]
        present = [g.coalesce().values() if g.is_sparse else g for g in grads if g is not None]
        if not present:
            return
        finite = torch.stack([torch.isfinite(g).all() for g in present])
        if not bool(finite.all()):
            raise NumericalError(
                f"K-FAC: non-finite gradient at step {self.steps_taken}; "
                "parameters and optimiser state are unchanged"
            )

    def _apply(self, group: dict[str, Any]) -> None:
        directions, nu = self._directions(group)
        for index, pgroup in enumerate(self.param_groups):
            self._sgd_update(pgroup, directions if index == 0 else {}, nu)

    def _sgd_update(
        self, group: dict[str, Any], directions: dict[torch.Tensor, torch.Tensor], nu: float
    ) -> None:
        """Momentum SGD of one parameter group (preconditioned ``directions`` where given)."""
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            if p in directions:
                d = directions[p] * nu if nu != 1.0 else directions[p]
            else:
                d = p.grad.add(p, alpha=wd) if wd else p.grad
            if mom:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = d.detach().clone()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(mom).add_(d)
                d = buf
            p.add_(d, alpha=-lr)

    def _directions(self, group: dict[str, Any]) -> tuple[dict[torch.Tensor, torch.Tensor], float]:
        """The tracked layers' preconditioned directions and the KL-clip factor ``nu``."""
        lr, wd = group["lr"], group["weight_decay"]
        directions: dict[torch.Tensor, torch.Tensor] = {}
        preconditioned: list[torch.Tensor] = []
        vg = torch.zeros((), dtype=torch.float64, device=group["params"][0].device)
        for module in self._layers:
            weight, bias = _weight(module), _bias(module)
            state = self.state[weight]
            if weight.grad is None or self._inverse_key not in state:
                continue
            out_features = weight.shape[0]
            m = weight.grad.reshape(out_features, -1)
            if wd:
                m = m + wd * weight.reshape(out_features, -1)
            if bias is not None:
                gb = bias.grad if bias.grad is not None else torch.zeros_like(bias)
                if wd:
                    gb = gb + wd * bias
                m = torch.cat([m, gb.reshape(out_features, 1)], dim=1)
            v = self._precondition(state, m, group)
            vg += (v.double() * m.double()).sum()
            if bias is not None:
                directions[bias] = v[:, -1].reshape(bias.shape)
                v = v[:, :-1]
            directions[weight] = v.reshape(weight.shape)
            preconditioned.append(weight)
            if bias is not None:
                preconditioned.append(bias)
        nu = 1.0
        kl_clip = group["kl_clip"]
        if kl_clip and preconditioned:
            total = float(vg) * lr * lr
            if not math.isfinite(total):
                raise NumericalError(
                    f"K-FAC: non-finite preconditioned step at step {self.steps_taken}"
                )
            if total > 0:
                nu = min(1.0, math.sqrt(kl_clip / total))
        return directions, nu


class EKFAC(KFAC):
    r"""E-KFAC: K-FAC with a re-estimated diagonal in the Kronecker eigenbasis (George et al. 2018).

    K-FAC's :math:`A \otimes G` has the eigenbasis :math:`U_A \otimes U_G`
    (:math:`A = U_A \operatorname{diag}(\lambda_A) U_A^T`, likewise :math:`G`) and,
    in it, the diagonal :math:`\lambda_G \lambda_A^T`.  E-KFAC keeps the basis and
    replaces that diagonal by the second moments of the per-sample gradients
    :math:`\nabla_n = \sum_t g_{n,t} \bar a_{n,t}^T` (``out x (in[+1])``) rotated
    into it,

    .. math::

        S = \frac1N \sum_{n=1}^N \bigl(U_G^T \nabla_n U_A\bigr)^{\odot 2},
        \qquad S \leftarrow \rho S + (1-\rho) S_{\rm batch},

    which is the diagonal of the Fisher :math:`\frac1N\sum_n \operatorname{vec}
    \nabla_n \operatorname{vec}\nabla_n^T` in that basis (the best diagonal
    approximation there in Frobenius norm).  The preconditioned gradient is

    .. math::

        V = U_G \Bigl[\bigl(U_G^T M U_A\bigr) \oslash (S + \lambda)\Bigr] U_A^T

    with plain Tikhonov damping :math:`\lambda`.  The eigenbases are recomputed
    every ``inv_update_freq`` steps, and :math:`S` is then re-initialised to
    K-FAC's own diagonal :math:`\lambda_G \lambda_A^T` of the running factors;
    :math:`S` is updated on every factor-update step (``factor_update_freq``),
    from the same curvature batch as the factors (``fisher='mc'`` or
    ``'empirical'``).  Everything else (KL-clip, momentum, parameters outside
    ``Linear``/``Conv2d``, the ``state_dict``) is as in :class:`KFAC`; the
    arguments are the same (``damping_split`` is unused).

    The per-sample products cost :math:`O(N\,T\,d_{in} d_{out})` operations per layer
    and batch, computed in chunks of :attr:`chunk_size` samples (memory
    ``chunk_size * d_in * d_out``), on factor-update steps only.

    Parameters
    ----------
    model, lr, momentum, damping, weight_decay, stat_decay
        As for :class:`KFAC`.
    factor_update_freq, inv_update_freq, kl_clip, fisher, damping_split, seed
        As for :class:`KFAC`.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> opt = EKFAC(model, lr=0.1, fisher="empirical")
    >>> x, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 2
    >>> torch.nn.functional.cross_entropy(model(x), y).backward()
    >>> opt.step()
    >>> [t.shape for t in opt.eigenbasis(model[0])]
    [torch.Size([4, 4]), torch.Size([4, 4]), torch.Size([4, 4])]
    """

    _inverse_key = "U_A"
    #: samples per chunk of the per-sample products (bounds their memory)
    chunk_size = 64

    def eigenbasis(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_A, U_G, S)`` of a tracked layer: eigenvectors (columns) and the scalings.

        Raises ``ValueError`` if the module is not tracked or has no eigenbasis yet.
        """
        self.factors(module)
        state = self.state[_weight(module)]
        if "U_A" not in state:
            raise argument_error("module", "a layer whose eigenbasis was computed", module)
        return state["U_A"], state["U_G"], state["S"]

    def _record_samples(
        self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, batch_size: int
    ) -> None:
        if int(a.shape[0]) == batch_size:  # (N, T, d) rows per sample, all calls merged
            self._samples[module] = [(a, g)]

    def _update_inverses(self, damping: float) -> None:
        for module in self._layers:
            state = self.state[_weight(module)]
            if "A" not in state:
                continue
            dtype = _weight(module).dtype
            lam_a, U_A = torch.linalg.eigh(state["A"].double())
            lam_g, U_G = torch.linalg.eigh(state["G"].double())
            if not (torch.isfinite(U_A).all() and torch.isfinite(U_G).all()):
                raise NumericalError(
                    f"K-FAC: eigendecomposition of layer {module} failed at step {self.steps_taken}"
                )
            state["U_A"], state["U_G"] = U_A.to(dtype), U_G.to(dtype)
            state["S"] = torch.outer(lam_g.clamp_min(0), lam_a.clamp_min(0)).to(dtype)

    def _update_scales(self) -> None:
        rho = self.stat_decay
        samples, self._samples = self._samples, {}
        for module, records in samples.items():
            state = self.state[_weight(module)]
            if "U_A" not in state or len({a.shape[0] for a, _ in records}) != 1:
                continue
            a = torch.cat([r[0] for r in records], dim=1)  # (N, T_total, in[+1])
            g = torch.cat([r[1] for r in records], dim=1)  # (N, T_total, out)
            n = a.shape[0]
            batch = rotated_gradient_squares(
                a, g, state["U_A"], state["U_G"], chunk_size=self.chunk_size
            )
            batch /= n
            if not bool(torch.isfinite(batch).all()):
                raise NumericalError(
                    f"K-FAC: non-finite E-KFAC scaling for layer {module} at step "
                    f"{self.steps_taken}"
                )
            state["S"].mul_(rho).add_(batch, alpha=1.0 - rho)

    def _precondition(
        self, state: dict[str, Any], m: torch.Tensor, group: dict[str, Any]
    ) -> torch.Tensor:
        U_A, U_G = state["U_A"], state["U_G"]
        rotated = (U_G.T @ m @ U_A) / (state["S"] + group["damping"])
        out: torch.Tensor = U_G @ rotated @ U_A.T
        return out


register_optimizer("KFAC", KFAC, overwrite=True)
register_optimizer("EKFAC", EKFAC, overwrite=True)
