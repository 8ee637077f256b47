"""The operator fingerprint of a state file uses a probe of its own (sweep 6, finding 5).

The fingerprint was one product with a fixed public Rademacher probe ``p``
(``FINGERPRINT_SEED``): a state written for ``A`` resumed silently for ``B = A + D`` with
``D p = 0`` and returned ``A``'s eigenvalues.  A new state file now stores the seed of a
fresh Gaussian probe (drawn when the file is first written); loading recomputes the
product with it.  Files without a stored probe still resume with the old one; the
product count (one fingerprint product per run) and bit-identical resumption are kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import spectral
from spectral.io import CHECKSUM_KEY, load_npz, npz_checksum
from spectral.resume import FINGERPRINT_SEED, Checkpoint, StateMismatchError
from tests.spectral.strategies import single_threaded_blas  # noqa: F401 (autouse fixture)

N = 8
A = np.diag(np.arange(1.0, N + 1))


def _blind_change(seed: int, kind: str = "rademacher") -> np.ndarray:
    """``B = A + 3 u u^T`` with ``u^T p = 0`` for the probe ``p`` of ``seed``."""
    p = spectral.random_probe(N, kind, seed)
    u = np.zeros(N)
    u[0], u[1] = 1.0, -p[0] / p[1]
    B = A + 3.0 * np.outer(u, u)
    assert np.array_equal(A @ p, B @ p)  # invisible to that probe
    return B


class _Killed(Exception):
    """Raised by the counted product: the run dies mid-way."""


class _Counted:
    """``A`` as a callable that counts its products and can fail at a given one."""

    def __init__(self, matrix: np.ndarray, fail_at: int = 0) -> None:
        self.matrix, self.fail_at, self.count = matrix, fail_at, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.count += 1
        if self.count == self.fail_at:
            raise _Killed
        out: np.ndarray = self.matrix @ x
        return out


def _stored(path: Path) -> dict[str, Any]:
    return dict(json.loads(str(load_npz(path)["operator_json"])))


def test_a_change_blind_to_the_old_fixed_probe_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    spectral.lanczos(A, N, seed=0, checkpoint=path)
    with pytest.raises(StateMismatchError, match=r"'checkpoint'.*another operator"):
        spectral.lanczos(_blind_change(FINGERPRINT_SEED), N, seed=0, checkpoint=path)


def test_the_probe_is_stored_and_a_change_blind_to_it_is_still_refused(tmp_path: Path) -> None:
    """A Gaussian probe: no fixed change (here one built against the stored probe, as a
    Rademacher probe of another seed would miss half of the time) is invisible to it."""
    paths = [tmp_path / "a.npz", tmp_path / "b.npz"]
    for path in paths:
        spectral.lanczos(A, N, seed=0, checkpoint=path)
    stored = [_stored(path) for path in paths]
    assert all(s["probe"] == "gaussian" for s in stored)
    assert stored[0]["probe_seed"] != stored[1]["probe_seed"]  # a fresh seed per file
    # the change invisible to the file's own probe, were it Rademacher
    B = _blind_change(stored[0]["probe_seed"])
    with pytest.raises(StateMismatchError, match="another operator"):
        spectral.lanczos(B, N, seed=0, checkpoint=paths[0])


def test_resumption_is_bit_identical_and_costs_one_fingerprint_product(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    reference = spectral.lanczos(A, N, seed=0, reorth="full")
    first = _Counted(A, fail_at=6)  # 4 steps, the fingerprint at the first save, then dies
    with pytest.raises(_Killed):
        spectral.lanczos(
            spectral.as_operator(first, size=N), N, seed=0, checkpoint=path, checkpoint_every=2
        )
    seed = _stored(path)["probe_seed"]
    second = _Counted(A)
    resumed = spectral.lanczos(
        spectral.as_operator(second, size=N), N, seed=0, checkpoint=path, checkpoint_every=2
    )
    np.testing.assert_array_equal(resumed.alpha, reference.alpha)
    np.testing.assert_array_equal(resumed.beta, reference.beta)
    assert second.count == 1 + (N - 4)  # the fingerprint, then the remaining steps
    assert _stored(path)["probe_seed"] == seed  # the file keeps its probe


def _legacy(path: Path) -> None:
    """Rewrite ``path`` as a state file of before the stored probe (fixed probe, no keys)."""
    arrays = dict(load_npz(path))
    fingerprint = json.loads(str(arrays["operator_json"]))
    op = spectral.as_operator(A)
    from spectral.resume import operator_fingerprint

    old = json.loads(operator_fingerprint(op).to_json())  # FINGERPRINT_SEED, Rademacher
    for key in ("probe_seed", "probe"):
        old.pop(key)
    assert set(old) == set(fingerprint) - {"probe_seed", "probe"}
    arrays["operator_json"] = np.asarray(json.dumps(old, sort_keys=True))
    members = {CHECKSUM_KEY: np.asarray(npz_checksum(arrays)), **arrays}
    with path.open("wb") as handle:
        np.savez(handle, **members)


def test_files_without_a_stored_probe_still_resume(tmp_path: Path) -> None:
    path = tmp_path / "state.npz"
    reference = spectral.lanczos(A, N, seed=0)
    with pytest.raises(_Killed):
        op = spectral.as_operator(_Counted(A, fail_at=6), size=N)
        spectral.lanczos(op, N, seed=0, checkpoint=path, checkpoint_every=2)
    _legacy(path)
    resumed = spectral.lanczos(A, N, seed=0, checkpoint=path, checkpoint_every=2)
    np.testing.assert_array_equal(resumed.alpha, reference.alpha)
    assert _stored(path)["probe_seed"] == FINGERPRINT_SEED  # its probe, now written out
    _legacy(path)
    with pytest.raises(StateMismatchError, match="another operator"):
        spectral.lanczos(A + 1e-9 * np.eye(N), N, seed=0, checkpoint=path)


def test_probe_seed_argument_and_ranks_of_a_distributed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every rank of a ``torchrun`` job (``WORLD_SIZE > 1``) computes the fingerprint
    product collectively with replicated vectors: the ranks must draw the same probe."""
    from spectral.resume import fresh_probe_seed

    op = spectral.as_operator(A)
    ck = Checkpoint(tmp_path / "s.npz", kind="k", config={"a": 1}, operator=op, probe_seed=5)
    ck.save({}, {})
    assert _stored(tmp_path / "s.npz")["probe_seed"] == 5
    with pytest.raises(ValueError, match="'probe_seed'"):
        Checkpoint(tmp_path / "t.npz", kind="k", config={}, probe_seed=-1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert fresh_probe_seed("k", {"a": 1}) == fresh_probe_seed("k", {"a": 1})
    assert fresh_probe_seed("k", {"a": 1}) != fresh_probe_seed("k", {"a": 2})
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert fresh_probe_seed("k", {"a": 1}) != fresh_probe_seed("k", {"a": 1})
