"""Disagreeing settings and rank-local failures over torch.distributed (Gloo, CPU).

The contract of :mod:`curvops.distributed`: ranks that disagree on a setting that changes
the result all raise the same error naming it, and a failure on one rank stops every rank
(no hang, no rank left blocked in a collective).  Two CPU processes (``file://``
rendezvous, no ports) run this file as a script and record, per case, what they returned
or raised and how long it took:

* ``settings`` job: the Fisher's ``kind``/``seed``/``mc_samples``, ``ggn_diagonal``'s
  Monte-Carlo ``seed``/``mc_samples``, ``output_fn`` (closure values, code), losses whose
  closure, global constant or declared function differ: the same ``ValueError`` on both
  ranks naming the setting; ranks that agree (identical lambdas, same seed) give the
  single-process products;
* ``failures`` job: a rank-local argument error before the construction's collective
  (empty data, unknown parameter, bad ``bn_mode``, Fisher ``kind``, ``ggn_diagonal``
  ``method``, ``loss_stats`` ``curvature``), a non-finite or one-sample BatchNorm batch in
  a later batch of one shard during products, ``ggn_diagonal``, ``loss_stats`` and
  ``loss_gradient``: the failing rank raises its own error, the other a ``RuntimeError``
  naming it, both at once; a streamed DataLoader without any counted target raises the
  single-process ``ValueError`` on every rank (it returned NaN); ``loss_stats`` with
  ``batch_size`` over a shard of padding only equals the single-process statistics (it
  hung).

The failing rank stays alive and goes on with the next case, so a rank left waiting in a
collective shows as a Gloo timeout (``GLOO_TIMEOUT_S``) and the job as a failure within
``TIMEOUT_S``, never as a blocked CI run.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.gloo_workers import leave_process_group

WORLD = 2
TIMEOUT_S = 150  # a hang fails the test instead of blocking CI
GLOO_TIMEOUT_S = 15  # a rank left waiting in a collective surfaces quickly
# no case may wait for a peer: a rank left in a collective waits the whole Gloo timeout,
# so a case under 80 % of it did not wait (with room for a loaded machine: cases take
# well under a second when they do not wait)
CASE_S = 0.8 * GLOO_TIMEOUT_S

#: Read by :func:`tempered` (set per rank by the worker of the ``settings`` job).
TEMPERATURE = 1.0


def tempered(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A plain-function loss reading a global constant."""
    return F.cross_entropy(f / TEMPERATURE, y)


def make_model(batchnorm: bool = False) -> nn.Module:
    """Linear(3, 4)-Tanh-Linear(4, 3) (P = 31), or with a BatchNorm1d in between."""
    torch.manual_seed(0)
    middle: nn.Module = nn.BatchNorm1d(4) if batchnorm else nn.Tanh()
    return nn.Sequential(nn.Linear(3, 4), middle, nn.Linear(4, 3)).double()


def make_batches(k: int = 4, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``k`` batches of ``n`` samples, 3 features, 3 classes."""
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 3, dtype=torch.float64, generator=g),
            torch.randint(0, 3, (n,), generator=g),
        )
        for _ in range(k)
    ]


# ---------------------------------------------------------------------------- worker side


def _outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    start = time.monotonic()
    try:
        out: dict[str, Any] = {"value": fn()}
    except Exception as exc:  # recorded and compared across ranks by the test
        out = {"error": type(exc).__name__, "message": str(exc)}
    out["seconds"] = time.monotonic() - start
    return out


def _product(op: Any) -> list[list[float]]:
    V = np.random.default_rng(0).standard_normal((op.shape[1], 2))
    return np.asarray(op.matmat(V)).tolist()


def _settings_cases(rank: int) -> dict[str, Any]:
    """Each rank builds from a setting of its own: refused on both, naming the setting."""
    from curvops import FisherOperator, GGNOperator, HessianOperator, KFACOperator, ggn_diagonal
    from curvops.distributed import shard_batches
    from curvops.losses import declare_loss

    global TEMPERATURE
    TEMPERATURE = 1.0 + rank
    net, batches, ce = make_model(), make_batches(), nn.CrossEntropyLoss()
    shard = shard_batches(batches)
    scale = 1.0 + rank
    fns = [lambda f, y: F.cross_entropy(f, y), lambda f, y: F.cross_entropy(3 * f, y)]
    moded = make_model(batchnorm=True).train(rank == 0)  # bn_mode=None: each module's mode
    cases: dict[str, Callable[[], Any]] = {
        "module modes": lambda: _product(GGNOperator(moded, ce, shard, bn_mode=None)),
        "kfac module modes": lambda: repr(KFACOperator(moded, ce, shard, bn_mode=None)),
        "diagonal module modes": lambda: ggn_diagonal(
            moded, ce, shard, bn_mode=None, process_group=None
        ).tolist(),
        "fisher kind": lambda: _product(
            FisherOperator(net, ce, shard, kind=["mc", "empirical"][rank])
        ),
        "fisher seed": lambda: _product(FisherOperator(net, ce, shard, seed=rank)),
        "fisher mc_samples": lambda: _product(FisherOperator(net, ce, shard, mc_samples=1 + rank)),
        "diagonal seed": lambda: ggn_diagonal(
            net, ce, shard, method="mc", seed=rank, process_group=None
        ).tolist(),
        "diagonal mc_samples": lambda: ggn_diagonal(
            net, ce, shard, method="mc", mc_samples=1 + rank, process_group=None
        ).tolist(),
        "output_fn closure": lambda: _product(
            GGNOperator(net, ce, shard, output_fn=lambda o: scale * o)
        ),
        "output_fn code": lambda: _product(
            GGNOperator(net, ce, shard, output_fn=[lambda o: o, lambda o: 2 * o][rank])
        ),
        "kfac output_fn": lambda: repr(KFACOperator(net, ce, shard, output_fn=lambda o: scale * o)),
        "closure loss": lambda: _product(
            HessianOperator(net, lambda f, y: F.cross_entropy(f / scale, y), shard)
        ),
        "global loss": lambda: _product(HessianOperator(net, tempered, shard)),
        "declared loss": lambda: _product(HessianOperator(net, declare_loss(fns[rank]), shard)),
        "partial loss args": lambda: _product(
            HessianOperator(net, functools.partial(_weighted_ce, 1.0 + rank), shard)
        ),
    }
    out = {name: _outcome(case) for name, case in cases.items()}
    out.update(_agreeing_cases(net, batches))
    return out


def _weighted_ce(scale: float, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return scale * F.cross_entropy(f, y)


def _agreeing_cases(net: nn.Module, batches: list[Any]) -> dict[str, Any]:
    """Equal settings on every rank (lambdas made anew, same closure values): accepted, and
    the products are those of one process over all batches."""
    from curvops import FisherOperator
    from curvops.distributed import shard_batches

    temperature = 1.5

    def build(data: Any, group: Any) -> Any:
        return FisherOperator(
            net,
            lambda f, y: F.cross_entropy(f / temperature, y),
            data,
            kind="empirical",
            output_fn=lambda o: 2.0 * o,
            process_group=group,
        )

    mc = {"kind": "mc", "seed": 3, "mc_samples": 2}
    return {
        "agree": _outcome(lambda: _product(build(shard_batches(batches), None))),
        "agree reference": _outcome(lambda: _product(build(batches, False))),
        "agree mc": _outcome(
            lambda: _product(
                FisherOperator(net, nn.CrossEntropyLoss(), shard_batches(batches), **mc)
            )
        ),
        "agree mc reference": _outcome(
            lambda: _product(
                FisherOperator(net, nn.CrossEntropyLoss(), batches, process_group=False, **mc)
            )
        ),
    }


_CLASS_WEIGHTS = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
#: Each rank's halves hold the same classes; the ranks' batches do not.
_SHARD_CLASSES = [torch.tensor([0, 1, 0, 1]), torch.tensor([2, 1, 2, 1])]


def _class_weighted(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, weight=_CLASS_WEIGHTS)


def _construction_failures(rank: int) -> dict[str, Callable[[], Any]]:
    """Rank 1's arguments are refused before the construction's collective check."""
    from curvops import FisherOperator, GGNOperator, HessianOperator, KFACOperator, ggn_diagonal
    from curvops.distributed import shard_batches
    from curvops.stats import loss_stats

    net, batches, ce = make_model(), make_batches(), nn.CrossEntropyLoss()
    shard = shard_batches(batches)
    bad = rank == 1
    return {
        "empty data": lambda: repr(HessianOperator(net, ce, [] if bad else shard)),
        "unknown params": lambda: repr(
            HessianOperator(net, ce, shard, params=["nope"] if bad else None)
        ),
        "bad bn_mode": lambda: repr(
            HessianOperator(net, ce, shard, bn_mode="bogus" if bad else None)
        ),
        "bad loss": lambda: repr(HessianOperator(net, 3 if bad else ce, shard)),  # type: ignore[arg-type]
        "fisher kind": lambda: repr(FisherOperator(net, ce, shard, kind="bogus" if bad else "mc")),
        "ggn linear loss": lambda: repr(GGNOperator(net, nn.NLLLoss() if bad else ce, shard)),
        "weights across shards": lambda: repr(
            HessianOperator(net, _class_weighted, (batches[rank][0], _SHARD_CLASSES[rank]))
        ),
        "kfac fisher": lambda: repr(KFACOperator(net, ce, shard, fisher="x" if bad else "type2")),
        "kfac params": lambda: repr(KFACOperator(net, ce, shard, params=["no"] if bad else None)),
        "diagonal method": lambda: ggn_diagonal(
            net, ce, shard, method="bogus" if bad else "exact", process_group=None
        ).tolist(),
        "stats curvature": lambda: (
            loss_stats(
                net, ce, shard, curvature="bogus" if bad else "hessian", num_probes=1
            ).loss_mean
        ),
    }


def _product_failures(rank: int) -> dict[str, Callable[[], Any]]:
    """Rank 1 fails during the computation (its second batch, global batch 3)."""
    from curvops import EKFACOperator, HessianOperator, KFACOperator, ggn_diagonal
    from curvops.distributed import shard_batches
    from curvops.stats import loss_stats

    ce = nn.CrossEntropyLoss()
    nan = make_batches()
    nan[3][0][0, 0] = float("nan")  # only the first batch of a shard is checked up front
    tiny = make_batches()
    tiny[3] = (tiny[3][0][:1], tiny[3][1][:1])  # one sample under train-mode BatchNorm
    bn = make_model(batchnorm=True).train()
    net = make_model()
    H_nan = HessianOperator(net, ce, shard_batches(nan))
    H_bn = HessianOperator(bn, ce, shard_batches(tiny), bn_mode="train")
    ones = np.ones(H_nan.shape[0])
    return {
        "nan product": lambda: H_nan.matvec(ones).tolist(),
        "batchnorm product": lambda: H_bn.matvec(np.ones(H_bn.shape[0])).tolist(),
        "batchnorm gradient": lambda: H_bn.loss_gradient().tolist(),
        "nan diagonal": lambda: ggn_diagonal(
            net, ce, shard_batches(nan), process_group=None
        ).tolist(),
        "nan stats": lambda: loss_stats(net, ce, shard_batches(nan), num_probes=1).loss_mean,
        # the factors' pass: rank 0 waited in their all_reduce for the backend's timeout
        "nan kfac product": lambda: _product(KFACOperator(net, ce, shard_batches(nan))),
        "nan ekfac product": lambda: _product(EKFACOperator(net, ce, shard_batches(nan))),
    }


def _padding_cases() -> dict[str, Callable[[], Any]]:
    """No counted target anywhere (streamed), or none in rank 1's shard (cut minibatches)."""
    from torch.utils.data import DataLoader, TensorDataset

    from curvops import FisherOperator, GGNOperator, HessianOperator
    from curvops.distributed import shard_batches
    from curvops.stats import loss_stats

    net, ce = make_model(), nn.CrossEntropyLoss()
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    loader = DataLoader(TensorDataset(x, torch.full((8,), -100)), batch_size=2)
    padded = make_batches()
    for i in (1, 3):  # rank 1's shard: batches 1 and 3, padding only
        padded[i][1][:] = -100

    def stats(data: Any, group: Any) -> list[float]:
        s = loss_stats(net, ce, data, batch_size=2, num_probes=2, process_group=group)
        return [s.loss_mean, s.grad_mean_norm_sq, s.hess_mu, s.frobenius_norm_sq, s.num_batches]

    ones = np.ones(31)
    return {
        "ignored hessian": lambda: (
            HessianOperator(net, ce, shard_batches(loader)).matvec(ones).tolist()
        ),
        "ignored ggn": lambda: GGNOperator(net, ce, shard_batches(loader)).matvec(ones).tolist(),
        "ignored fisher": lambda: (
            FisherOperator(net, ce, shard_batches(loader), kind="empirical").matvec(ones).tolist()
        ),
        "ignored stats": lambda: loss_stats(net, ce, shard_batches(loader), num_probes=0).loss_mean,
        "padding shard stats": lambda: stats(shard_batches(padded), None),
        "padding shard stats reference": lambda: stats(padded, False),
    }


def _failure_cases(rank: int) -> dict[str, Any]:
    from curvops import HessianOperator
    from curvops.distributed import shard_batches

    cases = {**_construction_failures(rank), **_product_failures(rank), **_padding_cases()}
    out = {name: _outcome(case) for name, case in cases.items()}
    # still in step after all that: a product equals the single-process one
    net, batches, ce = make_model(), make_batches(), nn.CrossEntropyLoss()
    out["after"] = _outcome(lambda: _product(HessianOperator(net, ce, shard_batches(batches))))
    out["after reference"] = _outcome(
        lambda: _product(HessianOperator(net, ce, batches, process_group=False))
    )
    return out


def _worker(mode: str, rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from curvops import HessianOperator

    torch.set_num_threads(1)
    # warm up (lazy imports, first-use set-up), so that each case's time is its own
    HessianOperator(make_model(), nn.CrossEntropyLoss(), make_batches(), process_group=False)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )
    out = _settings_cases(rank) if mode == "settings" else _failure_cases(rank)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
    leave_process_group()


# ---------------------------------------------------------------------------- test side


def _run_job(
    run: Callable[[list[list[str]], float], None], mode: str, tmp: Path
) -> list[dict[str, Any]]:
    """Run the two-process job; the per-rank outcomes."""
    init_file = str(tmp / "rendezvous")
    run(
        [[__file__, "--worker", mode, str(r), init_file, str(tmp)] for r in range(WORLD)], TIMEOUT_S
    )
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _fast(job: list[dict[str, Any]], case: str) -> list[dict[str, Any]]:
    outcomes = [r[case] for r in job]
    assert all(o["seconds"] < CASE_S for o in outcomes), (case, "a rank waited", outcomes)
    return outcomes


def _same_error(job: list[dict[str, Any]], case: str, kind: str, *phrases: str) -> str:
    outcomes = _fast(job, case)
    assert all(o.get("error") == kind for o in outcomes), (case, outcomes)
    message = str(outcomes[0]["message"])
    assert all(o["message"] == message for o in outcomes), (case, outcomes)
    for phrase in phrases:
        assert phrase in message, (case, message)
    return message


def _stopped_by_rank_1(job: list[dict[str, Any]], case: str, kind: str, phrase: str) -> None:
    """Rank 1 raised its own error, rank 0 a RuntimeError naming rank 1: both at once."""
    first, second = _fast(job, case)
    assert first.get("error") == "RuntimeError", (case, first)
    assert "rank(s) [1]" in first["message"], (case, first)
    assert second.get("error") == kind and phrase in second["message"], (case, second)


def _values(job: list[dict[str, Any]], case: str) -> list[np.ndarray]:
    outcomes = _fast(job, case)
    assert all("error" not in o for o in outcomes), (case, outcomes)
    return [np.asarray(o["value"], dtype=np.float64) for o in outcomes]


def _equal_to_reference(job: list[dict[str, Any]], case: str, rtol: float = 1e-12) -> None:
    got, ref = _values(job, case), _values(job, case + " reference")[0]
    assert np.array_equal(got[0], got[1]), case  # the same bits on every rank
    scale = float(np.max(np.abs(ref)))
    assert float(np.max(np.abs(got[0] - ref))) <= rtol * scale, (case, got[0], ref)


@pytest.mark.distributed
def test_distributed_ranks_disagreeing_on_a_setting_raise_naming_it(
    tmp_path: Path, run_worker_processes: Callable[[list[list[str]], float], None]
) -> None:
    """Settings that change the matrix are compared across ranks (one job, every case)."""
    job = _run_job(run_worker_processes, "settings", tmp_path)
    differ = "operator settings differ between ranks [0] and ranks [1]"
    _same_error(job, "fisher kind", "ValueError", differ, "kind: 'mc' on ranks [0], 'empirical'")
    _same_error(job, "fisher seed", "ValueError", "seed: 0 on ranks [0], 1 on ranks [1]")
    _same_error(job, "fisher mc_samples", "ValueError", "mc_samples: 1 on ranks [0], 2 on ranks")
    _same_error(job, "diagonal seed", "ValueError", "seed: 0 on ranks [0], 1 on ranks [1]")
    _same_error(job, "diagonal mc_samples", "ValueError", "mc_samples: 1 on ranks [0], 2 on")
    for case in ("output_fn closure", "output_fn code", "kfac output_fn"):
        _same_error(job, case, "ValueError", "output_fn differs between ranks [0] and ranks [1]")
    for case in ("closure loss", "global loss", "declared loss", "partial loss args"):
        _same_error(job, case, "ValueError", "loss function and its settings differ")
    # a train-mode and an eval-mode rank summed two matrices of different models (37 % off)
    for case in ("module modes", "kfac module modes", "diagonal module modes"):
        _same_error(job, case, "ValueError", "module modes: \"train: '', '0', '1', '2'\"")
    _equal_to_reference(job, "agree")
    _equal_to_reference(job, "agree mc")


@pytest.mark.distributed
def test_distributed_failure_on_one_rank_stops_every_rank(
    tmp_path: Path, run_worker_processes: Callable[[list[list[str]], float], None]
) -> None:
    """A rank-local failure raises on every rank at once; jobs without counted targets are
    refused on every rank; a padding-only shard of cut minibatches is accepted."""
    job = _run_job(run_worker_processes, "failures", tmp_path)
    construction = {
        "empty data": ("ValueError", "expected at least one batch"),
        "unknown params": ("ValueError", "'params'"),
        "bad bn_mode": ("ValueError", "'bn_mode'"),
        "bad loss": ("TypeError", "'loss_fn'"),
        "fisher kind": ("ValueError", "'kind'"),
        "ggn linear loss": ("ValueError", "NLLLoss is linear"),
        "kfac fisher": ("ValueError", "'fisher'"),
        "kfac params": ("ValueError", "'params'"),
        "diagonal method": ("ValueError", "'method'"),
        "stats curvature": ("ValueError", "'curvature'"),
    }
    for case, (kind, phrase) in construction.items():
        _stopped_by_rank_1(job, case, kind, phrase)
        assert "construction checks failed" in job[0][case]["message"], job[0][case]
    # one batch per rank, a plain-function loss: the shards are compared (was 31 % off)
    _same_error(job, "weights across shards", "ValueError", "the first batches of ranks 0 and 1")
    _stopped_by_rank_1(job, "nan product", "NumericalError", "batch 3")
    _stopped_by_rank_1(job, "batchnorm product", "ValueError", "more than 1 value per channel")
    _stopped_by_rank_1(job, "batchnorm gradient", "ValueError", "more than 1 value per channel")
    _stopped_by_rank_1(job, "nan diagonal", "NumericalError", "batch 3")
    _stopped_by_rank_1(job, "nan stats", "NumericalError", "non-finite values in minibatch")
    for case in ("nan kfac product", "nan ekfac product"):
        _stopped_by_rank_1(job, case, "NumericalError", "non-finite")
        assert "factors failed on rank(s) [1]" in job[0][case]["message"], job[0][case]
    assert "HessianOperator product failed on rank(s) [1]" in job[0]["nan product"]["message"]
    for case in ("ignored hessian", "ignored ggn", "ignored fisher", "ignored stats"):
        _same_error(job, case, "ValueError", "expected at least one batch with a counted target")
    got = _values(job, "padding shard stats")
    ref = _values(job, "padding shard stats reference")[0]
    assert np.array_equal(got[0], got[1])
    assert np.allclose(got[0], ref, rtol=1e-12, atol=0), (got[0], ref)
    assert math.isfinite(float(got[0][3])) and got[0][4] == 4  # the estimate, 4 minibatches
    _equal_to_reference(job, "after")


def test_ggn_diagonal_names_a_later_non_finite_batch() -> None:
    """A NaN input in a later batch: a NumericalError naming the batch, not torch's
    ``atol must be greater than or equal to zero`` from comparing NaN outputs."""
    from curvops import ggn_diagonal
    from spectral.errors import NumericalError

    batches = make_batches(k=2)
    batches[1][0][0, 0] = float("nan")
    for method in ("exact", "mc", "empirical"):
        with pytest.raises(NumericalError, match="non-finite values in batch 1; the inputs"):
            ggn_diagonal(make_model(), nn.CrossEntropyLoss(), batches, method=method)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "RANK", "INIT_FILE", "OUT_DIR"))
    ns = parser.parse_args()
    mode_, rank_, init_, out_ = ns.worker
    _worker(mode_, int(rank_), init_, out_)
