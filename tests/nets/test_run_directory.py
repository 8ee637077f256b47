"""Runs that must not mix, and outputs that must not replace inputs (an adversarial sweep
of the command line found each of these; every test fails on the code before the fix).

* ``train`` into a directory holding a run replaced its first checkpoints and
  ``stats.json`` and left its later checkpoints: two runs in one directory.
* ``--resume`` with another run's checkpoint (another model) was accepted: the run's
  ``stats.json`` then listed one model's losses for some epochs and the other's after.
* resuming with ``--track-curvature`` and another batch size renumbered the tracker's
  steps (rows 25-45 never existed, all later steps off by 22).
* ``--resume`` with an unreadable ``stats.json`` logged a warning and rewrote the file
  with the new epochs only: the run's history was lost.
* ``compare --out <the checkpoint>``, ``landscape --spectrum S --out S`` and
  ``spectrum --state F --out F`` replaced their own inputs.
* ``--resume checkpoint-00002.pt --epochs 1`` did nothing, silently; ``--save-freq -2``
  was read as 0.
* resuming a tracked run without tracking rewrote ``stats.json`` without its
  ``curvature`` rows.
* ``spectrum --checkpoint stats.json`` was refused as an unsafe pickle, quoting torch's
  advice to load it with ``weights_only=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from nets.cli import main
from nets.curvature_rows import row_checksums
from nets.data import load_dataset
from nets.training import train_network
from spectral.io import CorruptFileError

TINY = ["--model", "MLP", "--batch-size", "512", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def _train(directory: Path, digits: Any, epochs: int, **kw: Any) -> Any:
    options: dict[str, Any] = {
        "dataset": digits,
        "model": "MLP",
        "model_kwargs": {"hidden": (8,)},
        "optimizer_kwargs": {"lr": 0.05, "momentum": 0.9},
        "batch_size": 512,
        "epochs": epochs,
        "save_freq": 1,
        "progress": False,
        "device": "cpu",
        **kw,
    }
    return train_network(str(directory), **options)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(directory.iterdir()) if p.is_file()}


def test_cli_refuses_a_directory_holding_a_run(tmp_path: Path, capsys: Any) -> None:
    run = tmp_path / "run"
    assert main(["train", "--dir", str(run), "--epochs", "2", *TINY]) == 0
    before = _digests(run)
    capsys.readouterr()
    assert main(["train", "--dir", str(run), "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--dir" in err and "holds a run" in err and "Traceback" not in err
    assert _digests(run) == before  # nothing touched
    assert main(["train", "--dir", str(run), "--epochs", "1", "--overwrite", *TINY]) == 0
    names = sorted(p.name for p in run.glob("checkpoint-*.pt"))
    assert names == ["checkpoint-00000.pt", "checkpoint-00001.pt"]  # no epoch-2 leftover
    assert len(json.loads((run / "stats.json").read_text())["epochs"]) == 1


def test_api_replaces_the_whole_previous_run_as_in_the_paper(
    tmp_path: Path, digits: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _train(tmp_path, digits, 3)
    with caplog.at_level(logging.WARNING, logger="nets.training"):
        _train(tmp_path, digits, 1)
    assert "checkpoint-00003.pt" in caplog.text  # named in the warning
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == [
        "checkpoint-00000.pt",
        "checkpoint-00001.pt",
    ]
    with pytest.raises(ValueError, match=r"Argument 'dir'.*holds a run"):
        _train(tmp_path, digits, 1, overwrite=False)
    (tmp_path / "notes.txt").write_text("mine")
    _train(tmp_path, digits, 1)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's files go


def test_a_replacing_run_that_fails_to_start_keeps_the_old_run(tmp_path: Path, digits: Any) -> None:
    _train(tmp_path, digits, 2)
    before = _digests(tmp_path)
    with pytest.raises(ValueError, match="lr"):
        _train(tmp_path, digits, 1, optimizer_kwargs={"lr": float("nan")})
    with pytest.raises(ValueError, match="every"):
        _train(tmp_path, digits, 1, track={"every": 0})  # fails after the files were set aside
    assert _digests(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)  # nothing left aside


def test_resume_refuses_another_models_checkpoint_or_run(tmp_path: Path, digits: Any) -> None:
    _train(tmp_path / "mlp", digits, 1)
    _train(tmp_path / "wide", digits, 1, model_kwargs={"hidden": (16,)})
    _train(tmp_path / "cnn", digits, 1, model="SmallCNN", model_kwargs={})
    before = _digests(tmp_path / "mlp")
    with pytest.raises(ValueError, match=r"Argument 'resume'.*model"):
        _train(tmp_path / "mlp", digits, 2, resume=tmp_path / "cnn" / "checkpoint-00001.pt",
               model="SmallCNN", model_kwargs={})  # fmt: skip
    with pytest.raises(ValueError, match=r"Argument '(resume|checkpoint)'"):
        _train(tmp_path / "mlp", digits, 2, resume=tmp_path / "wide" / "checkpoint-00001.pt")
    assert _digests(tmp_path / "mlp") == before
    resumed = _train(tmp_path / "mlp", digits, 2, resume=True)
    assert [e["epoch"] for e in resumed.stats] == [1, 2]


def test_resume_with_an_unreadable_stats_file_keeps_it(tmp_path: Path, digits: Any) -> None:
    _train(tmp_path, digits, 1)
    stats = tmp_path / "stats.json"
    stats.write_text(stats.read_text()[:-40])  # a truncated write
    broken = _digest(stats)
    with pytest.raises(CorruptFileError, match=r"stats\.json"):
        _train(tmp_path, digits, 2, resume=True)
    assert _digest(stats) == broken


def test_tracking_resume_refuses_another_batch_size(tmp_path: Path, digits: Any) -> None:
    track = {"every": 2, "top_k": 1, "trace_probes": 0, "samples": 32}
    _train(tmp_path, digits, 1, track=track, batch_size=256)
    rows = (tmp_path / "curvature.jsonl").read_text()
    with pytest.raises(ValueError, match=r"Argument 'batch_size'.*256"):
        _train(tmp_path, digits, 2, track=track, batch_size=128, resume=True)
    assert (tmp_path / "curvature.jsonl").read_text() == rows
    # untracked too: the batch size defines the run (tests/nets/test_resume_contract.py)
    with pytest.raises(ValueError, match=r"Argument 'batch_size'.*256.*received 128"):
        _train(tmp_path, digits, 2, batch_size=128, resume=True)


def test_outputs_never_replace_inputs(tmp_path: Path, capsys: Any) -> None:
    run = tmp_path / "run"
    assert main(["train", "--dir", str(run), "--epochs", "1", *TINY]) == 0
    ckpt = run / "checkpoint-00001.pt"
    common = ["--subsample", "64", "--no-progress", "--device", "cpu"]
    spec = run / "spec"
    assert main(["spectrum", "--checkpoint", str(ckpt), "--iters", "4", "--save-eigvec",
                 "--out", str(spec), *common]) == 0  # fmt: skip
    before = _digests(run)
    capsys.readouterr()
    refused = [
        ["compare", "--checkpoint", str(ckpt), "--approx", "diag-ggn", "--iters", "4",
         "--k", "2", "--out", str(ckpt), *common],
        ["landscape", "--checkpoint", str(ckpt), "--spectrum", str(spec), "--n-points", "3",
         "--out", str(spec), *common],
        ["spectrum", "--checkpoint", str(ckpt), "--iters", "4", "--out", str(run / "s"),
         "--state", str(run / "s.npz"), *common],
        ["stats", str(ckpt), "--out", str(ckpt), *common],
        ["plot", "spectrum", str(spec) + ".npz", "--out", str(spec) + ".npz"],
    ]  # fmt: skip
    for argv in refused:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "would replace the input" in err and "Traceback" not in err, err
    assert _digests(run) == before


def test_resume_refuses_another_optimizer(tmp_path: Path, digits: Any) -> None:
    """Before: PyTorch's ``KeyError: 'betas'`` from loading SGD's state into Adam."""
    _train(tmp_path, digits, 1)
    with pytest.raises(ValueError, match=r"Argument 'optimizer'.*'SGD'"):
        _train(tmp_path, digits, 2, resume=True, optimizer="Adam", optimizer_kwargs={"lr": 1e-3})


def test_a_dataset_the_checkpoint_model_cannot_take_is_named(tmp_path: Path, capsys: Any) -> None:
    """Before: PyTorch's bare dtype error (byte tokens into a digits MLP), exit status 1."""
    run = tmp_path / "run"
    assert main(["train", "--dir", str(run), "--epochs", "1", *TINY]) == 0
    capsys.readouterr()
    for command in (["spectrum", "--iters", "3", "--out", str(run / "s")], ["stats"]):
        argv = [command[0], *(["--checkpoint"] if command[0] == "spectrum" else []),
                str(run / "checkpoint-00001.pt"), *command[1:], "--dataset", "text",
                "--subsample", "16", "--no-progress", "--device", "cpu"]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--dataset" in err and "'digits'" in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**70)], "--seed"),
        (["--momentum", "-0.5"], "--momentum"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--momentum", "nan"], "--momentum"),
    ],
)
def test_optimiser_and_seed_values_are_checked_before_any_file(
    tmp_path: Path, capsys: Any, flags: list[str], named: str
) -> None:
    """Before: PyTorch's or numpy's messages naming no flag ("Invalid momentum value"),
    and a NaN momentum surfaced as a diverging loss after files were written."""
    run = tmp_path / "run"
    assert main(["train", "--dir", str(run), "--epochs", "1", *TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert f"Option {named}:" in err and "Traceback" not in err, err
    assert not run.exists() or not any(run.iterdir())


def test_resume_below_the_checkpoints_epoch_is_refused(tmp_path: Path, digits: Any) -> None:
    _train(tmp_path, digits, 2)
    before = _digests(tmp_path)
    ckpt = tmp_path / "checkpoint-00002.pt"
    with pytest.raises(ValueError, match=r"Argument 'epochs'.*resumed \(2.*received 1\."):
        _train(tmp_path, digits, 1, resume=ckpt)
    assert _digests(tmp_path) == before
    assert [e["epoch"] for e in _train(tmp_path, digits, 2, resume=ckpt).stats] == [1, 2]


def test_cli_refuses_epochs_below_the_resumed_checkpoint_and_a_negative_save_freq(
    tmp_path: Path, capsys: Any
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--dir", str(run), "--epochs", "2", *TINY]) == 0
    before = _digests(run)
    capsys.readouterr()
    resume = ["--resume", str(run / "checkpoint-00002.pt")]
    assert main(["train", "--dir", str(run), "--epochs", "1", *TINY, *resume]) == 2
    err = capsys.readouterr().err
    assert "Option --epochs:" in err and "(2" in err and "received 1." in err, err
    assert _digests(run) == before
    fresh = tmp_path / "fresh"
    assert main(["train", "--dir", str(fresh), "--epochs", "1", *TINY, "--save-freq", "-2"]) == 2
    err = capsys.readouterr().err
    assert "Option --save-freq: expected an integer >= 0" in err and "received -2." in err, err
    assert not fresh.exists()


def test_an_untracked_resume_keeps_the_recorded_curvature_rows(tmp_path: Path, digits: Any) -> None:
    _train(tmp_path, digits, 1, track={"every": 1, "top_k": 1, "samples": 16})
    stats = tmp_path / "stats.json"
    recorded = json.loads(stats.read_text())["curvature"]
    assert len(recorded) == 3
    _train(tmp_path, digits, 2, resume=True)
    payload = json.loads(stats.read_text())
    assert [e["epoch"] for e in payload["epochs"]] == [1, 2]
    assert payload["curvature"] == recorded
    assert payload["curvature_crc32"] == row_checksums(recorded)
    # rows that differ from their checksums are not carried on: the resume is refused
    payload["curvature"][0]["top_eigenvalues"][0] *= 10
    stats.write_text(json.dumps(payload))
    edited = _digest(stats)
    with pytest.raises(CorruptFileError, match=r"stats\.json', 'curvature' row 1: checksum"):
        _train(tmp_path, digits, 3, resume=True)
    assert _digest(stats) == edited


def test_a_file_that_is_not_a_checkpoint_is_named_with_its_flag(
    tmp_path: Path, capsys: Any
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--dir", str(run), "--epochs", "1", *TINY]) == 0
    capsys.readouterr()
    stats = str(run / "stats.json")
    common = ["--subsample", "16", "--no-progress", "--device", "cpu"]
    for argv, named in (
        (["spectrum", "--checkpoint", stats, "--out", str(tmp_path / "s"), *common],
         "Option --checkpoint:"),
        (["stats", stats, "--out", str(tmp_path / "l"), *common], "Argument CHECKPOINTS:"),
    ):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{named} File '{stats}' is not a checkpoint" in err, err
        assert "weights_only" not in err and "Traceback" not in err, err
