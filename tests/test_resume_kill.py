"""SIGKILL a running spectrum computation mid-way; the resumed run equals the uninterrupted one.

A child process (spawned) runs :func:`nets.compute_eigenspectrum` (Hessian of a small MLP
on digits, two probes, a state file saved every 3 Lanczos steps) with every
curvature product slowed down, so that the parent can watch the state file
and ``SIGKILL`` the child once the second probe's recurrence has passed
step 6.  The parent then makes the same call, which resumes from the state
file, and compares it bit for bit with an uninterrupted run (both in the
parent, single-threaded like the child).
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.process
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from curvops.curvature import ModelCurvatureOperator
from nets.data import load_dataset
from nets.models import get_model
from nets.workflow import compute_eigenspectrum
from spectral.io import CorruptFileError, load_npz

KEYS = ("w", "gammas", "residuals", "probe_nodes", "probe_weights", "alpha", "beta", "trace")


def _spectrum(out: Path, state: Path | None) -> None:
    """The call the child makes (without the slowdown)."""
    model = get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(6,), seed=3)
    compute_eigenspectrum(
        load_dataset("digits"), model=model, lanczos_iters=12, num_probes=2, subsample=64,
        batch_size=32, device="cpu", save_spectrum_path=out, save_eigvec=True,
        state_path=state, checkpoint_every=3,
    )  # fmt: skip


def _slow_child(out: Path, state: Path, delay: float, threads: int) -> None:
    """Child process body: the same call with every curvature product slowed down, with the
    parent's number of torch threads (the state's fingerprint compares products bit for bit)."""
    torch.set_num_threads(threads)
    original = ModelCurvatureOperator._matmat_torch

    def slow(self: Any, X: torch.Tensor) -> torch.Tensor:
        time.sleep(delay)
        return original(self, X)

    ModelCurvatureOperator._matmat_torch = slow  # type: ignore[method-assign]
    _spectrum(out, state)
    os._exit(0)  # skip atexit handlers inherited from pytest


def _start_child(out: Path, state: Path, delay: float) -> multiprocessing.process.BaseProcess:
    """Start a fresh interpreter (``spawn``) that runs ``_slow_child``.

    A forked child inherits the parent's autograd engine: once a test earlier in the same
    worker process had started its device threads, a forked child's first backward raised
    "Unable to handle autograd's threading in combination with fork-based
    multiprocessing" (seen once in CI with the newest torch).
    """
    ctx = multiprocessing.get_context("spawn")
    args = (out, state, delay, torch.get_num_threads())
    proc = ctx.Process(target=_slow_child, args=args, daemon=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        proc.start()
    return proc


def _progress(state: Path) -> tuple[int, int] | None:
    """(probe index, Lanczos step of that probe) recorded in the state file, if any."""
    if not state.is_file():
        return None
    try:
        meta: dict[str, Any] = json.loads(str(load_npz(state)["meta_json"]))
    except CorruptFileError:  # pragma: no cover - never with atomic writes
        pytest.fail("the state file was observed truncated or corrupted")
    return int(meta["probe_index"]), int(meta.get("lz_iteration", 0))


def test_sigkill_mid_spectrum_then_resume_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "spectrum.state.npz"
    _spectrum(tmp_path / "reference", None)
    killed = _start_child(tmp_path / "killed", state, 0.05)
    deadline = time.monotonic() + 120.0
    seen = None
    try:
        while time.monotonic() < deadline:
            seen = _progress(state)
            if seen is not None and seen >= (1, 6):  # second probe, past step 6 of 12
                break
            assert killed.is_alive(), f"the child ended early (exit code {killed.exitcode})"
            time.sleep(0.005)
        else:  # pragma: no cover
            pytest.fail(f"the state file never reached probe 2, step 6 (last seen {seen})")
    finally:
        os.kill(killed.pid, signal.SIGKILL)  # type: ignore[arg-type]
        killed.join(timeout=30)
    assert killed.exitcode == -signal.SIGKILL
    assert not (tmp_path / "killed.npz").exists()  # it really died before finishing
    interrupted_at = _progress(state)
    assert interrupted_at is not None and interrupted_at[0] == 1
    assert 6 <= interrupted_at[1] < 12

    products = [0]
    original = ModelCurvatureOperator._matmat_torch

    def counted(self: Any, X: torch.Tensor) -> torch.Tensor:
        products[0] += 1
        return original(self, X)

    monkeypatch.setattr(ModelCurvatureOperator, "_matmat_torch", counted)
    _spectrum(tmp_path / "killed", state)  # the same call resumes from the state file
    assert products[0] == 1 + 12 - interrupted_at[1]  # fingerprint + the remaining steps
    resumed, uninterrupted = load_npz(tmp_path / "killed.npz"), load_npz(tmp_path / "reference.npz")
    for key in KEYS:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)
    vec_resumed = load_npz(tmp_path / "killed-eigvec.npz")["vectors"]
    vec_reference = load_npz(tmp_path / "reference-eigvec.npz")["vectors"]
    np.testing.assert_array_equal(vec_resumed, vec_reference)
    assert str(resumed["model_fingerprint"]) == str(uninterrupted["model_fingerprint"])


def _writer_child(path: Path) -> None:
    """Rewrite ``path`` forever with arrays whose content identifies the round."""
    from spectral.io import save_npz

    data = np.zeros(200_000)
    for i in range(10**9):
        data[:] = i
        save_npz(path, x=data, round=np.int64(i))


def test_sigkill_during_writes_never_leaves_a_truncated_file(tmp_path: Path) -> None:
    """Killing a process in the middle of atomic writes leaves a complete (old or new) file."""
    path = tmp_path / "artifact.npz"
    ctx = multiprocessing.get_context("fork")
    for delay in (0.15, 0.3, 0.45):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            proc = ctx.Process(target=_writer_child, args=(path,), daemon=True)
            proc.start()
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        if path.exists():  # the first write may not have finished yet
            arrays = load_npz(path)  # complete, never truncated
            assert np.all(arrays["x"] == float(arrays["round"]))
