"""Conversion between the caller's array type and torch tensors on an operator's device.

Every :class:`~curvops.operator.CurvatureOperator` computes in torch on its own
device and dtype.  This module moves the caller's vectors in and the results
out, so that the array type is preserved:

* ``numpy.ndarray`` (or anything :func:`numpy.asarray` accepts) in, ``numpy.ndarray``
  out (an ``np.matrix`` stays an ``np.matrix``);
* ``torch.Tensor`` in, ``torch.Tensor`` out on the operator's device, without any
  host copy; a tensor on another device is refused (moving data between devices is
  the caller's decision);
* ``cupy.ndarray`` in, ``cupy.ndarray`` out, exchanged through DLPack (zero copy).

Dtype rule (the same for all three types): real inputs of another dtype (another
float width, integers, booleans) are cast to the operator's dtype, and the output
has the operator's dtype.  Complex inputs are refused with a ``TypeError``.

>>> import numpy as np, torch
>>> t, kind = to_torch(np.ones(3), device=torch.device("cpu"), dtype=torch.float32, name="x")
>>> kind, t.dtype
('numpy', torch.float32)
>>> from_torch(2 * t, kind, like=np.ones(3))
array([2., 2., 2.], dtype=float32)
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from spectral.errors import argument_error

__all__ = [
    "SUPPORTED_DTYPES",
    "ArrayKind",
    "array_kind",
    "as_tensor_arg",
    "as_torch_device",
    "from_torch",
    "numpy_dtype",
    "to_torch",
    "torch_dtype_of",
    "transpose",
]

ArrayKind = Literal["numpy", "torch", "cupy"]

#: numpy dtype -> torch dtype for the floating types an operator may have.
SUPPORTED_DTYPES: dict[np.dtype[Any], torch.dtype] = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}
_TORCH_TO_NUMPY = {v: k for k, v in SUPPORTED_DTYPES.items()}
# numpy has no bfloat16: a bfloat16 operator computes in bfloat16 and shows numpy
# (and cupy) callers float32, a lossless widening of every bfloat16 value.
_TORCH_TO_NUMPY[torch.bfloat16] = np.dtype(np.float32)


def numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    """Return the numpy dtype of a supported torch floating dtype.

    ``torch.bfloat16`` (which numpy lacks) maps to float32, its lossless widening.

    >>> numpy_dtype(torch.float32), numpy_dtype(torch.bfloat16)
    (dtype('float32'), dtype('float32'))
    """
    try:
        return _TORCH_TO_NUMPY[dtype]
    except KeyError:
        raise argument_error(
            "dtype",
            "one of torch.float16, torch.bfloat16, torch.float32, torch.float64",
            dtype,
            kind=TypeError,
        ) from None


def torch_dtype_of(dtype: Any) -> torch.dtype:
    """Return the torch dtype for a numpy dtype (or anything ``np.dtype`` accepts).

    >>> torch_dtype_of("float64")
    torch.float64
    """
    if isinstance(dtype, torch.dtype):
        numpy_dtype(dtype)  # validates
        return dtype
    try:
        key = np.dtype(dtype)
    except TypeError:
        raise argument_error(
            "dtype", "a real floating dtype (float16, float32, float64)", dtype, kind=TypeError
        ) from None
    if key not in SUPPORTED_DTYPES:
        raise argument_error(
            "dtype", "a real floating dtype (float16, float32, float64)", dtype, kind=TypeError
        )
    return SUPPORTED_DTYPES[key]


def as_torch_device(device: Any) -> torch.device:
    """Normalise ``device`` to a ``torch.device`` with an explicit index for accelerators.

    ``"cuda"`` becomes ``cuda:<current device>`` so that comparisons with a tensor's
    ``.device`` are exact.

    >>> as_torch_device(None)
    device(type='cpu')
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError):
        raise argument_error(
            "device", "a torch.device or device string", device, kind=TypeError
        ) from None
    if dev.type != "cpu" and dev.index is None:
        dev = torch.empty(0, device=dev).device
    return dev


def array_kind(x: Any) -> ArrayKind:
    """Classify ``x`` as ``"torch"``, ``"cupy"`` or ``"numpy"`` (the fallback).

    >>> array_kind(torch.zeros(2)), array_kind([1.0, 2.0])
    ('torch', 'numpy')
    """
    if isinstance(x, torch.Tensor):
        return "torch"
    module = type(x).__module__.split(".")[0]
    if module == "cupy":
        return "cupy"
    return "numpy"


def _complex_error(name: str, x: Any) -> Exception:
    return argument_error(
        name, "a real array (complex operators are not supported)", x, kind=TypeError
    )


def to_torch(
    x: Any, *, device: torch.device, dtype: torch.dtype, name: str
) -> tuple[torch.Tensor, ArrayKind]:
    """Convert ``x`` to a tensor on ``device`` with ``dtype``; also return its kind.

    numpy input is converted (on a CPU device without a copy when the dtype already
    matches; the operator never writes into its inputs); a torch tensor must already
    live on ``device``; cupy input is imported through DLPack.

    Raises
    ------
    TypeError
        Complex or non-numeric input.
    ValueError
        A torch or cupy array on a device other than ``device``.
    """
    kind = array_kind(x)
    if kind == "torch":
        t: torch.Tensor = x
        if t.is_complex():
            raise _complex_error(name, x)
        if t.device != device:
            raise argument_error(
                name,
                f"a tensor on the operator's device {device} (move it with .to({str(device)!r}))",
                x,
            )
        return (t if t.dtype == dtype else t.to(dtype)), kind
    if kind == "cupy":
        if x.dtype.kind == "c":
            raise _complex_error(name, x)
        t = torch.from_dlpack(x)
        if t.device != device:
            raise argument_error(name, f"a cupy array on the operator's device {device}", x)
        return (t if t.dtype == dtype else t.to(dtype)), kind
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError):
        raise argument_error(name, "an array", x, kind=TypeError) from None
    if arr.dtype.kind == "c":
        raise _complex_error(name, x)
    if arr.dtype.kind not in "fiub":
        raise argument_error(name, "a real numeric array", x, kind=TypeError)
    with np.errstate(over="ignore"):  # entries beyond the dtype's range become inf, as
        arr = np.ascontiguousarray(arr, dtype=numpy_dtype(dtype))  # torch's cast makes them
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr).to(device=device, dtype=dtype), kind


def from_torch(y: torch.Tensor, kind: ArrayKind, like: Any = None) -> Any:
    """Convert a result tensor back to the caller's array type ``kind``.

    ``like`` is the original input: an ``np.matrix`` input gives an ``np.matrix``.
    """
    y = y.detach()
    if kind == "torch":
        return y
    if y.dtype == torch.bfloat16:  # numpy and cupy have no bfloat16: widen losslessly
        y = y.to(torch.float32)
    if kind == "cupy":
        import cupy  # only reached when the caller passed a cupy array

        return cupy.from_dlpack(y)
    out = y.cpu().numpy()
    if isinstance(like, np.matrix):
        return np.asmatrix(out)
    return out


def transpose(x: Any) -> Any:
    """Transpose a 2-D array of any kind (``.mT`` for torch, ``.T`` otherwise); 1-D unchanged.

    >>> transpose(torch.zeros(2, 3)).shape
    torch.Size([3, 2])
    """
    if getattr(x, "ndim", 2) < 2:
        return x
    if isinstance(x, torch.Tensor):
        return x.mT
    return x.T


def as_tensor_arg(
    x: Any,
    name: str,
    *,
    device: Any = None,
    dtype: Any = None,
) -> torch.Tensor:
    """Copy a constructor argument (numpy, torch, cupy or nested lists) into a private tensor.

    The device defaults to the input's own device (CPU for numpy); the dtype defaults to
    the input's dtype when it is a supported float, float64 otherwise.  The result is a
    fresh copy, so later changes to ``x`` cannot alter an operator built from it.

    >>> as_tensor_arg([1, 2], "d")
    tensor([1., 2.], dtype=torch.float64)
    """
    kind = array_kind(x)
    if kind == "torch":
        t = x.detach()
    elif kind == "cupy":
        t = torch.from_dlpack(x)
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError):
            raise argument_error(name, "an array", x, kind=TypeError) from None
        if arr.dtype.kind not in "fiub":
            raise argument_error(name, "a real numeric array", x, kind=TypeError)
        t = torch.from_numpy(np.array(arr, copy=True))
    if t.is_complex():
        raise _complex_error(name, x)
    if dtype is not None:
        target = torch_dtype_of(dtype)
    elif t.dtype in _TORCH_TO_NUMPY:
        target = t.dtype
    else:
        target = torch.float64
    dev = as_torch_device(device) if device is not None else as_torch_device(t.device)
    return t.to(device=dev, dtype=target).clone()
