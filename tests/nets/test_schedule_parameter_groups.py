"""The learning-rate schedule keeps each parameter group's ratio to the first group (every
group got the first group's rate: groups at 0.1 and 0.001 both trained at 0.1), in a new
run and after resuming."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nets import load_dataset, train_network
from nets.schedules import get_schedule
from nets.training import LearningRateSchedule


def groups_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.SGD(
        [{"params": net[1].parameters(), "lr": 0.1}, {"params": net[3].parameters(), "lr": 0.001}]
    )
    return net, opt


def test_each_group_keeps_its_ratio(tmp_path: Path) -> None:
    net, opt = groups_optimizer()
    seen: list[tuple[float, ...]] = []
    step = opt.step

    def recording_step(*args: object, **kwargs: object) -> object:
        seen.append(tuple(float(g["lr"]) for g in opt.param_groups))
        return step(*args, **kwargs)

    opt.step = recording_step  # type: ignore[method-assign]
    train_network(
        tmp_path, load_dataset("digits"), model=net, optimizer=opt, epochs=3, progress=False,
        save_freq=None,
    )  # fmt: skip
    assert seen[0] == (0.1, 0.001)
    for first, second in seen:
        assert second == pytest.approx(first / 100, rel=1e-15)
    assert seen[-1][0] < 0.1  # the schedule did move


def test_a_checkpoint_without_initial_rates_resumes_on_schedule() -> None:
    """Rates already scheduled (a checkpoint written before initial_lr was kept) are
    taken back to their initial values through the first group's factor."""
    schedule = LearningRateSchedule(get_schedule("linear"), 10, 0.1)
    _, opt = groups_optimizer()
    lr6 = schedule(6)
    assert lr6 is not None and lr6 < 0.1
    for g, base in zip(opt.param_groups, (0.1, 0.001)):
        g["lr"] = base * schedule(5) / 0.1  # as scheduled at epoch 5, no initial_lr
    schedule.apply(opt, 6)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr6, rel=1e-15)
    assert opt.param_groups[1]["lr"] == pytest.approx(lr6 / 100, rel=1e-15)
