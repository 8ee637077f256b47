"""Batches padded to their own length (dynamic padding, as Hugging Face's collators make
them): a list or a DataLoader of batches whose sequence lengths differ equals one batch
padded to the longest length, for every operator kind whose weights are the loss's own
normaliser; a plain-function loss (normaliser assumed, not known) and K-FAC (factors
averaged over each batch's positions) refuse such batches with an error naming the
argument, and batches that differ in their number of dimensions or target dtype stay
refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from curvops import FisherOperator, GGNOperator, HessianOperator, KFACOperator
from curvops.data import as_data
from curvops.diagonal import ggn_diagonal
from curvops.losses import batch_weight, declare_loss, sequence_cross_entropy
from curvops.stats import loss_stats

V, D, LONGEST = 5, 4, 7  # vocabulary, width, longest sequence
PAD = 0


class CausalLM(nn.Module):
    """Token and position embeddings, one causal attention layer, a head: logits at a
    position depend on the tokens up to it only, so right-padding changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(LONGEST, D)
        self.block = nn.TransformerEncoderLayer(D, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(t))
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=h.dtype)
        return self.head(self.block(h, src_mask=mask, is_causal=True))


def sequences(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seven sequences of lengths 2..7 (ids, next-token targets, some ignored)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in (5, 2, 3, 7, 4, 6, 3):
        ids = torch.randint(1, V, (length,), generator=g)
        targets = torch.randint(0, V, (length,), generator=g)
        targets[torch.rand(length, generator=g) < 0.2] = -100
        out.append((ids, targets))
    return out


def collate(
    items: list[tuple[torch.Tensor, torch.Tensor]], ignore: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the batch's own longest sequence (ids with PAD, targets with ``ignore``)."""
    t = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), t), PAD)
    targets = torch.full((len(items), t), ignore)
    for i, (a, b) in enumerate(items):
        ids[i, : len(a)], targets[i, : len(b)] = a, b
    return ids, targets


SPLIT = ((0, 2), (2, 5), (5, 7))  # batches of 2, 3 and 2 sequences


def dynamic() -> list[tuple[torch.Tensor, torch.Tensor]]:
    seqs = sequences()
    batches = [collate(seqs[a:b]) for a, b in SPLIT]
    assert len({b[0].shape[1] for b in batches}) == 3  # three different lengths
    return batches


def padded() -> tuple[torch.Tensor, torch.Tensor]:
    return collate(sequences())


def close(a: Any, b: Any, tol: float = 1e-10) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max()) <= tol * max(1.0, float(np.abs(b).max()))


LOSSES = {
    "sequence_cross_entropy": sequence_cross_entropy,
    "declared-targets": lambda: declare_loss(
        lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()), normaliser="targets"
    ),
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_dynamically_padded_batches_equal_one_padded_batch(loss: str) -> None:
    model, loss_fn = CausalLM().double(), LOSSES[loss]()
    model.eval()
    batches, whole = dynamic(), padded()
    P = sum(p.numel() for p in model.parameters())
    R = np.random.default_rng(3).standard_normal((P, 3))
    builds = [
        lambda d: HessianOperator(model, loss_fn, d),
        lambda d: GGNOperator(model, loss_fn, d),
        lambda d: FisherOperator(model, loss_fn, d, kind="empirical"),
    ]
    for build in builds:
        assert close(build(batches) @ R, build(whole) @ R)
    loader = DataLoader(sequences(), batch_size=3, collate_fn=collate)  # 3, 3, 1 sequences
    assert len({b[0].shape[1] for b in loader}) > 1
    assert close(
        HessianOperator(model, loss_fn, loader) @ R, HessianOperator(model, loss_fn, whole) @ R
    )
    assert close(
        ggn_diagonal(model, loss_fn, batches).numpy(), ggn_diagonal(model, loss_fn, whole).numpy()
    )
    z = np.random.default_rng(0).standard_normal(P)
    parts, one = (loss_stats(model, loss_fn, d, z=z, num_probes=0) for d in (batches, whole))
    assert abs(parts.loss_mean - one.loss_mean) <= 1e-12 * abs(one.loss_mean)
    assert abs(parts.hess_mu - one.hess_mu) <= 1e-10 * max(1.0, abs(one.hess_mu))


def test_padding_positions_change_nothing_in_the_oracle() -> None:
    """The oracle is sound: the padded batch's loss is the mean over the counted tokens of
    the sequences alone, and weighting the dynamic batches by samples would be wrong."""
    model, loss_fn = CausalLM().double().eval(), sequence_cross_entropy()
    with torch.no_grad():
        ids, targets = padded()
        whole = float(loss_fn(model(ids), targets))
        terms = [
            F.cross_entropy(model(a[None])[0], b, ignore_index=-100, reduction="sum")
            for a, b in sequences()
        ]
    counted = sum(int((b != -100).sum()) for _, b in sequences())
    assert abs(whole - float(sum(terms)) / counted) <= 1e-13
    batches = dynamic()
    by_samples = declare_loss(loss_fn, normaliser="samples")
    H = HessianOperator(model, loss_fn, padded())
    wrong = HessianOperator(model, by_samples, batches)
    R = np.random.default_rng(1).standard_normal((H.shape[0], 2))
    assert not close(wrong @ R, H @ R, 1e-3)


def positionwise() -> tuple[nn.Module, list[Any], tuple[torch.Tensor, torch.Tensor]]:
    """A model of [B, T, 3] -> [B, T], batches with T = 5, 1, 4, and the same elements as
    one batch of single positions ([M, 1, 3] -> [M, 1])."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(-2)).double()
    g = torch.Generator().manual_seed(2)
    batches = [
        (
            torch.randn(b, t, 3, generator=g, dtype=torch.float64),
            torch.randn(b, t, generator=g, dtype=torch.float64),
        )
        for b, t in ((2, 5), (3, 1), (1, 4))
    ]
    x = torch.cat([b[0].reshape(-1, 1, 3) for b in batches])
    y = torch.cat([b[1].reshape(-1, 1) for b in batches])
    return model, batches, (x, y)


def test_elementwise_losses_weight_by_elements() -> None:
    """MSE over [B, T] outputs with T per batch: the mean over every element."""
    model, batches, whole = positionwise()
    assert batch_weight(nn.MSELoss(), None, batches[0][1], 2) == 10.0
    P = sum(p.numel() for p in model.parameters())
    R = np.random.default_rng(0).standard_normal((P, 2))
    for loss_fn in (nn.MSELoss(), nn.L1Loss(), nn.SmoothL1Loss(beta=0.5)):
        builds: list[Any] = [HessianOperator]
        if not isinstance(loss_fn, nn.L1Loss):  # (L1: piecewise linear, no GGN)
            builds.append(GGNOperator)
        for build in builds:
            assert close(build(model, loss_fn, batches) @ R, build(model, loss_fn, whole) @ R)
        # the empirical Fisher's terms are whole samples (gradients summed over their
        # positions), so the one-position batch is another matrix: the list is the
        # element-weighted mean of its batches' matrices
        fisher = [FisherOperator(model, loss_fn, d, kind="empirical") @ R for d in batches]
        weights = [b[1].numel() for b in batches]
        mean = sum(w * f for w, f in zip(weights, fisher)) / sum(weights)
        assert close(FisherOperator(model, loss_fn, batches, kind="empirical") @ R, mean)
        by_samples = sum(b[1].shape[0] * f for b, f in zip(batches, fisher)) / 6
        assert not close(by_samples, mean, 1e-3)


def test_plain_function_loss_over_dynamic_batches_is_refused() -> None:
    model = CausalLM().double().eval()
    opaque = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())  # noqa: E731
    seqs = [(ids, targets.clamp(min=0)) for ids, targets in sequences()]  # every token counts
    batches = [collate(seqs[a:b], ignore=0) for a, b in SPLIT]
    with pytest.raises(
        ValueError,
        match=r"loss_fn.*batch 1 has input / target shapes \(7,\) / \(7,\).*declare_loss",
    ):
        HessianOperator(model, opaque, batches)
    loader = DataLoader(seqs, batch_size=3, collate_fn=lambda items: collate(items, ignore=0))
    op = GGNOperator(model, opaque, loader)  # a loader's batches are checked on its first pass
    with pytest.raises(ValueError, match=r"loss_fn.*past the sample dimension"):
        op @ np.ones(op.shape[0])
    with pytest.raises(ValueError, match=r"loss_fn.*past the sample dimension"):
        ggn_diagonal(model, opaque, loader)
    # declared, the same batches are accepted
    declared = declare_loss(opaque, normaliser=lambda inputs, y: y.numel())
    one = collate(seqs, ignore=0)
    R = np.random.default_rng(0).standard_normal((op.shape[0], 2))
    # (the padded single batch counts padding positions, so compare with a declared
    # sum over the dynamic batches' own elements, normalised by their count)
    parts = GGNOperator(model, declared, batches) @ R
    summed = declare_loss(
        lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum"),
        reduction="sum",
    )
    total = sum(b[1].numel() for b in batches)
    assert close(parts, GGNOperator(model, summed, batches) @ R / total)
    assert one[1].numel() > total  # (the padded batch would be another loss)
    # batches of one length are accepted under the plain function (weights by samples
    # are exact up to one constant, the documented contract of a plain function)
    HessianOperator(model, opaque, [(one[0][:3], one[1][:3]), (one[0][3:], one[1][3:])])


def test_kfac_refuses_batches_of_different_lengths() -> None:
    model, batches, (x, y) = positionwise()
    v = np.ones(sum(p.numel() for p in model.parameters()))
    for approx in ("expand", "reduce"):
        one_length = [(x[:4], y[:4]), (x[4:], y[4:])]
        assert np.isfinite(KFACOperator(model, nn.MSELoss(), one_length, approx=approx) @ v).all()
        with pytest.raises(ValueError, match=r"data \(batch 1\).*give batches of one length"):
            KFACOperator(model, nn.MSELoss(), batches, approx=approx) @ v


def test_batches_must_still_agree_in_dimensions_and_target_dtype() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"data \(batch 1\).*number of input/target dimensions"):
        as_data(
            [
                (x, torch.zeros(2, dtype=torch.long)),
                (torch.zeros(2, 3, 1), torch.zeros(2, dtype=torch.long)),
            ]
        )
    with pytest.raises(ValueError, match=r"data \(batch 1\).*target dtype"):
        as_data([(x, torch.zeros(2, dtype=torch.long)), (x, torch.zeros(2))])
    with pytest.raises(ValueError, match=r"data \(batch 1\).*dimensions"):
        list(as_data(DataLoader([(torch.zeros(3), 0), (torch.zeros(3, 1), 1)], batch_size=1)))


def test_loss_stats_cutting_a_loader_checks_its_batches() -> None:
    """With batch_size= the loader's batches were not checked: a plain per-token loss over
    dynamically padded batches was weighted by samples (loss_mean 1.48291 for 1.49223)."""
    model = CausalLM().double().eval()
    opaque = lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())  # noqa: E731
    seqs = [(ids, targets.clamp(min=0)) for ids, targets in sequences()]
    loader = DataLoader(seqs, batch_size=3, collate_fn=lambda items: collate(items, ignore=0))
    for cut in (None, 2):
        with pytest.raises(ValueError, match=r"loss_fn.*past the sample dimension"):
            loss_stats(model, opaque, loader, batch_size=cut, num_probes=0)
    ce = sequence_cross_entropy()
    whole = loss_stats(
        model, ce, padded(), num_probes=0, z=np.ones(sum(p.numel() for p in model.parameters()))
    )
    cut = loss_stats(
        model,
        ce,
        DataLoader(sequences(), batch_size=3, collate_fn=collate),
        batch_size=2,
        num_probes=0,
        z=np.ones(sum(p.numel() for p in model.parameters())),
    )
    assert abs(cut.loss_mean - whole.loss_mean) <= 1e-12 * abs(whole.loss_mean)


def test_kl_divergence_normaliser_is_known() -> None:
    from curvops.losses import normaliser_is_known

    assert normaliser_is_known(nn.KLDivLoss(reduction="batchmean"))
    assert normaliser_is_known(nn.KLDivLoss(reduction="mean"))


def test_eigenspectrum_of_a_subsampled_loader_keeps_its_collate() -> None:
    """make_eval_loader rebuilt a subsampled loader without its collate_fn (torch's bare
    'stack expects each tensor to be equal size')."""
    import nets

    model = CausalLM().double().eval()
    loader = DataLoader(sequences(), batch_size=3, collate_fn=collate)
    common = dict(model=model, loss_fn=sequence_cross_entropy(), lanczos_iters=4, bn_mode=None)
    result = nets.compute_eigenspectrum(loader, subsample=5, device="cpu", **common)
    assert np.isfinite(result.values).all() and result.values.size > 0
