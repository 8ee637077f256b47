"""A run's ``stats.json`` never has a gap (an adversarial sweep of ``train_network`` found
it; the tests but the last fail on the code before the fix).

Training 4 epochs with a checkpoint after each, resuming from ``checkpoint-00002`` with
``epochs=3``, then ``resume=True`` with ``epochs=6``: the first run's ``checkpoint-00004``
(a checkpoint of the abandoned branch) was still there, ``resume=True`` continued from it,
and ``stats.json`` silently listed epochs 1, 2, 3, 5, 6.  Now ``resume`` refuses a
checkpoint beyond the history ``stats.json`` records, naming both and the checkpoint to
pass instead; nothing is renamed or deleted; the reader refuses a file with a gap, naming
it, and the writer never writes one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from nets import load_dataset, train_network
from nets.training import StatsFile
from spectral.io import CorruptFileError


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def _train(directory: Path, digits: Any, epochs: int, **kw: Any) -> Any:
    return train_network(
        directory, digits, model="MLP", model_kwargs={"hidden": (8,)}, epochs=epochs,
        batch_size=512, schedule="constant", save_freq=1, optimizer_kwargs={"lr": 0.05},
        progress=False, device="cpu", **kw,
    )  # fmt: skip


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _epochs(folder: Path) -> list[int]:
    return [e["epoch"] for e in json.loads((folder / "stats.json").read_text())["epochs"]]


@pytest.fixture
def branched(tmp_path: Path, digits: Any) -> Path:
    """4 epochs, then continued from checkpoint-00002 to a total of 3: checkpoint-00004
    is the abandoned branch's."""
    _train(tmp_path, digits, 4)
    _train(tmp_path, digits, 3, resume=tmp_path / "checkpoint-00002.pt")
    assert (tmp_path / "checkpoint-00004.pt").is_file() and _epochs(tmp_path) == [1, 2, 3]
    return tmp_path


def test_resume_true_refuses_a_checkpoint_of_an_abandoned_branch(
    branched: Path, digits: Any
) -> None:
    before = _digests(branched)
    with pytest.raises(ValueError, match=r"Argument 'resume'") as error:
        _train(branched, digits, 6, resume=True)
    message = str(error.value)
    assert "checkpoint-00004.pt" in message and "stats.json" in message
    assert "end at 3" in message and "checkpoint-00003.pt" in message  # what to pass
    assert message.endswith("received True.")
    assert _digests(branched) == before  # nothing renamed, deleted or written
    # the checkpoint named continues the recorded history without a gap
    result = _train(branched, digits, 6, resume=branched / "checkpoint-00003.pt")
    assert [e["epoch"] for e in result.stats] == _epochs(branched) == [1, 2, 3, 4, 5, 6]


def test_an_explicit_checkpoint_beyond_the_history_is_refused(branched: Path, digits: Any) -> None:
    before = _digests(branched)
    with pytest.raises(ValueError, match=r"Argument 'resume'.*checkpoint-00004\.pt"):
        _train(branched, digits, 6, resume=branched / "checkpoint-00004.pt")
    assert _digests(branched) == before


def test_a_stats_file_with_a_gap_is_refused_naming_it(tmp_path: Path, digits: Any) -> None:
    _train(tmp_path, digits, 4)
    path = tmp_path / "stats.json"
    payload = json.loads(path.read_text())
    payload["epochs"] = [e for e in payload["epochs"] if e["epoch"] != 2]  # 1, 3, 4
    path.write_text(json.dumps(payload))
    before = _digests(tmp_path)
    with pytest.raises(CorruptFileError, match=r"stats\.json.*epoch 3 follows epoch 1"):
        _train(tmp_path, digits, 5, resume=True)
    assert _digests(tmp_path) == before
    with pytest.raises(CorruptFileError, match=r"stats\.json"):
        StatsFile(path, payload["config"]).read(4)


def test_the_writer_never_writes_a_gap(tmp_path: Path) -> None:
    stats = StatsFile(tmp_path / "stats.json", {"seed": 0})
    with pytest.raises(
        RuntimeError, match=r"stats\.json.*not be contiguous.*epoch 3 after epoch 1"
    ):
        stats.write([{"epoch": 1, "train_loss": 1.0}, {"epoch": 3, "train_loss": 0.5}])
    assert not (tmp_path / "stats.json").exists()


def test_resuming_after_an_interruption_still_retrains_the_unsaved_epochs(
    tmp_path: Path, digits: Any
) -> None:
    """(Passes before and after.)  Epochs recorded after the latest checkpoint (a run
    stopped before its next checkpoint) are trained again, without a gap."""
    straight = _train(tmp_path / "straight", digits, 3)
    run = tmp_path / "run"
    _train(run, digits, 3)
    (run / "checkpoint-00003.pt").unlink()  # stopped after epoch 3's stats were written
    resumed = _train(run, digits, 3, resume=True)
    assert [e["epoch"] for e in resumed.stats] == _epochs(run) == [1, 2, 3]
    assert resumed.stats[-1]["train_loss"] == straight.stats[-1]["train_loss"]
