"""A catalogue of bad inputs across spectral, curvops and nets, each with a clear error.

Every case asserts the exception type and that the message names the argument
(``Argument 'name'`` or the name itself) and says what was expected.  The
cases are built lazily (one closure each) and share a few tiny fixtures, so
the whole catalogue runs in a few seconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from torch import nn

import curvops
import nets
import spectral
from nets.checkpoint import load_model_state, save_checkpoint
from nets.models import get_model, model_spec
from spectral.density import SpectralDensity
from spectral.resume import StateMismatchError

# ----------------------------------------------------------------------------- tiny objects


def _model(seed: int = 0) -> nn.Module:
    torch_gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=torch_gen))
    return net


def _batch(n: int = 5, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d, generator=g), torch.randint(0, 2, (n,), generator=g)


def _hessian(**kw: Any) -> curvops.HessianOperator:
    return curvops.HessianOperator(_model(), nn.CrossEntropyLoss(), _batch(), **kw)


def _mlp(hidden: int = 6, seed: int = 0) -> nn.Module:
    return get_model(
        "MLP", num_classes=10, in_channels=1, input_size=8, hidden=(hidden,), seed=seed
    )


SPD = np.diag(np.arange(1.0, 7.0))


@dataclass(frozen=True)
class Case:
    """One bad input: ``call`` must raise ``exc`` with a message containing all ``fragments``."""

    id: str
    call: Callable[[Path], Any]
    exc: type[BaseException]
    fragments: tuple[str, ...]


CASES: list[Case] = []


def case(case_id: str, exc: type[BaseException], *fragments: str) -> Callable[..., Any]:
    """Register a bad-input case (decorator over a function of ``tmp_path``)."""

    def register(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
        CASES.append(Case(case_id, fn, exc, fragments))
        return fn

    return register


# ----------------------------------------------------------------------------- spectral


@case("lanczos-non-square", ValueError, "'A'", "square")
def _(tmp: Path) -> Any:
    return spectral.lanczos(np.zeros((3, 4)), 2)


@case("lanczos-1d-array", ValueError, "'A'", "square")
def _(tmp: Path) -> Any:
    return spectral.lanczos(np.ones(4), 2)


@case("lanczos-complex", TypeError, "'A'", "real")
def _(tmp: Path) -> Any:
    return spectral.lanczos(np.eye(3, dtype=complex), 2)


@case("lanczos-num-iters-zero", ValueError, "'num_iters'", "1 <= num_iters <= n = 6")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 0)


@case("lanczos-num-iters-too-large", ValueError, "'num_iters'", "n = 6")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 7)


@case("lanczos-num-iters-float", TypeError, "'num_iters'", "an integer")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 2.5)


@case("lanczos-zero-start", ValueError, "'v0'", "nonzero")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 2, v0=np.zeros(6))


@case("lanczos-nan-start", ValueError, "'v0'", "finite")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 2, v0=np.full(6, np.nan))


@case("lanczos-start-shape", ValueError, "'v0'", "shape (6,)")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 2, v0=np.ones(5))


@case("lanczos-reorth-name", ValueError, "'reorth'", "'full'")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 2, reorth="sometimes")


@case("lanczos-no-basis-with-reorth", ValueError, "'store_basis'", "reorth='none'")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 2, reorth="full", store_basis=False)


@case("lanczos-non-symmetric", ValueError, "'A'", "symmetric")
def _(tmp: Path) -> Any:
    return spectral.lanczos(np.triu(np.ones((5, 5))), 2, check_symmetric=True, seed=0)


@case("lanczos-seed-type", TypeError, "'seed'", "integer")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 2, seed="zero")


@case("linear-operator-non-square", ValueError, "'A'", "square")
def _(tmp: Path) -> Any:
    op = sla.LinearOperator((3, 4), matvec=lambda x: x[:3], dtype=np.float64)
    return spectral.lanczos(op, 2)


@case("callable-without-size", TypeError, "'size'", "dimension n")
def _(tmp: Path) -> Any:
    return spectral.as_operator(lambda x: x)


@case("operator-flagged-non-symmetric", ValueError, "'A'", "symmetric")
def _(tmp: Path) -> Any:
    op = curvops.Dense(torch.ones(3, 3, dtype=torch.float64))
    return spectral.lanczos(
        op - op.T + curvops.Dense(torch.triu(torch.ones(3, 3, dtype=torch.float64))), 2
    )


@case("slq-num-probes-zero", ValueError, "'num_probes'", "positive integer")
def _(tmp: Path) -> Any:
    return spectral.slq(SPD, 2, num_probes=0)


@case("slq-probe-kind", ValueError, "'probe'", "rademacher")
def _(tmp: Path) -> Any:
    return spectral.slq(SPD, 2, probe="uniform")


@case("top-eigenpairs-k-zero", ValueError, "'k'", "1 <= k < n = 6")
def _(tmp: Path) -> Any:
    return spectral.top_eigenpairs(SPD, 0)


@case("top-eigenpairs-which", ValueError, "'which'", "LA")
def _(tmp: Path) -> Any:
    return spectral.top_eigenpairs(SPD, 2, which="largest")


@case("trace-method", ValueError, "'method'", "hutch++")
def _(tmp: Path) -> Any:
    return spectral.trace(SPD, method="guess")


@case("trace-function-name", ValueError, "'f'", "log")
def _(tmp: Path) -> Any:
    return spectral.trace_function(SPD, "cosh", num_iters=3, num_probes=1, seed=0)


@case("probe-kind", ValueError, "'kind'", "rademacher")
def _(tmp: Path) -> Any:
    return spectral.random_probe(4, "cauchy", seed=0)


@case("probe-length-zero", ValueError, "'n'", "positive integer")
def _(tmp: Path) -> Any:
    return spectral.random_probe(0, seed=0)


@case("density-negative-weights", ValueError, "'weights'", "non-negative")
def _(tmp: Path) -> Any:
    return SpectralDensity(np.array([1.0, 2.0]), np.array([1.5, -0.5]))


@case("density-shape-mismatch", ValueError, "'weights'", "shape (2,)")
def _(tmp: Path) -> Any:
    return SpectralDensity(np.array([1.0, 2.0]), np.array([1.0]))


@case("density-smooth-sigma", ValueError, "'sigma'", "positive")
def _(tmp: Path) -> Any:
    return SpectralDensity(np.array([1.0]), np.array([1.0])).smooth(np.linspace(0, 2, 5), -1.0)


@case("npz-missing-file", FileNotFoundError, "no-such.npz", "no such file")
def _(tmp: Path) -> Any:
    return spectral.load_npz(tmp / "no-such.npz")


@case("npz-object-array", TypeError, "'bad'", "no pickled objects")
def _(tmp: Path) -> Any:
    return spectral.save_npz(tmp / "x.npz", bad=np.array([{"a": 1}], dtype=object))


@case("lanczos-checkpoint-every-zero", ValueError, "'checkpoint_every'", "positive integer")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 2, checkpoint=tmp / "s.npz", checkpoint_every=0)


@case("lanczos-state-of-other-arguments", StateMismatchError, "'checkpoint'", "num_iters=3")
def _(tmp: Path) -> Any:
    spectral.lanczos(SPD, 3, seed=0, checkpoint=tmp / "s.npz")
    return spectral.lanczos(SPD, 4, seed=0, checkpoint=tmp / "s.npz")


@case("lanczos-state-of-other-operator", StateMismatchError, "'checkpoint'", "another operator")
def _(tmp: Path) -> Any:
    spectral.lanczos(SPD, 3, seed=0, checkpoint=tmp / "s.npz")
    return spectral.lanczos(SPD + 1e-3 * np.eye(6), 3, seed=0, checkpoint=tmp / "s.npz")


@case("lanczos-complex-start", TypeError, "'v0'", "real")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 2, v0=np.ones(6, dtype=complex))


@case("lanczos-start-not-array", TypeError, "'v0'", "shape (6,)")
def _(tmp: Path) -> Any:
    return spectral.lanczos(SPD, 2, v0="ones")


@case("lanczos-inf-operator", spectral.NumericalError, "iteration 1", "nan or inf")
def _(tmp: Path) -> Any:
    return spectral.lanczos(np.diag([1.0, np.inf, 2.0]), 2, seed=0)


@case("trace-num-matvecs-zero", ValueError, "'num_matvecs'", ">= 1")
def _(tmp: Path) -> Any:
    return spectral.trace(SPD, num_matvecs=0)


# ----------------------------------------------------------------------------- curvops


@case("curvops-model-type", TypeError, "'model'", "torch.nn.Module")
def _(tmp: Path) -> Any:
    return curvops.HessianOperator(lambda x: x, nn.CrossEntropyLoss(), _batch())


@case("curvops-reduction-none", ValueError, "'loss_fn.reduction'", "'mean'")
def _(tmp: Path) -> Any:
    return curvops.GGNOperator(_model(), nn.CrossEntropyLoss(reduction="none"), _batch())


@case("curvops-reduction-none-hessian", ValueError, "'loss_fn.reduction'", "'mean' or 'sum'")
def _(tmp: Path) -> Any:
    return curvops.HessianOperator(_model(), nn.MSELoss(reduction="none"), _batch())


@case("curvops-loss-not-callable", TypeError, "'loss_fn'", "callable")
def _(tmp: Path) -> Any:
    return curvops.HessianOperator(_model(), "cross-entropy", _batch())


@case("curvops-empty-data", ValueError, "'data'", "at least one batch")
def _(tmp: Path) -> Any:
    return curvops.HessianOperator(_model(), nn.CrossEntropyLoss(), [])


@case("curvops-inconsistent-batches", ValueError, "'data (batch 1)'", "batch 0")
def _(tmp: Path) -> Any:
    return curvops.HessianOperator(_model(), nn.CrossEntropyLoss(), [_batch(d=3), _batch(d=4)])


@case("curvops-targets-length", ValueError, "'data (batch 0)'", "5 rows")
def _(tmp: Path) -> Any:
    x, y = _batch()
    return curvops.HessianOperator(_model(), nn.CrossEntropyLoss(), (x, y[:3]))


@case("curvops-one-shot-iterator", TypeError, "'data'", "re-iterable")
def _(tmp: Path) -> Any:
    return curvops.HessianOperator(_model(), nn.CrossEntropyLoss(), iter([_batch()]))


@case("curvops-foreign-parameter", ValueError, "'params'", "parameters of the model")
def _(tmp: Path) -> Any:
    return _hessian(params=[nn.Parameter(torch.zeros(3))])


@case("curvops-empty-selection", ValueError, "'params'", "at least one parameter")
def _(tmp: Path) -> Any:
    return _hessian(params=[])


@case("curvops-bn-mode", ValueError, "'bn_mode'", "'train'")
def _(tmp: Path) -> Any:
    return _hessian(bn_mode="frozen")


@case("curvops-fisher-kind", ValueError, "'kind'", "'mc'")
def _(tmp: Path) -> Any:
    return curvops.FisherOperator(_model(), nn.CrossEntropyLoss(), _batch(), kind="true")


@case("curvops-fisher-mc-samples", ValueError, "'mc_samples'", "integer >= 1")
def _(tmp: Path) -> Any:
    return curvops.FisherOperator(_model(), nn.CrossEntropyLoss(), _batch(), mc_samples=0)


@case("curvops-matvec-shape", ValueError, "'x'", "shape (26,)")
def _(tmp: Path) -> Any:
    return _hessian().matvec(torch.zeros(5))


@case("curvops-matvec-complex", TypeError, "'x'", "real")
def _(tmp: Path) -> Any:
    return _hessian().matvec(torch.zeros(26, dtype=torch.complex64))


@case("curvops-sum-sizes", ValueError, "'B'", "shape (3, 3)")
def _(tmp: Path) -> Any:
    return curvops.Identity(3) + curvops.Identity(4)


@case("curvops-diagonal-2d", ValueError, "'d'", "1-D")
def _(tmp: Path) -> Any:
    return curvops.Diagonal(torch.ones(2, 2))


@case("curvops-rectangular-to-lanczos", ValueError, "'A'", "(2, 3)")
def _(tmp: Path) -> Any:
    return spectral.lanczos(curvops.Dense(torch.ones(2, 3, dtype=torch.float64)), 1)


@case("curvops-inverse-method", ValueError, "'method'", "'cg'")
def _(tmp: Path) -> Any:
    return curvops.inverse(curvops.Identity(3), method="lu")


@case("curvops-inverse-tol", ValueError, "'tol'", ">= 0")
def _(tmp: Path) -> Any:
    return curvops.inverse(curvops.Identity(3), tol=-1.0)


@case("curvops-power-negative", ValueError, "'k'", ">= 0")
def _(tmp: Path) -> Any:
    return curvops.Identity(3) ** -1


@case("curvops-deflate-shape", ValueError, "'V'", "shape (3, r)")
def _(tmp: Path) -> Any:
    return curvops.Identity(3).deflate(torch.ones(4, 1))


@case("curvops-ggn-diagonal-method", ValueError, "'method'", "'exact'")
def _(tmp: Path) -> Any:
    return curvops.ggn_diagonal(_model(), nn.CrossEntropyLoss(), _batch(), method="guess")


@case("curvops-vector-wrong-device", ValueError, "'x'", "operator's device cpu")
def _(tmp: Path) -> Any:
    return _hessian().matvec(torch.zeros(26, device="meta"))


@case("curvops-matmat-rows", ValueError, "'X'", "26 rows")
def _(tmp: Path) -> Any:
    return _hessian().matmat(torch.zeros(5, 2))


@case("curvops-unknown-parameter-name", ValueError, "'params'", "names of parameters")
def _(tmp: Path) -> Any:
    return _hessian(params=["nope.weight"])


@case("curvops-all-frozen", ValueError, "'params'", "at least one parameter")
def _(tmp: Path) -> Any:
    return curvops.HessianOperator(_model().requires_grad_(False), nn.CrossEntropyLoss(), _batch())


@case("curvops-nan-parameter", ValueError, "'params'", "'0.weight'")
def _(tmp: Path) -> Any:
    net = _model()
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    return spectral.lanczos(curvops.HessianOperator(net, nn.CrossEntropyLoss(), _batch()), 2)


@case("curvops-nan-inputs", spectral.NumericalError, "batch 1", "inputs of this batch")
def _(tmp: Path) -> Any:
    x, y = _batch()
    bad = x.clone()
    bad[2, 1] = float("inf")
    op = curvops.GGNOperator(_model(), nn.CrossEntropyLoss(), [(x, y), (bad, y)])
    return op.matvec(torch.ones(26))


# ----------------------------------------------------------------------------- nets


@case("nets-unknown-model", ValueError, "'model'", "MLP")
def _(tmp: Path) -> Any:
    return get_model("ResNet9000")


@case("nets-model-name-type", TypeError, "'model'", "str")
def _(tmp: Path) -> Any:
    return get_model(3)


@case("nets-unknown-dataset", ValueError, "'dataset'", "digits")
def _(tmp: Path) -> Any:
    return nets.load_dataset("imagenet-1k")


@case("nets-unknown-optimiser", ValueError, "'optimizer'", "SGD")
def _(tmp: Path) -> Any:
    return nets.get_optimizer("Adamax9", nn.Linear(1, 1))


@case("nets-loader-batch-size", ValueError, "'batch_size'", ">= 1")
def _(tmp: Path) -> Any:
    return nets.make_loader(torch.utils.data.TensorDataset(torch.zeros(2, 1)), 0, shuffle=False)


@case("nets-missing-checkpoint", FileNotFoundError, "nothing.pt", "no such")
def _(tmp: Path) -> Any:
    return nets.load_checkpoint(tmp / "nothing.pt")


@case("nets-checkpoint-other-architecture", ValueError, "'checkpoint'", "missing keys")
def _(tmp: Path) -> Any:
    other = _mlp(hidden=7)
    save_checkpoint(tmp / "c.pt", other, None, 1, dict(model_spec(other) or {}))
    return load_model_state(_mlp(hidden=6), tmp / "c.pt")


@case("nets-device", ValueError, "'device'", "'cuda:N'")
def _(tmp: Path) -> Any:
    return nets.resolve_device("tpu:7")


@case("nets-unknown-curvature", ValueError, "'curvature_matrix'", "hessian")
def _(tmp: Path) -> Any:
    return nets.compute_eigenspectrum(
        "digits",
        model=_mlp(),
        curvature_matrix="laplacian",
        lanczos_iters=2,
        subsample=8,
        device="cpu",
    )


@case("nets-lanczos-iters-zero", ValueError, "'lanczos_iters'", "integer")
def _(tmp: Path) -> Any:
    return nets.compute_eigenspectrum(
        "digits", model=_mlp(), lanczos_iters=0, subsample=8, device="cpu"
    )


@case("nets-checkpoint-every-zero", ValueError, "'checkpoint_every'", "integer")
def _(tmp: Path) -> Any:
    return nets.compute_eigenspectrum(
        "digits", model=_mlp(), lanczos_iters=2, subsample=8, device="cpu", checkpoint_every=0
    )


@case("nets-spectrum-state-of-other-run", StateMismatchError, "'checkpoint'", "lanczos_iters=3")
def _(tmp: Path) -> Any:
    kw: dict[str, Any] = dict(model=_mlp(), subsample=8, device="cpu", state_path=tmp / "s.npz")
    nets.compute_eigenspectrum("digits", lanczos_iters=3, **kw)
    return nets.compute_eigenspectrum("digits", lanczos_iters=4, **kw)


@case("nets-landscape-negative-dist", ValueError, "'dist'", "positive")
def _(tmp: Path) -> Any:
    return nets.build_loss_landscape(
        "digits",
        model=_mlp(),
        dist=-1.0,
        n_points=3,
        random_directions=1,
        subsample=8,
        device="cpu",
    )


@case("nets-landscape-one-point", ValueError, "'n_points'", "2")
def _(tmp: Path) -> Any:
    return nets.build_loss_landscape(
        "digits", model=_mlp(), dist=1.0, n_points=1, random_directions=1, subsample=8, device="cpu"
    )


@case("nets-landscape-foreign-spectrum", ValueError, "'spectrum_path'", "this checkpoint")
def _(tmp: Path) -> Any:
    nets.compute_eigenspectrum(
        "digits", model=_mlp(seed=1), save_spectrum_path=tmp / "spec", save_eigvec=True,
        lanczos_iters=3, subsample=8, batch_size=8, device="cpu",
    )  # fmt: skip
    return nets.build_loss_landscape(
        "digits",
        model=_mlp(seed=2),
        spectrum_path=tmp / "spec",
        n_points=3,
        subsample=8,
        device="cpu",
    )


@case("nets-loss-stats-curvature", ValueError, "'curvature_matrix'", "hessian")
def _(tmp: Path) -> Any:
    return nets.compute_loss_stats(
        "digits", model=_mlp(), curvature_matrix="jacobian", subsample=8, device="cpu"
    )


@case("nets-schedule-epoch", ValueError, "'epoch'", "non-negative")
def _(tmp: Path) -> Any:
    return nets.linear_schedule(-1, 10, 0.1)


@case("nets-train-unknown-optimiser", ValueError, "'optimizer'", "SGD")
def _(tmp: Path) -> Any:
    return nets.train_network(
        tmp / "run", "digits", model="MLP", optimizer="Nesterov9", epochs=1, progress=False
    )


@case("nets-train-epochs-zero", ValueError, "'epochs'", ">= 1")
def _(tmp: Path) -> Any:
    return nets.train_network(tmp / "run", "digits", model="MLP", epochs=0, progress=False)


# ----------------------------------------------------------------------------- the test


def test_catalogue_is_large_and_distinct() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly(bad: Case, tmp_path: Path) -> None:
    with pytest.raises(bad.exc) as info:
        bad.call(tmp_path)
    message = str(info.value)
    for fragment in bad.fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in: {message}"
    # The message says what was expected (or names the file, or where a NaN appeared).
    assert re.search(r"expected|no such|not |non-finite|nan", message, re.IGNORECASE), message
