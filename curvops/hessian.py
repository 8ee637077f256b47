"""The Hessian of the mean loss as a linear operator.

.. math::
    H = \\nabla^2_w \\frac{1}{N}\\sum_{n} \\ell(f(x_n; w), y_n)
      = \\frac{1}{N}\\sum_b N_b\\, \\nabla^2_w L_b(w),

both terms of the paper's Eq. 3 (the GGN plus the output-gradient-weighted
Hessians of the network outputs).  Symmetric, indefinite in general.

Products use double backward (measured faster than forward-over-reverse on CPU,
see :mod:`curvops.products`) through a gradient graph recorded with the lean
second-derivative kernels of :mod:`curvops.lean_ops`.  With a single batch (and,
with ``cache=True``, with a list of batches) the gradient graph of each batch is
built once and reused while the parameters, buffers, modes and batch tensors are
unchanged, so a Lanczos step costs one backward pass through it.  The columns of a
matmat share the forward pass and the gradient graph of every batch.

>>> import torch
>>> net = torch.nn.Linear(2, 1).double()
>>> x, y = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
>>> H = HessianOperator(net, torch.nn.MSELoss(), (x, y))
>>> H.shape
(3, 3)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from curvops.curvature import ModelCurvatureOperator
from curvops.data import Batch
from curvops.losses import LossFn
from curvops.model_io import OutputFn
from curvops.products import HessianLinearization, hessian_linearization

__all__ = ["HessianOperator"]


class HessianOperator(ModelCurvatureOperator):
    """Hessian of the mean loss over ``data`` with respect to the selected parameters.

    Parameters
    ----------
    model, loss_fn, data, params, bn_mode, progress, process_group, output_fn:
        See :class:`curvops.curvature.ModelCurvatureOperator`.
    cache:
        Keep each batch's gradient graph between products, so that a product costs
        one backward pass per batch instead of forward + gradient + backward
        (measured 1.40 vs 2.45 gradient-times on a 151k-parameter BatchNorm CNN, 8
        batches of 32 CIFAR-shaped images; 1.96 vs 3.20 on PreResNet8, 8 x 16;
        ``benchmarks/README.md``).
        Memory: one double-backward graph (the activations of the forward and of
        the gradient pass) per batch, i.e. with a list of batches the graphs of the
        whole data set are held at once -- what batching usually exists to avoid
        (that CNN: +330 MiB held vs +100 MiB without the cache).
        Default (None): True for one batch, False for a sequence of batches (pass
        ``cache=True`` when every batch's graph fits in memory together).  Never
        applied to a DataLoader (``cache=True`` is ignored there): its batches are
        fresh tensors on every pass and could reuse memory addresses, which would
        make stale graphs look valid.  The cache is invalidated by any change of
        parameters, buffers, train/eval flags or batch tensors (in place included,
        also through ``.data``: each cached batch is compared bitwise with a copy kept
        beside its graph).
    lean_kernels:
        Record the gradient graph with :func:`curvops.lean_ops.lean_double_backward`
        (default): convolutions, eval-mode BatchNorm, ReLU and 2-D max pooling get
        second derivatives from the dedicated kernels without materialised zeros
        (single-batch product 1.0-1.3 gradient-times against 2.0-2.6 with PyTorch's
        formulas, a 151k-parameter CIFAR-shaped CNN in eval mode, batch 256, one CPU
        thread).  The same derivatives up to rounding; ``False`` uses PyTorch's own
        double-backward formulas everywhere.  A forward that takes a gradient itself
        (physics-informed networks, gradient penalties) needs third derivatives: the
        lean kernels give them exactly (LayerNorm's backward then runs as primitive
        operations), while PyTorch's own LayerNorm and train-mode BatchNorm third
        derivatives are wrong, so ``False`` is refused there
        (:func:`curvops.derivative_repairs.check_third_derivatives`).

    Contracts: one fixed matrix (loaders replayed or refused, no randomness during
    products), the model as it is now, nothing of the model changes; see
    :class:`curvops.curvature.ModelCurvatureOperator`.

    Raises
    ------
    ValueError, TypeError
        Bad data, parameters, ``bn_mode`` or a loss without mean reduction.
    spectral.errors.NumericalError
        A product with NaN/Inf (names the batch).

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> H = HessianOperator(net, loss, [(x[:5], y[:5]), (x[5:], y[5:])])  # two batches
    >>> from curvops.testing import dense_hessian
    >>> v = torch.randn(H.shape[0], dtype=torch.float64)
    >>> bool(torch.allclose(H @ v, dense_hessian(net, loss, (x, y)) @ v))  # weighted by size
    True
    >>> type(H @ v.numpy()).__name__   # numpy in, numpy out
    'ndarray'
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        params: Any = None,
        bn_mode: str | None = None,
        progress: bool = False,
        process_group: Any = None,
        cache: bool | None = None,
        lean_kernels: bool = True,
        output_fn: OutputFn | None = None,
    ) -> None:
        super().__init__(
            model,
            loss_fn,
            data,
            params=params,
            bn_mode=bn_mode,
            progress=progress,
            process_group=process_group,
            psd=False,
            output_fn=output_fn,
        )
        self._configure_cache(cache, lean_kernels)

    def linearization(self, batch: Batch) -> HessianLinearization:
        """The gradient graph of ``batch`` (cached per batch index when ``cache`` is on).

        Call inside :func:`curvops._model_state.curvature_mode`.
        """

        def build() -> HessianLinearization:
            inputs, targets = self._batch_on_device(batch)
            return hessian_linearization(
                self._loss_of_fn(inputs, targets),
                self.current_params(),
                lean_kernels=self._lean_kernels,
            )

        return self._cached(batch, build)

    def _batch_matmat(self, batch: Batch, V: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.linearization(batch).apply(V)
