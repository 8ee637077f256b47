"""The ``curvature`` command line end to end on the embedded digits data, with tiny settings."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nets.cli import OPTIMIZERS, build_parser, format_table, main, user_message
from spectral.io import load_npz, save_npz

SUBCOMMANDS = ("train", "spectrum", "stats", "landscape", "compare", "plot", "demo")
ROOT = Path(__file__).resolve().parents[2]
# One step of each optimiser: 64 training samples in one batch, curvature optimisers cheap.
TINY = ["--epochs", "1", "--subsample", "64", "--batch-size", "64", "--no-progress"]
CHEAP = {
    "LancGN": ["--opt", "lanczos_iters=3"],
    "LancHess": ["--opt", "lanczos_iters=3"],
    "KFAC": ["--opt", "inv_update_freq=1"],
    "EKFAC": ["--opt", "inv_update_freq=1"],
}


def _env() -> dict[str, str]:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def curvature(*args: str) -> subprocess.CompletedProcess[str]:
    """``curvature ARGS`` as a user's shell runs it (this checkout first on the path)."""
    return subprocess.run(
        [sys.executable, "-m", "nets.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        check=False,
        cwd=ROOT,
    )


def curvature_all(commands: dict[str, list[str]]) -> dict[str, tuple[int, str, str]]:
    """Run several ``curvature`` commands at once (each its own process, as from a shell)."""
    running = {
        key: subprocess.Popen(
            [sys.executable, "-m", "nets.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        for key, args in commands.items()
    }
    done = {}
    for key, process in running.items():
        out, err = process.communicate(timeout=600)
        done[key] = (process.returncode, out, err)
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, str, str]]:
    """``curvature train`` with every optimiser the help lists, one subprocess each, at once."""
    root = tmp_path_factory.mktemp("cli")
    commands = {
        name: ["train", "--dir", str(root / name), "--optimizer", name, *TINY, *CHEAP.get(name, [])]
        for name in OPTIMIZERS
    }
    commands["SGD"] += ["--lr", "0.05"]
    return {name: (root / name, *result) for name, result in curvature_all(commands).items()}


@pytest.fixture(scope="module")
def trained(runs: dict[str, tuple[Path, int, str, str]]) -> Path:
    """The SGD run, shared by the downstream commands (spectrum, stats, landscape, plot)."""
    run, rc, out, err = runs["SGD"]
    assert rc == 0, err[-3000:]
    assert "Training summary" in out and "running mean over the epoch" in out
    return run


def test_help_lists_every_optimizer_and_real_defaults() -> None:
    """The help names exactly the optimisers tested below, and the defaults it quotes hold."""
    from nets.optim.registry import get_optimizer, optimizer_options

    help_text = " ".join(
        build_parser()._subparsers._group_actions[0].choices["train"].format_help().split()
    )  # type: ignore[union-attr]
    listed = re.search(r"--optimizer OPTIMIZER (.*?), or any other", help_text)
    assert listed is not None
    assert tuple(listed.group(1).split(", ")) == OPTIMIZERS
    assert "(default: from the checkpoint)" not in help_text
    assert "--save-freq SAVE_FREQ checkpoint every N epochs" in help_text
    assert "default: 25; with --resume, the run's" in help_text and "--dataset DATASET" in help_text
    model = torch.nn.Linear(2, 2)
    quoted_lr = {"SGD": 0.001, "Adam": 0.001, "SWATS": 0.001, "LancGN": 1.0, "LancHess": 1.0,
                 "KFAC": 0.01, "EKFAC": 0.01}  # fmt: skip
    for name in OPTIMIZERS:
        options = optimizer_options(name)
        assert options is not None and "lr" in options and "weight_decay" in options
        group = get_optimizer(name, model).param_groups[0]
        assert group["lr"] == quoted_lr[name], name  # the help's "default: the optimizer's own"
        assert group.get("weight_decay", 0.0) == 0.0, name
        assert ("momentum" in options) == (name in ("SGD", "KFAC", "EKFAC")), name
    assert inspect.signature(torch.optim.SGD).parameters["momentum"].default == 0


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_train_with_every_listed_optimizer(
    optimizer: str, runs: dict[str, tuple[Path, int, str, str]]
) -> None:
    """``curvature train --optimizer X`` works for every name the help lists (one step)."""
    run, rc, out, err = runs[optimizer]
    assert rc == 0, err[-3000:]
    assert not err.strip()  # no warnings, no traceback
    assert "Training summary" in out and re.search(rf"optimizer\s+{optimizer}\n", out)
    stats = json.loads((run / "stats.json").read_text())
    assert stats["config"]["optimizer"] == optimizer
    assert stats["config"]["dataset_options"]["subsample"] == 64
    assert "train mode" in stats["definitions"]["train_loss"]
    assert "no augmentation" in stats["definitions"]["train_loss"]  # digits have none
    assert "eval mode" in stats["definitions"]["test_loss"]
    assert (run / "checkpoint-00001.pt").is_file()
    kwargs = torch.load(run / "checkpoint-00001.pt", weights_only=True)["config"]
    assert "momentum" not in kwargs["optimizer_kwargs"]  # a flag not given is not passed


def test_optimizer_options_not_taken_are_errors_naming_the_flag(tmp_path: Path) -> None:
    done = curvature("train", "--dir", str(tmp_path), "--optimizer", "Adam", "--momentum", "0.9")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "--momentum is not an option of the optimizer Adam" in done.stderr
    assert not (tmp_path / "stats.json").exists()
    with pytest.raises(Exception, match=r"--opt nesterov=\.\.\. is not an option of"):
        from nets.cli import optimizer_kwargs

        optimizer_kwargs(
            build_parser().parse_args(
                ["train", "--dir", "x", "--optimizer", "LancGN", "--opt", "nesterov=true"]
            )
        )
    args = build_parser().parse_args(["train", "--dir", "x", "--opt", "nesterov=true"])
    assert optimizer_kwargs(args) == {"nesterov": True}  # SGD takes it; nothing else passed


def test_errors_speak_in_flags(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = str(trained / "checkpoint-00001.pt")
    done = curvature("spectrum", "--checkpoint", ckpt, "--iters", "0", "--no-progress")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("curvature spectrum: error: Option --iters:")
    assert "lanczos_iters" not in lines[0]
    args = ["spectrum", "--checkpoint", ckpt, "--curvature", "hesian", "--no-progress"]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Option --curvature:" in lines[0]
    assert "curvature_matrix" not in lines[0]
    message = user_message(
        FileNotFoundError(
            "CIFAR10 data not found: looked for [...] in ['data']. Download x and extract it "
            "into 'data' (giving 'data/cifar-10-batches-py'), or call with download=True "
            "(needs torchvision)."
        )
    )
    assert "download=True" not in message and "--data-path" in message


def test_help_of_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: curvature {command}" in out
        assert "--device" in out or command == "plot"


def test_module_entry_point_help_in_a_subprocess() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nets.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: curvature" in done.stdout
    for command in SUBCOMMANDS:
        assert command in done.stdout


def test_no_subcommand_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_format_table_aligns_columns() -> None:
    text = format_table([("a", "1"), ("longer", "2")], title="T")
    assert text.splitlines() == ["T", "-", "a       1", "longer  2"]
    assert sorted(build_parser()._subparsers._group_actions[0].choices) == sorted(SUBCOMMANDS)  # type: ignore[union-attr]


def test_train_prints_a_summary(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (trained / "stats.json").is_file()
    assert (trained / "checkpoint-00001.pt").is_file()
    rc = main(["plot", "training", str(trained), "--out", str(trained / "training.png")])
    assert rc == 0
    assert "figure" in capsys.readouterr().out
    assert (trained / "training.png").stat().st_size > 0


def test_spectrum_landscape_and_plots(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = trained / "checkpoint-00001.pt"
    rc = main(
        ["spectrum", "--checkpoint", str(ckpt), "--curvature", "hessian", "--iters", "6",
         "--save-eigvec", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "Spectrum summary" in out and "top Ritz value" in out and "negative spectral mass" in out
    spectrum = trained / "spectra" / "spectrum-00001-hessian-lanczos.npz"
    arrays = load_npz(spectrum)
    assert arrays["w"].shape == (6,)

    ggn = trained / "ggn.npz"
    rc = main(
        ["spectrum", "--checkpoint", str(ckpt), "--curvature", "ggn-lanczos", "--iters", "4",
         "--subsample", "200", "--out", str(ggn), "--no-progress"]
    )  # fmt: skip
    assert rc == 0 and str(load_npz(ggn)["curvature"]) == "ggn"

    land = trained / "landscape.npz"
    rc = main(
        ["landscape", "--checkpoint", str(ckpt), "--spectrum", str(spectrum), "--n-points", "3",
         "--num-directions", "1", "--random-directions", "1", "--subsample", "100",
         "--out", str(land), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "Loss landscape" in out and "ritz-top-1" in out
    assert "(1) one full pass over the training split" in out and "eval mode" in out
    assert "directions: unit Euclidean norm" in out
    assert load_npz(land)["train_loss"].shape == (2, 3)

    rc = main(["plot", "spectrum", str(spectrum), "--log-weights"])
    assert rc == 0 and spectrum.with_suffix(".png").stat().st_size > 0
    assert "trace P*sum(w*theta)" in capsys.readouterr().out
    rc = main(["plot", "landscape", str(land), "--metric", "both", "--out", str(land) + ".pdf"])
    assert rc == 0 and Path(str(land) + ".pdf").read_bytes().startswith(b"%PDF")

    diag = trained / "diag.npz"
    save_npz(diag, diagonal=np.abs(np.random.default_rng(0).normal(size=500)))
    fig2 = trained / "fig2.png"
    rc = main(
        ["plot", "comparison", "--hessian", str(spectrum), "--ggn", str(ggn),
         "--diagonal", str(diag), "--out", str(fig2)]
    )  # fmt: skip
    assert rc == 0 and fig2.stat().st_size > 0
    rc = main(["plot", "diag", str(diag)])
    assert rc == 0 and diag.with_suffix(".png").stat().st_size > 0
    rc = main(["plot", "spectrum", str(ggn), "--smooth", "0.05", "--out", str(trained / "g.png")])
    assert rc == 0 and (trained / "g.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "BatchNorm mode of the products  train" in out


def test_stats_subcommand(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = trained / "loss-stats.npz"
    rc = main(
        ["stats", str(trained / "checkpoint-00001.pt"), "--subsample", "128", "--batch-size",
         "64", "--out", str(out_file), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "Loss statistics" in out and "loss (1)" in out and "train loss (2)" in out
    assert "(1) mean of the losses of minibatches of 64" in out
    assert "BatchNorm in train mode" in out
    arrays = load_npz(out_file)
    assert "loss_mean" in arrays
    assert "eval mode" in json.loads(str(arrays["config_json"]))["definitions"]["train_loss"]


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["spectrum", "--checkpoint", str(tmp_path / "missing.pt"), "--no-progress"])
    assert rc == 2
    assert "error" in capsys.readouterr().err
    rc = main(["plot", "spectrum", str(tmp_path / "missing.npz")])
    assert rc == 2
    capsys.readouterr()
    assert main(["train", "--dir", str(tmp_path), "--opt", "no-equals-sign"]) == 2
    assert "--opt expects KEY=VALUE" in capsys.readouterr().err
    assert main(["plot", "comparison", "--hessian", "x.npz"]) == 2
    assert "needs --diagonal" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors: one line too
        main(["spectrum", "--checkpoint", "c.pt", "--iters", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "curvature spectrum: error: argument --iters: invalid int value: 'many' "
        "(see 'curvature spectrum --help')"
    ]


def test_train_subsample_shrinks_only_the_training_split() -> None:
    from nets.cli import _training_data
    from nets.data import load_dataset

    whole = load_dataset("digits")
    args = build_parser().parse_args(["train", "--dir", "x", "--subsample", "64", "--seed", "3"])
    splits = _training_data(args)
    assert len(splits.train) == len(splits.train_eval) == 64
    assert len(splits.test) == len(whole.test)  # the test set stays whole
    assert splits.options["subsample"] == 64
    x, y = splits.train.get_batch(torch.arange(64))
    x_all, y_all = whole.train.get_batch(torch.arange(len(whole.train)))
    rows = [int(torch.nonzero((x_all == xi).flatten(1).all(1))[0]) for xi in x]
    assert len(set(rows)) == 64 and torch.equal(y_all[rows], y)  # real samples, same labels
    assert _training_data(build_parser().parse_args(["train", "--dir", "x"])) == "digits"


def test_compare_grades_approximations(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``curvature compare``: one report per proxy in the file, the table and the figure."""
    ckpt = trained / "checkpoint-00001.pt"
    out = trained / "compare.npz"
    rc = main(
        ["compare", "--checkpoint", str(ckpt), "--approx", "kfac,diag-ggn", "--iters", "8",
         "--k", "2", "--subsample", "64", "--batch-size", "64", "--out", str(out),
         "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Approximations against the exact ggn" in printed
    assert "kfac" in printed and "diag-ggn" in printed
    arrays = load_npz(out)
    assert any(key.startswith("kfac") for key in arrays)
    assert any(key.startswith("diag-ggn") for key in arrays)
    assert out.with_suffix(".png").is_file()
    # the report says what it was computed from, as every file does
    config = json.loads(str(arrays["config_json"]))
    assert config["checkpoint"] == str(ckpt) and config["subsample"] == 64
    assert config["model"] and config["dataset"] == "digits" and config["batch_size"] == 64
    assert config["loss"] == "CrossEntropyLoss" and config["exact"] == "ggn"


def test_compare_refuses_an_unknown_approximation(trained: Path) -> None:
    proc = curvature(
        "compare", "--checkpoint", str(trained / "checkpoint-00001.pt"), "--approx", "kfc",
        "--subsample", "16", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "kfc" in proc.stderr


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_bad_learning_rate_is_refused_before_training(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--lr nan`` started the run and failed at the first step naming 'lr0'; ``--lr -1``
    gave PyTorch's message without a flag."""
    run = tmp_path / "run"
    assert main(["train", "--dir", str(run), "--lr", value, "--epochs", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"curvature train: error: Option --lr: expected a finite, non-negative learning rate; "
        f"received {float(value)}."
    ]
    assert not any(run.glob("checkpoint-*.pt"))
