"""Errors of the command line name its flags (an adversarial sweep found: a model that
cannot take the dataset found only at the first step, naming an internal argument, with
``checkpoint-00000.pt`` and ``stats.json`` left behind; ``compare --approx low-rank-0``
naming ``'k'``, which reads as compare's own ``--k``, and ``--approx nosuch`` naming
``'spec'``; ``plot tracking`` of a run without tracking naming ``'source'`` with "no rows";
``spectrum --out <an existing directory>`` writing ``<dir>.npz`` beside it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nets.cli import main

TINY = ["--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: Any) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "run"
    argv = ["train", "--dir", str(folder), "--model", "MLP", "--epochs", "1",
            "--batch-size", "512", *TINY]  # fmt: skip
    assert main(argv) == 0
    return folder


@pytest.mark.parametrize(
    "flags",
    [["--model", "gpt-tiny"], ["--dataset", "text", "--subsample", "32"]],
)
def test_a_model_the_data_does_not_fit_is_refused_before_any_file(
    tmp_path: Path, capsys: Any, flags: list[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", "--dir", str(out), "--epochs", "1", *flags, *TINY]) == 2
    err = capsys.readouterr().err
    assert "Option --model:" in err and "--dataset" in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("approx", ["low-rank-0", "nosuch"])
def test_compare_approx_errors_name_approx(
    run: Path, tmp_path: Path, capsys: Any, approx: str
) -> None:
    capsys.readouterr()
    argv = ["compare", "--checkpoint", str(run / "checkpoint-00001.pt"), "--approx", approx,
            "--iters", "3", "--k", "2", "--subsample", "32", "--out", str(tmp_path / "c"),
            *TINY]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Option --approx:" in err and approx in err, err
    assert "'k'" not in err and "'spec'" not in err, err


def test_plot_tracking_of_an_untracked_run_says_so(run: Path, capsys: Any) -> None:
    capsys.readouterr()
    assert main(["plot", "tracking", str(run), "--out", str(run.parent / "t.png")]) == 2
    err = capsys.readouterr().err
    assert "--track-curvature" in err and str(run) in err and "'source'" not in err, err


def test_spectrum_out_naming_a_directory_is_refused(run: Path, capsys: Any) -> None:
    capsys.readouterr()
    target = run.parent / "somewhere"
    target.mkdir()
    argv = ["spectrum", "--checkpoint", str(run / "checkpoint-00001.pt"), "--iters", "3",
            "--subsample", "32", "--out", str(target), *TINY]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "directory" in err, err
    assert not (run.parent / "somewhere.npz").exists()


@pytest.mark.parametrize("value", ["0", "nan", "-1e-3"])
def test_compare_solve_tol_errors_name_the_flag(
    run: Path, tmp_path: Path, capsys: Any, value: str
) -> None:
    capsys.readouterr()
    out = tmp_path / "c.npz"
    argv = ["compare", "--checkpoint", str(run / "checkpoint-00001.pt"), "--approx", "diag-ggn",
            "--iters", "3", "--k", "2", "--subsample", "32", f"--solve-tol={value}", "--out",
            str(out), *TINY]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Option --solve-tol:" in err and "'solve_tol'" not in err, err
    assert not out.exists()


def test_compare_solve_tol_reaches_the_report(run: Path, tmp_path: Path, capsys: Any) -> None:
    import json

    from spectral.io import load_npz

    out = tmp_path / "c.npz"
    argv = ["compare", "--checkpoint", str(run / "checkpoint-00001.pt"), "--approx", "diag-ggn",
            "--iters", "3", "--k", "2", "--subsample", "32", "--solve-tol", "1e-5", "--out",
            str(out), *TINY]  # fmt: skip
    assert main(argv) == 0
    config = json.loads(str(load_npz(out)["config_json"]))
    assert config["solve_tol"] == 1e-5
