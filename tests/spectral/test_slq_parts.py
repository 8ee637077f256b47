"""The parts of ``spectral.quadrature.slq``: argument checks, the per-probe record, its state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spectral.krylov import lanczos
from spectral.operator import as_operator
from spectral.quadrature import _check_counts, _ProbeRecord, _restore, slq
from spectral.resume import Checkpoint


def _diag(n: int = 6) -> np.ndarray:
    return np.diag(np.arange(1.0, n + 1.0))


def test_record_rows_and_node_accuracy_follow_the_lanczos_results() -> None:
    A = _diag()
    eps = float(np.finfo(np.float64).eps)
    record = _ProbeRecord.empty(2, 4, eps=eps, n=6)
    v = np.zeros(6)
    v[[0, 5]] = 1.0  # Krylov space of dimension 2: invariant after two steps
    early = lanczos(A, 4, v0=v)
    full = lanczos(A, 4, v0=np.ones(6))
    record.add(0, early)
    record.add(1, full)
    assert bool(early.breakdown) and not bool(full.breakdown)
    np.testing.assert_allclose(record.nodes[0, :2], [1.0, 6.0], rtol=0, atol=1e-13)
    assert np.isnan(record.nodes[0, 2:]).all() and np.isnan(record.weights[0, 2:]).all()
    np.testing.assert_allclose(record.weights[0, :2], [0.5, 0.5], rtol=0, atol=1e-14)
    assert record.invariant.tolist() == [True, False]
    theta = full.ritz().values
    rounding = 8.0 * (4 + np.sqrt(6)) * eps * float(np.max(np.abs(theta)))
    assert record.tolerance[1] == rounding
    stop = max(8.0 * (2 + np.sqrt(6)) * eps * 6.0, float(early.residual_norm))
    assert record.tolerance[0] == pytest.approx(stop, rel=1e-12)
    density = record.density(probe_kind="explicit")
    assert density.num_probes == 2 and density.dimension == 6


def test_record_density_equals_slq_with_explicit_probes() -> None:
    A = _diag()
    probes = np.random.default_rng(3).standard_normal((6, 2))
    record = _ProbeRecord.empty(2, 3, eps=float(np.finfo(np.float64).eps), n=6)
    for k in range(2):
        record.add(k, lanczos(A, 3, v0=probes[:, k]))
    direct = record.density(probe_kind="explicit")
    pooled = slq(A, 3, probes=probes)
    assert np.array_equal(direct.nodes, pooled.nodes)
    assert np.array_equal(direct.weights, pooled.weights)
    assert np.array_equal(pooled.probe_tolerance, record.tolerance)  # type: ignore[arg-type]


def test_payload_round_trips_through_restore(tmp_path: Path) -> None:
    path = tmp_path / "slq.state"
    A = _diag()
    op = as_operator(A)
    rng = np.random.default_rng(0)
    record = _ProbeRecord.empty(3, 2, eps=1e-16, n=6)
    record.add(0, lanczos(A, 2, v0=np.ones(6)))
    saved_state = rng.bit_generator.state
    state = Checkpoint(path, kind="slq", config={"function": "slq"}, operator=op)
    state.save(*record.payload(1, saved_state))
    rng.standard_normal(5)  # moves the generator on; restore puts it back
    fresh = _ProbeRecord.empty(3, 2, eps=1e-16, n=6)
    reopened = Checkpoint(path, kind="slq", config={"function": "slq"}, operator=op)
    first, pending = _restore(reopened, rng, fresh)
    assert (first, pending) == (1, None)
    assert np.array_equal(fresh.nodes[0], record.nodes[0]) and np.isnan(fresh.nodes[1:]).all()
    assert fresh.tolerance[0] == record.tolerance[0]
    assert rng.bit_generator.state == saved_state


@pytest.mark.parametrize(
    ("num_iters", "num_probes", "probe", "columns", "name"),
    [
        (0, 1, "rademacher", None, "num_iters"),
        (7, 1, "rademacher", None, "num_iters"),
        (3, 0, "rademacher", None, "num_probes"),
        (3, 1, "cauchy", None, "probe"),
        (3, 3, "rademacher", 2, "num_probes"),
    ],
)
def test_check_counts_names_the_argument(
    num_iters: int, num_probes: int, probe: str, columns: int | None, name: str
) -> None:
    op = as_operator(_diag())
    host = None if columns is None else np.ones((6, columns))
    with pytest.raises(ValueError, match=name):
        _check_counts(op, num_iters, num_probes, probe, host)


def test_check_counts_defaults_to_the_number_of_columns() -> None:
    op = as_operator(_diag())
    assert _check_counts(op, 3, None, "rademacher", np.ones((6, 4))) == 4
    assert _check_counts(op, 3, None, "gaussian", None) == 1
