"""Default figure names, the ``--smooth`` help, malformed landscapes and ``--subsample``.

* ``curvature plot`` without ``--out`` names the figure after its input with ``.png`` in
  place of a final data suffix only. Before: ``Path(source).with_suffix(".png")``, so
  ``plot spectrum lr0.1`` and ``plot spectrum lr0.2`` both wrote ``lr0.png`` (the second
  replaced the first, silently), and ``plot band X.npz`` replaced ``plot spectrum X.npz``'s
  ``X.png``; ``compare --out cmp-lr0.1`` drew its figure to ``cmp-lr0.png``.
* ``plot --help`` described the GGN/Fisher smoothing as a log-normal kernel; the code
  (``halfline_density``) reflects a Gaussian at 0.
* A landscape with fewer than 2 values of ``t``, a curve array that is not ``[d, n]`` or
  curves with different numbers of directions drew an empty figure or failed inside
  matplotlib (``TypeError: Input z must be at least a (2, 2) shaped array``).
* ``stats``/``landscape --subsample N`` larger than the test split said "between 1 and
  359" without saying that 359 is the test split's size.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nets.cli import main
from nets.plots._sources import load_landscape
from spectral.io import save_npz

TINY = ["--model", "MLP", "--batch-size", "512", "--no-progress", "--device", "cpu"]
COMMON = ["--subsample", "32", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch MLP run on digits with two spectra named with dots: ``lr0.1``, ``lr0.2``."""
    folder = tmp_path_factory.mktemp("figure_names") / "run"
    assert main(["train", "--dir", str(folder), "--epochs", "1", *TINY]) == 0
    ckpt = str(folder / "checkpoint-00001.pt")
    for name in ("lr0.1", "lr0.2"):
        argv = ["spectrum", "--checkpoint", ckpt, "--iters", "4", "--out", str(folder / name)]
        assert main([*argv, *COMMON]) == 0
    return folder


def _spectra(run: Path, tmp_path: Path) -> Path:
    """A folder of its own with copies of the run's two spectra (and nothing else)."""
    folder = tmp_path / "spectra"
    folder.mkdir()
    for name in ("lr0.1.npz", "lr0.2.npz"):
        shutil.copy(run / name, folder / name)
    return folder


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def test_stems_with_dots_give_distinct_default_figures(
    run: Path, tmp_path: Path, capsys: Any
) -> None:
    folder = _spectra(run, tmp_path)
    assert main(["plot", "spectrum", str(folder / "lr0.1")]) == 0
    assert main(["plot", "spectrum", str(folder / "lr0.2")]) == 0
    assert _pngs(folder) == ["lr0.1.png", "lr0.2.png"]
    printed = capsys.readouterr().out
    assert str(folder / "lr0.1.png") in printed and str(folder / "lr0.2.png") in printed
    first = (folder / "lr0.1.png").read_bytes()
    assert main(["plot", "spectrum", str(folder / "lr0.1.npz")]) == 0  # the same figure
    assert _pngs(folder) == ["lr0.1.png", "lr0.2.png"]
    assert (folder / "lr0.1.png").read_bytes() == first


def test_spectrum_and_band_of_one_file_keep_both_figures(
    run: Path, tmp_path: Path, capsys: Any
) -> None:
    folder = _spectra(run, tmp_path)
    assert main(["plot", "spectrum", str(folder / "lr0.1.npz")]) == 0
    spectrum_figure = (folder / "lr0.1.png").read_bytes()
    assert main(["plot", "band", str(folder / "lr0.1.npz")]) == 0
    assert _pngs(folder) == ["lr0.1-band.png", "lr0.1.png"]
    assert (folder / "lr0.1.png").read_bytes() == spectrum_figure
    assert str(folder / "lr0.1-band.png") in capsys.readouterr().out


def test_a_default_figure_that_replaces_a_file_says_so(
    run: Path, tmp_path: Path, capsys: Any
) -> None:
    folder = _spectra(run, tmp_path)
    assert main(["plot", "spectrum", str(folder / "lr0.2")]) == 0
    assert "replaced" not in capsys.readouterr().out
    assert main(["plot", "spectrum", str(folder / "lr0.2")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "replaced an existing file of that name (--out names another)" in printed
    out = tmp_path / "chosen.png"
    for _ in range(2):  # a file named with --out is the user's choice: no note
        assert main(["plot", "spectrum", str(folder / "lr0.2"), "--out", str(out)]) == 0
        assert "replaced" not in capsys.readouterr().out


def test_default_figure_names_of_every_kind(tmp_path: Path) -> None:
    from nets.cli import default_figure, figure_beside  # (new: absent from the old code)

    (tmp_path / "run").mkdir()
    d = str(tmp_path)
    assert default_figure(f"{d}/lr0.1", "spectrum") == f"{d}/lr0.1.png"
    assert default_figure(f"{d}/lr0.1.npz", "spectrum") == f"{d}/lr0.1.png"
    assert default_figure(f"{d}/lr0.1.npz", "band") == f"{d}/lr0.1-band.png"
    assert default_figure(f"{d}/g.v2.npz", "diag") == f"{d}/g.v2.png"
    assert default_figure(f"{d}/b.1.npz", "blocks") == f"{d}/b.1.png"
    assert default_figure(f"{d}/land-0.5.npz", "landscape") == f"{d}/land-0.5.png"
    assert default_figure(f"{d}/run", "training") == f"{d}/run/training.png"
    assert default_figure(f"{d}/run", "tracking") == f"{d}/run/curvature.png"
    assert default_figure(f"{d}/run/stats.json", "training") == f"{d}/run/stats.png"
    assert default_figure(f"{d}/run/stats.json", "tracking") == f"{d}/run/stats-tracking.png"
    assert default_figure(f"{d}/c.jsonl", "tracking") == f"{d}/c-tracking.png"
    assert default_figure(None, "comparison") == "comparison.png"
    assert figure_beside("cmp-lr0.1") == Path("cmp-lr0.1.png")
    assert figure_beside("compare-00001-ggn.npz") == Path("compare-00001-ggn.png")
    assert figure_beside("report.png") == Path("report.png.png")  # never the report itself


def test_compare_names_its_figure_after_a_report_with_dots(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp-lr0.1"
    argv = ["compare", "--checkpoint", str(run / "checkpoint-00001.pt"), "--approx", "diag-ggn"]
    assert main([*argv, "--iters", "4", "--k", "2", "--out", str(out), *COMMON]) == 0
    assert out.is_file()
    assert _pngs(tmp_path) == ["cmp-lr0.1.png"]


def test_the_smooth_help_names_the_kernel_the_code_uses(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main(["plot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "GGN/Fisher: a Gaussian kernel reflected at 0, so no mass below 0" in text
    assert "log-normal" not in text


_T = np.linspace(-1.0, 1.0, 5)
_ONE_POINT_PLANE = {
    "t": np.array([0.0]),
    "train_loss": np.ones((1, 1)),
    "plane_train_loss": np.ones((1, 1, 1)),
}


@pytest.mark.parametrize(
    ("arrays", "field", "expected", "received"),
    [
        ({"t": np.array([]), "train_loss": np.zeros((1, 0))}, "'t'", "at least 2", "(0,)"),
        (_ONE_POINT_PLANE, "'t'", "at least 2", "(1,)"),
        ({"t": _T, "train_loss": np.ones((2, 3, 5))}, "'train_loss'", "2-D", "(2, 3, 5)"),
        ({"t": _T, "train_loss": np.ones((0, 5))}, "'train_loss'", "d >= 1", "(0, 5)"),
        (
            {"t": _T, "train_loss": np.ones((2, 5)), "test_loss": np.ones((1, 5))},
            "'test_loss'",
            "as many directions as 'train_loss' (2)",
            "(1, 5)",
        ),
        (
            {"t": _T, "train_loss": np.ones((1, 5)), "plane_train_loss": np.ones((5, 5))},
            "'plane_train_loss'",
            "[q, 5, 5]",
            "(5, 5)",
        ),
    ],
    ids=["empty-t", "one-point-plane", "3d-curves", "no-direction", "rows-differ", "2d-plane"],
)
def test_a_malformed_landscape_is_refused_naming_the_file_and_the_field(
    arrays: dict[str, np.ndarray],
    field: str,
    expected: str,
    received: str,
    tmp_path: Path,
    capsys: Any,
) -> None:
    path = tmp_path / "land.npz"
    save_npz(path, **arrays)
    with pytest.raises(ValueError, match="Argument 'path': expected") as info:
        load_landscape(path)
    message = str(info.value)
    for needle in (str(path), field, expected, received):
        assert needle in message, (needle, message)
    with pytest.raises(ValueError, match="Argument 'path': expected"):
        load_landscape(arrays)  # the same arrays in memory
    capsys.readouterr()
    assert main(["plot", "landscape", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"Argument INPUTS: expected {field}" in err and str(path) in err, err
    assert not (tmp_path / "land.png").exists()


def test_a_well_formed_landscape_still_loads() -> None:
    arrays = load_landscape(
        {"t": _T, "train_loss": _T**2, "test_loss": [_T**2], "plane_train_loss": np.ones((1, 5, 5))}
    )
    assert arrays["train_loss"].shape == (1, 5) and arrays["test_loss"].shape == (1, 5)
    assert arrays["t"].shape == (5,)


@pytest.mark.parametrize("command", ["stats", "landscape"])
@pytest.mark.parametrize("count", [400, 2000])
def test_the_subsample_bound_says_it_is_the_smaller_split(
    run: Path, tmp_path: Path, command: str, count: int, capsys: Any
) -> None:
    from nets.data import load_dataset

    splits = load_dataset("digits")
    train, test = len(splits.train_eval), len(splits.test)
    assert test < count  # both counts are larger than the test split
    ckpt = str(run / "checkpoint-00001.pt")
    first = [ckpt] if command == "stats" else ["--checkpoint", ckpt, "--random-directions", "1"]
    argv = [command, *first, "--subsample", str(count), "--out", str(tmp_path / "o.npz")]
    capsys.readouterr()
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert (
        f"Option --subsample: expected a sample count N between 1 and {min(train, test)} "
        f"(the smaller of the train ({train}) and test ({test}) splits, since {command} draws "
        f"N samples from each); received {count}." in err
    ), err
    assert not (tmp_path / "o.npz").exists()
