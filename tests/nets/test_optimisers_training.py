"""Each of the suite's optimisers trains the digits MLP through ``train_network`` by name.

* one epoch on the full digits training set (11 steps of 128) lowers the training loss;
* a two-epoch run and a run resumed from its ``checkpoint-00001.pt`` end bit-identically
  (the optimiser's ``state_dict`` carries K-FAC's factors (E-KFAC's eigenbasis and
  scalings) and RNG state, SWATS's phase,
  Lanczos-Newton's step counter), on a 512-sample subset to keep the test short.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from nets.data.digits import load_digits_tensors
from nets.models import get_model
from nets.training import train_network

# Table 4 style: batch sizes inside optimizer_kwargs (train_network takes them out)
CASES: dict[str, dict[str, Any]] = {
    "SWATS": {"lr": 2e-2},
    "KFAC": {"lr": 0.05, "damping": 1e-2, "factor_update_freq": 2, "inv_update_freq": 4},
    "EKFAC": {"lr": 0.05, "damping": 1e-2, "factor_update_freq": 2, "inv_update_freq": 4},
    "LancGN": {"lr": 1.0, "damping": 0.1, "lanczos_iters": 5, "curvature_batch_size": 128},
    "LancHess": {"lr": 1.0, "damping": 1.0, "lanczos_iters": 5, "curvature_batch_size": 128},
}


@pytest.fixture(scope="module")
def digits() -> tuple[TensorDataset, TensorDataset]:
    (x, y), (xt, yt) = load_digits_tensors()
    return TensorDataset(x, y), TensorDataset(xt, yt)


def _model() -> nn.Module:
    return get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(32,), seed=0)


def _train(directory: Path, data: Any, name: str, epochs: int, **kw: Any) -> Any:
    return train_network(
        directory,
        data,
        model=kw.pop("model", None) or _model(),
        optimizer=name,
        optimizer_kwargs=dict(CASES[name]),
        epochs=epochs,
        batch_size=128,
        schedule="constant",
        save_freq=1,
        progress=False,
        **kw,
    )


def _full_loss(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_epoch_on_digits_lowers_the_loss(
    name: str, digits: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    model = _model()
    before = _full_loss(model, digits[0])
    result = _train(tmp_path, digits, name, 1, model=model)
    after = _full_loss(model, digits[0])
    assert after < 0.8 * before, (name, before, after)
    assert type(result.optimizer).__name__ in ("SWATS", "KFAC", "EKFAC", "LanczosNewton")
    assert len(result.stats) == 1  # (the running-average train_loss may exceed `before`:
    # LancGN with damping 0.1 overshoots on its first steps, then recovers)


@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_from_checkpoint_is_bit_identical(
    name: str, digits: tuple[TensorDataset, TensorDataset], tmp_path: Path
) -> None:
    (x, y), (xt, yt) = digits[0].tensors, digits[1].tensors
    subset = (TensorDataset(x[:512], y[:512]), TensorDataset(xt[:64], yt[:64]))
    straight = _train(tmp_path / "straight", subset, name, 2)
    resumed = _train(
        tmp_path / "resumed",
        subset,
        name,
        2,
        resume=str(tmp_path / "straight" / "checkpoint-00001.pt"),
    )
    for (pname, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), (name, pname)
    assert resumed.stats[-1]["train_loss"] == straight.stats[-1]["train_loss"]
