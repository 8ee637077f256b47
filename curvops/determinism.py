"""The global settings of a curvature product: no randomness, differentiable attention.

Every curvature product (Hessian, GGN, Fisher, and all that is built on them)
runs inside :func:`product_context`, entered by
:func:`curvops._model_state.curvature_mode`, and evaluates the model through
:func:`curvops._model_state.functional_forward`, which runs each forward pass under
:class:`DropoutOffMode`.  Together they make the model a deterministic function
with second derivatives, and restore every setting on exit, also after an error:

* **No dropout of any kind.**  A :class:`DropoutOffMode`
  (a :class:`torch.overrides.TorchFunctionMode`) rewrites every call of a random
  regulariser to its deterministic evaluation: ``F.dropout``, ``F.dropout1d/2d/3d``,
  ``F.alpha_dropout``, ``F.feature_alpha_dropout``, ``F.rrelu`` (the mean slope) and
  their ``torch.*`` forms get ``training=False``; ``F.scaled_dot_product_attention``
  and ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) get
  ``dropout_p=0``; ``nn.RNN``/``nn.LSTM``/``nn.GRU`` get no inter-layer dropout.
  (:func:`curvops._model_state.curvature_mode` puts dropout, stochastic-depth and
  hand-written ``*Dropout`` modules in eval mode and zeroes LayerDrop, SpecAugment and
  router-jitter settings.)  So a ``forward`` that calls ``F.dropout(x, p, training=True)``
  itself gives the products of the same model without dropout.  Bernoulli draws
  (``torch.bernoulli``, ``Tensor.bernoulli``, ``Tensor.bernoulli_``) evaluate to their
  means, like ``F.rrelu``'s slope: the masks of hand-written dropout and stochastic
  depth (timm's ``drop_path``, torchvision's ``stochastic_depth``, ``x * m / keep``
  with ``m`` drawn with probability ``keep``) become ``keep / keep = 1``, the model
  without the random layer, wherever the function is called from.  The same mode
  drops forward-mode tangents from the inputs of ``out=`` calls: such writes come
  from ``no_grad`` state updates (the power iteration of spectral normalisation),
  whose results are constants of the product, and forward-mode AD refuses them.
* **No tensor hooks of the forward pass.**  The same mode makes
  ``Tensor.register_hook`` and ``Tensor.register_post_accumulate_grad_hook`` register
  nothing while a product's forward pass runs: a hook that ``forward`` puts on an
  intermediate tensor (a gradient-scaling or gradient-reversal layer, ``h.register_hook
  (lambda g: 0.5 * g)``; a Grad-CAM recorder) gets a handle whose ``remove()`` removes
  nothing, and is neither applied to the products' cotangents nor called by them
  (:data:`INERT_HOOKS`).  A rescaling hook made a Hessian 46 % off and a two-batch
  GGN, declared symmetric, non-symmetric by 23 %.  This matches module backward hooks,
  which :func:`curvops._model_state.curvature_mode` switches off: a curvature is a
  property of the forward function.  Hooks on autograd nodes (``h.grad_fn.register_hook``)
  do not pass through ``__torch_function__`` and cannot be held back this way.
  Hooks that the loss registers (on the model outputs, ``o.register_hook(...)`` inside
  ``loss_fn``) are inert in the same way: curvops evaluates every loss through
  :func:`curvops.inert_hooks.evaluate_loss` (a gradient-halving hook there had made
  the Hessian 58 % and the GGN 75 % off).
* **The loss's own derivatives.**  The same mode replaces the PyTorch functions whose
  backward is not the loss's derivative by exact equivalents
  (:data:`curvops.derivative_repairs.REPLACEMENTS`: weight normalisation's fused
  kernel and chunked ``F.linear_cross_entropy``, whose double backward is wrong, and
  embeddings with ``scale_grad_by_freq`` or ``sparse`` gradients).
* **Calls whose derivatives products cannot trust are refused or re-routed.**  The
  same mode refuses in-place writes that autograd does not record (with gradients off,
  :func:`curvops.untracked_writes.refuse_untracked_write`; through a ``.data`` or
  ``.detach()`` alias, :class:`curvops.untracked_writes.DetachedAliases`) and writes of
  parameter-dependent values to a repeated index
  (:func:`curvops.duplicate_writes.refuse_duplicate_write`), and in the forward-mode
  passes of the GGN and Fisher it signals the functions whose tangents are not the
  transpose of their gradients (:mod:`curvops.tangent_consistency`), whose ``Jv`` is
  then taken in reverse mode.
* **A fixed random stream.**  Any other random operation inside a product draws
  from a private stream (the default CPU generator, and each initialised CUDA
  generator, forked and seeded with :data:`PRODUCT_SEED`), so the same operator,
  batch and vector give bitwise the same product on the CPU, and the user's
  streams are left exactly where they were.  The stream restarts at every forward pass
  (:func:`restart_private_stream`), so every pass over a batch -- per column of the
  forward-mode GGN, per product -- sees the same draws.  The product is then the
  curvature of the model at one fixed draw (a VAE's noise, a mask drawn with ``torch.rand``), so
  an operator whose model draws this way says so in a logged warning when it is
  built (:func:`torch_draws_reported`).  A forward pass that draws from numpy's
  or Python's global generator is refused when the operator is built
  (:func:`global_streams_untouched`: forking them would cost 0.15 ms per product).
* **Autograd on.**  Products run outside ``torch.inference_mode`` (which a caller's
  evaluation code may have entered: autograd would record nothing there, and every
  product came out zero or partial without an error).
* **No cached parametrisations.**  A caller's ``torch.nn.utils.parametrize.cached()``
  is suspended: its cached weights would replace the product's own (their
  derivatives lost).
* **Attention with second derivatives.**  ``F.scaled_dot_product_attention`` is
  restricted to the MATH backend (:func:`torch.nn.attention.sdpa_kernel`): the fused
  flash / memory-efficient kernels have neither double-backward nor forward-mode
  derivatives.  The fused "fast path" of ``nn.MultiheadAttention`` and
  ``nn.TransformerEncoderLayer`` (``torch.backends.mha``) is turned off, since it
  has no derivatives and would otherwise be taken by the gradient-free tangent
  passes.

The cost is a dictionary lookup per PyTorch function call made from Python during
a forward pass (the mode is entered for forward passes only, not for the backward
passes through recorded graphs, whose lean kernels of :mod:`curvops.lean_ops` run
Python code), plus a few tens of microseconds per product for the settings.

>>> import torch
>>> import torch.nn.functional as F
>>> x = torch.ones(4)
>>> with product_context(), DropoutOffMode():
...     F.dropout(x, 0.5, training=True)
tensor([1., 1., 1., 1.])
>>> torch.backends.mha.get_fastpath_enabled()
True
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, TypeVar, cast

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from curvops.derivative_repairs import REPLACEMENTS
from curvops.duplicate_writes import WRITES, refuse_duplicate_write
from curvops.inert_hooks import INERT_HOOKS
from curvops.tangent_consistency import (
    ForwardModeUnsuitable,
    in_forward_mode_pass,
    unsuitable_call,
)
from curvops.untracked_writes import DetachedAliases, refuse_untracked_write
from spectral.errors import argument_error

__all__ = [
    "INERT_HOOKS",
    "PRODUCT_SEED",
    "DropoutOffMode",
    "global_streams_untouched",
    "is_active",
    "outside_inference_mode",
    "product_context",
    "restart_private_stream",
    "torch_draws_reported",
]

logger = logging.getLogger(__name__)

#: Seed of the private random stream used during products.
PRODUCT_SEED = 0

# func -> (keyword, position, value): the argument that switches its randomness off.
_REWRITES: dict[Callable[..., Any], tuple[str, int, Any]] = {
    F.dropout: ("training", 2, False),
    F.dropout1d: ("training", 2, False),
    F.dropout2d: ("training", 2, False),
    F.dropout3d: ("training", 2, False),
    F.alpha_dropout: ("training", 2, False),
    F.feature_alpha_dropout: ("training", 2, False),
    F.rrelu: ("training", 3, False),
    F.rrelu_: ("training", 3, False),
    torch.dropout: ("train", 2, False),
    torch.dropout_: ("train", 2, False),
    torch.alpha_dropout: ("train", 2, False),
    torch.alpha_dropout_: ("train", 2, False),
    torch.feature_dropout: ("train", 2, False),
    torch.feature_dropout_: ("train", 2, False),
    torch.feature_alpha_dropout: ("train", 2, False),
    torch.feature_alpha_dropout_: ("train", 2, False),
    torch.native_dropout: ("train", 2, False),
    torch.rrelu: ("training", 3, False),
    torch.rrelu_: ("training", 3, False),
    F.scaled_dot_product_attention: ("dropout_p", 4, 0.0),
    F.multi_head_attention_forward: ("dropout_p", 10, 0.0),
}


def _bernoulli_mean(
    input: torch.Tensor,
    p: float | None = None,
    *,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean of ``torch.bernoulli(input[, p])`` (and ``input.bernoulli([p])``): the
    probabilities themselves, as a new tensor without derivatives (a draw has none)."""
    mean = input.detach().clone() if p is None else torch.full_like(input.detach(), p)
    return mean if out is None else out.copy_(mean)


def _bernoulli_mean_(
    self: torch.Tensor,
    p: float | torch.Tensor = 0.5,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The mean of ``self.bernoulli_(p)``, written into ``self``."""
    return self.copy_(p) if isinstance(p, torch.Tensor) else self.fill_(p)


# Random draws evaluated at their means during products (see the module docstring).
_EXPECTATIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.bernoulli: _bernoulli_mean,
    torch.Tensor.bernoulli: _bernoulli_mean,
    torch.Tensor.bernoulli_: _bernoulli_mean_,
}

#: Calls evaluated by curvops itself during products (one lookup per call).
_LOCAL: dict[Callable[..., Any], Callable[..., Any]] = {**_EXPECTATIONS, **INERT_HOOKS}

# nn.RNN / nn.LSTM / nn.GRU call these with their inter-layer ``dropout`` as an argument
# (position 5; 6 for packed sequences, whose position 3 holds the weights)
_RECURRENT: frozenset[Callable[..., Any]] = frozenset(
    {torch._VF.lstm, torch._VF.gru, torch._VF.rnn_tanh, torch._VF.rnn_relu}
)

_depth = 0


class DropoutOffMode(TorchFunctionMode):
    """Rewrite calls of random regularisers to their deterministic evaluation, and of
    functions with wrong second derivatives to exact equivalents; register no tensor
    hooks (:data:`INERT_HOOKS`).

    See the module docstring for the lists.  Prefer :func:`product_context`.

    >>> import torch
    >>> with DropoutOffMode():
    ...     torch.nn.functional.alpha_dropout(torch.ones(2), 0.9, training=True)
    tensor([1., 1.])
    """

    def __init__(self) -> None:
        super().__init__()
        self._aliases = DetachedAliases()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if kwargs.get("out") is not None:
            args = tuple(_primal(a) for a in args)
        if in_forward_mode_pass():
            reason = unsuitable_call(func, args, kwargs)
            if reason is not None:
                raise ForwardModeUnsuitable(reason)
        if not torch.is_grad_enabled():
            refuse_untracked_write(func, args)
        self._aliases.check(func, args)
        if func in WRITES:
            refuse_duplicate_write(func, args, kwargs)
        replacement = REPLACEMENTS.get(func) or _LOCAL.get(func)
        if replacement is not None:
            return replacement(*args, **kwargs)
        if func in _RECURRENT and len(args) == 9:  # inter-layer dropout of nn.RNN/LSTM/GRU
            at = 6 if isinstance(args[3], (list, tuple)) else 5  # packed: (data, batch_sizes, ...)
            args = (*args[:at], 0.0, *args[at + 1 :])
        rewrite = _REWRITES.get(func)
        if rewrite is not None:
            name, position, value = rewrite
            if len(args) > position:
                args = (*args[:position], value, *args[position + 1 :])
            else:
                kwargs = {**kwargs, name: value}
        return self._aliases.note(func, args, func(*args, **kwargs))


def _primal(value: Any) -> Any:
    """``value`` without its forward-mode tangent (tensors only)."""
    if isinstance(value, torch.Tensor):
        return fwAD.unpack_dual(value).primal
    return value


_F = TypeVar("_F", bound=Callable[..., Any])


def outside_inference_mode(fn: _F) -> _F:
    """Run ``fn`` with ``torch.inference_mode`` off (autograd able to record).

    For entry points that allocate tensors before entering :func:`product_context` and
    update them inside it (an inference tensor cannot be written outside inference
    mode), so that they work when called from a caller's ``torch.inference_mode()``.

    >>> @outside_inference_mode
    ... def records() -> bool:
    ...     return torch.is_inference_mode_enabled()
    >>> with torch.inference_mode():
    ...     records()
    False
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return cast(_F, wrapper)


@contextmanager
def global_streams_untouched(what: str) -> Iterator[None]:
    """Refuse a block that draws from numpy's or Python's global random generator.

    Products fork torch's generators, not these (reading and setting numpy's state
    costs about 0.15 ms, a tenth of a small CNN's product), so a forward pass drawing
    from them would make products random and advance the caller's streams.  Wrapped
    around the one forward pass an operator's construction runs: the streams are put
    back and ``ValueError`` (naming ``what``) raised if the block moved them.

    >>> import random
    >>> with global_streams_untouched("model"):
    ...     _ = torch.rand(1)  # torch's generators are forked by products: fine
    >>> with global_streams_untouched("model"):
    ...     _ = random.random()
    Traceback (most recent call last):
    ...
    ValueError: Argument 'model': expected a forward pass that does not draw from...
    """
    numpy_state = cast(tuple[Any, ...], np.random.get_state())  # noqa: NPY002
    python_state = random.getstate()
    yield
    numpy_after = cast(tuple[Any, ...], np.random.get_state())  # noqa: NPY002
    numpy_moved = numpy_after[2] != numpy_state[2] or not np.array_equal(
        numpy_after[1], numpy_state[1]
    )
    moved = [
        name
        for name, changed in (
            ("numpy's", numpy_moved),
            ("Python's", random.getstate() != python_state),
        )
        if changed
    ]
    if moved:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)
        raise argument_error(
            what,
            "a forward pass that does not draw from numpy's or Python's global random "
            "generator (products would be random and advance your stream; draw from "
            "torch, whose generators products fork, or switch the random layer off in "
            "eval mode)",
            f"a forward that drew from {' and '.join(moved)} global generator",
        )


def _forked_generators() -> list[torch.Generator]:
    """The generators :func:`product_context` forks: the default CPU generator and each
    initialised CUDA generator."""
    generators = [torch.default_generator]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        generators += list(torch.cuda.default_generators)
    return generators


@contextmanager
def torch_draws_reported(what: str) -> Iterator[None]:
    """Log a warning when the block draws from torch's random generators.

    Inside :func:`product_context` such draws come from the private stream, so the
    products are deterministic but are the curvature of the model at one fixed random
    draw -- deliberate for a VAE's reparametrisation noise, not what a user of a
    hand-written dropout layer (``torch.rand(...) < p``) expects.  Wrapped around the
    one forward pass an operator's construction runs; ``what`` names the model in the
    message.  Dropout of every kind and Bernoulli masks draw nothing here
    (:class:`DropoutOffMode`).

    >>> import logging
    >>> logging.disable(logging.WARNING)  # the example's draw is on purpose
    >>> with torch_draws_reported("model"):
    ...     _ = torch.rand(1)
    >>> logging.disable(logging.NOTSET)
    """
    generators = _forked_generators()
    states = [g.get_state() for g in generators]
    yield
    if any(not torch.equal(s, g.get_state()) for s, g in zip(states, generators)):
        logger.warning(
            "%s draws random numbers from torch's generator in its forward pass "
            "(dropout and Bernoulli masks are switched off in products, these draws "
            "are not): the products are deterministic, drawn from a private stream "
            "seeded with %d, and are the curvature of the model at that one fixed "
            "draw. Put the random layer in eval mode (or switch it off) for the "
            "curvature of the deterministic model.",
            what,
            PRODUCT_SEED,
        )


def restart_private_stream() -> None:
    """Seed the generators :func:`product_context` forks with :data:`PRODUCT_SEED` again.

    Called at the start of every forward pass of a product (inside the context only),
    so that a model drawing random numbers sees the same draws in every pass: the
    forward-mode GGN and Fisher evaluate the model once per column and per batch, and
    with one stream for the whole product the columns of one ``matmat`` were taken at
    different draws (the 2 x 2 block ``X^T G X`` non-symmetric by 11 %).
    """
    if _depth > 0:
        for g in _forked_generators():
            g.manual_seed(PRODUCT_SEED)


def is_active() -> bool:
    """True inside :func:`product_context` (part of the operators' cache keys).

    >>> is_active()
    False
    """
    return _depth > 0


@contextmanager
def _private_rng(seed: int) -> Iterator[None]:
    """Fork the default CPU (and initialised CUDA) generators, seeded with ``seed``."""
    generators = _forked_generators()
    states = [g.get_state() for g in generators]
    try:
        for g in generators:
            g.manual_seed(seed)
        yield
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)


@contextmanager
def _fastpath_off() -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@contextmanager
def _parametrization_cache_off() -> Iterator[None]:
    """Suspend a caller's ``torch.nn.utils.parametrize.cached()`` for the product.

    Its cache holds parametrized weights computed from the parameters themselves, so a
    product's forward would use them instead of its own leaves and lose their
    derivatives (a Hessian 90 % off, without an error).  The counter and the cache are
    put back exactly afterwards.
    """
    from torch.nn.utils import parametrize

    enabled = getattr(parametrize, "_cache_enabled", 0)
    if not enabled:
        yield
        return
    cache = parametrize._cache
    parametrize._cache_enabled, parametrize._cache = 0, {}
    try:
        yield
    finally:
        parametrize._cache_enabled, parametrize._cache = enabled, cache


@contextmanager
def product_context() -> Iterator[None]:
    """Deterministic, differentiable evaluation for curvature products (re-entrant).

    A private random stream seeded with :data:`PRODUCT_SEED`, the MATH attention
    backend, no transformer fast path, no inference mode and no parametrisation cache;
    everything restored on exit (see the
    module docstring; dropout is switched off per forward pass by
    :class:`DropoutOffMode`).  Nested use is a no-op.

    >>> import torch
    >>> state = torch.get_rng_state()
    >>> with product_context():
    ...     a = torch.rand(2)
    >>> with product_context():
    ...     b = torch.rand(2)
    >>> bool(torch.equal(a, b)), bool(torch.equal(state, torch.get_rng_state()))
    (True, True)
    """
    global _depth
    if _depth > 0:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    with ExitStack() as stack:
        # under torch.inference_mode() autograd records nothing (not even in
        # enable_grad), and every product would silently be zero
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(_parametrization_cache_off())
        stack.enter_context(_private_rng(PRODUCT_SEED))
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        stack.enter_context(_fastpath_off())
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
