"""The command line never writes over a file it reads, and names what the user gave.

* ``landscape --out`` naming the Ritz-vector file that ``--spectrum`` reads (by its path,
  a ``./`` form, a symbolic or a hard link) is refused with exit status 2 and the file
  keeps its bytes; so are ``spectrum --out`` over a hard link of ``--checkpoint``,
  ``spectrum --blocks --out`` over a state file of ``--state``, ``train --resume`` with a
  checkpoint that the run writes anew, and ``plot training``/``plot tracking`` over a file
  of the run they read.
* ``--track-curvature`` with a key given twice is refused naming the flag and the key.
* ``stats`` names its positional argument (``CHECKPOINTS``, as in its usage line), not an
  option ``--checkpoint`` it does not have.
* ``plot`` given a file of another kind says what it expected and what it received,
  naming ``INPUTS`` (or the option of ``plot comparison``).
* ``compare``'s default report is named after the checkpoint's epoch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from nets.cli import UsageError, build_parser, main, track_options

TINY = ["--model", "MLP", "--batch-size", "512", "--no-progress", "--device", "cpu"]
COMMON = ["--subsample", "32", "--no-progress", "--device", "cpu"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch MLP run on digits with a spectrum and its Ritz vectors (``spec``)."""
    folder = tmp_path_factory.mktemp("sweep7cli") / "run"
    assert main(["train", "--dir", str(folder), "--epochs", "1", *TINY]) == 0
    ckpt = str(folder / "checkpoint-00001.pt")
    argv = ["spectrum", "--checkpoint", ckpt, "--iters", "4", "--save-eigvec"]
    assert main([*argv, "--out", str(folder / "spec"), *COMMON]) == 0
    return folder


def _refused(argv: list[str], capsys: Any, *needles: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_landscape_refuses_to_replace_the_ritz_vectors_it_reads(
    run: Path, tmp_path: Path, capsys: Any
) -> None:
    """Before: ``--out run/spec-eigvec.npz`` replaced the Ritz vectors (exit 0), and every
    later landscape with that spectrum failed."""
    eigvec = run / "spec-eigvec.npz"
    symlink, hardlink = tmp_path / "sym.npz", tmp_path / "hard.npz"
    symlink.symlink_to(eigvec)
    os.link(eigvec, hardlink)
    before = _digests(run)
    ckpt = str(run / "checkpoint-00001.pt")
    base = ["landscape", "--checkpoint", ckpt, "--n-points", "3", *COMMON]
    dotted = str(run) + "/./spec-eigvec.npz"
    for spectrum, out in (
        (run / "spec", eigvec),
        (run / "spec.npz", dotted),
        (eigvec, eigvec),  # --spectrum may name the Ritz-vector file itself
        (run / "spec", symlink),
        (run / "spec", hardlink),
    ):
        argv = [*base, "--spectrum", str(spectrum), "--out", str(out)]
        _refused(argv, capsys, "--out:", "would replace the input of --spectrum")
    assert _digests(run) == before
    assert symlink.is_symlink() and _digest(hardlink) == before[eigvec.name]
    out = tmp_path / "land.npz"  # a file of its own still works
    assert main([*base, "--spectrum", str(run / "spec"), "--out", str(out)]) == 0
    assert out.is_file()


def test_spectrum_refuses_an_out_that_is_a_hard_link_of_its_checkpoint(
    run: Path, tmp_path: Path, capsys: Any
) -> None:
    ckpt = run / "checkpoint-00001.pt"
    link = tmp_path / "link.npz"
    os.link(ckpt, link)
    before = _digest(ckpt)
    argv = ["spectrum", "--checkpoint", str(ckpt), "--iters", "3", "--out", str(link)]
    _refused([*argv, *COMMON], capsys, "would replace the input of --checkpoint")
    assert _digest(ckpt) == before and _digest(link) == before


def test_block_spectra_refuse_an_out_over_a_state_file(
    run: Path, tmp_path: Path, capsys: Any
) -> None:
    """Before: the finished states were resumed and the spectra written over one of them."""
    state = tmp_path / "state"
    argv = ["spectrum", "--checkpoint", str(run / "checkpoint-00001.pt"), "--blocks", "layers"]
    argv += ["--iters", "3", "--state", str(state), *COMMON]
    assert main([*argv, "--out", str(tmp_path / "blocks")]) == 0
    block = state / "block-00000.npz"
    before = _digests(state)
    assert block.name in before, before
    _refused([*argv, "--out", str(block)], capsys, "would replace the input of --state")
    assert _digests(state) == before


def test_train_refuses_to_resume_from_a_checkpoint_it_writes_anew(
    run: Path, tmp_path: Path, capsys: Any
) -> None:
    """``checkpoint-00002.pt`` holding epoch 1: continuing to 2 epochs would write it."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    misnamed = copy / "checkpoint-00002.pt"
    shutil.copy(copy / "checkpoint-00001.pt", misnamed)
    before = _digests(copy)
    argv = ["train", "--dir", str(copy), "--epochs", "2", "--resume", str(misnamed), *TINY]
    _refused(argv, capsys, "Option --resume:", "checkpoint-00002.pt", "epoch 1")
    assert _digests(copy) == before
    link = tmp_path / "elsewhere.pt"  # a symbolic link to it is the same file
    link.symlink_to(misnamed)
    argv = ["train", "--dir", str(copy), "--epochs", "2", "--resume", str(link), *TINY]
    _refused(argv, capsys, "Option --resume:")
    assert _digests(copy) == before


@pytest.mark.parametrize("what", ["training", "tracking"])
def test_plot_of_a_run_refuses_an_out_over_a_file_of_the_run(
    run: Path, what: str, capsys: Any
) -> None:
    """Named as the input it is (before, only the figure suffix check refused these)."""
    before = _digests(run)
    for out in ("stats.json", "checkpoint-00001.pt"):
        argv = ["plot", what, str(run), "--out", str(run / out)]
        _refused(argv, capsys, "--out:", "would replace the input of INPUTS")
    assert _digests(run) == before


def test_a_repeated_track_curvature_key_is_refused(tmp_path: Path, capsys: Any) -> None:
    """Before: ``every=2,top_k=1,every=3`` tracked every 3 steps, silently."""
    with pytest.raises(UsageError, match=r"--track-curvature every: .*every=2 and every=3"):
        track_options("every=2,top_k=1,every=3")
    folder = tmp_path / "run"
    argv = ["train", "--dir", str(folder), "--epochs", "1", *TINY]
    _refused(
        [*argv, "--track-curvature", "every=2,top_k=1,top_k=2"],
        capsys,
        "--track-curvature top_k:",
        "top_k=1 and top_k=2",
    )
    assert not (folder / "curvature.jsonl").exists()


def test_stats_names_its_positional_argument(run: Path, tmp_path: Path, capsys: Any) -> None:
    """Before: "Option --checkpoint: expected a checkpoint of a MLP model", an option that
    ``stats`` does not have."""
    other = tmp_path / "other"
    argv = ["train", "--dir", str(other), "--epochs", "1", *TINY[2:], "--model", "SmallCNN"]
    assert main([*argv, "--subsample", "32"]) == 0
    argv = ["stats", str(run / "checkpoint-00001.pt"), str(other / "checkpoint-00001.pt")]
    err = _refused([*argv, "--out", str(tmp_path / "s"), *COMMON], capsys, "Argument CHECKPOINTS:")
    assert "--checkpoint" not in err, err
    usage = build_parser().parse_args(["stats", "x"])
    assert usage.checkpoints == ["x"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["stats", "--help"])
    assert "CHECKPOINTS [CHECKPOINTS ...]" in capsys.readouterr().out


def test_plot_says_what_it_expected_and_what_it_received(
    run: Path, tmp_path: Path, capsys: Any
) -> None:
    """Before: "File 'stats.json' is truncated, corrupted or not a pickle-free .npz archive
    (This file contains pickled (object) data ...)"."""
    stats, ckpt, spec = run / "stats.json", run / "checkpoint-00001.pt", run / "spec.npz"
    out = ["--out", str(tmp_path / "figure.png")]
    for what, source, expected, received in (
        ("spectrum", stats, "a spectrum .npz written by compute_eigenspectrum", "a JSON file"),
        ("band", ckpt, "a spectrum .npz", "a PyTorch checkpoint"),
        ("diag", stats, "a curvature diagonal .npz", "a JSON file"),
        ("blocks", stats, "a per-block spectra .npz", "a JSON file"),
        ("landscape", run, "a landscape .npz", "a directory"),
        ("training", spec, "a run directory or its stats.json", "an .npz archive"),
        ("tracking", ckpt, "a run directory, its curvature.jsonl", "a PyTorch checkpoint"),
    ):
        err = _refused(["plot", what, str(source), *out], capsys, "Argument INPUTS: expected")
        assert expected in err and f"received '{source}', {received}" in err, err
        assert "pickle" not in err, err
    argv = ["plot", "comparison", "--hessian", str(spec), "--diagonal", str(stats), *out]
    _refused(argv, capsys, "Option --diagonal: expected a curvature diagonal", "a JSON file")
    assert not (tmp_path / "figure.png").exists()


def test_compare_names_its_default_report_after_the_epoch(
    run: Path, tmp_path: Path, capsys: Any
) -> None:
    """Before: ``compare-00000-ggn.npz`` for every checkpoint (the epoch was looked up in the
    run's config, which has none), so a later checkpoint's report replaced an earlier's."""
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run / "checkpoint-00001.pt", copy / "checkpoint-00001.pt")
    argv = ["compare", "--checkpoint", str(copy / "checkpoint-00001.pt"), "--approx", "diag-ggn"]
    assert main([*argv, "--iters", "4", "--k", "2", *COMMON]) == 0
    assert (copy / "compare-00001-ggn.npz").is_file(), sorted(os.listdir(copy))
