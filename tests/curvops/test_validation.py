"""Losses, targets, parameters and batch forms checked when an operator is built
(issue 19 item 4, issue 20 item 3): each refusal names the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from curvops import EKFACOperator, FisherOperator, GGNOperator, HessianOperator, KFACOperator
from curvops.diagonal import ggn_diagonal
from curvops.stats import loss_stats
from spectral.errors import NumericalError

OPERATORS = [HessianOperator, GGNOperator, FisherOperator]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def xs(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def labels(*values: int) -> torch.Tensor:
    return torch.tensor(values)


# ---------------------------------------------------------------------------- the loss


def test_not_callable() -> None:
    with pytest.raises(TypeError, match=r"'loss_fn'.*callable"):
        HessianOperator(mlp(), "cross_entropy", (xs(), labels(0, 1, 2, 0, 1)))


def test_class_instead_of_instance() -> None:
    with pytest.raises(TypeError, match=r"'loss_fn'.*CrossEntropyLoss\(\)"):
        GGNOperator(mlp(), nn.CrossEntropyLoss, (xs(), labels(0, 1, 2, 0, 1)))


@pytest.mark.parametrize("bad", [nn.ReLU(), lambda out: out.sum(), lambda a, b, c: a.sum()])
def test_wrong_arity(bad: object) -> None:
    with pytest.raises(TypeError, match=r"'loss_fn'.*loss_fn\(outputs, targets\)"):
        HessianOperator(mlp(), bad, (xs(), labels(0, 1, 2, 0, 1)))


def test_non_scalar_output() -> None:
    with pytest.raises(ValueError, match=r"'loss_fn'.*scalar"):
        HessianOperator(mlp(), lambda out, y: (out - 1.0) ** 2, (xs(), torch.zeros(5, 3).double()))


def test_non_finite_output() -> None:
    with pytest.raises(ValueError, match=r"'loss_fn'.*finite loss"):
        GGNOperator(mlp(), lambda out, y: out.sum() * math.inf, (xs(), torch.zeros(5, 3).double()))


def test_loss_returning_a_number() -> None:
    with pytest.raises(TypeError, match=r"'loss_fn'.*scalar tensor"):
        GGNOperator(mlp(), lambda out, y: 1.0, (xs(), torch.zeros(5, 3).double()))


# ---------------------------------------------------------------------------- the targets


@pytest.mark.parametrize("cls", OPERATORS)
@pytest.mark.parametrize("bad", [3, 7, -1, -5])
def test_class_targets_out_of_range(cls: type, bad: int) -> None:
    y = labels(0, 1, 2, bad, 1)
    with pytest.raises(ValueError, match=rf"'data \(batch 0\)'.*\[0, 3\).*\[{bad}\]"):
        cls(mlp(), nn.CrossEntropyLoss(), (xs(), y))


def test_ignore_index_is_respected() -> None:
    y = labels(0, 1, -100, 2, 1)
    H = HessianOperator(mlp(), nn.CrossEntropyLoss(), (xs(), y))
    assert np.isfinite(H @ np.ones(H.shape[0])).all()
    HessianOperator(mlp(), nn.CrossEntropyLoss(ignore_index=-1), (xs(), labels(0, -1, 2, 1, 1)))
    with pytest.raises(ValueError, match=r"\[-100\]"):  # -100 is not ignored here
        HessianOperator(mlp(), nn.CrossEntropyLoss(ignore_index=-1), (xs(), y))


def test_nll_and_functional_losses_are_checked() -> None:
    with pytest.raises(ValueError, match=r"batch 0.*\[0, 3\)"):
        GGNOperator(mlp(), F.cross_entropy, (xs(), labels(0, 1, 2, 3, 0)))
    with pytest.raises(ValueError, match=r"batch 0.*\[0, 3\)"):
        HessianOperator(mlp(), nn.NLLLoss(), (xs(), labels(0, 1, 4, 1, 0)))


def test_second_batch_of_a_list_is_named() -> None:
    data = [(xs(3), labels(0, 1, 2)), (xs(2), labels(1, 5))]
    with pytest.raises(ValueError, match=r"'data \(batch 1\)'.*\[5\]"):
        GGNOperator(mlp(), nn.CrossEntropyLoss(), data)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_regression_targets(bad: float) -> None:
    y = torch.zeros(5, 3, dtype=torch.float64)
    y[2, 1] = bad
    for cls in OPERATORS:
        with pytest.raises(ValueError, match=r"'data \(batch 0\)'.*finite targets"):
            cls(mlp(), nn.MSELoss(), (xs(), y))


def test_loader_batches_checked_at_the_first_pass() -> None:
    y = labels(0, 1, 2, 0, 1, 2, 9)
    loader = DataLoader(TensorDataset(xs(7), y), batch_size=3)
    H = HessianOperator(mlp(), nn.CrossEntropyLoss(), loader)  # batch 0 is fine
    with pytest.raises(ValueError, match=r"'data \(batch 2\)'.*\[9\]"):
        H @ np.ones(H.shape[0])
    with pytest.raises(ValueError, match=r"'data \(batch 0\)'"):  # the first batch: at once
        HessianOperator(
            mlp(), nn.CrossEntropyLoss(), DataLoader(TensorDataset(xs(3), labels(0, 4, 1)), 3)
        )


def test_diagonal_and_stats_check_too() -> None:
    with pytest.raises(ValueError, match=r"batch 0.*\[0, 3\)"):
        ggn_diagonal(mlp(), nn.CrossEntropyLoss(), (xs(), labels(0, 1, 2, 3, 0)))
    with pytest.raises(ValueError, match=r"batch 0.*\[0, 3\)"):
        loss_stats(mlp(), nn.CrossEntropyLoss(), (xs(), labels(0, 1, 2, 3, 0)))


# ---------------------------------------------------------------------------- the parameters


def test_inf_parameter_masked_by_tanh_is_refused() -> None:
    net = mlp()
    with torch.no_grad():
        net[0].weight[1, 2] = math.inf
    x, y = xs(), labels(0, 1, 2, 0, 1)
    with torch.no_grad():  # the loss masks it: finite
        assert math.isfinite(float(nn.CrossEntropyLoss()(net(x.abs() + 1), y)))
    for cls in OPERATORS:
        with pytest.raises(ValueError, match=r"'params'.*'0\.weight'"):
            cls(net, nn.CrossEntropyLoss(), (x.abs() + 1, y))


def test_parameter_turned_non_finite_after_construction() -> None:
    net = mlp()
    H = GGNOperator(net, nn.CrossEntropyLoss(), (xs().abs() + 1, labels(0, 1, 2, 0, 1)))
    with torch.no_grad():
        net[0].bias[0] = math.inf
    with pytest.raises(NumericalError, match=r"parameter\(s\) \['0\.bias'\]"):
        H @ np.ones(H.shape[0])


@pytest.mark.parametrize("cls", OPERATORS)
def test_parameter_turned_non_finite_between_cached_products(cls: type) -> None:
    """The finiteness flags reused while the model is unchanged are not reused after
    a ``.data`` edit (no version bump), nor after the value is restored."""
    net = mlp()
    op = cls(net, nn.CrossEntropyLoss(), (xs().abs() + 1, labels(0, 1, 2, 0, 1)))
    v = np.ones(op.shape[0])
    before = op @ v
    assert np.array_equal(op @ v, before)  # cached: flags reused
    saved = net[2].weight.data[1, 0].item()
    for bad in (math.nan, -math.inf):
        net[2].weight.data[1, 0] = bad
        with pytest.raises(NumericalError, match=r"parameter\(s\) \['2\.weight'\]"):
            op @ v
        with pytest.raises(NumericalError, match=r"parameter\(s\) \['2\.weight'\]"):
            op @ v  # still refused on the next product
        net[2].weight.data[1, 0] = saved
        assert np.array_equal(op @ v, before)


def test_unselected_non_finite_parameter_is_allowed() -> None:
    net = mlp()
    data = (xs(), torch.zeros(5, 3).double())
    HessianOperator(net, nn.MSELoss(), data, params=["0.weight", "2.weight"])
    with pytest.raises(ValueError, match=r"'loss_fn'.*finite loss.*'0\.bias' \(not selected\)"):
        net[0].bias.requires_grad_(True)
        with torch.no_grad():
            net[0].bias[0] = math.nan
        HessianOperator(net, nn.MSELoss(), data, params=["2.weight"])


# ---------------------------------------------------------------------------- batch forms


def test_dict_batch_names_its_keys() -> None:
    batch = {"image": xs(), "label": labels(0, 1, 2, 0, 1)}
    with pytest.raises(ValueError, match=r"'data'.*\(inputs, targets\).*keys \['image', 'label'\]"):
        HessianOperator(mlp(), nn.CrossEntropyLoss(), batch)
    with pytest.raises(ValueError, match=r"'data \(batch 0\)'.*keys \['image', 'label'\]"):
        HessianOperator(mlp(), nn.CrossEntropyLoss(), [batch])


def test_dict_loader_names_its_keys_not_its_values() -> None:
    x, y = xs(), labels(0, 1, 2, 0, 1)

    class Dicts(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"image": x[i], "label": y[i]}

    with pytest.raises(ValueError, match=r"keys \['image', 'label'\]") as info:
        GGNOperator(mlp(), nn.CrossEntropyLoss(), DataLoader(Dicts(), batch_size=2))
    assert "tensor(" not in str(info.value)
    assert "collate_fn" in str(info.value)


def test_validation_leaves_the_model_unchanged() -> None:
    from curvops._model_state import model_state, state_differences

    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 3))
    net = net.double().train()
    before = model_state(net)
    rng = torch.get_rng_state()
    HessianOperator(net, nn.CrossEntropyLoss(), (xs(), labels(0, 1, 2, 0, 1)))
    assert state_differences(before, net) == []
    assert torch.equal(rng, torch.get_rng_state())


KRONECKER_OPERATORS = [KFACOperator, EKFACOperator]


@pytest.mark.parametrize("cls", KRONECKER_OPERATORS)
def test_kronecker_operators_run_the_construction_checks(cls: type) -> None:
    """K-FAC / E-KFAC refuse what every operator refuses, naming the argument (they
    built their factors lazily and failed later with 'non-finite factor of layer')."""
    net = mlp()
    with torch.no_grad():
        net[2].weight[0, 1] = math.nan
    data = (xs(), labels(0, 1, 2, 0, 1))
    with pytest.raises(ValueError, match=r"'params'.*'2\.weight'"):
        cls(net, nn.CrossEntropyLoss(), data)
    bad_inputs = xs()
    bad_inputs[2, 0] = math.inf
    with pytest.raises(ValueError, match=r"'data \(batch 0\)'.*finite inputs"):
        cls(mlp(), nn.CrossEntropyLoss(), (bad_inputs, labels(0, 1, 2, 0, 1)))
    with pytest.raises(ValueError, match=r"'data \(batch 0\)'"):
        cls(mlp(), nn.CrossEntropyLoss(), (xs(), labels(0, 1, 7, 0, 1)))  # class 7 of 3


@pytest.mark.parametrize("cls", KRONECKER_OPERATORS)
def test_kronecker_parameter_turned_non_finite_after_construction(cls: type) -> None:
    net = mlp()
    op = cls(net, nn.CrossEntropyLoss(), (xs(), labels(0, 1, 2, 0, 1)))
    v = np.ones(op.shape[0])
    before = op @ v
    saved = net[0].bias.data[1].item()
    net[0].bias.data[1] = math.inf
    with pytest.raises(NumericalError, match=r"parameter\(s\) \['0\.bias'\]"):
        op @ v
    net[0].bias.data[1] = saved
    assert np.array_equal(op @ v, before)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
@pytest.mark.parametrize(
    "make_loss, key",
    [
        (lambda w: nn.CrossEntropyLoss(weight=w), "weight"),
        (lambda w: nn.NLLLoss(weight=w), "weight"),
        (lambda w: nn.BCEWithLogitsLoss(pos_weight=w), "pos_weight"),
    ],
    ids=["ce", "nll", "bce-pos"],
)
def test_class_weights_must_be_finite_and_non_negative(
    make_loss: Any, key: str, bad: float
) -> None:
    """A NaN class weight gave a finite (wrong) operator without an error: the mean
    loss's normaliser was NaN, which the 0/0 check took for 'nothing counted'; a
    negative one gave a GGN flagged PSD with a negative eigenvalue."""
    w = torch.ones(3, dtype=torch.float64)
    w[1] = bad
    loss = make_loss(w)
    if key == "pos_weight":
        data: Any = (xs(), torch.rand(5, 3, dtype=torch.float64))
    else:
        data = (xs(), labels(0, 1, 2, 0, 1))
    nll = isinstance(loss, nn.NLLLoss)
    for cls in [*OPERATORS, KFACOperator]:
        if (cls is KFACOperator and key == "pos_weight") or (nll and cls is not HessianOperator):
            continue  # refused on their own terms (no closed-form Fisher for these losses)
        with pytest.raises(ValueError, match=rf"'loss_fn\.{key}': expected finite, non-negative"):
            cls(mlp(), loss, data)
    with pytest.raises(ValueError, match=rf"'loss_fn\.{key}'"):
        ggn_diagonal(mlp(), loss, data, method="empirical" if nll else "exact")


@pytest.mark.parametrize("bag", [False, True])
def test_embeddings_that_renormalise_their_weights_are_refused(bag: bool) -> None:
    """``nn.Embedding(max_norm=...)`` rewrites its weight in every forward pass: building
    an operator changed the model by up to 9.7 (rows of norm 5 renormalised to 1)."""
    from curvops import KFACOperator, ggn_diagonal
    from curvops.stats import loss_stats

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            kind = nn.EmbeddingBag if bag else nn.Embedding
            self.emb = kind(10, 4, max_norm=1.0)
            self.head = nn.Linear(4, 3)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            h = self.emb(tokens)
            return self.head(h if bag else h.mean(1))

    net = Net().double()
    with torch.no_grad():
        net.emb.weight.mul_(5.0)
    before = net.emb.weight.detach().clone()
    data = (
        torch.randint(0, 10, (6, 5), generator=torch.Generator().manual_seed(0)),
        labels(0, 1, 2, 0, 1, 2),
    )
    builds = [
        *(lambda cls=cls: cls(net, nn.CrossEntropyLoss(), data) for cls in OPERATORS),
        lambda: KFACOperator(net, nn.CrossEntropyLoss(), data, remainder="diagonal"),
        lambda: ggn_diagonal(net, nn.CrossEntropyLoss(), data),
        lambda: loss_stats(net, nn.CrossEntropyLoss(), data, num_probes=1),
    ]
    for build in builds:
        with pytest.raises(
            ValueError, match=r"'model'.*submodule 'emb' is Embedding(Bag)? with max_norm=1\.0"
        ):
            build()
    assert torch.equal(net.emb.weight, before)
