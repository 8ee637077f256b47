"""curvops: curvature matrices of PyTorch models as composable scipy LinearOperators."""

from __future__ import annotations

# --- operator base, algebra, structured operators, inverse (operator.py, algebra.py, structured.py, inverse.py) ---

# --- curvature operators (hessian.py, ggn.py, fisher.py, ...) ---

__all__: list[str] = []
