"""K-FAC and E-KFAC over torch.distributed: two Gloo processes with unequal shards.

Each rank holds whole batches of one stream (:func:`curvops.distributed.shard_batches`:
3 and 2 of 5 batches, 16 and 12 samples) and builds the operators with the default
group; the factors (and the diagonal remainder of the BatchNorm parameters, and
E-KFAC's corrected eigenvalues) must equal the single-process operators on the whole
stream (``process_group=False``) to 1e-10 in float64, for the type-2, Monte-Carlo and
empirical Fishers.  The workers are this file run as a script.
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

from tests.gloo_workers import leave_process_group

WORLD = 2
SIZES = [6, 6, 6, 6, 4]  # rank 0: batches 0, 2, 4 (16 samples); rank 1: 1, 3 (12)
TIMEOUT_S = 150


def make_model() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4), nn.Tanh(), nn.Linear(4, 3),
    )  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.double().train()


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SIZES), 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (sum(SIZES),), generator=g)
    out, start = [], 0
    for size in SIZES:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


CASES = {  # name: (class, keyword arguments)
    "kfac-type2": ("KFACOperator", {"fisher": "type2"}),
    "kfac-mc": ("KFACOperator", {"fisher": "mc", "seed": 3, "bias": "joint"}),
    "kfac-empirical-reduce": ("KFACOperator", {"fisher": "empirical", "approx": "reduce"}),
    "ekfac-type2": ("EKFACOperator", {"fisher": "type2"}),
}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    import curvops
    from curvops import distributed as cd

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S // 2),
    )
    model, loss, batches = make_model(), nn.CrossEntropyLoss(), make_batches()
    shard = cd.shard_batches(batches)
    out: dict[str, Any] = {"samples": np.int64(shard.num_samples)}
    for name, (cls_name, kw) in CASES.items():
        cls = getattr(curvops, cls_name)
        common = {"remainder": "diagonal", "bn_mode": "train", **kw}
        ref = cls(model, loss, batches, process_group=False, **common)
        op = cls(model, loss, shard, **common)  # process_group=None: the default group
        out[f"{name}/ref"] = ref.to_dense().numpy()
        out[f"{name}/dist"] = op.to_dense().numpy()
    np.savez(Path(out_dir) / f"rank{rank}.npz", **out)
    leave_process_group()


@pytest.mark.distributed
def test_two_gloo_processes_with_unequal_shards_equal_one_process(
    tmp_path: Path, run_worker_processes: Callable[[list[list[str]], float], None]
) -> None:
    init_file = str(tmp_path / "rendezvous")
    run_worker_processes(
        [
            [__file__, "--worker", str(r), str(WORLD), init_file, str(tmp_path)]
            for r in range(WORLD)
        ],
        TIMEOUT_S,
    )
    job = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(WORLD)]
    assert [int(r["samples"]) for r in job] == [16, 12]  # unequal shards
    for name in CASES:
        for r in job:
            ref, got = r[f"{name}/ref"], r[f"{name}/dist"]
            assert np.abs(ref).max() > 0
            assert np.abs(got - ref).max() <= 1e-10 * np.abs(ref).max(), name
        assert np.array_equal(job[0][f"{name}/dist"], job[1][f"{name}/dist"])  # replicated


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=4, metavar=("RANK", "WORLD", "INIT_FILE", "OUT_DIR"))
    ns = parser.parse_args()
    rank_, world_, init_, out_ = ns.worker
    _worker(int(rank_), int(world_), init_, out_)
