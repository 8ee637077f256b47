"""Partition names of the per-block spectra (sweep 6): ``transformer:heads=N`` takes ASCII
digits only and no empty option, and a head count other than the model's is refused;
on the command line both errors name ``--blocks``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nets import get_model, save_checkpoint
from nets.cli import main
from nets.models import model_spec
from nets.workflow.block_spectra import _parse_partition, block_partition

TINY = ["--iters", "3", "--subsample", "4", "--batch-size", "4", "--no-progress",
        "--device", "cpu"]  # fmt: skip


@pytest.mark.parametrize(
    "blocks",
    [
        "transformer:heads=\u00b2",  # superscript two: str.isdigit() but not int()
        "transformer:heads=\u0663",  # Arabic-Indic three: was read as 3
        "transformer:heads=\uff12",  # fullwidth two
        "transformer:",
        "transformer: ",
        "layers:",
        "layers: ",
        "transformer:heads=",
    ],
)
def test_partition_names_take_ascii_digits_and_no_empty_option(blocks: str) -> None:
    with pytest.raises(ValueError, match=r"^Argument 'blocks': expected "):
        _parse_partition(blocks, None)
    with pytest.raises(ValueError, match=r"^Argument 'blocks': expected "):
        block_partition(torch.nn.TransformerEncoderLayer(4, 2), blocks)


def test_valid_partition_names_still_parse() -> None:
    assert _parse_partition("transformer:heads=2", None) == ("transformer", 2)
    assert _parse_partition(" Transformer:heads= 02 ", None) == ("transformer", 2)
    assert _parse_partition("layers", None) == ("layers", None)
    assert _parse_partition("transformer", 4) == ("transformer", 4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer gpt-tiny of width 8 with 2 heads (``attn.n_head == 2``)."""
    net = get_model("gpt-tiny", 256, 1, 64, n_layer=1, d_model=8, n_head=2, seed=0)
    path = tmp_path_factory.mktemp("gpt") / "checkpoint-00000.pt"
    save_checkpoint(path, net, None, 0, dict(model_spec(net) or {}, dataset="text"))
    return path


@pytest.mark.parametrize(
    ("blocks", "detail"),
    [
        ("transformer:heads=4", "expected 2, the attention head count"),  # half-heads of the model
        ("transformer:heads=\u00b2", "ASCII digits"),
        ("transformer:", "ASCII digits"),
        ("layers:", "'layers', 'transformer'"),
    ],
)
def test_the_command_line_names_blocks(
    checkpoint: Path, tmp_path: Path, capsys: Any, blocks: str, detail: str
) -> None:
    capsys.readouterr()
    out = tmp_path / "b.npz"
    argv = ["spectrum", "--checkpoint", str(checkpoint), *TINY, "--blocks", blocks]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Option --blocks:" in err and detail in err, err
    assert "Traceback" not in err and "Argument '" not in err and "int()" not in err, err
    assert not out.exists()
