"""spectral.resume: state files, fingerprints and resumable Lanczos / SLQ."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spectral.io import CorruptFileError, load_npz, save_npz
from spectral.operator import as_operator
from spectral.resume import (
    FORMAT,
    Checkpoint,
    LanczosState,
    StateMismatchError,
    array_digest,
    check_every,
    describe_seed,
    operator_fingerprint,
    storage_dtype,
)


def _spd(n: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.linspace(-1.0, 5.0, n)) @ Q.T


def test_round_trip_and_format(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    ck = Checkpoint(path, kind="k", config={"a": 1, "b": [1, 2]}, operator=as_operator(_spd()))
    assert ck.load() is None
    ck.save({"x": np.arange(4.0), "s": np.asarray("text")}, {"i": 3, "nested": {"z": None}})
    raw = load_npz(path)
    assert str(raw["format"]) == FORMAT and str(raw["kind"]) == "k"
    assert json.loads(str(raw["config_json"])) == {"a": 1, "b": [1, 2]}
    again = Checkpoint(path, kind="k", config={"b": [1, 2], "a": 1}, operator=as_operator(_spd()))
    state = again.load()
    assert state is not None
    assert state.meta == {"i": 3, "nested": {"z": None}}
    np.testing.assert_array_equal(state.arrays["x"], np.arange(4.0))
    assert set(state.arrays) == {"x", "s"}
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_mismatches_are_refused_with_the_differences(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    op = as_operator(_spd())
    Checkpoint(path, kind="lanczos", config={"num_iters": 5, "seed": 0}, operator=op).save({}, {})
    with pytest.raises(StateMismatchError, match=r"'checkpoint'.*num_iters=5 in the file but 6"):
        Checkpoint(path, kind="lanczos", config={"num_iters": 6, "seed": 0}, operator=op).load()
    with pytest.raises(StateMismatchError, match=r"written by lanczos"):
        Checkpoint(path, kind="slq", config={"num_iters": 5, "seed": 0}, operator=op).load()
    other = as_operator(_spd(seed=1))
    with pytest.raises(StateMismatchError, match=r"another operator"):
        Checkpoint(path, kind="lanczos", config={"num_iters": 5, "seed": 0}, operator=other).load()
    small = as_operator(_spd(n=10))
    with pytest.raises(StateMismatchError, match=r"dimension n=10"):
        Checkpoint(path, kind="lanczos", config={"num_iters": 5, "seed": 0}, operator=small).load()
    single = as_operator(_spd().astype(np.float32))
    with pytest.raises(StateMismatchError, match=r"dtype float32"):
        Checkpoint(path, kind="lanczos", config={"num_iters": 5, "seed": 0}, operator=single).load()
    with pytest.raises(StateMismatchError, match=r"operator"):
        Checkpoint(path, kind="lanczos", config={"num_iters": 5, "seed": 0}).load()


def test_operator_fingerprint_tolerates_rounding_only_off_the_cpu() -> None:
    """On a non-deterministic platform, products differing by reduction-order rounding are the
    same operator, real changes not; on the CPU (deterministic) no difference is tolerated."""
    A = _spd()
    base = operator_fingerprint(as_operator(A))
    eps = np.finfo(np.float64).eps
    rounding = operator_fingerprint(as_operator(lambda x: A @ x * (1 + 4 * eps), size=30))
    assert base.platform == rounding.platform == "cpu"
    assert rounding.digest != base.digest
    assert "no difference is tolerated" in str(base.difference(rounding))
    on_gpu = dataclasses.replace(base, platform="cuda")
    assert on_gpu.difference(dataclasses.replace(rounding, platform="cuda")) is None
    assert base.difference(dataclasses.replace(rounding, platform="cuda")) is None  # mixed
    changed = operator_fingerprint(as_operator(A + 1e-8 * np.eye(30)))
    assert "another operator" in str(base.difference(changed))
    assert "another operator" in str(
        on_gpu.difference(dataclasses.replace(changed, platform="cuda"))
    )
    assert base == operator_fingerprint(as_operator(A.copy()))


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(b"not a zip")
    with pytest.raises(CorruptFileError, match=r"s\.npz"):
        Checkpoint(path, kind="k", config={}).load()
    save_npz(path, x=np.arange(3))
    with pytest.raises(CorruptFileError, match="not a spectral-resume"):
        Checkpoint(path, kind="k", config={}).load()
    save_npz(
        path, format="other/1", kind="k", config_json="{}", operator_json="null", meta_json="{}"
    )
    with pytest.raises(CorruptFileError, match="format"):
        Checkpoint(path, kind="k", config={}).load()


def test_helpers() -> None:
    assert check_every(3) == 3
    with pytest.raises(TypeError, match="'checkpoint_every'"):
        check_every(2.0)
    with pytest.raises(ValueError, match="'checkpoint_every'"):
        check_every(-1)
    gen = np.random.default_rng(5)
    desc = describe_seed(gen)
    gen.random()
    assert describe_seed(gen) != desc
    assert describe_seed(np.random.default_rng(5)) == desc
    assert array_digest(np.ones(3)) != array_digest(np.ones(4))
    xp = as_operator(np.eye(2)).xp
    assert storage_dtype(xp, np.dtype(np.float64)) is np.float64
    assert storage_dtype(xp, np.dtype(np.float32)) is np.float32
    with pytest.raises(TypeError, match="'checkpoint'"):
        Checkpoint(3, kind="k", config={})  # type: ignore[arg-type]


def test_lanczos_state_validation(tmp_path: Path) -> None:
    ck = Checkpoint(tmp_path / "s.npz", kind="k", config={})
    good = LanczosState(
        iteration=2, alphas=np.ones(2), betas=np.ones(2), start_norm=1.0,
        basis=np.zeros((2, 4)), q=np.zeros(4), q_prev=np.zeros(4),
    )  # fmt: skip
    arrays, meta = good.to_payload("p_")
    ck.save(arrays, meta)
    saved = ck.load()
    assert saved is not None
    back = LanczosState.from_payload(saved, "p_")
    np.testing.assert_array_equal(back.basis, good.basis)
    assert back.iteration == 2 and not back.complete
    bad: dict[str, Any] = dict(arrays)
    bad["p_alphas"] = np.ones(3)
    ck.save(bad, meta)
    saved = ck.load()
    assert saved is not None
    with pytest.raises(CorruptFileError, match="alphas"):
        LanczosState.from_payload(saved, "p_")
    with pytest.raises(CorruptFileError, match="lacks the Lanczos state"):
        LanczosState.from_payload(saved, "other_")


# ----------------------------------------------------------------------------- Lanczos / SLQ


class _Killed(Exception):
    """Stands for a kill between two products."""


class _Flaky:
    """``A @ x`` that raises after ``budget`` products (``None``: never); counts products."""

    def __init__(self, A: np.ndarray, budget: int | None) -> None:
        self.A, self.budget, self.calls = A, budget, 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.budget is not None and self.calls > self.budget:
            raise _Killed
        return self.A @ x


def _interrupted(run: Any, A: np.ndarray, budgets: list[int]) -> tuple[Any, int]:
    """Run ``run(op)`` killed after each budget in turn, then fully; return result and products."""
    for budget in budgets:
        with pytest.raises(_Killed):
            run(as_operator(_Flaky(A, budget), size=A.shape[0]))
    final = _Flaky(A, None)
    return run(as_operator(final, size=A.shape[0])), final.calls


def _same_lanczos(a: Any, b: Any) -> None:
    np.testing.assert_array_equal(a.alpha, b.alpha)
    np.testing.assert_array_equal(a.beta, b.beta)
    assert a.num_iters == b.num_iters and a.breakdown == b.breakdown
    assert a.residual_norm == b.residual_norm and a.start_norm == b.start_norm
    np.testing.assert_array_equal(a.residual_vector, b.residual_vector)
    if a.basis is None:
        assert b.basis is None
    else:
        np.testing.assert_array_equal(a.basis, b.basis)


@pytest.mark.parametrize(
    ("reorth", "store_basis"),
    [
        ("full", True),
        ("none", False),
        ("none", True),
        ("partial", True),
        ("selective", True),
        (3, True),
    ],
)
def test_lanczos_resumes_bit_identically(
    tmp_path: Path, reorth: str | int, store_basis: bool
) -> None:
    from spectral.krylov import lanczos

    A = _spd(40)
    kw: dict[str, Any] = dict(seed=7, reorth=reorth, store_basis=store_basis)
    reference = lanczos(A, 25, **kw)
    path = tmp_path / "state.npz"

    def run(op: Any) -> Any:
        return lanczos(op, 25, checkpoint=path, checkpoint_every=4, **kw)

    # killed after 6 products (state at step 4), again during the resumed run (state at 12)
    resumed, calls = _interrupted(run, A, [1 + 6, 1 + 10])
    _same_lanczos(reference, resumed)
    assert calls == 1 + 25 - 12  # fingerprint product + the steps after the last state
    again, calls = _interrupted(run, A, [])
    _same_lanczos(reference, again)
    assert calls == 1  # a finished state: only the fingerprint


def test_lanczos_resume_float32_and_explicit_start(tmp_path: Path) -> None:
    from spectral.krylov import lanczos

    A = _spd(30).astype(np.float32)
    v0 = np.linspace(1.0, 2.0, 30).astype(np.float32)
    reference = lanczos(A, 12, v0=v0)
    path = tmp_path / "s.npz"
    for budget in (1 + 7,):
        with pytest.raises(_Killed):
            lanczos(
                as_operator(_Flaky(A, budget), size=30, like=np.zeros(30, np.float32)),
                12,
                v0=v0,
                checkpoint=path,
                checkpoint_every=3,
            )
    resumed = lanczos(A, 12, v0=v0, checkpoint=path, checkpoint_every=3)
    _same_lanczos(reference, resumed)
    assert resumed.basis.dtype == np.float32
    with pytest.raises(StateMismatchError, match="v0="):
        lanczos(A, 12, v0=2 * v0, checkpoint=path)


def test_lanczos_state_refuses_other_arguments_and_operators(tmp_path: Path) -> None:
    from spectral.krylov import lanczos

    A = _spd(20)
    path = tmp_path / "s.npz"
    lanczos(A, 5, seed=0, checkpoint=path)
    with pytest.raises(StateMismatchError, match=r"seed=0 in the file but 1"):
        lanczos(A, 5, seed=1, checkpoint=path)
    with pytest.raises(StateMismatchError, match=r"reorth='full' in the file but 'none'"):
        lanczos(A, 5, seed=0, reorth="none", store_basis=False, checkpoint=path)
    with pytest.raises(StateMismatchError, match=r"another operator"):
        lanczos(2.0 * A, 5, seed=0, checkpoint=path)
    with pytest.raises(StateMismatchError, match=r"written by lanczos"):
        from spectral.quadrature import slq

        slq(A, 5, seed=0, checkpoint=path)


def test_lanczos_with_unseeded_generator_resumes_and_advances_it(tmp_path: Path) -> None:
    from spectral.krylov import lanczos

    A = _spd(20)
    gen_ref = np.random.default_rng(3)
    reference = lanczos(A, 10, seed=gen_ref)
    path = tmp_path / "s.npz"
    with pytest.raises(_Killed):
        lanczos(
            as_operator(_Flaky(A, 1 + 5), size=20),
            10,
            seed=np.random.default_rng(3),
            checkpoint=path,
            checkpoint_every=2,
        )
    gen = np.random.default_rng(3)
    _same_lanczos(reference, lanczos(A, 10, seed=gen, checkpoint=path, checkpoint_every=2))
    assert gen.bit_generator.state == gen_ref.bit_generator.state


@pytest.mark.parametrize("seed", [11, None])
def test_slq_resumes_bit_identically(tmp_path: Path, seed: int | None) -> None:
    from spectral.quadrature import slq

    A = _spd(30)
    path = tmp_path / "slq.npz"

    def run(op: Any) -> Any:
        return slq(op, 8, num_probes=3, seed=seed, checkpoint=path, checkpoint_every=3)

    # killed inside probe 2 (after probe 1 and 3 steps of probe 2), then inside probe 3
    resumed, calls = _interrupted(run, A, [1 + 8 + 4, 1 + 8])
    if seed is None:  # the reference is the run the state file describes: rerun it from there
        reference, _ = _interrupted(run, A, [])
    else:
        reference = slq(A, 8, num_probes=3, seed=seed)
    np.testing.assert_array_equal(reference.nodes, resumed.nodes)
    np.testing.assert_array_equal(reference.weights, resumed.weights)
    np.testing.assert_array_equal(reference.probe_nodes, resumed.probe_nodes)
    assert calls == 1 + 8 - 3  # fingerprint + probe 3 after its state at step 3


def _edited_state(tmp_path: Path, finished: bool, edit: Any) -> tuple[Path, np.ndarray]:
    """A lanczos state file (mid-run after 4 of 8 steps, or finished) whose arrays were
    changed by ``edit`` and saved again with a valid checksum (a tool rewrote it)."""
    from spectral.krylov import lanczos

    A = np.diag(np.arange(1.0, 13.0))
    A[0, 1] = A[1, 0] = 0.5
    path = tmp_path / "state.npz"
    if finished:
        lanczos(A, 8, seed=0, checkpoint=path)
    else:  # one fingerprint product and 4 steps, saved every 2
        with pytest.raises(_Killed):
            lanczos(
                as_operator(_Flaky(A, 5), size=12), 8, seed=0, checkpoint=path, checkpoint_every=2
            )
    arrays = dict(load_npz(path))
    edit(arrays)
    save_npz(path, **arrays)  # a new, valid checksum
    return path, A


@pytest.mark.parametrize(
    ("finished", "edit", "match"),
    [
        (False, lambda z: z.update(q=z["q"][:-1]), r"vectors of lengths \[11, 12\].*n = 12"),
        (False, lambda z: z.update(q_prev=z["q_prev"][:, None]), "q_prev has shape"),
        (False, lambda z: z.update(alphas=z["alphas"].astype(np.int64)), "alphas has dtype int64"),
        (False, lambda z: z.update(basis=z["basis"].astype(np.int32)), "basis has dtype int32"),
        (False, lambda z: z.update(omega_cur=np.ones(3)), "omega_cur/omega_old have shapes"),
        (True, lambda z: z.update(basis=z["basis"][:, :5]), r"lengths \[5, 12\]"),
        (True, lambda z: z.update(residual=np.full(12, np.nan)), "residual has non-finite"),
    ],
)
def test_edited_state_fields_are_refused(
    tmp_path: Path, finished: bool, edit: Any, match: str
) -> None:
    """A field changed behind the checksum's back (a wrong-length ``q`` reached numpy as a
    raw broadcast error; int alphas resumed to a silently different result; a finished
    state returned a (8, 5) basis for n = 12)."""
    from spectral.krylov import lanczos

    path, A = _edited_state(tmp_path, finished, edit)
    with pytest.raises(CorruptFileError, match=match):
        lanczos(A, 8, seed=0, checkpoint=path, checkpoint_every=2)


def test_lanczos_state_vectors_are_checked_against_n() -> None:
    state = LanczosState(
        iteration=1, alphas=np.ones(1), betas=np.ones(1), start_norm=1.0,
        q=np.zeros(4), q_prev=np.zeros(4),
    )  # fmt: skip
    state.validate(n=4)
    state.validate()
    with pytest.raises(CorruptFileError, match="n = 5"):
        state.validate("s.npz", n=5)
    state.q_prev = np.zeros(3)
    with pytest.raises(CorruptFileError, match="one length"):
        state.validate()


def test_a_directory_as_checkpoint_is_refused_by_name(tmp_path: Path) -> None:
    """It gave "No such file: '<the directory>'"."""
    from spectral.krylov import lanczos
    from spectral.quadrature import slq

    with pytest.raises(ValueError, match=r"Argument 'checkpoint': expected .*not a directory"):
        lanczos(np.eye(3), 2, seed=0, checkpoint=tmp_path)
    with pytest.raises(ValueError, match="Argument 'checkpoint'"):
        slq(np.eye(3), 2, seed=0, checkpoint=str(tmp_path))
