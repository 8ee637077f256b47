"""curvops: curvature matrices of PyTorch models as composable scipy LinearOperators.

:class:`HessianOperator`, :class:`GGNOperator` and :class:`FisherOperator` are
``scipy.sparse.linalg.LinearOperator`` instances backed by curvature-vector
products on the model's device; they compose (``+``, ``-``, ``*``, ``@``, ``**``,
``shift``, ``damp``, ``deflate``) and drop into ``eigsh``, ``lobpcg``, ``cg``,
``minres`` and :mod:`spectral`.
"""

from __future__ import annotations

from curvops import (  # distributed: torch.distributed data parallelism
    distributed,
    stats,
    structure,
    testing,
)
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
from curvops.blocks import per_block, per_layer, transformer_blocks
from curvops.comparison import ApproximationReport, compare, compare_all
from curvops.curvature import ModelCurvatureOperator
from curvops.diagonal import ggn_diagonal
from curvops.distributed import shard_batches
from curvops.ekfac import EKFACOperator
from curvops.fisher import FisherOperator
from curvops.ggn import GGNOperator
from curvops.hessian import HessianOperator
from curvops.kfac import KFACOperator, KroneckerInverse
from curvops.lean_ops import lean_double_backward
from curvops.operator import CurvatureOperator
from curvops.proxies import diagonal_approximation, diagonal_of, layer_blocks, low_rank
from curvops.solvers import InverseOperator, SolveInfo, inverse
from curvops.stats import LossStats, loss_stats
from curvops.structured import Dense, Diagonal, Identity, LowRank

__all__: list[str] = [
    "Adjoint",
    "Affine",
    "ApproximationReport",
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
    "compare",
    "compare_all",
    "diagonal_approximation",
    "diagonal_of",
    "distributed",
    "ggn_diagonal",
    "inverse",
    "layer_blocks",
    "lean_double_backward",
    "loss_stats",
    "low_rank",
    "per_block",
    "per_layer",
    "shard_batches",
    "stats",
    "structure",
    "testing",
    "transformer_blocks",
]
