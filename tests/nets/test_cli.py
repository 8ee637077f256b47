"""The ``curvature`` command line end to end on the embedded digits data, with tiny settings."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from nets.cli import build_parser, format_table, main
from spectral.io import load_npz, save_npz

SUBCOMMANDS = ("train", "spectrum", "stats", "landscape", "plot", "demo")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        plt.close("all")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny training run shared by the tests of this module."""
    run = tmp_path_factory.mktemp("cli") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(
            ["train", "--dir", str(run), "--epochs", "1", "--batch-size", "128", "--no-progress"]
        )
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return run


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


def test_stats_subcommand(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = trained / "loss-stats.npz"
    rc = main(
        ["stats", str(trained / "checkpoint-00001.pt"), "--subsample", "128", "--batch-size",
         "64", "--out", str(out_file), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    assert "Loss statistics" in capsys.readouterr().out
    assert "loss_mean" in load_npz(out_file)


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["spectrum", "--checkpoint", str(tmp_path / "missing.pt"), "--no-progress"])
    assert rc == 2
    assert "error" in capsys.readouterr().err
    rc = main(["plot", "spectrum", str(tmp_path / "missing.npz")])
    assert rc == 2
    with pytest.raises(SystemExit):
        main(["train", "--dir", str(tmp_path), "--opt", "no-equals-sign"])
