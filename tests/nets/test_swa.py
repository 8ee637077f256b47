"""Stochastic weight averaging: the running mean and the recomputed BatchNorm statistics."""

from __future__ import annotations

import torch
from torch import nn

from nets.swa import WeightAverager


def test_average_of_snapshots_is_their_mean():
    net = nn.Linear(3, 2)
    avg = WeightAverager(net)
    snapshots = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(value)
        avg.update(net)
        snapshots.append(value)
    assert avg.n_averaged == 3
    for p in avg.module.parameters():
        assert torch.allclose(p.detach(), torch.full_like(p, sum(snapshots) / 3))


def test_bn_statistics_are_recomputed_over_the_data():
    net = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 1))
    avg = WeightAverager(net)
    avg.update(net)
    data = torch.arange(24, dtype=torch.float32).reshape(12, 2)
    batches = [data[i : i + 4] for i in range(0, 12, 4)]  # equal-size batches
    avg.recompute_bn(batches)
    bn = avg.module[0]
    assert torch.allclose(bn.running_mean, data.mean(0))


def test_state_dict_round_trip():
    net = nn.Linear(2, 2)
    avg = WeightAverager(net)
    avg.update(net)
    other = WeightAverager(nn.Linear(2, 2))
    other.load_state_dict(avg.state_dict())
    assert other.n_averaged == 1
    assert torch.equal(other.module.weight, avg.module.weight)
