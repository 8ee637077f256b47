"""Command-line fixes of the tenth session's sweep.

``curvature demo --out`` deleted a training run's checkpoints; ``train --resume`` forgot
``--save-freq`` (a run saved every 2 epochs resumed saving at 25); ``--overwrite`` with
``--resume`` was silently ignored; a state-file mismatch named the library's
``checkpoint`` instead of ``--state``; messages turned words into flags ("the 4 --epochs
already trained", "a torch.--device"); Ctrl-C printed a traceback.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nets.cli import main, user_message
from nets.demo import _check_out_dir

TINY = ["--subsample", "64", "--batch-size", "64", "--no-progress"]


def test_the_demo_refuses_a_directory_holding_a_training_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    assert main(["train", "--dir", str(run), "--epochs", "2", "--save-freq", "1", *TINY]) == 0
    before = sorted(p.name for p in run.iterdir())
    assert main(["demo", "--quick", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Option --out:" in err and "pass --overwrite to replace it" in err
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written or deleted
    with pytest.raises(ValueError, match="Argument 'out_dir'"):
        _check_out_dir(run, overwrite=False)
    _check_out_dir(run, overwrite=True)
    (run / "demo.json").write_text("{}")  # a demo's earlier output is written again
    _check_out_dir(run, overwrite=False)
    assert main(["demo", "--out", str(run / "checkpoint-00000.pt"), "--quick"]) == 2
    assert "Option --out: expected a directory" in capsys.readouterr().err


def test_resume_takes_the_runs_save_freq_and_refuses_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["train", "--dir", str(whole), "--epochs", "4", "--save-freq", "2", *TINY]) == 0
    assert main(["train", "--dir", str(part), "--epochs", "2", "--save-freq", "2", *TINY]) == 0
    resume = ["train", "--dir", str(part), "--epochs", "4", "--resume"]
    checkpoint = str(part / "checkpoint-00002.pt")
    assert main([*resume, checkpoint, "--overwrite", "--no-progress"]) == 2
    assert "Option --overwrite: expected not to be given with --resume" in capsys.readouterr().err
    assert main([*resume, checkpoint, "--no-progress"]) == 0
    names = sorted(p.name for p in part.glob("checkpoint-*.pt"))
    assert names == sorted(p.name for p in whole.glob("checkpoint-*.pt"))
    assert names == [f"checkpoint-0000{e}.pt" for e in (0, 2, 4)]
    assert json.loads((part / "stats.json").read_text())["config"]["save_freq"] == 2


def test_messages_keep_words_and_name_the_state_flag() -> None:
    epochs = ValueError("Argument 'epochs': expected a total under which the 4 epochs already")
    assert (
        user_message(epochs) == "Option --epochs: expected a total under which the 4 epochs already"
    )
    device = ValueError("Argument 'device': expected 'cpu' or a torch.device; received 'x'.")
    assert "a torch.device" in user_message(device)
    iters = ValueError("Argument 'lanczos_iters': expected 1 <= lanczos_iters; received 0.")
    assert user_message(iters) == "Option --iters: expected 1 <= --iters; received 0."
    state = ValueError(
        "Argument 'checkpoint': expected a state file ...: lanczos_iters=4 in the file but 5 "
        "now. Delete the file or pass another checkpoint path to start afresh."
    )
    shown = user_message(state, {"checkpoint": "--state"})
    assert shown.startswith("Option --state:") and "--iters=4 in the file" in shown
    assert shown.endswith("pass another --state path to start afresh.")


def test_ctrl_c_is_one_line_and_exit_status_130(tmp_path: Path) -> None:
    command = [
        sys.executable, "-c", "import sys; from nets.cli import main; sys.exit(main())",
        "train", "--dir", str(tmp_path / "run"), "--epochs", "50", "--save-freq", "0", *TINY,
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # wait until training has started (its directory exists)
            if (tmp_path / "run").is_dir():
                break
            try:
                process.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "curvature train: interrupted" in err


def test_subsample_keeps_the_evaluation_split_unaugmented(tmp_path: Path) -> None:
    # --subsample built train_eval from the augmented subset: CIFAR curvature (the tracker's
    # measurement set, the SWA BatchNorm refresh) was measured on cropped and flipped images
    import argparse

    import torch

    from nets.cli import _training_data
    from nets.data import load_dataset
    from tests.nets.test_cifar_reader import make_cifar10

    make_cifar10(tmp_path, per_batch=7)
    args = argparse.Namespace(dataset="CIFAR10", seed=0, subsample=20, data_path=str(tmp_path))
    splits = _training_data(args)
    full = load_dataset("CIFAR10", str(tmp_path), seed=0)
    assert splits.train.transform is not None and splits.train_eval.transform is None
    picked = torch.cat([torch.nonzero((full.train_eval.inputs == row).flatten(1).all(1))[0]
                        for row in splits.train_eval.inputs])  # fmt: skip
    x, y = splits.train_eval.get_batch(list(range(len(picked))))
    x_ref, y_ref = full.train_eval.get_batch(picked.tolist())
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_training_plot_draws_percent_accuracies_as_recorded(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from nets.plots import plot_training

    epochs = [
        {"epoch": e, "train_loss": 4.6, "test_loss": 4.6, "train_acc": a, "test_acc": a, "lr": 0.1}
        for e, a in ((1, 0.95), (2, 0.98), (3, 1.0))
    ]  # a CIFAR-100 run at chance level: accuracies below 1 %
    definitions = {"train_acc": "top-1 accuracy (%), ...", "test_acc": "top-1 accuracy (%), ..."}
    (tmp_path / "stats.json").write_text(json.dumps({"epochs": epochs, "definitions": definitions}))
    figure = plot_training(tmp_path)
    accuracy = figure.axes[1]
    for line in accuracy.get_lines():
        assert list(line.get_ydata()) == [0.95, 0.98, 1.0]
    (tmp_path / "stats.json").write_text(json.dumps({"epochs": epochs}))  # fractions, no units
    assert list(plot_training(tmp_path).axes[1].get_lines()[0].get_ydata()) == [95.0, 98.0, 100.0]
