"""A resumable workflow state is reused only for the same data, loss and model state.

The state's configuration recorded a dataset object as ``repr(type(dataset))``, a
loss module as ``CrossEntropyLoss(, reduction=mean)`` (no ``label_smoothing``, no
class weights) and the model by its trainable parameters only (no BatchNorm
buffers): a landscape resumed on other data, with another loss or other running
statistics silently returned the old numbers.  Each of these is now refused with a
:class:`spectral.resume.StateMismatchError` naming the entry that differs
(``dataset``, ``loss_fn``, ``model_state``), and the same inputs still resume to
bit-identical results.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

import nets.workflow.landscape as landscape_module
from nets.workflow import build_loss_landscape, compute_eigenspectrum, compute_loss_stats
from nets.workflow._resume import describe_model
from spectral.resume import StateMismatchError


def _data(seed: int, scale: float = 1.0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(40, 4, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 3, (40,), generator=g))


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    net = net.double().eval()
    mean, var = _running(net)
    with torch.no_grad():  # running statistics that are not the defaults
        mean.copy_(0.1 * torch.arange(5.0))
        var.copy_(1.0 + 0.2 * torch.arange(5.0))
    return net


def _running(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The running mean and variance of the model's BatchNorm."""
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm1d))
    assert bn.running_mean is not None and bn.running_var is not None
    return bn.running_mean, bn.running_var


def _kw(model: nn.Module) -> dict[str, Any]:
    return dict(model=model, dist=0.5, n_points=3, random_directions=2, device="cpu")


def test_landscape_state_of_other_data_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "land.state"
    net = _bn_model()
    build_loss_landscape(_data(1), state_path=state, **_kw(net))
    with pytest.raises(StateMismatchError, match=r"dataset='TensorDataset: 40 samples, sha256"):
        build_loss_landscape(_data(2, scale=3.0), state_path=state, **_kw(net))
    # a DataLoader over other data of the same size and type: refused too
    loader_state = tmp_path / "loader.state"
    build_loss_landscape(DataLoader(_data(1), batch_size=8), state_path=loader_state, **_kw(net))
    with pytest.raises(StateMismatchError, match="dataset="):
        build_loss_landscape(
            DataLoader(_data(2), batch_size=8), state_path=loader_state, **_kw(net)
        )


@pytest.mark.parametrize(
    "other",
    [
        nn.CrossEntropyLoss(label_smoothing=0.9),
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 5.0, 1.0], dtype=torch.float64)),
        nn.CrossEntropyLoss(ignore_index=2),
    ],
    ids=["label_smoothing", "weight", "ignore_index"],
)
def test_landscape_state_of_another_loss_is_refused(tmp_path: Path, other: nn.Module) -> None:
    state = tmp_path / "land.state"
    net = _bn_model()
    build_loss_landscape(_data(1), loss_fn=nn.CrossEntropyLoss(), state_path=state, **_kw(net))
    with pytest.raises(StateMismatchError, match="loss_fn="):
        build_loss_landscape(_data(1), loss_fn=other, state_path=state, **_kw(net))


def test_landscape_state_of_other_batchnorm_statistics_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "land.state"
    net = _bn_model()
    build_loss_landscape(_data(1), state_path=state, **_kw(net))
    with torch.no_grad():
        _running(net)[0].add_(1.0)  # no parameter changes: only a buffer
    with pytest.raises(StateMismatchError, match="model_state="):
        build_loss_landscape(_data(1), state_path=state, **_kw(net))


class _Interrupt(Exception):
    """Stands for a kill after some of the work is done."""


def test_landscape_same_inputs_resume_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = _bn_model()
    loss = nn.CrossEntropyLoss(
        label_smoothing=0.2, weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    )
    kw = dict(_kw(net), loss_fn=loss)
    reference = build_loss_landscape(_data(1), **kw)
    state = tmp_path / "land.state"
    original = landscape_module.evaluate
    calls = [0]
    limit = [4]  # no test split: the origin, then two points of each direction

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] > limit[0]:  # killed inside the second direction
            raise _Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(landscape_module, "evaluate", counted)
    with pytest.raises(_Interrupt):
        build_loss_landscape(_data(1), state_path=state, **kw)
    # equal but distinct objects: a new dataset, copies of the loss and of the model
    same = dict(kw, model=copy.deepcopy(net), loss_fn=copy.deepcopy(loss))
    calls[0], limit[0] = 0, 100
    first = build_loss_landscape(_data(1), state_path=state, **same)
    assert calls[0] == 1 + 2  # the origin and the second direction only
    calls[0] = 0
    again = build_loss_landscape(_data(1), state_path=state, **same)
    assert calls[0] == 1  # everything from the state
    for result in (first, again):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
            np.testing.assert_array_equal(
                getattr(reference, key), getattr(result, key), err_msg=key
            )


def test_spectrum_and_loss_stats_states_see_data_and_loss(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    spec: dict[str, Any] = dict(model=net, lanczos_iters=3, device="cpu", bn_mode=None)
    state = tmp_path / "spectrum.state"
    compute_eigenspectrum(_data(1), state_path=state, **spec)
    with pytest.raises(StateMismatchError, match="dataset="):
        compute_eigenspectrum(_data(2), state_path=state, **spec)
    with pytest.raises(StateMismatchError, match="loss_fn="):
        compute_eigenspectrum(
            _data(1), state_path=state, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.5), **spec
        )
    stats: dict[str, Any] = dict(model=net, batch_size=10, frobenius_probes=0, device="cpu")
    state = tmp_path / "stats.state"
    compute_loss_stats(_data(1), state_path=state, **stats)
    with pytest.raises(StateMismatchError, match="dataset="):
        compute_loss_stats(_data(2), state_path=state, **stats)
    with pytest.raises(StateMismatchError, match="loss_fn="):
        compute_loss_stats(
            _data(1), state_path=state, loss_fn=nn.CrossEntropyLoss(label_smoothing=0.5), **stats
        )
    with torch.no_grad():
        next(iter(net.parameters())).add_(1.0)
    with pytest.raises(StateMismatchError, match="model="):
        compute_loss_stats(_data(1), state_path=state, **stats)


class _Samples(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset torch knows nothing about: hashed sample by sample."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], torch.tensor(i % 3)


def test_dataset_digest_is_exact_for_every_kind_of_dataset() -> None:
    from nets.workflow._resume import dataset_digest, describe_data

    x = torch.arange(12.0).reshape(6, 2)
    y = x.clone()
    y[5, 1] = torch.nextafter(y[5, 1], torch.tensor(12.0))  # one ulp in the last sample
    makers: list[Callable[[torch.Tensor], Any]] = [
        lambda t: TensorDataset(t),
        lambda t: _Samples(t),
        lambda t: Subset(TensorDataset(t), [0, 5]),
        lambda t: ConcatDataset([TensorDataset(t), _Samples(t)]),
    ]
    for make in makers:
        assert dataset_digest(make(x)) == dataset_digest(make(x.clone()))
        assert dataset_digest(make(x)) != dataset_digest(make(y))
    assert dataset_digest(Subset(TensorDataset(x), [0, 1])) != dataset_digest(
        Subset(TensorDataset(x), [1, 0])
    )
    assert dataset_digest(TensorDataset(x)) != dataset_digest(TensorDataset(x.double()))
    loader = describe_data(DataLoader(TensorDataset(x), batch_size=2))
    assert loader != describe_data(DataLoader(TensorDataset(x), batch_size=3))
    assert loader == describe_data(DataLoader(TensorDataset(x.clone()), batch_size=2))


def test_describe_loss_and_model_see_every_setting() -> None:
    from nets.measurement_settings import describe_loss

    w = torch.tensor([1.0, 2.0])
    losses = [
        nn.CrossEntropyLoss(),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(weight=w),
        nn.CrossEntropyLoss(weight=2 * w),
        nn.CrossEntropyLoss(ignore_index=0),
        nn.BCEWithLogitsLoss(pos_weight=w),
        nn.MSELoss(),
        nn.functional.cross_entropy,
        functools.partial(nn.functional.cross_entropy, label_smoothing=0.1),
        lambda o, t: nn.functional.cross_entropy(o, t),
        lambda o, t: nn.functional.cross_entropy(2 * o, t),
    ]
    described = [repr(describe_loss(loss)) for loss in losses]
    assert len(set(described)) == len(losses), described
    assert describe_loss(nn.CrossEntropyLoss(weight=w)) == describe_loss(
        nn.CrossEntropyLoss(weight=w.clone())
    )
    assert "0x" not in "".join(described)  # no memory address: the same in every process
    net = _bn_model()
    before = describe_model(net)
    assert describe_model(copy.deepcopy(net)) == before
    with torch.no_grad():
        _running(net)[1].mul_(2.0)
    assert describe_model(net) != before
