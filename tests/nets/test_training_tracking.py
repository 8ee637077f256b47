"""Curvature tracking in ``train_network(track=...)``, ``curvature train --track-curvature``
and its figure (``plot_curvature_tracking``, ``curvature plot tracking``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nets import curvature_rows
from nets.cli import main
from nets.data import load_dataset
from nets.plots.tracking import EDGE_LABEL, load_tracking_rows, plot_curvature_tracking
from nets.tracker import CurvatureTracker
from nets.training import train_network
from spectral.density import SpectralDensity
from spectral.io import CorruptFileError


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return load_dataset("digits")


def bn_net() -> nn.Module:
    """A tiny MLP with BatchNorm (trained in train mode: batch statistics, running stats)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 10)
    )


def train(tmp: Path, digits, epochs: int = 1, **kw):  # type: ignore[no-untyped-def]
    options = {
        "dataset": digits,
        "model": bn_net(),
        "optimizer_kwargs": {"lr": 0.1, "momentum": 0.9},
        "batch_size": 256,
        "epochs": epochs,
        "progress": False,
        "device": "cpu",
        "save_freq": 1,
    }
    options.update(kw)
    return train_network(tmp, **options)


def read_rows(path: Path) -> list[dict]:
    return curvature_rows.read_rows(path)  # checksums verified, the crc32 keys removed


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """The float64 Hessian of the mean cross-entropy, BatchNorm in train mode (no buffer update)."""
    model = model.double().train()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            size = int(np.prod(shape))
            params[name] = theta[offset : offset + size].reshape(shape)
            offset += size
        out = torch.func.functional_call(model, {**params, **buffers}, (x.double(),))
        return nn.functional.cross_entropy(out, y)

    return torch.autograd.functional.hessian(loss, flat).numpy()


def test_tracking_leaves_the_run_bit_identical_with_batchnorm(tmp_path: Path, digits) -> None:
    plain = train(tmp_path / "plain", digits)
    tracked = train(
        tmp_path / "tracked",
        digits,
        track={"every": 2, "top_k": 2, "trace_probes": 2, "samples": 48, "tol": 2e-5},
    )
    # parameters and BatchNorm running statistics are bitwise those of the untracked run
    for (name, a), b in zip(
        plain.model.state_dict().items(), tracked.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    for a, b in zip(plain.stats, tracked.stats, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"]
    steps_per_epoch = len(range(0, len(digits.train), 256))
    rows = read_rows(tmp_path / "tracked" / "curvature.jsonl")
    assert [r["step"] for r in rows] == list(range(2, steps_per_epoch + 1, 2))
    assert all(r["epoch"] == 1 and r["lr"] == pytest.approx(tracked.stats[0]["lr"]) for r in rows)
    assert all(len(r["top_eigenvalues"]) == 2 and np.isfinite(r["trace"]) for r in rows)
    stats = json.loads((tmp_path / "tracked" / "stats.json").read_text())
    assert stats["curvature"] == rows
    assert "curvature" not in json.loads((tmp_path / "plain" / "stats.json").read_text())


def test_tracked_eigenvalues_are_those_of_the_model_at_that_step(tmp_path: Path, digits) -> None:
    steps_per_epoch = len(range(0, len(digits.train), 256))
    result = train(
        tmp_path,
        digits,
        track={"every": steps_per_epoch, "top_k": 2, "samples": 40, "tol": 2e-5},
    )
    (row,) = read_rows(tmp_path / "curvature.jsonl")
    assert row["step"] == steps_per_epoch  # the end of epoch 1: the final model
    x = torch.stack([digits.train_eval[i][0] for i in range(40)])
    y = torch.stack([torch.as_tensor(digits.train_eval[i][1]) for i in range(40)])
    exact = np.linalg.eigvalsh(dense_hessian(result.model, x, y))[::-1][:2]
    # |theta - lambda| <= residual (float32 products: plus their rounding, ~1e-6 relative)
    bound = np.asarray(row["residuals"]) + 1e-5 * np.abs(exact)
    assert np.all(np.abs(np.asarray(row["top_eigenvalues"]) - exact) <= bound)


def test_resumed_tracked_run_continues_the_rows(tmp_path: Path, digits) -> None:
    track = {"every": 2, "top_k": 1, "samples": 32}
    whole = tmp_path / "whole"
    train(whole, digits, epochs=2, track=track)
    part = tmp_path / "part"
    train(part, digits, epochs=1, track=track)
    train(part, digits, epochs=2, track=track, resume=True)
    a, b = read_rows(whole / "curvature.jsonl"), read_rows(part / "curvature.jsonl")
    for row in a + b:
        del row["seconds"]
    assert a == b
    assert json.loads((part / "stats.json").read_text())["curvature"] == read_rows(
        part / "curvature.jsonl"
    )


def test_a_users_tracker_and_bad_track_arguments(tmp_path: Path, digits) -> None:
    net = bn_net()
    batch = (torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))
    tracker = CurvatureTracker(net, nn.CrossEntropyLoss(), batch, every=3, top_k=1)
    train(tmp_path / "own", digits, model=net, track=tracker)
    assert [r["step"] for r in tracker.rows] == [3, 6][: len(tracker.rows)] and tracker.rows
    assert read_rows(tmp_path / "own" / "curvature.jsonl") == json.loads(json.dumps(tracker.rows))
    # the run directory's copy of a user's tracker rows carries the checksums too
    lines = (tmp_path / "own" / "curvature.jsonl").read_text().splitlines()
    assert lines and all('"crc32": ' in line for line in lines)
    with pytest.raises(ValueError, match="track"):
        train(tmp_path / "bad", digits, track={"evry": 2})
    with pytest.raises(TypeError, match="track"):
        train(tmp_path / "bad2", digits, track=3)


def test_cli_flag_rows_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = ["train", "--dir", str(run), "--model", "MLP", "--epochs", "1", "--batch-size", "512"]
    rc = main([*args, "--track-curvature", "every=1,top_k=2,trace_probes=2,samples=32",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    rows = read_rows(run / "curvature.jsonl")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 2
    assert all(len(r["top_eigenvalues"]) == 2 and "trace" in r for r in rows)
    assert json.loads((run / "stats.json").read_text())["curvature"] == rows
    assert main(["plot", "tracking", str(run)]) == 0
    assert (run / "curvature.png").stat().st_size > 0
    capsys.readouterr()
    for bad, words in (("every=0", "every"), ("evry=3", "evry"), ("top_k=x", "top_k"), ("5", "5")):
        assert main([*args, "--track-curvature", bad, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "--track-curvature" in err and words in err, err


def test_tracking_figure_draws_eigenvalues_edge_trace_and_densities(tmp_path: Path) -> None:
    rows = []
    for i in range(1, 5):
        row = {"step": 10 * i, "top_eigenvalues": [5.0 + i, 2.0], "lr": 0.5 / i, "trace": 20.0 + i,
               "trace_stderr": 0.3}  # fmt: skip
        if i % 2 == 0:
            name = f"curvature.density-{10 * i:08d}.npz"
            SpectralDensity(np.array([0.0, 1.0, 4.0 + i]), np.array([0.5, 0.3, 0.2])).save(
                tmp_path / name
            )
            row["density"] = name
        rows.append(row)
    (tmp_path / "curvature.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot_curvature_tracking(tmp_path, save_path=tmp_path / "fig.png")
    eig, tr, dens = fig.axes[:3]
    assert (eig.get_xlabel(), eig.get_ylabel()) == ("optimiser step", "eigenvalue")
    assert (tr.get_ylabel(), dens.get_ylabel()) == ("trace", "eigenvalue")
    lines = {line.get_label(): line for line in eig.get_lines()}
    edge = lines[EDGE_LABEL]
    np.testing.assert_allclose(edge.get_xdata(), [10, 20, 30, 40])
    np.testing.assert_allclose(edge.get_ydata(), [4.0, 8.0, 12.0, 16.0])  # 2 / (0.5 / i)
    np.testing.assert_allclose(lines[r"$\lambda_{1}$"].get_ydata(), [6.0, 7.0, 8.0, 9.0])
    (image,) = dens.get_images()
    assert image.get_array().shape == (200, 2)  # eigenvalue grid x the two snapshots
    assert (tmp_path / "fig.png").stat().st_size > 0
    # without trace and densities: one panel; no rows is an error naming the argument
    bare = [{"step": 1, "top_eigenvalues": [1.0], "lr": 0.1}]
    assert len(plot_curvature_tracking(bare).axes) == 1
    with pytest.raises(ValueError, match="source"):
        plot_curvature_tracking([])


def test_stats_json_rows_are_checksummed_and_verified_by_the_fallback(
    tmp_path: Path, digits, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: without ``curvature.jsonl``, ``plot tracking DIR`` drew ``stats.json``'s
    rows unverified: an eigenvalue changed tenfold there was plotted without a word."""
    train(tmp_path, digits, track={"every": 2, "top_k": 1, "samples": 16})
    stats_path = tmp_path / "stats.json"
    stats = json.loads(stats_path.read_text())
    assert stats["curvature_crc32"] == curvature_rows.row_checksums(stats["curvature"])
    (tmp_path / "curvature.jsonl").rename(tmp_path / "moved.jsonl")
    assert load_tracking_rows(tmp_path)[0] == stats["curvature"]
    edited = json.loads(json.dumps(stats))
    edited["curvature"][0]["top_eigenvalues"][0] *= 10
    stats_path.write_text(json.dumps(edited))
    with pytest.raises(CorruptFileError, match=r"stats\.json', 'curvature' row 1: checksum"):
        load_tracking_rows(tmp_path)
    assert main(["plot", "tracking", str(tmp_path)]) == 2
    assert not (tmp_path / "curvature.png").exists()
    # a stats.json written before the checksums: read, with a warning that says so
    del stats["curvature_crc32"]
    stats_path.write_text(json.dumps(stats))
    with caplog.at_level("WARNING"):
        assert load_tracking_rows(tmp_path)[0] == stats["curvature"]
    assert "no checksums" in caplog.text and "unverified" in caplog.text


def test_a_changed_top_k_on_resume_names_the_key_and_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: "The input file: expected a file of 'hessian' rows with top_k = 3"."""
    run = tmp_path / "run"
    args = ["train", "--dir", str(run), "--model", "MLP", "--batch-size", "512", "--no-progress"]
    assert main([*args, "--epochs", "1", "--track-curvature", "every=2,top_k=1,samples=16"]) == 0
    rows = (run / "curvature.jsonl").read_text()
    capsys.readouterr()
    resume = ["--resume", str(run / "checkpoint-00001.pt")]
    assert (
        main([*args, "--epochs", "2", *resume, "--track-curvature", "every=2,top_k=2,samples=16"])
        == 2
    )
    err = capsys.readouterr().err
    assert "Option --track-curvature top_k:" in err and "curvature.jsonl" in err, err
    assert "received 2." in err and "(1 at line 1" in err, err
    assert (run / "curvature.jsonl").read_text() == rows
