"""Seeded, global-RNG-free parameter initialisation for the model zoo.

Every model in :mod:`nets.models` builds its layers on the ``meta`` device
(no memory, no random numbers drawn), materialises them on the CPU and then
initialises every parameter from an explicit :class:`torch.Generator` seeded
with the model's ``seed``.  Constructing a model therefore never reads or
advances torch's global random state, and the same seed gives the same
weights bit for bit.

>>> import torch
>>> before = torch.get_rng_state()
>>> with torch.device("meta"):
...     layer = torch.nn.Linear(3, 2)
>>> layer = materialise(layer, seed=0)
>>> torch.equal(before, torch.get_rng_state()), layer.weight.device.type
(True, 'cpu')
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ConvInit", "default_init", "he_normal_conv", "materialise"]

ConvInit = Callable[[nn.Conv2d, torch.Generator], None]


def default_init(module: nn.Linear | nn.Conv2d, generator: torch.Generator) -> None:
    """PyTorch's default initialisation of ``Linear``/``Conv2d``, drawn from ``generator``.

    ``W ~ U(-b, b)`` with ``b = 1/sqrt(fan_in)`` (kaiming-uniform with ``a = sqrt(5)``),
    bias ``~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    """
    nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
    if module.bias is not None:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def he_normal_conv(module: nn.Conv2d, generator: torch.Generator) -> None:
    """``W ~ N(0, 2/n)`` with ``n = k_h k_w C_out`` and zero bias (VGG/ResNet CIFAR init)."""
    n = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
    nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / n), generator=generator)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def materialise(
    model: nn.Module,
    seed: int,
    *,
    conv_init: ConvInit | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Allocate a meta-device ``model`` on ``device`` and initialise it from ``seed``.

    Linear layers get :func:`default_init`; Conv2d layers ``conv_init`` (default
    :func:`default_init`); BatchNorm layers weight 1, bias 0 and fresh running
    statistics.  Modules are visited in registration order, so the result depends
    only on the architecture and ``seed``.

    Raises
    ------
    TypeError
        If a module with its own parameters or buffers has no known initialisation.
    """
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            (conv_init or default_init)(module, generator)
        elif isinstance(module, nn.Linear):
            default_init(module, generator)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_parameters()
        elif any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            raise TypeError(
                f"No seeded initialisation is defined for module type {type(module).__name__}."
            )
    return model
