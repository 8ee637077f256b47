"""Checkpoints cannot lie: every flipped bit is a CorruptFileError, never other weights."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from nets.checkpoint import (
    CHECKPOINT_VERSION,
    content_checksum,
    load_checkpoint,
    save_checkpoint,
)
from spectral.io import CorruptFileError


def _trained_pair(seed: int, hidden: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small MLP and an SGD optimiser with momentum state (tensors keyed by integers)."""
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 5, generator=gen)).square().sum().backward()
    opt.step()
    return net, opt


def _save(path: Path, seed: int = 0, hidden: int = 4) -> dict:
    net, opt = _trained_pair(seed, hidden)
    extra = {"rng_state": {"torch": torch.arange(7, dtype=torch.uint8)}}
    save_checkpoint(path, net, opt, 3, {"model": None, "lr": 0.1}, **extra)
    return load_checkpoint(path)


class _Flipper:
    """Flips one bit of a file in place and restores it (fast: no file is rewritten)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()

    def load(self, position: int, bit: int) -> dict | None:
        """``load_checkpoint`` of the file with ``bit`` of byte ``position`` flipped
        (``None`` when it raises ``CorruptFileError``)."""
        with self.path.open("r+b") as handle:
            handle.seek(position)
            handle.write(bytes([self.data[position] ^ (1 << bit)]))
        try:
            return load_checkpoint(self.path)
        except CorruptFileError:
            return None
        finally:
            with self.path.open("r+b") as handle:
                handle.seek(position)
                handle.write(self.data[position : position + 1])


def _same(a: object, b: object) -> bool:
    """Bitwise equality of two loaded checkpoints (tensors by dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def test_checkpoint_records_version_and_content_checksum(tmp_path: Path) -> None:
    ckpt = _save(tmp_path / "c.pt")
    assert ckpt["format_version"] == CHECKPOINT_VERSION == 2
    assert ckpt["checksum"] == content_checksum(ckpt)
    assert ckpt["checksum"].startswith("sha256:") and len(ckpt["checksum"]) == 7 + 64
    # plain torch.load(weights_only=True) still reads the file (the digest is a zip comment)
    plain = torch.load(tmp_path / "c.pt", weights_only=True)
    assert _same(plain, ckpt)


def test_every_single_bit_flip_anywhere_in_the_file_is_detected(tmp_path: Path) -> None:
    """Every byte of a small checkpoint (zip headers, pickle, tensors, digest), a random bit."""
    path = tmp_path / "c.pt"
    _save(path)
    flipper = _Flipper(path)
    assert len(flipper.data) >= 1000
    bits = np.random.default_rng(0).integers(0, 8, size=len(flipper.data))
    missed = [i for i in range(len(flipper.data)) if flipper.load(i, int(bits[i])) is not None]
    assert missed == []
    assert load_checkpoint(path)["checksum"] == content_checksum(load_checkpoint(path))


def test_random_flips_in_a_larger_checkpoint_are_detected(tmp_path: Path) -> None:
    """300 random (position, bit) pairs in a checkpoint whose bytes are mostly tensor data."""
    path = tmp_path / "c.pt"
    _save(path, seed=1, hidden=200)
    flipper = _Flipper(path)
    rng = np.random.default_rng(1)
    positions = rng.choice(len(flipper.data), size=300, replace=False)
    for position in positions:
        assert flipper.load(int(position), int(rng.integers(0, 8))) is None, position


def test_without_the_file_digest_the_content_checksum_still_guards_the_tensors(
    tmp_path: Path,
) -> None:
    """A version-2 checkpoint saved again by plain torch.save (no file digest): every flip
    either raises CorruptFileError or loads the identical content, never other values."""
    original = _save(tmp_path / "c.pt")
    plain = tmp_path / "plain.pt"
    torch.save(original, plain)
    assert _same(load_checkpoint(plain), original)  # accepted: its content checksum verifies
    flipper = _Flipper(plain)
    weight = original["state_dict"]["0.weight"].numpy().tobytes()
    start = flipper.data.index(weight)  # the tensor's bytes, stored uncompressed
    rng = np.random.default_rng(2)
    for position in range(start, start + len(weight)):
        with pytest.raises(CorruptFileError, match="checksum"):
            with plain.open("r+b") as handle:
                handle.seek(position)
                handle.write(bytes([flipper.data[position] ^ (1 << int(rng.integers(0, 8)))]))
            try:
                load_checkpoint(plain)
            finally:
                plain.write_bytes(flipper.data)
    positions = rng.choice(len(flipper.data), size=300, replace=False)
    detected = 0
    for position in positions:
        loaded = flipper.load(int(position), int(rng.integers(0, 8)))
        if loaded is None:
            detected += 1
        else:  # a flip the reader ignores (zip timestamps, CRCs, padding) changes nothing
            assert _same(loaded, original), position
    assert detected > 100


def test_edited_values_under_the_old_checksum_are_refused(tmp_path: Path) -> None:
    ckpt = _save(tmp_path / "c.pt")
    ckpt["state_dict"]["2.bias"][0] += 1e-6
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(CorruptFileError, match="checksum"):
        load_checkpoint(tmp_path / "edited.pt")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    ckpt["config"]["lr"] = 0.2
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(CorruptFileError, match="checksum"):
        load_checkpoint(tmp_path / "edited.pt")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    del ckpt["checksum"]  # a version-2 file must carry it
    torch.save(ckpt, tmp_path / "stripped.pt")
    with pytest.raises(CorruptFileError, match="lacks the content checksum"):
        load_checkpoint(tmp_path / "stripped.pt")


def test_checkpoints_without_checksum_load_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Format version 1 (earlier versions of this package) and bare state dicts still load."""
    net, _ = _trained_pair(0, 4)
    legacy = {
        "format": "deep-curvature-checkpoint",
        "format_version": 1,
        "epoch": 2,
        "state_dict": net.state_dict(),
        "optimizer": None,
        "config": {"model": None},
    }
    torch.save(legacy, tmp_path / "v1.pt")
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    for name in ("v1.pt", "bare.pt"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nets.checkpoint"):
            ckpt = load_checkpoint(tmp_path / name)
        assert _same(ckpt["state_dict"], net.state_dict())
        assert any("no checksum" in r.getMessage() for r in caplog.records), name
    # saving it again adds both checksums
    save_checkpoint(tmp_path / "v2.pt", net, None, 2, {"model": None})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nets.checkpoint"):
        load_checkpoint(tmp_path / "v2.pt")
    assert caplog.records == []
