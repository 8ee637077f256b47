"""curvops: curvature matrices of PyTorch models as composable scipy LinearOperators.

:class:`HessianOperator`, :class:`GGNOperator` and :class:`FisherOperator` are
``scipy.sparse.linalg.LinearOperator`` instances backed by curvature-vector
products on the model's device; they compose (``+``, ``-``, ``*``, ``@``, ``**``,
``shift``, ``damp``, ``deflate``) and drop into ``eigsh``, ``lobpcg``, ``cg``,
``minres`` and :mod:`spectral`.
"""

from __future__ import annotations

from curvops import distributed, stats, testing  # distributed: torch.distributed data parallelism
from curvops.algebra import (
    Adjoint,
    Affine,
    BlockDiagonal,
    Power,
    Product,
    Projected,
    Scaled,
    Sum,
)
from curvops.blocks import per_layer
from curvops.curvature import ModelCurvatureOperator
from curvops.diagonal import ggn_diagonal
from curvops.distributed import shard_batches
from curvops.ekfac import EKFACOperator
from curvops.fisher import FisherOperator
from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.inverse import InverseOperator, SolveInfo, inverse
from curvops.kfac import KFACOperator, KroneckerInverse
from curvops.lean_ops import lean_double_backward
from curvops.operator import CurvatureOperator
from curvops.stats import LossStats, loss_stats
from curvops.structured import Dense, Diagonal, Identity, LowRank

__all__: list[str] = [
    "Adjoint",
    "Affine",
    "BlockDiagonal",
    "CurvatureOperator",
    "Dense",
    "Diagonal",
    "EKFACOperator",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "Identity",
    "InverseOperator",
    "KFACOperator",
    "KroneckerInverse",
    "LossStats",
    "LowRank",
    "ModelCurvatureOperator",
    "Power",
    "Product",
    "Projected",
    "Scaled",
    "SolveInfo",
    "Sum",
    "distributed",
    "ggn_diagonal",
    "inverse",
    "lean_double_backward",
    "loss_stats",
    "per_layer",
    "shard_batches",
    "stats",
    "testing",
]
