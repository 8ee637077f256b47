"""Awkward but legitimate inputs: loss functions, float32, unused parameters, target shapes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from curvops import FisherOperator, GGNOperator, HessianOperator, ggn_diagonal
from curvops.losses import loss_family
from curvops.testing import dense_fisher, dense_ggn, dense_hessian

from .conftest import make_inputs, make_mlp, make_targets, random_columns, relative_error

FUNCTIONS = [
    ("ce", F.cross_entropy, nn.CrossEntropyLoss),
    ("mse", F.mse_loss, nn.MSELoss),
    ("bce", F.binary_cross_entropy_with_logits, nn.BCEWithLogitsLoss),
]


@pytest.mark.parametrize(("name", "function", "module"), FUNCTIONS, ids=[f[0] for f in FUNCTIONS])
def test_plain_loss_functions_act_like_their_modules(
    name: str, function: Callable[..., torch.Tensor], module: type[nn.Module]
) -> None:
    model = make_mlp()
    data = (make_inputs("mlp", 6), make_targets(name, 6))
    assert loss_family(function) == name
    X = random_columns(sum(p.numel() for p in model.parameters()), 2)
    G_fn, G_mod = GGNOperator(model, function, data), GGNOperator(model, module(), data)
    assert G_fn.psd  # recognised as a convex loss
    assert torch.equal(G_fn.matmat(X), G_mod.matmat(X))  # same closed form
    H = HessianOperator(model, function, data)
    assert relative_error(H.matmat(X), dense_hessian(model, module(), data) @ X) <= 1e-10
    for kind in ("mc", "empirical"):
        F_fn = FisherOperator(model, function, data, kind=kind, seed=2)
        ref = dense_fisher(model, module(), data, kind=kind, seed=2)
        assert relative_error(F_fn.matmat(X), ref @ X) <= 1e-10


def test_float32_model_matches_float64_reference() -> None:
    model = make_mlp().float()
    x, y = make_inputs("mlp", 6), make_targets("ce", 6)
    for cls, dense in ((HessianOperator, dense_hessian), (GGNOperator, dense_ggn)):
        op = cls(model, nn.CrossEntropyLoss(), (x, y))  # float64 inputs are cast to float32
        assert op.torch_dtype == torch.float32 and op.dtype == np.float32
        D = dense(model, nn.CrossEntropyLoss(), (x, y))
        assert relative_error(op.to_dense(), D) <= 1e-5


def test_unused_parameters_give_zero_rows() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.used(x))

    model = Unused().double()
    data = (make_inputs("mlp", 5), make_targets("ce", 5))
    for cls, dense in ((HessianOperator, dense_hessian), (GGNOperator, dense_ggn)):
        D = cls(model, nn.CrossEntropyLoss(), data).to_dense()
        assert relative_error(D, dense(model, nn.CrossEntropyLoss(), data)) <= 1e-12
        assert float(D[15:].abs().max()) == 0.0 and float(D[:15].abs().max()) > 0.0
    Fm = FisherOperator(model, nn.CrossEntropyLoss(), data).to_dense()
    assert float(Fm[15:].abs().max()) == 0.0
    for cls in (HessianOperator, GGNOperator, FisherOperator):  # only unused: A = 0
        op = cls(model, nn.CrossEntropyLoss(), data, params=[model.unused])
        assert float(op.to_dense().abs().max()) == 0.0
        assert float((op @ np.ones(15)).max()) == 0.0
    G = GGNOperator(model, nn.CrossEntropyLoss(), data).to_dense()
    for method in ("exact", "mc"):
        diag = ggn_diagonal(model, nn.CrossEntropyLoss(), data, method=method)
        assert float(diag[15:].abs().max()) == 0.0
    assert relative_error(ggn_diagonal(model, nn.CrossEntropyLoss(), data), G.diagonal()) <= 1e-12
    assert all(p.grad is None for p in model.parameters())


def test_integer_targets_for_mse() -> None:
    model = make_mlp()
    x = make_inputs("mlp", 6)
    y = torch.randint(0, 3, (6, 3), generator=torch.Generator().manual_seed(0))
    X = random_columns(sum(p.numel() for p in model.parameters()), 2)
    for cls, dense in ((HessianOperator, dense_hessian), (GGNOperator, dense_ggn)):
        op = cls(model, nn.MSELoss(), (x, y))
        assert (
            relative_error(op.matmat(X), dense(model, nn.MSELoss(), (x, y.double())) @ X) <= 1e-10
        )
    for kind in ("mc", "empirical"):
        Fo = FisherOperator(model, nn.MSELoss(), (x, y), kind=kind)
        ref = dense_fisher(model, nn.MSELoss(), (x, y.double()), kind=kind)
        assert relative_error(Fo.matmat(X), ref @ X) <= 1e-10


def test_targets_with_extra_dimensions() -> None:
    """Per-pixel cross-entropy (N, C, H, W) outputs and MSE on (N, 3, 2) outputs."""
    seg = nn.Conv2d(1, 3, 3, padding=1).double()
    x, y = make_inputs("cnn", 4), torch.randint(0, 3, (4, 4, 4))
    X = random_columns(30, 2)
    for cls, dense in ((HessianOperator, dense_hessian), (GGNOperator, dense_ggn)):
        op = cls(seg, nn.CrossEntropyLoss(), (x, y))
        assert relative_error(op.matmat(X), dense(seg, nn.CrossEntropyLoss(), (x, y)) @ X) <= 1e-10
    Fe = FisherOperator(seg, nn.CrossEntropyLoss(), (x, y), kind="empirical")
    ref = dense_fisher(seg, nn.CrossEntropyLoss(), (x, y), kind="empirical")
    assert relative_error(Fe.matmat(X), ref @ X) <= 1e-10

    reg = nn.Sequential(nn.Linear(4, 6), nn.Unflatten(1, (3, 2))).double()
    x2, y2 = make_inputs("mlp", 5), torch.randn(5, 3, 2, dtype=torch.float64)
    X2 = random_columns(30, 2)
    for kind in ("mc", "empirical"):
        Fo = FisherOperator(reg, nn.MSELoss(), (x2, y2), kind=kind)
        ref = dense_fisher(reg, nn.MSELoss(), (x2, y2), kind=kind)
        assert relative_error(Fo.matmat(X2), ref @ X2) <= 1e-10
    G = GGNOperator(reg, nn.MSELoss(), (x2, y2))
    assert relative_error(G.matmat(X2), dense_ggn(reg, nn.MSELoss(), (x2, y2)) @ X2) <= 1e-10


def test_model_returning_a_tuple_uses_its_first_item_and_odd_outputs_are_refused() -> None:
    # issue 15 item 3: a tuple output gives its first item (was refused before)
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.lin(x), x

    model = Pair().double()
    data = (make_inputs("mlp", 3), make_targets("ce", 3))
    H = HessianOperator(model, nn.CrossEntropyLoss(), data)
    ref = dense_hessian(model, nn.CrossEntropyLoss(), data)
    X = np.eye(H.shape[0])[:, :3]
    assert relative_error(H.matmat(X), ref.numpy() @ X) <= 1e-10

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> dict[str, int]:
            return {"count": 3}

    odd = Odd().double()
    # refused at construction (the one checking forward selects the output too)
    with pytest.raises(TypeError, match=r"model output.*output_fn.*keys \['count'\]"):
        HessianOperator(odd, nn.CrossEntropyLoss(), data)


def test_loader_yielding_dicts_is_refused_clearly() -> None:
    x, y = make_inputs("mlp", 5), make_targets("ce", 5)

    class Dicts(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 5

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": x[i], "y": y[i]}

    # refused when the operator is built (its first batch is checked), naming the keys
    with pytest.raises(ValueError, match=r"batch 0.*\(inputs, targets\).*keys \['x', 'y'\]"):
        HessianOperator(make_mlp(), nn.CrossEntropyLoss(), DataLoader(Dicts(), batch_size=2))


def test_parameters_on_two_devices_are_refused_unless_a_subset_is_chosen() -> None:
    from curvops.params import select_params

    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[1].to("meta")
    with pytest.raises(ValueError, match=r"devices \['cpu', 'meta'\]"):
        select_params(net)
    assert [n for n, _ in select_params(net, [net[0]])] == ["0.weight", "0.bias"]


def test_dropout_is_off_during_products() -> None:
    """A train-mode MLP with Dropout(0.5) has the curvature of the same MLP without it."""
    model = make_mlp().train()
    without = nn.Sequential(model[0], model[1], nn.Identity(), model[3])
    data = (make_inputs("mlp", 6), make_targets("ce", 6))
    X = random_columns(sum(p.numel() for p in model.parameters()), 2)
    for cls in (HessianOperator, GGNOperator):
        got = cls(model, nn.CrossEntropyLoss(), data).matmat(X)
        assert torch.equal(got, cls(without, nn.CrossEntropyLoss(), data).matmat(X))
    assert model[2].training


def test_mc_fisher_without_a_closed_form_explains_why() -> None:
    seg = nn.Conv2d(1, 3, 3, padding=1).double()
    x, y = make_inputs("cnn", 4), torch.randint(0, 3, (4, 4, 4))
    # (without label smoothing, per-pixel targets have the closed form: test_normaliser.py)
    Fo = FisherOperator(seg, nn.CrossEntropyLoss(label_smoothing=0.1), (x, y), kind="mc")
    with pytest.raises(ValueError, match=r"outputs \(4, 3, 4, 4\) and targets \(4, 4, 4\)"):
        Fo @ np.ones(Fo.shape[0])


def test_partial_loss_function_with_none_reduction_is_refused() -> None:
    import functools

    data = (make_inputs("mlp", 3), make_targets("ce", 3))
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(make_mlp(), functools.partial(F.cross_entropy, reduction="none"), data)
    H = HessianOperator(make_mlp(), functools.partial(F.cross_entropy, label_smoothing=0.1), data)
    assert H.shape == (51, 51)


def test_structured_targets_are_named_not_read_as_two_batches() -> None:
    """Before: ``(x, (targets, input_lengths, target_lengths))`` was read as a list of two
    batches and refused with "received torch.Tensor of shape (3, 6, 2)", the inputs."""
    from curvops.data import as_data

    x = torch.randn(3, 6, 2)
    lengths = (torch.zeros(3, 2), torch.ones(3), torch.ones(3))
    for targets in (lengths, list(lengths), {"targets": lengths[0]}):
        with pytest.raises(ValueError, match=r"Argument 'data'.*one tensor of targets.*CTCLoss"):
            as_data((x, targets))
    assert as_data([(x, torch.zeros(3)), (x, torch.zeros(3))]).num_samples == 6
