r"""K-FAC as an operator: Kronecker-factored curvature with exact spectra, log-dets and inverses.

:class:`KFACOperator` is the block-diagonal matrix with one block :math:`G \otimes A` per
parameter group of each supported layer (``nn.Linear``, ``nn.Conv2d``; factors as
defined in :mod:`curvops.kronecker`), acting on the row-major ``vec`` of the layer's
``d_out x d`` matrix (the weight reshaped to ``(d_out, -1)``, with the bias as an
extra column when ``bias="joint"``, or as its own block :math:`G \otimes [1]` when
``bias="separate"``).  With :math:`A = U_A \operatorname{diag}(\lambda_A) U_A^\top` and
:math:`G = U_G \operatorname{diag}(\lambda_G) U_G^\top`, a block has the eigenvectors
:math:`U_G \otimes U_A` and the eigenvalues :math:`\lambda_{G,i}\lambda_{A,j}`, so the
structure gives exactly what an exact operator can only estimate:

.. math::

    \operatorname{tr} = \sum_{\rm blocks} \operatorname{tr}G\,\operatorname{tr}A,\qquad
    \log\det = \sum_{\rm blocks} d_A \log\det G + d_G \log\det A,\qquad
    (G\otimes A + \delta I)^{-1} = (U_G\otimes U_A)\,
    \operatorname{diag}\Bigl(\frac{1}{\lambda_{G,i}\lambda_{A,j} + \delta}\Bigr)
    (U_G\otimes U_A)^\top,

and the heuristic :math:`\pi`-damped inverse :math:`(G + \frac{\sqrt\delta}{\pi} I)^{-1}
\otimes (A + \pi\sqrt\delta I)^{-1}`, :math:`\pi^2 = \frac{\operatorname{tr}A / d_A}
{\operatorname{tr}G / d_G}` (Martens & Grosse 2015, Section 6.3), which is *not* the
inverse of the damped matrix.  Parameters in no supported layer are refused
(``remainder="error"``) or kept as an explicit diagonal (``remainder="diagonal"``: the
diagonal of the approximated matrix: :func:`curvops.ggn_diagonal`).

Samples coupled by train-mode BatchNorm (``bn_mode="train"``, or ``bn_mode=None`` on a
model in train mode): a factor column of loss sample :math:`n` then reaches every sample
:math:`m` of a layer before the BatchNorm.  :math:`G` keeps its definition with a true
factor of the output Hessian :math:`H` (block diagonal over the loss samples),
:math:`G = \frac1N\sum_b N_b \sum_m [J_s^\top H J_s]_{mm}` (:math:`J_s` the Jacobian of
the batch's outputs with respect to the layer's outputs, :math:`[\cdot]_{mm}` the block of
sample :math:`m`, summed over its positions), by one backward column per loss sample
and factor column for such layers (:math:`N_b r` instead of :math:`r` per batch; layers
after the BatchNorm and eval mode are unchanged).  One column over all loss samples, as
before, added the cross terms :math:`g^{(n,j)}_m g^{(n',j)\top}_m` of different loss
samples, which depend on the choice of the square root of :math:`H` (a :math:`G` 78 %
off, trace 0.47 instead of 1.57, on a small BatchNorm MLP).  A random probe column on
one loss sample finds the coupled layers (:func:`curvops.kronecker.batch_statistics`);
more than
:data:`curvops.kronecker.MAX_FACTOR_COLUMNS` columns per batch are refused (a
``ValueError`` naming ``bn_mode``: use ``bn_mode="eval"``).

Padded positions are refused, not counted: :math:`A` averages over every position a
layer sees, and attention masks keep padded positions out of the loss and so out of
:math:`G` and the exact curvature, but not out of :math:`A` (a padded BERT classifier's
factors changed by 13-15 % with the token ids at masked positions, where the exact GGN
did not change).  Counting only unmasked positions is not exact by definition for every
layer (a head on pooled ``[N, D]`` inputs, cross-attention projections of the other
sequence), so a batch whose mapping inputs hold a 2-D padding mask (``attention_mask``,
``decoder_attention_mask``, ``src_key_padding_mask``, ...) that marks a padded position
is refused with a ``ValueError`` naming ``data`` (:func:`curvops.kronecker.refuse_padding`);
an all-ones mask is accepted.  Padding that the batch does not name (a model that builds
its mask from pad ids internally) cannot be seen and is counted: do not pad batches for
K-FAC (group sequences by length), or use the exact operators or
:func:`curvops.ggn_diagonal`.

A parameter of a Kronecker block used outside its layer's forward (a tied decoder
``F.linear(h, enc.weight.t())``, a convolution weight reused with ``F.conv2d``) has
curvature the factors cannot see: it is refused (a ``ValueError`` naming ``model`` and the
parameter, found by :class:`curvops.kronecker.ForeignUses` during each forward pass);
leave it out of ``params=`` or use the exact operators.  A parameter registered in two
modules is refused (or kept out of the blocks) by the ``params`` check.

The factors are computed on the first product and recomputed whenever the model's
parameters, buffers or modes (or the tensors of in-memory data) change, so a product
always uses the model as it is now; nothing of the model is changed.  The operator is a
matrix of fixed size, dtype and device: a selected parameter that went missing or changed
shape, dtype or device since construction (``model.to(torch.float64)``,
``model.to(torch.bfloat16)``, ``model.to("cuda")``) is refused before any product or
factor computation with the exact operators' ``ValueError`` naming ``model``
(:func:`curvops.curvature.live_parameters`): build a new operator.

Low precision.  A bfloat16/float16 model gives an operator in that dtype (its products
take and return that dtype; :meth:`~KroneckerEigenOperator.eigenvalues`,
:meth:`~KFACOperator.factors` and :meth:`~KroneckerEigenOperator.eigen_blocks` return
it), as the exact operators.  The forward and backward passes run in the model's dtype;
everything after them is float32 (:func:`curvops.precision.accumulation_dtype`): the
layers' inputs and gradient columns are widened, the factors summed and averaged, and
decomposed by ``torch.linalg.eigh`` (which has no 16-bit kernels), and a product or an
inverse is applied in float32 and rounded once to the operator's dtype.  The rounding
floors (:func:`curvops.kronecker.rounding_floor`) are therefore float32's: those of
bfloat16 (:math:`\varepsilon = 2^{-7}`) would exceed the largest eigenvalue from
:math:`d_G + d_A = 128` on and zero every eigenvalue of the block.  The result is the
K-FAC of what the low-precision model computes: against a float64 copy of the same
weights it differs by the rounding of the forward and backward passes (measured on small
MLPs and CNNs: eigenvalues within about :math:`2u` of the largest, :math:`u = 2^{-8}` for
bfloat16 and :math:`2^{-11}` for float16, products and damped inverses within about
:math:`u`; ``tests/curvops/test_kfac_precision_and_dtype.py`` asserts bounds derived from
the products' :math:`8u`).  Zero eigenvalues of the float64 model, such as the
cross-entropy :math:`G`'s null direction, may come out as small positive ones.

>>> import torch
>>> lin = torch.nn.Linear
>>> net = torch.nn.Sequential(lin(3, 4), torch.nn.Tanh(), lin(4, 2)).double()
>>> x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
>>> y = torch.arange(8) % 2
>>> K = KFACOperator(net, torch.nn.CrossEntropyLoss(), (x, y))
>>> K.shape, K.psd
((26, 26), True)
>>> dense = K.to_dense()
>>> bool(torch.allclose(torch.linalg.eigvalsh(dense), K.eigenvalues()))
True
>>> Kinv = K.inverse(1e-3)
>>> bool(torch.allclose(Kinv @ (K.damp(1e-3) @ torch.ones(26, dtype=torch.float64)),
...                     torch.ones(26, dtype=torch.float64)))
True
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from curvops._model_state import check_bn_mode
from curvops.configuration import ConfigurationState
from curvops.curvature import _refuse_non_finite_input, live_parameters
from curvops.data import Data, as_data, trailing_shapes
from curvops.diagonal import ggn_diagonal
from curvops.distributed import all_reduce_weighted, resolve_group, unwrap_model
from curvops.finiteness import each_finite, non_finite_parameters
from curvops.kronecker import (
    APPROXIMATIONS,
    FISHER_TYPES,
    LayerRecord,
    batch_statistics,
    check_choice,
    is_supported,
    record_grad_factor,
    record_input_factor,
    refuse_padding,
    rounding_floor,
    sqrt_or_one,
    zero_rounding,
)
from curvops.losses import LossFn, check_loss, loss_family, loss_reduction
from curvops.model_io import OutputFn, check_output_fn
from curvops.operator import CurvatureOperator, is_scalar
from curvops.params import select_params
from curvops.precision import accumulation_dtype
from curvops.snapshot import tensors_in
from curvops.validation import (
    ValidatedModes,
    Validation,
    checked_on_ranks,
    validated_on_ranks,
)
from spectral.errors import NumericalError, argument_error

__all__ = ["KFACOperator", "KroneckerBlock", "KroneckerEigenOperator", "KroneckerInverse"]


@dataclass(frozen=True)
class KroneckerBlock:
    """Where one Kronecker block sits: layer, parameters and the ``d_out x d`` index map.

    ``positions[i, j]`` is the index in the operator's vector of entry ``(i, j)`` of the
    block's matrix variable; ``part`` is ``"weight"``, ``"bias"`` or ``"joint"``.
    """

    layer: str
    module: nn.Module
    part: str
    names: tuple[str, ...]
    positions: torch.Tensor

    @property
    def rows(self) -> int:
        """:math:`d_G = d_{out}`."""
        return int(self.positions.shape[0])

    @property
    def cols(self) -> int:
        """:math:`d_A` (``d_in``, ``d_in + 1`` or 1)."""
        return int(self.positions.shape[1])


@dataclass(frozen=True)
class EigenBlock:
    """A block :math:`(U_G \\otimes U_A)\\operatorname{diag}(\\Lambda)(U_G \\otimes U_A)^\\top`."""

    U_G: torch.Tensor
    U_A: torch.Tensor
    values: torch.Tensor  # (d_G, d_A)
    lam_G: torch.Tensor | None = None  # K-FAC factor eigenvalues (for pi-damping)
    lam_A: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """:math:`n = d_G + d_A`, the ``size`` of :func:`curvops.kronecker.rounding_floor`."""
        return int(self.U_G.shape[0]) + int(self.U_A.shape[0])

    def to(self, dtype: torch.dtype) -> EigenBlock:
        """The block with every tensor rounded (or widened) to ``dtype``; itself if already."""
        if self.values.dtype == dtype:
            return self

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        return EigenBlock(
            self.U_G.to(dtype),
            self.U_A.to(dtype),
            self.values.to(dtype),
            cast(self.lam_G),
            cast(self.lam_A),
        )


def all_reduce_sums(
    sums: list[torch.Tensor | None],
    shapes: Sequence[tuple[int, ...]],
    count: float,
    group: Any,
    *,
    dtype: torch.dtype,
    device: torch.device,
    error: Exception | None = None,
    where: str = "K-FAC factors",
) -> tuple[list[torch.Tensor | None], float]:
    """Sum per-rank sums and the sample count over ``group`` with one ``all_reduce``.

    A sum a rank does not have (``None``: no batch of its shard reached that layer)
    enters as zeros with a flag; after the reduction an entry is ``None`` only if no
    rank had it.  With ``group=None`` the inputs are returned.  A rank whose own pass
    failed passes its ``error`` (and no sums): every rank stops at once, the others with
    a ``RuntimeError`` naming it (:func:`curvops.distributed.all_reduce_weighted`),
    instead of waiting in this reduction for the backend's timeout.

    >>> all_reduce_sums([torch.ones(2, 2), None], [(2, 2), (1, 1)], 3.0, None,
    ...                 dtype=torch.float64, device=torch.device("cpu"))[1]
    3.0
    """
    if group is None:
        if error is not None:
            raise error
        return sums, float(count)
    parts, flags = [], []
    for value, shape in zip(sums, shapes):
        flags.append(0.0 if value is None else 1.0)
        zeros = torch.zeros(math.prod(shape), dtype=dtype, device=device)
        parts.append(zeros if value is None else value.reshape(-1).to(dtype))
    parts.append(torch.tensor(flags, dtype=dtype, device=device))
    total, weight = all_reduce_weighted(
        torch.cat(parts), float(count), group, error=error, where=where
    )
    out: list[torch.Tensor | None] = []
    start = 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(total[start : start + size].reshape(shape).clone())
        start += size
    seen = total[start:]
    return [t if float(f) > 0 else None for t, f in zip(out, seen)], weight


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every module (by name, duplicates included) registering each parameter object."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module._parameters.values():
            if p is not None:
                entry = owners.setdefault(id(p), [])
                if all(m is not module for _, m in entry):
                    entry.append((name, module))
    return owners


def _kfac_parameter(
    module: nn.Module,
    attr: str,
    layer: str,
    owners: dict[int, list[tuple[str, nn.Module]]],
    offsets: dict[int, tuple[str, int, nn.Parameter]],
    remainder: str,
) -> torch.Tensor | None:
    """The layer's ``weight``/``bias`` for a Kronecker block, unless it is tied elsewhere.

    A parameter registered in another module too (a weight tied between an
    ``nn.Embedding`` and an output ``nn.Linear``, as in GPT) is also used outside this
    layer's calls, a use K-FAC's factors do not see: it is refused with
    ``remainder="error"`` and kept out of the block (in the exact remainder diagonal)
    with ``remainder="diagonal"``.
    """
    p = getattr(module, attr)
    if not isinstance(p, torch.Tensor):
        return None
    others = [name for name, m in owners.get(id(p), []) if m is not module]
    if not others or id(p) not in offsets:
        return p
    if remainder == "error":
        raise argument_error(
            "params",
            "parameters used only by their Linear/Conv2d layer for K-FAC (a tied parameter's "
            "other uses are not in the factors), or remainder='diagonal' (its exact "
            "diagonal instead of a Kronecker block)",
            f"{offsets[id(p)][0]!r} of layer {layer!r}, also registered in module(s) {others}",
        )
    return None


def _plan(
    model: nn.Module, named: list[tuple[str, nn.Parameter]], bias: str, remainder: str
) -> tuple[list[KroneckerBlock], torch.Tensor]:
    """Blocks of the supported layers and the vector positions of the other parameters."""
    offsets: dict[int, tuple[str, int, nn.Parameter]] = {}
    start = 0
    for name, p in named:
        offsets[id(p)] = (name, start, p)
        start += p.numel()
    blocks: list[KroneckerBlock] = []
    covered: set[int] = set()
    owners = _owners(model)
    for layer, module in model.named_modules():
        if not is_supported(module):
            continue
        w = _kfac_parameter(module, "weight", layer, owners, offsets, remainder)
        b = _kfac_parameter(module, "bias", layer, owners, offsets, remainder)
        wsel = offsets.get(id(w)) if w is not None else None
        bsel = offsets.get(id(b)) if b is not None else None
        if wsel is None and bsel is None:
            continue
        for owned in (w, b):
            if owned is not None and id(owned) in offsets:
                if id(owned) in covered:
                    raise argument_error(
                        "model", "parameters owned by one supported layer each", layer
                    )
                covered.add(id(owned))
        d_out = int(module.weight.shape[0])

        def index(sel: tuple[str, int, nn.Parameter], rows: int = d_out) -> torch.Tensor:
            _, off, p = sel
            return torch.arange(off, off + p.numel()).reshape(rows, -1)

        if wsel is not None and bsel is not None and bias == "joint":
            pos = torch.cat([index(wsel), index(bsel)], dim=1)
            blocks.append(KroneckerBlock(layer, module, "joint", (wsel[0], bsel[0]), pos))
            continue
        if wsel is not None:
            blocks.append(KroneckerBlock(layer, module, "weight", (wsel[0],), index(wsel)))
        if bsel is not None:
            blocks.append(KroneckerBlock(layer, module, "bias", (bsel[0],), index(bsel)))
    rest = [(name, off, p) for name, off, p in offsets.values() if id(p) not in covered]
    if rest and remainder == "error":
        raise argument_error(
            "params",
            "parameters of Linear/Conv2d layers (groups=1, zero symmetric padding; a "
            "subclass only with the class's own forward) only, or remainder='diagonal'",
            [name for name, _, _ in rest],
        )
    positions = [torch.arange(off, off + p.numel()) for _, off, p in rest]
    rem = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
    return blocks, rem


class KroneckerEigenOperator(CurvatureOperator):
    """Block-diagonal operator with Kronecker-eigenbasis blocks plus a diagonal remainder.

    Every block is :math:`(U_G \\otimes U_A)\\operatorname{diag}(\\operatorname{vec}\\Lambda)
    (U_G \\otimes U_A)^\\top` on the entries ``positions`` of the vector; the remaining
    entries ``remainder_positions`` are scaled by a diagonal.  Subclasses supply the
    blocks (:meth:`_eigen`, in the statistics' dtype) and the remainder
    (:meth:`remainder_diagonal`); the base gives the products, :meth:`eigen_blocks`,
    :meth:`eigenvalues`, :meth:`trace`, :meth:`logdet`, :meth:`inverse` and a structured
    :meth:`to_dense`.

    Low precision: the blocks are held in float32 for a bfloat16/float16 operator
    (:func:`curvops.precision.accumulation_dtype`; ``torch.linalg.eigh`` has no 16-bit
    kernels, and with bfloat16's :math:`\\varepsilon = 2^{-7}` the rounding floor
    :math:`(d_G + d_A)\\,\\varepsilon\\max|\\lambda|` of
    :func:`curvops.kronecker.rounding_floor` would reach :math:`\\max|\\lambda|` at
    :math:`d_G + d_A = 128`, float16's at 1024, zeroing every eigenvalue of the block); a
    product rotates, scales and rotates back in float32 and rounds the result once to
    the operator's dtype, and every query returns the operator's dtype (:meth:`trace`
    and :meth:`logdet` sum the float32 values).
    """

    def __init__(
        self,
        *,
        blocks: list[KroneckerBlock],
        remainder_positions: torch.Tensor,
        n: int,
        torch_dtype: torch.dtype,
        device: torch.device,
        psd: bool,
    ) -> None:
        super().__init__(
            shape=(n, n), torch_dtype=torch_dtype, device=device, symmetric=True, psd=psd
        )
        self._blocks = blocks
        self._flat_positions = [b.positions.reshape(-1).to(device) for b in blocks]
        self._remainder_positions = remainder_positions.to(device)

    @property
    def blocks(self) -> list[KroneckerBlock]:
        """The Kronecker blocks (layer, part, parameter names, positions)."""
        return list(self._blocks)

    @property
    def _statistics_dtype(self) -> torch.dtype:
        """The dtype the blocks are held and applied in: float32 for a 16-bit operator.

        :func:`curvops.precision.accumulation_dtype` of :attr:`torch_dtype` (float32 and
        float64 operators keep their own dtype).
        """
        return accumulation_dtype(self.torch_dtype)

    @abstractmethod
    def _eigen(self) -> list[EigenBlock]:
        """The eigendecomposition of every block, in :attr:`_statistics_dtype`."""

    def eigen_blocks(self) -> list[EigenBlock]:
        """The eigendecomposition of every block, in the order of :attr:`blocks`.

        In the operator's dtype: a bfloat16/float16 operator's float32 blocks rounded
        once (the operator computes with the float32 ones).
        """
        return [e.to(self.torch_dtype) for e in self._eigen()]

    @abstractmethod
    def remainder_diagonal(self) -> torch.Tensor:
        """The diagonal on the remainder positions (empty when there are none)."""

    # ------------------------------------------------------------------ products
    def _block_products(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """One function per block applying it to ``(k, d_G, d_A)`` (eigenbasis form)."""

        def apply(e: EigenBlock) -> Callable[[torch.Tensor], torch.Tensor]:
            def product(Xb: torch.Tensor) -> torch.Tensor:
                rotated = e.U_G.T @ Xb @ e.U_A
                return e.U_G @ (rotated * e.values) @ e.U_A.T

            return product

        return [apply(e) for e in self._eigen()]

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        """The blocks applied in :attr:`_statistics_dtype`, each result rounded once to ``X``'s."""
        k = X.shape[1]
        if k == 0:
            return X.new_empty(self.shape[0], 0)
        _refuse_non_finite_input(X)  # the exact operators' named error, not NaN out
        Y = torch.empty_like(X)
        products = self._block_products()
        wide = self._statistics_dtype
        for block, pos, product in zip(self._blocks, self._flat_positions, products):
            Xb = X.index_select(0, pos).T.reshape(k, block.rows, block.cols).to(wide)
            Y[pos] = product(Xb).reshape(k, -1).T.to(Y.dtype)
        if self._remainder_positions.numel():
            rem = self._remainder_positions
            Y[rem] = self.remainder_diagonal().unsqueeze(1) * X.index_select(0, rem)
        return Y

    # ------------------------------------------------------------------ exact queries
    def eigenvalues(self) -> torch.Tensor:
        """All :math:`P` eigenvalues in ascending order (from the factors; no products).

        Eigenvalues zero to working precision are exactly ``0.0``: those of a block
        with :math:`|\\lambda| \\le (d_G + d_A)\\,\\varepsilon\\max_{\\rm block}|\\lambda|` (and
        remainder entries with :math:`|d| \\le \\varepsilon\\max|d|`; see
        :func:`curvops.kronecker.rounding_floor`) are clamped to 0 in every query and
        product, since their computed values (:math:`\\pm 10^{-19}` for K-FAC,
        :math:`10^{-36}` for E-KFAC's sums of squares) are rounding noise.  The number of
        nonzero eigenvalues is the rank, :meth:`logdet` of a singular operator is
        ``-inf`` and its undamped :meth:`inverse` an error.  For a bfloat16/float16
        operator the blocks' eigenvalues are computed in float32, so their
        :math:`\\varepsilon` is float32's (the remainder's is that of the operator's dtype,
        in which :func:`curvops.ggn_diagonal` returns it), and they are returned rounded
        to the operator's dtype (a float16 eigenvalue beyond 65504 is ``inf``, one below
        :math:`6 \\cdot 10^{-8}` rounds to 0).

        >>> import torch
        >>> from curvops.kfac import KFACOperator
        >>> net = torch.nn.Linear(2, 2, bias=False).double()
        >>> x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        >>> K = KFACOperator(net, torch.nn.MSELoss(), (x, torch.zeros(1, 2, dtype=torch.float64)))
        >>> K.eigenvalues().tolist()
        [0.0, 0.0, 1.0, 1.0]
        """
        return torch.sort(self._values(self.torch_dtype)).values

    def _values(self, dtype: torch.dtype) -> torch.Tensor:
        """Every eigenvalue (blocks, then the remainder) in ``dtype``, unsorted."""
        parts = [e.values.reshape(-1).to(dtype) for e in self._eigen()]
        parts.append(self.remainder_diagonal().reshape(-1).to(dtype))
        return torch.cat(parts)

    def trace(self) -> float:
        """:math:`\\operatorname{tr}` of the operator (exact, from the structure).

        Summed from the blocks' values as computed (float32 for a bfloat16/float16
        operator), not from eigenvalues rounded to the operator's dtype.
        """
        total = sum(float(e.values.sum()) for e in self._eigen())
        return total + float(self.remainder_diagonal().sum())

    def logdet(self) -> float:
        """:math:`\\log\\det` (exact); ``-inf`` when an eigenvalue is <= 0 (singular).

        Eigenvalues zero to working precision count as 0 (see :meth:`eigenvalues`), so a
        singular operator gives ``-inf``, never the log of rounding noise.  The logs are
        taken in float64 of the values as computed (a bfloat16/float16 operator's float32
        eigenvalues, not their rounding to its dtype, which could underflow).
        """
        values = torch.sort(self._values(torch.float64)).values  # summed in ascending order
        if values.numel() and float(values.min()) <= 0.0:
            return -math.inf
        return float(torch.log(values).sum())

    def inverse(self, damping: float = 0.0, *, pi_damping: bool = False) -> KroneckerInverse:
        """:math:`(A + \\delta I)^{-1}` exactly, block by block (or the :math:`\\pi`-damped one).

        Parameters
        ----------
        damping:
            :math:`\\delta \\ge 0`; every damped eigenvalue :math:`\\lambda + \\delta` must
            exceed the rounding level of its block, :math:`(d_G + d_A)\\,\\varepsilon
            \\max|\\lambda + \\delta|` (:func:`curvops.kronecker.rounding_floor`; for the
            remainder :math:`\\varepsilon\\max|d + \\delta|`).  With ``0`` every eigenvalue must
            be positive: a singular operator (zero eigenvalues, :meth:`eigenvalues`) has no
            inverse, and no pseudo-inverse is substituted.
        pi_damping:
            Only for K-FAC: the heuristic factored damping
            :math:`(G + \\frac{\\sqrt\\delta}{\\pi})^{-1} \\otimes (A + \\pi\\sqrt\\delta)^{-1}`
            (Martens & Grosse 2015), which is not the inverse of :math:`A + \\delta I`.

        The returned operator follows this one: it recomputes from the current factors
        (and checks ``damping`` again when they change).  It has this operator's dtype;
        a bfloat16/float16 operator's inverse is formed and applied in float32 (the
        rounding levels of its blocks use float32's :math:`\\varepsilon`, see
        :meth:`eigenvalues`) and its products are rounded once to the operator's dtype.

        Raises
        ------
        ValueError
            Negative or non-finite ``damping``; ``pi_damping`` without K-FAC factors;
            a ``damping`` that leaves a damped eigenvalue zero to working precision
            (naming ``damping``; ``0`` on a singular operator), checked here on the
            current factors.
        """
        if not is_scalar(damping) or not np.isfinite(damping) or damping < 0:
            raise argument_error("damping", "a finite real number >= 0", damping)
        inverse = KroneckerInverse(self, float(damping), pi_damping=bool(pi_damping))
        inverse._eigen()  # a singular (damped) operator fails here, not on first use
        inverse.remainder_diagonal()
        return inverse

    def _dense_blocks(self) -> list[torch.Tensor]:
        out = []
        for e in self._eigen():
            U = torch.kron(e.U_G, e.U_A)
            out.append((U * e.values.reshape(-1)) @ U.T)
        return out

    def to_dense(self) -> torch.Tensor:
        """The :math:`P \\times P` matrix assembled from the blocks (no products).

        In the operator's dtype (16-bit: assembled in float32, rounded once).
        """
        n = self.shape[0]
        dense = torch.zeros(n, n, dtype=self.torch_dtype, device=self.device)
        for block, pos in zip(self._dense_blocks(), self._flat_positions):
            dense[pos.unsqueeze(1), pos.unsqueeze(0)] = ((block + block.T) / 2).to(dense.dtype)
        rem = self._remainder_positions
        if rem.numel():
            dense[rem, rem] = self.remainder_diagonal()
        return dense


class KroneckerInverse(KroneckerEigenOperator):
    """The damped inverse of a :class:`KroneckerEigenOperator` (see its :meth:`inverse`).

    Blocks :math:`(U_G \\otimes U_A)\\operatorname{diag}(1/(\\Lambda + \\delta))(\\cdot)^\\top`
    (or the :math:`\\pi`-damped factor inverses), remainder :math:`1/(d + \\delta)`.

    Parameters
    ----------
    base : KroneckerEigenOperator
        The K-FAC or E-KFAC operator.
    damping : float
        The damping :math:`\\delta \\ge 0`.
    pi_damping : bool
        Use the :math:`\\pi`-damped factor inverses (K-FAC only) instead of the exact inverse of
        the damped matrix.

    Raises
    ------
    ValueError
        (on a product, after the base's factors changed) Naming ``damping``, if a damped
        eigenvalue is not positive to working precision (see
        :meth:`KroneckerEigenOperator.inverse`).

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> from curvops import KFACOperator
    >>> K = KFACOperator(net, loss, (x, y))
    >>> Kinv = K.inverse(0.1)
    >>> type(Kinv).__name__, Kinv.shape
    ('KroneckerInverse', (26, 26))
    """

    def __init__(self, base: KroneckerEigenOperator, damping: float, *, pi_damping: bool) -> None:
        super().__init__(
            blocks=base.blocks,
            remainder_positions=base._remainder_positions,
            n=base.shape[0],
            torch_dtype=base.torch_dtype,
            device=base.device,
            psd=base.psd,
        )
        if pi_damping and not getattr(base, "supports_pi_damping", False):
            raise argument_error(
                "pi_damping", f"False for a {type(base).__name__} (K-FAC factors only)", True
            )
        self._base = base
        self.damping = damping
        self.pi_damping = pi_damping

    @property
    def base(self) -> KroneckerEigenOperator:
        """The operator being inverted."""
        return self._base

    def _check(self, values: torch.Tensor, floor: float, where: str) -> torch.Tensor:
        """``1 / values`` if every damped eigenvalue exceeds the rounding ``floor``.

        An eigenvalue at or below it (zero to working precision, or negative) would be
        inverted into a number of size :math:`1/\\varepsilon` or more made of rounding noise.
        """
        if values.numel() == 0 or bool((values > floor).all()):
            return 1.0 / values
        smallest = float(values.min())
        if self.damping == 0.0:
            expected = (
                f"a value > 0: the operator is singular (an eigenvalue of {where} is "
                f"{smallest:.3g}, zero to working precision: <= {floor:.3g}, the rounding "
                "level n * eps * max|lambda|), so it has no undamped inverse"
            )
        else:
            expected = (
                "a value making every damped eigenvalue positive to working precision (one "
                f"of {where} is {smallest:.3g} <= {floor:.3g}, the rounding level "
                "n * eps * max|lambda + damping|); increase the damping"
            )
        raise argument_error("damping", expected, self.damping)

    def _eigen(self) -> list[EigenBlock]:
        out = []
        root = math.sqrt(self.damping)
        for block, e in zip(self._blocks, self._base._eigen()):
            if self.pi_damping:
                if e.lam_G is None or e.lam_A is None:  # pragma: no cover - checked above
                    raise argument_error("pi_damping", "K-FAC factor eigenvalues", None)
                pi = sqrt_or_one(
                    (float(e.lam_A.sum()) / e.lam_A.numel())
                    / (float(e.lam_G.sum()) / e.lam_G.numel())
                )
                values = torch.outer(e.lam_G + root / pi, e.lam_A + pi * root)
            else:
                values = e.values + self.damping
            floor = max(rounding_floor(values, e.size), rounding_floor(e.values, e.size))
            inverted = self._check(values, floor, f"layer {block.layer!r}")
            out.append(EigenBlock(e.U_G, e.U_A, inverted))
        return out

    def remainder_diagonal(self) -> torch.Tensor:
        base = self._base.remainder_diagonal()
        values = base + self.damping
        floor = max(rounding_floor(values, 1), rounding_floor(base, 1))
        return self._check(values, floor, "the remainder")


def _checked_arguments(
    model: Any,
    loss_fn: Any,
    data: Any,
    params: Any,
    bn_mode: Any,
    output_fn: Any,
    choices: dict[str, str],
    sampling: tuple[Any, Any],
) -> tuple[nn.Module, Data, list[tuple[str, nn.Parameter]]]:
    """The arguments of :class:`KFACOperator` a rank checks alone (before the collective
    check): the unwrapped model, the data stream and the parameter selection."""
    if not isinstance(model, nn.Module):
        raise argument_error("model", "a torch.nn.Module", model, kind=TypeError)
    allowed = {
        "fisher": FISHER_TYPES,
        "approx": APPROXIMATIONS,
        "bias": ("separate", "joint"),
        "remainder": ("error", "diagonal"),
    }
    for name, value in choices.items():
        check_choice(name, value, allowed[name])
    _check_sampling(choices["fisher"], *sampling)
    _check_loss_family(loss_fn, choices["fisher"])
    check_loss(loss_fn)
    check_output_fn(output_fn)
    check_bn_mode(bn_mode)
    inner = unwrap_model(model)
    return inner, as_data(data), select_params(inner, params)


def _check_sampling(fisher: str, mc_samples: Any, seed: Any) -> None:
    """``mc_samples`` (an integer >= 1, 1 unless ``fisher="mc"``) and ``seed`` (an integer)."""
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise argument_error("mc_samples", "an integer >= 1", mc_samples)
    if fisher != "mc" and mc_samples != 1:
        raise argument_error("mc_samples", "1 unless fisher='mc'", mc_samples)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise argument_error("seed", "an integer", seed, kind=TypeError)


def _validated(
    model: nn.Module,
    loss_fn: Any,
    data: Data,
    params: Any,
    bn_mode: str | None,
    process_group: Any,
    settings: dict[str, Any],
    output_fn: OutputFn | None = None,
) -> Callable[[], Validation]:
    """Run the construction-time checks of every operator (finite parameters, inputs,
    targets and loss, named errors: :mod:`curvops.validation`) and K-FAC's own (no padded
    positions: :func:`curvops.kronecker.refuse_padding`); return them for reruns.

    With a process group the first run is agreed across ranks (one ``all_gather``), so
    that a rank whose checks fail, ranks that disagree (weights, ``settings``) or a job
    whose shards hold no counted target stop every rank, instead of leaving the others
    waiting in the factors' ``all_reduce`` or mixing different matrices.
    """

    operator = str(settings.get("operator", "K-FAC"))

    def refuse_padded() -> None:
        # padded positions would enter the input factors (refuse_padding): every in-memory
        # batch, a loader's first one here (each batch again in every pass, _passes)
        for batch in data if data.is_in_memory else [data.first_batch()]:
            refuse_padding(batch, operator)

    validation, construction_checks = validated_on_ranks(
        model,
        loss_fn,
        data,
        params=params,
        bn_mode=bn_mode,
        output_fn=output_fn,
        process_group=process_group,
        settings=settings,
        same_shapes=True,  # the factors average over each batch's positions
        extra_checks=refuse_padded,
    )
    validation.check_outputs_before_the_loss(operator)
    return construction_checks


def _check_loss_family(loss_fn: Any, fisher: str) -> None:
    """The type-2 and MC Fisher need a likelihood: cross-entropy, MSE or BCE with logits."""
    if fisher in ("type2", "mc") and loss_family(loss_fn) not in ("ce", "mse", "bce", "seq_ce"):
        raise argument_error(
            "loss_fn",
            f"CrossEntropyLoss, MSELoss, BCEWithLogitsLoss or "
            f"curvops.losses.sequence_cross_entropy for fisher={fisher!r} "
            "(use fisher='empirical' for other losses)",
            loss_fn,
        )


class KFACOperator(KroneckerEigenOperator):
    """K-FAC approximation of the GGN / Fisher of the mean loss over ``data``.

    Parameters
    ----------
    model:
        The ``nn.Module``; never changed.
    loss_fn:
        ``(outputs, targets) -> scalar`` with ``reduction="mean"`` or ``"sum"``;
        cross-entropy, MSE and BCE-with-logits for ``"type2"`` and ``"mc"``, any
        per-sample separable loss for ``"empirical"``.
    data:
        One ``(inputs, targets)`` batch, a sequence of batches or a DataLoader; for a
        mean loss batches are weighted by their sizes, for a summed loss the output
        factors add up (either way a list of batches equals their concatenation).
        Batches must not be padded: the input factor averages over every position a
        layer sees, so a 2-D padding mask among mapping inputs (``attention_mask``,
        ``decoder_attention_mask``, ``*_key_padding_mask``, ...) that marks a padded
        position is refused (a ``ValueError`` naming ``data``; an all-ones mask is
        fine).  Padding the operator cannot see (a mask the model builds from pad ids
        itself, a mask passed by position) would be counted: give batches of unpadded,
        equal-length sequences (grouped by length), or use the exact operators.
    fisher:
        ``"type2"`` (exact output Hessians: the K-FAC of the GGN), ``"mc"`` (``mc_samples``
        targets sampled per sample, seeded by ``(seed, batch index)``) or ``"empirical"``.
    approx:
        ``"expand"`` or ``"reduce"`` for layers with weight sharing (sequence dimensions
        of ``Linear`` inputs, ``Conv2d`` positions, repeated calls of one layer in a
        forward pass, which count as further positions); identical without weight sharing.
    params:
        Parameter selection (see :func:`curvops.params.select_params`).
    bn_mode:
        ``"train"``, ``"eval"`` or ``None`` (each module's current mode).
    bias:
        ``"separate"`` (weight block :math:`G\\otimes A` and bias block :math:`G`, as
        curvlinops' default) or ``"joint"`` (:math:`G\\otimes A` on ``[W, b]`` with the
        input extended by 1, Grosse & Martens).
    remainder:
        ``"error"`` (default): parameters in no supported layer are refused, and so are
        parameters of a supported layer that another module registers too (a weight
        tied between an ``nn.Embedding`` and an output ``nn.Linear``: its other use is
        not in the factors);
        ``"diagonal"``: they get the diagonal of the approximated matrix
        (:func:`curvops.ggn_diagonal`: exact GGN for ``"type2"``, the Monte-Carlo Fisher
        with the same targets for ``"mc"``, the empirical Fisher for ``"empirical"``).
    mc_samples, seed:
        Monte-Carlo targets per sample and their seed (``fisher="mc"``).
    process_group:
        As for the exact operators (:func:`curvops.distributed.resolve_group`): every
        rank holds its shard of the data (e.g. :func:`curvops.distributed.shard_batches`)
        and the factor sums and sample counts are summed over the group by one
        ``all_reduce``, so each rank gets the factors of the union of the shards, weighted
        as in one process (batches by their sizes :math:`N_b`; the remainder diagonal
        likewise).  ``None``: the default group when initialised; ``False``: local.
    share_with:
        A K-FAC or E-KFAC operator built with the same model, loss, data object and
        settings: this one then uses its factors, eigendecompositions and remainder
        (computed once for both, e.g. when grading ``kfac`` and ``ekfac`` together)
        instead of computing its own.
    output_fn:
        Selects the output the loss takes from a structured model output, as for the
        exact operators (:mod:`curvops.model_io`; default: the tensor, the ``"logits"``
        entry of a mapping or ``ModelOutput``, or the first element of a tuple); a
        0-dimensional selected output (a loss computed inside the model) is refused.

    Raises
    ------
    ValueError, TypeError
        Bad arguments, parameters outside supported layers with ``remainder="error"``.
    ValueError
        (on a product or any query of the factors) Naming ``model``: a layer module
        replaced, or a selected parameter missing or of another shape, dtype or device
        than at construction (``model.to(...)``; the exact operators' check): build a
        new operator.
    spectral.errors.NumericalError
        (on the first product) Non-finite factors, or a supported layer whose forward is
        never called (its parameters are used some other way).

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> K = KFACOperator(net, loss, (x, y))
    >>> K.shape, K.psd, abs(float(K.trace()) - float(K.eigenvalues().sum())) < 1e-10
    ((26, 26), True, True)
    >>> v = torch.randn(26, dtype=torch.float64)
    >>> bool(torch.allclose(K.inverse(0.1) @ (K @ v + 0.1 * v), v))  # the exact damped inverse
    True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        fisher: str = "type2",
        approx: str = "expand",
        params: Any = None,
        bn_mode: str | None = None,
        bias: str = "separate",
        remainder: str = "error",
        mc_samples: int = 1,
        seed: int = 0,
        process_group: Any = None,
        share_with: KFACOperator | None = None,
        output_fn: OutputFn | None = None,
    ) -> None:
        resolve_group(process_group)  # validates the argument early

        # a rank whose arguments fail here still joins the collective check below
        model, self._data, self._params = checked_on_ranks(
            lambda: _checked_arguments(
                model,
                loss_fn,
                data,
                params,
                bn_mode,
                output_fn,
                {"fisher": fisher, "approx": approx, "bias": bias, "remainder": remainder},
                (mc_samples, seed),
            ),
            process_group,
        )
        self.fisher, self.approx, self.bias, self.remainder = fisher, approx, bias, remainder
        self.process_group = process_group
        self._model, self._loss_fn, self._output_fn = model, loss_fn, output_fn
        self._bn_mode = bn_mode

        settings: dict[str, Any] = {"operator": type(self).__name__, "bn_mode": bn_mode}
        settings.update(fisher=fisher, approx=approx, bias=bias, remainder=remainder)
        construction_checks = _validated(
            model,
            loss_fn,
            self._data,
            params,
            bn_mode,
            process_group,
            {**settings, "mc_samples": mc_samples, "seed": seed},
            self._output_fn,
        )
        self._loss_state = ConfigurationState(loss_fn)  # the factors follow a changed loss
        self._loss_state.update()
        # parameters and buffers bitwise, attributes, hooks and modes of the model
        self._model_state = ConfigurationState(model)

        def recheck_loss() -> None:
            _check_loss_family(loss_fn, fisher)
            construction_checks()

        self._recheck_loss = recheck_loss
        # checked again in new train/eval modes
        self._validated_modes = ValidatedModes(model, construction_checks)
        self.mc_samples = mc_samples
        self.seed = seed
        blocks, rem = _plan(model, self._params, self.bias, self.remainder)
        self._names, self._shapes = self.param_names, [p.shape for _, p in self._params]
        first = self._params[0][1]
        super().__init__(
            blocks=blocks,
            remainder_positions=rem,
            n=sum(int(p.numel()) for _, p in self._params),
            torch_dtype=first.dtype,
            device=first.device,
            psd=True,
        )
        self._layers = list(dict.fromkeys(b.module for b in blocks))
        self._cache: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._source = data
        self._share = self._check_share(share_with)

    #: the heuristic pi-damped inverse is defined from the K-FAC factors
    supports_pi_damping = True

    # ------------------------------------------------------------------ attributes
    @property
    def model(self) -> nn.Module:
        """The model (never changed)."""
        return self._model

    @property
    def param_names(self) -> list[str]:
        """Names of the selected parameters, in vector order."""
        return [n for n, _ in self._params]

    @property
    def param_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the selected parameters, in vector order (the coordinates' layout)."""
        return [tuple(shape) for shape in self._shapes]

    @property
    def num_samples(self) -> int:
        """:math:`N`, the number of samples in ``data``."""
        return self._data.num_samples

    # ------------------------------------------------------------------ factors
    def _state_key(self) -> tuple[Any, ...]:
        """Changes whenever a parameter, a buffer, a mode or in-memory data changes.

        The model (parameters and buffers bitwise, the modules' attributes, hooks and
        modes) and the loss are compared with their last states
        (:class:`curvops.configuration.ConfigurationState`), so the factors follow every
        change of the model (an optimizer step, a ``.data`` edit, ``load_state_dict``, a
        reassigned ``Parameter``, ``model.temperature = 2.0``: contract 2) at a cost of
        :math:`O(P)` per product; a changed loss setting or class weight passes the
        construction checks again and renews the factors.
        In-memory batches are keyed on their storage and version counters: in-place
        edits are seen, edits through ``.data`` are not (a bitwise comparison would
        read all the data in every product, which costs more than the product
        itself; the data are a fixed set, contract 1).  A DataLoader is a fixed set.
        """
        self._validated_modes.ensure()
        self._model_state.update()
        self._loss_state.update(check=self._recheck_loss)
        key: list[Any] = [self._model_state.generation, self._loss_state.generation]
        if self._data.is_in_memory:
            for batch in self._data:
                key += [
                    (t.data_ptr(), t._version) for t in tensors_in((batch.inputs, batch.targets))
                ]
        return tuple(key)

    def _statistics(self) -> dict[str, Any]:
        """The factors (and the E-KFAC corrections of subclasses), cached per model state.

        First, before any cached factor is used or any is computed, the model is checked
        against the operator: replaced layer modules (:meth:`_check_modules`) and a
        selected parameter that went missing or changed shape, dtype or device
        (``model.to(torch.float64)``, :meth:`_live_params`) are refused with a
        ``ValueError`` naming ``model``.
        """
        self._check_modules()
        live = self._live_params()
        key = self._state_key()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        self._cache = None
        flags = each_finite(live)
        if not bool(flags.all()):
            raise non_finite_parameters(type(self).__name__, self.param_names, flags)
        stats = self._compute()
        self._cache = (key, stats)
        return stats

    def _live_params(self) -> list[nn.Parameter]:
        """The selected parameters as they are now, checked as the exact operators check them.

        :func:`curvops.curvature.live_parameters` on this operator's ``_names``,
        ``_shapes``, ``_model``, ``torch_dtype`` and ``device``: the operator is a matrix
        of fixed size, dtype and device, so a selected name that no longer names a
        parameter, or a parameter whose shape, dtype or device changed
        (``model.to(torch.float64)``, ``model.to(torch.bfloat16)``, ``model.to("cuda")``),
        raises the exact operators' ``ValueError`` naming ``model`` (build a new
        operator), not an error of mixed dtypes inside a product.
        """
        return live_parameters(
            self._model, self._names, self._shapes, self.torch_dtype, self.device
        )

    def _check_modules(self) -> None:
        """Refuse a model whose layers were replaced since the operator was built.

        The factors are collected by hooks on the layer objects the operator was built
        on; a replaced module (``model[3] = nn.Linear(...)``) would leave its layer
        without statistics.
        """
        modules = dict(self._model.named_modules())
        replaced = sorted({b.layer for b in self.blocks if modules.get(b.layer) is not b.module})
        if replaced:
            raise argument_error(
                "model",
                "the layer modules the operator was built on (build a new operator after "
                "replacing a module)",
                f"a model whose module(s) {replaced} were replaced or removed",
            )

    def _block_inputs(self, block: KroneckerBlock, a: torch.Tensor) -> torch.Tensor:
        """The rows ``(N, T, d_A)`` of ``block`` from the layer's input rows ``a``."""
        if block.part == "bias":
            return a.new_ones(a.shape[0], a.shape[1], 1)
        if block.part == "joint":
            return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        return a

    def _batch_factor_weight(self, size: float) -> float:
        """How output-side statistics of a batch of ``size`` terms are weighted.

        The batch statistics are those of the batch's loss.  A mean loss's are the mean
        over the batch, so batches are weighted by their sizes and the total divided by
        the number of terms (``size`` here, and for the total); a summed loss's add up
        (weight 1, total not divided): a list of batches then equals their
        concatenation in both cases.
        """
        return 1.0 if loss_reduction(self._loss_fn) == "sum" else float(size)

    def _passes(self, *, per_position: bool = False, probe_coupling: bool = False) -> Any:
        """Yield ``(batch, records)`` for every batch of ``data`` (see :func:`batch_statistics`).

        The factors average over samples and positions batch by batch, so batches must
        agree past the sample dimension: batches padded to their own lengths are refused
        (a ``ValueError`` naming ``data``), not averaged with per-batch position counts,
        and so are batches whose padding mask marks padded positions
        (:func:`curvops.kronecker.refuse_padding`).
        Every pass refuses a block parameter used outside its layer's forward
        (``ValueError`` naming ``model``, :class:`curvops.kronecker.ForeignUses`).
        ``probe_coupling`` probes the batches (one more backward column,
        :func:`batch_statistics`) up to the first one of two or more samples, and all of
        them if that one's samples are coupled: coupling is a property of the model and
        its modes, so a model without it pays for one column of one batch per pass.
        """
        reference: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        probe = probe_coupling
        for batch in self._data:
            shapes = trailing_shapes(batch)
            if reference is None:
                reference = shapes
            elif shapes != reference:
                raise argument_error(
                    f"data (batch {batch.index})",
                    f"input / target shapes {reference[0]} / {reference[1]} past the sample "
                    "dimension, those of batch 0 (K-FAC's factors average over the positions "
                    "of each batch: give batches of one length; padded positions cannot be "
                    "weighted by K-FAC either, the exact operators take both)",
                    f"{shapes[0]} / {shapes[1]}",
                )
            refuse_padding(batch, type(self).__name__)
            records = self._batch_records(
                batch,
                self._layers,
                per_position=per_position,
                probe_coupling=probe,
                watch=self._watched(),
            )
            if probe and batch.size > 1 and not any(record.coupled for record in records):
                probe = False
            yield batch, records

    def _watched(self) -> list[tuple[nn.Module, torch.Tensor]]:
        """``(layer, parameter)`` of every parameter in a Kronecker block."""
        watched = []
        for b in self._blocks:
            attrs = {"weight": ("weight",), "bias": ("bias",)}.get(b.part, ("weight", "bias"))
            for attr in attrs:
                p = getattr(b.module, attr, None)
                if isinstance(p, torch.Tensor):  # the current object (a reassigned Parameter)
                    watched.append((b.module, p))
        return watched

    def _batch_records(self, batch: Any, modules: Sequence[nn.Module], **options: Any) -> Any:
        """:func:`curvops.kronecker.batch_statistics` of one batch with this operator's settings."""
        return batch_statistics(
            self._model,
            self._loss_fn,
            batch,
            modules,
            fisher=self.fisher,
            mc_samples=self.mc_samples,
            seed=self.seed,
            bn_mode=self._bn_mode,
            device=self.device,
            dtype=self.torch_dtype,
            output_fn=self._output_fn,
            **options,
        )

    @staticmethod
    def _d_out(module: nn.Module) -> int:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0])

    def _add_grad_factor(
        self, G_sums: dict[nn.Module, torch.Tensor], record: LayerRecord, weight: float
    ) -> None:
        """Add :math:`\\sum_j` (the record's output-side factor of column j) x ``weight``.

        In :attr:`_statistics_dtype` (float32 for a 16-bit model: the model's gradient
        columns widened, their products and sums neither rounded to 8 or 11 bits nor
        overflowing float16's 65504).
        """
        module = record.module
        d_out = self._d_out(module)
        wide = self._statistics_dtype
        G = torch.zeros(d_out, d_out, dtype=wide, device=self.device)
        for g in record.grads:
            G.add_(record_grad_factor(record, g.to(wide), self.approx))
        G.mul_(weight)
        G_sums[module] = G_sums[module].add_(G) if module in G_sums else G

    #: factor columns (one per loss sample and column) whose layer-output gradients are
    #: kept at once for samples coupled by BatchNorm: memory ``budget`` tensor entries
    pullback_budget = 1 << 24

    def _pullback_records(
        self, batch: Any, coupled: list[LayerRecord], *, per_position: bool
    ) -> Iterator[LayerRecord]:
        r"""Records of the ``coupled`` layers with one column per loss sample and column.

        Samples coupled through train-mode BatchNorm: a column of loss sample :math:`n`
        reaches every sample :math:`m` of the layer (:math:`g^{(n,j)}_m \ne 0`), so one
        column over all loss samples would add the cross terms
        :math:`g^{(n,j)}_m g^{(n',j)\top}_m` of different loss samples, which depend on the
        choice of the factor :math:`S` and are not in the curvature.  One backward column
        per (loss sample, factor column) (:func:`curvops.kronecker.sample_factor_columns`),
        run for groups of samples whose gradients fit :attr:`pullback_budget` tensor
        entries, gives the definitions exactly: K-FAC's
        :math:`G = \sum_m [J_s^\top H J_s]_{mm}` and E-KFAC's :math:`\Lambda` from the
        pullbacks :math:`\sum_m \sum_t g^{(n,j)}_{m,t} a_{m,t}^\top`.
        """
        if not coupled:
            return
        modules = [record.module for record in coupled]
        columns = max(1, max(len(record.grads) for record in coupled))
        entries = sum(int(record.output.numel()) for record in coupled) * columns
        group = max(1, self.pullback_budget // max(entries, 1))
        for start in range(0, batch.size, group):
            stop = min(batch.size, start + group)
            yield from self._batch_records(
                batch, modules, per_position=per_position, sample_columns=(start, stop)
            )

    def _compute_factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The factors ``(As, Gs)`` of the blocks, in :attr:`_statistics_dtype`.

        The layers' inputs and gradient columns are the model's (its dtype); for a
        bfloat16/float16 model they are widened to float32 and the factors' products,
        weighted sums over batches (and ranks) and means computed in float32, so the
        factors are the float32-exact statistics of what the model computed: singular
        where they should be (to float32's rounding), a list of batches as accurate as
        one, no float16 overflow beyond 65504.  :meth:`factors` rounds them to the
        operator's dtype.
        """
        device, wide = self.device, self._statistics_dtype
        group = resolve_group(self.process_group)
        error: Exception | None = None
        try:
            A_sums, G_sums, seen, count = self._local_factor_sums()
        except Exception as exc:  # with a group: still join the reduction, every rank stops
            if group is None:
                raise
            A_sums, G_sums, seen, count, error = {}, {}, set(), 0, exc
        if group is not None:  # the sums of every rank's shard: one all_reduce
            with_a = [i for i, b in enumerate(self._blocks) if b.part != "bias"]
            shapes = [(self._blocks[i].cols, self._blocks[i].cols) for i in with_a]
            shapes += [(self._d_out(m),) * 2 for m in self._layers]
            sums = [A_sums.get(i) for i in with_a] + [G_sums.get(m) for m in self._layers]
            reduced, total = all_reduce_sums(
                sums, shapes, count, group, dtype=wide, device=device, error=error,
                where=f"{type(self).__name__}'s factors",
            )  # fmt: skip
            count = round(total)
            A_sums = {i: t for i, t in zip(with_a, reduced) if t is not None}
            G_sums = {m: t for m, t in zip(self._layers, reduced[len(with_a) :]) if t is not None}
            seen = set(G_sums)
        missing = [b.layer for b in self._blocks if b.module not in seen]
        if missing:
            raise NumericalError(
                f"K-FAC: the forward of layer(s) {sorted(set(missing))} was never called on the "
                "data (their parameters are used another way); exclude them with params= "
                "and use remainder='diagonal'"
            )
        for G in G_sums.values():
            G.div_(self._batch_factor_weight(count))
        As, Gs = [], []
        for i, block in enumerate(self._blocks):
            if block.part == "bias":
                A = torch.ones(1, 1, dtype=wide, device=device)
            else:
                A = A_sums[i].div_(count)
            G = G_sums[block.module]
            # a sum is finite iff every entry is (NaN and Inf propagate): one reduction
            if not (bool(torch.isfinite(A.sum())) and bool(torch.isfinite(G.sum()))):
                raise NumericalError(f"K-FAC: non-finite factor of layer {block.layer!r}")
            As.append(A)
            Gs.append(G)
        return As, Gs

    def _local_factor_sums(
        self,
    ) -> tuple[dict[int, torch.Tensor], dict[nn.Module, torch.Tensor], set[nn.Module], int]:
        """This process's factor sums ``(A_sums, G_sums, layers seen, sample count)``.

        In :attr:`_statistics_dtype`: a 16-bit model's layer inputs are widened first.
        """
        wide = self._statistics_dtype
        A_sums: dict[int, torch.Tensor] = {}
        G_sums: dict[nn.Module, torch.Tensor] = {}
        seen: set[nn.Module] = set()
        count = 0
        # the probe column finds the layers whose samples are coupled (train-mode BatchNorm
        # after them): their G takes one column per loss sample (_pullback_records)
        for batch, records in self._passes(probe_coupling=True):
            count += batch.size
            weight = self._batch_factor_weight(batch.size)
            for record in records:
                module = record.module
                seen.add(module)
                widened = record  # a 16-bit model's inputs in float32
                if record.inputs.dtype != wide:
                    widened = replace(record, inputs=record.inputs.to(wide))
                for i, block in enumerate(self._blocks):
                    if block.module is module and block.part != "bias":
                        ones = block.part == "joint"
                        term = record_input_factor(widened, self.approx, ones=ones)
                        A_sums[i] = A_sums[i].add_(term) if i in A_sums else term
                if not record.coupled:
                    self._add_grad_factor(G_sums, record, weight)
            coupled = [record for record in records if record.coupled]
            for record in self._pullback_records(batch, coupled, per_position=False):
                self._add_grad_factor(G_sums, record, weight)
        return A_sums, G_sums, seen, count

    def _remainder_values(self) -> torch.Tensor:
        rem = self._remainder_positions
        if not rem.numel():
            return torch.zeros(0, dtype=self.torch_dtype, device=self.device)
        covered = {n for b in self._blocks for n in b.names}
        names = [n for n, _ in self._params if n not in covered]
        return ggn_diagonal(
            self._model,
            self._loss_fn,
            self._data,
            method={"type2": "exact"}.get(self.fisher, self.fisher),
            mc_samples=self.mc_samples,
            seed=self.seed,
            params=names,
            bn_mode=self._bn_mode,
            process_group=self.process_group,
            output_fn=self._output_fn,
        ).to(self.device, self.torch_dtype)

    def _settings(self) -> tuple[Any, ...]:
        return (
            self.fisher,
            self.approx,
            self.bias,
            self.remainder,
            self.mc_samples,
            self.seed,
            self._bn_mode,
            self.param_names,
            self.torch_dtype,
            self.process_group,
            self._output_fn,
        )

    def _check_share(self, other: KFACOperator | None) -> KFACOperator | None:
        if other is None:
            return None
        if not isinstance(other, KFACOperator):
            raise argument_error(
                "share_with", "a KFACOperator or EKFACOperator", other, kind=TypeError
            )
        same = (
            other._model is self._model
            and other._loss_fn is self._loss_fn
            and other._source is self._source
            and other._settings() == self._settings()
        )
        if not same:
            raise argument_error(
                "share_with",
                "an operator on the same model, loss and data object with the same settings "
                "(fisher, approx, bias, remainder, mc_samples, seed, bn_mode, params, dtype, "
                "process_group, output_fn)",
                other,
            )
        return other._share if other._share is not None else other

    #: whether :meth:`_compute` needs the factors' eigendecompositions (E-KFAC)
    _needs_eigen = False

    def _compute(self) -> dict[str, Any]:
        if self._share is not None:  # the factors of an operator with the same settings
            source = self._share._statistics()
            if self._needs_eigen:
                self._kfac_eigen(source)  # kept in the source's cache: computed once for both
            keys = ("A", "G", "remainder", "kfac_eigen")
            return {key: source[key] for key in keys if key in source}
        As, Gs = self._compute_factors()
        # remainder entries zero to working precision are 0 (see eigenvalues)
        return {"A": As, "G": Gs, "remainder": zero_rounding(self._remainder_values(), 1)}

    @staticmethod
    def _kfac_eigen(stats: dict[str, Any]) -> list[EigenBlock]:
        """The factors' eigendecompositions, computed on first use and kept with them.

        The block's eigenvalues :math:`\\lambda_{G,i}\\lambda_{A,j}` within
        :math:`(d_G + d_A)\\,\\varepsilon\\max|\\lambda|` of 0 are set to 0
        (:func:`curvops.kronecker.zero_rounding`): a singular factor's null eigenvalues
        come out of ``eigh`` as rounding noise of either sign.

        The factors are in :attr:`_statistics_dtype` (float32 for a bfloat16/float16
        model, whose dtypes ``eigh`` has no kernels for), and so are the
        eigendecompositions and :math:`\\varepsilon`: the factors are float32 statistics
        (:meth:`_compute_factors`), and bfloat16's :math:`\\varepsilon = 2^{-7}` would make
        :math:`(d_G + d_A)\\,\\varepsilon \\ge 1` from :math:`d_G + d_A = 128` on, zeroing
        every eigenvalue of the block.
        """
        if "kfac_eigen" not in stats:
            eig = []
            for A, G in zip(stats["A"], stats["G"]):
                lam_A, U_A = torch.linalg.eigh(A)
                lam_G, U_G = torch.linalg.eigh(G)
                size = int(G.shape[0]) + int(A.shape[0])
                values = zero_rounding(torch.outer(lam_G, lam_A), size)
                eig.append(EigenBlock(U_G, U_A, values, lam_G, lam_A))
            stats["kfac_eigen"] = eig
        eigen: list[EigenBlock] = stats["kfac_eigen"]
        return eigen

    def factors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The Kronecker factors ``(G, A)`` of every block (in the order of :attr:`blocks`).

        In the operator's dtype: a bfloat16/float16 model's float32 factors
        (:meth:`_compute_factors`) rounded once.
        """
        stats, dtype = self._statistics(), self.torch_dtype
        return [(G.to(dtype), A.to(dtype)) for G, A in zip(stats["G"], stats["A"])]

    def _eigen(self) -> list[EigenBlock]:
        return self._kfac_eigen(self._statistics())

    def remainder_diagonal(self) -> torch.Tensor:
        values: torch.Tensor = self._statistics()["remainder"]
        return values

    def _block_products(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        stats = self._statistics()

        def apply(G: torch.Tensor, A: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda Xb: G @ Xb @ A

        return [apply(G, A) for G, A in zip(stats["G"], stats["A"])]

    def _dense_blocks(self) -> list[torch.Tensor]:
        stats = self._statistics()
        return [torch.kron(G, A) for G, A in zip(stats["G"], stats["A"])]

    def trace(self) -> float:
        """:math:`\\sum \\operatorname{tr}G\\operatorname{tr}A` (+ the remainder's trace).

        From the factors as computed (float32 for a bfloat16/float16 model).
        """
        stats = self._statistics()
        pairs = zip(stats["G"], stats["A"])
        total = sum(float(torch.trace(G)) * float(torch.trace(A)) for G, A in pairs)
        return total + float(self.remainder_diagonal().sum())
