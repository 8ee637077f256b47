"""Argument resolution and directions of the workflow (nets.workflow._resolve, .directions)."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from nets.checkpoint import save_checkpoint
from nets.data import load_dataset
from nets.models import get_model, model_spec
from nets.workflow._resolve import (
    check_int,
    check_positive_float,
    default_loss,
    eigvec_file,
    make_eval_loader,
    model_fingerprint,
    parse_curvature,
    preserve_global_state,
    resolve_data,
    resolve_model,
    spectrum_file,
    subsample_dataset,
)
from nets.workflow.directions import (
    ParamSpace,
    filter_normalised_directions,
    parse_planes,
    parse_ritz_spec,
    random_directions,
    ritz_directions,
)
from nets.workflow.landscape import landscape_grid
from nets.workflow.spectrum import lanczos_spectrum
from spectral.probes import random_probe
from spectral.quadrature import slq


def tiny_mlp(seed: int = 0) -> nn.Module:
    return get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(6,), seed=seed)


# ----------------------------------------------------------------------------- curvature names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("hessian", "hessian"),
        ("Hessian", "hessian"),
        ("hessian-lanczos", "hessian"),
        ("hessian_lanczos", "hessian"),
        ("HESSIAN_LANCZOS", "hessian"),
        ("ggn", "ggn"),
        ("GGN", "ggn"),
        ("ggn-lanczos", "ggn"),
        ("ggn_lanczos", "ggn"),
        ("lanczos-ggn", "ggn"),
        ("gauss_newton", "ggn"),
        ("fisher", "fisher"),
        ("fisher-lanczos", "fisher"),
        ("empirical_fisher", "empirical-fisher"),
    ],
)
def test_parse_curvature_spellings(name: str, expected: str) -> None:
    assert parse_curvature(name) == expected


def test_parse_curvature_unknown_lists_options() -> None:
    with pytest.raises(ValueError, match=r"curvature_matrix.*ggn-lanczos.*'kfac'"):
        parse_curvature("kfac")
    with pytest.raises(TypeError, match="curvature_matrix"):
        parse_curvature(3)


# ----------------------------------------------------------------------------- scalars and paths


@pytest.mark.parametrize("bad", [0, -1])
def test_check_int_range(bad: int) -> None:
    with pytest.raises(ValueError, match=r"'lanczos_iters'.*1 <= lanczos_iters"):
        check_int("lanczos_iters", bad, 1)


def test_check_int_type() -> None:
    with pytest.raises(TypeError, match="'n_points'"):
        check_int("n_points", 2.5, 2)
    with pytest.raises(TypeError, match="'n_points'"):
        check_int("n_points", True, 2)


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_dist_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="'dist'"):
        check_positive_float("dist", bad)
    with pytest.raises(ValueError, match="'dist'"):
        landscape_grid(bad, 5)


def test_landscape_grid() -> None:
    with pytest.raises(ValueError, match="'n_points'"):
        landscape_grid(1.0, 1)
    t = landscape_grid(0.3, 21)
    assert t[10] == 0.0 and t[0] == -0.3 and t[-1] == 0.3
    np.testing.assert_array_equal(t, -t[::-1])


def test_spectrum_and_eigvec_paths() -> None:
    assert str(spectrum_file("a/spectrum-100-hessian")) == "a/spectrum-100-hessian.npz"
    assert str(spectrum_file("a/s.npz")) == "a/s.npz"
    assert str(eigvec_file("a/s")) == "a/s-eigvec.npz"
    assert str(eigvec_file("a/s.npz")) == "a/s-eigvec.npz"


def test_default_loss_refuses_non_mean_reduction() -> None:
    assert isinstance(default_loss(None), nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="reduction='mean'"):
        default_loss(nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(TypeError, match="loss_fn"):
        default_loss(3)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- data


def test_subsample_is_seeded_and_sized() -> None:
    ds = TensorDataset(torch.arange(100.0).reshape(100, 1), torch.zeros(100, dtype=torch.long))
    a = subsample_dataset(ds, 10, seed=3)
    b = subsample_dataset(ds, 10, seed=3)
    c = subsample_dataset(ds, 0.1, seed=4)
    assert len(a) == 10 and list(a.indices) == list(b.indices)
    assert list(a.indices) == sorted(a.indices)
    assert len(c) == 10 and list(c.indices) != list(a.indices)
    assert subsample_dataset(ds, None, 0) is ds
    for bad in (0, 101, 0.0, 1.5):
        with pytest.raises(ValueError, match="'subsample'"):
            subsample_dataset(ds, bad, 0)
    with pytest.raises(TypeError, match="'subsample'"):
        subsample_dataset(ds, "half", 0)  # type: ignore[arg-type]


def test_resolve_data_forms() -> None:
    splits = load_dataset("digits")
    by_name = resolve_data("digits")
    assert by_name.name == "digits" and by_name.num_classes == 10
    assert len(by_name.train) == len(splits.train_eval)  # type: ignore[arg-type]
    assert resolve_data(splits).train is splits.train_eval
    ds = TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    assert resolve_data(ds).test is None
    assert resolve_data((ds, ds)).test is ds
    loader = make_eval_loader(ds, 2)
    assert resolve_data(loader).train is loader
    with pytest.raises(TypeError, match="'dataset'"):
        resolve_data(42)
    with pytest.raises(ValueError, match="'dataset'"):
        make_eval_loader(TensorDataset(torch.zeros(0, 2)), 2)


# ----------------------------------------------------------------------------- model


def test_resolve_model_from_name_checkpoint_and_module(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = resolve_data("digits")
    net = tiny_mlp(seed=5)
    path = tmp_path / "checkpoint-00001.pt"
    save_checkpoint(path, net, None, 1, dict(model_spec(net) or {}))

    from_none = resolve_model(None, path, data, device="cpu")
    from_name = resolve_model("mlp", path, data, device="cpu")
    assert from_none.name == "MLP" and from_none.epoch == 1
    for resolved in (from_none, from_name):
        assert model_fingerprint(resolved.model) == model_fingerprint(net)
        assert not resolved.model.training

    # a module given with a checkpoint is copied, then loaded; the original is untouched
    other = tiny_mlp(seed=6)
    before = copy.deepcopy(other.state_dict())
    other.train()
    loaded = resolve_model(other, path, data, device="auto")
    assert loaded.model is not other and other.training
    assert model_fingerprint(loaded.model) == model_fingerprint(net)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    # without copy_module and on its own device, the module itself is used, mode unchanged
    same = resolve_model(other, None, data, device="auto", copy_module=False)
    assert same.model is other and other.training


def test_resolve_model_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = resolve_data("digits")
    with pytest.raises(ValueError, match="'model'"):
        resolve_model(None, None, data)
    with pytest.raises(ValueError, match="'model'"):
        resolve_model("NoSuchNet", None, data)
    with pytest.raises(TypeError, match="'model'"):
        resolve_model(3.0, None, data)
    with pytest.raises(FileNotFoundError):
        resolve_model("MLP", tmp_path / "missing.pt", data)
    net = tiny_mlp()
    path = tmp_path / "c.pt"
    save_checkpoint(path, net, None, 0, dict(model_spec(net) or {}))
    with pytest.raises(ValueError, match=r"'checkpoint_path'.*LeNet5"):
        resolve_model("LeNet5", path, data)
    bigger = get_model("MLP", num_classes=10, in_channels=1, input_size=8, hidden=(7,))
    with pytest.raises(ValueError, match="checkpoint"):
        resolve_model(bigger, path, data)


def test_model_fingerprint_sees_values_names_and_subsets() -> None:
    net = tiny_mlp()
    fp = model_fingerprint(net)
    assert len(fp) == 64
    twin = copy.deepcopy(net)
    assert model_fingerprint(twin) == fp
    with torch.no_grad():
        next(iter(twin.parameters())).view(-1)[0] += 1e-6
    assert model_fingerprint(twin) != fp
    names = [n for n, _ in net.named_parameters()]
    assert model_fingerprint(net, names[:1]) != fp


def test_preserve_global_state_restores_all_generators() -> None:
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
    with preserve_global_state():
        random.random()
        np.random.rand()  # noqa: NPY002
        torch.rand(3)
    assert random.getstate() == py
    assert np.array_equal(np.random.get_state()[1], npy[1])  # noqa: NPY002
    assert torch.equal(torch.get_rng_state(), th)


# ----------------------------------------------------------------------------- directions


def test_param_space_roundtrip_and_subset() -> None:
    net = tiny_mlp()
    space = ParamSpace.from_model(net)
    assert space.numel == sum(p.numel() for p in net.parameters())
    v = space.get_vector(net)
    space.set_vector(net, v + 1.0)
    torch.testing.assert_close(space.get_vector(net), v + 1.0)
    names = [n for n, _ in net.named_parameters()]
    sub = ParamSpace.from_model(net, [names[2], names[0]])
    assert sub.names == (names[0], names[2])  # model order
    again = ParamSpace.from_json(list(sub.names), sub.shapes_json())
    assert again == sub
    with pytest.raises(ValueError, match="'params'"):
        ParamSpace.from_model(net, ["nope"])
    with pytest.raises(ValueError, match="'vector'"):
        space.set_vector(net, torch.zeros(3))
    with pytest.raises(ValueError, match="'spectrum_path'"):
        ParamSpace(("w",), ((3,),)).check_model(net, "spectrum_path")


def test_random_directions_unit_norm_and_seeded() -> None:
    space = ParamSpace.from_model(tiny_mlp())
    a = random_directions(space, 2, seed=1, dtype=torch.float64)
    b = random_directions(space, 2, seed=1, dtype=torch.float64)
    c = random_directions(space, 1, seed=2, dtype=torch.float64)
    for d in a:
        assert abs(float(d.vector.norm()) - 1.0) < 1e-12 and np.isnan(d.value)
    torch.testing.assert_close(a[0].vector, b[0].vector, rtol=0, atol=0)
    assert not torch.equal(a[0].vector, a[1].vector)
    assert not torch.equal(a[0].vector, c[0].vector)


def test_filter_normalised_matches_filter_norms() -> None:
    torch.manual_seed(0)  # only the test's model init; the function itself is seeded
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4))
    space = ParamSpace.from_model(net)
    (d,) = filter_normalised_directions(net, space, 1, seed=0)
    for p, chunk in zip(space.parameters(net), space.split(d.vector)):
        if p.ndim <= 1:
            assert torch.count_nonzero(chunk) == 0
        else:
            w = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(chunk.reshape(p.shape[0], -1).norm(dim=1), w)
    (with_1d,) = filter_normalised_directions(net, space, 1, seed=0, ignore_1d=False)
    bias_index = space.names.index("0.bias")
    torch.testing.assert_close(space.split(with_1d.vector)[bias_index], net[0].bias.detach())


def test_ritz_directions_order_and_errors() -> None:
    values = np.array([-2.0, 0.5, 1.0, 4.0])
    vectors = np.eye(4, dtype=np.float32)
    top = ritz_directions(values, vectors, "ritz-top", [1, 2])
    assert [d.value for d in top] == [4.0, 1.0]
    torch.testing.assert_close(top[0].vector, torch.tensor([0.0, 0.0, 0.0, 1.0]))
    bottom = ritz_directions(values, vectors, "ritz-bottom", [1])
    assert bottom[0].name == "ritz-bottom-1" and bottom[0].value == -2.0
    assert ritz_directions(values, vectors, "ritz-min-abs", [1])[0].value == 0.5
    with pytest.raises(ValueError, match="'directions'"):
        ritz_directions(values, vectors, "ritz-top", [5])
    assert parse_ritz_spec("ritz_bottom", 3) == ("ritz-bottom", [1, 2, 3])
    with pytest.raises(ValueError, match="'directions'"):
        parse_ritz_spec("eigen-top", 1)


def test_parse_planes() -> None:
    names = ["ritz-top-1", "ritz-top-2", "random-1"]
    assert parse_planes(None, names) == [] and parse_planes(True, names) == [(0, 1)]
    assert parse_planes("random-1|ritz-top-2", names) == [(2, 1)]
    for bad in (["a|b"], [(0, 0)], [(0, 5)], ["x"]):
        with pytest.raises(ValueError, match="'planes'"):
            parse_planes(bad, names)
    with pytest.raises(ValueError, match="'planes'"):
        parse_planes(True, names[:1])


# ----------------------------------------------------------------------------- Lanczos core


def test_lanczos_spectrum_equals_slq_and_trace_is_hutchinson() -> None:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((30, 30)))
    a = (q * np.linspace(-1.0, 5.0, 30)) @ q.T
    out = lanczos_spectrum(a, 8, num_probes=3, seed=11)
    ref = slq(a, 8, num_probes=3, seed=11)
    np.testing.assert_allclose(out["values"], ref.nodes, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["weights"], ref.weights, rtol=0, atol=1e-12)
    # P * sum(gamma * theta) is the mean of v^T A v over the same Rademacher probes
    gen = np.random.default_rng(11)
    probes = [random_probe(30, "rademacher", gen) for _ in range(3)]
    hutchinson = np.mean([v @ a @ v for v in probes])
    assert abs(out["trace"] - hutchinson) < 1e-12 * 30 * np.linalg.norm(a, 2)
    assert out["alpha"].shape == (8,) and out["beta"].shape == (7,)
    assert out["probe_nodes"].shape == (3, 8)
    with pytest.raises(ValueError, match="'lanczos_iters'"):
        lanczos_spectrum(a, 31)
    with pytest.raises(ValueError, match="'lanczos_iters'"):
        lanczos_spectrum(a, 0)
