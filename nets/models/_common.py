"""Argument and input checks shared by the model classes."""

from __future__ import annotations

import torch

from spectral.errors import argument_error

__all__ = ["check_image_input", "check_positive_int"]


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer ``>= minimum``, else raise.

    >>> check_positive_int("num_classes", 3)
    3
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise argument_error(name, f"an integer >= {minimum}", value, kind=TypeError)
    if value < minimum:
        raise argument_error(name, f"an integer >= {minimum}", value)
    return value


def check_image_input(
    model_name: str, x: torch.Tensor, in_channels: int, input_size: int | None = None
) -> None:
    """Raise a clear ``ValueError`` if ``x`` is not ``(..., in_channels, H, W)``.

    With ``input_size`` given, ``H == W == input_size`` is required too.
    """
    if x.dim() < 3 or x.shape[-3] != in_channels:
        raise argument_error(
            "x",
            f"an image batch of shape (N, {in_channels}, H, W) for {model_name}",
            x,
        )
    if input_size is not None and tuple(x.shape[-2:]) != (input_size, input_size):
        raise argument_error(
            "x",
            f"images of size {input_size}x{input_size} for {model_name}",
            x,
        )
