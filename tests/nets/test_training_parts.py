"""The parts ``train_network`` is composed of, each on its own, and composed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from nets.schedules import get_schedule
from nets.swa import WeightAverager
from nets.training import (
    LearningRateSchedule,
    StatsFile,
    StepProtocol,
    SWAConfig,
    TrainingOptions,
    TrainingRun,
    build_model,
    build_optimizer,
    default_loss,
    evaluation_entry,
    make_loaders,
    resolve_data,
    restore_run,
    run_config,
    run_epoch,
    save_run,
    seeded_global_rng,
    swa_config,
    swa_entry,
    train_epoch,
    train_network,
)

CPU = torch.device("cpu")


def tiny_data():  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return resolve_data((TensorDataset(x, y), TensorDataset(x[:10], y[:10])), None, 0, {})


def net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.2), nn.Linear(5, 3)).double()


def tiny_run(tmp: Path, *, epochs: int = 2, swa: bool = False) -> TrainingRun:
    """A run assembled from the parts, as train_network assembles it."""
    options = TrainingOptions.checked(epochs=epochs, batch_size=16, save_freq=1)
    data = tiny_data()
    model, spec = build_model(net(), data, seed=0, model_kwargs=None, device=CPU)
    opt, name = build_optimizer("SGD", model, {"lr": 0.1, "momentum": 0.9})
    protocol = StepProtocol.of(opt)
    swa_cfg = swa_config(swa, None, None, 1, epochs=epochs, lr0=0.1)
    loss_fn = default_loss(data.task)
    config = run_config(
        spec, model, data, options, protocol, swa_cfg, data_path=None, optimizer_name=name,
        optimizer_kwargs={"lr": 0.1, "momentum": 0.9}, schedule="linear", lr0=0.1,
        loss_fn=loss_fn, device=CPU, swa_c_epochs=1,
    )  # fmt: skip
    loaders = make_loaders(data, options, curvature_step=False, swa=swa)
    schedule = LearningRateSchedule(get_schedule("linear"), epochs, 0.1, swa_cfg)
    averager = WeightAverager(model) if swa else None
    return TrainingRun(
        tmp, data, model, opt, loss_fn, CPU, loaders, options, config, protocol, schedule,
        swa=swa_cfg, averager=averager,
    )  # fmt: skip


def test_options_take_batch_sizes_from_optimizer_kwargs_and_check_values() -> None:
    options = TrainingOptions.checked(
        epochs=4, batch_size=8, save_freq=3, optimizer_kwargs={"lr": 1.0, "batch_size": 32}
    )
    assert (options.batch_size, options.curvature_batch_size) == (32, 32)
    assert TrainingOptions.optimizer_options({"lr": 1.0, "batch_size": 32}) == {"lr": 1.0}
    assert [options.saves_after(d) for d in range(1, 5)] == [False, False, True, True]
    assert [options.evaluates_after(d) for d in (1, 4)] == [True, True]
    with pytest.raises(ValueError, match="epochs"):
        TrainingOptions.checked(epochs=0)
    with pytest.raises(TypeError, match="seed"):
        TrainingOptions.checked(seed=1.5)
    with pytest.raises(ValueError, match="curvature_batch_size"):
        TrainingOptions.checked(curvature_batch_size=0)


def test_swa_config_defaults_and_errors() -> None:
    cfg = swa_config(True, None, None, 2, epochs=10, lr0=0.2)
    assert cfg == SWAConfig(start=5, lr=pytest.approx(0.02), c_epochs=2)
    assert [d for d in range(1, 11) if cfg.averages_after(d)] == [5, 7, 9]
    assert swa_config(False, None, None, 1, epochs=10, lr0=0.2) is None
    with pytest.raises(ValueError, match="swa_start"):
        swa_config(True, 10, None, 1, epochs=10, lr0=0.2)
    with pytest.raises(ValueError, match="swa_lr"):
        swa_config(True, 2, -1.0, 1, epochs=10, lr0=0.2)


def test_step_protocol_model_optimizer_and_loss_builders() -> None:
    w = [nn.Parameter(torch.zeros(2))]
    assert StepProtocol.of(torch.optim.SGD(w, lr=0.1)) == StepProtocol(False, False)
    assert StepProtocol.of(torch.optim.LBFGS(w)) == StepProtocol(False, True)
    data = tiny_data()
    model = net()
    built, spec = build_model(model, data, seed=0, model_kwargs=None, device=CPU)
    assert built is model and spec["model"] is None
    with pytest.raises(ValueError, match="model"):
        build_model("MLP", data, seed=0, model_kwargs=None, device=CPU)
    with pytest.raises(TypeError, match="model"):
        build_model(3, data, seed=0, model_kwargs=None, device=CPU)  # type: ignore[arg-type]
    opt, name = build_optimizer("SGD", model, {"lr": 0.5})
    assert name == "SGD" and opt.param_groups[0]["lr"] == 0.5
    assert build_optimizer(opt, model, {}) == (opt, "SGD")
    with pytest.raises(ValueError, match="optimizer_kwargs"):
        build_optimizer(opt, model, {"lr": 1.0})
    assert isinstance(default_loss("classification"), nn.CrossEntropyLoss)
    assert isinstance(default_loss("regression"), nn.MSELoss)


def test_loaders_are_seeded_and_only_those_needed(tmp_path: Path) -> None:
    data = tiny_data()
    options = TrainingOptions.checked(batch_size=16, seed=3)
    a = make_loaders(data, options, curvature_step=False, swa=False)
    b = make_loaders(data, options, curvature_step=True, swa=True)
    assert a.curvature is None and a.bn is None and a.test is not None
    assert b.curvature is not None and b.bn is not None
    order = [torch.equal(x, y) for (x, _), (y, _) in zip(a.train, b.train, strict=True)]
    assert all(order)


def test_learning_rate_schedule_with_and_without_swa() -> None:
    fn = get_schedule("linear")
    plain = LearningRateSchedule(fn, 10, 0.1)
    assert [plain(e) for e in range(10)] == [fn(e, 10, 0.1, 0.01) for e in range(10)]
    swa = LearningRateSchedule(fn, 10, 0.1, SWAConfig(start=6, lr=0.02))
    assert swa(6) == swa(9) == 0.02 and swa(5) == fn(5, 6, 0.1, 0.2)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.3)
    assert LearningRateSchedule(None, 10, 0.3).apply(opt, 4) == 0.3
    assert plain.apply(opt, 4) == pytest.approx(fn(4, 10, 0.1, 0.01))


def test_seeded_global_rng_is_reproducible_and_restores_the_callers_state() -> None:
    before = torch.get_rng_state()
    draws = []
    for _ in range(2):
        with seeded_global_rng(7, CPU):
            draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(before, torch.get_rng_state())


def test_save_and_restore_a_run(tmp_path: Path) -> None:
    run = tiny_run(tmp_path)
    with seeded_global_rng(0, CPU):
        run_epoch(run, 0)
        path, swa_path = save_run(run, 1)
        assert path == tmp_path / "checkpoint-00001.pt" and swa_path is None
        fresh = tiny_run(tmp_path)
        assert restore_run(fresh, True) == 1
    for a, b in zip(run.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert (
        fresh.optimizer.state_dict()["state"].keys() == run.optimizer.state_dict()["state"].keys()
    )
    with pytest.raises(ValueError, match="resume"):
        restore_run(tiny_run(tmp_path / "empty"), True)


def test_stats_file_round_trip(tmp_path: Path) -> None:
    stats = StatsFile(tmp_path / "stats.json", {"seed": 0})
    stats.write([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}], [{"step": 1}])
    assert stats.read(1) == [{"epoch": 1, "train_loss": 1.0}]
    assert StatsFile(tmp_path / "none.json", {}).read(5) == []


def test_train_epoch_and_evaluation_entry(tmp_path: Path) -> None:
    run = tiny_run(tmp_path)
    before = evaluation_entry(run, run.model)
    with seeded_global_rng(0, CPU):
        entry = train_epoch(run, 0)
    assert set(entry) == {"train_loss", "train_acc", "train_top5", "epoch_time"}
    after = evaluation_entry(run, run.model, "x")
    assert set(after) == {"x_loss", "x_acc", "x_top5"} and after["x_loss"] != before["test_loss"]


def test_swa_entry_averages_when_due(tmp_path: Path) -> None:
    run = tiny_run(tmp_path, epochs=2, swa=True)
    assert run.swa == SWAConfig(start=1, lr=pytest.approx(0.01))
    entry = swa_entry(run, 1, refresh=True)
    assert entry["swa_n_averaged"] == 1 and entry["swa_test_loss"] is not None
    assert swa_entry(tiny_run(tmp_path), 1, refresh=True) == {}


def test_parts_composed_by_hand_equal_train_network(tmp_path: Path) -> None:
    run = tiny_run(tmp_path / "parts")
    with seeded_global_rng(0, CPU):
        entries = [run_epoch(run, epoch) for epoch in range(2)]
    whole = train_network(
        tmp_path / "whole", (run.data.train, run.data.test), model=net(), batch_size=16,
        optimizer_kwargs={"lr": 0.1, "momentum": 0.9}, epochs=2, progress=False, device="cpu",
    )  # fmt: skip
    for mine, theirs in zip(entries, whole.stats, strict=True):
        for key in ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc"):
            assert mine[key] == theirs[key], key
    for a, b in zip(run.model.parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b)
