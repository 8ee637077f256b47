"""Data-parallel curvature operators over torch.distributed (Gloo, CPU processes).

One job of three processes (``file://`` rendezvous in a temporary directory, so no
ports are involved) covers:

* the default group of 3 ranks with unequal shards (3, 2 and 2 batches of a 7-batch
  stream whose last batch is smaller), ``process_group=None`` (auto-detected);
* an explicit sub-group of 2 ranks (``new_group([0, 1])``) with the model wrapped
  in ``DistributedDataParallel``;

and compares, in float64, with the single-process operator on the full data
(computed on each rank with ``process_group=False``): Hessian, GGN and Monte-Carlo
Fisher products (relative 1e-12), Lanczos coefficients bit for bit across ranks,
Ritz values against the single-process run, and ``curvops.stats.loss_stats``.

The workers are this file run as a script (``python test_distributed.py --worker``).
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvops import distributed as cd
from tests.gloo_workers import leave_process_group

WORLD = 3
SIZES = [6, 6, 6, 6, 6, 6, 4]  # 7 batches, N = 40: shards of 16 / 12 / 12 samples over 3 ranks
NUM_CLASSES = 3
ITERS = 12
NUM_VECTORS = 3
TIMEOUT_S = 150


def make_model(seed: int = 0) -> nn.Module:
    """Linear(5, 10)-BatchNorm1d-Tanh-Linear(10, 3) in float64, P = 113."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, NUM_CLASSES))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.6)
    return net.double().train()


def make_batches(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The full data stream: 7 batches of sizes ``SIZES``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(SIZES), 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (sum(SIZES),), generator=g)
    out, start = [], 0
    for size in SIZES:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


# ---------------------------------------------------------------------------- worker side


def _products(op: Any, V: np.ndarray) -> np.ndarray:
    return np.asarray(op.matmat(V), dtype=np.float64)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of the job: compute everything, save ``rank{r}.npz``."""
    import torch.distributed as dist

    from curvops import FisherOperator, GGNOperator, HessianOperator
    from curvops._model_state import model_state, state_differences
    from curvops.stats import loss_stats
    from spectral.krylov import lanczos

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S // 2),  # a failed peer surfaces quickly
    )
    out: dict[str, Any] = {}
    loss = nn.CrossEntropyLoss()
    model = make_model()
    batches = make_batches()
    P = sum(p.numel() for p in model.parameters())
    V = np.random.default_rng(0).standard_normal((P, NUM_VECTORS))
    kw: dict[str, Any] = {"bn_mode": "train"}

    # single-process references on the full data (no communication)
    H_ref = HessianOperator(model, loss, batches, process_group=False, **kw)
    G_ref = GGNOperator(model, loss, batches, process_group=False, **kw)
    F_ref = FisherOperator(model, loss, batches, process_group=False, seed=3, **kw)
    out["H_ref"], out["G_ref"] = _products(H_ref, V), _products(G_ref, V)
    out["F_ref"] = _products(F_ref, V)
    ref_run = lanczos(H_ref, ITERS, seed=0)
    out["ritz_ref"] = ref_run.ritz().values
    stats_ref = loss_stats(model, loss, batches, num_probes=2, seed=0, **kw)

    # default group, unequal shards, process_group=None detected
    shard = cd.shard_batches(batches)
    out["shard_indices"] = np.array([b.index for b in shard])
    out["shard_samples"] = np.int64(shard.num_samples)
    H = HessianOperator(model, loss, shard, **kw)
    out["H"] = _products(H, V)
    out["grad_ref"], out["grad"] = H_ref.loss_gradient().numpy(), H.loss_gradient().numpy()
    x_all = torch.cat([b[0] for b in batches])
    y_all = torch.cat([b[1] for b in batches])
    loader = DataLoader(TensorDataset(x_all, y_all), batch_size=SIZES[0], shuffle=False)
    G = GGNOperator(model, loss, cd.shard_batches(loader), **kw)
    out["G"] = _products(G, V)
    F = FisherOperator(model, loss, cd.shard_batches(batches), seed=3, **kw)
    out["F"] = _products(F, V)
    run = lanczos(H, ITERS, seed=0)
    out["alpha"], out["beta"] = run.alpha, run.beta
    out["ritz"] = run.ritz().values
    out["alpha_replicated"] = np.bool_(cd.check_replicated(run.alpha))
    stats = loss_stats(model, loss, shard, num_probes=2, seed=0, **kw)
    for key in ("loss_mean", "loss_var", "grad_mean_norm_sq", "grad_var", "hess_var", "hess_mu"):
        out[f"stats_{key}"] = np.array([getattr(stats_ref, key), getattr(stats, key)])
    out["stats_frobenius"] = np.array([stats_ref.frobenius_norm_sq, stats.frobenius_norm_sq])
    out["stats_counts"] = np.array([stats.num_samples, stats.num_batches])

    # float32 buffers carry large integer weights exactly
    _, total = cd.all_reduce_weighted(torch.ones(2), float(2**30 + rank), dist.group.WORLD)
    out["weight_total"] = np.float64(total)

    # explicit 2-rank sub-group with a DDP-wrapped model (all ranks create the group)
    pair = dist.new_group([0, 1])
    if rank < 2:
        ddp = nn.parallel.DistributedDataParallel(make_model(), process_group=pair)
        before = model_state(ddp.module)
        H2 = HessianOperator(
            ddp, loss, cd.shard_batches(batches, rank, 2), process_group=pair, **kw
        )
        out["H_pair"] = _products(H2, V)
        run2 = lanczos(H2, ITERS, seed=0)
        out["alpha_pair"], out["beta_pair"] = run2.alpha, run2.beta
        out["pair_state_diffs"] = np.array(state_differences(before, ddp.module), dtype=np.str_)
        # DDP's reducer was not armed by the products: two ordinary training steps work
        for _ in range(2):
            ddp(batches[rank][0]).sum().backward()
        out["ddp_grad_finite"] = np.bool_(
            all(bool(torch.isfinite(p.grad).all()) for p in ddp.parameters())
        )
    np.savez(Path(out_dir) / f"rank{rank}.npz", **out)
    leave_process_group()


# ---------------------------------------------------------------------------- test side


def _run_job(
    run: Callable[[list[list[str]], float], None], tmp: Path
) -> list[dict[str, np.ndarray]]:
    """Run the 3-process job; the per-rank result dictionaries."""
    init_file = str(tmp / "rendezvous")
    run(
        [[__file__, "--worker", str(r), str(WORLD), init_file, str(tmp)] for r in range(WORLD)],
        TIMEOUT_S,
    )
    return [dict(np.load(tmp / f"rank{r}.npz")) for r in range(WORLD)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_unequal_shards_cover_the_data_once(job: list[dict[str, np.ndarray]]) -> None:
    indices = [r["shard_indices"].tolist() for r in job]
    assert indices == [[0, 3, 6], [1, 4], [2, 5]]
    assert [int(r["shard_samples"]) for r in job] == [16, 12, 12]
    assert sorted(i for ix in indices for i in ix) == list(range(len(SIZES)))


def _check_products(job: list[dict[str, np.ndarray]]) -> None:
    for name in ("H", "G", "F", "grad"):
        _check_product(job, name)


def _check_product(job: list[dict[str, np.ndarray]], name: str) -> None:
    for r in job:
        assert _rel(r[name], r[f"{name}_ref"]) <= 1e-12, name
    # the reduced products are bitwise identical on every rank
    for r in job[1:]:
        assert np.array_equal(r[name], job[0][name])


def _check_lanczos_bitwise_identical_across_ranks(job: list[dict[str, np.ndarray]]) -> None:
    for r in job[1:]:
        assert np.array_equal(r["alpha"], job[0]["alpha"])
        assert np.array_equal(r["beta"], job[0]["beta"])
    assert all(bool(r["alpha_replicated"]) for r in job)
    assert job[0]["alpha"].shape == (ITERS,)


def _check_spectrum_equals_single_process(job: list[dict[str, np.ndarray]]) -> None:
    ref = job[0]["ritz_ref"]
    scale = np.abs(ref).max()
    for r in job:
        assert np.abs(r["ritz"] - ref).max() <= 1e-10 * scale


def _check_subgroup_with_ddp_model(job: list[dict[str, np.ndarray]]) -> None:
    for r in job[:2]:
        assert _rel(r["H_pair"], r["H_ref"]) <= 1e-12
        assert r["pair_state_diffs"].size == 0
        assert bool(r["ddp_grad_finite"])
    assert np.array_equal(job[0]["alpha_pair"], job[1]["alpha_pair"])
    assert np.array_equal(job[0]["beta_pair"], job[1]["beta_pair"])
    assert "H_pair" not in job[2]


def _check_loss_stats_equal_single_process(job: list[dict[str, np.ndarray]]) -> None:
    for r in job:
        for key in ("loss_mean", "loss_var", "grad_mean_norm_sq", "grad_var", "hess_var"):
            ref, got = r[f"stats_{key}"]
            assert got == pytest.approx(ref, rel=1e-10, abs=1e-14), key
        ref, got = r["stats_hess_mu"]
        assert got == pytest.approx(ref, rel=1e-10, abs=1e-14)
        ref, got = r["stats_frobenius"]
        assert got == pytest.approx(ref, rel=1e-10)
        assert r["stats_counts"].tolist() == [sum(SIZES), len(SIZES)]


def _check_float32_weights_exact(job: list[dict[str, np.ndarray]]) -> None:
    want = WORLD * 2**30 + sum(range(WORLD))
    assert all(float(r["weight_total"]) == want for r in job)


@pytest.mark.distributed
def test_three_gloo_processes(
    tmp_path: Path, run_worker_processes: Callable[[list[list[str]], float], None]
) -> None:
    """One job (about 10 s of CPU per process, mostly imports), every property checked.

    A single test function rather than a module fixture, so that pytest-xdist never
    runs the job twice.
    """
    job = _run_job(run_worker_processes, tmp_path)
    _check_unequal_shards_cover_the_data_once(job)
    _check_products(job)
    _check_lanczos_bitwise_identical_across_ranks(job)
    _check_spectrum_equals_single_process(job)
    _check_subgroup_with_ddp_model(job)
    _check_loss_stats_equal_single_process(job)
    _check_float32_weights_exact(job)


# ---------------------------------------------------------------------------- in-process


def test_shard_batches_of_a_loader_matches_the_list() -> None:
    batches = make_batches()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = DataLoader(TensorDataset(x, y), batch_size=SIZES[0])
    for rank in range(WORLD):
        from_list = list(cd.shard_batches(batches, rank, WORLD))
        shard = cd.shard_batches(loader, rank, WORLD)
        from_loader = list(shard)
        assert [b.index for b in from_loader] == [b.index for b in from_list]
        assert shard.num_samples == sum(b.size for b in from_list)
        for a, b in zip(from_loader, from_list):
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    # drop_last: the arithmetic count follows the loader
    dropped = DataLoader(TensorDataset(x, y), batch_size=SIZES[0], drop_last=True)
    assert cd.shard_batches(dropped, 0, WORLD).num_samples == 2 * SIZES[0]


def test_shard_batches_rejects_bad_input() -> None:
    batches = make_batches()
    with pytest.raises(ValueError, match="rank"):
        cd.shard_batches(batches, 3, 3)
    with pytest.raises(ValueError, match="world_size"):
        cd.shard_batches(batches, 0, 0)
    with pytest.raises(ValueError, match="at least 8 batches"):
        cd.shard_batches(batches, 7, 8)
    with pytest.raises(ValueError, match="single"):
        cd.shard_batches(batches[0], 0, 2)
    with pytest.raises(TypeError, match="re-iterable"):
        cd.shard_batches(iter(batches), 0, 2)


def test_local_helpers_without_a_process_group() -> None:
    assert cd.resolve_group(None) is None and cd.resolve_group(False) is None
    with pytest.raises(TypeError, match="process_group"):
        cd.resolve_group("world")
    acc, weight = cd.all_reduce_weighted(torch.ones(2, 2), 3.0, None)
    assert weight == 3.0 and acc.shape == (2, 2)
    assert cd.check_replicated(torch.ones(3))
    lin = nn.Linear(2, 2)
    wrapped = nn.DataParallel(lin)
    assert cd.unwrap_model(wrapped) is lin


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=4, metavar=("RANK", "WORLD", "INIT_FILE", "OUT_DIR"))
    ns = parser.parse_args()
    rank_, world_, init_, out_ = ns.worker
    _worker(int(rank_), int(world_), init_, out_)
