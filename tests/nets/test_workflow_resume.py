"""Resumable workflow runs: an interrupted compute_loss_stats / build_loss_landscape resumes
from its state file, recomputes only the missing work and returns bit-identical results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch import nn

import nets.workflow.landscape as landscape_module
import nets.workflow.loss_stats as loss_stats_module
from nets.checkpoint import save_checkpoint
from nets.data import DatasetSplits, load_dataset
from nets.models import get_model, model_spec
from nets.workflow import build_loss_landscape, compute_eigenspectrum, compute_loss_stats
from spectral.resume import StateMismatchError

N = 32


@pytest.fixture(scope="module")
def splits() -> DatasetSplits:
    return load_dataset("digits")


def _mlp(seed: int) -> nn.Module:
    return get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(5,), seed=seed)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("ckpts")
    paths = []
    for epoch in range(3):
        net = _mlp(seed=epoch)
        path = root / f"checkpoint-{epoch:05d}.pt"
        save_checkpoint(path, net, None, epoch, dict(model_spec(net) or {}, dataset="digits"))
        paths.append(path)
    return paths


class _Interrupt(Exception):
    """Stands for a kill: raised from inside the computation after some work is done."""


def _fail_after(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, calls: int) -> list[int]:
    """Make ``module.name`` raise on call number ``calls + 1``; return a call counter."""
    original = getattr(module, name)
    counter = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        if counter[0] > calls >= 0:
            raise _Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return counter


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def test_loss_stats_resume_after_interruption(
    splits: DatasetSplits, checkpoints: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw: dict[str, Any] = dict(
        checkpoint_path=checkpoints, batch_size=16, subsample=N, frobenius_probes=1, device="cpu"
    )
    reference = compute_loss_stats(splits, **kw)
    state = tmp_path / "stats-state.npz"
    with monkeypatch.context() as m:
        _fail_after(m, loss_stats_module, "loss_stats", 2)
        with pytest.raises(_Interrupt):
            compute_loss_stats(splits, state_path=state, **kw)
    assert state.is_file()
    with monkeypatch.context() as m:
        counter = _fail_after(m, loss_stats_module, "loss_stats", -1)
        resumed = compute_loss_stats(splits, state_path=state, **kw)
    assert counter[0] == 1  # only the third checkpoint was computed
    _assert_same(reference, resumed)
    with pytest.raises(StateMismatchError, match=r"'checkpoint'.*batch_size"):
        compute_loss_stats(splits, state_path=state, **{**kw, "batch_size": 8})


def test_loss_stats_refuses_a_state_after_a_checkpoint_changed(
    splits: DatasetSplits, tmp_path: Path
) -> None:
    path = tmp_path / "c.pt"
    net = _mlp(seed=0)
    save_checkpoint(path, net, None, 0, dict(model_spec(net) or {}, dataset="digits"))
    kw: dict[str, Any] = dict(checkpoint_path=[path], subsample=N, frobenius_probes=0, device="cpu")
    compute_loss_stats(splits, state_path=tmp_path / "s.npz", **kw)
    other = _mlp(seed=1)
    save_checkpoint(path, other, None, 0, dict(model_spec(other) or {}, dataset="digits"))
    with pytest.raises(StateMismatchError, match="checkpoints"):
        compute_loss_stats(splits, state_path=tmp_path / "s.npz", **kw)


def test_landscape_resume_after_interruption(
    splits: DatasetSplits, checkpoints: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw: dict[str, Any] = dict(
        checkpoint_path=checkpoints[0], dist=0.5, n_points=3, random_directions=2,
        planes=True, subsample=N, batch_size=N, device="cpu",
    )  # fmt: skip
    reference = build_loss_landscape(splits, **kw)
    state = tmp_path / "landscape-state.npz"
    # evaluate is called twice per point (train, test); the origin once; stop inside the plane
    with monkeypatch.context() as m:
        _fail_after(m, landscape_module, "evaluate", 2 * (1 + 2 * 2 + 4))
        with pytest.raises(_Interrupt):
            build_loss_landscape(splits, state_path=state, **kw)
    with monkeypatch.context() as m:
        counter = _fail_after(m, landscape_module, "evaluate", -1)
        resumed = build_loss_landscape(splits, state_path=state, **kw)
    # origin + the plane rows not finished before the interruption (rows 2 and 3 of 3 points)
    assert counter[0] == 2 * (1 + 3 + 2)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "plane_train_loss"):
        np.testing.assert_array_equal(getattr(reference, key), getattr(resumed, key), err_msg=key)
    with pytest.raises(StateMismatchError, match=r"dist|'t'|t="):
        build_loss_landscape(splits, state_path=state, **{**kw, "dist": 0.25})


def test_eigenspectrum_resume_after_interruption(
    splits: DatasetSplits, checkpoints: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted inside the second probe: the restart computes only the missing steps."""
    from curvops.curvature import ModelCurvatureOperator

    kw: dict[str, Any] = dict(
        checkpoint_path=checkpoints[1], lanczos_iters=8, num_probes=2, subsample=N,
        batch_size=N, device="cpu", save_eigvec=True,
    )  # fmt: skip
    reference = compute_eigenspectrum(splits, **kw)
    state = tmp_path / "spectrum-state.npz"
    with monkeypatch.context() as m:  # fingerprint + probe 1 + 5 steps of probe 2
        _fail_after(m, ModelCurvatureOperator, "_matmat_torch", 1 + 8 + 5)
        with pytest.raises(_Interrupt):
            compute_eigenspectrum(splits, state_path=state, checkpoint_every=2, **kw)
    with monkeypatch.context() as m:
        counter = _fail_after(m, ModelCurvatureOperator, "_matmat_torch", -1)
        resumed = compute_eigenspectrum(splits, state_path=state, checkpoint_every=2, **kw)
    assert counter[0] == 1 + 8 - 4  # fingerprint + probe 2 after its state at step 4
    for key in ("values", "weights", "residuals", "probe_nodes", "alpha", "beta", "vectors"):
        np.testing.assert_array_equal(getattr(reference, key), getattr(resumed, key), err_msg=key)
    assert resumed.trace == reference.trace
    with pytest.raises(StateMismatchError, match="lanczos_iters"):
        compute_eigenspectrum(splits, state_path=state, **{**kw, "lanczos_iters": 9})
    with pytest.raises(StateMismatchError, match="checkpoint"):
        compute_eigenspectrum(
            splits,
            state_path=state,
            checkpoint_every=2,
            **{**kw, "checkpoint_path": checkpoints[2]},
        )


def test_cli_spectrum_state_option(checkpoints: list[Path], tmp_path: Path) -> None:
    """``curvature spectrum --state`` passes the state file through; a rerun reuses it."""
    from nets.cli import main
    from spectral.io import load_npz

    argv = [
        "spectrum", "--checkpoint", str(checkpoints[0]), "--iters", "4", "--subsample", "16",
        "--device", "cpu", "--no-progress", "--out", str(tmp_path / "spec"),
        "--state", str(tmp_path / "spec.state.npz"), "--checkpoint-every", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    first = load_npz(tmp_path / "spec.npz")
    assert (tmp_path / "spec.state.npz").is_file()
    assert main(argv) == 0
    np.testing.assert_array_equal(first["w"], load_npz(tmp_path / "spec.npz")["w"])
    assert main([*argv[:4], "5", *argv[5:]]) == 2  # other arguments: refused, status 2


@pytest.mark.parametrize(
    "key", ["alpha", "beta", "probe_nodes", "probe_weights", "probe_residuals", "vectors"]
)
def test_a_spectrum_state_without_a_key_is_corrupt_and_named(
    splits: DatasetSplits, checkpoints: list[Path], tmp_path: Path, key: str
) -> None:
    """Before: a state file with a valid checksum but a missing key (a hand edit, another
    writer) raised a bare ``KeyError``."""
    from spectral.io import CorruptFileError, load_npz, save_npz

    kw: dict[str, Any] = dict(
        checkpoint_path=checkpoints[0], lanczos_iters=4, num_probes=2, subsample=16,
        batch_size=16, device="cpu", save_eigvec=True, state_path=tmp_path / "state.npz",
    )  # fmt: skip
    compute_eigenspectrum(splits, **kw)
    arrays = load_npz(tmp_path / "state.npz")
    del arrays[key]
    save_npz(tmp_path / "state.npz", **arrays)  # a valid checksum of the other arrays
    with pytest.raises(CorruptFileError, match=rf"state\.npz'.*lacks '{key}'"):
        compute_eigenspectrum(splits, **kw)
