"""Construction-time checks of the loss, the targets and the parameters of an operator.

A curvature operator refuses, when it is built, what would otherwise give a bare
PyTorch error at the first product or -- worse -- finite, wrong numbers:

* ``loss_fn`` not callable, a class instead of an instance, a callable that does not
  take ``(outputs, targets)``, a loss whose value on the first batch is not a finite
  scalar (``TypeError``/``ValueError`` naming ``loss_fn``);
* class targets outside ``[0, C)`` (other than ``ignore_index``) for cross-entropy, NLL
  and :func:`curvops.losses.sequence_cross_entropy`, with :math:`C` the classes of the
  model's output; NaN/Inf in floating-point targets or inputs (``ValueError`` naming
  ``data`` and the batch);
* non-finite values in a selected parameter, even where the loss would mask them
  (``ValueError`` naming the parameter);
* a loss whose normaliser is recognisably not the sample count but cannot be read
  (a subclass of ``CrossEntropyLoss`` with ``weight``/``ignore_index`` in use, a plain
  function with targets equal to PyTorch's ``ignore_index`` -100): declare it with
  :func:`curvops.losses.declare_loss`;
* dict batches and loaders of dicts (named by their keys, with the supported forms);
* modules of a quantized model (:func:`check_no_quantized_modules`: no derivatives, a
  silent zero curvature before them), naming ``model``;
* a forward pass that uses tensors computed from the parameters before the product
  and kept as module attributes (:func:`check_no_stale_parameter_tensors`, naming
  ``model``).

The first batch costs one forward pass (to read the output's classes and evaluate the
loss); every batch of an in-memory list has its targets checked (no forward); the batches
of a DataLoader are checked as the first product iterates them
(:meth:`Validation.check_streamed`).  Products never repeat these checks.

>>> import torch
>>> net = torch.nn.Linear(2, 3)
>>> batch = (torch.zeros(4, 2), torch.tensor([0, 1, 2, 3]))
>>> validate(net, torch.nn.CrossEntropyLoss(), batch)
Traceback (most recent call last):
...
ValueError: Argument 'data (batch 0)': expected class targets in [0, 3) ...
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from curvops.data import dict_batch_error, first_tensor
from curvops.differentiability import tensor_arguments
from curvops.distributed import check_ranks_agree, resolve_group
from spectral.errors import argument_error

T = TypeVar("T")

__all__ = [
    "ValidatedModes",
    "Validation",
    "check_loss_signature",
    "check_no_quantized_modules",
    "check_no_stale_parameter_tensors",
    "check_params_finite",
    "check_shapes_weighable",
    "check_targets",
    "check_weights_not_rewritten",
    "checked_on_ranks",
    "dict_batch_error",
    "validate",
    "validate_across_ranks",
    "validated_on_ranks",
]


def check_loss_signature(loss_fn: Any) -> None:
    """``loss_fn`` must accept two positional arguments ``(outputs, targets)``.

    >>> check_loss_signature(torch.nn.ReLU())
    Traceback (most recent call last):
    ...
    TypeError: Argument 'loss_fn': expected a loss called as loss_fn(outputs, targets) ...
    """
    target = loss_fn.forward if isinstance(loss_fn, nn.Module) else loss_fn
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: checked by the call
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise argument_error(
            "loss_fn",
            "a loss called as loss_fn(outputs, targets) -> scalar",
            f"{loss_fn!r} with signature {signature}",
            kind=TypeError,
        ) from None


def check_params_finite(params: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Refuse NaN/Inf in any selected parameter (names the first offender).

    >>> lin = torch.nn.Linear(1, 1)
    >>> with torch.no_grad():
    ...     _ = lin.bias.fill_(float("inf"))
    >>> check_params_finite(list(lin.named_parameters()))
    Traceback (most recent call last):
    ...
    ValueError: Argument 'params': expected finite parameter values; received "NaN/Inf in 'bias'...
    """
    if not params:
        return
    flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in params])
    if bool(flags.all()):
        return
    bad = [name for (name, _), ok in zip(params, flags.tolist()) if not ok]
    raise argument_error(
        "params",
        "finite parameter values",
        f"NaN/Inf in {bad[0]!r}"
        + (f" (and {bad[1:5]})" if len(bad) > 1 else "")
        + "; the curvature of a model with non-finite weights is not defined",
    )


def _class_targets_spec(loss_fn: Any, outputs: Any) -> tuple[int, int] | None:
    """``(C, ignore_index)`` for losses with class-index targets, else None."""
    from curvops.losses import loss_family, loss_setting

    family = loss_family(loss_fn)
    if family is None or not isinstance(outputs, torch.Tensor) or outputs.ndim == 0:
        return None
    ignore = int(loss_setting(loss_fn, "ignore_index", -100))
    if family in ("ce", "nll"):
        return (int(outputs.shape[1]) if outputs.ndim >= 2 else int(outputs.shape[0])), ignore
    if family == "seq_ce":
        return int(outputs.shape[-1]), ignore
    return None


def check_targets(
    loss_fn: Any, targets: torch.Tensor, index: int, classes: tuple[int, int] | None
) -> None:
    """Refuse non-finite floating targets and class indices outside ``[0, C)``.

    ``classes``: ``(C, ignore_index)`` of a class-index loss (None: no range check).
    """
    where = f"data (batch {index})"
    if targets.dtype.is_floating_point or targets.dtype.is_complex:
        if not bool(torch.isfinite(targets).all()):
            raise argument_error(where, "finite targets", "targets with NaN or Inf")
        return
    if classes is None or targets.dtype == torch.bool:
        return
    num_classes, ignore = classes
    counted = targets != ignore
    bad = counted & ((targets < 0) | (targets >= num_classes))
    if bool(bad.any()):
        values = torch.unique(targets[bad]).tolist()[:5]
        raise argument_error(
            where,
            f"class targets in [0, {num_classes}) (the model's {num_classes} output classes) "
            f"or ignore_index={ignore}",
            f"targets with values {values}",
        )


_DECLARE_HINT = (
    "declare how it normalises with curvops.losses.declare_loss(loss_fn, "
    "normaliser='targets' | 'samples' | callable), so batches combine exactly"
)


def check_shapes_weighable(
    loss_fn: Any,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    reference: tuple[tuple[int, ...], tuple[int, ...]],
    index: int,
) -> None:
    """Refuse batches of different trailing shapes under a loss whose normaliser is assumed.

    A loss whose normaliser is not known (:func:`curvops.losses.normaliser_is_known`: a
    plain function) is weighted by its number of samples.  That is exact when it divides
    by the samples times a constant, and the constant is the same for every batch only
    when the batches agree past the sample dimension (:func:`curvops.data.trailing_shapes`);
    a per-token mean over batches padded to their own lengths would be weighted wrongly,
    silently.

    Parameters
    ----------
    loss_fn : Any
        The loss.
    shapes, reference : pair of tuples
        :func:`curvops.data.trailing_shapes` of this batch and of the first.
    index : int
        This batch's index (for the message).

    Raises
    ------
    ValueError
        Naming ``loss_fn``, the two shapes and :func:`curvops.losses.declare_loss`.

    Examples
    --------
    >>> check_shapes_weighable(torch.nn.MSELoss(), ((3,), (3,)), ((5,), (5,)), 1)
    >>> try:
    ...     check_shapes_weighable(lambda f, y: f.sum(), ((3,), (3,)), ((5,), (5,)), 1)
    ... except ValueError as exc:
    ...     print(str(exc)[:65])
    Argument 'loss_fn': expected a loss whose normaliser is known: ba
    """
    from curvops.losses import normaliser_is_known

    if shapes == reference or normaliser_is_known(loss_fn):
        return
    raise argument_error(
        "loss_fn",
        f"a loss whose normaliser is known: batch {index} has input / target shapes "
        f"{shapes[0]} / {shapes[1]} past the sample dimension, batch 0 {reference[0]} / "
        f"{reference[1]}, so the loss's normaliser is not the sample count times one "
        f"constant and the batches cannot be weighted by their samples; {_DECLARE_HINT}",
        loss_fn,
    )


def _check_normaliser_known(loss_fn: Any, targets: torch.Tensor, index: int) -> None:
    """Refuse a loss whose normaliser is recognisably not the sample count and unknown."""
    from curvops.losses import DeclaredLoss, loss_family, loss_reduction, loss_setting

    if isinstance(loss_fn, DeclaredLoss) or loss_family(loss_fn) is not None:
        return
    if loss_reduction(loss_fn) == "sum":
        return
    hint = _DECLARE_HINT
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        ignore = loss_setting(loss_fn, "ignore_index", -100)
        uses_ignore = not targets.dtype.is_floating_point and bool((targets == ignore).any())
        if loss_setting(loss_fn, "weight", None) is not None or uses_ignore:
            raise argument_error(
                "loss_fn",
                f"a loss whose normaliser is known: this subclass of "
                f"{type(loss_fn).__mro__[1].__name__} "
                f"divides by its counted/weighted targets (batch {index}); {hint}",
                loss_fn,
            )
        return
    if not targets.dtype.is_floating_point and bool((targets == -100).any()):
        raise argument_error(
            "loss_fn",
            f"a loss whose normaliser is known: the targets of batch {index} contain -100 "
            f"(PyTorch's ignore_index), so the mean is probably over counted targets, not "
            f"samples; {hint} (a loss that shifts the labels inside the model, like a Hugging "
            f"Face causal LM's out.loss, counts the shifted ones: normaliser=lambda inputs, y: "
            f"(y[:, 1:] != -100).sum(); or select the logits, output_fn=lambda out: out.logits, "
            f"and use curvops.losses.sequence_cross_entropy() with targets shifted in the data)",
            loss_fn,
        )


class _RawOutput:
    """An ``output_fn`` for :func:`curvops._model_state.functional_forward` that selects as
    ``output_fn`` would (``None``: the default selection) and keeps the model's output."""

    def __init__(self, output_fn: Any) -> None:
        self.output_fn = output_fn
        self.output: Any = None

    def __call__(self, output: Any) -> torch.Tensor:
        from curvops.model_io import select_output

        self.output = output
        return select_output(output, self.output_fn)

    def dropped(self) -> str | None:
        """What the default selection left out of a structured output (``None``: nothing,
        or ``output_fn`` chose), e.g. ``"the first item of a tuple of 2"``."""
        from curvops.snapshot import tensors_in

        out = self.output
        if self.output_fn is not None or isinstance(out, torch.Tensor):
            return None
        if isinstance(out, Mapping):
            tensors = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
            key = "logits" if "logits" in out else (tensors[0] if tensors else None)
            what = f"the {key!r} entry of a {type(out).__name__} with tensors {tensors}"
        elif isinstance(out, (tuple, list)):
            what = f"the first item of a {type(out).__name__} of {len(out)}"
        else:
            return None
        return what if len(tensors_in(out)) > 1 else None  # (nested ones too: (mean, [var]))


#: Calls that take a tensor only for its dtype, device or shape, never its values.
_VALUE_FREE = frozenset(
    {
        torch.zeros_like,
        torch.ones_like,
        torch.empty_like,
        torch.full_like,
        torch.Tensor.new_tensor,
        torch.Tensor.new_zeros,
        torch.Tensor.new_ones,
        torch.Tensor.new_empty,
        torch.Tensor.new_full,
    }
)
#: Conversions whose first argument is converted and whose others give a dtype/device.
_CONVERSIONS = frozenset({torch.Tensor.to, torch.Tensor.type_as})


class _ParameterReads(TorchFunctionMode):
    """Record which of the selected parameters a call computes with (a torch call taking
    one, or a view of one, and returning tensors), by position; calls that use a tensor
    only for its dtype, device or shape (``zeros_like``, ``new_tensor``, the second
    argument of ``to`` / ``type_as``) do not count."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self._index = {id(p): i for i, p in enumerate(params)}
        self.read: set[int] = set()

    def _position(self, item: Any) -> int | None:
        if not isinstance(item, torch.Tensor):
            return None
        i = self._index.get(id(item))
        if i is None and item._base is not None:  # a view taken before (W.t(), W.view(-1))
            i = self._index.get(id(item._base))
        return i

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func in _VALUE_FREE:
            return result
        if isinstance(result, torch.Tensor) or (
            isinstance(result, tuple | list) and any(isinstance(r, torch.Tensor) for r in result)
        ):  # (tensors, or tuples of them: chunk, unbind, split, svd, max(dim=...))
            used = tensor_arguments(args[:1], {}) if func in _CONVERSIONS else None
            for item in used if used is not None else tensor_arguments(args, kwargs):
                i = self._position(item)
                if i is not None:
                    self.read.add(i)
        return result


def _refuse_parameter_reads(
    loss_fn: Any, named: Sequence[tuple[str, torch.Tensor]], evaluate: Callable[[], Any]
) -> Any:
    """``evaluate()`` (the loss on the first batch), refused if the loss computes with a
    selected parameter of the model: the operators differentiate the parameters as the
    forward pass uses them, so a regulariser inside the loss (``lam * sum(p.pow(2).sum()
    for p in model.parameters())``) is a constant to them and its curvature silently
    missing (the Hessian of cross-entropy + 0.1 ||w||^2 was that of the cross-entropy)."""
    reads = _ParameterReads([p for _, p in named])
    with reads:
        value = evaluate()
    if reads.read:
        names = [repr(named[i][0]) for i in sorted(reads.read)]
        raise argument_error(
            "loss_fn",
            "a loss of the model's outputs and targets only: it computes with the model's "
            f"parameter(s) {', '.join(names[:4])}{' ...' if len(names) > 4 else ''} (a "
            "regulariser inside the loss?), which the operators differentiate only where "
            "the forward pass uses them, so its curvature would be silently missing; add "
            "it as an operator instead (the curvature of lam * ||w||^2 is 2 lam I: "
            "op.shift(2 * lam), or op.damp(2 * lam) for a GGN or Fisher)",
            loss_fn,
        )
    return value


def _first_loss_value(loss_fn: Any, outputs: Any, targets: Any, raw: _RawOutput) -> Any:
    """The loss on the first batch's outputs, refused if it calls a function whose second
    derivatives PyTorch gets wrong; ``None`` for structured outputs (tuples, dicts: the
    products' business).

    Where the default selection left tensors of a structured output out (``raw``), a
    failing loss gets a note naming the selection, and a loss that also accepts the
    whole output, with another value, is refused: which one the curvature is of is
    ambiguous (a loss reading ``out[0]`` and ``out[1]`` silently read rows of the
    selected tensor)."""
    from curvops.derivative_repairs import check_loss_second_derivatives

    if not isinstance(outputs, torch.Tensor):
        return None
    dropped = raw.dropped()
    if dropped is not None and outputs.dim() == 0:
        raise argument_error(
            "output_fn",
            "an output_fn naming the model's outputs: the default selection picked a "
            "0-dimensional tensor (a loss computed inside the model?) beside other "
            "tensors; name it explicitly (output_fn=lambda out: out['loss'], for the "
            "Hessian only) or the outputs the loss takes",
            f"None, with {dropped}",
        )
    try:
        value = check_loss_second_derivatives(loss_fn, outputs, targets)
    except Exception as exc:
        if dropped is not None:
            exc.add_note(
                f"curvops called loss_fn with the model output selected by default: {dropped}; "
                "pass output_fn= (model output -> the tensor the loss takes) to choose another"
            )
        raise
    if dropped is not None and isinstance(value, torch.Tensor) and value.numel() == 1:
        _refuse_ambiguous_selection(loss_fn, raw.output, targets, value, dropped)
    return value


def _refuse_ambiguous_selection(
    loss_fn: Any, output: Any, targets: Any, value: torch.Tensor, dropped: str
) -> None:
    """Refuse a loss that takes both the selected tensor and the whole ``output``, with
    different values (nothing if it refuses the whole output, or agrees)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's broadcasting notices
            whole = loss_fn(output, targets)
    except Exception:
        return
    if not isinstance(whole, torch.Tensor) or whole.numel() != 1:
        return
    a, b = float(value), float(whole)
    if not math.isfinite(b) or abs(a - b) <= 1e-6 * max(abs(a), abs(b)):
        return
    raise argument_error(
        "output_fn",
        "an output_fn naming the tensor the loss takes: loss_fn accepts both the model's "
        f"whole output and the part selected by default ({dropped}), with different values "
        f"({b:.6g} and {a:.6g}), so which one was meant is ambiguous (an operator needs one "
        "output tensor: combine the parts into one in the model or in output_fn, and write "
        "the loss for it)",
        None,
    )


def _weighting_probe(
    loss_fn: Any,
    first_part: tuple[Any, Any],
    first: Any,
    stream: Any,
    minibatch_size: int | None,
    process_group: Any,
) -> Any:
    """A :class:`curvops.sample_weighting.SampleWeightingProbe` seeded with the first batch
    when batches combine (a list, a loader, shards across the processes of
    ``process_group``, the minibatches of ``minibatch_size`` that ``loss_stats`` cuts) under
    a loss whose normaliser is assumed; else ``None``."""
    from curvops.losses import normaliser_is_known
    from curvops.sample_weighting import SampleWeightingProbe

    outputs, targets = first_part
    several = not stream.is_single_batch and (not stream.is_in_memory or sum(1 for _ in stream) > 1)
    sharded = resolve_group(process_group) is not None
    if not (several or sharded or minibatch_size is not None) or normaliser_is_known(loss_fn):
        return None
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return None
    seed = (outputs.detach(), targets, first.size)
    return SampleWeightingProbe(loss_fn, seed, first.index, minibatch_size)


def _check_first_loss_value(
    loss_fn: Any,
    value: Any,
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    batch: tuple[Any, torch.Tensor, int],
    *,
    outputs: Any = None,
) -> None:
    """Refuse a first-batch loss that is not a finite scalar tensor (``None``: not evaluated,
    structured outputs); a non-finite one names the unselected non-finite tensors, or the
    model's non-finite outputs (naming ``model``)."""
    from curvops.losses import batch_normaliser, loss_reduction

    inputs, targets, size = batch
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise argument_error("loss_fn", "a loss returning a scalar tensor", value, kind=TypeError)
    if value.numel() != 1:
        raise argument_error(
            "loss_fn",
            "a scalar loss (reduction 'mean' or 'sum'); on the first batch it returned",
            value,
        )
    if not bool(torch.isfinite(value).all()) and (
        loss_reduction(loss_fn) == "sum" or batch_normaliser(loss_fn, inputs, targets, size) > 0
    ):  # (a mean over no counted target is 0/0: such a batch is skipped by the products)
        selected = {id(p) for _, p in named}
        others = [
            f"{n!r} (not selected)"
            for n, t in [*model.named_parameters(), *model.named_buffers()]
            if id(t) not in selected
            and t.is_floating_point()
            and not bool(torch.isfinite(t.detach()).all())
        ]
        cause = f"; non-finite values in {', '.join(others[:5])}" if others else ""
        if not others and isinstance(outputs, torch.Tensor):
            bad = ~torch.isfinite(outputs.detach())
            if bool(bad.any()):
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise argument_error(
                    "model",
                    "finite outputs on the first batch (the selected parameters and the inputs "
                    "are finite; an attention row whose mask hides every key, as at padded "
                    "positions of eager attention, gives NaN)",
                    f"{int(bad.sum())} non-finite of {bad.numel()} output values, the first "
                    f"at index {where}",
                )
        raise argument_error(
            "loss_fn",
            "a finite loss on the first batch (the selected parameters, the inputs and the "
            f"targets are finite{cause})",
            f"{float(value)}",
        )


@dataclass
class Validation:
    """What the construction-time checks learnt: the class spec (and whether a
    DataLoader's batches were checked on their first pass).  Batch weights are not
    kept: products count them afresh (the targets may be edited in place)."""

    loss_fn: Any
    classes: tuple[int, int] | None
    streamed_checked: bool = False
    #: The total weight of an in-memory shard at construction (``None`` for a
    #: DataLoader), for the collective check of :func:`validate_across_ranks`.
    weight: float | None = None
    #: :func:`curvops.data.trailing_shapes` of the first batch.
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    #: The shape of the (selected) model output on the first batch (``None``: structured).
    output_shape: tuple[int, ...] | None = None
    #: The ``output_fn`` checked (every rank of a process group must use the same one).
    output_fn: Any = None
    #: The first batch's (outputs, targets, samples) under a loss whose normaliser is
    #: assumed, for the comparison of the shards (:func:`_compare_shards`).
    weighting_seed: Any = None

    def check_outputs_before_the_loss(self, who: str) -> None:
        """Refuse a 0-dimensional model output for a curvature built on the outputs.

        The GGN :math:`J^\\top \\nabla^2_f \\ell\\, J` and the Fisher need the network's
        outputs *before* the loss.  A scalar output is a loss computed inside the model
        (a Hugging Face model given its ``labels``: ``output_fn=lambda out: out.loss``):
        with an identity ``loss_fn`` its GGN is exactly zero and it has no per-sample
        terms, so the numbers would be silently wrong.  The Hessian of such a set-up is
        fine and is not checked.

        Raises
        ------
        ValueError
            Naming ``output_fn`` and ``who``.
        """
        if self.output_shape == ():
            raise argument_error(
                "output_fn",
                f"model outputs with a sample dimension for {who} (the network's outputs "
                "before the loss, e.g. output_fn=lambda out: out.logits, with the loss as "
                "loss_fn): a 0-dimensional output is a loss computed inside the model, whose "
                "GGN under an identity loss_fn is zero and which has no per-sample terms",
                "a 0-dimensional output",
            )

    def check_streamed(self, inputs: Any, targets: torch.Tensor, index: int) -> None:
        """Check one batch of a DataLoader during its first pass (its targets and shapes;
        non-finite inputs surface as a non-finite product naming the batch)."""
        from curvops.data import Batch, trailing_shapes

        check_targets(self.loss_fn, targets, index, self.classes)
        _check_normaliser_known(self.loss_fn, targets, index)
        if self.shapes is not None:
            here = trailing_shapes(Batch(inputs, targets, 0, index))
            check_shapes_weighable(self.loss_fn, here, self.shapes, index)


def _check_inputs_finite(inputs: Any, index: int) -> None:
    first = first_tensor(inputs)
    if first is not None and first.is_floating_point() and not bool(torch.isfinite(first).all()):
        raise argument_error(f"data (batch {index})", "finite inputs", "inputs with NaN or Inf")


class ValidatedModes:
    """The train/eval flags under which an operator's construction checks have run.

    The checks run one forward pass in the modes the model has when the operator is
    built, and a forward pass can differ between modes: BigBird's block-sparse
    attention reseeds and draws from numpy's global generator in training mode only,
    so an operator built in eval mode and used after ``model.train()`` reset the
    caller's numpy stream without an error.  :meth:`ensure`, called by every product,
    runs the checks again (``check``) the first time the model's flags are new; it
    costs one pass over the modules' flags otherwise.

    Parameters
    ----------
    model : torch.nn.Module
        The operator's model, in the modes its checks have just run in.
    check : callable
        Runs the construction checks (raises what they raise).

    Examples
    --------
    >>> runs = []
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    >>> modes = ValidatedModes(net, lambda: runs.append(net.training))
    >>> modes.ensure(); _ = net.eval(); modes.ensure(); modes.ensure()
    >>> runs
    [False]
    """

    def __init__(self, model: nn.Module, check: Callable[[], Any]) -> None:
        self._model = model
        self._check = check
        self._seen = {self._flags()}

    def _flags(self) -> tuple[bool, ...]:
        return tuple(m.training for m in self._model.modules())

    def ensure(self) -> None:
        """Run the checks if the model's flags have not been checked yet."""
        flags = self._flags()
        if flags not in self._seen:
            self._check()
            self._seen.add(flags)


def check_weights_not_rewritten(model: nn.Module) -> None:
    """Refuse modules whose forward pass rewrites their own weights in place.

    ``nn.Embedding(max_norm=...)`` / ``nn.EmbeddingBag(max_norm=...)`` renormalise the
    rows they look up, in place, in every forward pass: building an operator or
    running a product would change the model (contract 3), and the curvature would
    be taken at weights the model does not have until its next forward pass.

    Parameters
    ----------
    model : torch.nn.Module
        The model of an operator.

    Raises
    ------
    ValueError
        Naming ``model`` and the module.

    Examples
    --------
    >>> check_weights_not_rewritten(torch.nn.Sequential(torch.nn.Embedding(5, 2, max_norm=1.0)))
    Traceback (most recent call last):
    ...
    ValueError: Argument 'model': expected modules that do not rewrite their weights ...
    """
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
            raise argument_error(
                "model",
                "modules that do not rewrite their weights in forward (submodule "
                f"{name!r} is {type(module).__name__} with max_norm={module.max_norm}: every "
                "forward pass renormalises its rows in place, so a curvature product "
                "would change the model; set max_norm=None and renormalise explicitly, "
                "e.g. after each optimiser step)",
                model,
            )


#: Module namespaces of PyTorch's quantized (integer) modules.
_QUANTIZED_NAMESPACES = (
    "torch.ao.nn.quantized",
    "torch.ao.nn.intrinsic.quantized",
    "torch.nn.quantized",
    "torch.nn.intrinsic.quantized",
)


def check_no_quantized_modules(model: nn.Module) -> None:
    """Refuse modules of a quantized model (``quantize_dynamic``, ``convert``).

    A quantized module rounds its input activations to integers and its kernels have
    no derivatives: autograd records nothing through it, so every parameter before it
    had a Hessian and a GGN of exactly zero, without an error (the derivative of the
    quantized network is indeed zero almost everywhere, and not what a user asking for
    the network's curvature means).  ``FloatFunctional`` (float arithmetic of
    quantization-ready models) is not quantized and passes.

    Parameters
    ----------
    model : torch.nn.Module
        The model of an operator.

    Raises
    ------
    ValueError
        Naming ``model`` and the first quantized submodule.

    Examples
    --------
    >>> import warnings
    >>> with warnings.catch_warnings():  # torch deprecates its quantized modules
    ...     warnings.simplefilter("ignore")
    ...     quantized = torch.ao.nn.quantized.dynamic.Linear(3, 2)
    >>> check_no_quantized_modules(torch.nn.Sequential(torch.nn.Linear(2, 3), quantized))
    Traceback (most recent call last):
    ...
    ValueError: Argument 'model': expected a model without quantized modules ...
    """
    for name, module in model.named_modules():
        kind = type(module)
        if kind.__module__.startswith(_QUANTIZED_NAMESPACES) and kind.__name__ != "FloatFunctional":
            raise argument_error(
                "model",
                "a model without quantized modules (submodule "
                f"{name!r} is {kind.__module__}.{kind.__name__}: its integer kernels have "
                "no derivatives, so the curvature of every parameter before it would "
                "silently be zero; use the float model, before "
                "torch.ao.quantization.quantize_dynamic/convert)",
                model,
            )


def check_no_stale_parameter_tensors(model: nn.Module, outputs: Any) -> None:
    """Refuse a forward pass that used tensors computed from the model's parameters
    before the product (kept as plain attributes).

    Curvature products evaluate the model with its parameters swapped for their own
    tensors (:func:`curvops._model_state.functional_forward`).  A tensor derived from a
    parameter and stored outside the parameter dictionaries -- a tied weight kept as
    ``self.w_t = self.linear.weight.t()`` in ``__init__``, an "effective weight" cached
    in ``forward`` -- still holds the old graph: the products would leave out every
    path through it (a Hessian 95 % off, without an error).  ``outputs`` is the
    output of a forward pass in which no replacement tensor requires a gradient, so it
    requires one only through such a tensor (or an input that does).  The test is
    :func:`curvops._model_state.refuse_stale_parameter_paths` over all parameters, the
    one every product that records a graph makes for the parameters it differentiates.

    Raises
    ------
    ValueError
        Naming ``model`` and the parameters reached.

    Examples
    --------
    >>> class Tied(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.enc = torch.nn.Linear(2, 3, bias=False)
    ...         self.dec = self.enc.weight.view(3, 2)  # a view of the parameter, made once
    ...     def forward(self, x):
    ...         return self.enc(x) @ self.dec
    >>> from curvops import HessianOperator
    >>> HessianOperator(Tied(), torch.nn.MSELoss(), (torch.ones(4, 2), torch.zeros(4, 2)))
    Traceback (most recent call last):
    ...
    ValueError: Argument 'model': expected a forward pass that computes everything it uses from ...
    """
    from curvops._model_state import refuse_stale_parameter_paths

    refuse_stale_parameter_paths(outputs, list(model.named_parameters()))


def validate(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Any = None,
    bn_mode: str | None = None,
    output_fn: Any = None,
    process_group: Any = False,
    minibatch_size: int | None = None,
) -> Validation:
    """Run the construction-time checks of the module docstring; return what they learnt.

    ``data`` may be anything :func:`curvops.data.as_data` accepts.  With a
    ``process_group`` that communicates (:func:`curvops.distributed.resolve_group`),
    ``data`` is one rank's shard and may lack counted targets (an all-padding shard
    contributes zeros): the total over the ranks is checked by
    :func:`validate_across_ranks`.  No communication here.  ``minibatch_size``: the
    caller cuts every batch into minibatches of that many samples and weights them
    (``loss_stats``), so a loss whose normaliser is assumed is checked on them
    (:mod:`curvops.sample_weighting`), even for one batch.

    Raises
    ------
    TypeError, ValueError
        As listed in the module docstring, naming ``loss_fn``, ``data (batch i)`` or
        ``params``.
    """
    from curvops._model_state import curvature_mode, functional_forward
    from curvops.data import as_data, move_to, trailing_shapes
    from curvops.determinism import global_streams_untouched, torch_draws_reported
    from curvops.losses import check_loss
    from curvops.params import select_params
    from curvops.precision import precision_loss_noted

    check_loss(loss_fn)
    check_loss_signature(loss_fn)
    check_weights_not_rewritten(model)
    check_no_quantized_modules(model)
    named = select_params(model, params)
    check_params_finite(named)
    stream = as_data(data)
    first = stream.first_batch()
    device, dtype = named[0][1].device, named[0][1].dtype
    inputs = move_to(first.inputs, device, dtype)
    targets = move_to(first.targets, device, dtype)
    _check_inputs_finite(inputs, first.index)
    with (
        curvature_mode(model, bn_mode),
        global_streams_untouched("model"),
        torch_draws_reported(f"The model ({type(model).__name__})"),
    ):
        # gradients on, but no replaced parameter requires one: only tensors computed
        # from the parameters before the product carry a graph into the outputs
        with precision_loss_noted(model, dtype):
            raw = _RawOutput(output_fn)  # the selection, keeping what the model returned
            outputs = functional_forward(  # on copies: a forward writing its weights is refused
                model,
                [n for n, _ in named],
                [p.detach().clone() for _, p in named],
                inputs,
                raw,
                copies=True,
            )
        check_no_stale_parameter_tensors(model, outputs)
        with torch.no_grad():
            classes = _class_targets_spec(loss_fn, outputs)
            check_targets(loss_fn, targets, first.index, classes)
            _check_normaliser_known(loss_fn, targets, first.index)
            value = _refuse_parameter_reads(
                loss_fn, named, lambda: _first_loss_value(loss_fn, outputs, targets, raw)
            )
    _check_first_loss_value(
        loss_fn, value, model, named, (inputs, targets, first.size), outputs=outputs
    )
    result = Validation(
        loss_fn,
        classes,
        shapes=trailing_shapes(first),
        output_shape=tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else None,
        output_fn=output_fn,
    )
    probe = _weighting_probe(
        loss_fn, (outputs, targets), first, stream, minibatch_size, process_group
    )
    forward = _forward_without_gradients(model, named, bn_mode, output_fn)
    if stream.is_in_memory:
        result.weight = _check_other_batches(loss_fn, stream, result, forward, probe)
        if result.weight <= 0 and resolve_group(process_group) is None:
            raise argument_error(
                "data",
                "at least one counted target (every target equals ignore_index or has "
                "class weight 0, so the mean loss is 0/0)",
                data,
            )
    _finish_weighting_probe(probe, stream, forward, result)
    return result


def _finish_weighting_probe(
    probe: Any, stream: Any, forward: Callable[[Any], Any], result: Validation
) -> None:
    """A loader's batches against its first (an in-memory stream's were compared by
    :func:`_check_other_batches`), then the first batch's minibatches or halves; the
    first batch is kept in ``result`` for the comparison of the shards."""
    if probe is None:
        return
    result.weighting_seed = probe.first
    if not stream.is_in_memory:  # one pass without gradients (a plain-function loss only)
        for position, batch in enumerate(stream):
            if position > 0:
                probe.compare((forward(batch), batch.targets, batch.size), batch.index)
    probe.finish()


def _forward_without_gradients(
    model: nn.Module, named: list[tuple[str, nn.Parameter]], bn_mode: Any, output_fn: Any
) -> Callable[[Any], torch.Tensor]:
    """A function running the model on a batch as the first batch's checks do (the
    operator's modes, the caller's random streams untouched, the weights on copies), but
    without gradients; its selected outputs: for batches of other shapes and the sample
    weighting's comparisons (:func:`_check_other_batches`)."""
    from curvops._model_state import curvature_mode, functional_forward
    from curvops.data import move_to
    from curvops.determinism import global_streams_untouched, torch_draws_reported

    device, dtype = named[0][1].device, named[0][1].dtype

    def forward(batch: Any) -> torch.Tensor:
        with (
            curvature_mode(model, bn_mode),
            global_streams_untouched("model"),
            torch_draws_reported(f"The model ({type(model).__name__})"),
            torch.no_grad(),
        ):
            return functional_forward(
                model,
                [n for n, _ in named],
                [p.detach().clone() for _, p in named],
                move_to(batch.inputs, device, dtype),
                output_fn,
                copies=True,
            )

    return forward


def _check_other_batches(
    loss_fn: Any,
    stream: Any,
    result: Validation,
    forward: Callable[[Any], torch.Tensor],
    probe: Any = None,
) -> float:
    """Check the targets and shapes of an in-memory stream's batches after the first
    against what the first taught (``result``); their total weight.

    Batches may differ from the first past the sample dimension (dynamic padding), so the
    model runs once (``forward``, no gradients) on one batch of each new input shape: one
    it cannot take (a wrong feature size) is refused here, naming the batch, not at the
    first product with the model's bare error.  With a sample-weighting ``probe`` (a loss
    whose normaliser is assumed) it runs on every batch, which the probe compares with
    the first.
    """
    from curvops.data import trailing_shapes
    from curvops.losses import batch_weight

    total = 0.0
    seen = {result.shapes[0] if result.shapes is not None else None}
    for position, batch in enumerate(stream):
        if position > 0:
            check_targets(loss_fn, batch.targets, batch.index, result.classes)
            _check_normaliser_known(loss_fn, batch.targets, batch.index)
            here = trailing_shapes(batch)
            outputs = None
            if here[0] not in seen or probe is not None:
                outputs = _refuse_failing_forward(forward, batch, here, result.shapes)
                seen.add(here[0])
            # other input shapes (dynamic padding) under an assumed normaliser: fine when
            # the loss sees the first batch's shapes, which the probe then compares
            if result.shapes is not None and not _loss_sees_first_shapes(probe, outputs, batch):
                check_shapes_weighable(loss_fn, here, result.shapes, batch.index)
            if probe is not None:
                probe.compare((outputs, batch.targets, batch.size), batch.index)
        total += batch_weight(loss_fn, batch.inputs, batch.targets, batch.size)
    return total


def _loss_sees_first_shapes(probe: Any, outputs: Any, batch: Any) -> bool:
    """Whether a batch's outputs and targets have the first batch's shapes past the first
    dimension (``probe``: the sample weighting, seeded with the first batch)."""
    if probe is None or not isinstance(outputs, torch.Tensor):
        return False
    first_outputs, first_targets, _ = probe.first
    return (
        isinstance(batch.targets, torch.Tensor)
        and outputs.shape[1:] == first_outputs.shape[1:]
        and batch.targets.shape[1:] == first_targets.shape[1:]
    )


def _refuse_failing_forward(
    forward: Callable[[Any], torch.Tensor],
    batch: Any,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    reference: tuple[tuple[int, ...], tuple[int, ...]] | None,
) -> torch.Tensor:
    """Run ``forward`` on ``batch``; a failure becomes a ``ValueError`` naming the batch."""
    try:
        return forward(batch)
    except Exception as exc:
        ref = "" if reference is None else f" ({reference[0]} / {reference[1]} in batch 0)"
        raise argument_error(
            f"data (batch {batch.index})",
            f"inputs the model accepts, like batch 0's{ref}",
            f"input / target shapes {shapes[0]} / {shapes[1]} past the sample dimension, "
            f"on which the model raised {type(exc).__name__}: {exc}",
        ) from exc


def validate_across_ranks(
    checks: Callable[[], Validation],
    model: nn.Module,
    loss_fn: Any,
    *,
    params: Any = None,
    process_group: Any = None,
    settings: dict[str, Any] | None = None,
    same_shapes: bool = False,
) -> Validation:
    """Run this rank's ``checks`` (a call of :func:`validate`), then agree across ranks.

    Without communication (``process_group`` resolving to ``None``) this is
    ``checks()``.  Otherwise every rank joins one ``all_gather``
    (:func:`curvops.distributed.check_ranks_agree`) whether or not its own checks
    passed, so that a failure on one rank stops every rank instead of leaving the
    others waiting in their first product: the failing rank raises its own error, the
    others a ``RuntimeError`` naming it.  Ranks that disagree (model weights, parameter
    selection, dtype, loss settings, the ``output_fn`` the checks used, ``settings``) or
    a job whose shards hold no counted target at all raise the same ``ValueError`` on
    every rank, naming what differs.  Checks that come before (the arguments an operator
    checks itself) join through :func:`checked_on_ranks`.

    Parameters
    ----------
    checks : callable
        This rank's construction checks; pass ``process_group`` to :func:`validate`
        so that a shard without counted targets is accepted locally.
    model, loss_fn, params :
        As given to the operator (``params``: the selection).
    process_group : ProcessGroup, None or False
        The operator's group.
    settings : dict, optional
        Further settings every rank must share (operator type, ``bn_mode``, a Fisher's
        ``kind`` and ``seed``, ...; ``output_fn`` is added from the checks' result).
    same_shapes : bool
        Ranks must also share their first batch's shapes past the sample dimension
        (:func:`curvops.data.trailing_shapes`): K-FAC's factors, and a loss whose normaliser
        is not known (always), combine batches exactly only when all have one shape, which
        each rank checks for its own shard (shards of 5- and 7-token batches were mixed).

    Returns
    -------
    Validation
        What ``checks`` returned.
    """
    from curvops.losses import normaliser_is_known
    from curvops.params import select_params

    if resolve_group(process_group) is None:
        return checks()
    result: Validation | None = None
    named: list[tuple[str, torch.Tensor]] = []
    try:
        result = checks()
        named = list(select_params(model, params))
    except Exception:
        check_ranks_agree(model, [], loss_fn, process_group, failed=True)
        raise
    agreed = {"output_fn": result.output_fn, **(settings or {})}
    if same_shapes or not normaliser_is_known(loss_fn):
        agreed["input / target shapes past the sample dimension"] = _shapes_setting(result)
    check_ranks_agree(model, named, loss_fn, process_group, weight=result.weight, settings=agreed)
    _compare_shards(loss_fn, result, process_group)
    return result


def _compare_shards(loss_fn: Any, result: Validation, process_group: Any) -> None:
    """Compare the ranks' first batches as :mod:`curvops.sample_weighting` compares a
    rank's own batches (a loss whose normaliser is assumed only: one
    ``all_gather_object`` of each rank's first outputs and targets).  Every rank makes the
    same comparisons of the same tensors, so all raise alike (rank 0's halves balanced,
    rank 1's batch of other classes: a class-weighted loss was 31 % off)."""
    import torch.distributed as dist

    from curvops.losses import normaliser_is_known
    from curvops.sample_weighting import check_sample_weighting

    if normaliser_is_known(loss_fn):
        return
    group = resolve_group(process_group)
    seed = result.weighting_seed
    payload = None if seed is None else (seed[0].cpu(), seed[1].cpu(), int(seed[2]))
    seeds: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(seeds, payload, group=group)
    # on the CPU, where every rank computes the same numbers (a loss holding tensors of
    # an accelerator fails there: not compared, on every rank alike)
    present = [(r, s) for r, s in enumerate(seeds) if s is not None]
    for rank, part in present[1:]:
        where = f"the first batches of ranks {present[0][0]} and {rank}"
        check_sample_weighting(loss_fn, [present[0][1], part], where)


def checked_on_ranks(checks: Callable[[], T], process_group: Any) -> T:
    """Run rank-local checks that come before the construction's collective check.

    The arguments an operator or curvature function checks before
    :func:`validate_across_ranks` (the model's type and wrappers, the loss, ``data``,
    ``bn_mode``, the parameter selection, its own settings) can fail on one rank only.
    A failure here still joins the construction's ``all_gather`` as a failed rank
    (:func:`curvops.distributed.check_ranks_agree` with ``failed=True``) before it is
    raised, so the other ranks raise a ``RuntimeError`` naming this one instead of
    waiting for it.  Without communication this is ``checks()``.

    Parameters
    ----------
    checks : callable
        The checks; their result is returned.
    process_group : ProcessGroup, None or False
        The group of the collective check that follows (a ``process_group`` that is not
        a group is refused by the caller, before communicating).

    Returns
    -------
    Any
        What ``checks`` returned.

    Examples
    --------
    >>> checked_on_ranks(lambda: 3, process_group=False)
    3
    """
    try:
        return checks()
    except Exception:
        try:
            group = resolve_group(process_group)
        except (TypeError, RuntimeError):  # not a group: nothing to join
            group = None
        if group is not None:
            check_ranks_agree(nn.Module(), [], None, process_group, failed=True)
        raise


def validated_on_ranks(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    params: Any = None,
    bn_mode: str | None = None,
    output_fn: Any = None,
    process_group: Any = None,
    settings: dict[str, Any] | None = None,
    same_shapes: bool = False,
    extra_checks: Callable[[], None] | None = None,
    minibatch_size: int | None = None,
) -> tuple[Validation, Callable[[], Validation]]:
    """:func:`validate` on this rank's ``data``, agreed across ranks
    (:func:`validate_across_ranks`: one ``all_gather`` with a process group); return what it
    learnt and the rank-local checks themselves, for reruns (a changed loss, new modes).

    The construction of every operator and curvature function that takes a
    ``process_group``; ``extra_checks`` are an operator's own data checks (K-FAC's refusal
    of padded positions), run first, in the same agreement and in every rerun;
    ``minibatch_size`` as for :func:`validate`.
    """

    def checks() -> Validation:
        if extra_checks is not None:
            extra_checks()
        return validate(
            model,
            loss_fn,
            data,
            params=params,
            bn_mode=bn_mode,
            output_fn=output_fn,
            process_group=process_group,
            minibatch_size=minibatch_size,
        )

    result = validate_across_ranks(
        checks,
        model,
        loss_fn,
        params=params,
        process_group=process_group,
        settings=settings,
        same_shapes=same_shapes,
    )
    return result, checks


def _shapes_setting(result: Validation) -> Any:
    """The first batch's trailing shapes as a setting (a tuple of ints, ``None``: unknown)."""
    if result.shapes is None:
        return None
    inputs, targets = result.shapes
    return (*inputs, -1, *targets)
