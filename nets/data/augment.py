"""Training augmentation on image batches with an explicit generator (no torchvision).

:func:`random_crop` zero-pads a batch by ``padding`` pixels and crops a window of
the original size at an offset drawn uniformly from ``{0, ..., 2*padding}`` per
image; :func:`random_horizontal_flip` mirrors each image with probability ``p``.
Both draw their random numbers only from the :class:`torch.Generator` passed in,
so the result is a deterministic function of the input and the generator state.
Inputs are ``(N, C, H, W)`` float tensors in pixel scale (before normalisation,
so the padding is black as in torchvision's ``RandomCrop(32, padding=4)``).

>>> import torch
>>> x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
>>> g = torch.Generator().manual_seed(0)
>>> RandomCropFlip(padding=1)(x, g).shape
torch.Size([2, 1, 4, 4])
>>> torch.equal(random_crop(x, 0, g), x)
True
"""

from __future__ import annotations

import torch

from spectral.errors import argument_error

__all__ = ["RandomCropFlip", "random_crop", "random_horizontal_flip"]


def _check_batch(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise argument_error("x", "an image batch of shape (N, C, H, W)", x)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop each image back to ``H x W`` at a random offset.

    Shapes: ``(N, C, H, W) -> (N, C, H, W)``.
    """
    _check_batch(x)
    if padding < 0:
        raise argument_error("padding", "a non-negative integer", padding)
    if padding == 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device)
    dy, dx = dy.to(x.device), dx.to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # advanced indexing on dims 0, 2, 3 -> (N, H, W, C)
    cropped = padded.permute(0, 2, 3, 1)[batch, rows, cols]
    return cropped.permute(0, 3, 1, 2).contiguous()


def random_horizontal_flip(
    x: torch.Tensor, generator: torch.Generator, p: float = 0.5
) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``.  Shape preserved."""
    _check_batch(x)
    if not 0.0 <= p <= 1.0:
        raise argument_error("p", "a probability in [0, 1]", p)
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < p
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


class RandomCropFlip:
    """The standard CIFAR augmentation: random crop with padding, then horizontal flip.

    Parameters
    ----------
    padding:
        Zero padding of the crop (4 for CIFAR).
    flip:
        Apply :func:`random_horizontal_flip` with probability 0.5.
    """

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise argument_error("padding", "a non-negative integer", padding)
        self.padding = padding
        self.flip = flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment the batch ``x`` with random numbers from ``generator``."""
        out = random_crop(x, self.padding, generator)
        if self.flip:
            out = random_horizontal_flip(out, generator)
        return out

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"
