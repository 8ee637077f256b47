"""K-FAC and E-KFAC of bfloat16/float16 models, and models whose dtype changed afterwards.

**Low precision.**  A 16-bit model gives an operator in its dtype whose factors,
eigendecompositions (``torch.linalg.eigh`` has no 16-bit kernels), inverses and E-KFAC
corrections are computed in float32 (:mod:`curvops.kfac`, "Low precision").  Each
result is compared with the same operator on a float64 copy of the *same rounded
weights and inputs*, so that only the arithmetic differs.  The tolerances follow from
one error model, with unit roundoff :math:`u = \\varepsilon/2` of the dtype
(:math:`2^{-8}` bfloat16, :math:`2^{-11}` float16):

* every quantity the statistics are built from (a layer's input, a back-propagated
  column, a per-sample weight gradient) is within :math:`c\\,u`, :math:`c = 8`, of the
  float64 copy's in norm: the bound ``tests/curvops/test_mixed_precision.py`` asserts
  for the exact products of such models;
* a factor (an average of outer products of two such quantities) is then within
  :math:`\\epsilon_F = (1 + cu)^2 - 1` of its float64 counterpart, relative to its
  trace exactly (:math:`\\operatorname{tr} F = \\mathbb E\\|x\\|^2`) and, as the model's
  statement, relative to its norm; an E-KFAC correction (squares of per-sample weight
  gradients) likewise;
* a Kronecker block :math:`G \\otimes A` (and an E-KFAC block whose eigenbasis it does
  not depend on, below) is within :math:`\\eta = (1 + \\epsilon_F)^2 - 1` of its float64
  counterpart relative to :math:`\\max|\\lambda|`; by Weyl's inequality so is each
  eigenvalue, and so is the trace relative to the trace;
* the float32 arithmetic after that adds :math:`n\\,\\varepsilon_{32}\\max|\\lambda|`
  (:math:`n = d_G + d_A`, the rounding floor of :func:`curvops.kronecker.rounding_floor`,
  :math:`\\varepsilon_{32} = 2^{-23}`) per operation, and rounding a result to the
  dtype :math:`u` relative to it.

For the damped inverse the perturbation bound of inverses gives
:math:`\\|(\\hat K + \\delta)^{-1} - (K + \\delta)^{-1}\\| \\le \\|(K + \\delta)^{-1}\\|\\,
\\beta\\kappa / (1 - \\beta\\kappa)` with :math:`\\beta` the relative block error above and
:math:`\\kappa = \\max\\lambda / (\\min\\lambda + \\delta)`; the damping
:math:`\\delta = 10\\,\\beta\\max\\lambda` keeps :math:`\\beta\\kappa \\le 1/10`, a bound of
about 11 % in both dtypes (measured errors: below :math:`u`).

E-KFAC's eigenbasis is that of the factors, and eigenvectors move by the perturbation
over the eigenvalue gaps (Davis-Kahan), so a product of an E-KFAC on many samples has no
gap-free bound.  On one sample without weight sharing the exact GGN block *is*
:math:`G \\otimes A` (:math:`\\sum_j (g_j g_j^\\top) \\otimes a a^\\top`), so E-KFAC equals it
in any eigenbasis: products, eigenvalues and inverses are compared there with the
K-FAC bounds; on many samples (and convolutions) the trace, which is the exact GGN's in
any orthonormal basis, is compared with :math:`\\eta`.

**A changed model.**  After ``model.to(torch.float64)`` (or to bfloat16, to another
device, a resized or a removed parameter) the operators are refused with the exact
operators' ``ValueError`` naming ``model`` -- the same message, by the same check
(:func:`curvops.curvature.live_parameters`) -- before any product or
factor computation, instead of an internal ``RuntimeError`` of mixed dtypes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from curvops import EKFACOperator, HessianOperator, KFACOperator

LOW = [torch.bfloat16, torch.float16]
IDS = ["bf16", "fp16"]
CE = nn.CrossEntropyLoss()
C_QUANTITY = 8  # test_mixed_precision's bound for a low-precision model's products
EPS32 = torch.finfo(torch.float32).eps  # the float32 arithmetic after the model's passes
DAMPING_MARGIN = 10  # delta = 10 beta max(lambda): beta * kappa <= 1/10


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def factor_error(dtype: torch.dtype) -> float:
    """:math:`\\epsilon_F = (1 + cu)^2 - 1`: a factor, quadratic in the model's quantities."""
    return (1 + C_QUANTITY * unit_roundoff(dtype)) ** 2 - 1


def block_error(dtype: torch.dtype) -> float:
    """:math:`\\eta = (1 + \\epsilon_F)^2 - 1`: a block, the product of two factors."""
    return (1 + factor_error(dtype)) ** 2 - 1


def mlp() -> nn.Module:
    """6 -> 24 -> 5: the first block's :math:`d_G + d_A = 30`, so that bfloat16 rounding
    floors (:math:`30 \\cdot 2^{-7}` of the largest eigenvalue) would show."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return net


def cnn() -> nn.Module:
    """Conv2d(2, 4, 3) on 5 x 5 images, then Linear(100, 3) (:math:`d_G + d_A = 103`)."""
    g = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(100, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return net


ARCHS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": (mlp, (6,), 5),
    "cnn": (cnn, (2, 5, 5), 3),
}


def pair(arch: str, dtype: torch.dtype, samples: int) -> tuple[Any, Any, Any, Any]:
    """The model in ``dtype`` and its float64 copy (the same rounded weights), with data
    rounded to ``dtype`` once and given to both."""
    make, shape, classes = ARCHS[arch]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(samples, *shape, generator=g).to(dtype)
    y = torch.randint(0, classes, (samples,), generator=g)
    low = make().to(dtype)
    high = copy.deepcopy(low).double()
    return low, high, (x, y), (x.double(), y)


def probes(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Three probe columns, representable in ``dtype`` (no rounding of the input)."""
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(3)).to(dtype)


def floor32(op: Any) -> float:
    """:math:`n\\,\\varepsilon_{32}`, :math:`n` the largest :math:`d_G + d_A` of ``op``."""
    return max(b.rows + b.cols for b in op.blocks) * EPS32


def eigenvalue_bound(op: Any, dtype: torch.dtype, top: float) -> float:
    """:math:`e + u(\\max|\\lambda| + e)`, :math:`e = (\\eta + n\\varepsilon_{32})
    \\max|\\lambda|` the float32 eigenvalues' error (Weyl), then rounded to the dtype."""
    err = (block_error(dtype) + floor32(op)) * top
    return err + unit_roundoff(dtype) * (top + err)


def check_eigenvalues(op: Any, ref: Any, dtype: torch.dtype) -> None:
    """Sorted eigenvalues within :func:`eigenvalue_bound` (sorting keeps a matching's
    largest difference)."""
    lam, lam64 = op.eigenvalues(), ref.eigenvalues()
    assert lam.dtype == dtype and lam64.dtype == torch.float64
    bound = eigenvalue_bound(op, dtype, float(lam64.abs().max()))
    assert float((lam.double() - lam64).abs().max()) <= bound


def check_trace(op: Any, ref: Any, dtype: torch.dtype) -> None:
    """A trace of PSD blocks within :math:`\\eta + n\\varepsilon_{32}` relative."""
    got, want = op.trace(), ref.trace()
    assert isinstance(got, float) and want > 0
    assert abs(got - want) <= (block_error(dtype) + floor32(op)) * want


def check_products(op: Any, ref: Any, dtype: torch.dtype) -> None:
    """:math:`\\|\\hat K v - K v\\| \\le (\\eta + 4 n \\varepsilon_{32}) \\max\\lambda \\|v\\|
    + u \\|\\hat K v\\|` (four float32 products per block, the result rounded once)."""
    V = probes(op.shape[0], dtype)
    got = op @ V
    assert got.dtype == dtype
    want = ref @ V.double()
    top = float(ref.eigenvalues().abs().max())
    u = unit_roundoff(dtype)
    bound = (block_error(dtype) + 4 * floor32(op)) * top * V.double().norm(dim=0)
    bound = bound + u * got.double().norm(dim=0)
    assert bool(((got.double() - want).norm(dim=0) <= bound).all())


def check_inverse(op: Any, ref: Any, dtype: torch.dtype, delta: float | None = None) -> None:
    """The damped inverse's products and log-determinant (see the module docstring);
    ``delta`` defaults to :math:`10\\,\\beta\\max\\lambda` (:math:`\\beta\\kappa \\le 1/10`)."""
    lam64 = ref.eigenvalues()
    top, bottom = float(lam64.max()), float(lam64.min())
    beta = block_error(dtype) + floor32(op)  # the blocks' error relative to max(lambda)
    delta = DAMPING_MARGIN * beta * top if delta is None else delta
    kappa = top / (bottom + delta)
    assert beta * kappa < 1  # the bound below holds (<= 1/10 with the default delta)
    relative = beta * kappa / (1 - beta * kappa) + 4 * floor32(op)
    inv, inv64 = op.inverse(delta), ref.inverse(delta)
    assert inv.torch_dtype == dtype
    V = probes(op.shape[0], dtype)
    got, want = inv @ V, inv64 @ V.double()
    assert got.dtype == dtype
    norm_inverse = 1 / (bottom + delta)
    bound = relative * norm_inverse * V.double().norm(dim=0)
    bound = bound + unit_roundoff(dtype) * got.double().norm(dim=0)
    assert bool(((got.double() - want).norm(dim=0) <= bound).all())
    # log det: sum_i |log(l_i + d) - log(l'_i + d)| <= P * err / (min + d - err)
    err = beta * top
    size = op.shape[0]
    logdet_bound = size * (err / (bottom + delta - err) + 2 * EPS32)
    assert abs(inv.logdet() - inv64.logdet()) <= logdet_bound


@pytest.mark.parametrize("dtype", LOW, ids=IDS)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_kfac_of_a_low_precision_model_against_its_float64_copy(arch: str, dtype: torch.dtype):
    low, high, data, data64 = pair(arch, dtype, samples=32)
    K, R = KFACOperator(low, CE, data), KFACOperator(high, CE, data64)
    assert K.torch_dtype == dtype
    u, eps_f = unit_roundoff(dtype), factor_error(dtype)
    for (G, A), (G64, A64) in zip(K.factors(), R.factors()):
        for F, F64 in ((G, G64), (A, A64)):
            assert F.dtype == dtype
            # eps_F (+ n eps_32) in norm, then rounded to the dtype entry by entry:
            # |fl(x) - x| <= u |fl(x)|, so the rounding is <= u ||F||_F in norm
            norm64 = float(torch.linalg.matrix_norm(F64, 2))
            bound = (eps_f + floor32(K)) * norm64 + u * float(F.double().norm())
            assert float(torch.linalg.matrix_norm(F.double() - F64, 2)) <= bound
    check_eigenvalues(K, R, dtype)
    check_trace(K, R, dtype)
    check_products(K, R, dtype)
    check_inverse(K, R, dtype)
    # the pi-damped inverse too runs in float32 and answers in the dtype
    pi = K.inverse(0.1, pi_damping=True) @ probes(K.shape[0], dtype)
    assert pi.dtype == dtype and bool(torch.isfinite(pi).all())
    assert K.to_dense().dtype == dtype
    assert all(e.values.dtype == dtype for e in K.eigen_blocks())


@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_ekfac_on_one_sample_against_its_float64_copy(dtype: torch.dtype):
    """One sample, no weight sharing: E-KFAC is the exact block :math:`G \\otimes A` in any
    eigenbasis, so its products, eigenvalues and inverse have the K-FAC bounds."""
    low, high, (x, y), (x64, y64) = pair("mlp", dtype, samples=1)
    E, R = EKFACOperator(low, CE, (x, y)), EKFACOperator(high, CE, (x64, y64))
    assert E.torch_dtype == dtype
    check_eigenvalues(E, R, dtype)
    check_trace(E, R, dtype)
    check_products(E, R, dtype)
    check_inverse(E, R, dtype)
    assert E.logdet() == R.logdet() == -math.inf  # A = a a^T: rank one in both


@pytest.mark.parametrize("dtype", LOW, ids=IDS)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_ekfac_of_a_low_precision_model_runs_in_its_dtype(arch: str, dtype: torch.dtype):
    """Many samples (and a convolution): every query answers in the dtype, and the trace
    (the exact GGN blocks' trace in any orthonormal basis) is within :math:`\\eta`."""
    low, high, data, data64 = pair(arch, dtype, samples=32)
    E, R = EKFACOperator(low, CE, data), EKFACOperator(high, CE, data64)
    V = probes(E.shape[0], dtype)
    for result in (E @ V, E.inverse(0.1) @ V, E.eigenvalues(), E.to_dense()):
        assert result.dtype == dtype and bool(torch.isfinite(result).all())
    check_trace(E, R, dtype)
    assert isinstance(E.logdet(), float)


@pytest.mark.parametrize("dtype", LOW, ids=IDS)
def test_a_wide_low_precision_layer_keeps_its_eigenvalues(dtype: torch.dtype):
    """Linear(256, 256), :math:`d_G + d_A = 512`: rounding floors in the operator's dtype,
    :math:`(d_G + d_A)\\,\\varepsilon\\max|\\lambda|` (4 and 0.5 times the largest
    eigenvalue), would zero all or half of the spectrum; the float32 ones keep it.  The
    inputs :math:`x = \\sqrt N\\,Q\\operatorname{diag}(s)` (:math:`Q` orthogonal) give
    :math:`A = \\operatorname{diag}(s^2)`, :math:`s^2` spread over :math:`[0.4, 1]`, and a
    mean MSE gives :math:`G \\propto I`: every eigenvalue of the float64 copy exceeds the
    error bound, so by Weyl every low-precision one is positive: the undamped inverse
    exists and the log-determinant is finite."""
    g = torch.Generator().manual_seed(6)
    n = 256
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    scales = torch.linspace(0.4, 1.0, n, dtype=torch.float64).sqrt()
    x = (math.sqrt(n) * q * scales).to(dtype)
    y = torch.randn(n, n, generator=g).to(dtype)
    low = nn.Linear(n, n).to(dtype)
    high = copy.deepcopy(low).double()
    loss = nn.MSELoss()
    K, R = KFACOperator(low, loss, (x, y)), KFACOperator(high, loss, (x.double(), y.double()))
    lam64 = R.eigenvalues()
    bound = eigenvalue_bound(K, dtype, float(lam64.max()))
    assert float(lam64.min()) > bound  # the premise, from the bound (not a measurement)
    check_eigenvalues(K, R, dtype)
    assert bool((K.eigenvalues() > 0).all())
    check_inverse(K, R, dtype, delta=0.0)
    assert math.isfinite(K.logdet())


def test_float16_factor_sums_beyond_65504_stay_finite():
    """Eight batches of inputs of size 40: :math:`\\sum_n x x^\\top` passes float16's
    65504, the mean (about 1600) does not; the sums are float32."""
    g = torch.Generator().manual_seed(4)
    low = nn.Linear(3, 2).half()
    high = copy.deepcopy(low).double()
    x = (40 * torch.randn(64, 3, generator=g)).half()
    y = torch.randn(64, 2, generator=g).half()
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]
    K = KFACOperator(low, nn.MSELoss(), batches)
    R = KFACOperator(high, nn.MSELoss(), [(a.double(), b.double()) for a, b in batches])
    assert all(bool(torch.isfinite(A).all()) for _, A in K.factors())
    check_eigenvalues(K, R, torch.float16)
    check_trace(K, R, torch.float16)
    check_products(K, R, torch.float16)


# ---------------------------------------------------------------------- a changed model
def small() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


def small_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, generator=g), torch.randint(0, 3, (6,), generator=g)


def _resize(model: nn.Module) -> None:
    model[0].weight = nn.Parameter(torch.zeros(5, 3))  # type: ignore[index]


def _remove(model: nn.Module) -> None:
    model[2].bias = None  # type: ignore[index]


CHANGES: dict[str, Callable[[nn.Module], Any]] = {
    "to-float64": lambda m: m.to(torch.float64),
    "to-bfloat16": lambda m: m.to(torch.bfloat16),
    "to-meta-device": lambda m: m.to("meta"),
    "resized": _resize,
    "removed": _remove,
}


def _queries(op: Any, inverse: Any) -> dict[str, Callable[[], Any]]:
    v = torch.ones(op.shape[0])
    queries: dict[str, Callable[[], Any]] = {
        "matvec": lambda: op @ v,
        "numpy": lambda: op.matvec(v.numpy()),
        "trace": op.trace,
        "eigenvalues": op.eigenvalues,
        "logdet": op.logdet,
        "factors": op.factors,
        "eigen_blocks": op.eigen_blocks,
        "to_dense": op.to_dense,
        "inverse": lambda: op.inverse(0.1),
    }
    if inverse is not None:
        queries["inverse-built-before"] = lambda: inverse @ v
    return queries


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("first_product", [True, False], ids=["after-product", "unused"])
@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator], ids=["kfac", "ekfac"])
def test_a_changed_model_is_refused_as_by_the_exact_operators(cls, first_product, change):
    model, data = small(), small_data()
    twin = copy.deepcopy(model)
    op, exact = cls(model, CE, data), HessianOperator(twin, CE, data)
    inverse = None
    if first_product:
        op @ torch.ones(op.shape[0])
        inverse = op.inverse(0.1)
    CHANGES[change](model)
    CHANGES[change](twin)
    with pytest.raises(ValueError, match="as when the operator was built") as expected:
        exact @ torch.ones(exact.shape[0])
    for name, query in _queries(op, inverse).items():
        with pytest.raises(ValueError) as info:
            query()  # no number comes back
        assert str(info.value) == str(expected.value), name
        assert "Argument 'model'" in str(info.value)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator], ids=["kfac", "ekfac"])
def test_the_operator_works_again_once_the_model_is_as_built(cls):
    """The refusal changes nothing: float32 -> float64 -> float32 is exact, and the
    products afterwards are bitwise those before."""
    model, data = small(), small_data()
    op = cls(model, CE, data)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(5))
    before = op @ v
    model.to(torch.float64)
    with pytest.raises(ValueError, match=r"dtype torch\.float32"):
        op @ v
    model.to(torch.float32)
    assert torch.equal(op @ v, before)
