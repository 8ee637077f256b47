"""Batches combine by the loss's own normaliser (issue 15, items 4-5; issue 19 item 6 for the
Gloo sum case): a list of batches,
a DataLoader and two Gloo processes with unequal shards equal one concatenated batch to
1e-10 in float64, for cross-entropy with ignore_index, class weights, token-level logits
and declared plain-function losses; the token-level closed forms against autograd."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvops import FisherOperator, GGNOperator, HessianOperator
from curvops.diagonal import ggn_diagonal
from curvops.losses import batch_normaliser, declare_loss, sequence_cross_entropy
from curvops.stats import loss_stats
from curvops.testing import dense_fisher, dense_ggn, dense_hessian
from tests.gloo_workers import leave_process_group

SIZES = (4, 3, 3, 2, 3)  # N = 15, unequal
N = sum(SIZES)
T, V = 3, 4  # tokens, vocabulary


class TokenModel(nn.Module):
    """[N, 4] -> logits [N, T, V] (``class_first``: [N, V, T], torch's CE layout)."""

    def __init__(self, class_first: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.class_first = class_first
        self.lin1, self.lin2 = nn.Linear(4, 5), nn.Linear(5, T * V)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin2(torch.tanh(self.lin1(x))).reshape(-1, T, V)
        return out.transpose(1, 2) if self.class_first else out


def mlp() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, V))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return net.double()


def data(tokens: bool, pad: int = -100, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    shape = (N, T) if tokens else (N,)
    y = torch.randint(0, V, shape, generator=g)
    drop = torch.rand(shape, generator=g) < 0.35
    drop.view(-1)[:2] = True  # padding in the first batch, whatever the seed
    y[drop] = pad
    return x, y


def split(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out, start = [], 0
    for s in SIZES:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def dense(op: Any) -> np.ndarray:
    return np.asarray(op @ np.eye(op.shape[0]), dtype=np.float64)


def close(a: np.ndarray, b: np.ndarray, tol: float = 1e-10) -> bool:
    return float(np.abs(a - b).max()) <= tol * max(1.0, float(np.abs(b).max()))


WEIGHT = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=torch.float64)

CASES = {
    "ce-ignore": (mlp, lambda: nn.CrossEntropyLoss(), False),
    "ce-weight": (mlp, lambda: nn.CrossEntropyLoss(weight=WEIGHT), False),
    "ce-weight-ignore-smoothing": (
        mlp,
        lambda: nn.CrossEntropyLoss(weight=WEIGHT, ignore_index=-100, label_smoothing=0.1),
        False,
    ),
    "nll-ignore": (lambda: nn.Sequential(mlp(), nn.LogSoftmax(-1)), lambda: nn.NLLLoss(), False),
    "ce-tokens-class-first": (
        lambda: TokenModel(class_first=True).double(),
        lambda: nn.CrossEntropyLoss(),
        True,
    ),
    "seq-ce": (lambda: TokenModel().double(), lambda: sequence_cross_entropy(), True),
    "seq-ce-smoothing": (
        lambda: TokenModel().double(),
        lambda: sequence_cross_entropy(label_smoothing=0.2),
        True,
    ),
    "partial-ce-ignore-0": (
        mlp,
        lambda: __import__("functools").partial(F.cross_entropy, ignore_index=0),
        False,
    ),
    "declared-targets": (
        lambda: TokenModel().double(),
        lambda: declare_loss(
            lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()), normaliser="targets"
        ),
        True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_list_of_batches_equals_the_concatenated_batch(case: str) -> None:
    make_model, make_loss, tokens = CASES[case]
    model, loss_fn = make_model(), make_loss()
    x, y = data(tokens, pad=0 if case == "partial-ce-ignore-0" else -100)
    batches = split(x, y)
    linear = case.startswith("nll")  # NLLLoss: no GGN (zero), refused
    ops = [
        lambda d: HessianOperator(model, loss_fn, d),
        lambda d: FisherOperator(model, loss_fn, d, kind="empirical"),
        lambda d: FisherOperator(model, loss_fn, d, kind="empirical", per="position"),
    ]
    if linear:
        with pytest.raises(ValueError, match="NLLLoss is linear"):
            GGNOperator(model, loss_fn, batches)
        with pytest.raises(ValueError, match="NLLLoss is linear"):
            ggn_diagonal(model, loss_fn, batches)
    else:
        ops.append(lambda d: GGNOperator(model, loss_fn, d))
    P = sum(p.numel() for p in model.parameters())
    R = np.random.default_rng(3).standard_normal((P, 4))
    for build in ops:
        whole, parts = build((x, y)) @ R, build(batches) @ R
        assert close(parts, whole), case
    H = dense_hessian(model, loss_fn, (x, y)).numpy()  # independent of the operators
    assert close(HessianOperator(model, loss_fn, batches) @ R, H @ R)
    if not linear:
        d_whole = ggn_diagonal(model, loss_fn, (x, y)).numpy()
        assert close(ggn_diagonal(model, loss_fn, batches).numpy(), d_whole)
    z = np.random.default_rng(0).standard_normal(H.shape[0])
    st = loss_stats(model, loss_fn, batches, z=z, num_probes=0)
    zn = z / np.linalg.norm(z)
    with torch.no_grad():
        total = float(loss_fn(model(x), y))
    assert abs(st.loss_mean - total) <= 1e-12 * abs(total)
    assert abs(st.hess_mu - zn @ H @ zn) <= 1e-10 * np.abs(H).max()


def test_padding_changes_the_weights() -> None:
    """The test above can fail: weighting by samples gives a different matrix."""
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = data(False)
    y[2:4] = 1  # counted targets in the first batch (a mean over none is 0/0)
    batches = split(x, y)
    by_samples = declare_loss(loss_fn, normaliser="samples")  # the old, wrong weighting
    whole = dense(HessianOperator(model, loss_fn, (x, y)))
    wrong = dense(HessianOperator(model, by_samples, batches))
    assert not close(wrong, whole, 1e-3)


def test_loader_equals_the_concatenated_batch() -> None:
    model, loss_fn = TokenModel().double(), sequence_cross_entropy()
    x, y = data(True)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    for cls in (HessianOperator, GGNOperator):
        assert close(dense(cls(model, loss_fn, loader)), dense(cls(model, loss_fn, (x, y))))


def test_batch_with_every_target_ignored_is_skipped() -> None:
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    x, y = data(False)
    y[4:7] = -100  # the whole second batch
    batches = split(x, y)
    whole = dense(GGNOperator(model, loss_fn, (x, y)))
    assert close(dense(GGNOperator(model, loss_fn, batches)), whole)
    assert close(ggn_diagonal(model, loss_fn, batches).numpy(), np.diag(whole))
    with pytest.raises(ValueError, match=r"'data'.*counted target"):
        GGNOperator(model, loss_fn, [(x[:3], torch.full((3,), -100))])


def test_token_ggn_closed_form_matches_autograd() -> None:
    """sequence_cross_entropy's per-token softmax curvature (ignored tokens excluded)."""
    model = TokenModel().double()
    x, y = data(True)
    loss_fn = sequence_cross_entropy()
    opaque = declare_loss(lambda o, t: loss_fn(o, t), normaliser="targets")  # autograd path
    ref = dense_ggn(model, loss_fn, (x, y)).numpy()  # torch.func.hessian of the loss
    assert close(dense(GGNOperator(model, loss_fn, split(x, y))), ref)
    assert close(dense(GGNOperator(model, opaque, split(x, y))), ref)
    assert close(ggn_diagonal(model, loss_fn, split(x, y)).numpy(), np.diag(ref))
    emp = dense(FisherOperator(model, loss_fn, split(x, y), kind="empirical"))
    assert close(emp, dense(FisherOperator(model, opaque, split(x, y), kind="empirical")))


def test_token_mc_fisher_samples_per_token() -> None:
    model = TokenModel().double()
    x, y = data(True)
    loss_fn = sequence_cross_entropy()
    F_op = dense(FisherOperator(model, loss_fn, (x, y), kind="mc", mc_samples=3, seed=4))
    ref = dense_fisher(model, loss_fn, (x, y), kind="mc", mc_samples=3, seed=4).numpy()
    assert close(F_op, ref)
    # unbiased for the GGN: many samples approach it (statistical tolerance)
    G = dense(GGNOperator(model, loss_fn, (x, y)))
    F_many = dense(FisherOperator(model, loss_fn, (x, y), kind="mc", mc_samples=4000, seed=0))
    assert np.abs(F_many - G).max() <= 0.1 * np.abs(G).max()


@pytest.mark.parametrize("tokens", [True, False])
def test_cross_entropy_closed_form_per_position_with_ignored_targets(tokens: bool) -> None:
    """nn.CrossEntropyLoss on [N, C, T] logits (and (N, C) with padding): softmax curvature
    per position over the counted targets, MC Fisher sampled per position."""
    model = TokenModel(class_first=True).double() if tokens else mlp()
    x, y = data(tokens)
    y.view(-1)[2:5] = torch.tensor([1, 2, 3])  # counted targets in the first batch
    loss_fn = nn.CrossEntropyLoss()
    from curvops.losses import loss_kind

    with torch.no_grad():
        assert loss_kind(loss_fn, model(x), y) == "ce_tokens"
    G_ref = dense_ggn(model, loss_fn, (x, y)).numpy()  # torch.func.hessian of the loss
    assert close(dense(GGNOperator(model, loss_fn, split(x, y))), G_ref)
    assert close(ggn_diagonal(model, loss_fn, split(x, y)).numpy(), np.diag(G_ref))
    F_op = dense(FisherOperator(model, loss_fn, (x, y), kind="mc", mc_samples=2, seed=1))
    F_ref = dense_fisher(model, loss_fn, (x, y), kind="mc", mc_samples=2, seed=1).numpy()
    assert close(F_op, F_ref)
    d_mc = ggn_diagonal(model, loss_fn, (x, y), method="mc", mc_samples=2, seed=1).numpy()
    assert close(d_mc, np.diag(F_ref))
    opaque = declare_loss(lambda o, t: loss_fn(o, t), normaliser="targets")  # autograd path
    emp = dense(FisherOperator(model, loss_fn, split(x, y), kind="empirical"))
    assert close(emp, dense(FisherOperator(model, opaque, split(x, y), kind="empirical")))


def test_sequence_cross_entropy_value_and_normaliser() -> None:
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([[1, -100, 4], [0, 2, -100]])
    loss = sequence_cross_entropy(label_smoothing=0.1)
    ref = F.cross_entropy(logits.transpose(1, 2), y, label_smoothing=0.1)
    assert torch.allclose(loss(logits, y), ref, rtol=1e-6, atol=0)
    assert batch_normaliser(loss, None, y, 2) == 4.0
    assert batch_normaliser(sequence_cross_entropy(reduction="sum"), None, y, 2) == 1.0


def test_unknown_normaliser_is_an_error_not_a_guess() -> None:
    x, y = data(True)
    opaque = lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten())  # noqa: E731
    with pytest.raises(ValueError, match=r"'loss_fn'.*-100.*declare_loss"):
        HessianOperator(TokenModel().double(), opaque, (x, y))

    class MyCE(nn.CrossEntropyLoss):
        pass

    xm, ym = data(False)
    with pytest.raises(ValueError, match=r"'loss_fn'.*subclass of CrossEntropyLoss.*declare_loss"):
        GGNOperator(mlp(), MyCE(weight=WEIGHT), (xm, ym.clamp(min=0)))
    GGNOperator(
        mlp(),
        declare_loss(MyCE(weight=WEIGHT), normaliser=lambda i, t: float(WEIGHT[t].sum())),
        (xm, ym.clamp(min=0)),
    )


def test_callable_normaliser_combines_exactly() -> None:
    model = mlp()
    x, y = data(False)
    y = y.clamp(min=0)
    loss = declare_loss(
        lambda o, t: F.cross_entropy(o, t, weight=WEIGHT, reduction="sum") / WEIGHT[t].sum(),
        normaliser=lambda inputs, t: float(WEIGHT[t].sum()),
    )
    whole = dense(HessianOperator(model, loss, (x, y)))
    assert close(dense(HessianOperator(model, loss, split(x, y))), whole)
    ref = dense(HessianOperator(model, nn.CrossEntropyLoss(weight=WEIGHT), (x, y)))
    assert close(whole, ref)


# ---------------------------------------------------------------------------- two Gloo processes

WORLD = 2


def _build(kind: str, model: nn.Module, loss_fn: Any, d: Any, group: Any = None) -> Any:
    if kind == "F":
        return FisherOperator(model, loss_fn, d, kind="empirical", process_group=group)
    cls = HessianOperator if kind == "H" else GGNOperator
    return cls(model, loss_fn, d, process_group=group)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from curvops import distributed as cd

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results: dict[str, np.ndarray] = {}
        x, y = data(True)
        shard = cd.shard_batches(split(x, y))  # rank 0: batches 0, 2, 4 (10); rank 1: 1, 3 (5)
        Vm = np.random.default_rng(7).standard_normal(
            (TokenModel().double().lin1.weight.numel() + 5 + 5 * T * V + T * V, 3)
        )
        y_real = torch.randn(N, T, V, generator=torch.Generator().manual_seed(3)).double()
        for name, loss_fn in (
            ("seq", sequence_cross_entropy()),
            ("sum", sequence_cross_entropy(reduction="sum")),
            ("mse-sum", nn.MSELoss(reduction="sum")),
        ):
            model = TokenModel().double()
            if name == "mse-sum":  # real targets shaped like the outputs
                y = y_real
                shard = cd.shard_batches(split(x, y))
            for kind in ("H", "G", "F"):
                results[f"{name}_{kind}"] = np.asarray(_build(kind, model, loss_fn, shard) @ Vm)
                ref = _build(kind, model, loss_fn, (x, y), group=False)
                results[f"{name}_{kind}_ref"] = np.asarray(ref @ Vm)
            st = loss_stats(model, loss_fn, shard, z=Vm[:, 0], num_probes=0)
            results[f"{name}_stats"] = np.array([st.loss_mean, st.hess_mu, st.num_samples])
            ref = loss_stats(model, loss_fn, (x, y), z=Vm[:, 0], num_probes=0, process_group=False)
            results[f"{name}_stats_ref"] = np.array([ref.loss_mean, ref.hess_mu, ref.num_samples])
        np.savez(Path(out_dir) / f"rank{rank}.npz", **results)
        leave_process_group()  # every rank together, no teardown (see tests/gloo_workers.py)
    finally:  # only after an error: this rank exits non-zero
        dist.destroy_process_group()


def test_two_gloo_processes_with_unequal_shards(
    tmp_path: Path, run_worker_processes: Callable[[list[list[str]], float], None]
) -> None:
    init_file = str(tmp_path / "rendezvous")
    run_worker_processes(
        [[__file__, "--worker", str(r), init_file, str(tmp_path)] for r in range(WORLD)], 120
    )
    job = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(WORLD)]
    for r in job:
        for name in ("seq", "sum", "mse-sum"):
            for kind in ("H", "G", "F"):
                assert close(r[f"{name}_{kind}"], r[f"{name}_{kind}_ref"]), (name, kind)
            np.testing.assert_allclose(r[f"{name}_stats"], r[f"{name}_stats_ref"], rtol=1e-10)
    assert np.array_equal(job[0]["seq_H"], job[1]["seq_H"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", nargs=3, metavar=("RANK", "INIT_FILE", "OUT_DIR"))
    ns = parser.parse_args()
    _worker(int(ns.worker[0]), ns.worker[1], ns.worker[2])
