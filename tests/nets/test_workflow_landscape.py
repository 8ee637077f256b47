"""build_loss_landscape: file format, t = 0 is the checkpoint, Ritz curvature, safety, errors."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nets.checkpoint import save_checkpoint
from nets.data import DatasetSplits, load_dataset
from nets.models import get_model, model_spec
from nets.workflow import build_loss_landscape, compute_eigenspectrum
from nets.workflow._resolve import make_eval_loader
from nets.workflow.landscape import evaluate

N_SAMPLES = 64


def tiny_mlp(seed: int = 0, hidden: int = 6) -> nn.Module:
    return get_model(
        "MLP", num_classes=10, in_channels=1, input_size=8, hidden=(hidden,), seed=seed
    )


def _save(net: nn.Module, path: Path, epoch: int = 1) -> Path:
    save_checkpoint(path, net, None, epoch, dict(model_spec(net) or {}, dataset="digits"))
    return path


@pytest.fixture(scope="module")
def splits() -> DatasetSplits:
    return load_dataset("digits")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, splits: DatasetSplits) -> dict[str, Path]:
    """A checkpoint and its Hessian spectrum with Ritz vectors (12 Lanczos steps)."""
    root = tmp_path_factory.mktemp("landscape")
    ckpt = _save(tiny_mlp(seed=2), root / "checkpoint-00001.pt")
    spectrum = root / "spectrum-00001-hessian"
    compute_eigenspectrum(
        splits, checkpoint_path=ckpt, save_spectrum_path=spectrum, save_eigvec=True,
        lanczos_iters=12, subsample=N_SAMPLES, batch_size=N_SAMPLES, device="cpu",
    )  # fmt: skip
    return {"root": root, "checkpoint": ckpt, "spectrum": spectrum}


def _checkpoint_metrics(checkpoint: Path, splits: DatasetSplits) -> tuple[float, float, float]:
    net = tiny_mlp()
    net.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    net.eval()
    loss = nn.CrossEntropyLoss()
    train = make_eval_loader(splits.train_eval, 32, subsample=N_SAMPLES)
    test = make_eval_loader(splits.test, 32, subsample=N_SAMPLES)
    (train_loss, train_acc), (test_loss, _) = evaluate(net, train, loss), evaluate(net, test, loss)
    return train_loss, train_acc, test_loss


def test_file_format_and_t0_is_the_checkpoint(
    run: dict[str, Path], splits: DatasetSplits, tmp_path: Path
) -> None:
    out = tmp_path / "landscape.npz"
    result = build_loss_landscape(
        splits, model="MLP", dist=0.5, n_points=5, spectrum_path=run["spectrum"],
        checkpoint_path=run["checkpoint"], save_path=out,
        directions=["ritz-top", "ritz-bottom-1", "ritz-min-abs-1"], num_directions=2,
        random_directions=1, filter_normalised=1, planes=["ritz-top-1|random-1"],
        subsample=N_SAMPLES, batch_size=32, device="cpu",
    )  # fmt: skip
    with np.load(out, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    names = [
        "ritz-top-1", "ritz-top-2", "ritz-bottom-1", "ritz-min-abs-1", "random-1",
        "filter-normalised-1",
    ]  # fmt: skip
    assert data["direction_names"].tolist() == names and data["direction_names"].dtype.kind == "U"
    np.testing.assert_array_equal(data["t"], [-0.5, -0.25, 0.0, 0.25, 0.5])
    assert data["t"].dtype == np.float64
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert data[key].dtype == np.float64 and data[key].shape == (6, 5), key
        assert np.all(np.isfinite(data[key]))
    assert data["plane_names"].tolist() == ["ritz-top-1|random-1"]
    for key in ("plane_train_loss", "plane_train_acc", "plane_test_loss", "plane_test_acc"):
        assert data[key].dtype == np.float64 and data[key].shape == (1, 5, 5), key
    values = data["direction_values"]
    assert values.dtype == np.float64 and values.shape == (6,)
    spec = np.load(str(run["spectrum"]) + ".npz", allow_pickle=False)["w"]
    assert values[0] == spec[-1] and values[1] == spec[-2] and values[2] == spec[0]
    assert values[3] == spec[np.argmin(np.abs(spec))] and np.isnan(values[4:]).all()
    for key in ("checkpoint_loss", "config_json", "model_fingerprint"):
        assert data[key].shape == (), key
    assert str(data["model_fingerprint"]) == result.model_fingerprint

    # t = 0 reproduces the checkpoint's loss, on every direction and at the plane's centre
    train_loss, train_acc, test_loss = _checkpoint_metrics(run["checkpoint"], splits)
    assert float(data["checkpoint_loss"]) == pytest.approx(train_loss, rel=1e-6)
    np.testing.assert_allclose(data["train_loss"][:, 2], train_loss, rtol=1e-6)
    np.testing.assert_allclose(data["train_acc"][:, 2], train_acc, rtol=1e-12)
    np.testing.assert_allclose(data["test_loss"][:, 2], test_loss, rtol=1e-6)
    assert data["plane_train_loss"][0, 2, 2] == pytest.approx(train_loss, rel=1e-6)
    # the plane's axes are the curves of its two directions
    np.testing.assert_allclose(data["plane_train_loss"][0, :, 2], data["train_loss"][0], rtol=1e-6)
    np.testing.assert_allclose(data["plane_train_loss"][0, 2, :], data["train_loss"][4], rtol=1e-6)


def test_curvature_along_ritz_vectors_is_their_ritz_value(
    splits: DatasetSplits, tmp_path: Path
) -> None:
    # y^T H y = theta for a unit Ritz vector y = Q s (Rayleigh quotient), so the central
    # difference (L(h) + L(-h) - 2 L(0)) / h^2 recovers the Ritz value (same data, same
    # operator) up to O(h^2) truncation and float32 rounding eps * L / h^2 ~ 1e-3.  A smooth
    # (tanh) network: with ReLU a kink near the checkpoint can spoil the difference.
    net = get_model(
        "MLP", num_classes=10, in_channels=1, input_size=8, hidden=(6,), seed=2, activation="tanh"
    )
    ckpt = _save(net, tmp_path / "tanh.pt")
    compute_eigenspectrum(
        splits, checkpoint_path=ckpt, save_spectrum_path=tmp_path / "s", save_eigvec=True,
        lanczos_iters=12, subsample=N_SAMPLES, batch_size=N_SAMPLES, device="cpu",
    )  # fmt: skip
    h = 0.02
    result = build_loss_landscape(
        splits, dist=h, n_points=3, spectrum_path=tmp_path / "s", checkpoint_path=ckpt,
        directions=["ritz-top-1", "ritz-bottom-1"], subsample=N_SAMPLES, batch_size=N_SAMPLES,
        device="cpu",
    )  # fmt: skip
    loss = result.train_loss
    second = (loss[:, 0] + loss[:, 2] - 2 * loss[:, 1]) / h**2
    np.testing.assert_allclose(second, result.direction_values, rtol=0.01)


def test_paper_table3_call(
    run: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    net = tiny_mlp(seed=4)
    _save(net, tmp_path / "checkpoint-100.pt", epoch=100)
    compute_eigenspectrum(
        dataset="digits", data_path="data/", model="MLP", checkpoint_path="checkpoint-100.pt",
        save_spectrum_path="spectrum-100-hessian", save_eigvec=True, lanczos_iters=4,
        curvature_matrix="hessian", subsample=32, device="cpu",
    )  # fmt: skip
    build_loss_landscape(
        dataset="digits",
        data_path="data/",
        model="MLP",
        dist=1.0,
        n_points=21,
        spectrum_path="spectrum-100-hessian",
        checkpoint_path="checkpoint-100.pt",
        save_path="landscape-100.npz",
    )
    data = np.load("landscape-100.npz", allow_pickle=False)
    assert data["train_loss"].shape == (2, 21) and data["test_loss"].shape == (2, 21)
    assert data["direction_names"].tolist() == ["ritz-top-1", "ritz-top-2"]
    np.testing.assert_allclose(data["train_loss"][:, 10], float(data["checkpoint_loss"]))


def test_refuses_spectrum_of_another_checkpoint_or_model(
    run: dict[str, Path], splits: DatasetSplits, tmp_path: Path
) -> None:
    other = _save(tiny_mlp(seed=9), tmp_path / "other.pt")
    common = {"dataset": splits, "spectrum_path": run["spectrum"], "subsample": 16}
    with pytest.raises(ValueError, match=r"'spectrum_path'.*model_fingerprint"):
        build_loss_landscape(checkpoint_path=other, **common)  # type: ignore[arg-type]
    wider = _save(tiny_mlp(hidden=7), tmp_path / "wider.pt")
    with pytest.raises(ValueError, match=r"'spectrum_path'.*shape"):
        build_loss_landscape(checkpoint_path=wider, **common)  # type: ignore[arg-type]
    compute_eigenspectrum(
        splits, checkpoint_path=run["checkpoint"], save_spectrum_path=tmp_path / "novec",
        lanczos_iters=2, subsample=16, device="cpu",
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="save_eigvec=True"):
        build_loss_landscape(
            splits, checkpoint_path=run["checkpoint"], spectrum_path=tmp_path / "novec"
        )


def test_direction_words_and_eigvec_path(run: dict[str, Path], splits: DatasetSplits) -> None:
    result = build_loss_landscape(
        splits, checkpoint_path=run["checkpoint"], n_points=2, subsample=16,
        spectrum_path=str(run["spectrum"]) + "-eigvec.npz",
        directions=["ritz-top-1", "random", "Filter_Normalized"], random_directions=1,
    )  # fmt: skip
    assert result.direction_names == [
        "ritz-top-1", "random-1", "random-2", "filter-normalised-1",
    ]  # fmt: skip
    assert result.t.tolist() == [-1.0, 1.0]


def test_zero_and_custom_directions(run: dict[str, Path], splits: DatasetSplits) -> None:
    zero = np.zeros(460)
    result = build_loss_landscape(
        splits, checkpoint_path=run["checkpoint"], n_points=4, directions=[zero],
        subsample=N_SAMPLES, device="cpu",
    )  # fmt: skip
    assert result.direction_names == ["custom-1"]
    np.testing.assert_array_equal(result.train_loss[0], result.checkpoint_loss)
    assert result.t.tolist() == pytest.approx([-1.0, -1 / 3, 1 / 3, 1.0])


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


def test_state_unchanged_and_bn_refresh(splits: DatasetSplits) -> None:
    net = bn_model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    net.train()
    nn.functional.cross_entropy(net(x), torch.arange(8)).backward()
    optimizer.step()  # BN running stats, .grad and momentum buffers now exist
    random.seed(1)
    torch.manual_seed(1)
    before_params = copy.deepcopy(net.state_dict())
    before_grads = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    before_opt = copy.deepcopy(optimizer.state_dict())
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    kwargs = {
        "model": net, "dist": 0.5, "n_points": 3, "random_directions": 1, "subsample": 48,
        "seed": 3, "device": "auto",
    }  # fmt: skip
    plain = build_loss_landscape(splits, **kwargs)  # type: ignore[arg-type]
    refreshed = build_loss_landscape(splits, refresh_bn=True, **kwargs)  # type: ignore[arg-type]
    after = net.state_dict()
    for key, value in before_params.items():
        assert torch.equal(value, after[key]), key
    for g, p in zip(before_grads, net.parameters()):
        assert p.grad is not None and torch.equal(g, p.grad)
    assert net.training and all(m.training for m in net.modules())
    momentum = optimizer.state_dict()["state"]
    for k, state in before_opt["state"].items():
        assert torch.equal(state["momentum_buffer"], momentum[k]["momentum_buffer"])
    assert torch.equal(rng[0], torch.get_rng_state())
    assert np.array_equal(rng[1], np.random.get_state()[1])  # noqa: NPY002
    assert rng[2] == random.getstate()
    # refreshing BatchNorm statistics changes perturbed points only
    assert plain.train_loss[0, 1] == refreshed.train_loss[0, 1]
    assert plain.train_loss[0, 0] != refreshed.train_loss[0, 0]


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"dist": -1.0}, ValueError, "'dist'"),
        ({"dist": 0.0}, ValueError, "'dist'"),
        ({"n_points": 1}, ValueError, "'n_points'"),
        ({"n_points": 3.0}, TypeError, "'n_points'"),
        ({"random_directions": -1}, ValueError, "'random_directions'"),
        ({"random_directions": 0}, ValueError, "'directions'"),
        ({"directions": ["ritz-top"]}, ValueError, "'spectrum_path'"),
        ({"directions": ["eigen-top"]}, ValueError, "'directions'"),
        ({"directions": [np.zeros(3)]}, ValueError, "'directions'"),
        # before: "evaluate: the loss of batch 0 is nan", naming no argument
        ({"directions": [np.full(460, np.nan)]}, ValueError, "'directions': expected finite"),
        ({"directions": [np.full(460, np.inf)]}, ValueError, "'directions': expected finite"),
        ({"planes": ["random-1|random-9"]}, ValueError, "'planes'"),
        ({"refresh_bn": 1}, TypeError, "'refresh_bn'"),
    ],
)
def test_bad_arguments(
    run: dict[str, Path],
    splits: DatasetSplits,
    kwargs: dict[str, object],
    exc: type[Exception],
    pattern: str,
) -> None:
    call: dict[str, object] = {
        "dataset": splits, "checkpoint_path": run["checkpoint"], "random_directions": 1,
        "subsample": 16, "device": "cpu",
    }  # fmt: skip
    call.update(kwargs)
    with pytest.raises(exc, match=pattern):
        build_loss_landscape(**call)  # type: ignore[arg-type]
