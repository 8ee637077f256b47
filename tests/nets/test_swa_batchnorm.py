"""SWA's BatchNorm refresh: exact pooled statistics, the caller's random streams untouched.

``torch.optim.swa_utils.update_bn`` weighted every batch equally and averaged the
within-batch variances (``x = 0..9`` in batches of 8 and 2: running mean 6.0 for 4.5,
variance 3.25 for 9.17), and its train-mode pass drew dropout masks from the global
generator, so a run's weights depended on how often it evaluated the average.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

from nets import train_network
from nets.data import load_dataset
from nets.swa import WeightAverager

DT = torch.float64


def _two_bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2), nn.BatchNorm1d(2)
    ).to(DT)


def test_statistics_are_the_exact_mean_and_unbiased_variance_over_unequal_batches() -> None:
    net = _two_bn_net()
    avg = WeightAverager(net)
    avg.update(net)
    x = torch.randn(23, 3, generator=torch.Generator().manual_seed(1), dtype=DT) + 2.0
    batches = [x[:16], x[16:21], x[21:]]
    avg.recompute_bn(batches)
    m = avg.module
    # reference: each batch through the network with batch statistics (train mode)
    firsts, seconds = [], []
    with torch.no_grad():
        for b in batches:
            h = m[0](b)
            firsts.append(h)
            z = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + m[1].eps)
            seconds.append(m[3](torch.tanh(z * m[1].weight + m[1].bias)))
    eps = torch.finfo(DT).eps
    for bn, values in ((m[1], torch.cat(firsts)), (m[4], torch.cat(seconds))):
        torch.testing.assert_close(bn.running_mean, values.mean(0), rtol=100 * eps, atol=1e-14)
        torch.testing.assert_close(bn.running_var, values.var(0), rtol=100 * eps, atol=1e-14)
        assert int(bn.num_batches_tracked) == 3


def test_the_refresh_leaves_the_random_streams_and_modes_and_repeats_exactly() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.BatchNorm1d(8)).to(DT)
    avg = WeightAverager(net)
    avg.update(net)
    avg.module.eval()
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    state = torch.get_rng_state()
    avg.recompute_bn([x[:7], x[7:]])
    assert torch.equal(torch.get_rng_state(), state)
    assert not any(mod.training for mod in avg.module.modules())
    first = avg.module[2].running_var.clone()
    torch.rand(5)  # whatever the caller's stream did in between
    avg.recompute_bn([x[:7], x[7:]])
    assert torch.equal(avg.module[2].running_var, first)


def test_swa_weights_do_not_depend_on_how_often_the_run_evaluates() -> None:
    data = load_dataset("digits", seed=0)
    weights = []
    for eval_freq in (1, 3):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.3), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Linear(16, 10),
        )  # fmt: skip
        with tempfile.TemporaryDirectory() as out:
            result = train_network(
                out, data, model=model, epochs=3, eval_freq=eval_freq, save_freq=None,
                swa=True, swa_start=1, optimizer_kwargs={"lr": 0.05, "batch_size": 256},
                progress=False, device="cpu", seed=3,
            )  # fmt: skip
        weights.append({k: v.clone() for k, v in result.model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
