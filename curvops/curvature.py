"""The shared base of model curvature operators: data looping, weighting, parameters.

A :class:`ModelCurvatureOperator` represents a curvature matrix of the loss over
everything in ``data``,

.. math::
    A = \\frac{\\sum_b w_b\\, A_b}{\\sum_b w_b} \\;\\; (\\texttt{reduction="mean"}),
    \\qquad A = \\sum_b A_b \\;\\; (\\texttt{reduction="sum"}),

where :math:`A_b` is the curvature of the batch loss :math:`L_b` as the loss computes it
and :math:`w_b` the loss's own normaliser (the batch size :math:`N_b`, or its counted
targets for cross-entropy with ``ignore_index``, see :func:`curvops.losses.batch_weight`).
Subclasses implement one per-batch method, :meth:`_batch_matmat`; the base owns the
loop (:meth:`_accumulate`, the single place where the weighted
sum and the total weight are formed, and where an optional process group reduces
them with one ``all_reduce`` per product), the model modes
(:func:`curvops._model_state.curvature_mode`), device/dtype moves, non-finite checks
and the vector <-> parameter maps.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from curvops import determinism
from curvops._model_state import check_bn_mode, curvature_mode, functional_forward
from curvops.configuration import ConfigurationState
from curvops.data import Batch, Data, as_data, first_tensor, move_to, shape_noted
from curvops.differentiability import UntrackedParameterError
from curvops.distributed import (
    all_reduce_weighted,
    get_world_size,
    resolve_group,
    unwrap_model,
)
from curvops.finiteness import all_finite, each_finite, non_finite_parameters
from curvops.inert_hooks import evaluate_loss
from curvops.losses import LossFn, batch_weight, check_loss, loss_reduction
from curvops.model_io import OutputFn, check_output_fn
from curvops.operator import CurvatureOperator
from curvops.params import flatten_columns, select_params, unflatten_columns
from curvops.precision import accumulation_dtype, weight_dtype
from curvops.products import OutputCurvature, jacobian_graph, jacobian_sandwich_matmat
from curvops.snapshot import TensorSnapshot, tensors_in
from curvops.validation import ValidatedModes, checked_on_ranks, validated_on_ranks
from spectral.errors import NumericalError, argument_error

__all__ = ["ModelCurvatureOperator"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ModelCurvatureOperator(CurvatureOperator):
    """Base class of :class:`~curvops.HessianOperator`, :class:`~curvops.GGNOperator`, ...

    Every model curvature operator keeps three contracts:

    1. **One fixed matrix.**  Every pass over ``data`` sees the same batches with the
       same samples in the same order: DataLoaders with shuffling, ``drop_last``,
       random augmentation or worker processes are replayed identically at each
       pass (:mod:`curvops.replay`; the user's random streams and the loader's
       generator are left as they were), and a pass that still differs raises a
       ``ValueError`` naming ``data``.  During products nothing is random: dropout
       of every kind is off (modules, ``F.dropout*`` calls in ``forward``,
       ``dropout_p`` of attention, Bernoulli masks drawn by hand: their means) and
       any other random operation draws from a private, fixed stream
       (:mod:`curvops.determinism`; a logged warning at construction says so).  The same operator,
       batch and vector give bitwise the same product on the CPU.
    2. **The model as it is now.**  Parameters are looked up by name at each
       product, and cached graphs are keyed on a bitwise comparison of every
       parameter and buffer (:math:`O(P)` per product, one copy of them held while
       graphs are cached): optimizer steps, ``.data`` edits, ``load_state_dict``
       (also with ``assign=True``) and reassigned ``Parameter`` objects are all seen
       by the next product.  A change of a selected parameter's dtype, device or
       shape (``model.to(torch.float64)``) is refused with a ``ValueError`` naming
       ``model``: build a new operator.  The modules' configuration counts too
       (:mod:`curvops.configuration`): public attributes (``model.temperature =
       2.0``, LayerNorm's ``eps``), tensors kept as plain attributes, hooks registered
       after construction.  The loss too is taken as it is now
       (:mod:`curvops.configuration`): a changed setting (``label_smoothing``,
       ``ignore_index``, ``reduction``) or class weight, also edited in place or through
       ``.data``, passes the construction checks again and reaches the next product;
       nothing recorded with the old loss is reused.
    3. **Nothing changes.**  Parameters (the same objects of the same types under
       every name, aliases and tied weights included), every buffer (normalisation
       statistics, spectral-norm vectors, counters written by ``forward``), modes,
       ``requires_grad``, ``.grad``, the attention settings and the user's random
       streams are bit-identical afterwards, also after an error
       (:mod:`curvops._model_state`).

    Attention (``nn.MultiheadAttention``, ``nn.Transformer*`` layers,
    ``F.scaled_dot_product_attention``) runs in train and eval mode: products use
    the MATH attention backend and no transformer fast path.  Module backward hooks
    (per module and global) are off during products: the curvature is that of the
    forward function, whatever a hook does to gradients, and hooks that record
    gradients never see the products (they are registered as before afterwards).
    Tensor hooks are held to the same rule: one that ``forward`` registers on an
    intermediate tensor (``h.register_hook(lambda g: -g)`` of a gradient-reversal
    layer, a Grad-CAM recorder), or that the loss registers on the outputs, is not
    registered during products (it gets a handle that removes nothing:
    :data:`curvops.inert_hooks.INERT_HOOKS`), and hooks
    registered beforehand on parameters or buffers are never reached, since products
    differentiate their own copies of them.  Hooks on autograd nodes
    (``h.grad_fn.register_hook``) cannot be held back: keep them out of ``forward``.
    A forward that writes to its input tensors in place (``x /= 255``,
    ``x.sub_(mean)``) is refused with a ``ValueError`` naming ``model`` when the
    operator is built (that check runs on copies of the inputs, so ``data`` is left
    as it was): every product would rescale the caller's batch again.
    A ``torch.compile`` wrapper is unwrapped (its eager module is the same function);
    compiled or TorchScript submodules are refused.

    Parameters
    ----------
    model:
        The ``nn.Module``; never changed (see :mod:`curvops._model_state`).
    loss_fn:
        ``(outputs, targets) -> scalar`` with ``reduction="mean"`` or ``"sum"``: the
        operator is the curvature of that loss over all of ``data`` (batches weighted by
        the loss's own normaliser, see :func:`_accumulate`; summed for ``"sum"``).
        Checked with one forward pass on the first batch (:mod:`curvops.validation`).
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
    settings:
        A subclass's own settings that change the matrix (the Fisher's ``kind``,
        ``seed``, ...): with a process group every rank must share them, and ranks that
        disagree raise the same ``ValueError`` naming them
        (:func:`curvops.validation.validate_across_ranks`; the operator type,
        ``bn_mode`` and ``output_fn`` are always compared).

    Examples
    --------
    >>> import torch
    >>> nn = torch.nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    >>> x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> y = torch.tensor([0, 1] * 4)
    >>> loss = nn.CrossEntropyLoss()
    >>> from curvops import GGNOperator
    >>> G = GGNOperator(net, loss, (x, y), params=["2.weight", "2.bias"])  # a block
    >>> isinstance(G, ModelCurvatureOperator), G.num_params, G.param_names
    (True, 10, ['2.weight', '2.bias'])
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
        settings: dict[str, Any] | None = None,
    ) -> None:
        resolve_group(process_group)  # validates the argument early

        def local_checks() -> tuple[nn.Module, Data, list[tuple[str, nn.Parameter]]]:
            if not isinstance(model, nn.Module):
                raise argument_error("model", "a torch.nn.Module", model, kind=TypeError)
            inner = unwrap_model(model)
            check_loss(loss_fn)
            check_output_fn(output_fn)
            stream = as_data(data)
            check_bn_mode(bn_mode)
            return inner, stream, select_params(inner, params)

        # a rank whose arguments fail here still joins the collective check below
        model, self._data, selected = checked_on_ranks(local_checks, process_group)
        self._model = model
        self._loss_fn = loss_fn
        self._output_fn = output_fn
        self._bn_mode = bn_mode

        self._validation, construction_checks = validated_on_ranks(
            model,
            loss_fn,
            self._data,
            params=params,
            bn_mode=bn_mode,
            output_fn=output_fn,
            process_group=process_group,
            settings={"operator": type(self).__name__, "bn_mode": bn_mode, **(settings or {})},
        )
        self._construction_checks = construction_checks  # rerun when the loss changes
        # ... and when the model enters train/eval flags not checked yet
        self._validated_modes = ValidatedModes(model, self._recheck)
        self._loss_state = ConfigurationState(loss_fn)  # the loss as it is now, like the model
        self._loss_state.update()
        # The selection as built; products look the parameters up by name
        # (_live_params), so a reassigned Parameter is followed.
        self._params = selected
        self._names = [n for n, _ in selected]
        self._shapes = [p.shape for _, p in selected]
        self._progress = bool(progress)
        self.process_group = process_group
        # parameters and buffers bitwise, attributes, hooks and modes of the model
        self._model_state = ConfigurationState(model)
        self._batch_snapshots: dict[int, TensorSnapshot] = {}  # cached batches' tensors
        self._graph_cache: dict[int, tuple[tuple[Any, ...], Any]] = {}  # _configure_cache
        self._cache_enabled = False
        self._product_token: tuple[Any, ...] | None = None  # memo for one product
        self._finite_flags: tuple[int, torch.Tensor] | None = None  # (generation, flags)
        self._in_product = False
        first = selected[0][1]
        n = sum(int(p.numel()) for _, p in selected)
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
        """The selected ``(name, parameter)`` pairs, in vector order, looked up now.

        The parameters are found by name in the model at each call (and at each
        product), so a reassigned ``Parameter`` or ``load_state_dict(...,
        assign=True)`` is followed.
        """
        return list(zip(self._names, self._live_params()))

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

    def __repr__(self) -> str:
        """The base description plus the samples used, e.g. ``on 10 of 13 samples``."""
        return f"{super().__repr__()[:-1]}, on {self._data.describe()}>"

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

    # ------------------------------------------------------------------ the loss's gradient
    @determinism.outside_inference_mode
    def loss_gradient(self) -> torch.Tensor:
        """:math:`\\nabla L`, the gradient of the loss this operator is the curvature of.

        The batches combine exactly as in the products: :math:`\\nabla L = \\sum_b w_b
        \\nabla L_b / \\sum_b w_b` with the loss's own batch weights for
        ``reduction="mean"`` (so a list of batches equals their concatenation, also
        with padding tokens and class weights), :math:`\\sum_b \\nabla L_b` for
        ``"sum"``, summed over the process group when there is one.  Evaluated as a
        product is: the same ``output_fn``, BatchNorm mode and settings, no dropout,
        and the model (its ``.grad`` included) left as it was.

        Returns
        -------
        torch.Tensor
            The length-``P`` gradient, on the operator's device and in its dtype.

        Raises
        ------
        NumericalError
            If the gradient is not finite.

        Examples
        --------
        >>> import torch
        >>> nn = torch.nn
        >>> net = nn.Linear(2, 3).double()
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> y1, y2 = torch.tensor([0, -100, -100, -100]), torch.tensor([1, 2, 0, 1])
        >>> from curvops import HessianOperator
        >>> H = HessianOperator(net, nn.CrossEntropyLoss(), [(x, y1), (x, y2)])
        >>> loss = nn.functional.cross_entropy(net(torch.cat([x, x])), torch.cat([y1, y2]))
        >>> parts = torch.autograd.grad(loss, list(net.parameters()))
        >>> bool(torch.allclose(H.loss_gradient(), torch.cat([t.reshape(-1) for t in parts])))
        True
        """
        group = resolve_group(self.process_group)
        summed = loss_reduction(self._loss_fn) == "sum"
        unweighted = self._data.is_single_batch and group is None
        where = f"{type(self).__name__}.loss_gradient"
        try:
            acc, total = self._local_gradient(summed or unweighted)
        except Exception as exc:  # with a group: still join the reduction, every rank stops
            if group is None:
                raise
            zeros = torch.zeros(
                self.num_params, dtype=accumulation_dtype(self.torch_dtype), device=self.device
            )
            all_reduce_weighted(zeros, 0.0, group, error=exc, where=where)
            raise  # (not reached: the line above raises exc)
        acc, total = all_reduce_weighted(acc, total, group, where=where)
        if total == 0:
            raise argument_error("data", "at least one batch with a counted target", self._data)
        gradient = (acc if summed or unweighted else acc / total).to(self.torch_dtype)
        if not bool(all_finite(gradient)):
            raise NumericalError(
                f"{type(self).__name__}.loss_gradient: the gradient is not finite"
                f"{self._diagnose(None)}"
            )
        return gradient

    def _local_gradient(self, unit_weights: bool) -> tuple[torch.Tensor, float]:
        """This rank's :math:`(\\sum_b w_b \\nabla L_b, \\sum_b w_b)` (``unit_weights``:
        :math:`w_b = 1`, a summed loss or one batch on one process)."""
        acc = torch.zeros(
            self.num_params, dtype=accumulation_dtype(self.torch_dtype), device=self.device
        )
        total = 0.0
        with curvature_mode(self._model, self._bn_mode):
            for batch in self._batches():
                w = (
                    1.0
                    if unit_weights
                    else float(batch_weight(self._loss_fn, batch.inputs, batch.targets, batch.size))
                )
                if w == 0:  # every target ignored: the batch counts nothing
                    continue
                inputs, targets = self._batch_on_device(batch)
                leaves = [p.detach().requires_grad_(True) for p in self.current_params()]
                with torch.enable_grad():
                    loss = self._loss_of_fn(inputs, targets)(leaves)
                    grads = torch.autograd.grad(
                        loss, leaves, allow_unused=True, materialize_grads=True
                    )
                acc.add_(torch.cat([g.reshape(-1) for g in grads]), alpha=w)
                total += w
        return acc, total

    # ------------------------------------------------------------------ helpers for subclasses
    def current_params(self) -> list[torch.Tensor]:
        """The selected parameters' current values (detached, sharing storage).

        Looked up by name in the model now (see :meth:`_live_params`).
        """
        return [p.detach() for p in self._live_params()]

    def _live_params(self) -> list[nn.Parameter]:
        """The parameters under the selected names now, checked against the operator
        (:func:`live_parameters`)."""
        return live_parameters(
            self._model, self._names, self._shapes, self.torch_dtype, self.device
        )

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
            return evaluate_loss(loss_fn, forward(tensors), targets)

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
        self._graph_cache = {}

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
                self._forward_fn(inputs),
                self.current_params(),
                V,
                output_curvature,
                lean_kernels=self._lean_kernels,
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
        """Changes whenever parameters, buffers, modes or the batch's tensors change.

        The model part (:meth:`_model_token`) is computed once per product.  The
        batch's tensors are compared bitwise with a copy kept for each cached batch
        (:class:`curvops.snapshot.TensorSnapshot`): an in-place edit of the data, also
        through ``.data`` (no version bump), rebuilds the batch's graphs instead of
        mixing old activations with new inputs.
        """
        if not self._in_product:
            token = self._model_token()
        elif self._product_token is None:
            token = self._product_token = self._model_token()
        else:
            token = self._product_token
        snapshot = self._batch_snapshots.setdefault(batch.index, TensorSnapshot())
        snapshot.update([*tensors_in(batch.inputs), *tensors_in(batch.targets)])
        kind = self.device.type  # a graph recorded under torch.autocast is not reused outside
        autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        return (token, autocast, snapshot.generation, self._loss_state.generation)

    def _model_token(self) -> tuple[Any, ...]:
        """A key that changes with any change of the model's parameters or buffers.

        Compares the model with its record (:class:`curvops.configuration.ConfigurationState`):
        every parameter and buffer bitwise with a copy taken when the key last changed,
        plus the identity, dtype and storage of every tensor under every name, and the
        modules' types, public attributes (a temperature, LayerNorm's ``eps``), tensor
        attributes, hooks and train/eval flags; and whether the product context
        (:func:`curvops.determinism.product_context`) is active.  So an optimizer
        step, a ``.data`` edit (which bumps no version counter), ``copy_`` under
        ``no_grad``, ``load_state_dict`` (with or without ``assign=True``), a
        reassigned ``Parameter``, ``model.temperature = 2.0`` and a hook registered
        after construction all invalidate the cached graphs.  So does an in-place write
        that leaves the values as they were (``p.add_(d)`` then ``p.copy_(saved)``, a
        ``load_state_dict`` of the same state): the tensors' version counters are part
        of the key, since a recorded graph that saved them refuses to run after such a
        write (autograd's "modified by an inplace operation").  Cost :math:`O(P)`:
        one comparison pass over the parameters and buffers per product (only for
        operators that cache), and one copy of them held while graphs are cached.
        """
        if self._model_state.update():
            self._graph_cache.clear()
        model = self._model
        versions = tuple(t._version for t in (*model.parameters(), *model.buffers()))
        return (self._model_state.generation, determinism.is_active(), versions)

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
        bad = [
            name
            for name, p in zip(self._names, self._live_params())
            if not bool(torch.isfinite(p.detach()).all())
        ]
        if bad:
            return f"; non-finite values in parameter(s) {bad[:5]}"
        if batch is None:
            return ""
        first = first_tensor(batch.inputs)
        if first is not None and first.is_floating_point() and not bool(first.isfinite().all()):
            return "; the inputs of this batch contain NaN or Inf"
        return ""

    def _accumulate(self, V: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Return :math:`(\\sum_b w_b A_b V,\\ W)` over this process's data.

        The weights are the loss's own (:func:`curvops.losses.batch_weight`): for
        ``reduction="mean"`` the normaliser :math:`\\nu_b` of each batch (its sample
        count, or its counted / class-weighted targets for cross-entropy with
        ``ignore_index`` / ``weight=``) and :math:`W = \\sum_b w_b`, so that the operator
        is the curvature of the mean loss over everything the loss counts (a list of
        batches equals their concatenation); for ``reduction="sum"`` :math:`w_b = 1` and
        :math:`W = 1` (the curvature of the summed loss).  Batches with weight 0 (every
        target ignored) are skipped.  With a process group (and torch.distributed
        initialised) both are summed over the group by a single ``all_reduce``; a job
        with no counted target on any rank is refused after it (on every rank alike).

        The finiteness of every batch product and of the selected parameters is
        checked on the device: the index of the first non-finite batch is kept in a
        device scalar and read once after the loop, so a product costs one host
        synchronisation for the check, not one per batch.  A DataLoader's batches are
        validated (:mod:`curvops.validation`) during the first pass only.

        The steps: :meth:`_local_sum` (the checks of a product, :meth:`_sweep` over the
        batches, zeros for a rank without data, :func:`_read_checks`, the one host
        synchronisation, and :meth:`_raise_if_not_finite`), then the reduction over the
        group.  A rank whose own part raises (a non-finite product, a one-sample batch
        under train-mode BatchNorm, a bad batch of its loader) still joins the
        reduction, with zeros and a failure flag in the same buffer
        (:func:`curvops.distributed.all_reduce_weighted`): it raises its own error there
        and every other rank a ``RuntimeError`` naming it, instead of waiting for it.

        Raises
        ------
        NumericalError
            If a batch product is not finite (the message names the first such batch)
            or a selected parameter became non-finite after construction.
        ValueError
            A DataLoader batch with bad targets or inputs on the first pass; no batch
            with a counted target (over all ranks of the group).
        RuntimeError
            With a process group: the product failed on another rank (naming it).
        """
        group = resolve_group(self.process_group)  # once per product
        summed = loss_reduction(self._loss_fn) == "sum"
        if group is None:
            acc, weight = self._local_sum(V, group)
            if weight == 0:
                raise argument_error("data", "at least one batch with a counted target", self._data)
            return acc, 1.0 if summed else weight
        where = f"A {type(self).__name__} product"
        try:
            acc, weight = self._local_sum(V, group)
        except Exception as exc:  # still join the reduction: every rank stops
            zeros = torch.zeros(
                self.num_params,
                V[0].shape[0],
                dtype=accumulation_dtype(self.torch_dtype),
                device=self.device,
            )
            all_reduce_weighted(zeros, 0.0, group, error=exc, where=where)
            raise  # (not reached: the line above raises exc)
        acc, total = all_reduce_weighted(acc, float(weight), group, where=where)
        if total == 0:  # the same reduced total on every rank: all raise alike
            raise argument_error(
                "data",
                "at least one batch with a counted target",
                f"no counted target on any of the {get_world_size(group)} ranks of the "
                "process group",
            )
        return acc, 1.0 if summed else total

    def _local_sum(self, V: list[torch.Tensor], group: Any) -> tuple[torch.Tensor, Any]:
        """This rank's :math:`(\\sum_b w_b A_b V, \\sum_b w_b)`, its checks passed.

        First the checks of a product (a selected parameter that changed dtype, shape
        or went missing, a changed loss, new train/eval flags: :meth:`_matmat_torch`'s
        preparation), then :meth:`_sweep`.  One batch on one process is unweighted (the
        product is exactly :math:`A_b V`, weight 1).  Without a batch of non-zero weight
        the sum is zeros of weight 0 (with a group: the rank contributes nothing and
        still joins the collective).
        """
        self._live_params()  # a changed dtype/shape/missing parameter is refused first
        self._refresh_loss()
        self._validated_modes.ensure()
        running = _WeightedSum(unweighted=self._data.is_single_batch and group is None)
        params_ok = self._sweep(V, running)
        if running.acc is None or running.first_bad is None:
            if group is None:
                raise argument_error("data", "at least one batch with a counted target", self._data)
            running.acc = torch.zeros(
                self.num_params,
                V[0].shape[0],
                dtype=accumulation_dtype(self.torch_dtype),
                device=self.device,
            )
            running.first_bad = torch.tensor(-1, device=self.device)
        index, params_bad, weight = _read_checks(running.first_bad, params_ok, running.weight)
        self._raise_if_not_finite(index, params_bad, params_ok, running.sizes, V=V)
        return running.acc, weight

    def _sweep(self, V: list[torch.Tensor], running: _WeightedSum) -> torch.Tensor:
        """One pass over the batches, adding each weighted batch product into ``running``.

        Runs under :func:`curvops._model_state.curvature_mode`; validates a
        DataLoader's batches on its first pass; skips batches whose (host) weight is 0
        unless the product is unweighted.  Returns the device booleans "parameter
        ``i`` is finite" (taken in the same mode, after the pass: :meth:`_params_finite`).
        """
        check_stream = not self._data.is_in_memory and not self._validation.streamed_checked
        with curvature_mode(self._model, self._bn_mode):
            try:
                for batch in self._batches():
                    self._add_batch(batch, V, running, check_stream)
            except RuntimeError as exc:  # e.g. sampling from NaN probabilities (MC Fisher)
                flags = each_finite(self.current_params())
                if not bool(flags.all()):  # name the cause, not its symptom
                    self._raise_if_not_finite(-1, 1.0, flags, running.sizes, cause=exc)
                raise
            params_ok = self._params_finite()
        if check_stream:
            self._validation.streamed_checked = True
        return params_ok

    def _add_batch(
        self, batch: Batch, V: list[torch.Tensor], running: _WeightedSum, check_stream: bool
    ) -> None:
        """Add ``batch``'s weighted product into ``running`` (weight 0: skipped).

        The weight is counted at every product (on the device for class-index
        targets: no host synchronisation), not taken from construction time: targets
        edited in place (a token newly set to ``ignore_index``) change the loss's
        normaliser, and a stale weight would mis-weight the batches silently.
        """
        if check_stream:
            self._validation.check_streamed(batch.inputs, batch.targets, batch.index)
        if running.unweighted:  # one batch on one process: the product is A_b V itself
            w: Any = 1.0
        else:
            w = batch_weight(self._loss_fn, batch.inputs, batch.targets, batch.size, lazy=True)
            if not isinstance(w, torch.Tensor) and w == 0:
                return
        with shape_noted(batch, self._validation.shapes):
            flat = flatten_columns(self._batch_matmat(batch, V))
        running.add(batch.index, batch.size, flat, w)

    def _params_finite(self) -> torch.Tensor:
        """Device booleans "selected parameter ``i`` is finite".

        An operator that caches graphs compares the model with its snapshot in every
        product (:meth:`_model_token`); while that comparison finds the model
        unchanged (the same generation), the flags of the last check still hold and
        are reused, so a cached product pays for the comparison only.
        """
        token = self._product_token
        cached = self._finite_flags
        if token is not None and cached is not None and cached[0] == token[0]:
            return cached[1]
        flags = each_finite(self.current_params())
        if token is not None:
            self._finite_flags = (token[0], flags)
        return flags

    def _raise_if_not_finite(
        self,
        index: int,
        params_bad: float,
        params_ok: torch.Tensor,
        sizes: dict[int, int],
        cause: BaseException | None = None,
        V: list[torch.Tensor] | None = None,
    ) -> None:
        """Raise :class:`NumericalError` for non-finite parameters or batch ``index >= 0``.

        Parameters come first: with NaN weights every product is NaN, and the
        parameters are the cause to name.  Then the vectors multiplied (``V``, read
        only on this error path): a NaN or Inf entry there makes every batch product
        non-finite, and the argument is the cause to name, not the batch.
        """
        if params_bad:
            raise non_finite_parameters(type(self).__name__, self._names, params_ok) from cause
        if index >= 0 and V is not None:
            _refuse_non_finite_input(flatten_columns(V))
        if index >= 0:
            raise NumericalError(
                f"{type(self).__name__}: non-finite curvature product in batch "
                f"{index} (size {sizes[index]}){self._diagnose(self._in_memory_batch(index))}."
            )

    def _refresh_loss(self) -> None:
        """Follow a loss changed since the last product (:mod:`curvops.configuration`).

        A changed setting or class weight (``loss.label_smoothing = 0.1``,
        ``loss.weight.mul_(2)``) passes the construction checks again
        (:func:`curvops.validation.validate`: a NaN or negative class weight, an
        ``ignore_index`` that leaves targets out of range, are refused as at
        construction) and drops every graph recorded with the old loss.
        """
        if self._loss_state.update(check=self._recheck):
            self._graph_cache.clear()

    def _recheck(self) -> None:
        """Run the construction checks again and keep what they learnt."""
        self._validation = self._construction_checks()

    def _in_memory_batch(self, index: int) -> Batch | None:
        """Batch ``index`` of in-memory data (None for a DataLoader: it is not re-read)."""
        if not self._data.is_in_memory:
            return None
        return next((b for b in self._data if b.index == index), None)

    def _matmat_torch(self, X: torch.Tensor) -> torch.Tensor:
        V = unflatten_columns(X, self._shapes)
        self._product_token = None  # the model is compared once per product
        self._in_product = True
        try:
            acc, weight = self._accumulate(V)
        except UntrackedParameterError as exc:  # relabel the positions with the names
            names = [repr(self._names[i]) for i in exc.indices]
            raise UntrackedParameterError.naming(names, exc.indices, exc.functions) from None
        finally:
            self._product_token, self._in_product = None, False
        if isinstance(weight, torch.Tensor) or weight != 1:
            acc = acc / weight
        return acc.to(self.torch_dtype)  # sums of 16-bit products: accumulated in float32


@dataclass
class _WeightedSum:
    """The running state of one product: :math:`\\sum_b w_b A_b V`, :math:`\\sum_b w_b`, checks.

    ``acc`` is the ``(P, k)`` weighted sum (``None`` before the first batch; float32
    for 16-bit products, :func:`curvops.precision.accumulation_dtype`), ``weight`` the
    total weight (a float, or a float64 device scalar when a loader's weights are
    counted on the device: a count over more than 65504 tokens stays finite),
    ``first_bad`` a device int64 scalar holding the index of the first batch with a
    non-finite product (``-1`` while none), and ``sizes`` the size of every batch added
    (for the error message).  With ``unweighted`` (one batch on one process) the sum is
    the batch product itself and the weight 1.
    """

    unweighted: bool
    acc: torch.Tensor | None = None
    weight: Any = 0.0
    first_bad: torch.Tensor | None = None
    sizes: dict[int, int] = field(default_factory=dict)

    def add(self, index: int, size: int, flat: torch.Tensor, w: Any) -> None:
        """Add batch ``index``'s product ``flat`` (``(P, k)``) with weight ``w``.

        A device weight of 0 (every target ignored, counted without a host
        synchronisation) adds zeros and never marks the batch as bad.  The product is
        scaled then added (``acc += flat * w``, ``w`` rounded to ``acc``'s dtype), so a
        float and a device ``w`` give the same bits.
        """
        self.sizes[index] = size
        bad = ~all_finite(flat)
        scale = w
        if not self.unweighted:  # 16-bit products are summed in float32
            flat = flat.to(accumulation_dtype(flat.dtype))
        if isinstance(w, torch.Tensor):  # counted on the device: 0 skips the batch
            w = w.to(device=flat.device, dtype=weight_dtype(flat.device))
            bad = bad & (w > 0)
            flat = torch.where(w > 0, flat, torch.zeros_like(flat))
            scale = w.to(flat.dtype)
        here = torch.where(bad, index, -1)
        first_bad = self.first_bad
        self.first_bad = here if first_bad is None else torch.where(first_bad >= 0, first_bad, here)
        if self.unweighted:
            self.acc, self.weight = flat, 1.0
        elif self.acc is None:
            self.acc, self.weight = flat * scale, w
        else:
            self.acc.add_(flat * scale)
            self.weight = self.weight + w


def _read_checks(
    first_bad: torch.Tensor, params_ok: torch.Tensor, weight: Any
) -> tuple[int, float, Any]:
    """``(first bad batch or -1, parameters bad (non-zero), weight as a float)`` in one sync.

    The device scalars (and the weight when it is a device scalar) are stacked into
    one float64 vector and read with a single ``tolist``: the checks' one host
    synchronisation per product.  A float ``weight`` is returned as it is.
    """
    parts = [first_bad.reshape(()), (~params_ok.all()).to(first_bad.dtype)]
    status = torch.stack([t.to(torch.float64) for t in parts])
    if isinstance(weight, torch.Tensor):
        status = torch.cat([status, weight.reshape(1).to(status)])
    values = status.tolist()
    if isinstance(weight, torch.Tensor):
        weight = values[2]
    return int(values[0]), values[1], weight


def live_parameters(
    model: nn.Module,
    names: Sequence[str],
    shapes: Sequence[torch.Size],
    dtype: torch.dtype,
    device: torch.device,
) -> list[nn.Parameter]:
    """The parameters ``names`` of ``model`` now, checked against an operator built on them.

    :math:`O(p)` attribute lookups for :math:`p` parameter tensors.  Shared by the exact
    operators and K-FAC / E-KFAC.

    Raises
    ------
    ValueError
        A selected name no longer names a parameter, or a parameter's shape, dtype or
        device changed (e.g. ``model.to(torch.float64)``): the operator is a matrix of
        fixed size and dtype, build a new one.

    Examples
    --------
    >>> lin = nn.Linear(2, 1)
    >>> [p.shape for p in live_parameters(lin, ["bias"], [torch.Size([1])], torch.float32,
    ...                                   torch.device("cpu"))]
    [torch.Size([1])]
    """
    live = []
    for name, shape in zip(names, shapes):
        try:
            p = model.get_parameter(name)
        except AttributeError:
            raise argument_error(
                "model",
                f"a parameter named {name!r}, as when the operator was built",
                "a model without it",
            ) from None
        if p.shape != shape or p.dtype != dtype or p.device != device:
            raise argument_error(
                "model",
                f"parameter {name!r} of shape {tuple(shape)}, dtype {dtype} on "
                f"{device} as when the operator was built (after model.to(...) or a "
                "change of shape, build a new operator)",
                f"shape {tuple(p.shape)}, dtype {p.dtype} on {p.device}",
            )
        live.append(p)
    return live


def _refuse_non_finite_input(X: torch.Tensor) -> None:
    """``ValueError`` naming ``x`` if the ``(P, k)`` block ``X`` has a NaN or Inf entry."""
    bad = ~torch.isfinite(X)
    if not bool(bad.any()):
        return
    rows, cols = torch.nonzero(bad, as_tuple=True)
    k = X.shape[1]
    where = f"entry {int(rows[0])}" + (f" of vector {int(cols[0])}" if k > 1 else "")
    vectors = "a vector" if k == 1 else f"{k} vectors"
    raise ValueError(
        "Argument 'x': expected finite entries (the vectors the operator multiplies); "
        f"received {vectors} of length {X.shape[0]} with {int(bad.sum())} NaN/Inf "
        f"entries, the first at {where}."
    )
