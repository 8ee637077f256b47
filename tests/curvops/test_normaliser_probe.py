"""A plain-function loss that is not a mean over its samples is refused when batches combine.

Before: a plain function is assumed to divide by its number of samples, silently.  A
``reduction="sum"`` inside a lambda over two unequal batches gave a Hessian 62.8 % off
(two equal batches: exactly half the true one); ``F.gaussian_nll_loss(..., full=True,
reduction="sum")`` 39 % (Hessian) and 36 % (GGN); a per-token mean with its own padding
value weighted batches by samples.  Now the loss is evaluated on the halves of the first
batch's outputs (:func:`curvops.validation.check_samples_normaliser`) and refused, naming
``loss_fn`` and the remedy, unless declared (:func:`curvops.losses.declare_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvops import FisherOperator, GGNOperator, HessianOperator, KFACOperator
from curvops.diagonal import ggn_diagonal
from curvops.losses import declare_loss
from curvops.stats import loss_stats
from curvops.testing import dense_hessian

DT = torch.float64


def _net(out: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)).to(DT)


def _batches(sizes: tuple[int, ...] = (5, 2), out: int = 1) -> list[tuple[torch.Tensor, Any]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 3, dtype=DT, generator=gen), torch.randn(n, out, dtype=DT, generator=gen))
        for n in sizes
    ]


def _summed(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y, reduction="sum")


def _in_batch_contrast(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each sample's output against every target of its batch (in-batch negatives)."""
    scores = out @ y.T
    return F.cross_entropy(scores, torch.arange(out.shape[0]))


BUILDERS: dict[str, Callable[[nn.Module, Any, Any], Any]] = {
    "hessian": lambda m, f, d: HessianOperator(m, f, d),
    "ggn": lambda m, f, d: GGNOperator(m, f, d),
    "fisher": lambda m, f, d: FisherOperator(m, f, d, kind="empirical"),
    "kfac": lambda m, f, d: KFACOperator(m, f, d, fisher="empirical"),
    "diagonal": lambda m, f, d: ggn_diagonal(m, f, d, method="exact"),
    "stats": lambda m, f, d: loss_stats(m, f, d, num_probes=0),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_sum_inside_a_function_is_refused_over_several_batches(kind: str) -> None:
    build = BUILDERS[kind]
    with pytest.raises(
        ValueError, match=r"Argument 'loss_fn': expected a loss normalised by its number of"
    ) as info:
        build(_net(), _summed, _batches())
    message = str(info.value)
    assert "declare_loss" in message and "a sum" in message
    build(_net(), _summed, _batches()[0])  # one batch: the loss as written, accepted


def test_declared_sum_equals_the_torch_sum_and_the_concatenated_batch() -> None:
    net, batches = _net(), _batches()
    declared = declare_loss(_summed, reduction="sum")
    got = HessianOperator(net, declared, batches).to_dense().numpy()
    ref = HessianOperator(net, nn.MSELoss(reduction="sum"), batches).to_dense().numpy()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    whole = dense_hessian(net, _summed, (x, y)).numpy()
    scale = np.abs(whole).max()
    # a product sums the batches' exact float64 Hessians: rounding of a few eps * ||H||
    assert np.abs(got - whole).max() <= 1e-12 * scale
    assert np.abs(ref - whole).max() <= 1e-12 * scale


def test_gaussian_nll_summed_inside_a_function_is_refused() -> None:
    net = _net(out=2)
    batches = _batches(out=1)

    def gnll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mean, log_var = out[:, :1], out[:, 1:]
        return F.gaussian_nll_loss(mean, y, log_var.exp(), full=True, reduction="sum")

    with pytest.raises(ValueError, match="expected a loss normalised by its number of samples"):
        GGNOperator(net, gnll, batches)


def test_per_sample_means_pass_and_combine_exactly() -> None:
    net, batches = _net(out=2), _batches(out=1)

    def gnll(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mean, log_var = out[:, :1], out[:, 1:]
        return F.gaussian_nll_loss(mean, y, log_var.exp(), full=True)

    got = HessianOperator(net, gnll, batches).to_dense().numpy()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    whole = dense_hessian(net, gnll, (x, y)).numpy()
    assert np.abs(got - whole).max() <= 1e-12 * np.abs(whole).max()


def test_a_per_token_mean_with_its_own_padding_value_is_refused() -> None:
    """Targets padded with 0 (not -100, which an earlier check recognises) and a lambda
    averaging over the non-padding tokens: a mean over counted tokens, not samples."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6)).to(DT)
    tokens = torch.randint(1, 6, (4, 5))
    targets = torch.randint(1, 6, (4, 5))
    targets[0, 1:] = 0  # padding value 0
    per_token = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=0)  # noqa: E731
    batches = [(tokens[:2], targets[:2]), (tokens[2:], targets[2:])]
    with pytest.raises(ValueError, match=r"on its first 1 and last 1"):
        HessianOperator(net, per_token, batches)
    declared = declare_loss(per_token, normaliser="targets", ignore_index=0)
    got = HessianOperator(net, declared, batches).to_dense().numpy()
    whole = dense_hessian(net, per_token, (tokens, targets)).numpy()
    assert np.abs(got - whole).max() <= 1e-12 * np.abs(whole).max()


def test_a_loss_coupling_its_samples_needs_an_explicit_normaliser() -> None:
    net = _net(out=2)
    batches = _batches((4, 4), out=2)
    loader = DataLoader(
        TensorDataset(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])),
        batch_size=4,
    )
    for data in (batches, loader):
        with pytest.raises(ValueError, match="normaliser='samples' accepts a loss coupling"):
            HessianOperator(net, _in_batch_contrast, data)
    H = HessianOperator(net, declare_loss(_in_batch_contrast, normaliser="samples"), batches)
    parts = [dense_hessian(net, _in_batch_contrast, b).numpy() for b in batches]
    ref = 0.5 * (parts[0] + parts[1])  # equal batches: the mean of the batch losses
    assert np.abs(H.to_dense().numpy() - ref).max() <= 1e-12 * np.abs(ref).max()


def test_the_probe_leaves_losses_it_cannot_split_alone() -> None:
    """A loss that raises on a half batch, outputs without the samples in dimension 0:
    not probed (nothing learnt), and the operator is built."""
    net, batches = _net(), _batches((4, 4))

    def needs_four(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.shape[0] != 4:
            raise RuntimeError("needs 4")
        return F.mse_loss(out, y)

    HessianOperator(net, needs_four, batches)

    class SamplesLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).T  # [1, N]

    HessianOperator(SamplesLast(), lambda o, y: F.mse_loss(o.T, y), batches)
