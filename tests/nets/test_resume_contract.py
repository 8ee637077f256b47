"""A resumed run continues the recorded run's configuration (an adversarial sweep found:
``train --resume`` without repeating ``--lr 0.05 --momentum 0.9`` trained on at SGD's
default lr 0.001 with the saved momentum, a mix of two configurations, and rewrote
``stats.json``'s ``config`` as if the whole run had used lr 0.001; another ``--lr`` was
accepted too).

The contract: on the command line a flag left out takes the run's value, a flag given with
another value is an error naming the flag and both values (``--epochs`` may grow when the
epochs already trained keep their learning rates); in Python every setting that defines the
run must equal the recorded one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from nets.cli import main
from nets.data import load_dataset
from nets.training import train_network

TINY = ["--model", "MLP", "--batch-size", "512", "--no-progress", "--device", "cpu"]
RUN = ["--lr", "0.05", "--momentum", "0.9", "--epochs", "2", "--save-freq", "1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: Any) -> Path:
    """A two-epoch run with ``--lr 0.05 --momentum 0.9``, trained straight through."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "--dir", str(run), *TINY, *RUN]) == 0
    return run


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _part(reference: Path, tmp_path: Path) -> Path:
    """The reference run as it was after one epoch."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint-00000.pt", "checkpoint-00001.pt"):
        (run / name).write_bytes((reference / name).read_bytes())
    stats = json.loads((reference / "stats.json").read_text())
    stats["epochs"] = stats["epochs"][:1]
    (run / "stats.json").write_text(json.dumps(stats))
    return run


def test_resume_without_the_flags_continues_the_recorded_run(
    reference: Path, tmp_path: Path
) -> None:
    run = _part(reference, tmp_path)
    resume = ["--resume", str(run / "checkpoint-00001.pt")]
    assert main(["train", "--dir", str(run), "--no-progress", "--device", "cpu", *resume]) == 0
    a = torch.load(reference / "checkpoint-00002.pt", weights_only=True)
    b = torch.load(run / "checkpoint-00002.pt", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    before = json.loads((reference / "stats.json").read_text())
    after = json.loads((run / "stats.json").read_text())
    assert after["config"]["lr0"] == 0.05
    assert after["config"]["optimizer_kwargs"] == {"lr": 0.05, "momentum": 0.9}
    assert [e["lr"] for e in after["epochs"]] == [e["lr"] for e in before["epochs"]]
    assert [e["train_loss"] for e in after["epochs"]] == [e["train_loss"] for e in before["epochs"]]


@pytest.mark.parametrize(
    ("flags", "named", "values"),
    [
        (["--lr", "0.1"], "--lr", ("0.05", "0.1")),
        (["--momentum", "0"], "--momentum", ("0.9", "0.0")),
        (["--weight-decay", "0.01"], "--weight-decay", ("0", "0.01")),
        (["--opt", "nesterov=true"], "--opt nesterov", ("False", "True")),
        (["--batch-size", "256"], "--batch-size", ("512", "256")),
        (["--seed", "3"], "--seed", ("0", "3")),
        (["--schedule", "constant"], "--schedule", ("'linear'", "'constant'")),
        (["--optimizer", "Adam"], "--optimizer", ("'SGD'", "'Adam'")),
        (["--model", "SmallCNN"], "--model", ("'MLP'", "'SmallCNN'")),
        (["--subsample", "100"], "--subsample", ("None", "100")),
    ],
)
def test_a_flag_that_contradicts_the_run_is_refused_naming_it(
    reference: Path, tmp_path: Path, capsys: Any, flags: list[str], named: str, values: Any
) -> None:
    run = _part(reference, tmp_path)
    before = _digests(run)
    capsys.readouterr()
    argv = ["train", "--dir", str(run), "--no-progress", "--device", "cpu",
            "--resume", str(run / "checkpoint-00001.pt"), *flags]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"Option {named}" in err and "Traceback" not in err, err
    recorded, given = values
    assert recorded in err.split("received")[0] and f"received {given}" in err, err
    assert _digests(run) == before


def test_a_total_that_changes_the_trained_epochs_rates_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--dir", str(run), *TINY, "--lr", "0.05", "--save-freq", "1"]
    assert main(["train", *common, "--epochs", "4"]) == 0
    before = _digests(run)
    # 3 epochs done of 4: epoch 3 had lr 0.05 * 0.505; under a total of 40 it would have 0.05
    argv = ["train", *common, "--epochs", "40", "--resume", str(run / "checkpoint-00004.pt")]
    with pytest.raises(ValueError, match=r"Argument 'epochs'.*total of 4.*received 40"):
        train_network(
            run, "digits", model="MLP", epochs=40, batch_size=512, progress=False,
            device="cpu", optimizer_kwargs={"lr": 0.05}, resume=run / "checkpoint-00004.pt",
        )  # fmt: skip
    assert main(argv) == 2
    assert _digests(run) == before
    # 1 epoch done: its lr is lr0 under a total of 4 or of 8, so the run may grow
    resume = ["--resume", str(run / "checkpoint-00001.pt"), "--lr", "0.05"]
    assert main(["train", "--dir", str(run), *TINY, "--epochs", "8", *resume]) == 0
    stats = json.loads((run / "stats.json").read_text())
    assert stats["config"]["epochs"] == 8 and len(stats["epochs"]) == 8


def test_python_resume_refuses_other_optimizer_settings(tmp_path: Path) -> None:
    digits = load_dataset("digits")

    def train(epochs: int, **kw: Any) -> Any:
        options: dict[str, Any] = {
            "model": "MLP",
            "model_kwargs": {"hidden": (8,)},
            "optimizer_kwargs": {"lr": 0.05, "momentum": 0.9},
            "batch_size": 512,
            "progress": False,
            "device": "cpu",
            **kw,
        }
        return train_network(tmp_path, digits, epochs=epochs, **options)

    train(1)
    before = _digests(tmp_path)
    for kwargs, pattern in [
        ({"optimizer_kwargs": {}}, r"Argument 'lr'.*0\.05.*received 0\.001"),
        (
            {"optimizer_kwargs": {"lr": 0.1, "momentum": 0.9}},
            r"Argument 'lr'.*0\.05.*received 0\.1",
        ),
        ({"optimizer_kwargs": {"lr": 0.05}}, r"Argument 'momentum'.*0\.9.*received 0\."),
        ({"schedule": "constant"}, r"Argument 'schedule'.*'linear'.*received 'constant'"),
        ({"seed": 1}, r"Argument 'seed'.*received 1"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            train(2, resume=True, **kwargs)
        assert _digests(tmp_path) == before
    # an explicit default equals a left-out one
    assert len(train(2, resume=True, optimizer_kwargs={"lr": 0.05, "momentum": 0.9,
                                                      "dampening": 0}).stats) == 2  # fmt: skip
