"""Inputs of ``train_network`` refused before anything is written, naming the argument, and
the loss an LBFGS step reports (an adversarial sweep of ``train_network`` found each of
these; every test fails on the code before the fix but those marked as passing before):

* a ``reduction="sum"`` (or ``"none"``) loss was accepted although losses are documented
  as means: the reported losses depended on the batch size (225.6, 292.4, 869.8 for batch
  sizes 100, 128, 359);
* with LBFGS (the closure called several times per step) ``train_loss`` was the last
  closure evaluation, not the loss at the step's starting weights as for every other
  optimiser and as ``LBFGS.step`` returns;
* an empty training ``Dataset`` or ``DataLoader`` failed in PyTorch's sampler ("num_samples
  should be a positive integer value"), a ``DataLoader`` over an ``IterableDataset`` as
  "object of type ... has no len()", an empty test set only after epoch 1 was trained and
  written (naming ``loader``, no argument of ``train_network``), ``loss_fn='ce'`` as
  "'str' object is not callable", ``optimizer_kwargs=[1]`` as a raw ``dict`` error, and a
  last training batch of 1 sample through ``BatchNorm1d`` as PyTorch's "Expected more than
  1 value per channel when training".
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from nets import load_dataset, train_network
from nets.training import evaluate


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def _net(batchnorm: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    norm: list[nn.Module] = [nn.BatchNorm1d(16)] if batchnorm else []
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), *norm, nn.ReLU(), nn.Linear(16, 10))


def _refused(
    directory: Path, kind: type[Exception], pattern: str, *, model: nn.Module | None = None,
    **kw: Any,
) -> None:  # fmt: skip
    """``train_network`` raises ``kind`` matching ``pattern``; nothing was written and the
    model was not changed."""
    net = _net() if model is None else model
    before = copy.deepcopy(net.state_dict())
    options: dict[str, Any] = {"epochs": 1, "progress": False, "device": "cpu", **kw}
    with pytest.raises(kind, match=pattern):
        train_network(directory, model=net, **options)
    assert not directory.exists() or not any(directory.iterdir())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_a_loss_without_mean_reduction_is_refused(
    tmp_path: Path, digits: Any, reduction: str
) -> None:
    loss = nn.CrossEntropyLoss(reduction=reduction)
    _refused(tmp_path / "run", ValueError, rf"Argument 'loss_fn'.*mean.*{reduction}",
             dataset=digits, loss_fn=loss)  # fmt: skip
    partial = functools.partial(nn.functional.cross_entropy, reduction=reduction)
    _refused(tmp_path / "run", ValueError, r"Argument 'loss_fn'", dataset=digits, loss_fn=partial)
    data = DataLoader(TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"Argument 'loss_fn'"):
        evaluate(nn.Linear(2, 3), data, loss)


def test_plain_function_losses_stay_accepted_as_means(tmp_path: Path, digits: Any) -> None:
    """(Passes before and after.)"""
    result = train_network(
        tmp_path, digits, model=_net(), epochs=1, batch_size=512, progress=False, device="cpu",
        loss_fn=lambda output, target: nn.functional.cross_entropy(output, target),
    )  # fmt: skip
    assert result.stats[0]["train_loss"] > 0


def test_loss_classes_and_non_callables_are_refused(tmp_path: Path, digits: Any) -> None:
    _refused(tmp_path / "a", TypeError, r"Argument 'loss_fn'.*received 'ce'", dataset=digits,
             loss_fn="ce")  # fmt: skip
    _refused(tmp_path / "b", TypeError, r"Argument 'loss_fn'.*instance", dataset=digits,
             loss_fn=nn.CrossEntropyLoss)  # fmt: skip


def test_lbfgs_reports_the_loss_at_the_steps_starting_weights(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    loss = nn.CrossEntropyLoss()
    with torch.no_grad():
        at_start = loss(net(x), y).item()
    result = train_network(
        tmp_path, (TensorDataset(x, y), TensorDataset(x, y)), model=net, optimizer="LBFGS",
        optimizer_kwargs={"lr": 1.0, "max_iter": 5}, batch_size=64, epochs=1, schedule=None,
        loss_fn=loss, progress=False, device="cpu",
    )  # fmt: skip
    with torch.no_grad():
        after = loss(net(x), y).item()
    assert after < at_start - 0.1  # the step moved: the two conventions differ
    assert result.stats[0]["train_loss"] == pytest.approx(at_start, rel=1e-6)
    definitions = json.loads((tmp_path / "stats.json").read_text())["definitions"]
    assert "first evaluation of the closure" in definitions["train_loss"]


def _empty() -> TensorDataset:
    return TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))


def test_empty_training_and_test_sets_are_refused_before_training(
    tmp_path: Path, digits: Any
) -> None:
    cases = {
        "train": (_empty(), None),
        "loader": DataLoader(_empty()),
        "test": (digits.train, _empty()),
    }
    for label, dataset in cases.items():
        split = "test" if label == "test" else "training"
        _refused(tmp_path / label, ValueError, rf"Argument 'dataset'.*non-empty {split} set",
                 dataset=dataset)  # fmt: skip
    loader = DataLoader(digits.train, batch_size=5000, drop_last=True)  # yields no batch
    _refused(tmp_path / "none", ValueError, r"Argument 'dataset'.*at least one batch",
             dataset=loader)  # fmt: skip


class _Stream(IterableDataset[Any]):
    def __init__(self, samples: Any) -> None:
        self.samples = samples

    def __iter__(self) -> Any:
        for i in range(300):
            yield self.samples[i]


def test_an_iterable_training_set_is_refused_naming_dataset(tmp_path: Path, digits: Any) -> None:
    loader = DataLoader(_Stream(digits.train), batch_size=64)
    _refused(tmp_path / "run", TypeError, r"Argument 'dataset'.*IterableDataset",
             dataset=(loader, digits.test))  # fmt: skip


def test_optimizer_kwargs_that_are_no_mapping_are_refused(tmp_path: Path, digits: Any) -> None:
    _refused(tmp_path / "run", TypeError, r"Argument 'optimizer_kwargs'.*mapping.*received \[1\]",
             dataset=digits, optimizer_kwargs=[1])  # fmt: skip


def test_a_last_batch_of_one_sample_through_batchnorm_is_refused(
    tmp_path: Path, digits: Any
) -> None:
    size = len(digits.train)  # 1438: batch size 1437 leaves a last batch of 1
    _refused(
        tmp_path / "run", ValueError,
        rf"Argument 'batch_size'.*training set of {size} samples leaves a last batch of 1.*"
        r"BatchNorm.*received 1437",
        model=_net(batchnorm=True), dataset=digits, batch_size=size - 1,
    )  # fmt: skip
    given = DataLoader(digits.train, batch_size=size - 1, shuffle=False)
    _refused(tmp_path / "given", ValueError, r"Argument 'dataset'.*last batch of 1",
             model=_net(batchnorm=True), dataset=given)  # fmt: skip
    # without BatchNorm, or when BatchNorm normalises over positions too, it trains
    for net in (_net(), _conv_net()):
        result = train_network(
            tmp_path / type(net[1]).__name__, digits, model=net, epochs=1, batch_size=size - 1,
            progress=False, device="cpu", save_freq=None,
        )  # fmt: skip
        assert len(result.stats) == 1


def _conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 64, 10),
    )  # fmt: skip
