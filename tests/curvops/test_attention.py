"""Attention models (issue 15, items 1-2): products run in train and eval mode, are
deterministic, see no dropout of any kind, equal dense float64 references, and the
user's attention settings and random streams are restored, also after errors.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvops import FisherOperator, GGNOperator, HessianOperator
from curvops.determinism import DropoutOffMode, product_context
from curvops.testing import dense_fisher, dense_ggn, dense_hessian


class AttentionNet(nn.Module):
    """Encoder and decoder layers, a MultiheadAttention, SDPA and F.dropout(training=True)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=p, batch_first=True)
        self.dec = nn.TransformerDecoderLayer(4, 2, dim_feedforward=6, dropout=p, batch_first=True)
        self.mha = nn.MultiheadAttention(4, 2, dropout=p, batch_first=True)
        self.q = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.dec(self.enc(x), x)
        z = self.mha(z, z, z)[0]
        q = self.q(z).unflatten(-1, (2, 2)).transpose(1, 2)
        z = F.scaled_dot_product_attention(q, q, q, dropout_p=self.p).transpose(1, 2).flatten(-2)
        z = F.dropout(z, self.p, training=True) + F.alpha_dropout(z, self.p, training=True)
        z = F.dropout1d(z, self.p, training=True)
        return self.head(z.mean(1))


def _pair(mode: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    noisy = AttentionNet(0.4).double().train(mode == "train")
    clean = AttentionNet(0.0).double().train(mode == "train")
    clean.load_state_dict(noisy.state_dict())
    return noisy, clean


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 5, 4, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1])


OPERATORS = {
    "hessian": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d),
    "hessian-uncached": lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d, cache=False),
    "ggn": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d),
    "ggn-uncached": lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d, cache=False),
    "fisher": lambda m, d: FisherOperator(m, nn.CrossEntropyLoss(), d, kind="mc"),
}


@pytest.mark.parametrize("op_name", sorted(OPERATORS))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attention_products_deterministic_and_dropout_free(mode: str, op_name: str) -> None:
    noisy, clean = _pair(mode)
    data = _batch()
    make = OPERATORS[op_name]
    v = torch.randn(sum(p.numel() for p in noisy.parameters()), 2, dtype=torch.float64)
    a = make(noisy, data) @ v
    b = make(noisy, data) @ v
    assert torch.equal(a, b)
    # the same weights without dropout: the same operations, so the same bits
    assert torch.equal(a, make(clean, data) @ v)


class SmallAttention(nn.Module):
    """A MultiheadAttention, SDPA with dropout and a head (P = 39, for dense references)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(2, 1, dropout=p, batch_first=True)
        self.q = nn.Linear(2, 2)
        self.head = nn.Linear(2, 3)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.mha(x, x, x)[0]
        q = torch.tanh(self.q(z))
        z = F.scaled_dot_product_attention(q, q, z, dropout_p=self.p)
        return self.head(F.dropout(z, self.p, training=True).mean(1))


def test_attention_traced_ggn_dropout_free() -> None:
    """``linearize=True`` (torch.func trace) also runs under the product context."""
    torch.manual_seed(0)
    noisy, clean = SmallAttention(0.4).double(), SmallAttention(0.0).double()
    clean.load_state_dict(noisy.state_dict())
    g = torch.Generator().manual_seed(5)
    data = (torch.randn(3, 4, 2, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1]))
    v = torch.randn(39, 2, generator=g, dtype=torch.float64)
    G = GGNOperator(noisy, nn.CrossEntropyLoss(), data, linearize=True)
    a = G @ v
    assert G._linearize  # the trace did not fall back
    assert torch.equal(a, G @ v)
    reference = GGNOperator(clean, nn.CrossEntropyLoss(), data) @ v
    torch.testing.assert_close(a, reference, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_attention_dense_reference(mode: str) -> None:
    torch.manual_seed(0)
    noisy = SmallAttention(0.4).double().train(mode == "train")
    clean = SmallAttention(0.0).double().train(mode == "train")
    clean.load_state_dict(noisy.state_dict())
    g = torch.Generator().manual_seed(5)
    data = (torch.randn(3, 4, 2, generator=g, dtype=torch.float64), torch.tensor([0, 2, 1]))
    P = sum(p.numel() for p in noisy.parameters())
    eye = torch.eye(P, dtype=torch.float64)
    # reference on the dropout-free model, computed row by row by torch.autograd
    H_ref, G_ref = (
        dense_hessian(clean, nn.CrossEntropyLoss(), data),
        dense_ggn(clean, nn.CrossEntropyLoss(), data),
    )
    H = HessianOperator(noisy, nn.CrossEntropyLoss(), data) @ eye
    G = GGNOperator(noisy, nn.CrossEntropyLoss(), data, cache=False) @ eye
    scale_h, scale_g = H_ref.abs().max(), G_ref.abs().max()
    assert float((H - H_ref).abs().max() / scale_h) < 1e-10
    assert float((G - G_ref).abs().max() / scale_g) < 1e-10
    F_ref = dense_fisher(clean, nn.CrossEntropyLoss(), data, kind="mc", mc_samples=2, seed=3)
    F_op = FisherOperator(noisy, nn.CrossEntropyLoss(), data, kind="mc", mc_samples=2, seed=3)
    assert float(((F_op @ eye) - F_ref).abs().max() / F_ref.abs().max()) < 1e-10


def _settings() -> tuple[object, ...]:
    return (
        torch.backends.mha.get_fastpath_enabled(),
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.math_sdp_enabled(),
        torch.backends.cuda.cudnn_sdp_enabled(),
    )


def _rng_states() -> tuple[object, ...]:
    return (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002


def _assert_rng_equal(a: tuple[object, ...], b: tuple[object, ...]) -> None:
    assert torch.equal(a[0], b[0])  # type: ignore[arg-type]
    assert np.array_equal(a[1], b[1])  # type: ignore[arg-type]
    assert a[2] == b[2]


@pytest.mark.parametrize("user", ["default", "flash-only-no-fastpath"])
def test_user_settings_and_streams_restored_after_products_and_errors(user: str) -> None:
    noisy, _ = _pair("train")
    data = _batch()
    backends = [SDPBackend.FLASH_ATTENTION] if user != "default" else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        previous_fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(user == "default")
        try:
            settings, streams = _settings(), _rng_states()
            H = HessianOperator(noisy, nn.CrossEntropyLoss(), data, cache=False)
            H @ torch.ones(H.shape[0], dtype=torch.float64)
            assert _settings() == settings
            _assert_rng_equal(_rng_states(), streams)

            def bad_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                assert not torch.backends.mha.get_fastpath_enabled()
                assert torch.backends.cuda.math_sdp_enabled()
                raise RuntimeError("boom")

            with pytest.raises(RuntimeError, match="boom"):
                HessianOperator(noisy, bad_loss, data) @ torch.ones(H.shape[0], dtype=torch.float64)
            assert _settings() == settings
            _assert_rng_equal(_rng_states(), streams)
        finally:
            torch.backends.mha.set_fastpath_enabled(previous_fastpath)


def test_every_functional_dropout_is_off_inside_products() -> None:
    x = torch.rand(2, 3, 4, 4, 4) + 1
    with product_context(), DropoutOffMode():
        pairs = [
            (F.dropout(x, 0.9, training=True), x),
            (F.dropout(x, 0.9, True), x),
            (F.dropout1d(x[0, 0], 0.9, training=True), x[0, 0]),
            (F.dropout2d(x[0], 0.9, training=True), x[0]),
            (F.dropout3d(x, 0.9, training=True), x),
            (F.alpha_dropout(x, 0.9, training=True), x),
            (F.feature_alpha_dropout(x, 0.9, training=True), x),
            (torch.dropout(x, 0.9, True), x),
            (torch.nn.Dropout(0.9).train()(x), x),
        ]
        slope = F.rrelu(-x, 0.1, 0.3, training=True)
        q = x[0, 0]
        sdpa = F.scaled_dot_product_attention(q, q, q, dropout_p=0.9)
    for out, expected in pairs:
        assert torch.equal(out, expected)
    torch.testing.assert_close(slope, -x * 0.2, rtol=1e-6, atol=0)
    with sdpa_kernel([SDPBackend.MATH]):  # the backend products use, without dropout
        assert torch.equal(sdpa, F.scaled_dot_product_attention(q, q, q))


class Recurrent(nn.Module):
    """Two-layer ``nn.RNN``/``nn.LSTM``/``nn.GRU`` with inter-layer dropout; ``packed``
    runs it on a packed sequence (the other argument layout of ``torch._VF.lstm``)."""

    def __init__(self, kind: str, p: float, packed: bool) -> None:
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 4, num_layers=2, dropout=p, batch_first=True)
        self.head = nn.Linear(4, 2)
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return self.head(self.rnn(x)[0][:, -1])
        lengths = torch.tensor([6, 4, 3, 3, 2])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
        return self.head(out[:, 1])


class DropPath(nn.Module):
    """Stochastic depth as timm and Hugging Face write it (recognised by its name)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, dtype=x.dtype).add_(1 - self.p).floor_()
        return x / (1 - self.p) * keep


class Residual(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.inner, self.drop_path, self.head = nn.Linear(3, 3), DropPath(p), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.drop_path(torch.tanh(self.inner(x))))


class StableDropout(nn.Module):
    """A hand-written dropout class (as SEW-D's), recognised by its name."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * torch.empty_like(x).bernoulli_(1 - self.p) / (1 - self.p)


class JitteredRouter(nn.Module):
    """A mixture-of-experts gate with input jitter (Mixtral, Switch Transformers)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.jitter_noise = p
        self.gate, self.experts = nn.Linear(3, 2), nn.ModuleList(nn.Linear(3, 2) for _ in range(2))
        self.drop = StableDropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1 - self.jitter_noise, 1 + self.jitter_noise)
        weights = torch.softmax(self.gate(x), -1)
        mixed = sum(w.unsqueeze(-1) * e(x) for w, e in zip(weights.unbind(-1), self.experts))
        return self.drop(mixed)


RANDOM_LAYERS = {
    **{
        f"{kind}{'-packed' if packed else ''}": lambda p, kind=kind, packed=packed: Recurrent(
            kind, p, packed
        )
        for kind in ("RNN", "LSTM", "GRU")
        for packed in (False, True)
    },
    "drop-path": lambda p: Residual(p),
    "stable-dropout-and-router-jitter": lambda p: JitteredRouter(p),
}


@pytest.mark.parametrize("name", sorted(RANDOM_LAYERS))
def test_recurrent_dropout_and_stochastic_depth_are_off_inside_products(name: str) -> None:
    """Before, products were repeatable (the private stream) but those of one random
    subnetwork: 15-68 % off the dropout-free recurrent networks."""
    torch.manual_seed(0)
    noisy = RANDOM_LAYERS[name](0.5).double().train()
    clean = RANDOM_LAYERS[name](0.0).double().train()
    clean.load_state_dict(noisy.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 3, generator=g, dtype=torch.float64)
    x = x if name.startswith(("RNN", "LSTM", "GRU")) else x[:, 0]
    data = (x, torch.tensor([0, 1, 1, 0, 1]))
    v = torch.randn(sum(p.numel() for p in noisy.parameters()), 2, generator=g, dtype=torch.float64)
    ce = nn.CrossEntropyLoss()
    for cls in (HessianOperator, GGNOperator):
        assert torch.equal(cls(noisy, ce, data) @ v, cls(clean, ce, data) @ v), cls.__name__
    assert noisy.training and all(m.training for m in noisy.modules())


def test_dropout_on_again_outside_products() -> None:
    x = torch.ones(1000)
    with product_context(), DropoutOffMode():
        pass
    assert bool((F.dropout(x, 0.5, training=True) == 0).any())


class DropoutCNN(nn.Module):
    """Layers with lean kernels (conv, BatchNorm, ReLU, max pooling) and dropout calls."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout2d(p)
        self.head = nn.Linear(8, 3)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        z = F.dropout(self.drop(z), self.p, training=True).flatten(1)
        return self.head(F.dropout(z, self.p, True))


def test_dropout_off_composes_with_lean_kernels_and_caches() -> None:
    torch.manual_seed(0)
    noisy, clean = DropoutCNN(0.5).double().train(), DropoutCNN(0.0).double().train()
    clean.load_state_dict(noisy.state_dict())
    g = torch.Generator().manual_seed(2)
    data = (torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 1]))
    v = torch.randn(sum(p.numel() for p in noisy.parameters()), 2, generator=g, dtype=torch.float64)
    ce = nn.CrossEntropyLoss()
    for make in (
        lambda m, **kw: HessianOperator(m, ce, data, **kw),
        lambda m, **kw: GGNOperator(m, ce, data, **kw),
    ):
        lean = make(noisy)
        a = lean @ v
        assert torch.equal(a, lean @ v)  # the cached graph
        assert torch.equal(a, make(clean) @ v)
        torch.testing.assert_close(a, make(noisy, lean_kernels=False) @ v, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(a, make(noisy, cache=False) @ v, rtol=1e-12, atol=1e-13)
    # a graph recorded outside a product (dropout active) is never reused by one
    H = HessianOperator(noisy, ce, data)
    batch = next(iter(H.data))
    outside = H.linearization(batch)
    inside = H @ v
    assert H._graph_cache[0][1] is not outside
    assert torch.equal(inside, HessianOperator(clean, ce, data) @ v)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_functions_built_on_products_run_on_attention(mode: str) -> None:
    from curvops import diagonal, stats

    noisy, clean = _pair(mode)
    data = _batch()
    ce = nn.CrossEntropyLoss()
    d_noisy = diagonal.ggn_diagonal(noisy, ce, data)
    assert torch.equal(d_noisy, diagonal.ggn_diagonal(clean, ce, data))
    s_noisy = dataclasses.asdict(stats.loss_stats(noisy, ce, data, num_probes=2))
    s_clean = dataclasses.asdict(stats.loss_stats(clean, ce, data, num_probes=2))
    assert s_noisy.keys() == s_clean.keys()
    for key, value in s_noisy.items():
        assert repr(value) == repr(s_clean[key]), key


class PaddedTransformer(nn.Module):
    """``nn.TransformerEncoder`` with a key padding mask, then a full ``nn.Transformer``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 4, p, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.t = nn.Transformer(4, 2, 1, 1, dim_feedforward=4, dropout=p, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        z = self.enc(x, src_key_padding_mask=mask)
        return self.head(self.t(z, x).mean(1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_with_padding_mask(mode: str) -> None:
    torch.manual_seed(0)
    noisy = PaddedTransformer(0.3).double().train(mode == "train")
    clean = PaddedTransformer(0.0).double().train(mode == "train")
    clean.load_state_dict(noisy.state_dict())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    data = ((x, mask), torch.tensor([0, 2, 1]))
    v = torch.randn(sum(p.numel() for p in noisy.parameters()), generator=g, dtype=torch.float64)
    for make in (HessianOperator, GGNOperator):
        a = make(noisy, nn.CrossEntropyLoss(), data) @ v
        assert torch.equal(a, make(noisy, nn.CrossEntropyLoss(), data) @ v)
        assert torch.equal(a, make(clean, nn.CrossEntropyLoss(), data) @ v)
        uncached = make(noisy, nn.CrossEntropyLoss(), data, cache=False) @ v
        torch.testing.assert_close(uncached, a, rtol=1e-10, atol=1e-12)


class Cdist(nn.Module):
    """``torch.cdist`` has neither a double backward nor a forward-mode derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.cdist(x, self.w)


def _has_double_backward(model: nn.Module) -> bool:
    x = torch.randn(4, 2, dtype=torch.float64)
    (g,) = torch.autograd.grad(model(x).sum(), list(model.parameters()), create_graph=True)
    try:
        torch.autograd.grad(g.sum(), list(model.parameters()), allow_unused=True)
    except (NotImplementedError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize(
    ("make", "need"),
    [
        (lambda m, d: HessianOperator(m, nn.CrossEntropyLoss(), d), "second derivative"),
        (lambda m, d: GGNOperator(m, nn.CrossEntropyLoss(), d, cache=False), "forward-mode"),
    ],
)
def test_missing_derivative_explained(make: object, need: str) -> None:
    """Without a forward-mode derivative the GGN takes ``Jv`` in reverse mode (over the
    double backward): where that is missing too, the error names it."""
    data = (torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    if _has_double_backward(Cdist()):
        if need == "second derivative":
            pytest.skip("this torch has a double backward for torch.cdist (torch >= 2.14)")
        model, v = Cdist(), torch.randn(6, dtype=torch.float64)
        cached = GGNOperator(model, nn.CrossEntropyLoss(), data)
        torch.testing.assert_close(make(model, data) @ v, cached @ v)  # type: ignore[operator]
        return
    settings = _settings()
    op = make(Cdist(), data)  # type: ignore[operator]
    with pytest.raises(NotImplementedError, match="Curvature products need a second derivative"):
        op @ torch.ones(6, dtype=torch.float64)
    assert _settings() == settings


def test_blocks_and_inverse_on_attention_models() -> None:
    from curvops import inverse
    from curvops.blocks import per_layer

    noisy, clean = _pair("train")
    data = _batch()
    ce = nn.CrossEntropyLoss()
    P = sum(p.numel() for p in noisy.parameters())
    b = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    B_noisy, B_clean = (
        per_layer(GGNOperator, noisy, ce, data),
        per_layer(GGNOperator, clean, ce, data),
    )
    assert torch.equal(B_noisy @ b, B_clean @ b)
    G = GGNOperator(noisy, ce, data).damp(1.0)
    x = inverse(G, "cg", tol=1e-12) @ b
    torch.testing.assert_close(G @ x, b, rtol=1e-9, atol=1e-9)
    assert torch.equal(x, inverse(GGNOperator(clean, ce, data).damp(1.0), "cg", tol=1e-12) @ b)


class NumpyNoise(nn.Module):
    """A forward that draws from numpy's (or Python's) global generator."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source == "numpy":
            noise = float(np.random.rand())  # noqa: NPY002 - the case under test
        else:
            noise = random.random()
        return self.lin(x) * (1 + 0.1 * noise)


@pytest.mark.parametrize("source", ["numpy", "python"])
def test_forward_drawing_from_global_numpy_or_python_streams_is_refused(source: str) -> None:
    """Products fork torch's generators only; such a forward would make them random and
    advance the caller's stream.  Refused at construction, the streams put back."""
    model = NumpyNoise(source).double()
    data = (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0]))
    numpy_state = np.random.get_state()[1].copy()  # noqa: NPY002
    python_state = random.getstate()
    name = "numpy's" if source == "numpy" else "Python's"
    with pytest.raises(ValueError, match=rf"'model'.*global random.*drew from {name}"):
        HessianOperator(model, nn.CrossEntropyLoss(), data)
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # noqa: NPY002
    assert random.getstate() == python_state


class SquareWithoutJvp(torch.autograd.Function):
    """A custom Function with a backward but no ``jvp`` (as Bloom's and YOSO's)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_a_custom_function_without_jvp_takes_jv_in_reverse_mode() -> None:
    """The forward-mode GGN of a list of batches failed with PyTorch's bare "You must
    implement the jvp function"; now the product takes ``Jv`` in reverse mode (as the
    cached path does) and gives the GGN."""
    torch.manual_seed(0)
    lin, head = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()

    class Net(nn.Module):
        def __init__(self, custom: bool) -> None:
            super().__init__()
            self.lin, self.head, self.custom = lin, head, custom

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.lin(x)
            return self.head(SquareWithoutJvp.apply(z) if self.custom else z * z)

    model = Net(custom=True)
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]))
    G = GGNOperator(model, nn.CrossEntropyLoss(), [batch])
    cached = GGNOperator(model, nn.CrossEntropyLoss(), [batch], cache=True)
    reference = dense_ggn(Net(custom=False), nn.CrossEntropyLoss(), batch)  # torch.func
    eye = torch.eye(G.shape[0], dtype=torch.float64)
    torch.testing.assert_close(cached @ eye, reference)
    torch.testing.assert_close(G @ eye, reference)
