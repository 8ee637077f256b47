"""The model zoo: MLP, LeNet-5, CIFAR VGGs, PreResNets, WideResNet-28-10, SmallCNN.

Every model takes ``num_classes``, ``in_channels``, ``input_size`` and a ``seed``;
its weights are drawn from a :class:`torch.Generator` seeded with ``seed`` and
construction never touches torch's global random state.

Which inputs each model accepts:

============================  ====================  ====================
model                         8x8 (digits)          32x32 (CIFAR)
============================  ====================  ====================
MLP, SmallCNN                 yes                   yes
LeNet5                        yes (padded convs)    yes (classic)
PreResNet8/20/56/110          yes                   yes
WideResNet28x10               yes                   yes
VGG11/13/16/19 [BN]           no (needs 32x32)      yes
============================  ====================  ====================

``gpt-tiny`` (:class:`~nets.models.gpt.GPT`) is a language model on token ids ``(B, T)``:
``num_classes`` is its vocabulary size and ``input_size`` its context length (the
``text`` dataset gives 256 and 64).

Names are case-insensitive and ignore ``-`` and ``_`` (``"vgg16_bn"`` is ``VGG16BN``).

>>> net = get_model("SmallCNN", num_classes=10, in_channels=1, input_size=8)
>>> type(net).__name__, model_spec(net)["model"]
('SmallCNN', 'SmallCNN')
>>> sum(p.numel() for p in get_model("VGG16", num_classes=100).parameters())
15291300
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from nets.models.gpt import GPT, gpt_tiny
from nets.models.lenet import LeNet5
from nets.models.mlp import MLP
from nets.models.preresnet import PreResNet
from nets.models.small_cnn import SmallCNN
from nets.models.vgg import VGG
from nets.models.wideresnet import WideResNet, WideResNet28_10
from spectral.errors import argument_error

__all__ = [
    "GPT",
    "MLP",
    "MODELS",
    "VGG",
    "LeNet5",
    "PreResNet",
    "SmallCNN",
    "WideResNet",
    "WideResNet28_10",
    "available_models",
    "get_model",
    "model_spec",
]

ModelBuilder = Callable[..., nn.Module]

#: Registered model names -> ``builder(num_classes, in_channels, input_size, *, seed, **kw)``.
MODELS: dict[str, ModelBuilder] = {
    "MLP": MLP,
    "LeNet5": LeNet5,
    "SmallCNN": SmallCNN,
    "WideResNet28x10": WideResNet28_10,
    "gpt-tiny": gpt_tiny,
}
for _depth in (11, 13, 16, 19):
    MODELS[f"VGG{_depth}"] = functools.partial(VGG, _depth)
    MODELS[f"VGG{_depth}BN"] = functools.partial(VGG, _depth, batch_norm=True)
for _depth in (8, 20, 56, 110):
    MODELS[f"PreResNet{_depth}"] = functools.partial(PreResNet, _depth)

_ALIASES = {"lenet": "LeNet5", "wideresnet2810": "WideResNet28x10", "wrn2810": "WideResNet28x10"}

_SPEC_ATTRIBUTE = "_nets_model_spec"


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def available_models() -> list[str]:
    """Registered model names, sorted.

    Examples
    --------
    >>> "VGG16" in available_models()
    True

    Returns
    -------
    list of str
        The names accepted by :func:`get_model`.
    """
    return sorted(MODELS, key=str.lower)


def canonical_model_name(name: str) -> str:
    """The registered spelling of ``name`` (case, ``-`` and ``_`` ignored).

    >>> canonical_model_name("vgg16_bn")
    'VGG16BN'

    Raises
    ------
    ValueError
        If no model of that name is registered (the message lists the names).
    """
    if not isinstance(name, str):
        raise argument_error("model", "a model name (str)", name, kind=TypeError)
    lookup = {_key(k): k for k in MODELS}
    lookup.update(_ALIASES)
    key = _key(name)
    if key not in lookup:
        raise argument_error("model", f"one of {available_models()}", name)
    return lookup[key]


def get_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    *,
    seed: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name``.

    Parameters
    ----------
    name:
        One of :func:`available_models` (case-insensitive).
    num_classes, in_channels, input_size:
        Output classes, input channels and the input's side length.
    seed:
        Initialisation seed (an explicit generator; the global RNG is untouched).
    **kwargs:
        Model-specific options (``hidden`` for MLP, ``dropout`` for VGG, ...).

    The arguments are recorded on the model (see :func:`model_spec`) so that a
    checkpoint can rebuild it.

    Returns
    -------
    torch.nn.Module
        The model, initialised from ``seed``.

    Raises
    ------
    ValueError
        For an unknown name or an input size the architecture cannot take.

    Examples
    --------
    >>> import torch
    >>> net = get_model("vgg16_bn", num_classes=100, seed=0)  # case and '-'/'_' are ignored
    >>> type(net).__name__, net.eval()(torch.zeros(1, 3, 32, 32)).shape
    ('VGG', torch.Size([1, 100]))
    """
    canonical = canonical_model_name(name)
    model = MODELS[canonical](num_classes, in_channels, input_size, seed=seed, **kwargs)
    spec = {
        "model": canonical,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": input_size,
        "model_kwargs": dict(kwargs),
        "model_seed": seed,
    }
    setattr(model, _SPEC_ATTRIBUTE, spec)
    return model


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """The arguments :func:`get_model` built ``model`` with, or ``None`` for other modules.

    Examples
    --------
    >>> import torch
    >>> model_spec(torch.nn.Linear(2, 2)) is None
    True

    Parameters
    ----------
    model : torch.nn.Module
        A model.

    Returns
    -------
    dict or None
        ``name``, ``num_classes``, ``in_channels``, ``input_size``, ``seed`` and the extra
        keyword arguments, or ``None``.
    """
    spec = getattr(model, _SPEC_ATTRIBUTE, None)
    return dict(spec) if isinstance(spec, dict) else None
