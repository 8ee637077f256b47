"""per_block on sliced parameters: rows and columns in the parameter order of the full operator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from curvops import BlockDiagonal, Dense, GGNOperator, compare, per_block, transformer_blocks
from curvops.algebra import parameter_names_of
from curvops.blocks import ParamSlice
from curvops.losses import declare_loss
from curvops.structure import exact_eigenvalues, exact_inverse, exact_top_eigenpairs

EPS = float(np.finfo(np.float64).eps)


def _layer_and_data() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=4, dropout=0.0, batch_first=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    return layer.double(), (x, torch.randn(2, 3, 4, generator=g, dtype=torch.float64))


def _mse():  # type: ignore[no-untyped-def]
    return declare_loss(lambda f, y: (f - y).square().mean())


def _block_part(model: nn.Module, full: np.ndarray, blocks: dict) -> np.ndarray:
    """The block-diagonal part of ``full`` (parameter order) for the slices ``blocks``."""
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name], start = start, start + p.numel()
    out = np.zeros_like(full)
    for slices in blocks.values():
        idx = np.concatenate(
            [
                offsets[s.name]
                + (
                    np.arange(dict(model.named_parameters())[s.name].numel())
                    if s.index is None
                    else s.index.numpy()
                )
                for s in slices
            ]
        )
        out[np.ix_(idx, idx)] = full[np.ix_(idx, idx)]
    return out


@pytest.mark.parametrize("heads", [None, 2])
def test_sliced_blocks_are_the_block_diagonal_part_in_parameter_order(heads: int | None) -> None:
    layer, data = _layer_and_data()
    blocks = transformer_blocks(layer, heads=heads)
    B = per_block(GGNOperator, layer, _mse(), data, blocks)
    G = GGNOperator(layer, _mse(), data)
    n = G.shape[0]
    full = np.asarray(G @ np.eye(n))
    ref = _block_part(layer, full, blocks)
    Bd = np.asarray(B @ np.eye(n))
    tol = 100 * n * EPS * np.abs(full).max()
    assert np.abs(Bd - ref).max() <= tol
    assert parameter_names_of(B) == parameter_names_of(G)
    # sums and products pair the same coordinates
    S = np.asarray((B + G) @ np.eye(n))
    assert np.abs(S - (ref + full)).max() <= 2 * tol
    # compare grades the same matrix as the explicitly ordered dense block-diagonal part
    settings = {"k": 2, "num_iters": 15, "seed": 0, "damping": 1e-2}
    got = compare(B, G, **settings)
    want = compare(Dense(ref, symmetric=True), G, **settings)
    np.testing.assert_allclose(got.quadratic_form_errors, want.quadratic_form_errors, rtol=1e-8)
    assert got.newton_step_error == pytest.approx(want.newton_step_error, rel=1e-6)


def test_whole_parameter_blocks_in_another_order_use_the_model_order() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    data = (torch.ones(4, 2, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64))
    loss = nn.MSELoss()
    B = per_block(GGNOperator, net, loss, data, {"second": "2.*", "first": "0.*"})
    G = GGNOperator(net, loss, data)
    n = G.shape[0]
    full = np.asarray(G @ np.eye(n))
    ref = np.zeros_like(full)
    ref[:9, :9], ref[9:, 9:] = full[:9, :9], full[9:, 9:]
    np.testing.assert_allclose(B @ np.eye(n), ref, rtol=0, atol=100 * n * EPS * np.abs(full).max())
    assert parameter_names_of(B) == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert compare(B, G, k=2, num_iters=10, seed=0) is not None


def test_parts_of_a_parameter_combine_only_with_the_same_parts() -> None:
    layer, data = _layer_and_data()
    blocks = transformer_blocks(layer, heads=2)
    q0 = per_block(GGNOperator, layer, _mse(), data, {"q0": blocks["self_attn (q, head 0)"]})
    k0 = per_block(GGNOperator, layer, _mse(), data, {"k0": blocks["self_attn (k, head 0)"]})
    names = parameter_names_of(q0)
    assert names is not None and names[0].startswith("self_attn.in_proj_weight[8 of 48 entries")
    assert q0.shape == k0.shape
    with pytest.raises(ValueError, match=r"'B'.*same parameters"):
        q0 + k0
    assert (q0 + q0).shape == q0.shape


def test_overlapping_blocks_are_refused() -> None:
    layer, data = _layer_and_data()
    part = [ParamSlice("self_attn.in_proj_bias", torch.tensor([0, 1]))]
    with pytest.raises(ValueError, match=r"'blocks'.*non-overlapping"):
        per_block(GGNOperator, layer, _mse(), data, {"a": part, "b": ["self_attn.in_proj_bias"]})


def test_block_diagonal_on_scattered_positions_keeps_its_exact_structure() -> None:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((3, 3))
    A = A + A.T
    C = np.diag([2.0, -1.0])
    positions = [[4, 0, 2], [1, 3]]
    B = BlockDiagonal([Dense(A, symmetric=True), Dense(C, symmetric=True)], positions=positions)
    M = np.zeros((5, 5))
    M[np.ix_(positions[0], positions[0])] = A
    M[np.ix_(positions[1], positions[1])] = C
    np.testing.assert_allclose(B @ np.eye(5), M, rtol=0, atol=1e-15)
    np.testing.assert_allclose(B.T @ np.eye(5), M.T, rtol=0, atol=1e-15)
    np.testing.assert_allclose(exact_eigenvalues(B).numpy(), np.linalg.eigvalsh(M), atol=1e-14)
    inv = exact_inverse(B, 0.5)
    np.testing.assert_allclose(inv @ np.eye(5), np.linalg.inv(M + 0.5 * np.eye(5)), atol=1e-13)
    vals, vecs = exact_top_eigenpairs(B, 2)
    np.testing.assert_allclose(M @ vecs.numpy(), vecs.numpy() * vals.numpy(), atol=1e-13)
    with pytest.raises(ValueError, match="'positions'"):
        BlockDiagonal(B.blocks, positions=[[0, 1, 2], [2, 3]])
