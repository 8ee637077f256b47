"""curvops: curvature matrices of PyTorch models as composable scipy LinearOperators."""

from __future__ import annotations

# --- operator base, algebra, structured operators, inverse (operator, algebra, structured) ---
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
from curvops.inverse import InverseOperator, SolveInfo, inverse
from curvops.operator import CurvatureOperator
from curvops.structured import Dense, Diagonal, Identity, LowRank

# --- curvature operators (hessian.py, ggn.py, fisher.py, ...) ---
from curvops import distributed, stats, testing  # distributed: torch.distributed data parallelism
from curvops.blocks import per_layer
from curvops.curvature import ModelCurvatureOperator
from curvops.diagonal import ggn_diagonal
from curvops.distributed import shard_batches
from curvops.fisher import FisherOperator
from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.stats import LossStats, loss_stats

__all__: list[str] = [
    # operator base, algebra, structured operators, inverse
    "Adjoint",
    "Affine",
    "BlockDiagonal",
    "CurvatureOperator",
    "Dense",
    "Diagonal",
    "Identity",
    "InverseOperator",
    "LowRank",
    "Power",
    "Product",
    "Projected",
    "Scaled",
    "SolveInfo",
    "Sum",
    "inverse",
    # curvature operators
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "LossStats",
    "ModelCurvatureOperator",
    "distributed",
    "ggn_diagonal",
    "loss_stats",
    "per_layer",
    "shard_batches",
    "stats",
    "testing",
]
