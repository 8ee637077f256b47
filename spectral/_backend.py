"""Array-namespace helpers: the only module of :mod:`spectral` that touches ``array_api_compat``.

Algorithms in :mod:`spectral` work in the array namespace of the operator they
are given (numpy, torch tensors on any device, cupy, ``array_api_strict``...),
obtained here through :func:`namespace`.  Only small host-side quantities (the
``m x m`` tridiagonal matrix, probe vectors drawn with a numpy generator) cross
between the host and the namespace, through :func:`to_host_float64` and
:func:`from_host`.  Torch is never imported: torch tensors are handled through
``array_api_compat`` and duck typing.

>>> import numpy as np
>>> x = from_host(np.arange(3.0), like=np.zeros(1, dtype=np.float32))
>>> x.dtype
dtype('float32')
>>> to_host_float64(x)
array([0., 1., 2.])
"""

from __future__ import annotations

import importlib
from typing import Any

import array_api_compat
import numpy as np

__all__ = [
    "detach",
    "device",
    "divided",
    "finfo_eps",
    "from_host",
    "is_array",
    "is_real_floating",
    "namespace",
    "supports_item_assignment",
    "to_host_float64",
    "vector_norm",
    "xp_for_module",
]


def namespace(*arrays: Any) -> Any:
    """Return the (array-API compatible) namespace of ``arrays``.

    >>> import numpy as np
    >>> namespace(np.zeros(2)).__name__
    'array_api_compat.numpy'
    """
    return array_api_compat.array_namespace(*arrays)


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array of a library known to ``array_api_compat``.

    >>> import numpy as np
    >>> is_array(np.zeros(2)), is_array([0.0])
    (True, False)
    """
    return bool(array_api_compat.is_array_api_obj(x))


def device(x: Any) -> Any:
    """Return the device on which ``x`` lives (``"cpu"`` for numpy).

    >>> import numpy as np
    >>> device(np.zeros(2))
    'cpu'
    """
    return array_api_compat.device(x)


def detach(x: Any) -> Any:
    """Return ``x`` without autograd history (a torch tensor that requires grad), else ``x``.

    Lanczos, SLQ and the trace estimators are not differentiable (their coefficients
    go to the host as floats), so products are detached: no graph is kept alive, and
    torch's warnings on ``float()``/``asarray`` of a tensor requiring grad never fire.
    Duck-typed: torch is not imported.

    >>> import numpy as np
    >>> x = np.ones(2)
    >>> detach(x) is x
    True
    """
    if getattr(x, "requires_grad", False) and hasattr(x, "detach"):
        return x.detach()
    return x


def xp_for_module(module_name: str) -> Any:
    """Return the compat namespace of an array library given by name (``"numpy"``, ``"cupy"``).

    The library is imported lazily; this is used for operators (e.g. cupyx
    ``LinearOperator``) that carry no array from which a namespace can be read.

    >>> xp_for_module("numpy").__name__
    'array_api_compat.numpy'
    """
    lib = importlib.import_module(module_name)
    return array_api_compat.array_namespace(lib.zeros(1))


def is_real_floating(xp: Any, dtype: Any) -> bool:
    """Whether ``dtype`` is a real floating dtype in namespace ``xp``.

    >>> import numpy as np
    >>> xp = namespace(np.zeros(1))
    >>> is_real_floating(xp, np.dtype("float32")), is_real_floating(xp, np.dtype("int64"))
    (True, False)
    """
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - old namespaces
        return dtype in (getattr(xp, "float32", None), getattr(xp, "float64", None))


def finfo_eps(xp: Any, dtype: Any) -> float:
    """Machine epsilon of the floating dtype ``dtype`` of namespace ``xp``, as a Python float.

    >>> import numpy as np
    >>> finfo_eps(namespace(np.zeros(1)), np.dtype("float64")) == float(np.finfo(np.float64).eps)
    True
    """
    return float(xp.finfo(dtype).eps)


def supports_item_assignment(xp: Any) -> bool:
    """Whether arrays of ``xp`` can be updated in place with ``a[i, :] = v`` (not JAX).

    >>> import numpy as np
    >>> supports_item_assignment(namespace(np.zeros(1)))
    True
    """
    return not array_api_compat.is_jax_namespace(xp)


def vector_norm(xp: Any, x: Any, axis: int | None = None) -> Any:
    """Euclidean norm of ``x`` (or along ``axis``) as an array of ``xp`` (no host transfer).

    Safe from overflow and underflow: ``x`` is scaled by a power of two near its largest
    magnitude before the squares are summed, and the norm scaled back.  Powers of two
    scale exactly, so in the range where the plain :math:`\\sqrt{\\sum x_i^2}` is
    accurate the result is bitwise the same; outside it (float32 vectors with norm
    below about ``1e-19``, whose squares underflow; float64 below ``1e-154`` or above
    ``1e154``) the plain formula returned a norm wrong in every digit, and Lanczos on
    a float32 operator with norm ``1e-22`` gave Ritz values 78 % off without an error.

    >>> import numpy as np
    >>> float(vector_norm(namespace(np.zeros(1)), np.array([3.0, 4.0])))
    5.0
    >>> float(vector_norm(namespace(np.zeros(1)), np.array([3e-200, 4e-200])))
    5e-200
    >>> vector_norm(namespace(np.zeros(1)), np.array([[3.0, 4.0], [0.0, 0.0]]), axis=1).tolist()
    [5.0, 0.0]
    """
    linalg = getattr(xp, "linalg", None)

    def plain(y: Any) -> Any:
        if linalg is not None and hasattr(linalg, "vector_norm"):
            return linalg.vector_norm(y, axis=axis, keepdims=axis is not None)
        return xp.sqrt(xp.sum(y * y, axis=axis, keepdims=axis is not None))  # pragma: no cover

    if x.shape == () or 0 in x.shape:
        return plain(x) if axis is None else xp.squeeze(plain(x), axis=axis)
    largest = xp.max(xp.abs(x), axis=axis, keepdims=axis is not None)
    usable = xp.isfinite(largest) & (largest > 0)
    one = xp.ones_like(largest)
    exponent = xp.floor(xp.log2(xp.where(usable, largest, one)))  # 0 where unusable
    two = 2.0 * one
    down = xp.floor(-exponent / 2.0)  # two factors: 2**(+-140) is not a float32
    scaled = (x * xp.pow(two, down)) * xp.pow(two, -exponent - down)
    scaled = xp.where(usable, scaled, xp.zeros_like(scaled))  # no overflow warnings
    up = xp.floor(exponent / 2.0)
    norm = (plain(scaled) * xp.pow(two, exponent - up)) * xp.pow(two, up)
    # a NaN entry makes the largest magnitude NaN, an infinite one (and no NaN) Inf:
    # exactly the norm then
    norm = xp.where(usable | (largest == 0), norm, largest)
    return norm if axis is None else xp.squeeze(norm, axis=axis)


def divided(xp: Any, x: Any, norm: float) -> Any:
    """``x / norm`` for a positive finite ``norm``, as ``x * (1 / norm)`` (one rounded
    reciprocal, what the algorithms have always done) unless that reciprocal overflows
    ``x``'s dtype: a subnormal ``norm``, from a subnormal operator, whose reciprocal is
    ``inf`` and turned a finite vector into NaN ("the product contains NaN or Inf").

    >>> import numpy as np
    >>> divided(namespace(np.zeros(1)), np.array([3e-310, 4e-310]), 5e-310).tolist()
    [0.6, 0.8]
    """
    inverse = 1.0 / norm
    if inverse <= float(xp.finfo(x.dtype).max):
        return x * inverse
    return x / norm


def to_host_float64(x: Any) -> np.ndarray:
    """Copy ``x`` (any namespace, any device) to a float64 numpy array on the host.

    Torch tensors are detached and moved to the CPU; other arrays go through
    DLPack or ``np.asarray``.

    >>> import numpy as np
    >>> to_host_float64(np.array([1, 2], dtype=np.int32))
    array([1., 2.])
    """
    if isinstance(x, np.ndarray | np.generic | float | int):
        return np.asarray(x, dtype=np.float64)
    if array_api_compat.is_torch_array(x):
        host = x.detach().cpu()
        if host.dtype == host.new_empty(()).bfloat16().dtype:  # numpy has no bfloat16
            host = host.float()  # exact: every bfloat16 is a float32
        return np.asarray(host.numpy(), dtype=np.float64)
    if array_api_compat.is_cupy_array(x):  # pragma: no cover - needs cupy
        return np.asarray(x.get(), dtype=np.float64)
    try:
        return np.asarray(np.from_dlpack(x), dtype=np.float64)
    except (TypeError, RuntimeError, BufferError, AttributeError):
        host = array_api_compat.to_device(x, "cpu")
        return np.asarray(host, dtype=np.float64)


def from_host(values: Any, *, like: Any) -> Any:
    """Transfer the host array ``values`` to the namespace, device and dtype of ``like``.

    >>> import numpy as np
    >>> from_host([1.0, 2.0], like=np.zeros(3)).tolist()
    [1.0, 2.0]
    """
    xp = namespace(like)
    host = np.asarray(values, dtype=np.float64)
    if array_api_compat.is_numpy_array(like):
        return host.astype(like.dtype, copy=False)
    if array_api_compat.is_torch_array(like):
        # torch's asarray keeps numpy's float64 buffer then casts on the target device.
        return xp.asarray(host, dtype=like.dtype, device=like.device)
    arr = xp.asarray(host)
    arr = xp.astype(arr, like.dtype)
    dev = device(like)
    if device(arr) != dev:  # pragma: no cover - accelerator arrays
        arr = array_api_compat.to_device(arr, dev)
    return arr
