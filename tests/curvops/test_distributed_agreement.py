"""Ranks that disagree, and shards without counted targets, over torch.distributed (Gloo).

Two CPU processes (``file://`` rendezvous, no ports) run this file as a script and
record, for each case, what they returned or the error they raised:

* a shard whose only batch is all padding (zero counted targets) passes its rank's
  construction checks (:func:`curvops.validation.validate` with a ``process_group``),
  and the collective check returns the total over the ranks;
* shards that are *all* padding raise the same ``ValueError`` on both ranks;
* different model weights, loss reductions, parameter selections or dtypes raise the
  same ``ValueError`` on both ranks, naming what differs;
* a rank whose own checks fail raises its own error and the other a ``RuntimeError``
  naming it, instead of hanging in the next collective.

The second job checks the operators end to end (:class:`curvops.GGNOperator` over such
shards equals the single-process operator bitwise-identically on both ranks, and
disagreeing ranks are refused): it needs the operators to call
:func:`curvops.validation.validate_across_ranks` at construction.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.gloo_workers import leave_process_group

WORLD = 2
TIMEOUT_S = 120  # a hang fails the test instead of blocking CI
GLOO_TIMEOUT_S = 20  # a failed peer surfaces quickly


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """Linear(3, 5)-Tanh-Linear(5, 4), P = 44."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)


def make_batches(padded: tuple[int, ...] = (0,)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three token batches ``[n, 3, 3] -> [n, 3]``; the batches in ``padded`` all padding."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate((3, 2, 2)):
        x = torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (n, 3), generator=g)
        if i in padded:
            y[:] = -100
        out.append((x, y))
    return out


# ---------------------------------------------------------------------------- worker side


def _outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        return {"value": fn()}
    except Exception as exc:  # recorded and compared across ranks by the test
        return {"error": type(exc).__name__, "message": str(exc)}


def _agree(model: nn.Module, loss: Any, data: Any, params: Any = None) -> float | None:
    """What an operator does at construction: its rank's checks, then the collective check."""
    from curvops.validation import validate, validate_across_ranks

    result = validate_across_ranks(
        lambda: validate(model, loss, data, params=params, process_group=None),
        model,
        loss,
        params=params,
        process_group=None,
        settings={"operator": "test", "bn_mode": None},
    )
    return result.weight


def _agreement_cases(rank: int) -> dict[str, Any]:
    """Each case makes exactly one all_gather on every rank, failing or not."""
    from curvops import distributed as cd
    from curvops.losses import sequence_cross_entropy

    seq, ce = sequence_cross_entropy(), nn.CrossEntropyLoss()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3])
    mine = [(x[2 * rank : 2 * rank + 2], y[2 * rank : 2 * rank + 2])]
    net = make_model()
    named = list(net.named_parameters())
    shard = cd.shard_batches(make_batches(padded=(0, 2)))  # rank 0: padding only
    empty = cd.shard_batches(make_batches(padded=(0, 1, 2)))
    bad = [(mine[0][0], torch.tensor([0, 9]))] if rank == 1 else mine  # class 9 of 4
    cases = {
        "zero count shard": lambda: _agree(net, seq, shard),
        "zero count total": lambda: cd.check_ranks_agree(net, named, seq, weight=3.0 * rank),
        "all padding": lambda: _agree(net, seq, empty),
        "agree": lambda: _agree(net, ce, mine),
        "weights": lambda: _agree(make_model(seed=rank), ce, mine),
        "reduction": lambda: _agree(
            net, nn.CrossEntropyLoss(reduction=["mean", "sum"][rank]), mine
        ),
        "loss settings": lambda: _agree(net, nn.CrossEntropyLoss(label_smoothing=0.1 * rank), mine),
        "selection": lambda: _agree(net, ce, mine, params=[None, ["2.weight"]][rank]),
        "same size selection": lambda: _agree(net, ce, mine, params=[["0.bias"], ["2.bias"]][rank]),
        "dtype": lambda: _agree(make_model(dtype=[torch.float64, torch.float32][rank]), ce, mine),
        "failing rank": lambda: _agree(net, ce, bad),
    }
    return {name: _outcome(case) for name, case in cases.items()}


def _operator_cases(rank: int) -> dict[str, Any]:
    """The operators end to end: a padding-only shard, then disagreeing ranks."""
    from curvops import GGNOperator, KFACOperator
    from curvops import distributed as cd
    from curvops.losses import sequence_cross_entropy

    seq, net, batches = sequence_cross_entropy(), make_model(), make_batches(padded=(0, 2))
    eye = np.eye(sum(p.numel() for p in net.parameters()))
    out: dict[str, Any] = {}
    ref = GGNOperator(net, seq, batches, process_group=False)
    out["reference"] = {"value": (ref @ eye).tolist()}

    def product() -> list[list[float]]:
        return np.asarray(GGNOperator(net, seq, cd.shard_batches(batches)) @ eye).tolist()

    out["zero count shard"] = _outcome(product)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mine = [(x[2 * rank : 2 * rank + 2], torch.tensor([0, 1, 2, 3])[2 * rank : 2 * rank + 2])]
    out["weights"] = _outcome(
        lambda: repr(GGNOperator(make_model(seed=rank), nn.CrossEntropyLoss(), mine))
    )
    # loss statistics over the padding-only shard: the single-process statistics
    from curvops.stats import loss_stats

    z = np.linspace(-1.0, 1.0, eye.shape[0])

    def stats(data: Any, group: Any = None) -> list[float]:
        st = loss_stats(net, seq, data, z=z, num_probes=0, process_group=group)
        return [st.loss_mean, st.grad_mean_norm_sq, st.hess_mu, st.hess_var, st.num_samples]

    out["stats reference"] = {"value": stats(batches, False)}
    out["stats zero count shard"] = _outcome(lambda: stats(cd.shard_batches(batches)))
    out["stats all padding"] = _outcome(
        lambda: stats(cd.shard_batches(make_batches(padded=(0, 1, 2))))
    )
    ce = nn.CrossEntropyLoss()
    out["stats z"] = _outcome(
        lambda: loss_stats(net, ce, mine, z=[z, -z][rank], num_probes=0).hess_mu
    )
    # K-FAC: disagreeing ranks are refused at construction on every rank (their factors
    # would otherwise be summed into one matrix), a failing rank stops the other
    out["kfac weights"] = _outcome(lambda: repr(KFACOperator(make_model(seed=rank), ce, mine)))
    bad = [(mine[0][0], torch.tensor([0, 9]))] if rank == 1 else mine  # class 9 of 4
    out["kfac failing rank"] = _outcome(lambda: repr(KFACOperator(net, ce, bad)))
    # shards of one length each, but of different lengths across ranks (dynamic padding):
    # a plain-function loss (weighted by samples) and K-FAC each check their own shard
    # only, so the ranks must agree on the shapes (they were mixed silently)
    g = torch.Generator().manual_seed(3)
    length = (2, 3)[rank]
    tokens = [
        (
            torch.randn(2, length, 3, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (2, length), generator=g),
        )
    ]

    def plain(out_: torch.Tensor, y_: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out_.flatten(0, 1), y_.flatten())

    out["plain loss lengths"] = _outcome(lambda: repr(GGNOperator(net, plain, tokens)))
    out["known loss lengths"] = _outcome(lambda: repr(GGNOperator(net, seq, tokens)))
    out["kfac lengths"] = _outcome(lambda: repr(KFACOperator(net, seq, tokens, fisher="empirical")))
    return out


def _worker(mode: str, rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S),
    )
    out = _agreement_cases(rank) if mode == "agreement" else _operator_cases(rank)
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


def _same_error(job: list[dict[str, Any]], case: str, kind: str, *phrases: str) -> str:
    outcomes = [r[case] for r in job]
    assert all(o.get("error") == kind for o in outcomes), (case, outcomes)
    message = str(outcomes[0]["message"])
    assert all(o["message"] == message for o in outcomes), (case, outcomes)
    for phrase in phrases:
        assert phrase in message, (case, message)
    return message


@pytest.mark.distributed
def test_shards_without_counted_targets_and_disagreeing_ranks(
    tmp_path: Path, run_worker_processes: Callable[[list[list[str]], float], None]
) -> None:
    """One job of two processes (a few seconds, mostly imports), every case checked."""
    job = _run_job(run_worker_processes, "agreement", tmp_path)
    # the padding-only shard passes its rank's checks; the weights are counted targets
    assert [r["zero count shard"] for r in job] == [{"value": 0.0}, {"value": 6.0}]
    assert [r["zero count total"]["value"] for r in job] == [3.0, 3.0]
    assert [r["agree"] for r in job] == [{"value": 2.0}, {"value": 2.0}]
    _same_error(job, "all padding", "ValueError", "at least one counted target over all ranks")
    _same_error(job, "weights", "ValueError", "model parameter values", "ranks [0] and ranks [1]")
    _same_error(job, "reduction", "ValueError", "loss reduction: 'mean' on ranks [0], 'sum'")
    _same_error(job, "loss settings", "ValueError", "loss function and its settings differ")
    _same_error(job, "selection", "ValueError", "number of selected parameters: 44 on ranks [0]")
    _same_error(job, "same size selection", "ValueError", "names and shapes")
    _same_error(job, "dtype", "ValueError", "torch.float64 on ranks [0], torch.float32")
    failing = [r["failing rank"] for r in job]
    assert failing[0]["error"] == "RuntimeError" and "rank(s) [1]" in failing[0]["message"]
    assert failing[1]["error"] == "ValueError" and "class targets" in failing[1]["message"]


@pytest.mark.distributed
def test_operators_over_a_padding_only_shard_and_disagreeing_ranks(
    tmp_path: Path, run_worker_processes: Callable[[list[list[str]], float], None]
) -> None:
    """GGN products over a padding-only shard equal the single-process operator."""
    job = _run_job(run_worker_processes, "operators", tmp_path)
    ref = np.asarray(job[0]["reference"]["value"])
    got = [np.asarray(r["zero count shard"].get("value", np.nan)) for r in job]
    assert all("error" not in r["zero count shard"] for r in job), job[0]["zero count shard"]
    assert np.array_equal(got[0], got[1])  # bitwise identical on every rank
    assert np.linalg.norm(got[0] - ref) <= 1e-14 * np.linalg.norm(ref)
    _same_error(job, "weights", "ValueError", "model parameter values")
    # loss statistics: the padding-only shard is accepted, the statistics are those of one
    # process; an all-padding job, and ranks with different directions, raise on every rank
    stats_ref = np.asarray(job[0]["stats reference"]["value"])
    for r in job:
        got_stats = np.asarray(r["stats zero count shard"].get("value", np.nan))
        assert np.allclose(got_stats, stats_ref, rtol=1e-12, atol=0), r["stats zero count shard"]
    _same_error(
        job, "stats all padding", "ValueError", "at least one counted target over all ranks"
    )
    _same_error(job, "stats z", "ValueError", "settings")
    _same_error(job, "kfac weights", "ValueError", "model parameter values")
    failing = [r["kfac failing rank"] for r in job]
    assert failing[0]["error"] == "RuntimeError" and "rank(s) [1]" in failing[0]["message"]
    assert failing[1]["error"] == "ValueError" and "class targets" in failing[1]["message"]
    _same_error(job, "plain loss lengths", "ValueError", "operator settings")
    _same_error(job, "kfac lengths", "ValueError", "operator settings")
    assert all("error" not in r["known loss lengths"] for r in job), job[0]["known loss lengths"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "RANK", "INIT_FILE", "OUT_DIR"))
    ns = parser.parse_args()
    mode_, rank_, init_, out_ = ns.worker
    _worker(mode_, int(rank_), init_, out_)
