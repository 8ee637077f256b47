"""Activation checkpointing inside the model: exact products or a clear error.

A block run through ``torch.utils.checkpoint`` recomputes its forward pass in later
backward passes, after :func:`curvops._model_state.functional_forward` has put the
model's own parameters back and left the product's settings (dropout off, lean
kernels, the attention backend).  Before this was handled, a tiny Hugging Face Llama
with ``gradient_checkpointing_enable()`` had a Hessian 5e-4 and a GGN 9e-4 off in
float64 without an error, and a LayerNorm block or GPT-2 failed with a raw
``CheckpointError``.  Now the checkpointing flags of Hugging Face and timm modules are
off during products (checkpointing only trades memory for time, so the curvature is
that of the same function), and any other checkpointing inside a forward pass is
refused when the operator is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from curvops import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    KFACOperator,
    ggn_diagonal,
    loss_stats,
)
from curvops._model_state import CHECKPOINTING_REFUSED, model_state, state_differences
from curvops.differentiability import UntrackedParameterError
from curvops.testing import dense_hessian

from .conftest import relative_error

EPS = float(np.finfo(np.float64).eps)


class Block(nn.Module):
    """Linear -> LayerNorm -> GELU -> Dropout: lean kernels and the dropout-off mode both
    act inside it (each made a recomputed forward differ from the recorded one)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(nn.functional.gelu(self.norm(self.linear(x))))


class FlaggedNet(nn.Module):
    """Checkpoints its block when its flag (Hugging Face's ``gradient_checkpointing`` or
    timm's ``grad_checkpointing``) is set and it is training, as those libraries do."""

    def __init__(self, flag: str, enabled: bool) -> None:
        super().__init__()
        self.flag = flag
        setattr(self, flag, enabled)
        self.block = Block()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, self.flag) and self.training:
            h = checkpoint(self.block, x, use_reentrant=False)
        else:
            h = self.block(x)
        return self.head(h)


class AlwaysCheckpointed(nn.Module):
    """Calls ``torch.utils.checkpoint`` itself, with no flag to turn it off."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.block = Block()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, x, use_reentrant=self.reentrant))


def _twins(flag: str) -> tuple[nn.Module, nn.Module]:
    """The same weights with checkpointing on and off."""
    torch.manual_seed(0)
    on = FlaggedNet(flag, True).double()
    off = FlaggedNet(flag, False).double()
    off.load_state_dict(on.state_dict())
    return on, off


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.arange(16) % 3


LOSS = nn.CrossEntropyLoss()

#: Every kind of product, each returning an array: the same on both twins.
PRODUCTS: dict[str, Callable[[nn.Module, Any, np.ndarray], Any]] = {
    "hessian": lambda m, d, v: HessianOperator(m, LOSS, d) @ v,
    "hessian-two-batches": lambda m, d, v: HessianOperator(m, LOSS, [d, d]) @ v,
    "ggn": lambda m, d, v: GGNOperator(m, LOSS, d) @ v,
    "ggn-uncached": lambda m, d, v: GGNOperator(m, LOSS, d, cache=False) @ v,
    "fisher-mc": lambda m, d, v: FisherOperator(m, LOSS, d, seed=2) @ v,
    "fisher-empirical": lambda m, d, v: FisherOperator(m, LOSS, d, kind="empirical") @ v,
    "kfac": lambda m, d, v: KFACOperator(m, LOSS, d, remainder="diagonal") @ v,
    "ggn-diagonal": lambda m, d, v: ggn_diagonal(m, LOSS, d),
    "loss-gradient": lambda m, d, v: HessianOperator(m, LOSS, d).loss_gradient(),
    "loss-stats": lambda m, d, v: [
        getattr(loss_stats(m, LOSS, d, batch_size=4, num_probes=2), name)
        for name in ("grad_var", "hess_var", "frobenius_norm_sq")
    ],
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("flag", ["gradient_checkpointing", "grad_checkpointing"])
@pytest.mark.parametrize("kind", list(PRODUCTS))
def test_checkpointing_flags_change_no_product(kind: str, flag: str, mode: str) -> None:
    on, off = _twins(flag)
    on.train(mode == "train")
    off.train(mode == "train")
    data = _data()
    v = np.random.default_rng(0).standard_normal(sum(p.numel() for p in on.parameters()))
    before = model_state(on)
    got = np.asarray(PRODUCTS[kind](on, data, v))
    # the same function evaluated the same way: bitwise the same numbers
    np.testing.assert_array_equal(got, np.asarray(PRODUCTS[kind](off, data, v)))
    assert getattr(on, flag) is True  # put back
    assert state_differences(before, on) == []


def test_checkpointed_hessian_matches_the_dense_reference() -> None:
    on, off = _twins("gradient_checkpointing")
    data = _data()
    v = np.random.default_rng(3).standard_normal(sum(p.numel() for p in on.parameters()))
    H = dense_hessian(off, LOSS, data).numpy()  # train mode, dropout off
    assert relative_error(HessianOperator(on.train(), LOSS, data) @ v, H @ v) <= 1e3 * EPS


def test_flags_are_put_back_after_an_error() -> None:
    on, _ = _twins("gradient_checkpointing")
    fail = False

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if fail:
            raise RuntimeError("the loss failed")
        return LOSS(outputs, targets)

    op = HessianOperator(on, loss, _data())
    fail = True
    with pytest.raises(RuntimeError, match="the loss failed"):
        op @ np.ones(op.shape[0])
    assert on.gradient_checkpointing is True


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_other_non_reentrant_checkpointing_is_refused_when_the_operator_is_built(mode) -> None:
    torch.manual_seed(0)
    model = AlwaysCheckpointed(reentrant=False).double().train(mode == "train")
    before = model_state(model)
    for build in (
        lambda: HessianOperator(model, LOSS, _data()),
        lambda: GGNOperator(model, LOSS, _data()),
        lambda: FisherOperator(model, LOSS, _data()),
    ):
        with pytest.raises(RuntimeError) as info:
            build()
        assert str(info.value) == CHECKPOINTING_REFUSED
    assert "torch.utils.checkpoint" in CHECKPOINTING_REFUSED
    assert state_differences(before, model) == []


def test_reentrant_checkpointing_is_refused_and_the_message_says_what_to_do() -> None:
    torch.manual_seed(0)
    model = AlwaysCheckpointed(reentrant=True).double()
    op = HessianOperator(model, LOSS, _data())
    with (
        pytest.warns(UserWarning, match="None of the inputs have requires_grad"),
        pytest.raises(UntrackedParameterError, match="without checkpointing") as info,
    ):
        op @ np.ones(op.shape[0])
    assert "'block.linear.weight'" in str(info.value)


def test_a_callers_outer_saved_tensors_hooks_still_work() -> None:
    """Only hooks entered *inside* the forward pass are refused: a caller's
    ``save_on_cpu()`` around the products packs and unpacks the same tensors."""
    _, off = _twins("gradient_checkpointing")
    data = _data()
    v = np.random.default_rng(4).standard_normal(sum(p.numel() for p in off.parameters()))
    expected = HessianOperator(off, LOSS, data) @ v
    with torch.autograd.graph.save_on_cpu():
        got = HessianOperator(off, LOSS, data) @ v
    np.testing.assert_array_equal(got, expected)
