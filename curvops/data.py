"""Normalise the ``data`` argument of curvature operators to a stream of batches.

``data`` may be

* one batch ``(inputs, targets)`` — a 2-tuple/list whose second item is a tensor;
* a sequence of such batches (list or tuple), sizes may differ, also past the sample
  dimension (sequences padded per batch);
* a :class:`torch.utils.data.DataLoader` (or any re-iterable yielding batches).

``inputs`` is a tensor, a tuple/list of tensors (positional model inputs) or a
mapping of keyword inputs; its batch size is the length of the first tensor unless
told otherwise (``batch_size=`` of :func:`as_data`: the key or position of the
batch-major input, or a function of the inputs), and must equal ``len(targets)``.
The operators compute the curvature of the mean loss over every sample,

.. math::
    L = \\frac{1}{N}\\sum_b N_b\\, L_b, \\qquad N = \\sum_b N_b,

where :math:`L_b` is the mean loss of batch :math:`b` (size :math:`N_b`), so an
unequal last batch is weighted exactly.

Every pass over a DataLoader sees the same batches with the same samples in the
same order: shuffling, ``drop_last``, random augmentation and worker processes are
replayed identically at each pass, without advancing the user's random streams
(:class:`curvops.replay.ReplayStreams`), and a pass that still differs from the
first raises a ``ValueError`` naming ``data`` (:class:`curvops.replay.PassFingerprint`).

>>> import torch
>>> d = as_data([(torch.zeros(3, 2), torch.zeros(3)), (torch.zeros(1, 2), torch.zeros(1))])
>>> [b.size for b in d], d.num_samples, d.is_single_batch
([3, 1], 4, False)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from curvops.replay import PassFingerprint, ReplayStreams
from curvops.snapshot import tensors_in
from spectral.errors import argument_error

__all__ = [
    "SINGLE_SAMPLE_NOTE",
    "Batch",
    "BatchSize",
    "Data",
    "as_data",
    "batch_size_of",
    "dict_batch_error",
    "first_tensor",
    "move_to",
    "shape_noted",
    "trailing_shapes",
]


_SUPPORTED_FORMS = (
    "an (inputs, targets) pair, a list of such pairs, or a DataLoader yielding them "
    "(e.g. wrap the dataset so __getitem__ returns (d['image'], d['label']), or pass "
    "collate_fn=lambda items: (inputs, targets))"
)


def dict_batch_error(name: str, obj: Mapping[Any, Any]) -> Exception:
    """The error for a dict where an ``(inputs, targets)`` batch was expected.

    >>> str(dict_batch_error("data", {"image": 0, "label": 1}))[:60]
    "Argument 'data': expected an (inputs, targets) pair, a list "
    """
    keys = ", ".join(repr(k) for k in list(obj.keys())[:10])
    return argument_error(name, _SUPPORTED_FORMS, f"a dict with keys [{keys}]")


@dataclass(frozen=True)
class Batch:
    """One batch: ``inputs`` (tensor / tuple / mapping), ``targets``, ``size`` and ``index``."""

    inputs: Any
    targets: torch.Tensor
    size: int
    index: int


def first_tensor(inputs: Any) -> torch.Tensor | None:
    """The first tensor in ``inputs`` (a tensor, or nested tuples/lists/mappings), or None.

    >>> first_tensor({"ids": (torch.zeros(2, 3),)}).shape
    torch.Size([2, 3])
    """
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, Mapping):
        values: Iterable[Any] = inputs.values()
    elif isinstance(inputs, (tuple, list)):
        values = inputs
    else:
        return None
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


#: How to count the samples of a batch's inputs: ``None`` (the length of the first
#: tensor), a key (mapping inputs) or position (tuple/list inputs) naming the
#: batch-major input, or a function of the inputs returning the count.
BatchSize = str | int | Callable[[Any], int] | None


def check_batch_size(batch_size: Any) -> BatchSize:
    """Validate the ``batch_size`` argument of :func:`as_data` and return it.

    >>> check_batch_size("input_ids")
    'input_ids'
    """
    if batch_size is None or callable(batch_size):
        return cast(BatchSize, batch_size)
    if isinstance(batch_size, str) or (
        isinstance(batch_size, int) and not isinstance(batch_size, bool)
    ):
        return batch_size
    raise argument_error(
        "batch_size",
        "None, the key or position of the batch-major input, or a function of the inputs "
        "returning the number of samples",
        batch_size,
        kind=TypeError,
    )


def batch_size_of(inputs: Any, batch_size: BatchSize = None, *, index: int = 0) -> int:
    """Number of samples in ``inputs``: the length of its first tensor by default.

    ``batch_size`` (see :data:`BatchSize`) says otherwise: e.g. ``"input_ids"`` for
    a dict whose first entry is not batch-major, or ``lambda inputs: ...``.

    >>> batch_size_of((torch.zeros(5, 2), torch.zeros(5)))
    5
    >>> batch_size_of({"positions": torch.arange(7), "x": torch.zeros(3, 7)}, "x")
    3
    """
    if batch_size is not None:
        return _told_batch_size(inputs, batch_size, index)
    first = first_tensor(inputs)
    if first is None or first.ndim == 0:
        raise argument_error(
            "data", "inputs that are a tensor (or tuple/mapping of tensors)", inputs, kind=TypeError
        )
    return int(first.shape[0])


def _told_batch_size(inputs: Any, batch_size: str | int | Callable[[Any], int], index: int) -> int:
    where = f"batch_size (batch {index})"
    if callable(batch_size):
        count = batch_size(inputs)
        if isinstance(count, torch.Tensor) and count.numel() == 1 and not count.is_floating_point():
            count = int(count.item())
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise argument_error(where, "a function returning a positive int", count)
        return count
    try:
        chosen = inputs[batch_size]
    except (KeyError, IndexError, TypeError):
        kind = "key" if isinstance(batch_size, str) else "position"
        raise argument_error(
            where, f"the {kind} of a batch-major tensor of the inputs", batch_size
        ) from None
    if not isinstance(chosen, torch.Tensor) or chosen.ndim == 0:
        raise argument_error(
            where, f"a {batch_size!r} input with a leading batch dimension", chosen, kind=TypeError
        )
    return int(chosen.shape[0])


def move_to(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move tensors in ``value`` (nested tuples/lists/mappings) to ``device``.

    Floating tensors are cast to ``dtype`` when given; integer tensors keep their dtype.

    >>> move_to([torch.zeros(1, dtype=torch.float32)], torch.device("cpu"), torch.float64)[0].dtype
    torch.float64
    """
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.dtype.is_floating_point:
            return value.to(device=device, dtype=dtype)
        return value.to(device=device)
    if isinstance(value, Mapping):
        return {k: move_to(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(move_to(v, device, dtype) for v in value)
    return value


def _is_batch(obj: Any) -> bool:
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and isinstance(obj[1], torch.Tensor)
        and not isinstance(obj[0], str)
    )


def _refuse_structured_targets(data: Any) -> None:
    """A pair ``(inputs, targets)`` whose targets are a tuple, list or dict (e.g. CTC's
    targets with their lengths) would be read as a list of two batches, and refused as
    such with a message about the inputs; name the targets instead."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return
    inputs, targets = data
    if not isinstance(inputs, (torch.Tensor, Mapping)) or _is_batch(inputs):
        return
    if isinstance(targets, (tuple, list, Mapping)) and not _is_batch(targets):
        raise argument_error(
            "data",
            "a pair (inputs, targets) with one tensor of targets (a loss that takes several "
            "target tensors, such as CTCLoss's targets and lengths, reads the others from "
            "its closure or from the targets tensor, e.g. a padded [N, S + 2] tensor)",
            f"a pair whose targets are a {type(targets).__name__} of {len(targets)}",
        )


def _check_batch(obj: Any, index: int, batch_size: BatchSize = None) -> Batch:
    if isinstance(obj, Mapping):  # a dict batch: name its keys and the supported forms
        raise dict_batch_error(f"data (batch {index})", obj)
    if not _is_batch(obj):
        raise argument_error(
            f"data (batch {index})", "a pair (inputs, targets) with a tensor of targets", obj
        )
    inputs, targets = obj
    if any(t.is_inference() for t in tensors_in(obj)):
        raise argument_error(
            f"data (batch {index})",
            "tensors made outside torch.inference_mode (autograd cannot differentiate "
            "through inference tensors; create the batch outside inference mode, or "
            "clone it there: x.clone())",
            "a batch with inference tensors",
        )
    size = batch_size_of(inputs, batch_size, index=index)
    if targets.ndim == 0 or int(targets.shape[0]) != size:
        raise argument_error(
            f"data (batch {index})",
            f"targets with {size} rows, the batch size of the inputs"
            + _counted_from(inputs, batch_size, targets),
            targets,
        )
    if size == 0:
        raise argument_error(f"data (batch {index})", "a batch with at least one sample", obj)
    return Batch(inputs, targets, size, index)


def _tensor_paths(value: Any, path: str = "inputs") -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor in ``value``, in the order of :func:`first_tensor`."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensor_paths(item, f"{path}[{key!r}]")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _tensor_paths(item, f"{path}[{i}]")


def _counted_from(inputs: Any, batch_size: BatchSize, targets: torch.Tensor) -> str:
    """What the sample count was taken from, and the ``batch_size=`` that would fit ``targets``.

    >>> inputs = {"position_ids": torch.zeros(1, 5), "input_ids": torch.zeros(2, 5)}
    >>> said = _counted_from(inputs, None, torch.zeros(2))
    >>> "inputs['position_ids']" in said, "as_data(data, batch_size='input_ids')" in said
    (True, True)
    """
    if batch_size is not None:
        return f" (counted by batch_size={batch_size!r})"
    first = next(_tensor_paths(inputs), None)
    if first is None or targets.ndim == 0:
        return ""
    rows = int(targets.shape[0])
    keys: list[Any] = []
    if isinstance(inputs, Mapping):
        keys = list(inputs.keys())
    elif isinstance(inputs, (tuple, list)):
        keys = list(range(len(inputs)))
    fits = [
        k
        for k in keys
        if isinstance(inputs[k], torch.Tensor)
        and inputs[k].ndim >= 1
        and int(inputs[k].shape[0]) == rows
    ]
    hint = (
        f"as_data(data, batch_size={fits[0]!r})"
        if fits
        else "as_data(data, batch_size=<its key or position, or a function of the inputs>)"
    )
    return (
        f" (counted from {first[0]} of shape {tuple(first[1].shape)}, the first tensor; "
        f"if it is not batch-major, name the batch-major input: {hint})"
    )


def trailing_shapes(batch: Batch) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes past the sample dimension of the first input tensor and of the targets.

    Batches may differ in them (a language model's batches padded to their own longest
    sequence); a loss whose normaliser is the sample count only up to a per-sample
    constant then weights them exactly only when that constant is known
    (:func:`curvops.validation.check_shapes_weighable`).

    >>> trailing_shapes(Batch(torch.zeros(2, 7), torch.zeros(2, 7), 2, 0))
    ((7,), (7,))
    """
    first = first_tensor(batch.inputs)
    inputs = () if first is None else tuple(int(d) for d in first.shape[1:])
    return inputs, tuple(int(d) for d in batch.targets.shape[1:])


#: The note added to train-mode BatchNorm's refusal of a one-sample batch.
SINGLE_SAMPLE_NOTE = (
    "in {where}, a batch of 1 sample: BatchNorm in train mode (batch statistics) needs at "
    "least 2 samples per batch; use {remedy}batches of other sizes (another batch_size, "
    "or drop the last batch)"
)


@contextmanager
def shape_noted(
    batch: Batch, reference: tuple[tuple[int, ...], tuple[int, ...]] | None
) -> Iterator[None]:
    """Add a note naming the batch to an error raised while it is processed, when its
    shapes past the sample dimension differ from the first batch's ``reference``.

    Batches may differ there (dynamic padding), so :class:`Data` does not refuse a batch
    whose feature size is wrong; the model's own shape error then says which batch.

    >>> b = Batch(torch.zeros(2, 5), torch.zeros(2), 2, 1)
    >>> try:
    ...     with shape_noted(b, ((4,), ())):
    ...         raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    ... except RuntimeError as exc:
    ...     print(exc.__notes__[0].split(",")[0])
    in data (batch 1)

    A batch of one sample that train-mode BatchNorm refuses (PyTorch's bare "Expected
    more than 1 value per channel when training", e.g. the last batch of 33 samples in
    batches of 16) gets a note naming the batch and the ways out.
    """
    try:
        yield
    except Exception as exc:
        shapes = trailing_shapes(batch)
        if reference is not None and shapes != reference:
            exc.add_note(
                f"in data (batch {batch.index}), whose input / target shapes past the sample "
                f"dimension {shapes[0]} / {shapes[1]} differ from batch 0's "
                f"{reference[0]} / {reference[1]}"
            )
        if batch.size == 1 and "more than 1 value per channel when training" in str(exc):
            remedy = "bn_mode='eval' (running statistics), or "
            exc.add_note(
                SINGLE_SAMPLE_NOTE.format(where=f"data (batch {batch.index})", remedy=remedy)
            )
        raise


def _signature(batch: Batch) -> tuple[Any, ...]:
    """What every batch must share: the dimensions of the first input and of the
    targets, and the targets' dtype (sizes may differ: dynamic padding)."""
    first = first_tensor(batch.inputs)
    dims = None if first is None else first.ndim
    return (dims, batch.targets.ndim, batch.targets.dtype)


_SIGNATURE_WANTED = "the number of input/target dimensions and the target dtype of batch 0"


class Data:
    """A re-iterable stream of checked :class:`Batch` objects.

    Attributes
    ----------
    is_single_batch:
        True when ``data`` was one ``(inputs, targets)`` pair (products may cache
        what does not depend on the vector).
    is_in_memory:
        True when ``data`` was one batch or a sequence of batches: the same batch
        tensors are yielded on every pass (a DataLoader may yield fresh tensors, even
        at reused memory addresses, so nothing may be cached per batch for it).
    num_samples:
        Total number of samples :math:`N` (computed on first access; for a DataLoader
        from its sampler when possible, otherwise by one pass).

    Raises
    ------
    ValueError
        Empty data, a batch that is not an ``(inputs, targets)`` pair, inputs and
        targets of different lengths, or batches whose numbers of input / target
        dimensions or target dtypes disagree (the message names the batch index).
        Their sizes past the sample dimension may differ (batches padded to their own
        longest sequence); :func:`trailing_shapes` gives them.
    """

    def __init__(self, data: Any, batch_size: BatchSize = None) -> None:
        self._batch_size: BatchSize = check_batch_size(batch_size)
        self._source = data
        self._batches: list[Batch] | None = None
        self._num_samples: int | None = None
        if isinstance(data, Mapping):
            raise dict_batch_error("data", data)
        self.is_single_batch = _is_batch(data)
        _refuse_structured_targets(data)
        if self.is_single_batch:
            self._batches = [_check_batch(data, 0, self._batch_size)]
        elif isinstance(data, Sequence) and not isinstance(data, (str, bytes, torch.Tensor)):
            if len(data) == 0:
                raise argument_error("data", "at least one batch", data)
            self._batches = [_check_batch(b, i, self._batch_size) for i, b in enumerate(data)]
            self._check_consistent(self._batches)
        elif isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
            raise argument_error(
                "data",
                "an (inputs, targets) batch, a sequence of batches or a DataLoader",
                data,
                kind=TypeError,
            )
        elif isinstance(data, Iterator):
            raise argument_error(
                "data",
                "a re-iterable (a DataLoader or a list), not a one-shot iterator",
                data,
                kind=TypeError,
            )
        else:
            length = _safe_len(data)
            if length == 0:
                raise argument_error("data", "a non-empty DataLoader", data)
            self._streams = ReplayStreams(data)
            self._fingerprint = PassFingerprint(data)
        if self._batches is not None:
            self._num_samples = sum(b.size for b in self._batches)

    @staticmethod
    def _check_consistent(batches: Sequence[Batch]) -> None:
        ref = _signature(batches[0])
        for b in batches[1:]:
            if _signature(b) != ref:
                raise argument_error(
                    f"data (batch {b.index})",
                    f"{_SIGNATURE_WANTED} {ref}",
                    _signature(b),
                )

    def first_batch(self) -> Batch:
        """The first batch of a pass, without counting a pass.

        A loader is read on the replayed streams of every pass (so the batch is the
        one the products will see, and the caller's random streams are untouched);
        its iterator is closed at once (worker processes shut down).
        """
        return self.leading_batches(1)[0]

    def leading_batches(self, count: int) -> list[Batch]:
        """The first ``count`` batches of a pass (all of them if fewer), without counting a
        pass; a loader is read as by :meth:`first_batch`.

        >>> d = as_data([(torch.zeros(2, 1), torch.zeros(2))] * 3)
        >>> [b.index for b in d.leading_batches(2)]
        [0, 1]
        """
        if self._batches is not None:
            return self._batches[:count]
        self._streams.new_pass()
        raws: list[Any] = []
        with self._streams.active():
            iterator = pass_iterator(self._source)
            try:
                for raw in iterator:
                    raws.append(raw)
                    if len(raws) == count:
                        break
            finally:
                close_pass_iterator(iterator)
        if not raws:
            raise argument_error("data", "a non-empty DataLoader", self._source)
        return [_check_batch(raw, i, self._batch_size) for i, raw in enumerate(raws)]

    def __iter__(self) -> Iterator[Batch]:
        if self._batches is not None:
            yield from self._batches
            return
        ref: tuple[Any, ...] | None = None
        count = samples = 0
        self._streams.new_pass()
        self._fingerprint.new_pass()
        iterator: Iterator[Any] | None = None
        try:
            while True:
                with self._streams.active():  # the user's streams are back between batches
                    if iterator is None:
                        iterator = pass_iterator(self._source)
                    try:
                        raw = next(iterator)
                    except StopIteration:
                        break
                i = count
                batch = _check_batch(raw, i, self._batch_size)
                sig = _signature(batch)
                if ref is None:
                    ref = sig
                elif sig != ref:
                    raise argument_error(f"data (batch {i})", f"{_SIGNATURE_WANTED} {ref}", sig)
                self._fingerprint.check(i, batch.size, batch.inputs, batch.targets)
                count += 1
                samples += batch.size
                yield batch
        finally:  # also when the caller stops early: no worker outlives the pass
            if iterator is not None:
                close_pass_iterator(iterator)
        if count == 0:
            raise argument_error("data", "a non-empty DataLoader", self._source)
        self._fingerprint.finish(count)
        if self._num_samples is None:
            self._num_samples = samples

    @property
    def is_in_memory(self) -> bool:
        """True for one batch or a sequence of batches (the same tensors on every pass).

        >>> as_data([(torch.zeros(2, 1), torch.zeros(2))]).is_in_memory
        True
        """
        return self._batches is not None

    @property
    def num_available(self) -> int | None:
        """Samples in the loader's dataset (None when unknown), e.g. more than
        :attr:`num_samples` with ``drop_last=True``.

        >>> as_data((torch.zeros(2, 1), torch.zeros(2))).num_available
        2
        """
        if self._batches is not None:
            return self.num_samples
        return _safe_len(getattr(self._source, "dataset", None))

    def describe(self) -> str:
        """``"N samples"`` or ``"N of M samples"``, without a pass over the data.

        >>> as_data([(torch.zeros(3, 1), torch.zeros(3))]).describe()
        '3 samples in 1 batch'
        """
        if self._batches is not None:
            batches = len(self._batches)
            return f"{self.num_samples} samples in {batches} batch{'es' if batches > 1 else ''}"
        if self._num_samples is None:
            self._num_samples = _loader_num_samples(self._source)
        used = "?" if self._num_samples is None else str(self._num_samples)
        available = self.num_available
        if available is None or str(available) == used:
            return f"{used} samples from a loader"
        return f"{used} of {available} samples from a loader"

    @property
    def counts_samples(self) -> bool:
        """Whether samples are counted by a ``batch_size=`` rule (inputs not batch-major)."""
        return self._batch_size is not None

    @property
    def batch_size_rule(self) -> BatchSize:
        """The ``batch_size=`` rule samples are counted by (``None``: the first tensor).

        >>> as_data((torch.zeros(2, 1), torch.zeros(2))).batch_size_rule is None
        True
        """
        return self._batch_size

    @property
    def num_samples(self) -> int:
        """Total number of samples over all batches."""
        if self._num_samples is None:
            self._num_samples = _loader_num_samples(self._source)
            if self._num_samples is None:
                self._num_samples = sum(b.size for b in self)
        return self._num_samples


def _safe_len(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def _loader_num_samples(loader: Any) -> int | None:
    """Sample count of a map-style DataLoader from its sampler, without loading data."""
    if not isinstance(loader, torch.utils.data.DataLoader):
        return None
    sampler = getattr(loader, "sampler", None)
    batch_size = loader.batch_size
    n = _safe_len(sampler)
    if n is None or batch_size is None or loader.batch_sampler is None:
        return None
    if type(loader.batch_sampler) is not torch.utils.data.BatchSampler:
        return None
    if loader.drop_last:
        return (n // batch_size) * batch_size
    return n


def pass_iterator(source: Iterable[Any]) -> Iterator[Any]:
    """``iter(source)``; a DataLoader with persistent workers gives an iterator of its own.

    With ``persistent_workers=True`` a DataLoader keeps the iterator its first
    ``iter()`` made (``loader._iterator``) and reuses it in every later one.  An
    operator's pass would then leave that iterator behind: the user's next epoch
    reused it instead of making its own, skipping the base-seed draw from the loader's
    generator (a different shuffle) with workers whose random streams had advanced,
    so a run tracked by :class:`nets.CurvatureTracker` differed from the same run
    untracked.  Here the loader's own iterator (or its absence) is put back at once,
    and :func:`close_pass_iterator` shuts the private workers down after the pass.

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> loader = DataLoader(TensorDataset(torch.arange(4.0)), batch_size=2)
    >>> [b[0].tolist() for b in pass_iterator(loader)]
    [[0.0, 1.0], [2.0, 3.0]]
    """
    loader = cast(Any, source)
    persistent = (
        isinstance(source, torch.utils.data.DataLoader)
        and getattr(source, "persistent_workers", False)
        and hasattr(source, "_iterator")
    )
    if not persistent:
        return iter(source)
    saved = loader._iterator
    loader._iterator = None
    try:
        return iter(source)
    finally:
        loader._iterator = saved


def close_pass_iterator(iterator: Iterator[Any]) -> None:
    """Close a pass's iterator: a generator's ``close``, a DataLoader iterator's workers.

    >>> close_pass_iterator(iter([1, 2]))  # a plain iterator: nothing to close
    """
    for name in ("close", "_shutdown_workers"):
        stop = getattr(iterator, name, None)
        if callable(stop):
            stop()


def as_data(data: Any, *, batch_size: BatchSize = None) -> Data:
    """Return ``data`` as a :class:`Data` stream (idempotent).

    Parameters
    ----------
    data : Any
        One ``(inputs, targets)`` batch, a sequence of batches or a DataLoader (or a
        :class:`Data`, returned as it is).
    batch_size : str, int, callable or None
        How many samples a batch holds, for inputs whose first tensor is not
        batch-major (e.g. a dict whose first entry is a ``(T,)`` position vector):
        the key (dict inputs) or position (tuple inputs) of a batch-major input, or a
        function of the inputs returning the count.  ``None``: the length of the
        first tensor.  The counts weight the batches of losses normalised by the
        number of samples (:math:`L = \\frac1N \\sum_b N_b L_b`).  Pass the result
        to any operator (``HessianOperator(model, loss, as_data(batches,
        batch_size="input_ids"))``).

    Returns
    -------
    Data
        The checked stream.

    Raises
    ------
    TypeError
        ``batch_size`` of another type, or given together with a :class:`Data`.
    ValueError
        A batch whose counted samples do not match its targets, or a ``batch_size``
        that names no batch-major input or returns no positive int (the message
        names ``batch_size`` and the batch).

    Examples
    --------
    >>> as_data((torch.zeros(2, 3), torch.zeros(2))).is_single_batch
    True
    >>> inputs = {"positions": torch.arange(4), "x": torch.zeros(3, 4)}
    >>> as_data((inputs, torch.zeros(3)), batch_size="x").num_samples
    3
    """
    if isinstance(data, Data):
        if batch_size is not None:
            raise argument_error(
                "batch_size", "None when data is already a Data stream", batch_size, kind=TypeError
            )
        return data
    return Data(data, batch_size)
