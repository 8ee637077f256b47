"""compute_eigenspectrum: file format, agreement with eigsh and Hutchinson, state safety."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from nets.checkpoint import save_checkpoint
from nets.data import DatasetSplits, load_dataset
from nets.models import get_model, model_spec
from nets.workflow import compute_eigenspectrum, load_spectrum, model_fingerprint
from nets.workflow._resolve import make_eval_loader
from spectral.estimators import trace
from spectral.quadrature import slq

N_SAMPLES = 96  # seeded subsample of the digits training set: fast, still a real network
BATCH = 96


def tiny_mlp(seed: int = 0) -> nn.Module:
    """460 parameters: 64 -> 6 -> 10."""
    return get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(6,), seed=seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    net = tiny_mlp(seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-00003.pt"
    save_checkpoint(path, net, None, 3, dict(model_spec(net) or {}, dataset="digits"))
    return path


@pytest.fixture(scope="module")
def splits() -> DatasetSplits:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def saved(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The paper's Table 1 call form (tiny sizes): path without '.npz', 'ggn-lanczos'."""
    out = tmp_path_factory.mktemp("spectra") / "spectrum-00003-ggn-lanczos"
    compute_eigenspectrum(
        dataset="digits",
        data_path=None,
        model="MLP",
        checkpoint_path=str(checkpoint),
        save_spectrum_path=str(out),
        save_eigvec=True,
        lanczos_iters=10,
        curvature_matrix="ggn-lanczos",
        subsample=N_SAMPLES,
        batch_size=BATCH,
        device="cpu",
    )
    return out


def _operator(kind: str, checkpoint: Path, splits: DatasetSplits, seed: int = 0) -> object:
    """The operator compute_eigenspectrum builds, constructed directly from curvops."""
    net = tiny_mlp()
    net.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    net.eval()
    loader = make_eval_loader(splits.train_eval, BATCH, subsample=N_SAMPLES, seed=seed)
    cls = HessianOperator if kind == "hessian" else GGNOperator
    return cls(net, nn.CrossEntropyLoss(), loader, bn_mode="train")


def test_spectrum_file_keys_shapes_dtypes(saved: Path, checkpoint: Path) -> None:
    path = Path(str(saved) + ".npz")
    assert path.is_file()
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    m = data["w"].shape[0]
    assert m == 10
    for key in ("w", "eigvals", "gammas", "residuals"):
        assert data[key].dtype == np.float64 and data[key].shape == (m,), key
    np.testing.assert_array_equal(data["w"], data["eigvals"])
    assert np.all(np.diff(data["w"]) >= 0)
    assert abs(data["gammas"].sum() - 1.0) < 1e-12 and np.all(data["gammas"] >= 0)
    assert data["probe_nodes"].shape == (1, 10) and data["probe_weights"].shape == (1, 10)
    assert data["alpha"].shape == (10,) and data["beta"].shape == (9,)
    for key in ("trace", "trace_stderr"):
        assert data[key].dtype == np.float64 and data[key].shape == ()
    for key in ("num_params", "lanczos_iters", "num_probes"):
        assert data[key].dtype == np.int64 and data[key].shape == ()
    assert int(data["num_params"]) == 460 and int(data["num_probes"]) == 1
    for key in ("curvature", "bn_mode", "config_json", "model_fingerprint"):
        assert data[key].dtype.kind == "U" and data[key].shape == (), key
    assert str(data["curvature"]) == "ggn" and str(data["bn_mode"]) == "train"
    config = json.loads(str(data["config_json"]))
    assert config["model"] == "MLP" and config["checkpoint"] == str(checkpoint)
    assert config["subsample"] == N_SAMPLES and config["num_samples"] == N_SAMPLES
    trace_value = 460 * float(np.sum(data["gammas"] * data["w"]))
    assert float(data["trace"]) == pytest.approx(trace_value, rel=1e-12)

    eig = Path(str(saved) + "-eigvec.npz")
    with np.load(eig, allow_pickle=False) as f:
        vec = {k: f[k] for k in f.files}
    assert vec["vectors"].dtype == np.float32 and vec["vectors"].shape == (10, 460)
    np.testing.assert_array_equal(vec["w"], data["w"])
    np.testing.assert_allclose(np.linalg.norm(vec["vectors"], axis=1), 1.0, atol=1e-5)
    assert str(vec["model_fingerprint"]) == str(data["model_fingerprint"])
    assert vec["param_names"].dtype.kind == "U" and vec["param_names"].shape == (4,)
    shapes = json.loads(str(vec["param_shapes_json"]))
    assert sum(int(np.prod(shapes[n])) for n in vec["param_names"]) == 460

    net = tiny_mlp()
    net.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    assert str(data["model_fingerprint"]) == model_fingerprint(net)


def test_load_spectrum_roundtrip(saved: Path) -> None:
    result = load_spectrum(saved)
    assert result.vectors is not None and result.vectors.shape == (10, 460)
    assert result.curvature == "ggn" and result.num_params == 460
    density = result.density()
    assert density.num_probes == 1
    assert density.trace(460) == pytest.approx(result.trace, rel=1e-12)


def test_top_ritz_value_matches_eigsh(
    checkpoint: Path, splits: DatasetSplits, tmp_path: Path
) -> None:
    # 24 steps with full reorthogonalisation on the P = 460 Hessian: the top Ritz pair has
    # converged, and |theta_top - lambda_max| is bounded by its residual |beta_m s_mi|
    # (plus float32 rounding of the products, ~1e-5 relative).
    result = compute_eigenspectrum(
        splits, model=tiny_mlp(), checkpoint_path=checkpoint, lanczos_iters=24,
        curvature_matrix="hessian", subsample=N_SAMPLES, batch_size=BATCH,
        save_spectrum_path=tmp_path / "s.npz", device="cpu",
    )  # fmt: skip
    w = np.load(tmp_path / "s.npz", allow_pickle=False)["w"]
    residual = float(result.residuals[-1])
    op = _operator("hessian", checkpoint, splits)
    top = scipy.sparse.linalg.eigsh(
        op, k=1, which="LA", ncv=20, tol=1e-6, return_eigenvectors=False
    )
    lam = float(top[0])
    assert abs(w[-1] - lam) <= residual + 1e-4 * abs(lam), (w[-1], lam, residual)
    assert residual < 1e-2 * abs(lam)


def test_trace_agrees_with_hutchinson(checkpoint: Path, splits: DatasetSplits) -> None:
    # Independent estimates; the difference is compared with 4 combined standard errors
    # (a two-sided normal event of probability ~6e-5; the seeds make the test deterministic).
    result = compute_eigenspectrum(
        splits, checkpoint_path=checkpoint, lanczos_iters=6, num_probes=2,
        curvature_matrix="hessian", subsample=N_SAMPLES, batch_size=BATCH, seed=5, device="cpu",
    )  # fmt: skip
    op = _operator("hessian", checkpoint, splits, seed=5)
    estimate = trace(op, method="hutchinson", num_matvecs=16, seed=123)
    combined = float(np.hypot(result.trace_stderr, estimate.stderr))
    assert abs(result.trace - estimate.value) <= 4.0 * combined
    assert result.probe_nodes.shape == (2, 6)
    # the pooled measure is SLQ's with the same seed (same probes, same operator)
    ref = slq(op, 6, num_probes=2, seed=5)
    np.testing.assert_allclose(result.values, ref.nodes, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.weights, ref.weights, rtol=1e-5, atol=1e-7)


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, object]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),  # noqa: NPY002
        "python_rng": random.getstate(),
    }


def _assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    for key in ("params", "grads", "buffers"):
        b, a = before[key], after[key]
        assert isinstance(b, dict) and isinstance(a, dict) and b.keys() == a.keys(), key
        for name in b:
            assert torch.equal(b[name], a[name]), (key, name)
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])  # type: ignore[arg-type]
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"])  # type: ignore[arg-type]
    assert before["python_rng"] == after["python_rng"]
    ob, oa = before["optimizer"], after["optimizer"]
    assert isinstance(ob, dict) and isinstance(oa, dict)
    assert ob["param_groups"] == oa["param_groups"]
    for k, state in ob["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(oa["state"][k][name]))


def bn_model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(5, 10),
    )  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return net


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_model_optimizer_and_rng_state_unchanged(curvature: str, splits: DatasetSplits) -> None:
    net = bn_model()
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    nn.functional.cross_entropy(net(x), torch.arange(8)).backward()
    optimizer.step()  # momentum buffers and .grad exist
    net[1].weight.requires_grad_(False)  # a frozen parameter is not selected
    random.seed(3)
    torch.manual_seed(3)
    before = _snapshot(net, optimizer)
    result = compute_eigenspectrum(
        splits, model=net, lanczos_iters=4, curvature_matrix=curvature, subsample=32,
        batch_size=16, device="auto",
    )  # fmt: skip
    _assert_same(before, _snapshot(net, optimizer))
    assert result.num_params == sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert result.curvature == ("fisher" if curvature == "fisher" else curvature)


def test_reproducible_and_seeded(checkpoint: Path, splits: DatasetSplits) -> None:
    kwargs = {
        "checkpoint_path": checkpoint, "lanczos_iters": 5, "subsample": 48, "batch_size": 48,
        "device": "cpu",
    }  # fmt: skip
    a = compute_eigenspectrum(splits, **kwargs)  # type: ignore[arg-type]
    b = compute_eigenspectrum(splits, **kwargs)  # type: ignore[arg-type]
    c = compute_eigenspectrum(splits, seed=1, **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert not np.array_equal(a.values, c.values)
    assert a.config["epoch"] == 3 and a.bn_mode == "train"


def test_parameter_subset(checkpoint: Path, splits: DatasetSplits, tmp_path: Path) -> None:
    result = compute_eigenspectrum(
        splits, checkpoint_path=checkpoint, lanczos_iters=4, subsample=48, batch_size=48,
        params=["layers.2.weight", "layers.2.bias"], save_spectrum_path=tmp_path / "sub",
        save_eigvec=True, bn_mode="eval", device="cpu",
    )  # fmt: skip
    assert result.num_params == 70
    vec = np.load(tmp_path / "sub-eigvec.npz", allow_pickle=False)
    assert vec["vectors"].shape == (4, 70)
    assert vec["param_names"].tolist() == ["layers.2.weight", "layers.2.bias"]
    assert result.config["params"] == ["layers.2.weight", "layers.2.bias"]
    assert str(np.load(tmp_path / "sub.npz", allow_pickle=False)["bn_mode"]) == "eval"


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"lanczos_iters": 0}, ValueError, "'lanczos_iters'"),
        ({"lanczos_iters": -3}, ValueError, "'lanczos_iters'"),
        ({"lanczos_iters": 461}, ValueError, "'lanczos_iters'"),
        ({"lanczos_iters": 2.0}, TypeError, "'lanczos_iters'"),
        ({"curvature_matrix": "kfac"}, ValueError, "'curvature_matrix'"),
        ({"num_probes": 0}, ValueError, "'num_probes'"),
        ({"bn_mode": "frozen"}, ValueError, "'bn_mode'"),
        ({"save_eigvec": "yes"}, TypeError, "'save_eigvec'"),
        ({"subsample": 0}, ValueError, "'subsample'"),
        ({"loss_fn": nn.CrossEntropyLoss(reduction="none")}, ValueError, "'loss_fn'"),
        ({"model": None, "checkpoint_path": None}, ValueError, "'model'"),
        ({"dataset": "mnist"}, ValueError, "'dataset'"),
    ],
)
def test_bad_arguments(
    checkpoint: Path,
    splits: DatasetSplits,
    kwargs: dict[str, object],
    exc: type[Exception],
    pattern: str,
) -> None:
    call: dict[str, object] = {
        "dataset": splits, "checkpoint_path": checkpoint, "subsample": 16, "device": "cpu",
    }  # fmt: skip
    call.update(kwargs)
    with pytest.raises(exc, match=pattern):
        compute_eigenspectrum(**call)  # type: ignore[arg-type]
