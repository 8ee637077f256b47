"""Checkpoints: atomic writing, weights_only loading, refusal of malicious pickles."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from nets.checkpoint import (
    UnsafeFileError,
    checkpoint_name,
    json_safe,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    model_from_checkpoint,
    save_checkpoint,
)
from nets.models import get_model
from spectral.io import CorruptFileError


def small_model(seed: int = 0) -> torch.nn.Module:
    return get_model("SmallCNN", num_classes=10, in_channels=1, input_size=8, seed=seed)


def config_of(model: torch.nn.Module) -> dict:
    from nets.models import model_spec

    return {**model_spec(model), "dataset": "digits"}


def test_round_trip_with_plain_torch_load_weights_only(tmp_path):
    net = small_model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    path = tmp_path / checkpoint_name(7)
    save_checkpoint(path, net, opt, 7, config_of(net), rng_state={"x": torch.zeros(3)})
    raw = torch.load(path, weights_only=True)  # the format is weights_only-safe
    assert raw["epoch"] == 7 and raw["format"] == "deep-curvature-checkpoint"
    assert json.loads(json.dumps(raw["config"])) == raw["config"]
    ckpt = load_checkpoint(path)
    assert ckpt["optimizer"]["state"]  # momentum buffers stored
    for key, value in net.state_dict().items():
        assert torch.equal(ckpt["state_dict"][key], value)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-00007.pt"]  # no temp files


def test_model_from_checkpoint_rebuilds_the_same_function(tmp_path):
    net = small_model(seed=5).eval()
    path = tmp_path / "c.pt"
    save_checkpoint(path, net, None, 1, config_of(net))
    rebuilt, ckpt = model_from_checkpoint(path)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(rebuilt(x), net(x))
    assert not rebuilt.training and ckpt["epoch"] == 1


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_checkpoint_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Payload(str(marker))}, path)
    with pytest.raises(UnsafeFileError, match=r"refused") as refused:
        load_checkpoint(path)
    assert not marker.exists()
    # torch's advice to retry with weights_only=False (which would run the payload) is not
    # passed on; its reason is
    assert "False" not in str(refused.value) and "posix.mkdir" in str(refused.value)
    with pytest.raises(UnsafeFileError):
        model_from_checkpoint(path)
    assert not marker.exists()
    # a plain pickle (not a torch zip archive) with a payload is refused as well
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    with pytest.raises(CorruptFileError):
        load_checkpoint(plain)
    assert not marker.exists()


def test_truncated_and_foreign_files(tmp_path):
    net = small_model()
    path = tmp_path / "c.pt"
    save_checkpoint(path, net, None, 0, {})
    data = path.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match=r"t.pt"):
        load_checkpoint(tmp_path / "t.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CorruptFileError, match=r"does not hold a dict"):
        load_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match=r"nothere"):
        load_checkpoint(tmp_path / "nothere.pt")


def test_a_json_file_is_not_a_checkpoint_and_gets_no_unsafe_advice(tmp_path):
    """Before: ``stats.json`` given as a checkpoint was "refused" as unsafe, quoting torch's
    advice to load it with ``weights_only=False``."""
    stats = tmp_path / "stats.json"
    stats.write_text('{"format": "deep-curvature-training-stats", "epochs": []}')
    with pytest.raises(CorruptFileError, match=r"stats\.json' is not a checkpoint") as info:
        load_checkpoint(stats)
    assert not isinstance(info.value, UnsafeFileError)
    assert "weights_only" not in str(info.value)


def test_bare_state_dict_and_architecture_mismatch(tmp_path):
    net = small_model()
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    ckpt = load_checkpoint(tmp_path / "bare.pt")
    assert ckpt["epoch"] is None and ckpt["config"] == {}
    load_model_state(small_model(seed=1), ckpt)
    other = get_model("MLP", num_classes=10, in_channels=1, input_size=8)
    with pytest.raises(ValueError, match=r"Argument 'checkpoint'.*MLP"):
        load_model_state(other, ckpt)
    with pytest.raises(ValueError, match=r"registered model"):
        model_from_checkpoint(tmp_path / "bare.pt")


def test_names_latest_and_json_safety(tmp_path):
    assert checkpoint_name(0) == "checkpoint-00000.pt"
    assert checkpoint_name(12345) == "checkpoint-12345.pt"
    with pytest.raises(ValueError, match=r"Argument 'epoch'"):
        checkpoint_name(-1)
    for epoch in (2, 10, 9):
        (tmp_path / checkpoint_name(epoch)).write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "checkpoint-00010.pt"
    safe = json_safe({"betas": (0.9, 0.99), "nan": float("nan"), "dev": torch.device("cpu")})
    assert json.loads(json.dumps(safe, allow_nan=False)) == {
        "betas": [0.9, 0.99],
        "nan": "nan",
        "dev": "cpu",
    }
