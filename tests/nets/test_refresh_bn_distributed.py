"""The landscape's BatchNorm refresh over torch.distributed (Gloo, 3 CPU processes).

Each rank forwards its whole batches of the loader (``shard_loader``) and the ranks'
counts, means and squared deviations are pooled exactly (``_combine_bn``): the running
statistics equal those of the single-process refresh on the whole loader, also with
unequal batches and shards.

The workers are this file run as a script (``python test_refresh_bn_distributed.py
--worker RANK WORLD INIT_FILE OUT_DIR``); rendezvous through a ``file://`` in a
temporary directory, no ports.
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

from tests.gloo_workers import leave_process_group

WORLD = 3
TIMEOUT_S = 150


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3),
    )  # fmt: skip
    return net.double().eval()


def _loader(n: int, batch_size: int) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 2, 4, 4, generator=g, dtype=torch.float64)
    x[n // 2 :] += 2.0
    return DataLoader(TensorDataset(x, torch.zeros(n, dtype=torch.long)), batch_size=batch_size)


def _statistics(model: nn.Module) -> list[np.ndarray]:
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is not None and m.running_var is not None
            assert m.num_batches_tracked is not None
            out += [m.running_mean.numpy().copy(), m.running_var.numpy().copy()]
            out.append(np.array([int(m.num_batches_tracked)]))
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from nets.workflow._resolve import shard_loader
    from nets.workflow.landscape import _refresh_bn

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S // 2),
    )  # fmt: skip
    group = dist.group.WORLD
    out: dict[str, np.ndarray] = {}
    # 4 batches (6, 6, 6, 4) over 3 ranks: shards of 10, 6 and 6 samples; 3 batches (7, 7, 3)
    for name, (n, batch_size) in {"four": (22, 6), "three": (17, 7)}.items():
        reference, model = _model(), _model()
        _refresh_bn(reference, _loader(n, batch_size))  # single process, the whole loader
        _refresh_bn(model, shard_loader(_loader(n, batch_size), group, raw=True), group)
        for i, (a, b) in enumerate(zip(_statistics(reference), _statistics(model))):
            out[f"{name}_ref_{i}"], out[f"{name}_{i}"] = a, b
    np.savez(Path(out_dir) / f"rank{rank}.npz", **out)  # type: ignore[arg-type]
    leave_process_group()


def _run_job(
    run: Callable[[list[list[str]], float], None], tmp: Path
) -> list[dict[str, np.ndarray]]:
    init_file = str(tmp / "rendezvous")
    run(
        [[__file__, "--worker", str(r), str(WORLD), init_file, str(tmp)] for r in range(WORLD)],
        TIMEOUT_S,
    )
    return [dict(np.load(tmp / f"rank{r}.npz")) for r in range(WORLD)]


def test_refresh_bn_over_ranks_equals_the_single_process_refresh(
    tmp_path: Path, run_worker_processes: Callable[[list[list[str]], float], None]
) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    job = _run_job(run_worker_processes, tmp_path)
    for result in job:
        for key in (k for k in result if "_ref_" in k):
            name, index = key.split("_ref_")
            np.testing.assert_allclose(
                result[f"{name}_{index}"], result[key], rtol=1e-13, atol=1e-14, err_msg=key
            )
    for result in job[1:]:  # every rank holds the same statistics
        for key in result:
            np.testing.assert_array_equal(result[key], job[0][key], err_msg=key)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=4, metavar=("RANK", "WORLD", "INIT_FILE", "OUT_DIR"))
    ns = parser.parse_args()
    rank_, world_, init_, out_ = ns.worker
    _worker(int(rank_), int(world_), init_, out_)
