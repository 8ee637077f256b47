"""Array types are preserved: numpy -> numpy, torch -> torch (same device), cupy -> cupy."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from curvops import Dense, Diagonal, LowRank
from curvops._arrays import array_kind, as_tensor_arg, from_torch, to_torch

HAS_CUDA = torch.cuda.is_available()
HAS_CUPY = importlib.util.find_spec("cupy") is not None
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def make_op(dtype: torch.dtype = torch.float64, device: str = "cpu") -> Dense:
    M = np.random.default_rng(0).standard_normal((6, 6))
    return Dense(M + M.T, device=device, dtype=dtype)


def test_numpy_in_numpy_out_with_operator_dtype() -> None:
    op = make_op(torch.float32)
    y = op @ np.ones(6)  # float64 input is cast to the operator's float32
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (6,)
    y = op @ np.ones(6, dtype=np.int8)  # integers are cast too
    assert y.dtype == np.float32
    y = op @ ([1.0] * 6)
    assert isinstance(y, np.ndarray)


def test_torch_in_torch_out_on_device() -> None:
    op = make_op()
    x = torch.arange(6.0, dtype=torch.float64)
    y = op @ x
    assert isinstance(y, torch.Tensor) and y.device == op.device and y.dtype == torch.float64
    Y = op.matmat(torch.ones(6, 2, dtype=torch.float64))
    assert isinstance(Y, torch.Tensor) and Y.shape == (6, 2)
    assert isinstance(torch.ones(2, 6, dtype=torch.float64) @ op, torch.Tensor)
    # float32 tensors are cast to the operator's dtype (documented rule)
    assert (op @ x.float()).dtype == torch.float64


def test_numpy_and_torch_paths_bitwise_equal() -> None:
    op = make_op() @ make_op() + LowRank(np.ones((6, 2)), [1.0, -1.0])
    X = np.random.default_rng(1).standard_normal((6, 3))
    np.testing.assert_array_equal(op @ X, (op @ torch.from_numpy(X)).numpy())
    np.testing.assert_array_equal(op @ X[:, 0], (op @ torch.from_numpy(X[:, 0])).numpy())


def test_result_does_not_alias_input() -> None:
    from curvops import Identity

    x = np.ones(3)
    y = Identity(3) @ x
    y[0] = 5.0
    assert x[0] == 1.0


def test_read_only_and_strided_numpy_inputs() -> None:
    op = make_op()
    x = np.arange(12.0)[::2]
    x.flags.writeable = False
    np.testing.assert_allclose(op @ x, op @ np.ascontiguousarray(x), rtol=0)


def test_complex_and_object_inputs_refused() -> None:
    op = make_op()
    with pytest.raises(TypeError, match="real"):
        op @ np.ones(6, dtype=complex)
    with pytest.raises(TypeError, match="real"):
        op @ torch.ones(6, dtype=torch.complex128)
    with pytest.raises(TypeError):
        op @ np.array(["a"] * 6)


def test_tensor_on_other_device_refused() -> None:
    op = make_op()
    x = torch.ones(6, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="operator's device cpu"):
        op @ x


def test_helpers() -> None:
    assert array_kind(np.ones(2)) == "numpy" and array_kind(torch.ones(2)) == "torch"
    t, kind = to_torch(np.ones(2), device=torch.device("cpu"), dtype=torch.float64, name="x")
    assert kind == "numpy" and from_torch(t, kind).dtype == np.float64
    src = np.ones(3)
    copy = as_tensor_arg(src, "d")
    src[0] = 7.0
    assert float(copy[0]) == 1.0  # constructor arguments are copied
    with pytest.raises(TypeError):
        as_tensor_arg(np.ones(2, dtype=complex), "d")


@gpu
def test_cuda_operator_keeps_tensors_on_device() -> None:
    op = Diagonal(torch.arange(1.0, 5.0, device="cuda"))
    assert op.device.type == "cuda"
    x = torch.ones(4, device="cuda")
    y = op @ x
    assert y.device == op.device
    np.testing.assert_allclose(op @ np.ones(4, dtype=np.float32), [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="device"):
        op @ torch.ones(4)
    assert op.template_vector().device == op.device


@pytest.mark.skipif(not (HAS_CUDA and HAS_CUPY), reason="needs cupy and a CUDA device")
def test_cupy_in_cupy_out() -> None:
    import cupy

    op = Diagonal(torch.arange(1.0, 5.0, dtype=torch.float64, device="cuda"))
    x = cupy.ones(4)
    y = op @ x
    assert isinstance(y, cupy.ndarray)
    cupy.testing.assert_allclose(y, cupy.arange(1.0, 5.0))
    Y = op.matmat(cupy.ones((4, 2)))
    assert isinstance(Y, cupy.ndarray) and Y.shape == (4, 2)
