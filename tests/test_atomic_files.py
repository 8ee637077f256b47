"""Atomic writes: the permission bits of a plain open(), and no abandoned temporary files."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from nets.checkpoint import save_checkpoint
from spectral.io import (
    STALE_AFTER_SECONDS,
    atomic_write,
    clean_stale_temporaries,
    current_umask,
    save_npz,
)
from spectral.resume import Checkpoint

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits and signals")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    try:
        yield set_mask
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_everything(d: Path) -> list[Path]:
    """One file through each writer of the suite (all go through atomic_write)."""
    save_npz(d / "sub" / "a.npz", x=np.arange(3))
    with atomic_write(d / "stats.json", "w") as f:
        f.write("{}")
    save_checkpoint(d / "ckpt" / "c.pt", torch.nn.Linear(2, 1), None, 0, {"model": None})
    Checkpoint(d / "state.npz", kind="demo", config={}).save({"a": np.ones(2)}, {"i": 1})
    return [d / "sub" / "a.npz", d / "stats.json", d / "ckpt" / "c.pt", d / "state.npz"]


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_files_get_the_mode_of_a_plain_open(
    umask: Callable[[int], None], tmp_path: Path, mask: int, file_mode: int, dir_mode: int
) -> None:
    umask(mask)
    assert current_umask() == mask
    for path in _write_everything(tmp_path):
        assert _mode(path) == file_mode, (path, oct(_mode(path)))
    for directory in (tmp_path / "sub", tmp_path / "ckpt"):
        assert _mode(directory) == dir_mode
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: what open() gives
        f.write("x")
    assert _mode(tmp_path / "plain.txt") == file_mode
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_rewriting_keeps_the_mode_of_the_replaced_file(
    umask: Callable[[int], None], tmp_path: Path
) -> None:
    umask(0o022)
    path = tmp_path / "a.npz"
    save_npz(path, x=np.arange(3))
    path.chmod(0o640)
    save_npz(path, x=np.arange(4))
    assert _mode(path) == 0o640
    assert np.load(path)["x"].tolist() == [0, 1, 2, 3]


def test_umask_is_read_without_changing_it(umask: Callable[[int], None]) -> None:
    umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027


_WRITER = """
import sys, time
from spectral.io import atomic_write
with atomic_write(sys.argv[1], "wb") as f:
    f.write(b"partial")
    f.flush()
    print("writing", flush=True)
    sys.stdin.readline()  # a live writer, paused mid-write until told to go on
    f.write(b" and complete")
print("done", flush=True)
"""


@contextlib.contextmanager
def _writer(target: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process paused in the middle of ``atomic_write(target)``; always cleaned up."""
    paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    with subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "writing"
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def _temporaries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_killed_writes_are_cleaned_and_live_writes_are_not(tmp_path: Path) -> None:
    """Two writers paused mid-write in one folder: one is SIGKILLed, the other goes on."""
    with _writer(tmp_path / "live.bin") as live, _writer(tmp_path / "killed.bin") as killed:
        (live_tmp,) = (name for name in _temporaries(tmp_path) if name.startswith(".live"))
        (leftover,) = (name for name in _temporaries(tmp_path) if name.startswith(".killed"))
        assert leftover.startswith(".killed.bin.~dc") and f".{killed.pid}." in leftover
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)  # reaped: the pid no longer exists
        assert _temporaries(tmp_path) == sorted([live_tmp, leftover])  # SIGKILL leaves it behind
        os.utime(tmp_path / live_tmp, (time.time() - 3600, time.time() - 3600))  # idle an hour
        save_npz(tmp_path / "other.npz", x=np.zeros(1))  # the next write in the folder...
        assert _temporaries(tmp_path) == [live_tmp]  # ...removes only the dead writer's file
        assert live.stdin is not None and live.stdout is not None
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "done"
        assert live.wait(timeout=30) == 0
    assert (tmp_path / "live.bin").read_bytes() == b"partial and complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.bin", "other.npz"]


def test_only_abandoned_temporaries_of_atomic_write_are_removed(tmp_path: Path) -> None:
    old = time.time() - STALE_AFTER_SECONDS - 60
    # another host's writer (host tag that is not ours): kept while recent, removed when stale
    recent_remote = tmp_path / ".a.npz.~dc00000000.12345.abcdefgh.tmp"
    stale_remote = tmp_path / ".b.npz.~dc00000000.12345.abcdefgh.tmp"
    # files that merely look temporary are never touched, however old
    foreign = [
        tmp_path / ".c.npz.abcdefgh.tmp",  # no writer tag
        tmp_path / "notes.tmp",
        tmp_path / ".hidden",
        tmp_path / ".d.npz.~dcXYZ.1.abc.tmp",
    ]
    for path in [recent_remote, stale_remote, *foreign]:
        path.write_bytes(b"x")
    for path in [stale_remote, *foreign]:
        os.utime(path, (old, old))
    if _host_tag() == "00000000":  # pragma: no cover - astronomically unlikely
        pytest.skip("this host's tag collides with the test's remote tag")
    assert clean_stale_temporaries(tmp_path) == [stale_remote]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in [recent_remote, *foreign]
    )


def _host_tag() -> str:
    from spectral import io

    return io._HOST


def test_leftover_of_a_dead_local_process_is_removed(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(done.stdout)
    ours = tmp_path / f".r.npz.~dc{_host_tag()}.{os.getpid()}.abcdefgh.tmp"
    dead = tmp_path / f".r.npz.~dc{_host_tag()}.{dead_pid}.abcdefgh.tmp"
    ours.write_bytes(b"x")
    dead.write_bytes(b"x")
    removed = clean_stale_temporaries(tmp_path)
    assert removed == [dead]
    assert ours.exists()  # this process is alive: it may be writing it in another thread
