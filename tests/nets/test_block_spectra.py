"""compute_block_spectra: every block's SLQ against the dense float64 sub-block, the file,
determinism, the partitions and their errors (the CLI and the figure: test_cli_block_spectra)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from curvops.blocks import ParamSlice
from nets import BlockSpectraResult, compute_block_spectra, load_block_spectra
from nets.workflow.block_spectra import block_partition, block_seed
from spectral.probes import random_probe
from spectral.quadrature import slq

N, D_IN, HIDDEN, CLASSES = 12, 3, 4, 3
SIZES = {"0.weight": HIDDEN * D_IN, "0.bias": HIDDEN, "2.weight": CLASSES * HIDDEN, "2.bias": 3}
OFFSETS = dict(zip(SIZES, np.cumsum([0, *SIZES.values()])[:-1].tolist()))
ITERS, PROBES, SEED = 8, 2, 3


def tiny_mlp() -> nn.Module:
    """31 parameters in float64: 3 -> 4 (tanh) -> 3."""
    with torch.random.fork_rng():  # the layers' own initialisation, overwritten below
        net = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))
    net = net.double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return net


def data() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N,), generator=g)
    return TensorDataset(x, y)


def dense_hessian(net: nn.Module, dataset: TensorDataset) -> np.ndarray:
    """The Hessian of the mean cross-entropy over all samples, by
    torch.autograd.functional.hessian of the network written out by hand."""
    x, y = dataset.tensors
    theta0 = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(theta: torch.Tensor) -> torch.Tensor:
        part = {k: theta[o : o + SIZES[k]] for k, o in OFFSETS.items()}
        w1, w2 = part["0.weight"].view(HIDDEN, D_IN), part["2.weight"].view(CLASSES, HIDDEN)
        hidden = torch.tanh(x @ w1.T + part["0.bias"])
        return nn.functional.cross_entropy(hidden @ w2.T + part["2.bias"], y)

    hessian = torch.autograd.functional.hessian(loss, theta0)
    return np.asarray(hessian.numpy(), dtype=np.float64)


def entries(name: str, index: Any = None) -> list[int]:
    """Coordinates of (part of) a parameter in the flat parameter vector."""
    flat = range(SIZES[name]) if index is None else index
    return [OFFSETS[name] + int(i) for i in flat]


REST = [0, 1, 2, 6, 7, 8, 9, 10, 11]

#: partition -> the coordinates of each block, in the block's own order
PARTITIONS: dict[str, tuple[Any, dict[str, list[int]]]] = {
    "layers": (
        "layers",
        {
            "0": entries("0.weight") + entries("0.bias"),
            "2": entries("2.weight") + entries("2.bias"),
        },
    ),
    "custom": (
        {
            "biases": ["*.bias"],
            "row 1 of layer 0, layer 2": [
                ParamSlice("2.weight"),
                ParamSlice("0.weight", torch.tensor([3, 4, 5])),
            ],
            "rest of layer 0": [ParamSlice("0.weight", torch.tensor(REST))],
        },
        {
            "biases": entries("0.bias") + entries("2.bias"),
            "row 1 of layer 0, layer 2": entries("0.weight", [3, 4, 5]) + entries("2.weight"),
            "rest of layer 0": entries("0.weight", REST),
        },
    ),
}


@pytest.fixture(scope="module")
def hessian() -> np.ndarray:
    return dense_hessian(tiny_mlp(), data())


def run(blocks: Any, **kwargs: Any) -> BlockSpectraResult:
    options: dict[str, Any] = dict(
        model=tiny_mlp(), lanczos_iters=ITERS, num_probes=PROBES, batch_size=5, seed=SEED,
        device="cpu",
    )  # fmt: skip
    options.update(kwargs)
    return compute_block_spectra(data(), blocks=blocks, **options)


@pytest.mark.parametrize("name", sorted(PARTITIONS))
def test_every_block_is_slq_of_the_dense_float64_sub_block(hessian: np.ndarray, name: str) -> None:
    blocks, coordinates = PARTITIONS[name]
    res = run(blocks)
    assert list(res.blocks) == list(coordinates)
    for index, (label, idx) in enumerate(coordinates.items()):
        b = res.blocks[label]
        sub = hessian[np.ix_(idx, idx)]
        assert b.size == len(idx) and b.lanczos_iters == min(ITERS, len(idx))
        assert b.seed == block_seed(SEED, index)
        want = slq(sub, b.lanczos_iters, num_probes=PROBES, seed=b.seed)  # the same probes
        assert want.probe_nodes is not None and want.probe_weights is not None
        scale = float(np.abs(np.linalg.eigvalsh(sub)).max())
        np.testing.assert_allclose(b.probe_nodes, want.probe_nodes, rtol=1e-9, atol=1e-11 * scale)
        np.testing.assert_allclose(b.probe_weights, want.probe_weights, rtol=1e-8, atol=1e-11)
        np.testing.assert_allclose(b.values, want.nodes, rtol=1e-9, atol=1e-11 * scale)
        for power in range(5):  # the pooled measure (ties between probes may swap order)
            moment = float(np.sum(want.weights * want.nodes**power))
            got = float(np.sum(b.weights * b.values**power))
            assert got == pytest.approx(moment, rel=1e-8, abs=1e-11 * scale**power)
        # the top Ritz value: below lambda_max (interlacing), within its Ritz residual of it
        top_eig = float(np.linalg.eigvalsh(sub)[-1])
        residual = float(b.residuals[np.argmax(b.values)])
        assert -1e-10 * scale <= top_eig - b.top <= residual + 1e-10 * scale, (label, residual)
        if b.lanczos_iters == b.size:
            assert b.top == pytest.approx(top_eig, rel=1e-10, abs=1e-12 * scale)
        # the trace is Hutchinson's estimate with the same probes
        rng = np.random.default_rng(b.seed)
        probes = [random_probe(b.size, "rademacher", rng) for _ in range(PROBES)]
        hutchinson = np.mean([v @ sub @ v for v in probes])
        assert b.trace == pytest.approx(hutchinson, rel=1e-9, abs=1e-11 * scale * b.size)
        assert b.negative_mass == pytest.approx(float(np.sum(b.weights[b.values < 0])))


def test_same_seed_same_result_bit_for_bit_and_another_seed_other_probes() -> None:
    one, two = run("layers"), run("layers")
    a, b = one.to_arrays(), two.to_arrays()
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=a[key].dtype.kind == "f"), key
    other = run("layers", seed=SEED + 1)
    assert not np.allclose(other.blocks["0"].values, one.blocks["0"].values)


def test_the_file_round_trips_without_pickle(tmp_path: Path) -> None:
    res = run(PARTITIONS["custom"][0], save_path=tmp_path / "blocks")
    assert res.path == tmp_path / "blocks.npz" and not list(tmp_path.glob(".*"))
    with np.load(res.path, allow_pickle=False) as raw:
        keys = set(raw.files)
        assert raw["probe_nodes"].shape == (3, PROBES, ITERS)
    assert {"labels", "sizes", "w", "gammas", "trace", "top", "negative_mass"} <= keys
    assert "config_json" in keys and "model_fingerprint" in keys
    back = load_block_spectra(tmp_path / "blocks")
    assert list(back.blocks) == list(res.blocks) and back.config == res.config
    assert back.config["function"] == "compute_block_spectra" and back.partition == "custom"
    assert (back.curvature, back.bn_mode, back.num_probes) == ("hessian", "train", PROBES)
    for label, b in res.blocks.items():
        c = back.blocks[label]
        for field in ("values", "weights", "residuals", "probe_nodes", "probe_weights"):
            assert np.array_equal(getattr(b, field), getattr(c, field)), (label, field)
        assert (c.size, c.seed, c.trace, c.top, c.params) == (
            b.size,
            b.seed,
            b.trace,
            b.top,
            b.params,
        )
    assert back.blocks["row 1 of layer 0, layer 2"].params == ("2.weight", "0.weight[3 of 12]")
    params = json.loads(str(back.to_arrays()["block_params_json"]))
    assert params["biases"] == ["0.bias", "2.bias"]
    # another file is refused with the argument named
    np.savez(tmp_path / "other.npz", w=np.ones(2))
    with pytest.raises(ValueError, match=r"Argument 'path'.*per-block spectra file"):
        load_block_spectra(tmp_path / "other.npz")


def test_heterogeneity_statistics() -> None:
    res = run("layers")
    stats = res.heterogeneity()
    tops = [b.top for b in res.blocks.values()]
    assert stats["top_spread"] == pytest.approx(np.log10(max(tops) / min(tops)))
    js = stats["js_distance"]
    assert js.shape == (2, 2) and np.allclose(js, js.T) and np.all(np.diag(js) == 0)
    assert 0 < js[0, 1] <= 1 and stats["mean_js_distance"] == pytest.approx(js[0, 1])


@pytest.mark.parametrize(
    ("blocks", "kwargs", "kind", "argument"),
    [
        ("nope", {}, ValueError, "blocks"),
        (3, {}, TypeError, "blocks"),
        ({}, {}, ValueError, "blocks"),
        ("transformer:heads=x", {}, ValueError, "blocks"),
        ("transformer:heads=2", {"heads": 3}, ValueError, "heads"),
        ("layers", {"heads": 2}, ValueError, "heads"),
        ({"a": ["0.weight"]}, {"heads": 2}, ValueError, "heads"),
        ({"a": ["0.weight"]}, {"params": "0.*"}, ValueError, "params"),
        ("layers", {"lanczos_iters": 0}, ValueError, "lanczos_iters"),
        ("layers", {"curvature_matrix": "nope"}, ValueError, "curvature_matrix"),
    ],
)
def test_bad_arguments_are_named(
    blocks: Any, kwargs: dict[str, Any], kind: type, argument: str
) -> None:
    with pytest.raises(kind, match=rf"Argument '{argument}'"):
        run(blocks, **kwargs)


def test_partitions_of_a_transformer_and_params() -> None:
    from nets import get_model

    gpt = get_model("gpt-tiny", 11, 1, 6, n_layer=1, d_model=4, n_head=2, seed=0)
    partition, described = block_partition(gpt, "transformer:heads=2")
    assert (
        described == "transformer:heads=2"
        and "transformer.h.0.attn.q_proj (q, head 1)" in partition
    )
    assert block_partition(gpt, "Transformer", heads=2)[0].keys() == partition.keys()
    layers, described = block_partition(tiny_mlp(), "layers", params="*.weight")
    assert described == "layers" and layers == {"0": ["0.weight"], "2": ["2.weight"]}
