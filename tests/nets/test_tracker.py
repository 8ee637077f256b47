"""nets.CurvatureTracker in a hand-written training loop, against dense float64 Hessians."""

from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from curvops.testing import dense_ggn, dense_hessian
from nets import CurvatureTracker
from spectral.io import CorruptFileError

TOL = 1e-10  # residual tolerance asked of the tracker: |theta - lambda| <= TOL |theta|


def _mlp(seed: int = 0, *, bn: bool = False, dropout: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 6)]
    if bn:
        layers.append(nn.BatchNorm1d(6))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(0.2))
    layers.append(nn.Linear(6, 3))
    return nn.Sequential(*layers).double()


def _data(seed: int = 1, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _train(
    model: nn.Module,
    steps: int,
    tracker: CurvatureTracker | None = None,
    *,
    lr: float = 0.1,
    opt: torch.optim.Optimizer | None = None,
    on_step: Any = None,
) -> torch.optim.Optimizer:
    """Full-batch SGD with momentum; ``on_step(step, model, opt)`` after each tracked step."""
    x, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if tracker is not None:
            tracker.step()
        if on_step is not None:
            on_step(model, opt)
    return opt


def _top(H: torch.Tensor, k: int) -> np.ndarray:
    return np.sort(np.linalg.eigvalsh(H.numpy()))[::-1][:k]


def test_rows_at_every_step_match_dense_hessian() -> None:
    model = _mlp()
    x, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    tracker = CurvatureTracker(model, loss_fn, (x, y), every=3, top_k=3, trace_probes=4, tol=TOL)
    references: dict[int, np.ndarray] = {}

    def reference(m: nn.Module, _: Any) -> None:
        if tracker.rows and tracker.rows[-1]["step"] == tracker.count:
            references[tracker.count] = _top(dense_hessian(m, loss_fn, (x, y)), 3)

    _train(model, 10, tracker, on_step=reference)
    assert [r["step"] for r in tracker.rows] == [3, 6, 9]
    for row in tracker.rows:
        got = np.array(row["top_eigenvalues"])
        want = references[row["step"]]
        assert np.all(np.diff(got) <= 0)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=0)
        assert all(r <= TOL * abs(v) + 1e-12 for r, v in zip(row["residuals"], got, strict=True))
        assert row["products"] >= row["eigen_products"] + 4
        assert row["trace_stderr"] is not None and row["trace_stderr"] > 0
        assert row["seconds"] > 0 and row["kind"] == "hessian"
    assert [r["warm"] for r in tracker.rows] == [False, True, True]


def test_ggn_and_layer_blocks_match_dense_references() -> None:
    model = _mlp()
    x, y = _data()
    loss_fn = nn.CrossEntropyLoss()
    tracker = CurvatureTracker(
        model,
        loss_fn,
        [(x[:20], y[:20]), (x[20:], y[20:])],
        every=2,
        top_k=2,
        kind="ggn",
        blocks="layer",
        tol=TOL,
    )
    _train(model, 2, tracker)
    (row,) = tracker.rows
    data = [(x[:20], y[:20]), (x[20:], y[20:])]
    np.testing.assert_allclose(
        row["top_eigenvalues"], _top(dense_ggn(model, loss_fn, data), 2), rtol=1e-8
    )
    assert sorted(row["blocks"]) == ["0", "2"]
    for name, entry in row["blocks"].items():
        names = [n for n, _ in model.named_parameters() if n.startswith(name + ".")]
        want = _top(dense_ggn(model, loss_fn, data, params=names), 2)
        np.testing.assert_allclose(entry["top_eigenvalues"], want, rtol=1e-8)


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "opt": copy.deepcopy(opt.state_dict()),
        "modes": [m.training for m in model.modules()],
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state()[1].copy(),  # noqa: NPY002
        "python_rng": random.getstate(),
    }


def _assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    for ga, gb in zip(a["grads"], b["grads"], strict=True):
        assert torch.equal(ga, gb)
    assert a["modes"] == b["modes"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert np.array_equal(a["numpy_rng"], b["numpy_rng"])
    assert a["python_rng"] == b["python_rng"]
    for (_, sa), (_, sb) in zip(a["opt"]["state"].items(), b["opt"]["state"].items(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


def _loader_run(track: bool, tmp_path: Path) -> dict[str, Any]:
    """Dropout + train-mode BatchNorm, a shuffled loader, global RNG streams in use."""
    model = _mlp(bn=True, dropout=True)
    x, y = _data(n=48)
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(7)
    np.random.seed(7)  # noqa: NPY002 (the run uses the global stream on purpose)
    random.seed(7)
    tracker = None
    if track:
        tracker = CurvatureTracker(
            model,
            loss_fn,
            loader,
            every=2,
            top_k=2,
            trace_probes=2,
            density_every=4,
            density_iters=8,
            seed=5,
            path=tmp_path / "c.jsonl",
            optimizer=opt,
            blocks="layer",
        )
    for epoch in range(2):
        for xb, yb in loader:
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            np.random.rand()  # noqa: NPY002
            random.random()
            if tracker is not None:
                tracker.step(epoch=epoch, loss=loss.item())
    if tracker is not None:
        assert [r["step"] for r in tracker.rows] == [2, 4, 6]
        assert tracker.rows[-1]["lr"] == 0.05 and tracker.rows[-1]["epoch"] == 1
        assert [("density" in r) for r in tracker.rows] == [False, True, False]
        assert (tmp_path / tracker.rows[1]["density"]).is_file()
    snap = _snapshot(model, opt)
    snap["loader_rng"] = loader.generator.get_state()
    return snap


def test_tracking_changes_nothing_of_the_run(tmp_path: Path) -> None:
    with_tracker = _loader_run(True, tmp_path)
    without = _loader_run(False, tmp_path)
    _assert_identical(with_tracker, without)
    assert torch.equal(with_tracker["loader_rng"], without["loader_rng"])


def _reference_rows(steps: int) -> list[dict[str, Any]]:
    model = _mlp()
    tracker = CurvatureTracker(model, nn.CrossEntropyLoss(), _data(), every=5, top_k=2, tol=TOL)
    _train(model, steps, tracker, lr=0.02)
    return tracker.rows


def test_killed_and_restarted_tracker_resumes_its_file(tmp_path: Path) -> None:
    path = tmp_path / "curvature.jsonl"
    loss_fn = nn.CrossEntropyLoss()
    model = _mlp()
    checkpoints: dict[int, dict[str, Any]] = {}
    first = CurvatureTracker(model, loss_fn, _data(), every=5, top_k=2, tol=TOL, path=path)

    def checkpoint(m: nn.Module, o: torch.optim.Optimizer) -> None:
        if first.count == 15:
            checkpoints[15] = {
                "model": copy.deepcopy(m.state_dict()),
                "opt": copy.deepcopy(o.state_dict()),
            }

    _train(model, 23, first, lr=0.02, on_step=checkpoint)  # "killed" after step 23
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10, 15, 20]
    (tmp_path / ".curvature.jsonl.abc.tmp").write_text('{"step": 25, "top_')  # a torn write
    first.rows.clear()  # the first process is gone: nothing of it is used below

    # restart from the checkpoint of step 15: the row of step 20 is measured again
    model = _mlp()
    model.load_state_dict(checkpoints[15]["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    opt.load_state_dict(checkpoints[15]["opt"])
    second = CurvatureTracker(
        model, loss_fn, _data(), every=5, top_k=2, tol=TOL, path=path, start_step=15
    )
    assert second.count == 15 and [r["step"] for r in second.rows] == [5, 10, 15]
    assert second.rows[-1]["warm"] is True
    _train(model, 25, second, opt=opt)

    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == list(range(5, 41, 5))
    reference = _reference_rows(40)
    assert [r["step"] for r in reference] == steps
    # warm start survives the restart (the vectors of step 15 were kept): identical rows
    for got, want in zip(second.rows, reference, strict=True):
        assert {k: v for k, v in got.items() if k != "seconds"} == {
            k: v for k, v in want.items() if k != "seconds"
        }

    # a plain restart continues from the last row; a corrupt line is refused by name
    third = CurvatureTracker(model, loss_fn, _data(), every=5, top_k=2, tol=TOL, path=path)
    assert third.count == 40 and len(third.rows) == 8
    with pytest.raises(ValueError, match=r"'tol'.*1e-10 in the file"):
        CurvatureTracker(model, loss_fn, _data(), every=5, top_k=2, path=path)
    with pytest.raises(ValueError, match=r"Argument 'top_k'.*curvature\.jsonl' hold \(2 .*3\."):
        CurvatureTracker(model, loss_fn, _data(), every=5, top_k=3, path=path)
    with pytest.raises(ValueError, match=r"Argument 'kind'.*curvature\.jsonl'.*'ggn'"):
        CurvatureTracker(model, loss_fn, _data(), every=5, top_k=2, kind="ggn", path=path)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(CorruptFileError, match="line 9"):
        CurvatureTracker(model, loss_fn, _data(), every=5, top_k=2, tol=TOL, path=path)


def test_warm_start_spends_fewer_products_than_cold() -> None:
    model = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    common = {"every": 2, "top_k": 3, "tol": 1e-4, "seed": 0}
    warm = CurvatureTracker(model, loss_fn, _data(), **common)
    cold = CurvatureTracker(model, loss_fn, _data(), warm_start=False, **common)
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(12):  # a slowly moving model: small steps
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        warm.step()
        cold.step()
    warm_products = sum(r["products"] for r in warm.rows[1:])
    cold_products = sum(r["products"] for r in cold.rows[1:])
    for a, b in zip(warm.rows, cold.rows, strict=True):
        np.testing.assert_allclose(a["top_eigenvalues"], b["top_eigenvalues"], rtol=2e-4)
        assert a["warm"] is (a["step"] > 2) and b["warm"] is False
    assert warm_products <= 0.5 * cold_products, (warm_products, cold_products)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 51}, "top_k"),
        ({"kind": "hessain"}, "kind"),
        ({"tol": 0.0}, "tol"),
        ({"density_every": 3, "every": 2}, "density_every"),
        ({"blocks": "layers"}, "blocks"),
        ({"trace_probes": -1}, "trace_probes"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CurvatureTracker(_mlp(), nn.CrossEntropyLoss(), _data(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"operator_kwargs": {"frob": 1}}, ValueError, r"'operator_kwargs'.*'frob'"),
        ({"operator_kwargs": {"params": ["0.weight"]}}, ValueError, r"'operator_kwargs'.*'params'"),
        ({"operator_kwargs": [("cache", True)]}, TypeError, r"'operator_kwargs'.*mapping"),
        ({"warm_start": "no"}, TypeError, r"'warm_start'.*True or False.*'no'"),
        ({"warm_start": 0}, TypeError, r"'warm_start'"),
    ],
)
def test_operator_kwargs_and_warm_start_are_checked(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    """Before: the operator's bare ``TypeError: ... unexpected keyword argument 'frob'``,
    and ``warm_start="no"`` read as true."""
    with pytest.raises(error, match=match):
        CurvatureTracker(_mlp(), nn.CrossEntropyLoss(), _data(), every=2, top_k=1, **kwargs)
    tracker = CurvatureTracker(
        _mlp(), nn.CrossEntropyLoss(), _data(), every=2, top_k=1, warm_start=False,
        operator_kwargs={"cache": False},
    )  # fmt: skip
    assert tracker.warm_start is False


def test_a_directory_as_path_is_refused_at_construction(tmp_path: Path) -> None:
    """Before: accepted; the run failed at the first measurement, ``every`` steps later,
    with an ``IsADirectoryError`` naming an internal temporary file."""
    with pytest.raises(
        ValueError, match=rf"Argument 'path'.*{re.escape(str(tmp_path))}', a directory"
    ):
        CurvatureTracker(_mlp(), nn.CrossEntropyLoss(), _data(), every=1, top_k=1, path=tmp_path)
    assert list(tmp_path.iterdir()) == []


def _tracked_file(tmp_path: Path) -> Path:
    path = tmp_path / "curvature.jsonl"
    model = _mlp()
    tracker = CurvatureTracker(
        model, nn.CrossEntropyLoss(), _data(), every=2, top_k=2, tol=TOL, path=path
    )
    _train(model, 6, tracker, lr=0.02)
    return path


def test_a_changed_digit_in_the_rows_file_is_refused_on_resume(tmp_path: Path) -> None:
    """Every row carries a CRC-32: one changed digit of a stored eigenvalue was a
    silently different measurement after a restart."""
    path = _tracked_file(tmp_path)
    lines = path.read_text().splitlines()
    assert all('"crc32": ' in line for line in lines)
    row = json.loads(lines[1])
    value = repr(row["top_eigenvalues"][0])
    digit = next(i for i, c in enumerate(value) if c.isdigit() and c not in "09")
    changed = value[:digit] + str(int(value[digit]) + 1) + value[digit + 1 :]
    lines[1] = lines[1].replace(value, changed, 1)
    path.write_text("\n".join(lines) + "\n")
    make = lambda: CurvatureTracker(  # noqa: E731
        _mlp(), nn.CrossEntropyLoss(), _data(), every=2, top_k=2, tol=TOL, path=path
    )
    with pytest.raises(CorruptFileError, match=r"curvature\.jsonl', line 2: checksum mismatch"):
        make()
    from nets import plot_curvature_tracking

    with pytest.raises(CorruptFileError, match="line 2: checksum mismatch"):
        plot_curvature_tracking(path)


def test_a_flipped_bit_in_the_checksum_key_of_a_one_row_file_is_refused(tmp_path: Path) -> None:
    """Two flipped bits, one in ``"crc32"`` (-> ``"crc33"``) and one in a digit: a one-row
    file then read as a file from before the checksums, the changed value unchecked."""
    from nets.curvature_rows import read_rows, write_rows

    path = tmp_path / "curvature.jsonl"
    write_rows(path, [{"step": 50, "top_eigenvalues": [12.5, 3.25]}])
    text = path.read_text()
    assert '"crc32"' in text
    path.write_text(text.replace('"crc32"', '"crc33"').replace("12.5", "13.5"))
    with pytest.raises(CorruptFileError, match=r"line 1: key 'crc33' where the checksum key"):
        read_rows(path)


def test_a_row_without_its_checksum_is_refused(tmp_path: Path) -> None:
    path = _tracked_file(tmp_path)
    lines = path.read_text().splitlines()
    row = json.loads(lines[0])
    del row["crc32"]
    lines[0] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptFileError, match=r"1 of 3 rows have no 'crc32' key"):
        CurvatureTracker(
            _mlp(), nn.CrossEntropyLoss(), _data(), every=2, top_k=2, tol=TOL, path=path
        )


def test_a_file_written_before_the_checksums_resumes(tmp_path: Path) -> None:
    path = _tracked_file(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        del row["crc32"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tracker = CurvatureTracker(
        _mlp(), nn.CrossEntropyLoss(), _data(), every=2, top_k=2, tol=TOL, path=path
    )
    assert tracker.rows == rows and tracker.count == 6
