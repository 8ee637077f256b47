"""Resuming continues a run as if uninterrupted, or refuses.

An SWA file (``swa-<epoch>.pt``: averaged weights, no optimiser state) was resumed
silently: training went on from the average with empty momentum buffers, the data order
restarted and the average restarted.  An optimiser object with other group settings was
accepted, trained with the checkpoint's settings, and recorded its own.  A run started
with ``optimizer='sgd'`` was refused to ``'SGD'`` (the registry is case-insensitive), and
a misspelt optimiser keyword surfaced as Python's bare TypeError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nets import train_network
from nets.checkpoint import load_checkpoint, save_checkpoint
from nets.models import get_model

COMMON: dict[str, Any] = {
    "dataset": "digits", "batch_size": 300, "save_freq": 1, "progress": False,
    "device": "cpu", "seed": 3,
}  # fmt: skip


def _net() -> torch.nn.Module:
    return get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(6,), seed=3)


def test_an_swa_file_or_a_checkpoint_without_training_state_is_not_resumed(tmp_path: Path) -> None:
    settings = dict(
        COMMON, model="MLP", model_kwargs={"hidden": (6,)}, optimizer="SGD",
        optimizer_kwargs={"lr": 0.05, "momentum": 0.9}, swa=True, swa_start=1,
    )  # fmt: skip
    train_network(tmp_path, epochs=3, **settings)
    with pytest.raises(ValueError, match=r"Argument 'resume':.*an SWA average"):
        train_network(tmp_path, epochs=3, resume=tmp_path / "swa-00002.pt", **settings)
    # the same checkpoint without its optimiser state
    ckpt = load_checkpoint(tmp_path / "checkpoint-00002.pt")
    bare = tmp_path / "bare.pt"
    save_checkpoint(bare, _net(), None, 2, ckpt["config"], rng_state=ckpt["rng_state"])
    with pytest.raises(ValueError, match=r"Argument 'resume':.*without optimiser state"):
        train_network(tmp_path, epochs=3, resume=bare, **settings)


def test_an_optimiser_object_with_other_group_settings_is_refused(tmp_path: Path) -> None:
    first = _net()
    optimizer = torch.optim.SGD(first.parameters(), lr=0.05, momentum=0.9)
    train_network(tmp_path, model=first, optimizer=optimizer, epochs=1, **COMMON)
    second = _net()
    other = torch.optim.SGD(second.parameters(), lr=0.05, momentum=0.0, weight_decay=0.5)
    with pytest.raises(ValueError, match=r"Argument 'optimizer':.*group 0 with momentum = 0.9"):
        train_network(tmp_path, model=second, optimizer=other, epochs=2, resume=True, **COMMON)
    third = _net()
    same = torch.optim.SGD(third.parameters(), lr=0.05, momentum=0.9)
    result = train_network(tmp_path, model=third, optimizer=same, epochs=2, resume=True, **COMMON)
    assert result.config["optimizer_param_groups"][0]["momentum"] == 0.9


def test_optimiser_names_compare_as_the_registry_reads_them(tmp_path: Path) -> None:
    settings = dict(COMMON, model="MLP", model_kwargs={"hidden": (6,)})
    train_network(tmp_path, optimizer="sgd", optimizer_kwargs={"lr": 0.05}, epochs=1, **settings)
    resumed = train_network(
        tmp_path, optimizer="SGD", optimizer_kwargs={"lr": 0.05}, epochs=2, resume=True, **settings
    )
    assert len(resumed.stats) == 2
    with pytest.raises(ValueError, match=r"Argument 'optimizer'"):
        train_network(tmp_path, optimizer="Adam", epochs=3, resume=True, **settings)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("SGD", {"momentm": 0.9}, r"'optimizer_kwargs':.*keywords that SGD takes.*momentm"),
        ("LancGN", {"curvature": "hessian"}, r"'optimizer_kwargs':.*no 'curvature'.*LancGN"),
    ],
)
def test_keywords_an_optimiser_does_not_take_are_named(
    tmp_path: Path, name: str, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(TypeError, match=match):
        train_network(tmp_path, optimizer=name, optimizer_kwargs=options, epochs=1, **COMMON)
