"""Functions whose second derivatives PyTorch gets wrong: repaired in products, or refused.

``torch._weight_norm`` (weight normalisation) and chunked ``F.linear_cross_entropy``
fail ``gradgradcheck`` in torch 2.13-2.15 while their gradients are right, so the
references here are independent of PyTorch's double backward: the weight
normalisation written out by hand, and central differences of the (correct) gradient
of the user's own model.  On the unrepaired code the Hessians below were 30 % (weight
norm) and 35 % (chunked loss) off.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from curvops import FisherOperator, GGNOperator, HessianOperator, loss_stats
from curvops.derivative_repairs import (
    check_loss_second_derivatives,
    linear_cross_entropy_reference,
    weight_norm,
)
from curvops.determinism import DropoutOffMode
from curvops.testing import dense_ggn

HAS_LINEAR_CE = hasattr(F, "linear_cross_entropy")
needs_linear_ce = pytest.mark.skipif(not HAS_LINEAR_CE, reason="torch without linear_cross_entropy")


def _dense(op: object) -> np.ndarray:
    n = op.shape[0]  # type: ignore[attr-defined]
    return np.asarray(op @ np.eye(n))  # type: ignore[operator]


def _gradient_differences(
    model: nn.Module, loss: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> np.ndarray:
    """Central differences of the model's own gradient along the coordinate axes.

    The gradient is PyTorch's first derivative (right for these functions), so this
    reference does not involve any double backward.  Error ``O(h^2) + O(eps / h)``:
    about 1e-9 relative at h = 1e-5 in float64.
    """
    params = list(model.parameters())
    h = 1e-5

    def grad() -> torch.Tensor:
        g = torch.autograd.grad(loss(model(x), y), params)
        return torch.cat([t.reshape(-1) for t in g])

    columns = []
    with torch.no_grad():
        flat = [p.view(-1) for p in params]
    for k in range(sum(p.numel() for p in params)):
        i = k
        for part in flat:
            if i < part.numel():
                break
            i -= part.numel()
        with torch.no_grad():
            part[i] += h
        up = grad()
        with torch.no_grad():
            part[i] -= 2 * h
        down = grad()
        with torch.no_grad():
            part[i] += h
        columns.append(((up - down) / (2 * h)).numpy())
    return np.stack(columns, axis=1)


def _weight_normed_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 3)
    ).double()
    return net


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0, 1])


# ------------------------------------------------------------------------ weight norm
def test_weight_norm_replacement_is_torchs_formula_with_exact_second_derivatives() -> None:
    g = torch.Generator().manual_seed(0)
    for dim, g_shape in [(0, (3, 1, 1)), (1, (1, 4, 1)), (2, (1, 1, 2)), (-1, ())]:
        v = torch.randn(3, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
        gain = torch.randn(g_shape, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.allclose(weight_norm(v, gain, dim), torch._weight_norm(v, gain, dim))
        assert torch.autograd.gradgradcheck(lambda a, b, d=dim: weight_norm(a, b, d), (v, gain))


def _written_out_hessian(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Exact reference: ``w = g v / ||v||`` (rows) by hand, differentiated twice."""
    names = [n for n, _ in net.named_parameters()]
    assert names == [
        "0.bias",
        "0.parametrizations.weight.original0",
        "0.parametrizations.weight.original1",
        "2.weight",
        "2.bias",
    ]
    w0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        b, gain, v = w[:4], w[4:8].view(4, 1), w[8:20].view(4, 3)
        W2, b2 = w[20:32].view(3, 4), w[32:35]
        W = gain * v / v.norm(dim=1, keepdim=True)
        return F.cross_entropy(torch.tanh(x @ W.T + b) @ W2.T + b2, y)

    return torch.autograd.functional.hessian(loss_of, w0).numpy()


def test_weight_normed_mlp_hessian_equals_the_written_out_formula() -> None:
    net, (x, y) = _weight_normed_mlp(), _batch()
    ref = _written_out_hessian(net, x, y)
    scale = np.abs(ref).max()
    for cache in (True, False):
        H = _dense(HessianOperator(net, nn.CrossEntropyLoss(), (x, y), cache=cache))
        assert np.abs(H - ref).max() <= 1e-12 * scale, cache


def _conv1d_weight_norm() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        parametrizations.weight_norm(nn.Conv1d(2, 3, 3)),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(9, 3),
    ).double()


def _linear_weight_norm_dim(dim: int | None) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(3)
        layer = parametrizations.weight_norm(nn.Linear(3, 4), dim=dim)
        return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 3)).double()

    return make


def _legacy_hook_weight_norm() -> nn.Module:
    torch.manual_seed(4)
    with warnings.catch_warnings():  # torch.nn.utils.weight_norm is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        layer = nn.utils.weight_norm(nn.Linear(3, 4))
    return nn.Sequential(layer, nn.Tanh(), nn.Linear(4, 3)).double()


MODELS = {
    "conv1d": (_conv1d_weight_norm, (7, 2, 5)),
    "linear-dim1": (_linear_weight_norm_dim(1), (7, 3)),
    "linear-dim-none": (_linear_weight_norm_dim(None), (7, 3)),
    "legacy-hook": (_legacy_hook_weight_norm, (7, 3)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_weight_normed_models_hessian_equals_gradient_differences(name: str) -> None:
    make, shape = MODELS[name]
    net = make()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    ref = _gradient_differences(net, F.cross_entropy, x, y)
    H = _dense(HessianOperator(net, nn.CrossEntropyLoss(), (x, y)))
    assert np.abs(H - ref).max() <= 1e-6 * np.abs(ref).max()
    assert np.array_equal(H, H.T) or np.abs(H - H.T).max() <= 1e-13 * np.abs(H).max()


def test_functions_built_on_hessian_products_are_repaired_too() -> None:
    """loss_stats differentiates twice through its own functional forward."""
    net, (x, y) = _weight_normed_mlp(), _batch()
    dense = _written_out_hessian(net, x, y)
    z = np.random.default_rng(0).standard_normal(dense.shape[0])
    z /= np.linalg.norm(z)
    stats = loss_stats(net, nn.CrossEntropyLoss(), (x, y), z=z, num_probes=0)
    assert stats.hess_mu == pytest.approx(float(z @ dense @ z), rel=1e-10)
    assert stats.hess_mean_norm_sq == pytest.approx(float(np.sum((dense @ z) ** 2)), rel=1e-10)


def test_first_order_operators_unchanged_on_weight_norm() -> None:
    """The GGN and Fisher use first derivatives only: the same with or without repair."""
    net, (x, y) = _weight_normed_mlp(), _batch()
    G = _dense(GGNOperator(net, nn.CrossEntropyLoss(), (x, y)))
    assert np.allclose(G, dense_ggn(net, nn.CrossEntropyLoss(), (x, y)).numpy(), rtol=0, atol=1e-13)
    Fe = _dense(FisherOperator(net, nn.CrossEntropyLoss(), (x, y), kind="empirical"))
    assert np.all(np.linalg.eigvalsh(Fe) >= -1e-12)


def test_model_is_untouched_and_weight_norm_still_fused_outside_products() -> None:
    net, (x, y) = _weight_normed_mlp(), _batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    HessianOperator(net, nn.CrossEntropyLoss(), (x, y)) @ np.ones(35)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    seen: list[object] = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Record():
        net(x)
    assert torch._weight_norm in seen  # the user's own forward is PyTorch's


# ------------------------------------------------------------ chunked linear cross-entropy
@needs_linear_ce
def test_chunked_linear_cross_entropy_is_the_reference_inside_products() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 2, 2, 0])
    options = nn.LinearCrossEntropyOptions(batch_chunk_size=2)

    def chunked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.linear_cross_entropy(a, b, y, options=options)

    assert not torch.autograd.gradgradcheck(chunked, (x, W), raise_exception=False)
    with DropoutOffMode():
        assert torch.autograd.gradgradcheck(chunked, (x, W))
        value = chunked(x, W)
    assert torch.allclose(value, F.cross_entropy(F.linear(x, W), y))
    assert torch.allclose(linear_cross_entropy_reference(x, W, y, options=options), value)


@needs_linear_ce
def test_loss_calling_chunked_linear_cross_entropy_is_refused() -> None:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 1, 0])
    chunked = nn.LinearCrossEntropyLoss(
        4, 3, options=nn.LinearCrossEntropyOptions(batch_chunk_size=2)
    ).double()
    chunked.requires_grad_(False)
    for cls in (HessianOperator, GGNOperator):
        with pytest.raises(ValueError, match=r"Argument 'loss_fn'.*chunking.*options=None"):
            cls(net, chunked, (x, y))
    # the same loss unchunked: accepted, and exact against gradient differences
    plain = nn.LinearCrossEntropyLoss(4, 3).double().requires_grad_(False)
    plain.load_state_dict(chunked.state_dict())
    H = _dense(HessianOperator(net, plain, (x, y)))
    ref = _gradient_differences(net, plain, x, y)
    assert np.abs(H - ref).max() <= 1e-6 * np.abs(ref).max()


def test_check_loss_second_derivatives_returns_the_value() -> None:
    out, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    assert torch.equal(
        check_loss_second_derivatives(F.cross_entropy, out, y), F.cross_entropy(out, y)
    )


# ------------------------------------------------------------------ losses with parameters
class TemperatureLoss(nn.Module):
    """Cross-entropy with a learnt temperature: a loss holding a trainable parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.log_t = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out / self.log_t.exp(), y)


def test_loss_with_trainable_parameters_is_refused_and_frozen_one_accepted() -> None:
    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 2, 1, 0])
    loss = TemperatureLoss()
    with pytest.raises(ValueError, match=r"'loss_fn'.*without trainable parameters.*'log_t'"):
        HessianOperator(net, loss, (x, y))
    loss.requires_grad_(False)
    H = _dense(HessianOperator(net, loss, (x, y)))
    ref = _gradient_differences(net, loss, x, y)
    assert np.abs(H - ref).max() <= 1e-6 * np.abs(ref).max()


# ------------------------------------------------------------------------ embeddings
class Bag(nn.Module):
    """Embedding-tanh-mean-linear; indices repeat within the batch."""

    def __init__(self, **embedding_options: bool) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(9)
        self.emb = nn.Embedding(5, 3, **embedding_options).double()
        self.out = nn.Linear(3, 2).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)).mean(1))


@pytest.mark.parametrize("option", ["scale_grad_by_freq", "sparse"])
def test_embedding_options_do_not_change_the_curvature(option: str) -> None:
    """``scale_grad_by_freq`` made every operator non-symmetric (by 22 % of its norm),
    ``sparse`` made every product fail; both now give the plain embedding's curvature."""
    x = torch.tensor([[0, 1, 1], [3, 1, 0], [4, 1, 0]])
    y = torch.tensor([0, 1, 1])
    model, plain = Bag(**{option: True}), Bag()
    loss = nn.CrossEntropyLoss()
    w0 = torch.cat([p.detach().reshape(-1) for p in plain.parameters()])
    names = [n for n, _ in plain.named_parameters()]

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, torch.split(w, [p.numel() for p in plain.parameters()])))
        params = {n: parts[n].view_as(p) for n, p in plain.named_parameters()}
        return loss(torch.func.functional_call(plain, params, (x,)), y)

    H_ref = torch.autograd.functional.hessian(loss_of, w0).numpy()  # plain torch, no mode
    H = _dense(HessianOperator(model, loss, (x, y)))
    assert np.abs(H - H.T).max() <= 1e-15 * np.abs(H).max()
    assert np.abs(H - H_ref).max() <= 1e-12 * np.abs(H_ref).max()
    G = _dense(GGNOperator(model, loss, (x, y)))
    G_ref = dense_ggn(plain, loss, (x, y)).numpy()
    assert np.abs(G - G_ref).max() <= 1e-12 * np.abs(G_ref).max()
    Fe = _dense(FisherOperator(model, loss, (x, y), kind="empirical"))
    assert np.abs(Fe - Fe.T).max() <= 1e-15 * np.abs(Fe).max()
    assert np.linalg.eigvalsh(Fe).min() >= -1e-14 * np.abs(Fe).max()


class CosineHead(nn.Module):
    """Two projections compared by ``nn.CosineSimilarity`` (norms below ``eps`` when
    ``scale`` is small: the clamp is active)."""

    def __init__(self, eps: float, scale: float) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 12)
        self.out = nn.Linear(2, 3)
        self.cos = nn.CosineSimilarity(dim=-1, eps=eps)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale * self.proj(x)
        a, b = z[:, :6].unflatten(1, (2, 3)), z[:, 6:].unflatten(1, (2, 3))
        return self.out(self.cos(a, b))


@pytest.mark.parametrize("clamped", [True, False])
def test_cosine_similarity_curvature_is_the_functions(clamped: bool) -> None:
    """PyTorch clamps the norms to ``eps`` with gradients off: with norms below ``eps``
    its gradient, and so every Hessian built on it, was not the function's (Hessian
    quadratic forms 57 % off the loss's second differences here).  The reference is
    independent of PyTorch's derivatives: second differences of loss values."""
    torch.manual_seed(0)
    model = CosineHead(eps=0.5, scale=0.1 if clamped else 10.0).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    data, loss = (x, y), nn.CrossEntropyLoss()
    with torch.no_grad():
        z = model.scale * model.proj(x)
        norms = torch.cat([z[:, :6].unflatten(1, (2, 3)), z[:, 6:].unflatten(1, (2, 3))]).norm(
            dim=-1
        )
    assert bool((norms < 0.5).all()) if clamped else bool((norms > 0.5).all())
    H = _dense(HessianOperator(model, loss, data))
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]

    def loss_at(step: float, v: torch.Tensor) -> float:
        with torch.no_grad():
            for p, p0, part in zip(params, w0, torch.split(v, [p.numel() for p in params])):
                p.copy_(p0 + step * part.view_as(p))
            value = float(loss(model(x), y))
            for p, p0 in zip(params, w0):
                p.copy_(p0)
        return value

    h = 1e-3
    for seed in range(2):
        v = torch.randn(
            H.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        v /= v.norm()
        second = (loss_at(h, v) - 2 * loss_at(0.0, v) + loss_at(-h, v)) / h**2
        quadratic = float(v.numpy() @ H @ v.numpy())
        # truncation error O(h^2) of the second difference, rounding 4 eps |L| / h^2
        assert abs(quadratic - second) <= 1e-5 * abs(second) + 1e-8
    if not clamped:  # where PyTorch is right nothing changes
        grads = torch.autograd.grad(loss(model(x), y), params, create_graph=True)
        v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        parts = [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]
        torch_hv = torch.cat([t.reshape(-1) for t in torch.autograd.grad(grads, params, parts)])
        np.testing.assert_allclose(H @ v.numpy(), torch_hv.numpy(), rtol=1e-12, atol=1e-14)


class PaddedScores(nn.Module):
    """One score per position from an embedding with ``padding_idx`` (a QA start head)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3, padding_idx=0)
        self.out = nn.Linear(3, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(ids))).squeeze(-1)


def test_the_padding_row_has_the_same_curvature_on_every_path() -> None:
    """PyTorch gives the ``padding_idx`` row no gradient in reverse mode but a tangent in
    forward mode: the GGN of one cached batch and that of a list of batches, a loader or
    ``cache=False`` differed by 3 %.  Every path now has the loss's derivatives (the
    finite differences of the loss, whose outputs depend on the pad row)."""
    torch.manual_seed(0)
    model = PaddedScores().double()
    with torch.no_grad():
        model.emb.weight[0].normal_()  # a trained model's pad row is not zero
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 6, (4, 5), generator=g)
    ids[0, 3:] = 0  # pad tokens in the input
    y = torch.tensor([1, 0, 4, 2])
    loss, batch = nn.CrossEntropyLoss(), (ids, y)
    halves = [(ids[:2], y[:2]), (ids[2:], y[2:])]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, y), batch_size=2)
    G = _dense(GGNOperator(model, loss, batch))
    assert np.abs(G[:3]).max() > 1e-3  # the pad row's rows are not zero
    for data, kw in (([batch], {}), (batch, {"cache": False}), (halves, {}), (loader, {})):
        other = _dense(GGNOperator(model, loss, data, **kw))
        np.testing.assert_allclose(other, G, rtol=1e-12, atol=1e-14 * np.abs(G).max())
    Fe = _dense(FisherOperator(model, loss, batch, kind="empirical"))
    Fe_list = _dense(FisherOperator(model, loss, halves, kind="empirical"))
    np.testing.assert_allclose(Fe_list, Fe, rtol=1e-12, atol=1e-14 * np.abs(Fe).max())
    H = _dense(HessianOperator(model, loss, batch))
    params = list(model.parameters())
    w0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [p.numel() for p in params])
        named = {n: t.view_as(p) for (n, p), t in zip(model.named_parameters(), parts)}
        return loss(torch.func.functional_call(model, named, (ids,)), y)

    def second_difference(i: int, h: float = 1e-4) -> float:
        e = torch.zeros_like(w0)
        e[i] = h
        return float((loss_of(w0 + e) - 2 * loss_of(w0) + loss_of(w0 - e)) / h**2)

    with torch.no_grad():
        for i in range(3):  # the pad row's diagonal against second differences of loss values
            assert abs(H[i, i] - second_difference(i)) <= 1e-6 * abs(H).max()


class SqueezeExcite(nn.Module):
    """MobileNetV3's squeeze-excitation gate, ``nn.Hardsigmoid`` (``written``: by hand)."""

    def __init__(self, written: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.reduce, self.expand = nn.Linear(3, 2), nn.Linear(2, 3)
        self.gate = nn.Hardsigmoid(inplace=True)
        self.head = nn.Linear(3, 2)
        self.written = written

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.hardswish(self.conv(x))
        s = self.expand(F.relu(self.reduce(z.mean((2, 3)))))
        s = F.relu6(s + 3) / 6 if self.written else self.gate(s)
        return self.head((z * s[:, :, None, None]).mean((2, 3)))


def test_hardsigmoid_has_second_derivatives_in_products() -> None:
    """PyTorch has no double backward for ``hardsigmoid``: every Hessian product through
    MobileNetV3's gates failed.  Products now equal those of the gate written out as
    ``relu6(x + 3) / 6`` (plain PyTorch, ``torch.autograd.functional.hessian``)."""
    torch.manual_seed(0)
    model, written = SqueezeExcite().double(), SqueezeExcite(written=True).double()
    written.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 1, 5, 5, generator=g, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    loss = nn.CrossEntropyLoss()
    names = [n for n, _ in written.named_parameters()]
    shapes = [p.shape for p in written.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in written.parameters()])

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        parts = torch.split(w, [s.numel() for s in shapes])
        named = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return loss(torch.func.functional_call(written, named, (x,)), y)

    H_ref = torch.autograd.functional.hessian(loss_of, w0).numpy()
    H = _dense(HessianOperator(model, loss, (x, y)))
    np.testing.assert_allclose(H, H_ref, rtol=1e-10, atol=1e-12 * np.abs(H_ref).max())
    with pytest.raises(RuntimeError, match="hardsigmoid"):  # outside products: PyTorch's kernel
        w = w0.clone().requires_grad_(True)
        parts = torch.split(w, [s.numel() for s in shapes])
        named = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        (grad,) = torch.autograd.grad(
            loss(torch.func.functional_call(model, named, (x,)), y), w, create_graph=True
        )
        torch.autograd.grad(grad.sum(), w)
