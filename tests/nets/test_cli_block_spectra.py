"""``curvature spectrum --blocks`` and ``curvature plot blocks`` on gpt-tiny with the text
dataset: the per-block file, the table, the figure, and errors that name the flag."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nets import get_model, load_block_spectra, plot_block_spectra, save_checkpoint
from nets.cli import build_parser, main
from nets.models import model_spec
from nets.plots._figure import close_figure

TINY = ["--iters", "3", "--subsample", "4", "--batch-size", "4", "--no-progress",
        "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer gpt-tiny of width 16 with 2 heads, as 'text' checkpoints record it."""
    net = get_model("gpt-tiny", 256, 1, 64, n_layer=1, d_model=16, n_head=2, seed=0)
    path = tmp_path_factory.mktemp("gpt") / "checkpoint-00000.pt"
    save_checkpoint(path, net, None, 0, dict(model_spec(net) or {}, dataset="text"))
    return path


@pytest.fixture(scope="module")
def ran(checkpoint: Path) -> tuple[Path, str]:
    """The per-block spectra of the checkpoint by the CLI: (file, printed tables)."""
    import contextlib
    import io

    argv = ["spectrum", "--checkpoint", str(checkpoint), "--model", "gpt-tiny",
            "--dataset", "text", "--blocks", "transformer:heads=2", *TINY]  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    path = checkpoint.parent / "spectra" / "blocks-00000-hessian-transformer-heads-2.npz"
    return path, printed.getvalue()


def test_spectrum_blocks_writes_the_file_beside_the_checkpoint(ran: tuple[Path, str]) -> None:
    path, _ = ran
    res = load_block_spectra(path)
    assert res.partition == "transformer:heads=2" and res.config["model"] == "gpt-tiny"
    assert res.config["dataset"] == "text" and res.config["subsample"] == 4
    labels = list(res.blocks)
    assert "transformer.h.0.attn.q_proj (q, head 1)" in labels
    assert "transformer.wte (embedding)" in labels and "transformer.h.0.mlp (mlp)" in labels
    assert all(b.lanczos_iters == 3 and b.values.size == 3 for b in res.blocks.values())
    assert res.num_params == sum(p.numel() for p in get_model(
        "gpt-tiny", 256, 1, 64, n_layer=1, d_model=16, n_head=2).parameters())  # fmt: skip


def test_spectrum_blocks_prints_one_row_per_block(ran: tuple[Path, str]) -> None:
    path, printed = ran
    res = load_block_spectra(path)
    assert "block" in printed and "top eigenvalue" in printed and "negative mass" in printed
    lines = printed.splitlines()
    for label, b in res.blocks.items():
        row = next(line for line in lines if line.strip().startswith(label))
        assert f"{b.size:,}" in row.split()
    assert "top eigenvalues span (decades)" in printed


def test_plot_blocks_draws_every_block(ran: tuple[Path, str], tmp_path: Path) -> None:
    path, _ = ran
    out = tmp_path / "blocks.png"
    assert main(["plot", "blocks", str(path), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    res = load_block_spectra(path)
    fig = plot_block_spectra(path)
    try:
        ridge, bars = fig.axes[:2]
        densities = [line for line in ridge.lines if line.get_gid() == "density"]
        assert [line.get_label() for line in densities] == list(res.blocks)
        assert len(bars.patches) == len(res.blocks)
        widths = list(bars.containers[0].datavalues)  # type: ignore[attr-defined]
        assert widths[0] == pytest.approx(res.blocks["transformer.wte (embedding)"].top)
        assert "decades" in fig.texts[0].get_text()  # the heterogeneity in the title
    finally:
        close_figure(fig)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--blocks", "transformer:heads=3"], "Option --blocks:"),
        (["--blocks", "rows"], "Option --blocks:"),
        (["--blocks", "transformer:heads=0"], "Option --blocks:"),
        (["--blocks", "layers", "--save-eigvec"], "Option --save-eigvec:"),
        (["--blocks", "layers", "--fit", "mp"], "Option --fit:"),
        (["--blocks", "layers", "--iters", "0"], "Option --iters:"),
    ],
)
def test_bad_arguments_name_the_flag(
    checkpoint: Path, tmp_path: Path, capsys: Any, flags: list[str], named: str
) -> None:
    capsys.readouterr()
    out = tmp_path / "b.npz"
    argv = ["spectrum", "--checkpoint", str(checkpoint), *TINY, *flags, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and "Argument '" not in err, err
    assert not out.exists()


def test_the_parser_takes_blocks_and_plot_blocks() -> None:
    args = build_parser().parse_args(["spectrum", "--checkpoint", "c.pt", "--blocks", "layers"])
    assert args.blocks == "layers"
    assert build_parser().parse_args(["spectrum", "--checkpoint", "c.pt"]).blocks is None
    assert build_parser().parse_args(["plot", "blocks", "f.npz"]).what == "blocks"
