"""The demo (``curvature demo``, run by ``make demo``) with tiny settings: every file is written."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from nets.cli import main
from nets.curvature_rows import read_rows
from nets.demo import DemoSummary, run_demo
from spectral.io import load_npz

FIGURES = (
    "training.png",
    "spectrum-hessian.png",
    "spectrum-ggn.png",
    "lanczos-vs-diagonal.png",
    "landscape.png",
    "curvature-tracking.png",
    "compare-00001-ggn.png",
)


def test_demo_command_writes_every_file_and_prints_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import nets.demo
    import nets.plots.approximations as approximations

    summaries: list[DemoSummary] = []
    drawn: list[dict[str, object]] = []
    plot_approximations = approximations.plot_approximations

    def recording_plot(*args: object, **kwargs: object) -> object:
        fig = plot_approximations(*args, **kwargs)  # type: ignore[arg-type]
        (ax,) = fig.axes  # one axis: one unit for every curve
        curves = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
        drawn.append({"ylabel": ax.get_ylabel(), "bars": len(ax.patches) + len(ax.containers),
                      "curves": curves})  # fmt: skip
        return fig

    monkeypatch.setattr(approximations, "plot_approximations", recording_plot)

    def recording_run_demo(*args: object, **kwargs: object) -> DemoSummary:
        summary = run_demo(*args, **kwargs)  # type: ignore[arg-type]
        summaries.append(summary)
        return summary

    monkeypatch.setattr(nets.demo, "run_demo", recording_run_demo)
    rc = main(
        ["demo", "--out", str(tmp_path), "--quick", "--epochs", "1", "--lanczos-iters", "5",
         "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    for text in ("Training", "top Ritz value (Hessian / GGN)", "Loss landscape", "Timings"):
        assert text in out

    (summary,) = summaries
    assert (tmp_path / "stats.json").is_file()
    assert (tmp_path / "checkpoint-00001.pt").is_file()
    for curvature in ("hessian", "ggn"):
        arrays = load_npz(tmp_path / "spectra" / f"spectrum-00001-{curvature}-lanczos.npz")
        assert arrays["w"].shape == (5,)
        assert str(arrays["curvature"]) == curvature
    assert (tmp_path / "spectra" / "spectrum-00001-hessian-lanczos-eigvec.npz").is_file()
    diag = load_npz(tmp_path / "spectra" / "ggn-diagonal-00001.npz")
    assert diag["diagonal"].shape == (int(arrays["num_params"]),)
    assert np.all(diag["diagonal"] >= 0)
    assert "diagonal_exact" not in diag
    # the proxies graded against the exact GGN: the reports and one figure in one unit
    compared = load_npz(tmp_path / "compare-00001-ggn.npz")
    proxies = ["kfac", "ekfac", "diag-ggn", "diag-mc", "low-rank-4"]
    assert compared["names"].tolist() == proxies
    for name in proxies:
        assert np.isfinite(compared[f"{name}/wasserstein"]) and compared[f"{name}/wasserstein"] >= 0
    assert json.loads(str(compared["config_json"]))["bn_mode"] == "eval"
    (figure,) = drawn
    assert figure["ylabel"] == "cumulative fraction of eigenvalues" and figure["bars"] == 0
    curves = figure["curves"]
    assert isinstance(curves, list) and len(curves) == 1 + len(proxies)  # exact + each proxy
    for y in curves:  # every curve a CDF: the same unit on the one density axis
        assert np.all(np.diff(y) >= 0) and y[0] >= 0 and abs(y[-1] - 1.0) < 1e-12
    assert "Proxies against the exact GGN" in out
    land = load_npz(tmp_path / "landscape-00001.npz")
    assert land["train_loss"].shape == (4, 5)  # top-1, top-2, bottom-1, random-1
    mid = land["t"].size // 2
    assert land["train_loss"][0, mid] == pytest.approx(float(land["checkpoint_loss"]), rel=1e-5)
    for name in FIGURES:
        image = mpimg.imread(tmp_path / name)
        assert (image[..., :3] < 0.9).any(), name
    for path in summary.files:
        assert path.is_file(), path
    # the summary lists every file the demo wrote, and nothing else
    on_disk = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    listed = sorted(p.relative_to(tmp_path) for p in summary.files)
    assert listed == on_disk
    assert Path("checkpoint-00000.pt") in listed
    files_section = dict(summary.sections)[f"Files (under {tmp_path})"]
    assert sorted(Path(name) for name, _ in files_section) == on_disk
    for name in on_disk:
        assert str(name) in out, name
    # every .npz carries its config (but the tracker's own files: its warm-start vectors
    # and SpectralDensity.save snapshots, whose formats are the tracker's)
    for npz in tmp_path.rglob("*.npz"):
        if not npz.name.startswith("curvature."):
            assert "config_json" in load_npz(npz), npz
    # the digits run was tracked: rows every 10 steps, in the file and in stats.json
    rows = read_rows(tmp_path / "curvature.jsonl")  # checksums verified
    assert [r["step"] for r in rows] == [10 * (i + 1) for i in range(len(rows))] and rows
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["curvature"] == rows
    assert any("density" in r for r in rows)
    assert (tmp_path / rows[1]["density"]).is_file()
    config = json.loads(str(diag["config_json"]))
    assert config["method"] == "mc" and config["bn_mode"] == "train"
    # each reported loss says what it is
    assert "running mean over the last epoch, train mode" in out
    assert "full pass, eval mode" in out
    titles = [title for title, _ in summary.sections]
    assert titles[:3] == [
        "Training",
        "Spectra (Lanczos vs diagonal)",
        "Loss landscape (full passes, eval mode)",
    ]
    assert summary.total_time > 0


def test_demo_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        run_demo(tmp_path, epochs=0, quick=True, progress=False)
