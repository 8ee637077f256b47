"""compute_block_spectra(state_path=...): a crashed run resumes bit for bit and skips the
finished blocks; a state of another run is refused; the CLI takes ``--state`` with
``--blocks``.  (Two processes under torchrun: tests/nets/test_torchrun_spectrum.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops.curvature import ModelCurvatureOperator
from nets import compute_block_spectra, load_block_spectra, save_checkpoint
from nets.cli import main
from nets.data import load_dataset
from nets.models import get_model, model_spec
from spectral.resume import StateMismatchError

ITERS, PROBES, EVERY = 8, 2, 3
# blocks of the MLP 64 -> 6 -> 10: 'layers.0' (390 coordinates), 'layers.2' (70)
PRODUCTS_PER_BLOCK = 1 + PROBES * ITERS  # the state's operator fingerprint, then the probes


class Crash(RuntimeError):
    """Raised by the patched product: the run dies mid-way."""


def _mlp() -> nn.Module:
    return get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(6,), seed=3)


def _run(state: Path | None, **kw: Any) -> Any:
    settings: dict[str, Any] = {
        "lanczos_iters": ITERS, "num_probes": PROBES, "subsample": 64, "batch_size": 32,
        "device": "cpu", "seed": 1, "checkpoint_every": EVERY, **kw,
    }  # fmt: skip
    model = settings.pop("model", None) or _mlp()
    return compute_block_spectra(load_dataset("digits"), model=model, state_path=state, **settings)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count curvature products; raise :class:`Crash` at product ``crash_at`` when set."""
    calls = {"n": 0, "crash_at": 0}
    original = ModelCurvatureOperator._matmat_torch

    def product(self: Any, X: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise Crash("killed")
        return original(self, X)

    monkeypatch.setattr(ModelCurvatureOperator, "_matmat_torch", product)
    return calls


def _same(a: Any, b: Any) -> None:
    got, want = a.to_arrays(), b.to_arrays()
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_crashed_run_resumes_bit_identical_and_skips_finished_blocks(
    tmp_path: Path, counted: dict[str, int]
) -> None:
    reference = _run(None)
    assert counted["n"] == 2 * PROBES * ITERS  # no state: no fingerprint products
    state = tmp_path / "state"
    # crash in block 2's second probe, after a state save at step 3 of that probe
    counted.update(n=0, crash_at=PRODUCTS_PER_BLOCK + 1 + ITERS + 5)
    with pytest.raises(Crash):
        _run(state)
    assert sorted(p.name for p in state.iterdir()) == ["block-00000.npz", "block-00001.npz"]
    counted.update(n=0, crash_at=0)
    resumed = _run(state)
    _same(resumed, reference)
    # block 1: its fingerprint only; block 2: fingerprint + the rest of its second probe
    assert counted["n"] == 1 + 1 + (ITERS - EVERY)
    counted["n"] = 0
    again = _run(state)  # everything finished: one fingerprint product per block
    _same(again, reference)
    assert counted["n"] == 2


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"seed": 2}, "seed"),
        ({"lanczos_iters": ITERS + 1}, "lanczos_iters"),
        ({"curvature_matrix": "ggn"}, "curvature"),
        ({"blocks": {"all": ["layers.0.weight", "layers.2.weight"]}}, "partition"),
        ({"loss_fn": nn.CrossEntropyLoss(label_smoothing=0.1)}, "loss_fn"),
    ],
)
def test_state_of_another_run_is_refused(
    tmp_path: Path, change: dict[str, Any], named: str
) -> None:
    state = tmp_path / "state"
    _run(state, lanczos_iters=3, num_probes=1) if "lanczos_iters" not in change else _run(state)
    base = {"lanczos_iters": 3, "num_probes": 1} if "lanczos_iters" not in change else {}
    with pytest.raises(StateMismatchError, match=named):
        _run(state, **{**base, **change})


def test_state_of_other_weights_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _run(state, lanczos_iters=3, num_probes=1)
    edited = _mlp()
    with torch.no_grad():
        edited.layers[2].bias.data[0] += 1e-6  # type: ignore[index]
    with pytest.raises(StateMismatchError, match="model"):
        _run(state, lanczos_iters=3, num_probes=1, model=edited)


def test_state_path_must_be_a_directory(tmp_path: Path) -> None:
    a_file = tmp_path / "state.npz"
    a_file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"Argument 'state_path'.*directory"):
        _run(a_file)
    with pytest.raises(TypeError, match="Argument 'state_path'"):
        _run(3)  # type: ignore[arg-type]


def test_cli_blocks_with_state_resumes(tmp_path: Path, capsys: Any) -> None:
    ckpt = tmp_path / "checkpoint-00000.pt"
    net = _mlp()
    save_checkpoint(ckpt, net, None, 0, dict(model_spec(net) or {}, dataset="digits"))
    flags = ["spectrum", "--checkpoint", str(ckpt), "--blocks", "layers", "--iters", "4",
             "--subsample", "64", "--state", str(tmp_path / "state"), "--no-progress"]  # fmt: skip
    assert main([*flags, "--out", str(tmp_path / "a.npz")]) == 0
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "block-00000.npz",
        "block-00001.npz",
    ]
    assert main([*flags, "--out", str(tmp_path / "b.npz")]) == 0
    _same(load_block_spectra(tmp_path / "b.npz"), load_block_spectra(tmp_path / "a.npz"))
    capsys.readouterr()
    assert main([*flags[:-3], "--state", str(ckpt), "--no-progress"]) != 0
    assert "--state" in capsys.readouterr().err
