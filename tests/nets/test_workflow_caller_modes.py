"""``bn_mode=None`` means each module's own mode -- the caller's, also on a copy.

The workflows work on a copy of the caller's module whenever a checkpoint is loaded or
the module must move (and ``compute_loss_stats`` always), and that copy was put in eval
mode: a module in train mode was measured with eval-mode BatchNorm (top eigenvalue 0.87
instead of 5.0 in the sweep that found it) while the file said ``bn_mode='none'``.
Evaluations (train/test loss and accuracy) still run in eval mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from nets import compute_block_spectra, compute_eigenspectrum, compute_loss_stats
from nets.checkpoint import save_checkpoint


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        net[1].running_mean.copy_(torch.linspace(-0.5, 0.5, 6))
        net[1].running_var.copy_(torch.linspace(0.5, 1.5, 6))
    return net


def _dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(40, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (40,), generator=g),
    )


def _top(mode: str | None, net: nn.Module, checkpoint: Path | None) -> float:
    size = sum(p.numel() for p in net.parameters())
    result = compute_eigenspectrum(
        _dataset(), model=net, checkpoint_path=checkpoint, lanczos_iters=size, bn_mode=mode,
        batch_size=16, device="cpu",
    )  # fmt: skip
    return float(result.values[-1])


@pytest.mark.parametrize("training", [True, False], ids=["train-mode module", "eval-mode module"])
def test_bn_mode_none_measures_the_callers_modes_with_or_without_a_checkpoint(
    tmp_path: Path, training: bool
) -> None:
    net = _model().train(training)
    checkpoint = tmp_path / "same-weights.pt"
    save_checkpoint(checkpoint, net, None, 1, {})
    explicit = _top("train" if training else "eval", net, None)
    other = _top("eval" if training else "train", net, None)
    assert abs(explicit - other) > 0.1 * abs(explicit)  # the two modes really differ here
    for path in (None, checkpoint):
        assert _top(None, net, path) == pytest.approx(explicit, rel=1e-10)
    blocks = compute_block_spectra(
        _dataset(), model=net, checkpoint_path=checkpoint, lanczos_iters=27, bn_mode=None,
        batch_size=16, device="cpu",
    )  # fmt: skip
    reference = compute_block_spectra(
        _dataset(), model=net, lanczos_iters=27, bn_mode="train" if training else "eval",
        batch_size=16, device="cpu",
    )  # fmt: skip
    assert blocks.blocks["0"].top == pytest.approx(reference.blocks["0"].top, rel=1e-10)
    assert all(m.training == training for m in net.modules())  # the caller's module untouched


def test_loss_stats_statistics_in_the_callers_modes_and_metrics_in_eval_mode() -> None:
    net = _model().train()
    net[2].eval()  # a mixed setting must survive too
    size = sum(p.numel() for p in net.parameters())
    direction = np.zeros(size)
    direction[5] = 1.0
    rows = {
        mode: compute_loss_stats(
            _dataset(),
            model=net,
            batch_size=16,
            direction=direction,
            bn_mode=mode,
            frobenius_probes=0,
            device="cpu",
        )
        for mode in ("train", "eval", None)
    }
    assert rows[None]["hess_mu"][0] == pytest.approx(rows["train"]["hess_mu"][0], rel=1e-10)
    assert abs(rows["eval"]["hess_mu"][0] - rows["train"]["hess_mu"][0]) > 1e-3
    for key in ("train_loss", "train_acc"):  # evaluations: eval mode always
        assert rows[None][key][0] == rows["train"][key][0] == rows["eval"][key][0]
    assert [m.training for m in net.modules()] == [True, True, True, False, True]


def test_training_evaluate_gives_each_submodule_its_mode_back() -> None:
    from torch.utils.data import DataLoader

    from nets.training import evaluate

    net = _model().train()
    net[1].eval()  # a frozen BatchNorm, as in fine-tuning
    evaluate(net, DataLoader(_dataset(), batch_size=8), nn.CrossEntropyLoss())
    assert [m.training for m in net.modules()] == [True, True, False, True, True]
