"""Shared case matrix for curvops model-curvature tests: models x losses x data layouts x BN modes.

Every case is float64 and tiny (P ~ 100) so that dense references are cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NUM_CLASSES = 3


def make_mlp(seed: int = 0) -> nn.Module:
    """Linear-Tanh-Dropout-Linear, 4 -> 6 -> 3 (P = 51)."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, NUM_CLASSES))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return net.double().train()


def small_classifier() -> nn.Sequential:
    """Linear-Tanh-Linear, 3 -> 5 -> 3 in float64 (P = 38), the same weights every call."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64) - 0.5)
    return net


def small_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Eight inputs of :func:`small_classifier` and their classes (every class present)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return x, torch.tensor([0, 1, 2, 2, 1, 0, 1, 2])


def make_cnn(seed: int = 0) -> nn.Module:
    """Conv(1->2, 3x3)-BatchNorm-Tanh-Flatten-Linear on 1x4x4 inputs (P = 51)."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        bn = net[1]
        bn.running_mean.copy_(torch.randn(2, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(2, generator=g) + 0.5)
        bn.num_batches_tracked.fill_(7)
    return net.double().train()


def make_inputs(model_name: str, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4) if model_name == "mlp" else (n, 1, 4, 4)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def make_targets(loss_name: str, n: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if loss_name == "ce":
        return torch.randint(0, NUM_CLASSES, (n,), generator=g)
    if loss_name == "mse":
        return torch.randn(n, NUM_CLASSES, generator=g, dtype=torch.float64)
    return torch.randint(0, 2, (n, NUM_CLASSES), generator=g).double()


LOSSES: dict[str, Callable[[], nn.Module]] = {
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
}

SIZES = (4, 3, 2)  # unequal batches, N = 9


def make_data(layout: str, x: torch.Tensor, y: torch.Tensor) -> Any:
    if layout == "batch":
        return (x, y)
    if layout == "list":
        out, start = [], 0
        for s in SIZES:
            out.append((x[start : start + s], y[start : start + s]))
            start += s
        return out
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


@dataclass
class Case:
    """One model x loss x data layout x bn_mode combination."""

    model_name: str
    loss_name: str
    layout: str
    bn_mode: str | None

    def build(self) -> tuple[nn.Module, nn.Module, Any]:
        model = make_mlp() if self.model_name == "mlp" else make_cnn()
        n = sum(SIZES)
        x, y = make_inputs(self.model_name, n), make_targets(self.loss_name, n)
        return model, LOSSES[self.loss_name](), make_data(self.layout, x, y)

    @property
    def id(self) -> str:
        return f"{self.model_name}-{self.loss_name}-{self.layout}-{self.bn_mode}"


CASES = [
    Case("mlp", "ce", "batch", None),
    Case("mlp", "mse", "list", None),
    Case("mlp", "bce", "loader", None),
    Case("cnn", "ce", "batch", "train"),
    Case("cnn", "ce", "list", "eval"),
    Case("cnn", "mse", "loader", "train"),
    Case("cnn", "mse", "batch", "eval"),
    Case("cnn", "bce", "list", "train"),
    Case("cnn", "bce", "batch", "eval"),
]


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    """A curvature test case (see :data:`CASES`)."""
    return request.param  # type: ignore[no-any-return]


def random_columns(n: int, k: int = 4, seed: int = 0) -> torch.Tensor:
    """A fixed ``n x k`` float64 test matrix."""
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def relative_error(a: Any, b: Any) -> float:
    """max |a - b| / max |b| (float64; tensors or numpy arrays)."""
    a64 = torch.as_tensor(a).detach().double().cpu()
    b64 = torch.as_tensor(b).detach().double().cpu()
    return float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-300))


class CallCounter:
    """Counts (and optionally breaks) the calls of ``module.name`` for one test."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str, *, fail: bool = False
    ) -> None:
        self.calls = 0
        original = getattr(module, name)

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if fail:
                raise RuntimeError(f"{name} fails on purpose")
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)


class KitchenSink(nn.Module):
    """Every lean operation, in the layouts a CNN uses (P = 309)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.conv1d = nn.Conv1d(4, 3, 2, dilation=1)
        self.fc = nn.Linear(3, 3)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.running_mean.copy_(torch.randn(4, generator=g) * 0.2)
                bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(F.relu(self.bn1(self.conv1(x))))
        h = torch.relu(self.bn2(self.conv2(h)))  # 4 x 2 x 2
        h = self.conv1d(h.flatten(2)).relu()  # 3 x 3
        out: torch.Tensor = self.fc(torch.tanh(h).mean(-1))
        return out
