"""The shared base of model curvature operators: data looping, weighting, parameters.

A :class:`ModelCurvatureOperator` represents a curvature matrix of the mean loss
over every sample in ``data``,

.. math::
    A = \\frac{1}{N} \\sum_b N_b\\, A_b,

where :math:`A_b` is the curvature of the batch-mean loss :math:`L_b` (size
:math:`N_b`).  Subclasses implement one per-batch method, :meth:`_batch_matmat`;
the base owns the loop (:meth:`_accumulate`, the single place where the size-weighted
sum and the total weight are formed, and where an optional process group reduces
them with one ``all_reduce`` per product), the model modes
(:func:`curvops._model_state.curvature_mode`), device/dtype moves, non-finite checks
and the vector <-> parameter maps.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from curvops._model_state import check_bn_mode, curvature_mode, functional_forward
from curvops.data import Batch, Data, _first_tensor, as_data, move_to
from curvops.distributed import all_reduce_weighted, resolve_group, unwrap_model
from curvops.losses import LossFn, check_loss
from curvops.model_io import OutputFn, check_output_fn
from curvops.operator import CurvatureOperator
from curvops.params import flatten_columns, select_params, unflatten_columns
from curvops.products import OutputCurvature, jacobian_graph, jacobian_sandwich_matmat
from spectral.errors import NumericalError, argument_error

__all__ = ["ModelCurvatureOperator"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ModelCurvatureOperator(CurvatureOperator):
    """Base class of :class:`~curvops.HessianOperator`, :class:`~curvops.GGNOperator`, ...

    Parameters
    ----------
    model:
        The ``nn.Module``; never changed (see :mod:`curvops._model_state`).
    loss_fn:
        ``(outputs, targets) -> scalar`` with ``reduction="mean"``.
    data:
        One ``(inputs, targets)`` batch, a sequence of batches or a DataLoader.
    params:
        Parameter selection (see :func:`curvops.params.select_params`).
    bn_mode:
        ``"train"``, ``"eval"`` or ``None`` (each module's current mode).
    progress:
        Show a tqdm bar over batches for each product.
    process_group:
        Data parallelism (see :mod:`curvops.distributed`): each rank holds its own
        shard of ``data`` (e.g. :func:`curvops.distributed.shard_batches`) and each
        product's weighted sum and total weight are summed over the group with one
        ``all_reduce``.  ``None`` (default): the default group when
        ``torch.distributed`` is initialised with several processes, otherwise no
        communication; ``False``: never communicate; or a ``ProcessGroup``.  Every
        rank of the group must then make the same products.  A model wrapped in
        ``DistributedDataParallel`` is unwrapped (products use ``model.module`` and
        never trigger DDP's hooks).
    psd:
        Structure flag passed to the base class.
    output_fn:
        Which tensor of the model's output the loss takes (see
        :mod:`curvops.model_io`): ``None`` for a tensor output, the ``logits`` of a
        dict or Hugging Face ``ModelOutput``, or the first item of a tuple; or a
        callable ``output -> tensor``.
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
        psd: bool = False,
        output_fn: OutputFn | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise argument_error("model", "a torch.nn.Module", model, kind=TypeError)
        model = unwrap_model(model)
        resolve_group(process_group)  # validates the argument early
        self._model = model
        self._loss_fn = check_loss(loss_fn)
        self._output_fn = check_output_fn(output_fn)
        self._data: Data = as_data(data)
        self._bn_mode = check_bn_mode(bn_mode)
        self._params = select_params(model, params)
        self._names = [n for n, _ in self._params]
        self._shapes = [p.shape for _, p in self._params]
        self._progress = bool(progress)
        self.process_group = process_group
        first = self._params[0][1]
        n = sum(int(p.numel()) for _, p in self._params)
        super().__init__(
            shape=(n, n),
            torch_dtype=first.dtype,
            device=first.device,
            symmetric=True,
            psd=psd,
        )

    # ------------------------------------------------------------------ public attributes
    @property
    def model(self) -> nn.Module:
        """The model (never changed by products)."""
        return self._model

    @property
    def loss_fn(self) -> LossFn:
        """The loss function."""
        return self._loss_fn

    @property
    def data(self) -> Data:
        """The normalised data stream."""
        return self._data

    @property
    def params(self) -> list[tuple[str, nn.Parameter]]:
        """The selected ``(name, parameter)`` pairs, in vector order."""
        return list(self._params)

    @property
    def param_names(self) -> list[str]:
        """Names of the selected parameters, in vector order."""
        return list(self._names)

    @property
    def num_params(self) -> int:
        """:math:`P`, the length of the vectors the operator acts on."""
        return self.shape[0]

    @property
    def num_samples(self) -> int:
        """:math:`N`, the total number of samples in ``data``."""
        return self._data.num_samples

    @property
    def bn_mode(self) -> str | None:
        """The BatchNorm mode used in products."""
        return self._bn_mode

    # ------------------------------------------------------------------ vector maps
    def vector_to_params(self, v: Any) -> list[torch.Tensor]:
        """Split a length-P vector (numpy or torch) into tensors shaped like the parameters.

        Raises
        ------
        ValueError
            If ``v`` does not have ``P`` entries.
        """
        t = torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
        if t.ndim != 1 or t.shape[0] != self.num_params:
            raise argument_error("v", f"a vector of length {self.num_params}", v)
        t = t.to(device=self.device, dtype=self.torch_dtype)
        return [part[0] for part in unflatten_columns(t.reshape(-1, 1), self._shapes)]

    def params_to_vector(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors shaped like the parameters into a length-P vector.

        Raises
        ------
        ValueError
            If the number or shapes of ``tensors`` do not match the parameters.
        """
        tensors = list(tensors)
        if len(tensors) != len(self._shapes) or any(
            tuple(t.shape) != tuple(s) for t, s in zip(tensors, self._shapes)
        ):
            raise argument_error(
                "tensors", f"{len(self._shapes)} tensors of shapes {self._shapes}", tensors
            )
        return torch.cat([t.reshape(-1) for t in tensors]).to(self.device, self.torch_dtype)

    # ------------------------------------------------------------------ helpers for subclasses
    def current_params(self) -> list[torch.Tensor]:
        """The selected parameters' current values (detached, sharing storage)."""
        return [p.detach() for _, p in self._params]

    def _batch_on_device(self, batch: Batch) -> tuple[Any, torch.Tensor]:
        inputs = move_to(batch.inputs, self.device, self.torch_dtype)
        targets = move_to(batch.targets, self.device, self.torch_dtype)
        return inputs, targets

    def _forward_fn(self, inputs: Any) -> Any:
        model, names, output_fn = self._model, self._names, self._output_fn

        def forward(tensors: list[torch.Tensor]) -> torch.Tensor:
            return functional_forward(model, names, tensors, inputs, output_fn)

        return forward

    def _loss_of_fn(self, inputs: Any, targets: torch.Tensor) -> Any:
        forward, loss_fn = self._forward_fn(inputs), self._loss_fn

        def loss_of(tensors: list[torch.Tensor]) -> torch.Tensor:
            return loss_fn(forward(tensors), targets)

        return loss_of

    def _configure_cache(self, cache: bool | None, lean_kernels: bool = True) -> None:
        """Per-batch graph cache: on for one batch by default, never for a DataLoader.

        A DataLoader's batches are fresh tensors on every pass and could reuse memory
        addresses, which would make stale graphs look valid.  ``lean_kernels``: record
        the graphs with :func:`curvops.lean_ops.lean_double_backward`.
        """
        self._lean_kernels = bool(lean_kernels)
        wanted = self._data.is_single_batch if cache is None else bool(cache)
        self._cache_enabled = wanted and self._data.is_in_memory
        self._graph_cache: dict[int, tuple[tuple[Any, ...], Any]] = {}

    def _cached(self, batch: Batch, build: Callable[[], T], *, always: bool = False) -> T:
        """``build()`` for ``batch``, reused while :meth:`_state_key` is unchanged.

        Call :meth:`_configure_cache` first.  With the cache off, builds every time,
        unless ``always`` (an object that only pays off when kept, e.g. a trace).
        """
        if not (self._cache_enabled or always):
            return build()
        key = self._state_key(batch)
        hit = self._graph_cache.get(batch.index)
        if hit is not None and hit[0] == key:
            return cast(T, hit[1])
        self._graph_cache.pop(batch.index, None)  # free the stale graph before building anew
        value = build()
        self._graph_cache[batch.index] = (key, value)
        return value

    def _sandwich_matmat(
        self,
        batch: Batch,
        inputs: Any,
        V: list[torch.Tensor],
        output_curvature: OutputCurvature,
    ) -> list[torch.Tensor]:
        """:math:`J^\\top Q J\\, V` on ``batch``: cached graphs or one fresh forward pass.

        With the cache on (:meth:`_configure_cache`), the forward and :math:`J^\\top u`
        graphs of :func:`curvops.products.jacobian_graph` (recorded with the lean
        kernels unless ``self._lean_kernels`` is False); otherwise
        :func:`curvops.products.jacobian_sandwich_matmat`.  ``output_curvature``
        must depend on nothing but the batch and what :meth:`_state_key` covers.
        """
        if not self._cache_enabled:
            return jacobian_sandwich_matmat(
                self._forward_fn(inputs), self.current_params(), V, output_curvature
            )
        graph = self._cached(
            batch,
            lambda: jacobian_graph(
                self._forward_fn(inputs),
                self.current_params(),
                output_curvature,
                lean_kernels=self._lean_kernels,
            ),
        )
        return graph.apply(V)

    def _state_key(self, batch: Batch) -> tuple[Any, ...]:
        """Changes whenever parameters, buffers, modes or the batch tensors change."""
        versions = [p._version for p in self._model.parameters()]
        versions += [b._version for b in self._model.buffers()]
        flags = [m.training for m in self._model.modules()]
        tensors = [t for t in (batch.inputs, batch.targets) if isinstance(t, torch.Tensor)]
        kind = self.device.type  # a graph recorded under torch.autocast is not reused outside
        autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        return (
            autocast,
            tuple(versions),
            tuple(flags),
            tuple(p.data_ptr() for p in self._model.parameters()),
            tuple((t.data_ptr(), t._version) for t in tensors),
        )

    def _batches(self) -> Iterable[Batch]:
        if not self._progress:
            return self._data
        from tqdm.auto import tqdm

        return tqdm(self._data, desc=type(self).__name__, leave=False)

    # ------------------------------------------------------------------ the product
    @abstractmethod
    def _batch_matmat(self, batch: Batch, V: list[torch.Tensor]) -> list[torch.Tensor]:
        """Curvature of the batch-mean loss of ``batch`` applied to ``V`` (``(k, *shape)`` list)."""

    def _diagnose(self, batch: Batch | None) -> str:
        """Where a non-finite product comes from (parameters or inputs), for the error message.

        ``batch`` is None for streamed data (a DataLoader), whose batches are not
        re-read: only the parameters are checked then.
        """
        bad = [name for name, p in self._params if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            return f"; non-finite values in parameter(s) {bad[:5]}"
        if batch is None:
            return ""
        first = _first_tensor(batch.inputs)
        if first is not None and first.is_floating_point() and not bool(first.isfinite().all()):
            return "; the inputs of this batch contain NaN or Inf"
        return ""

    def _accumulate(self, V: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Return :math:`(\\sum_b N_b A_b V,\\ \\sum_b N_b)` over this process's data.

        With a process group (and torch.distributed initialised) both are summed over
        the group by a single ``all_reduce``.

        The finiteness of every batch product is checked on the device: the index of
        the first non-finite batch is kept in a device scalar and read once after the
        loop, so a product costs one host synchronisation for the check, not one per
        batch (the later batches are still computed when one fails).

        Raises
        ------
        NumericalError
            If a batch product is not finite (the message names the first such batch).
        """
        acc: torch.Tensor | None = None
        weight = 0
        sizes: dict[int, int] = {}
        first_bad: torch.Tensor | None = None  # device int64: first bad batch index or -1
        group = resolve_group(self.process_group)  # once per product
        # One batch on one process: no weighting, so the product is exactly A_b V.
        unweighted = self._data.is_single_batch and group is None
        with curvature_mode(self._model, self._bn_mode):
            for batch in self._batches():
                flat = flatten_columns(self._batch_matmat(batch, V))
                sizes[batch.index] = batch.size
                here = torch.where(~torch.isfinite(flat).all(), batch.index, -1)
                first_bad = (
                    here if first_bad is None else torch.where(first_bad >= 0, first_bad, here)
                )
                if unweighted:
                    acc, weight = flat, 1
                elif acc is None:
                    acc, weight = flat * batch.size, batch.size
                else:
                    acc.add_(flat, alpha=batch.size)
                    weight += batch.size
        if acc is None or first_bad is None:  # pragma: no cover - Data refuses empty data
            raise argument_error("data", "at least one batch", self._data)
        index = int(first_bad.item())  # the check's one host synchronisation
        if index >= 0:
            raise NumericalError(
                f"{type(self).__name__}: non-finite curvature product in batch "
                f"{index} (size {sizes[index]}){self._diagnose(self._in_memory_batch(index))}."
            )
        return all_reduce_weighted(acc, weight, group)

    def _in_memory_batch(self, index: int) -> Batch | None:
        """Batch ``index`` of in-memory data (None for a DataLoader: it is not re-read)."""
        if not self._data.is_in_memory:
            return None
        return next((b for b in self._data if b.index == index), None)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        V = unflatten_columns(X, self._shapes)
        acc, weight = self._accumulate(V)
        if isinstance(weight, torch.Tensor) or weight != 1:
            return acc / weight
        return acc
