"""``output_hessian_operator``: prepared once, the same bits as ``output_hessian_matmat``,
and the exact output Hessian of the loss (dense float64 reference)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from curvops.losses import (
    loss_kind,
    output_hessian_matmat,
    output_hessian_operator,
    sequence_cross_entropy,
)

D = torch.float64


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _ce() -> tuple[Any, torch.Tensor, torch.Tensor]:
    return (
        nn.CrossEntropyLoss(),
        torch.randn(6, 4, generator=_gen(), dtype=D),
        torch.tensor([0, 3, 1, 1, 2, 0]),
    )


def _ce_tokens_padded() -> tuple[Any, torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 5, (3, 7), generator=_gen())
    y[0, 4:] = -100
    y[2, 1] = -100
    return nn.CrossEntropyLoss(), torch.randn(3, 5, 7, generator=_gen(), dtype=D), y


def _seq_ce() -> tuple[Any, torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 5, (2, 6), generator=_gen())
    y[1, 3:] = -1
    return (
        sequence_cross_entropy(ignore_index=-1),
        torch.randn(2, 6, 5, generator=_gen(), dtype=D),
        y,
    )


def _mse() -> tuple[Any, torch.Tensor, torch.Tensor]:
    f = torch.randn(5, 3, generator=_gen(), dtype=D)
    return nn.MSELoss(), f, torch.randn(5, 3, generator=_gen(), dtype=D)


def _bce() -> tuple[Any, torch.Tensor, torch.Tensor]:
    f = torch.randn(5, 2, generator=_gen(), dtype=D)
    return nn.BCEWithLogitsLoss(), f, torch.rand(5, 2, generator=_gen(), dtype=D)


def _autograd() -> tuple[Any, torch.Tensor, torch.Tensor]:
    def quartic(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((f - y) ** 4).mean() + (f[:, 0] * f[:, 1]).sum()

    f = torch.randn(4, 3, generator=_gen(), dtype=D)
    return quartic, f, torch.randn(4, 3, generator=_gen(), dtype=D)


CASES: dict[str, tuple[Callable[[], tuple[Any, torch.Tensor, torch.Tensor]], str]] = {
    "ce": (_ce, "ce"),
    "ce_tokens_padded": (_ce_tokens_padded, "ce_tokens"),
    "seq_ce": (_seq_ce, "seq_ce"),
    "mse": (_mse, "mse"),
    "bce": (_bce, "bce"),
    "autograd": (_autograd, "autograd"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_prepared_operator_is_the_exact_output_hessian(name: str) -> None:
    make, kind = CASES[name]
    loss_fn, f, y = make()
    assert loss_kind(loss_fn, f, y) == kind
    U = torch.randn(3, *f.shape, generator=torch.Generator().manual_seed(1), dtype=D)
    H = output_hessian_operator(loss_fn, f, y)
    first, second = H(U), H(U)
    assert torch.equal(first, second)  # applying it again changes nothing
    assert torch.equal(first, output_hessian_matmat(loss_fn, f, y, U))
    dense = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), f)
    dense = dense.reshape(f.numel(), f.numel())
    expected = (U.reshape(3, -1) @ dense.T).reshape(U.shape)
    scale = dense.abs().max() * U.abs().max() * f.numel()
    assert (first - expected).abs().max() <= 20 * f.numel() * torch.finfo(D).eps * scale


def test_prepared_operator_does_not_depend_on_later_changes_of_the_outputs() -> None:
    """The probabilities are taken when the operator is prepared (the graph's outputs)."""
    loss_fn, f, y = _ce_tokens_padded()
    U = torch.randn(1, *f.shape, generator=torch.Generator().manual_seed(2), dtype=D)
    H = output_hessian_operator(loss_fn, f, y)
    before = H(U)
    f.add_(1.0)
    assert torch.equal(H(U), before)
