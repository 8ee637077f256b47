"""Learning rates the schedule sets (an adversarial sweep of ``train_network`` found each of
these; every test below but the last two fails on the code before the fix):

* a first parameter group at ``lr=0`` (a frozen layer) stopped every group from training:
  the rates were scaled by ``initial_lr / lr0`` only when ``lr0 > 0``, and otherwise every
  group got the first group's rate, 0;
* an optimiser that already had ``initial_lr`` in its groups (a PyTorch scheduler's, or an
  earlier ``train_network`` call's on the same optimiser) trained from that stale rate:
  ``lr0 = 0.01`` recorded, 0.1 trained;
* ``swa_lr`` with ``schedule=None`` was recorded in the run's configuration and ignored;
* a custom schedule's rates were never checked: -0.1 ran gradient ascent silently, NaN and
  inf failed as a "non-finite loss" naming no argument, ``None`` as a raw ``float()``
  ``TypeError``; ``swa_lr=inf`` passed ``not lr > 0``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn

from nets import load_dataset, train_network
from nets.schedules import get_schedule, linear_schedule
from nets.training import LearningRateSchedule, SWAConfig, swa_config


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _recording(opt: torch.optim.Optimizer) -> list[tuple[float, ...]]:
    """The groups' rates at every optimiser step."""
    seen: list[tuple[float, ...]] = []
    step = opt.step

    def recording_step(*args: Any, **kwargs: Any) -> Any:
        seen.append(tuple(float(g["lr"]) for g in opt.param_groups))
        return step(*args, **kwargs)

    opt.step = recording_step  # type: ignore[method-assign]
    return seen


def _quiet(**kw: Any) -> dict[str, Any]:
    return {"progress": False, "device": "cpu", "save_freq": None, **kw}


def _untouched(directory: Path) -> bool:
    return not directory.exists() or not any(directory.iterdir())


def test_a_frozen_first_group_leaves_the_other_groups_training(tmp_path: Path, digits: Any) -> None:
    net = _net()
    first, last = cast(nn.Linear, net[1]), cast(nn.Linear, net[3])
    opt = torch.optim.SGD(
        [{"params": first.parameters(), "lr": 0.0}, {"params": last.parameters(), "lr": 0.1}]
    )
    frozen, trained = first.weight.detach().clone(), last.weight.detach().clone()
    seen = _recording(opt)
    result = train_network(
        tmp_path, digits, model=net, optimizer=opt, epochs=4, batch_size=512, **_quiet()
    )
    per_epoch = sorted(set(seen), key=lambda rates: -rates[1])
    expected = [(0.0, linear_schedule(e, 4, 0.1)) for e in range(4)]
    assert per_epoch == sorted(set(expected), key=lambda rates: -rates[1])
    assert seen[0] == (0.0, 0.1)
    assert torch.equal(first.weight, frozen)  # frozen stays frozen
    assert not torch.equal(last.weight, trained)  # (before: no group trained)
    assert [e["lr"] for e in result.stats] == [0.0] * 4  # stats report the first group


def test_each_group_is_scheduled_from_its_own_initial_rate() -> None:
    schedule = LearningRateSchedule(get_schedule("linear"), 10, 0.0)
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.0}, {"params": [b], "lr": 0.1}])
    for epoch in range(10):
        schedule.apply(opt, epoch)
        assert [g["lr"] for g in opt.param_groups] == [0.0, linear_schedule(epoch, 10, 0.1)]
    # with SWA the groups keep their ratio to the first group, which ends at swa_lr itself
    swa = LearningRateSchedule(get_schedule("linear"), 10, 0.1, SWAConfig(start=6, lr=0.02))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.001}])
    for epoch in range(10):
        swa.apply(opt, epoch)
        first, second = (g["lr"] for g in opt.param_groups)
        assert first == swa(epoch) and second == pytest.approx(first / 100, rel=1e-14)
    assert first == 0.02


def test_a_stale_initial_rate_in_the_optimizer_is_not_trained_from(
    tmp_path: Path, digits: Any, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="nets.training")
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt.step()
    scheduler.step()  # lr 0.01, initial_lr 0.1
    seen = _recording(opt)
    result = train_network(
        tmp_path / "a", digits, model=net, optimizer=opt, epochs=2, schedule="constant",
        batch_size=512, **_quiet(),
    )  # fmt: skip
    lr0 = result.config["lr0"]
    assert lr0 == pytest.approx(0.01)
    assert set(seen) == {(lr0,)} and [e["lr"] for e in result.stats] == [lr0, lr0]
    assert "initial_lr 0.1 (from an earlier schedule) replaced" in caplog.text
    # the same optimiser again (continuing elsewhere): its rate now, not the first run's
    opt.param_groups[0]["lr"] = 0.03
    seen.clear()
    again = train_network(
        tmp_path / "b", digits, model=net, optimizer=opt, epochs=2, schedule="constant",
        batch_size=512, **_quiet(),
    )  # fmt: skip
    assert again.config["lr0"] == 0.03 and set(seen) == {(0.03,)}


def test_a_resumed_run_takes_its_initial_rates_from_the_checkpoint(
    tmp_path: Path, digits: Any
) -> None:
    def run(directory: Path, epochs: int, **kw: Any) -> Any:
        net = _net()
        opt = torch.optim.SGD(
            [{"params": net[1].parameters(), "lr": 0.1},
             {"params": net[3].parameters(), "lr": 0.01}]
        )  # fmt: skip
        for group in opt.param_groups:
            group["initial_lr"] = 5.0  # stale: a scheduler's, never trained from
        return train_network(
            directory, digits, model=net, optimizer=opt, epochs=epochs, batch_size=512,
            progress=False, device="cpu", save_freq=1, **kw,
        )  # fmt: skip

    straight = run(tmp_path / "straight", 4)
    resumed = run(tmp_path / "straight", 4, resume=tmp_path / "straight" / "checkpoint-00002.pt")
    assert [e["lr"] for e in resumed.stats] == [e["lr"] for e in straight.stats]
    assert [e["train_loss"] for e in resumed.stats] == [e["train_loss"] for e in straight.stats]
    assert [g["initial_lr"] for g in resumed.optimizer.param_groups] == [0.1, 0.01]


def test_swa_lr_without_a_schedule_is_refused(tmp_path: Path, digits: Any) -> None:
    with pytest.raises(ValueError, match=r"Argument 'swa_lr'.*schedule=None.*received 0\.001"):
        train_network(
            tmp_path / "run", digits, model=_net(), epochs=4, swa=True, swa_start=2,
            swa_lr=0.001, schedule=None, **_quiet(),
        )  # fmt: skip
    assert _untouched(tmp_path / "run")
    # without swa_lr: the rates are left alone, and the configuration records no SWA rate
    result = train_network(
        tmp_path / "ok", digits, model=_net(), epochs=3, swa=True, swa_start=2, schedule=None,
        batch_size=512, optimizer_kwargs={"lr": 0.05}, **_quiet(),
    )  # fmt: skip
    assert [e["lr"] for e in result.stats] == [0.05] * 3
    assert result.config["swa_lr"] is None and result.swa_model is not None
    recorded = json.loads((tmp_path / "ok" / "stats.json").read_text())["config"]
    assert recorded["swa_lr"] is None


@pytest.mark.parametrize(
    ("returned", "kind"),
    [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     (None, TypeError), ("0.1", TypeError)],
)  # fmt: skip
def test_a_schedule_returning_no_usable_rate_is_refused_before_training(
    tmp_path: Path, digits: Any, returned: Any, kind: type[Exception]
) -> None:
    def schedule(epoch: int, total: int, lr0: float, ratio: float) -> Any:
        return lr0 if epoch < 2 else returned  # bad from epoch 3 on

    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(kind, match=r"Argument 'schedule'.*finite, non-negative.*\(epoch 3\)"):
        train_network(tmp_path / "run", digits, model=net, epochs=4, schedule=schedule, **_quiet())
    assert _untouched(tmp_path / "run")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_a_schedule_that_cannot_take_the_four_arguments_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"Argument 'schedule'.*f\(epoch, total_epochs, lr0"):
        train_network(tmp_path, "digits", model="MLP", epochs=1, schedule=lambda e, t: 0.1)
    assert not any(tmp_path.iterdir())


def test_an_infinite_swa_lr_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Argument 'swa_lr'.*finite.*received inf"):
        swa_config(True, 2, float("inf"), 1, epochs=4, lr0=0.1)
    with pytest.raises(TypeError, match=r"Argument 'swa_lr'"):
        swa_config(True, 2, "0.01", 1, epochs=4, lr0=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Argument 'swa_lr'.*first parameter group"):
        swa_config(True, 2, 0.01, 1, epochs=4, lr0=0.0)  # group 0 frozen: no ratio


def test_the_paper_schedules_still_give_the_first_groups_rates() -> None:
    """(Passes before and after: the first group's rates are bit-identical.)"""
    fn = get_schedule("linear")
    plain = LearningRateSchedule(fn, 10, 0.1)
    assert [plain(e) for e in range(10)] == [fn(e, 10, 0.1, 0.01) for e in range(10)]
    swa = LearningRateSchedule(fn, 10, 0.1, SWAConfig(start=6, lr=0.02))
    assert swa(6) == swa(9) == 0.02 and swa(5) == fn(5, 6, 0.1, 0.02 / 0.1)


def test_a_checkpoint_without_initial_rates_still_resumes_on_schedule() -> None:
    """(Passes before and after.)  Rates already scheduled by the first group's factor."""
    schedule = LearningRateSchedule(get_schedule("linear"), 10, 0.1)
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.001}])
    factor = linear_schedule(7, 10, 1.0)
    for group, base in zip(opt.param_groups, (0.1, 0.001)):
        group["lr"] = base * factor
    schedule.apply(opt, 8)
    assert opt.param_groups[0]["lr"] == pytest.approx(linear_schedule(8, 10, 0.1), rel=1e-14)
    assert opt.param_groups[1]["lr"] == pytest.approx(linear_schedule(8, 10, 0.001), rel=1e-14)
