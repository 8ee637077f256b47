"""Dicts and lists kept as module attributes: caches are recomputed in every product,
and what a forward pass writes into them is put back (contract 3, nothing changes).

LeViT (Hugging Face's and timm's; also EfficientFormer and TinyViT) caches its attention
biases ``attention_biases[:, idxs]`` in a dict attribute in eval mode.  Before, building
an operator filled that cache with tensors computed from the construction pass's
detached copies, every later product read them, and the Hessian and GGN rows of the
biases were exactly zero, without an error; the user's own eval-mode gradients of the
biases were ``None`` afterwards.  A cache filled by the user under ``no_grad`` gave the
same zero rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator, KFACOperator
from curvops.testing import dense_fisher, dense_ggn, dense_hessian


class BiasedAttention(nn.Module):
    """Attention with learnt relative-position biases, cached in eval mode as LeViT does."""

    def __init__(self, tokens: int, width: int, cached: bool = True) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.attention_biases = nn.Parameter(torch.randn(tokens))
        offsets = (torch.arange(tokens)[:, None] - torch.arange(tokens)[None, :]).abs()
        self.register_buffer("attention_bias_idxs", offsets, persistent=False)
        self.attention_bias_cache: dict[str, torch.Tensor] = {}
        self.cached = cached

    def biases(self, device: torch.device) -> torch.Tensor:
        if self.training or not self.cached:
            return self.attention_biases[self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        scores = q @ k.transpose(-1, -2) + self.biases(x.device)
        return torch.softmax(scores, -1) @ v


def network(cached: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(BiasedAttention(4, 3, cached), nn.Flatten(), nn.Linear(12, 2)).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 4, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])


REFERENCES = {
    "hessian": (lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d), dense_hessian),
    "ggn": (lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d), dense_ggn),
    "ggn-uncached": (
        lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d, cache=False),
        dense_ggn,
    ),
    "fisher": (
        lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), d, kind="empirical"),
        lambda m, loss, d: dense_fisher(m, loss, d, kind="empirical"),
    ),
}


@pytest.mark.parametrize("filled", ["empty", "filled-under-no-grad"])
@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_a_cached_attention_bias_has_its_curvature(kind: str, filled: str) -> None:
    model, uncached = network().eval(), network(cached=False).eval()
    data = batch()
    if filled != "empty":
        with torch.no_grad():
            model(data[0])
    cache = model[0].attention_bias_cache
    before = dict(cache)
    make, dense = REFERENCES[kind]
    op = make(model, data)
    got = op @ np.eye(op.shape[0])
    reference = dense(uncached, nn.CrossEntropyLoss(), data).numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-10, atol=1e-13 * np.abs(reference).max())
    assert np.abs(got[12:16]).max() > 1e-3  # the biases' rows are not zero
    # the cache is as it was: same keys, same tensor objects
    assert cache.keys() == before.keys() and all(cache[k] is before[k] for k in before)
    assert model[0].attention_bias_cache is cache


def test_the_users_gradients_are_untouched_by_an_operator() -> None:
    model, data = network().eval(), batch()
    HessianOperator(model, nn.CrossEntropyLoss(), data) @ np.ones(
        sum(p.numel() for p in model.parameters())
    )
    loss = nn.CrossEntropyLoss()(model(data[0]), data[1])
    (grad,) = torch.autograd.grad(loss, [model[0].attention_biases])
    assert float(grad.abs().max()) > 0


class Recorder(nn.Module):
    """A forward pass that records into a list and counts into a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.records: list[torch.Tensor] = []
        self.counts = {"calls": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        self.records.append(out)
        self.counts["calls"] += 1
        return out


def test_lists_and_dicts_written_by_forward_are_put_back() -> None:
    torch.manual_seed(0)
    model = Recorder().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    model(x)
    records, first = model.records, model.records[0]
    data = (x, torch.tensor([0, 1, 1, 0]))
    for op in (
        HessianOperator(model, nn.CrossEntropyLoss(), data),
        GGNOperator(model, nn.CrossEntropyLoss(), [data, data], cache=False),
        KFACOperator(model, nn.CrossEntropyLoss(), data),
    ):
        op @ np.ones(op.shape[0])
    assert model.records is records and len(records) == 1 and records[0] is first
    assert model.counts == {"calls": 1}


class TrainModeNumpyNoise(nn.Module):
    """Draws from numpy's global generator in training mode only (BigBird's block-sparse
    attention reseeds and permutes with it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + 0.1 * float(np.random.rand()) if self.training else 1.0  # noqa: NPY002
        return self.fc(x) * scale


@pytest.mark.parametrize("kind", ["hessian", "ggn", "kfac"])
def test_checks_run_again_when_the_model_enters_new_modes(kind: str) -> None:
    """Built in eval mode, the operator's one checking forward pass drew nothing; after
    ``model.train()`` products used to run, random, and advance the caller's stream."""
    torch.manual_seed(0)
    model = TrainModeNumpyNoise().double().eval()
    data = (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
    make = {"hessian": HessianOperator, "ggn": GGNOperator, "kfac": KFACOperator}[kind]
    op = make(model, nn.CrossEntropyLoss(), data)
    v = np.ones(op.shape[0])
    evaluated = op @ v
    model.train()
    state = np.random.get_state()[1].copy()  # noqa: NPY002
    with pytest.raises(ValueError, match=r"'model'.*global random generator"):
        op @ v
    assert np.array_equal(np.random.get_state()[1], state)  # noqa: NPY002
    model.eval()
    np.testing.assert_array_equal(op @ v, evaluated)
