"""Resuming ``train_network`` with another loss or custom schedule is refused.

The run's configuration recorded the loss by its class name only (and a callable
schedule as ``"custom"``), so a run trained with ``CrossEntropyLoss()`` resumed with
``label_smoothing=0.5``, class weights or another function, mixing two objectives in
one ``stats.json`` curve; now both are recorded by their descriptions
(:mod:`nets.measurement_settings`) and compared; runs recorded before are compared by
class name, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from nets.checkpoint import content_checksum, load_checkpoint
from nets.data import load_dataset
from nets.training import train_network


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def _train(path: Path, digits: Any, epochs: int, **kw: Any) -> Any:
    options: dict[str, Any] = {
        "dataset": digits,
        "model": "MLP",
        "model_kwargs": {"hidden": (8,)},
        "batch_size": 512,
        "optimizer_kwargs": {"lr": 0.05},
        "progress": False,
        "device": "cpu",
        "save_freq": 1,
        "epochs": epochs,
    }
    options.update(kw)
    return train_network(path, **options)


def _digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def _loss_a(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def _loss_b(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, F.one_hot(y, 10).float())


def _half(epoch: int, total: int, lr0: float, ratio: float) -> float:
    return lr0 / 2


def _third(epoch: int, total: int, lr0: float, ratio: float) -> float:
    return lr0 / 3


def test_another_loss_configuration_is_refused(tmp_path: Path, digits: Any) -> None:
    run = tmp_path / "run"
    _train(run, digits, 1, loss_fn=torch.nn.CrossEntropyLoss())
    before = _digests(run)
    weight = torch.ones(10)
    weight[0] = 50.0
    for loss, differs in (
        (torch.nn.CrossEntropyLoss(label_smoothing=0.5), "label_smoothing: 0.0 recorded, 0.5"),
        (torch.nn.CrossEntropyLoss(weight=weight), "buffer weight: None recorded"),
        (_loss_a, "received 'function'"),  # refused by class name before, too
    ):
        with pytest.raises(ValueError, match=r"Argument 'loss_fn'") as error:
            _train(run, digits, 2, resume=True, loss_fn=loss)
        assert differs in str(error.value), str(error.value)
        assert _digests(run) == before  # nothing written
    result = _train(run, digits, 2, resume=True, loss_fn=torch.nn.CrossEntropyLoss())
    assert [e["epoch"] for e in result.stats] == [1, 2]
    assert result.config["loss"] == "CrossEntropyLoss"
    assert result.config["loss_settings"]["label_smoothing"] == 0.0


def test_another_loss_function_is_refused(tmp_path: Path, digits: Any) -> None:
    run = tmp_path / "run"
    _train(run, digits, 1, loss_fn=_loss_a)
    with pytest.raises(ValueError, match=r"Argument 'loss_fn'.*_loss_b"):
        _train(run, digits, 2, resume=True, loss_fn=_loss_b)
    assert [e["epoch"] for e in _train(run, digits, 2, resume=True, loss_fn=_loss_a).stats] == [
        1,
        2,
    ]


def _as_older_version(run: Path, *keys: str) -> None:
    """Remove ``keys`` from the recorded configuration (checkpoints and stats.json), as a
    run written before they were recorded."""
    for path in run.glob("checkpoint-*.pt"):
        payload = load_checkpoint(path)
        for key in keys:
            payload["config"].pop(key)
        payload["checksum"] = content_checksum(payload)
        torch.save(payload, path)
    stats = json.loads((run / "stats.json").read_text())
    for key in keys:
        stats["config"].pop(key)
    (run / "stats.json").write_text(json.dumps(stats))


def test_a_run_recorded_by_the_loss_class_name_is_compared_by_it(
    tmp_path: Path, digits: Any, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    _train(run, digits, 1, loss_fn=torch.nn.CrossEntropyLoss())
    _as_older_version(run, "loss_settings")
    with pytest.raises(ValueError, match=r"Argument 'loss_fn'.*CrossEntropyLoss"):
        _train(run, digits, 2, resume=True, loss_fn=torch.nn.MultiMarginLoss())
    old = tmp_path / "old"
    shutil.copytree(run, old)
    with caplog.at_level(logging.WARNING, logger="nets.training"):
        result = _train(old, digits, 2, resume=True, loss_fn=torch.nn.CrossEntropyLoss())
    assert "class name only" in caplog.text
    assert [e["epoch"] for e in result.stats] == [1, 2]
    # the continued run records the description from now on
    recorded = json.loads((old / "stats.json").read_text())["config"]
    assert recorded["loss_settings"]["type"] == "torch.nn.modules.loss.CrossEntropyLoss"


def test_another_custom_schedule_is_refused(
    tmp_path: Path, digits: Any, caplog: pytest.LogCaptureFixture
) -> None:
    run = tmp_path / "run"
    _train(run, digits, 1, schedule=_half)
    with pytest.raises(ValueError, match=r"Argument 'schedule'.*_third"):
        _train(run, digits, 2, resume=True, schedule=_third)
    with pytest.raises(ValueError, match=r"Argument 'schedule'"):
        _train(run, digits, 2, resume=True, schedule="constant")
    old = tmp_path / "old"
    shutil.copytree(run, old)
    result = _train(run, digits, 2, resume=True, schedule=_half)
    assert [e["epoch"] for e in result.stats] == [1, 2]
    assert result.config["schedule"] == "custom"
    assert result.config["schedule_settings"]["function"].endswith("_half")
    # a run recorded before the description: not checkable, said so
    _as_older_version(old, "schedule_settings")
    with caplog.at_level(logging.WARNING, logger="nets.training"):
        _train(old, digits, 2, resume=True, schedule=_third)
    assert "custom schedule" in caplog.text
