"""compute_loss_stats: file format, agreement with dense float64 references, safety, errors."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from curvops.testing import dense_hessian
from nets.checkpoint import save_checkpoint
from nets.data import DatasetSplits, load_dataset
from nets.models import get_model, model_spec
from nets.workflow import STATS_KEYS, compute_loss_stats
from nets.workflow._resolve import make_eval_loader
from nets.workflow.landscape import evaluate

N_SAMPLES = 64
BATCH = 32


def tiny_mlp(seed: int = 0) -> nn.Module:
    """235 parameters: 64 -> 3 -> 10 (tanh, so that curvature varies smoothly)."""
    return get_model(
        "MLP", num_classes=10, in_channels=1, input_size=8, hidden=(3,), seed=seed,
        activation="tanh",
    )  # fmt: skip


@pytest.fixture(scope="module")
def splits() -> DatasetSplits:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("stats")
    paths = []
    for epoch in (1, 2):
        net = tiny_mlp(seed=epoch)
        path = root / f"checkpoint-{epoch:05d}.pt"
        save_checkpoint(path, net, None, epoch, dict(model_spec(net) or {}, dataset="digits"))
        paths.append(path)
    return paths


def test_file_keys_shapes_dtypes(checkpoints: list[Path], tmp_path: Path) -> None:
    out = compute_loss_stats(
        dataset="digits", model="MLP", checkpoint_path=[str(p) for p in checkpoints],
        save_path=tmp_path / "stats", batch_size=BATCH, subsample=N_SAMPLES, device="cpu",
    )  # fmt: skip
    with np.load(tmp_path / "stats.npz", allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    for key in STATS_KEYS:
        assert data[key].dtype == np.float64 and data[key].shape == (2,), key
        assert np.all(np.isfinite(data[key])), key
        np.testing.assert_array_equal(data[key], out[key])
    assert data["epoch"].dtype == np.int64 and data["epoch"].tolist() == [1, 2]
    assert data["checkpoints"].dtype.kind == "U"
    assert data["checkpoints"].tolist() == [str(p) for p in checkpoints]
    assert data["num_batches"].tolist() == [2, 2] and data["num_samples"].tolist() == [64, 64]
    assert str(data["curvature"]) == "hessian"
    config = json.loads(str(data["config_json"]))
    assert config["batch_size"] == BATCH and config["model"] == "MLP"
    assert data["loss_mean"][0] != data["loss_mean"][1]  # two different checkpoints


def _dense_ggn_cross_entropy(
    net: nn.Module, loss: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """float64 GGN of the mean cross-entropy: (1/N) sum_n J_n^T (diag(p_n) - p_n p_n^T) J_n."""
    x = batch[0].double()
    model = copy.deepcopy(net).double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def outputs(w: torch.Tensor) -> torch.Tensor:
        tensors = dict(
            zip(names, (c.view(s) for c, s in zip(w.split([s.numel() for s in shapes]), shapes)))
        )
        return torch.func.functional_call(model, tensors, (x,))

    jac = torch.autograd.functional.jacobian(outputs, flat)  # (N, C, P)
    with torch.no_grad():
        prob = torch.softmax(outputs(flat), dim=1)
        h_out = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
        return torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / x.shape[0]


@pytest.mark.parametrize("curvature", ["hessian", "ggn-lanczos"])
def test_statistics_match_dense_references(
    checkpoints: list[Path], splits: DatasetSplits, curvature: str
) -> None:
    net = tiny_mlp()
    net.load_state_dict(torch.load(checkpoints[0], weights_only=True)["state_dict"])
    num = sum(p.numel() for p in net.parameters())
    z = np.random.default_rng(7).standard_normal(num)
    out = compute_loss_stats(
        splits, checkpoint_path=checkpoints[0], batch_size=BATCH, subsample=N_SAMPLES,
        curvature_matrix=curvature, direction=z, frobenius_probes=8, seed=3, device="cpu",
    )  # fmt: skip
    # float64 references, minibatch by minibatch (the loader the function uses)
    loader = make_eval_loader(splits.train_eval, BATCH, subsample=N_SAMPLES, seed=3)
    loss = nn.CrossEntropyLoss()
    dense = dense_hessian if curvature == "hessian" else _dense_ggn_cross_entropy
    net64 = copy.deepcopy(net).double()
    zt = torch.as_tensor(z / np.linalg.norm(z))
    losses, grads, mats = [], [], []
    for x, y in loader:
        net64.zero_grad()
        value = loss(net64(x.double()), y)
        value.backward()
        losses.append(float(value.detach()))
        grads.append(torch.cat([p.grad.reshape(-1) for p in net64.parameters()]))
        mats.append(dense(net, loss, (x, y)))
    net64.requires_grad_(False)
    g_bar = torch.stack(grads).mean(0)
    c_bar = torch.stack(mats).mean(0)
    cz = [m @ zt for m in mats]
    mu = float(zt @ c_bar @ zt)
    mean_cz = c_bar @ zt
    hess_var = float(torch.stack([v @ v for v in cz]).mean() - mean_cz @ mean_cz)
    expected = {
        "loss_mean": np.mean(losses),
        "loss_var": np.var(losses),
        "grad_mean_norm_sq": float(g_bar @ g_bar),
        "grad_var": float(torch.stack([g @ g for g in grads]).mean() - g_bar @ g_bar),
        "hess_mean_norm_sq": float(mean_cz @ mean_cz),
        "hess_var": hess_var,
        "hess_mu": mu,
        "delta": float((mean_cz - mu * zt) @ (mean_cz - mu * zt)),
        "alpha": np.sqrt(hess_var) / abs(mu),
        "weight_norm_l2": float(torch.cat([p.reshape(-1) for p in net64.parameters()]).norm()),
        "weight_norm_linf": max(float(p.abs().max()) for p in net64.parameters()),
    }
    # float32 products against float64 references: relative 1e-4 (absolute floor for
    # variances that are differences of nearly equal numbers)
    for key, value in expected.items():
        assert out[key][0] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    # the Frobenius estimate within 4 of its standard errors (deterministic seed)
    fro = float((c_bar**2).sum())
    assert abs(out["frobenius_norm_sq"][0] - fro) <= 4 * out["frobenius_norm_sq_stderr"][0]
    # train/test metrics are those of the checkpoint in eval mode
    train_loss, train_acc = evaluate(net.eval(), loader, loss)
    assert out["train_loss"][0] == pytest.approx(train_loss, rel=1e-6)
    assert out["train_acc"][0] == pytest.approx(train_acc, rel=1e-12)
    assert str(out["curvature"]) == ("hessian" if curvature == "hessian" else "ggn")


def test_state_unchanged(splits: DatasetSplits) -> None:
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 10)
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    nn.functional.cross_entropy(net(x), torch.arange(8)).backward()
    optimizer.step()
    random.seed(2)
    torch.manual_seed(2)
    state = copy.deepcopy(net.state_dict())
    grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    opt_state = copy.deepcopy(optimizer.state_dict())
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    out = compute_loss_stats(
        splits, model=net, batch_size=16, subsample=32, curvature_matrix="ggn", device="auto"
    )
    assert out["checkpoints"].tolist() == [""] and out["epoch"].tolist() == [-1]
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    for g, p in zip(grads, net.parameters()):
        assert p.grad is not None and torch.equal(g, p.grad)
    assert net.training
    for k, s in opt_state["state"].items():
        assert torch.equal(
            s["momentum_buffer"], optimizer.state_dict()["state"][k]["momentum_buffer"]
        )
    assert torch.equal(rng[0], torch.get_rng_state())
    assert np.array_equal(rng[1], np.random.get_state()[1])  # noqa: NPY002
    assert rng[2] == random.getstate()


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"curvature_matrix": "fisher"}, ValueError, "'curvature_matrix'"),
        ({"curvature_matrix": "kfac"}, ValueError, "'curvature_matrix'"),
        ({"batch_size": 0}, ValueError, "'batch_size'"),
        ({"frobenius_probes": -1}, ValueError, "'frobenius_probes'"),
        ({"checkpoint_path": []}, ValueError, "'checkpoint_path'"),
        ({"checkpoint_path": 3}, ValueError, "'checkpoint_path'"),
        ({"bn_mode": "both"}, ValueError, "'bn_mode'"),
        # the direction is named as the caller spelt it (before: curvops' own name, 'z')
        ({"direction": np.zeros(235)}, ValueError, "'direction': expected a non-zero finite"),
        ({"direction": np.full(235, np.nan)}, ValueError, "'direction'"),
        ({"direction": np.ones(236)}, ValueError, "'direction': expected a vector of length 235"),
        ({"direction": "up"}, TypeError, "'direction'"),
    ],
)
def test_bad_arguments(
    splits: DatasetSplits, kwargs: dict[str, object], exc: type[Exception], pattern: str
) -> None:
    call: dict[str, object] = {"dataset": splits, "model": tiny_mlp(), "subsample": 16}
    call.update(kwargs)
    with pytest.raises(exc, match=pattern):
        compute_loss_stats(**call)  # type: ignore[arg-type]
