"""The loss's own reduction (issue 19, item 6): ``reduction="sum"`` is the curvature of the
summed loss, equal to dense float64 references and to the normaliser times the mean-loss
operator, for CE/BCE/MSE on 2-d and 3-d outputs over unequal batches; per="position"
empirical Fisher against curvlinops' EFLinearOperator."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops import FisherOperator, GGNOperator, HessianOperator, inverse
from curvops.diagonal import ggn_diagonal
from curvops.stats import loss_stats
from curvops.testing import dense_ggn, dense_hessian

SIZES = (4, 3, 2)  # N = 9, unequal
N = sum(SIZES)
L = 2  # positions of the 3-d outputs


def make_model(layout: str) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    width = 3 if layout == "2d" else 3 * L
    layers: list[nn.Module] = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, width)]
    if layout == "3d":
        layers.append(nn.Unflatten(1, (3, L)))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return net.double()


def make_xy(loss: str, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    out_shape = (N, 3) if layout == "2d" else (N, 3, L)
    if loss == "ce":
        y = torch.randint(0, 3, out_shape[:1] + out_shape[2:], generator=g)
    elif loss == "mse":
        y = torch.randn(out_shape, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, out_shape, generator=g).double()
    return x, y


def split(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, start = [], 0
    for s in SIZES:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}


def normaliser(loss: str, y: torch.Tensor) -> int:
    """What the mean loss over all data divides by (number of terms)."""
    return int(y.numel())


def dense(op: Any) -> np.ndarray:
    return np.asarray(op @ np.eye(op.shape[0]), dtype=np.float64)


CASES = [(loss, layout) for loss in LOSSES for layout in ("2d", "3d")]


@pytest.mark.parametrize(("loss", "layout"), CASES)
def test_sum_reduction_equals_dense_and_nu_times_mean(loss: str, layout: str) -> None:
    model = make_model(layout)
    x, y = make_xy(loss, layout)
    batches = split(x, y)
    loss_sum, loss_mean = LOSSES[loss](reduction="sum"), LOSSES[loss]()
    nu = normaliser(loss, y)
    H_ref = dense_hessian(model, loss_sum, (x, y)).numpy()
    G_ref = dense_ggn(model, loss_sum, (x, y)).numpy()
    scale = max(1.0, np.abs(H_ref).max())
    H = dense(HessianOperator(model, loss_sum, batches))
    G = dense(GGNOperator(model, loss_sum, batches))
    assert np.abs(H - H_ref).max() <= 1e-10 * scale
    assert np.abs(G - G_ref).max() <= 1e-10 * scale
    # N x the mean-loss operator (N = the number of terms the mean divides by)
    assert np.abs(nu * dense(HessianOperator(model, loss_mean, batches)) - H).max() <= 1e-10 * scale
    assert np.abs(nu * dense(GGNOperator(model, loss_mean, batches)) - G).max() <= 1e-10 * scale
    for kind in ("empirical", "mc") if (loss != "ce" or layout == "2d") else ("empirical",):
        Fs = dense(FisherOperator(model, loss_sum, batches, kind=kind, seed=3))
        Fm = dense(FisherOperator(model, loss_mean, batches, kind=kind, seed=3))
        assert np.abs(nu * Fm - Fs).max() <= 1e-10 * max(1.0, np.abs(Fs).max())
    d = ggn_diagonal(model, loss_sum, batches).numpy()
    assert np.abs(d - np.diag(G_ref)).max() <= 1e-10 * scale


def test_sum_reduction_inverse_stats_and_loader() -> None:
    model = make_model("2d")
    x, y = make_xy("ce", "2d")
    batches = split(x, y)
    loss_sum = nn.CrossEntropyLoss(reduction="sum")
    G = GGNOperator(model, loss_sum, batches)
    G_ref = dense_ggn(model, loss_sum, (x, y)).numpy()
    b = np.arange(1.0, G.shape[0] + 1.0)
    sol = inverse(G.damp(0.5), "cg", tol=1e-13) @ b
    np.testing.assert_allclose(sol, np.linalg.solve(G_ref + 0.5 * np.eye(len(b)), b), rtol=1e-9)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False
    )
    H_loader = dense(HessianOperator(model, loss_sum, loader))
    H_ref = dense_hessian(model, loss_sum, (x, y)).numpy()
    assert np.abs(H_loader - H_ref).max() <= 1e-10 * np.abs(H_ref).max()
    z = np.random.default_rng(0).standard_normal(G.shape[0])
    st = loss_stats(model, loss_sum, batches, z=z, num_probes=0)
    zn = z / np.linalg.norm(z)
    with torch.no_grad():
        total = float(loss_sum(model(x), y))
    assert abs(st.loss_mean - total) <= 1e-12 * abs(total)
    assert abs(st.hess_mu - zn @ H_ref @ zn) <= 1e-10 * np.abs(H_ref).max()
    assert st.num_samples == N


OTHER_LOSSES = {
    # name: (loss class, output transform, targets, divisor of the mean over the data)
    "nll": (nn.NLLLoss, lambda f: torch.log_softmax(f, -1), "class", "samples"),
    "bce-probabilities": (nn.BCELoss, torch.sigmoid, "binary", "elements"),
    "huber": (nn.HuberLoss, lambda f: f, "real", "elements"),
    "smooth-l1": (nn.SmoothL1Loss, lambda f: f, "real", "elements"),
    "kl-batchmean": (
        lambda reduction="batchmean": nn.KLDivLoss(reduction=reduction),
        lambda f: torch.log_softmax(f, -1),
        "distribution",
        "samples",
    ),
}


@pytest.mark.parametrize("name", list(OTHER_LOSSES))
def test_other_torch_losses_sum_and_mean(name: str) -> None:
    loss_cls, transform, target_kind, divisor = OTHER_LOSSES[name]
    base = make_model("2d")
    model = nn.Sequential(base, nn.Module())
    model[1].forward = transform  # type: ignore[method-assign]
    x, _ = make_xy("mse", "2d")
    g = torch.Generator().manual_seed(4)
    y: torch.Tensor
    if target_kind == "class":
        y = torch.randint(0, 3, (N,), generator=g)
    elif target_kind == "binary":
        y = torch.randint(0, 2, (N, 3), generator=g).double()
    elif target_kind == "distribution":
        y = torch.softmax(torch.randn(N, 3, generator=g, dtype=torch.float64), -1)
    else:
        y = torch.randn(N, 3, generator=g, dtype=torch.float64) * 2
    batches = split(x, y)
    loss_sum, loss_mean = loss_cls(reduction="sum"), loss_cls()
    nu = N if divisor == "samples" else y.numel()
    H_ref = dense_hessian(model, loss_sum, (x, y)).numpy()
    scale = np.abs(H_ref).max()
    H = dense(HessianOperator(model, loss_sum, batches))
    assert np.abs(H - H_ref).max() <= 1e-10 * scale
    if name in ("nll", "kl-batchmean"):  # linear in its inputs: the GGN is zero, refused
        with pytest.raises(ValueError, match=r"(NLLLoss|KLDivLoss) is linear"):
            GGNOperator(model, loss_sum, batches)
    else:
        G_ref = dense_ggn(model, loss_sum, (x, y)).numpy()
        G = dense(GGNOperator(model, loss_sum, batches))
        assert np.abs(G - G_ref).max() <= 1e-10 * scale
    assert np.abs(nu * dense(HessianOperator(model, loss_mean, batches)) - H).max() <= 1e-10 * scale
    Fs = dense(FisherOperator(model, loss_sum, batches, kind="empirical"))
    Fm = dense(FisherOperator(model, loss_mean, batches, kind="empirical"))
    assert np.abs(nu * Fm - Fs).max() <= 1e-10 * np.abs(Fs).max()


def test_sum_reduction_blocks_follow() -> None:
    from curvops.blocks import per_layer

    model = make_model("3d")
    x, y = make_xy("bce", "3d")
    loss_sum = nn.BCEWithLogitsLoss(reduction="sum")
    H_ref = dense_hessian(model, loss_sum, (x, y)).numpy()
    B = dense(per_layer(HessianOperator, model, loss_sum, split(x, y)))
    mask = np.zeros_like(H_ref, dtype=bool)
    start = 0
    for layer in (model[0], model[2]):
        size = sum(p.numel() for p in layer.parameters())
        mask[start : start + size, start : start + size] = True
        start += size
    assert np.abs(B - np.where(mask, H_ref, 0.0)).max() <= 1e-10 * np.abs(H_ref).max()


def test_none_reduction_is_a_clear_error() -> None:
    x, y = make_xy("mse", "2d")
    with pytest.raises(ValueError, match=r"loss_fn\.reduction.*'mean' or 'sum'"):
        GGNOperator(make_model("2d"), nn.MSELoss(reduction="none"), (x, y))


def _curvlinops_ef(model: nn.Module, loss_fn: nn.Module, batches: list[Any]) -> np.ndarray:
    curvlinops = pytest.importorskip("curvlinops")
    params = [p for p in model.parameters() if p.requires_grad]
    EF = curvlinops.EFLinearOperator(model, loss_fn, params, batches, check_deterministic=False)
    P = sum(p.numel() for p in params)
    return np.asarray((EF @ torch.eye(P, dtype=torch.float64)).detach(), dtype=np.float64)


class SeqModel(nn.Module):
    """[N, 4] -> [N, T, C] (``channels_first``: [N, C, T]) or an image [N, C, 2, 2]."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.lin1, self.lin2 = nn.Linear(4, 5), nn.Linear(5, int(np.prod(shape)))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.tanh(self.lin1(x))).reshape(x.shape[0], *self.shape)


@pytest.mark.parametrize(
    ("loss", "shape"),
    [
        ("ce", (3, 4)),  # sequence: [N, C, T]
        ("ce", (3, 2, 2)),  # image: [N, C, H, W]
        ("mse", (4, 3)),  # sequence: [N, T, C]
        ("bce", (2, 2, 3)),  # image-like, channels last
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_position_empirical_fisher_equals_curvlinops(
    loss: str, shape: tuple[int, ...], reduction: str
) -> None:
    model = SeqModel(shape).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    if loss == "ce":
        y = torch.randint(0, shape[0], (N, *shape[1:]), generator=g)
    elif loss == "mse":
        y = torch.randn(N, *shape, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, (N, *shape), generator=g).double()
    batches = split(x, y)
    loss_fn = LOSSES[loss](reduction=reduction)
    ref = _curvlinops_ef(model, loss_fn, batches)
    ours = dense(FisherOperator(model, loss_fn, batches, kind="empirical", per="position"))
    assert np.abs(ours - ref).max() <= 1e-10 * max(1.0, np.abs(ref).max())
    per_sample = dense(FisherOperator(model, loss_fn, batches, kind="empirical"))
    assert np.abs(per_sample - ref).max() > 1e-6 * np.abs(ref).max()  # a different matrix


def test_per_position_equals_per_sample_on_2d_outputs() -> None:
    model = make_model("2d")
    x, y = make_xy("ce", "2d")
    a = dense(FisherOperator(model, nn.CrossEntropyLoss(), split(x, y), kind="empirical"))
    b = dense(
        FisherOperator(model, nn.CrossEntropyLoss(), split(x, y), kind="empirical", per="position")
    )
    assert np.abs(a - b).max() <= 1e-13 * np.abs(a).max()
    with pytest.raises(ValueError, match="'per'"):
        FisherOperator(model, nn.CrossEntropyLoss(), (x, y), kind="mc", per="position")
    with pytest.raises(ValueError, match="'per'"):
        FisherOperator(model, nn.CrossEntropyLoss(), (x, y), kind="empirical", per="token")
