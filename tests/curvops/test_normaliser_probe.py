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
    with pytest.raises(ValueError, match=r"on batches 0 and 1 together"):
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


# -- every batch against the first (the second sweep: the first batch alone let these through)


def _ce_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="sum")


def _class_data(sizes: tuple[int, ...], seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, dtype=DT, generator=gen), torch.randint(0, 3, (n,), generator=gen))
        for n in sizes
    ]


def test_a_sum_with_a_first_batch_of_one_sample_is_refused() -> None:
    """Before: 52 % off (a batch of one cannot be halved); a loader of one-sample batches
    was 16 times too small."""
    net = _net(out=3)
    with pytest.raises(ValueError, match=r"on batches 0 and 1 together"):
        HessianOperator(net, _ce_sum, _class_data((1, 7, 8)))
    x = torch.cat([b[0] for b in _class_data((8, 8))])
    y = torch.cat([b[1] for b in _class_data((8, 8))])
    loader = DataLoader(TensorDataset(x, y), batch_size=1)
    with pytest.raises(ValueError, match=r"on batches 0 and 1 together"):
        GGNOperator(net, _ce_sum, loader)


def test_class_weights_with_a_balanced_first_batch_are_refused() -> None:
    """Before: 19 % off (Hessian): the first batch's halves had the same classes."""
    weight = torch.tensor([1.0, 3.0, 0.5], dtype=DT)
    batches = _class_data((4, 4))
    batches[0] = (batches[0][0], torch.tensor([0, 1, 0, 1]))
    batches[1] = (batches[1][0], torch.tensor([2, 2, 2, 1]))
    weighted = lambda out, y: F.cross_entropy(out, y, weight=weight)  # noqa: E731
    with pytest.raises(ValueError, match=r"relative difference"):
        HessianOperator(_net(out=3), weighted, batches)
    from functools import partial

    HessianOperator(_net(out=3), partial(F.cross_entropy, weight=weight), batches)  # known


def test_a_sum_that_vanishes_on_the_first_batch_is_refused() -> None:
    """A squared hinge whose margins the first batch all satisfies: 0 there (nothing to
    learn from its halves), not on the second."""
    hinge = lambda out, y: F.relu(1 - out * y).pow(2).sum()  # noqa: E731
    x = torch.randn(8, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
    net = _net()
    with torch.no_grad():
        first = 1e6 * torch.sign(net(x[:4]))  # every margin out * y of the first batch >= 1
    batches = [(x[:4], first), (x[4:], torch.ones(4, 1, dtype=DT))]
    with torch.no_grad():
        assert float(hinge(net(batches[0][0]), batches[0][1])) == 0.0
    with pytest.raises(ValueError, match=r"on batches 0 and 1 together"):
        HessianOperator(net, hinge, batches)


def test_padding_only_in_later_batches_is_refused() -> None:
    """A per-token mean with pad value 0 (not -100) and an unpadded first batch: 4.7 %."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6)).to(DT)
    tokens = torch.randint(1, 6, (6, 5), generator=torch.Generator().manual_seed(4))
    targets = torch.randint(1, 6, (6, 5), generator=torch.Generator().manual_seed(5))
    targets[3, 2:] = 0
    per_token = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=0)  # noqa: E731
    for data in (
        [(tokens[:3], targets[:3]), (tokens[3:], targets[3:])],
        DataLoader(TensorDataset(tokens, targets), batch_size=3),
    ):
        with pytest.raises(ValueError, match=r"on batches 0 and 1 together"):
            HessianOperator(net, per_token, data)


def test_loss_stats_minibatches_are_checked_too() -> None:
    """``batch_size=`` cuts one batch into minibatches weighted by samples: a sum inside a
    function gave loss_mean 4.21 instead of 16.85."""
    net, (x, y) = _net(out=3), _class_data((16,))[0]
    with pytest.raises(ValueError, match=r"minibatches 0 and 1 of batch 0"):
        loss_stats(net, _ce_sum, (x, y), batch_size=4, num_probes=0)
    whole = loss_stats(net, _ce_sum, (x, y), num_probes=0)  # one batch, as written
    ref = loss_stats(net, nn.CrossEntropyLoss(reduction="sum"), (x, y), num_probes=0)
    assert whole.loss_mean == pytest.approx(ref.loss_mean, rel=1e-12)


def test_flattened_outputs_are_compared_by_concatenation() -> None:
    """``[B T, V]`` outputs of ``[B, T]`` targets: cut in proportion, concatenated as they are."""
    torch.manual_seed(7)
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5)

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e, self.o = emb, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(torch.tanh(self.e(x))).reshape(-1, 5)

    net = Flat().to(DT)
    x = torch.randint(0, 5, (12, 4), generator=torch.Generator().manual_seed(8))
    y = torch.randint(1, 5, (12, 4), generator=torch.Generator().manual_seed(9))
    flat_sum = lambda out, t: F.cross_entropy(out, t.reshape(-1), reduction="sum")  # noqa: E731
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    with pytest.raises(ValueError, match=r"on batches 0 and 1 together"):
        HessianOperator(net, flat_sum, batches)
    with pytest.raises(ValueError, match=r"minibatches 0 and 1 of batch 0"):
        loss_stats(net, flat_sum, (x, y), batch_size=4, num_probes=0)
    flat_mean = lambda out, t: F.cross_entropy(out, t.reshape(-1))  # noqa: E731
    got = HessianOperator(net, flat_mean, batches).to_dense().numpy()
    whole = dense_hessian(net, flat_mean, (x, y)).numpy()
    assert np.abs(got - whole).max() <= 1e-12 * np.abs(whole).max()


@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.bfloat16])
def test_a_loss_computed_in_lower_precision_is_judged_at_its_precision(
    loss_dtype: torch.dtype,
) -> None:
    """Before: float64 outputs with a loss returning float32 were refused in 5 of 10 seeds
    (the tolerance was float64's).  (A loss computing in bfloat16 but returning float32
    is judged at float32's precision: what it computes inside cannot be seen.)"""
    net = _net(out=3)
    low = lambda out, y: F.cross_entropy(out.to(loss_dtype), y)  # noqa: E731
    for seed in range(10):
        HessianOperator(net, low, _class_data((16, 16, 16), seed=seed))


def test_dynamic_padding_with_a_per_sample_loss_is_accepted_and_exact() -> None:
    """A sequence classifier on batches padded to their own lengths: its outputs and targets
    have the same shapes in every batch, so the loss is compared across them, not refused
    for the inputs' shapes (before: refused, naming declare_loss)."""
    torch.manual_seed(5)

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e, self.o = nn.Embedding(7, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.o(torch.tanh(self.e(x)).mean(1))

    net = Classifier().to(DT)
    gen = torch.Generator().manual_seed(6)
    b1 = (torch.randint(0, 7, (4, 5), generator=gen), torch.randint(0, 3, (4,), generator=gen))
    b2 = (torch.randint(0, 7, (4, 3), generator=gen), torch.randint(0, 3, (4,), generator=gen))
    ce = lambda out, y: F.cross_entropy(out, y)  # noqa: E731
    got = HessianOperator(net, ce, [b1, b2]).to_dense().numpy()
    ref = 0.5 * (dense_hessian(net, ce, b1).numpy() + dense_hessian(net, ce, b2).numpy())
    assert np.abs(got - ref).max() <= 1e-12 * np.abs(ref).max()
    # a per-token mean on such batches sees other shapes: refused as before
    with pytest.raises(ValueError, match=r"normaliser is known: batch 1 has input / target"):
        HessianOperator(_TokenLM().to(DT), ce, [(b1[0], b1[0] % 3), (b2[0], b2[0] % 3)])


class _TokenLM(nn.Module):
    """Logits ``[B, V, T]`` per position, for class-dimension-1 cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.e, self.o = nn.Embedding(7, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.e(x))).transpose(1, 2)


# -- the third sweep: a loader's later batches, loss_stats' own minibatches


def test_a_loader_is_compared_batch_by_batch() -> None:
    """Before: only a loader's first two batches were compared; class weights whose first
    two batches had the same classes gave a Hessian 27 % off."""
    weight = torch.tensor([1.0, 3.0, 0.5], dtype=DT)
    x = torch.cat([b[0] for b in _class_data((4, 4, 4))])
    y = torch.tensor([0, 1, 2, 0, 1, 0, 2, 0, 2, 2, 2, 1])  # batches 0, 1 alike; 2 not
    weighted = lambda out, t: F.cross_entropy(out, t, weight=weight)  # noqa: E731
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(ValueError, match=r"on batches 0 and 2 together"):
        HessianOperator(_net(out=3), weighted, loader)


def test_loss_stats_compares_its_own_minibatches() -> None:
    """Before: the halves of the batch had the same classes, the minibatches of 2 not:
    loss_mean 1.3717 instead of 1.3366."""
    weight = torch.tensor([1.0, 3.0, 0.5], dtype=DT)
    x = _class_data((8,))[0][0]
    y = torch.tensor([0, 1, 2, 2, 0, 1, 2, 2])  # halves alike, minibatches of 2 not
    weighted = lambda out, t: F.cross_entropy(out, t, weight=weight)  # noqa: E731
    with pytest.raises(ValueError, match=r"minibatches 0 and 1 of batch 0"):
        loss_stats(_net(out=3), weighted, (x, y), batch_size=2, num_probes=0)
    loss_stats(_net(out=3), weighted, (x, y), batch_size=4, num_probes=0)  # alike: fine
