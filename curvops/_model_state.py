"""Evaluate a model for curvature products without ever changing it.

A curvature product must leave the model bit-identical: parameters, buffers
(BatchNorm ``running_mean``/``running_var``/``num_batches_tracked``), train/eval
flags, ``requires_grad`` and ``.grad``.  Three pieces make this hold:

* :func:`curvature_mode` is a context manager that sets the modes a product needs
  and restores every flag it touched in a ``finally`` block:

  - Dropout modules are switched to eval (dropout is off during products);
  - ``bn_mode="train"`` / ``"eval"`` sets every normalisation module (BatchNorm,
    InstanceNorm) to that mode; ``None`` keeps each module's current mode;
  - module backward hooks (per module and global) are off: the curvature is that of
    the forward function, whatever hooks do to gradients (:class:`_BackwardHooksOff`);
    tensor hooks that ``forward`` registers are not registered
    (:data:`curvops.inert_hooks.INERT_HOOKS`, in each forward pass of
    :func:`functional_forward`), and those on parameters and buffers are never
    reached (products differentiate their own copies);
  - spectral-norm modules and hooks run their training-mode power steps with
    gradients (:func:`curvops.derivative_repairs.spectral_norm_sigma`: PyTorch's hold
    the singular vectors constant, so its second derivatives are not the network's);
  - Hugging Face / timm activation-checkpointing flags are off, and random
    regularisers configured by number (LayerDrop, SpecAugment, router jitter) are 0;
  - every normalisation module that ends up in training mode gets
    ``track_running_stats = False`` for the duration.  PyTorch's ``_NormBase``
    then normalises with the batch statistics and passes no running buffers to
    ``F.batch_norm``, so nothing is written in place (``torch.func`` and forward-mode
    AD refuse such writes, and they would corrupt the running statistics).

* :func:`functional_forward` evaluates the model with the selected parameters
  replaced by caller-owned tensors (the other parameters enter detached, so no graph
  reaches the model's own ``Parameter`` objects and ``.grad`` is never touched) and
  every buffer replaced by a private copy, so whatever a forward writes into a
  buffer (spectral-norm vectors, counters) never reaches the model.  The swap is
  done in each module's own parameter and buffer dictionaries and undone object by
  object afterwards: a module registered under two names, tied weights and
  parametrizations come back as the same objects of the same types
  (``torch.func.functional_call`` turns aliased parameters into plain tensors).

* :func:`curvature_mode` also enters :func:`curvops.determinism.product_context`
  (a private random stream, differentiable attention; dropout of every kind is
  switched off in each forward pass of :func:`functional_forward`)
  and restores the tensors that forward hooks store as plain module attributes
  (e.g. the ``weight`` of ``torch.nn.utils.spectral_norm``).

* :func:`model_state` / :func:`state_differences` capture and compare the full state
  (used by the tests and by :mod:`curvops.testing`).

>>> import torch
>>> bn = torch.nn.BatchNorm1d(2)
>>> with curvature_mode(bn, "train"):
...     _ = bn(torch.randn(4, 2))
>>> int(bn.num_batches_tracked), bool(bn.training), bn.track_running_stats
(0, True, True)
"""

from __future__ import annotations

import importlib
import random
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from curvops.derivative_repairs import (
    exact_spectral_norm_compute_weight,
    exact_spectral_norm_forward,
)
from curvops.determinism import (
    PRODUCT_SEED,
    DropoutOffMode,
    product_context,
    restart_private_stream,
)
from curvops.model_io import OutputFn, select_output
from curvops.op_provenance import describe_module, locate_operation, operation_name
from curvops.snapshot import tensors_in
from spectral.errors import argument_error

__all__ = [
    "BN_MODES",
    "check_bn_mode",
    "curvature_mode",
    "functional_forward",
    "model_state",
    "state_differences",
]

BN_MODES = ("train", "eval", None)

#: Per thread, one slot per active :func:`curvature_mode`: the arguments of its last
#: :func:`functional_forward` call (references only), to name the module of a
#: missing derivative after an error.
_LAST_FORWARD = threading.local()


def check_bn_mode(bn_mode: Any) -> str | None:
    """Validate ``bn_mode`` (``"train"``, ``"eval"`` or ``None``) and return it.

    >>> check_bn_mode("eval")
    'eval'
    """
    if bn_mode not in BN_MODES:
        raise argument_error("bn_mode", "one of 'train', 'eval' or None", bn_mode)
    return bn_mode


def _is_random_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a random regulariser outside ``nn.Dropout``'s hierarchy:
    stochastic depth (timm's and Hugging Face's ``*DropPath`` classes, torchvision's
    ``StochasticDepth``: whole residual branches dropped in training mode) and
    hand-written dropout classes (``StableDropout`` of SEW-D and DeBERTa-style models).
    They have no common base class and are recognised by name; like dropout modules
    they are put in eval mode during products (their children keep their modes)."""
    name = type(module).__name__.lower()
    return "droppath" in name or name == "stochasticdepth" or name.endswith("dropout")


#: Strengths of random regularisers set by attribute (Hugging Face modules and
#: configs): LayerDrop skips a whole layer when ``torch.rand([]) < p`` in training mode,
#: SpecAugment masks time steps and features (wav2vec 2.0, HuBERT, Whisper), and
#: mixture-of-experts routers multiply their inputs by uniform noise (Mixtral, Switch).
_RANDOM_REGULARISERS = (
    "layerdrop",
    "encoder_layerdrop",
    "decoder_layerdrop",
    "speech_encoder_layerdrop",
    "mask_time_prob",
    "mask_feature_prob",
    "jitter_noise",
    "router_jitter_noise",
    "input_jitter_noise",
)


#: ``nn.utils.parametrizations.spectral_norm``'s module and ``nn.utils.spectral_norm``'s
#: hook class (private names of torch; ``None`` where a torch lacks them).
_SPECTRAL_NORM_MODULE: type | None = getattr(
    importlib.import_module("torch.nn.utils.parametrizations"), "_SpectralNorm", None
)
_SPECTRAL_NORM_HOOK: type | None = getattr(
    importlib.import_module("torch.nn.utils.spectral_norm"), "SpectralNorm", None
)


def _random_regularisers_off(modules: Sequence[nn.Module]) -> list[tuple[Any, str, Any]]:
    """Set the :data:`_RANDOM_REGULARISERS` settings of ``modules`` (and of their
    ``config`` objects, which Hugging Face modules read at forward time) to 0; return
    what to put back.

    In training mode they skip whole layers, mask inputs or jitter router inputs at
    random (wav2vec 2.0, HuBERT, BART, Whisper, Mixtral, ...): a product would be the
    curvature of one random subnetwork (LayerDrop: 16 % off the full one for a small
    wav2vec 2.0), or of one random masking drawn from numpy's generator (SpecAugment:
    two operators differed by 160 %).
    """
    changed: list[tuple[Any, str, Any]] = []
    seen: set[int] = set()
    for m in modules:
        # instance dictionaries, not getattr: a missing module attribute costs an
        # exception in nn.Module.__getattr__, a few microseconds per name and module
        for owner in (m, vars(m).get("config")):
            attributes = getattr(owner, "__dict__", None)
            if not attributes or id(owner) in seen:
                continue
            seen.add(id(owner))
            for name in _RANDOM_REGULARISERS:
                value = attributes.get(name)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                    try:
                        setattr(owner, name, 0.0)
                    except (AttributeError, TypeError):  # a read-only property: not ours to set
                        continue
                    changed.append((owner, name, value))
    return changed


#: Boolean flags that turn on activation checkpointing (``torch.utils.checkpoint``)
#: per module: Hugging Face layers (``gradient_checkpointing_enable()``) and timm
#: models (``set_grad_checkpointing()``).
_CHECKPOINTING_FLAGS = ("gradient_checkpointing", "grad_checkpointing")


def _activation_checkpointing_off(modules: Sequence[nn.Module]) -> list[tuple[Any, str, Any]]:
    """Set the :data:`_CHECKPOINTING_FLAGS` of ``modules`` that are ``True`` to ``False``;
    return what to put back.

    A checkpointed block recomputes its forward pass in every backward pass that needs
    its activations, long after :func:`functional_forward` has put the model's own
    parameters back and left the product's settings: the recomputed graph is not the
    product's.  A tiny Llama with ``gradient_checkpointing_enable()`` had a Hessian
    5e-4 and a GGN 9e-4 off (float64) without an error, GPT-2 failed with a
    ``CheckpointError``.  Checkpointing only trades memory for time, so products run
    the layers directly; other checkpointing inside a forward pass is refused there.
    """
    changed: list[tuple[Any, str, Any]] = []
    for m in modules:
        attributes = vars(m)
        for name in _CHECKPOINTING_FLAGS:
            if attributes.get(name) is True:
                setattr(m, name, False)
                changed.append((m, name, True))
    return changed


#: Marks an instance attribute that :func:`curvature_mode` added and removes again.
_ADDED = object()


def _exact_spectral_norms(modules: Sequence[nn.Module]) -> list[tuple[Any, str, Any]]:
    """Give the spectral-norm modules and hooks among ``modules`` the exact derivatives
    of :mod:`curvops.derivative_repairs` (their power steps differentiable); return what
    to put back (:data:`_ADDED`: an instance attribute to remove)."""
    changed: list[tuple[Any, str, Any]] = []
    for m in modules:
        if _SPECTRAL_NORM_MODULE is not None and isinstance(m, _SPECTRAL_NORM_MODULE):
            changed.append((m, "forward", vars(m).get("forward", _ADDED)))
            m.forward = exact_spectral_norm_forward(m)
        for hook in m._forward_pre_hooks.values():
            if _SPECTRAL_NORM_HOOK is not None and isinstance(hook, _SPECTRAL_NORM_HOOK):
                sn: Any = hook
                changed.append((sn, "compute_weight", vars(sn).get("compute_weight", _ADDED)))
                sn.compute_weight = exact_spectral_norm_compute_weight(sn)
    return changed


def _put_back(switched: Sequence[tuple[Any, str, Any]]) -> None:
    """Undo the switches of ``curvature_mode`` in reverse order (:data:`_ADDED`: remove)."""
    for owner, name, value in reversed(switched):
        if value is _ADDED:
            vars(owner).pop(name, None)
        else:
            setattr(owner, name, value)


def _seeded(generator: Any) -> None:
    """Seed ``generator`` (torch, numpy or Python) with :data:`PRODUCT_SEED`."""
    if isinstance(generator, torch.Generator):
        generator.manual_seed(PRODUCT_SEED)
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = type(generator.bit_generator)(PRODUCT_SEED).state
    else:  # np.random.RandomState, random.Random
        generator.seed(PRODUCT_SEED)


def _state_of(generator: Any) -> Any:
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    if isinstance(generator, np.random.RandomState):
        return generator.get_state()
    return generator.getstate()


def _restore(generator: Any, state: Any) -> None:
    if isinstance(generator, torch.Generator):
        generator.set_state(state)
    elif isinstance(generator, np.random.Generator):
        generator.bit_generator.state = state
    elif isinstance(generator, np.random.RandomState):
        generator.set_state(state)
    else:
        generator.setstate(state)


_GENERATOR_TYPES = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)

#: Plain module attributes put back after a product: tensors, and numbers a forward may
#: update (a call counter used in a schedule made the same operator's products differ
#: by 12 % from one call to the next, and products changed the model).
_RESTORED_ATTRIBUTE_TYPES = (torch.Tensor, int, float, complex, str, type(None))


_ATTRIBUTE_KINDS: dict[type, str | None] = {}


def _attribute_kind(cls: type) -> str | None:
    """``"restore"`` for attribute types put back after products, ``"generator"`` for
    random generators, ``"container"`` for dicts and lists, None otherwise; memoised per
    type (``isinstance`` against ``torch.Generator`` goes through a Python metaclass,
    about 1 us per attribute)."""
    if cls not in _ATTRIBUTE_KINDS:
        if issubclass(cls, _RESTORED_ATTRIBUTE_TYPES):
            _ATTRIBUTE_KINDS[cls] = "restore"
        elif issubclass(cls, _GENERATOR_TYPES):
            _ATTRIBUTE_KINDS[cls] = "generator"
        elif issubclass(cls, (dict, list)):
            _ATTRIBUTE_KINDS[cls] = "container"
        else:
            _ATTRIBUTE_KINDS[cls] = None
    return _ATTRIBUTE_KINDS[cls]


#: A container attribute (module, name, the container, a shallow copy of its contents).
_Container = tuple[nn.Module, str, Any, Any]


def _public_containers(plain: Iterable[tuple[nn.Module, str, Any, str | None]]) -> list[_Container]:
    """The public dict and list attributes among ``plain`` (module, name, value, kind),
    with shallow copies of their contents.

    A forward pass may write into them -- a module recording its activations in a
    list, a cache of tensors computed from the parameters -- and a product must leave
    the model as it was: :func:`curvature_mode` puts their contents back afterwards
    (:func:`_put_back_containers`).
    """
    return [
        (m, key, value, dict(value) if isinstance(value, dict) else list(value))
        for m, key, value, kind in plain
        if kind == "container" and not key.startswith("_")
    ]


def _put_back_containers(containers: Sequence[_Container]) -> None:
    """Put each container (and its contents, compared by identity) back as it was."""
    for m, key, value, saved in containers:
        if vars(m).get(key) is not value:
            object.__setattr__(m, key, value)
        if isinstance(value, dict):
            if len(value) != len(saved) or any(
                value.get(k, _ADDED) is not v for k, v in saved.items()
            ):
                value.clear()
                value.update(saved)
        elif len(value) != len(saved) or any(a is not b for a, b in zip(value, saved)):
            value[:] = saved


def _is_cache(key: str, value: Any) -> bool:
    """A dict attribute named as a cache (``attention_bias_cache`` of LeViT,
    EfficientFormer, TinyViT): emptied for each forward pass of a product."""
    return isinstance(value, dict) and "cache" in key.lower()


@contextmanager
def _caches_emptied(caches: Sequence[_Container]) -> Iterator[None]:
    """Present the model's cache dicts empty to one forward pass, then put them back.

    A cache keeps tensors computed from the parameters by an earlier forward pass --
    LeViT's attention biases, ``attention_biases[:, idxs]``, cached in eval mode, also
    under ``no_grad`` -- so a product reading it would leave out their derivatives: a
    zero Hessian block for ``attention_biases``, without an error.  Emptied, the
    forward pass computes them again from the product's own parameters.
    """
    if not caches:
        yield
        return
    for _, _, value, _ in caches:
        value.clear()
    try:
        yield
    finally:
        _put_back_containers(caches)


def _module_generators(values: Iterable[Any]) -> list[tuple[Any, Any]]:
    """The random generators (torch, numpy or Python) kept as module attributes
    (``values``), each once, with their states.

    A forward pass drawing from a generator of its own (noise layers seeded for
    reproducibility) would make every product different and advance the model's
    generator; :func:`curvature_mode` seeds them with
    :data:`curvops.determinism.PRODUCT_SEED` during products and puts the states back.
    """
    found: dict[int, Any] = {}
    for value in values:
        found.setdefault(id(value), value)
    return [(g, _state_of(g)) for g in found.values()]


@contextmanager
def curvature_mode(model: nn.Module, bn_mode: str | None = None) -> Iterator[nn.Module]:
    """Put ``model`` in the mode used for curvature products; restore it on exit.

    Also enters :func:`curvops.determinism.product_context` (a private random
    stream, the MATH attention backend, no transformer fast path)
    and, on exit, puts back every tensor and number stored as a plain module attribute
    (forward hooks such as ``torch.nn.utils.spectral_norm`` store the weight they
    compute there; a forward may count its calls).  Everything is restored also when
    the block raises.

    Parameters
    ----------
    model:
        The module; only its ``training`` flags and the ``track_running_stats``
        attribute of normalisation modules are changed, and only inside the block.
    bn_mode:
        ``"train"`` (batch statistics, running statistics untouched), ``"eval"``
        (running statistics) or ``None`` (each module's current mode).

    Raises
    ------
    ValueError
        For an unknown ``bn_mode``.
    """
    check_bn_mode(bn_mode)
    modules = list(model.modules())
    flags = [(m, m.training) for m in modules]
    plain = [
        (m, key, value, kind)
        for m in modules
        for key, value in vars(m).items()
        if (kind := _attribute_kind(type(value))) is not None
    ]  # one pass over the modules' attributes for both kinds
    attributes = [(m, key, value) for m, key, value, kind in plain if kind == "restore"]
    containers = _public_containers(plain)
    generators = _module_generators(value for _, _, value, kind in plain if kind == "generator")
    tracked: list[tuple[_NormBase, bool]] = []
    hooks = _BackwardHooksOff(modules)
    switched: list[tuple[Any, str, Any]] = []
    try:
        hooks.__enter__()
        switched = _random_regularisers_off(modules)
        switched += _activation_checkpointing_off(modules)
        switched += _exact_spectral_norms(modules)
        for g, _ in generators:  # the model's own generators draw a fixed stream too
            _seeded(g)
        with product_context():
            for m in modules:
                if isinstance(m, _DropoutNd) or _is_random_layer(m):
                    m.training = False
                elif isinstance(m, _NormBase):
                    if bn_mode is not None:
                        m.training = bn_mode == "train"
                    if m.training:
                        tracked.append((m, m.track_running_stats))
                        m.track_running_stats = False
            with _forward_frame(containers, generators) as last:
                try:
                    yield model
                except (NotImplementedError, RuntimeError) as exc:
                    hint = _missing_derivative_hint(exc)
                    if hint is None:
                        raise
                    where = _culprit(model, str(exc), last)
                    raise type(exc)(f"{exc}\n{where}{hint}") from exc
    finally:
        hooks.restore()
        for g, state in generators:
            _restore(g, state)
        _put_back(switched)
        for m, flag in tracked:
            m.track_running_stats = flag
        for m, was_training in flags:
            m.training = was_training
        _put_back_attributes(attributes, containers)


_FRAME_KEYS = ("slots", "caches", "generators")


@contextmanager
def _forward_frame(
    containers: Sequence[_Container], generators: Sequence[tuple[Any, Any]]
) -> Iterator[list[Any]]:
    """What :func:`functional_forward` needs from the active :func:`curvature_mode`,
    on per-thread stacks: a slot for its last call (to name a failing module), the
    cache dicts to empty and the model's generators to restart in each forward pass.
    Yields the slot."""
    stacks = _LAST_FORWARD.__dict__
    frame: tuple[list[Any], ...] = (
        [],
        [c for c in containers if _is_cache(c[1], c[2])],
        [g for g, _ in generators],
    )
    for key, value in zip(_FRAME_KEYS, frame):
        stacks.setdefault(key, []).append(value)
    try:
        yield frame[0]
    finally:
        for key in _FRAME_KEYS:
            stacks[key].pop()


def _put_back_attributes(
    attributes: Sequence[tuple[nn.Module, str, Any]], containers: Sequence[_Container]
) -> None:
    """Put back the plain attributes (by identity) and the containers' contents."""
    for m, key, value in attributes:
        if vars(m).get(key) is not value:
            object.__setattr__(m, key, value)
    _put_back_containers(containers)


class _BackwardHooksOff:
    """Module backward hooks (full, pre and old-style; per module and global) off.

    A curvature is a property of the forward function.  PyTorch wires a module's
    backward hooks into the graph when the module is called, so while the registries
    are empty during the forward passes of a product the hooks are neither in the
    recorded graphs nor called: a hook that rescales or clips ``grad_input`` would
    change every product (the Hessian of a 3-layer MLP by a factor of 3 to 8), and
    one that records gradients (per-sample gradient libraries) would record the
    products' cotangents.  The registries are swapped for empty ones and the same
    objects put back on exit, so the user's handles still remove their hooks.
    """

    _GLOBALS = ("_global_backward_hooks", "_global_backward_pre_hooks")

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self._modules = [
            (m, m._backward_hooks, m._backward_pre_hooks)
            for m in modules
            if m._backward_hooks or m._backward_pre_hooks
        ]
        self._globals = [(name, getattr(_module_globals, name)) for name in self._GLOBALS]
        self._entered = False

    def __enter__(self) -> None:
        self._entered = True
        for m, _, _ in self._modules:
            object.__setattr__(m, "_backward_hooks", OrderedDict())
            object.__setattr__(m, "_backward_pre_hooks", OrderedDict())
        for name, registry in self._globals:
            if registry:
                setattr(_module_globals, name, OrderedDict())

    def restore(self) -> None:
        if not self._entered:
            return
        for m, backward, pre in self._modules:
            object.__setattr__(m, "_backward_hooks", backward)
            object.__setattr__(m, "_backward_pre_hooks", pre)
        for name, registry in self._globals:
            setattr(_module_globals, name, registry)


def _culprit(model: nn.Module, message: str, last: list[Any]) -> str:
    """``"The operation runs in module '...' (Type). "`` from a re-run of the last forward."""
    op = operation_name(message)
    if op is None or not last:
        return ""
    names, tensors, inputs, output_fn = last

    def run() -> None:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
            functional_forward(model, names, leaves, inputs, output_fn)

    found = locate_operation(model, op, run)
    if found is None:
        return ""
    return f"The operation runs in the forward of {describe_module(model, found)}. "


def _missing_derivative_hint(exc: BaseException) -> str | None:
    """What to do when PyTorch lacks a derivative a product needs (None: other errors)."""
    text = str(exc)
    if "derivative for" in text and "not implemented" in text:
        need, extra = "a second derivative (double backward)", ""
    elif "forward AD" in text or "forward mode AD" in text:  # the latter: a custom Function
        need = "a forward-mode derivative"
        extra = (
            "; for the GGN and Fisher, cache=True (recorded graphs, no forward-mode "
            "derivatives) avoids it"
        )
    else:
        return None
    return (
        f"Curvature products need {need} of every operation of the model, and PyTorch "
        "has none for the operation named above. Attention already runs on the MATH "
        "backend (and without the fused fast path) during products. Replace the "
        f"operation by an equivalent built from differentiable operations{extra}."
    )


def _version(t: torch.Tensor) -> int | None:
    """The version counter of ``t`` (bumped by in-place writes), None where there is none."""
    try:
        return int(t._version)
    except (RuntimeError, AttributeError):  # inference tensors, functorch wrappers
        return None


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN equal to NaN in the same place (a non-finite parameter that the
    forward did not touch is not a write)."""
    if torch.equal(a, b):
        return True
    if not (a.is_floating_point() or a.is_complex()):
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(
        a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
    )


def _refuse_parameter_writes(written: list[str], copies: bool) -> None:
    """Raise for a forward pass that wrote to the parameters ``written`` in place."""
    if not written:
        return
    happened = (
        "(on copies: your weights are unchanged)"
        if copies
        else "(this forward pass has already changed your weights: reload them)"
    )
    raise argument_error(
        "model",
        "a forward pass that leaves its parameters unchanged: a constraint applied in "
        "place inside forward (weight clipping, a max-norm renormalisation) makes the "
        "curvature that of a moving function and rewrites the weights at every product; "
        f"apply it after optimizer.step() instead {happened}",
        f"a forward that wrote in place to parameter(s) {sorted(set(written))[:5]}",
    )


@contextmanager
def _reparametrized(
    model: nn.Module, replaced: Mapping[str, torch.Tensor], *, copies: bool = False
) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Swap parameters (``replaced`` or detached) and buffers (copies) in place; undo on exit.

    Yields the names and original objects of the parameters in ``replaced``.

    Works on every module's own ``_parameters`` / ``_buffers`` dictionaries, keyed by
    the identity of the original tensor, so a tensor reachable under several names
    (aliased modules, tied weights) gets one value under all of them, and exactly the
    original objects are put back.  A forward pass that writes to a parameter in place
    is refused after it ran (:func:`_refuse_parameter_writes`): writes are seen by
    their version counters, and with ``copies`` (every parameter not in ``replaced``
    enters as a copy; ``replaced`` must hold copies too) also ``.data`` writes, by
    comparing the copies with the originals -- the user's weights are then untouched.
    """
    values: dict[int, torch.Tensor] = {}
    watched: list[tuple[str, torch.Tensor, int | None, nn.Parameter]] = []
    originals: list[tuple[str, nn.Parameter]] = []
    known = set()
    for name, p in model.named_parameters():
        known.add(name)
        if name in replaced:
            value = replaced[name]
            originals.append((name, p))
        else:
            value = p.detach().clone() if copies else p.detach()
        values[id(p)] = value
        watched.append((name, value, _version(value), p))
    unknown = [n for n in replaced if n not in known]
    if unknown:
        raise argument_error("names", "names of parameters of the model", unknown)
    slots: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for m in model.modules():
            params: dict[str, Any] = m._parameters
            for key, p in params.items():
                if p is not None:
                    slots.append((params, key, p))
                    params[key] = values[id(p)]
            buffers: dict[str, Any] = m._buffers
            for key, b in buffers.items():
                if b is not None:
                    slots.append((buffers, key, b))
                    copy = values.get(id(b))
                    if copy is None:
                        copy = values[id(b)] = b.detach().clone()
                    buffers[key] = copy
        yield originals
    finally:
        for table, key, original in reversed(slots):
            table[key] = original
    written = [name for name, value, v, _ in watched if v is not None and _version(value) != v]
    if copies:
        written += [
            name
            for name, value, _, p in watched
            if value.shape == p.shape and not _same_values(value.detach(), p.detach())
        ]
    _refuse_parameter_writes(written, copies)


#: The error of a forward pass that enters ``torch.utils.checkpoint`` (or another
#: ``saved_tensors_hooks`` context) during a curvature product.
CHECKPOINTING_REFUSED = (
    "The model's forward pass uses activation checkpointing (torch.utils.checkpoint with "
    "use_reentrant=False, or another torch.autograd.graph.saved_tensors_hooks context) "
    "inside a curvature product. A checkpointed block recomputes its forward pass during "
    "the backward passes, outside the product's parameters and settings, so its products "
    "would be wrong (or fail). Call the block without checkpointing while computing "
    "curvature (Hugging Face and timm models need nothing: their gradient_checkpointing / "
    "grad_checkpointing flags are off during products automatically)."
)


@contextmanager
def _inner_saved_tensors_hooks_refused() -> Iterator[None]:
    """Raise :data:`CHECKPOINTING_REFUSED` where the block enters a ``saved_tensors_hooks``
    context (as ``torch.utils.checkpoint(..., use_reentrant=False)`` does).

    PyTorch cannot disable these hooks while a caller's own are active (a
    ``torch.autograd.graph.save_on_cpu()`` around the products, whose packing is exact):
    then nothing is refused, and checkpointing inside the model is not detected.
    """
    with ExitStack() as stack:
        try:
            stack.enter_context(
                torch.autograd.graph.disable_saved_tensors_hooks(CHECKPOINTING_REFUSED)
            )
        except RuntimeError:  # a caller's hooks are on PyTorch's stack
            pass
        yield


def _restart_streams() -> None:
    """Inside :func:`curvature_mode`: every forward pass draws the same random numbers
    (torch's forked generators and the model's own, seeded with ``PRODUCT_SEED``)."""
    streams = getattr(_LAST_FORWARD, "generators", None)
    if not streams:
        return
    restart_private_stream()
    for g in streams[-1]:
        _seeded(g)


#: One input tensor watched by :func:`functional_forward`: the tensor the forward pass
#: receives, its version before the pass, and the caller's tensor it is a copy of (None
#: when the forward pass receives the caller's own tensor).
_WatchedInput = tuple[torch.Tensor, int | None, torch.Tensor | None]


def _named_tensors(value: Any, path: str = "inputs") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``value`` with its name (``inputs['pixel_values']``), in the order
    of :func:`curvops.snapshot.tensors_in`."""
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    if isinstance(value, Mapping):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, (tuple, list)):
        items = enumerate(value)
    else:
        return []
    return [named for key, v in items for named in _named_tensors(v, f"{path}[{key!r}]")]


def _copied_inputs(value: Any) -> Any:
    """``value`` with every tensor cloned (same nesting; a namedtuple stays one)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return {k: _copied_inputs(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_copied_inputs(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_copied_inputs(v) for v in value)
    return value


def _watched_inputs(inputs: Any, copies: bool) -> tuple[Any, list[_WatchedInput]]:
    """The inputs a forward pass receives (clones with ``copies``) and their watch list.

    Without ``copies`` (every product) this reads one version counter per input tensor
    (well under a microsecond each); with ``copies`` (the checking forward passes of
    :func:`curvops.validation.validate`, run when an operator is built) the forward
    pass gets clones, so a write is found without changing the caller's tensors.
    """
    if isinstance(inputs, torch.Tensor) and not copies:  # the common case, fast
        return inputs, [(inputs, _version(inputs), None)]
    received = _copied_inputs(inputs) if copies else inputs
    seen = tensors_in(received)
    own: Sequence[torch.Tensor | None] = tensors_in(inputs) if copies else [None] * len(seen)
    return received, [(t, _version(t), original) for t, original in zip(seen, own)]


def _refuse_input_writes(received: Any, watched: Sequence[_WatchedInput], copies: bool) -> None:
    """Raise for a forward pass that wrote to one of its input tensors in place.

    A write is a bumped version counter (every in-place operation on the tensor or a
    view of it, ``x /= 255``, ``x.sub_(mean)``, ``F.relu(x, inplace=True)``); on copies
    also a value that differs from the caller's (writes through ``.data``).
    ``received`` (what the forward pass received) names the tensors.
    """
    changed = [
        i
        for i, (t, before, original) in enumerate(watched)
        if (before is not None and _version(t) != before)
        or (original is not None and not _same_values(t.detach(), original.detach()))
    ]
    if not changed:
        return
    names = [name for name, _ in _named_tensors(received)]
    written = [names[i] for i in changed]
    happened = (
        "(found on copies of the inputs: your data is unchanged)"
        if copies
        else "(this forward pass has already changed your data: reload it)"
    )
    raise argument_error(
        "model",
        "a forward pass that leaves its inputs unchanged: the model's forward writes to "
        "its input tensor in place (x /= 255, x.sub_(mean), an in-place activation of the "
        "input), so every product would change the input tensors of your `data` again "
        "and the next product would see other inputs; preprocess out of place "
        f"(x = x / 255) or once in the data, before building the operator {happened}",
        f"a forward that wrote in place to {', '.join(written[:5])}",
    )


def functional_forward(
    model: nn.Module,
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
    inputs: Any,
    output_fn: OutputFn | None = None,
    *,
    copies: bool = False,
) -> torch.Tensor:
    """Evaluate ``model(inputs)`` with parameters ``names`` replaced by ``tensors``.

    Parameters not listed enter detached (constants); every buffer enters as a copy
    (writes of the forward are discarded).  The forward runs under
    :class:`curvops.determinism.DropoutOffMode` (no dropout of any kind).
    Afterwards every parameter and buffer of the model is the same object as
    before, under every name.  ``inputs`` is a tensor, a tuple/list of positional
    inputs or a mapping of keyword inputs.  The output tensor is chosen by
    :func:`curvops.model_io.select_output` (``logits`` of a dict or ``ModelOutput``,
    the first item of a tuple, or ``output_fn``).  Call it inside
    :func:`curvature_mode`.  A forward that writes to a parameter in place is refused
    (``ValueError`` naming ``model``); with ``copies`` (``tensors`` are copies, and so
    enter the other parameters) also one that writes through ``.data``, and the
    model's weights stay untouched.  So is a forward that writes to one of its input
    tensors in place (``x /= 255``: seen by the tensors' version counters); with
    ``copies`` the forward receives clones of the inputs (writes through ``.data``
    found too) and the caller's tensors stay untouched.

    >>> lin = torch.nn.Linear(2, 1, bias=False)
    >>> w = torch.ones(1, 2)
    >>> functional_forward(lin, ["weight"], [w], torch.tensor([[1.0, 2.0]]))
    tensor([[3.]])
    """
    slots = getattr(_LAST_FORWARD, "slots", None)
    if slots:  # inside curvature_mode: remember the call (to name a failing module)
        slots[-1][:] = [names, tensors, inputs, output_fn]
    caches = getattr(_LAST_FORWARD, "caches", None)
    _restart_streams()
    received, watched = _watched_inputs(inputs, copies)
    with _reparametrized(model, dict(zip(names, tensors)), copies=copies) as originals:
        with (
            DropoutOffMode(),
            _inner_saved_tensors_hooks_refused(),
            _caches_emptied(caches[-1] if caches else ()),
        ):
            if isinstance(received, Mapping):
                out = model(**received)
            elif isinstance(received, (tuple, list)):
                out = model(*received)
            else:
                out = model(received)
        _refuse_input_writes(received, watched, copies)
        selected = select_output(out, output_fn)
        refuse_stale_parameter_paths(selected, originals)
    return selected


#: Whether a tensor is wrapped by a ``torch.func`` transform (a private torch function;
#: a torch without it is taken to have no wrapped tensors).
_is_functorch_wrapped: Any = getattr(
    torch._C._functorch, "is_functorch_wrapped_tensor", lambda tensor: False
)


#: What a forward pass that uses tensors computed from the parameters before the
#: product is expected to do instead (the ``expected`` part of the error).
STALE_PARAMETER_TENSORS_EXPECTED = (
    "a forward pass that computes everything it uses from its parameters as they "
    "are now: curvature products replace the parameters, but a tensor computed "
    "from them earlier and kept as a module attribute (a tied weight stored as "
    "self.w_t = self.layer.weight.t() in __init__, a weight cached in forward) "
    "keeps the old graph, and every product would silently leave out its part. "
    "Compute such tensors inside forward (or register a tied weight as the same "
    "nn.Parameter)"
)


def refuse_stale_parameter_paths(
    output: Any, originals: Sequence[tuple[str, nn.Parameter]]
) -> None:
    """Refuse an ``output`` whose graph reaches one of the replaced parameters ``originals``.

    Inside :func:`functional_forward` no module holds the original parameter objects,
    so a path from the output to one of them runs through a tensor computed from it
    before the product -- a cache the model filled in an earlier forward pass, a
    tied view made in ``__init__`` -- and the product would leave that path out.  The
    test asks the autograd engine for the gradients of the output with respect to the
    originals: where no path exists (the normal case) the engine only marks the graph
    and runs nothing, so the test costs about 0.1 ms per recorded graph (gpt-tiny,
    437,760 parameters, against about 80 ms for a Hessian product).  Outputs of
    ``torch.func`` transforms are not tested (their tensors are wrapped; the
    construction-time check of :func:`curvops.validation.validate` covers them).

    Raises
    ------
    ValueError
        Naming ``model`` and the parameters reached.

    Examples
    --------
    >>> lin = torch.nn.Linear(2, 1)
    >>> stale = lin.weight * 1.0  # computed from the parameter before the product
    >>> refuse_stale_parameter_paths(stale.sum(1), [("weight", lin.weight)])
    Traceback (most recent call last):
    ...
    ValueError: Argument 'model': expected a forward pass that computes everything ...
    """
    if not (isinstance(output, torch.Tensor) and output.requires_grad):
        return
    if _is_functorch_wrapped(output):
        return
    targets = [(name, p) for name, p in originals if p.requires_grad]
    if not targets:
        return
    reached = torch.autograd.grad(
        output,
        [p for _, p in targets],
        grad_outputs=output.new_zeros(()).expand_as(output),
        allow_unused=True,
        retain_graph=True,
    )
    names = sorted(name for (name, _), g in zip(targets, reached) if g is not None)
    if names:
        raise argument_error(
            "model",
            STALE_PARAMETER_TENSORS_EXPECTED,
            f"a forward pass that reaches parameter(s) {names[:5]} through such a tensor",
        )


def model_state(model: nn.Module) -> dict[str, Any]:
    """Capture everything a curvature product must not change (cloned tensors).

    Returns a dictionary with parameters, buffers, ``.grad`` (or None),
    ``requires_grad`` flags, per-module ``training`` flags, normalisation modules'
    ``track_running_stats``, and the identity and type of every parameter and
    buffer under every name it is reachable by (aliased modules, tied weights) and
    of every tensor stored as a plain module attribute.

    Examples
    --------
    >>> s = model_state(torch.nn.Linear(1, 1))
    >>> sorted(s)  # doctest: +NORMALIZE_WHITESPACE
    ['attributes', 'buffer_objects', 'buffers', 'grads', 'param_objects', 'params',
     'requires_grad', 'track_running_stats', 'training']

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    dict
        The captured state (cloned tensors, identities, flags).
    """
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "grads": {
            n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters()
        },
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "track_running_stats": {
            n: m.track_running_stats for n, m in model.named_modules() if isinstance(m, _NormBase)
        },
        "param_objects": {
            n: (id(p), type(p)) for n, p in model.named_parameters(remove_duplicate=False)
        },
        "buffer_objects": {
            n: (id(b), type(b)) for n, b in model.named_buffers(remove_duplicate=False)
        },
        "attributes": {
            f"{n}.{key}" if n else key: (id(value), type(value))
            for n, m in model.named_modules(remove_duplicate=False)
            for key, value in vars(m).items()
            if isinstance(value, torch.Tensor)
        },
    }


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality for tensors (NaN-safe), ``==`` otherwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return False
        if a.numel() == 0:
            return True
        bytes_a = a.detach().contiguous().reshape(-1).view(torch.uint8)
        bytes_b = b.detach().contiguous().reshape(-1).view(torch.uint8)
        return bool(torch.equal(bytes_a, bytes_b))
    return bool(a == b)


def state_differences(before: Mapping[str, Any], model: nn.Module) -> list[str]:
    """List what differs (bitwise) between a :func:`model_state` and ``model`` now.

    Examples
    --------
    >>> lin = torch.nn.Linear(1, 1)
    >>> s = model_state(lin)
    >>> state_differences(s, lin)
    []

    Parameters
    ----------
    before : Mapping
        A :func:`model_state` taken earlier.
    model : torch.nn.Module
        The model now.

    Returns
    -------
    list of str
        One line per difference (empty when nothing changed).
    """
    after = model_state(model)
    diffs = []
    for section, entries in before.items():
        now = after[section]
        if set(entries) != set(now):
            diffs.append(f"{section}: names changed")
            continue
        for name, value in entries.items():
            if not _same(value, now[name]):
                diffs.append(f"{section}: {name}")
    return diffs
