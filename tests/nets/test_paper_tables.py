"""The calls of the paper's Tables 1-4 run as written, with ``from nets import *``.

The data is a miniature CIFAR-100 archive in the official python-pickle layout
(``data/cifar-100-python/{train,test,meta}``) written by the test.  To stay fast,
the full pipeline runs with a small model and a few epochs (only ``model=`` and
``epochs=`` differ from the paper, plus the commas missing in Table 4); the exact
Table 1 training call with ``model='VGG16'`` runs once, for one epoch on eight
images.  Paths are the paper's relative paths, inside a temporary working directory.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from nets import *  # noqa: F403
from spectral.io import load_npz

MODEL = "SmallCNN"  # stands in for 'VGG16' (15M parameters) in the long pipeline
EPOCHS = 2  # stands in for 100


def write_cifar100(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A miniature CIFAR-100 archive: ``root/cifar-100-python/{train,test,meta}``.

    Batches are pickled dicts with ``b'data'`` (uint8 ``[N, 3072]``, channel-major rows),
    ``b'fine_labels'``, ``b'coarse_labels'``, ``b'filenames'`` and ``b'batch_label'``;
    ``meta`` holds ``b'fine_label_names'`` and ``b'coarse_label_names'``.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(v) // 5 for v in fine],
            b"filenames": [f"{split}_{i:05d}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch 1 of 1".encode(),
        }
        with open(folder / split, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    meta = {
        b"fine_label_names": [f"class_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"superclass_{i}".encode() for i in range(20)],
    }
    with open(folder / "meta", "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return folder


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory with ``data/`` holding a mini CIFAR-100; one torch thread."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tmp_path
    finally:
        torch.set_num_threads(threads)
        plt.close("all")


def test_star_import_gives_the_papers_functions() -> None:
    namespace: dict[str, object] = {}
    exec("from nets import *", namespace)
    for name in (
        "train_network",
        "compute_eigenspectrum",
        "compute_loss_stats",
        "build_loss_landscape",
        "plot_spectrum",
        "plot_training",
        "plot_loss_landscape",
        "plot_spectrum_comparison",
    ):
        assert callable(namespace.get(name)), name


def test_tables_1_to_3_pipeline(workdir: Path) -> None:
    write_cifar100(workdir / "data", n_train=48, n_test=16)
    ck = f"checkpoint-{EPOCHS:05d}.pt"

    # Table 1: Network Training
    train_network(  # noqa: F405
        dir="result/VGG16-CIFAR100/",
        dataset="CIFAR100",
        data_path="data/",
        epochs=EPOCHS,
        model=MODEL,
        optimizer="SGD",
        optimizer_kwargs={"lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4},
    )
    run = workdir / "result" / "VGG16-CIFAR100"
    assert (run / ck).is_file() and (run / "stats.json").is_file()
    assert isinstance(plot_training("result/VGG16-CIFAR100/"), Figure)  # noqa: F405

    # Table 1: Eigenspectrum Computation
    compute_eigenspectrum(  # noqa: F405
        dataset="CIFAR100",
        data_path="data/",
        model=MODEL,
        checkpoint_path=f"result/VGG16-CIFAR100/{ck}",
        save_spectrum_path=f"result/VGG16-CIFAR100/spectra/spectrum-{EPOCHS:05d}-ggn-lanczos",
        save_eigvec=True,
        lanczos_iters=20,
        curvature_matrix="ggn-lanczos",
    )
    spectrum = run / "spectra" / f"spectrum-{EPOCHS:05d}-ggn-lanczos.npz"
    arrays = load_npz(spectrum)
    assert arrays["w"].shape == (20,) and float(arrays["gammas"].sum()) == pytest.approx(1.0)
    assert str(arrays["curvature"]) == "ggn"
    assert (run / "spectra" / f"spectrum-{EPOCHS:05d}-ggn-lanczos-eigvec.npz").is_file()

    # Table 2: Eigenspectrum Visualization
    fig = plot_spectrum(  # noqa: F405
        "lanczos", path=f"result/VGG16-CIFAR100/spectra/spectrum-{EPOCHS:05d}-ggn-lanczos.npz"
    )
    assert isinstance(fig, Figure)

    # Table 3: Loss Surface Visualization (a Hessian spectrum with its Ritz vectors,
    # and the checkpoint, under the paper's short names)
    compute_eigenspectrum(  # noqa: F405
        dataset="CIFAR100",
        data_path="data/",
        model=MODEL,
        checkpoint_path=f"result/VGG16-CIFAR100/{ck}",
        save_spectrum_path="spectrum-100-hessian",
        save_eigvec=True,
        lanczos_iters=20,
        curvature_matrix="hessian-lanczos",
    )
    shutil.copy(run / ck, workdir / "checkpoint-100.pt")
    build_loss_landscape(  # noqa: F405
        dataset="CIFAR100",
        data_path="data/",
        model=MODEL,
        dist=1.0,
        n_points=21,
        spectrum_path="spectrum-100-hessian",
        checkpoint_path="checkpoint-100.pt",
        save_path="landscape-100.npz",
    )
    fig = plot_loss_landscape("landscape-100.npz")  # noqa: F405
    assert isinstance(fig, Figure)
    land = load_npz(workdir / "landscape-100.npz")
    assert land["t"].shape == (21,)
    assert land["t"][0] == pytest.approx(-1.0) and land["t"][-1] == pytest.approx(1.0)
    assert land["train_loss"].shape[1] == 21
    assert str(land["direction_names"][0]).startswith("ritz-top")


def test_table_1_training_call_with_vgg16(workdir: Path) -> None:
    write_cifar100(workdir / "data", n_train=8, n_test=4)
    train_network(  # noqa: F405
        dir="result/VGG16-CIFAR100/",
        dataset="CIFAR100",
        data_path="data/",
        epochs=1,
        model="VGG16",
        optimizer="SGD",
        optimizer_kwargs={"lr": 0.03, "momentum": 0.9, "weight_decay": 5e-4},
    )
    ckpt = load_checkpoint("result/VGG16-CIFAR100/checkpoint-00001.pt")  # noqa: F405
    assert sum(t.numel() for t in ckpt["state_dict"].values() if t.is_floating_point()) >= 15291300


def test_table_4_sgd_and_lanczos_newton(workdir: Path) -> None:
    write_cifar100(workdir / "data", n_train=32, n_test=8)
    # SGD Training
    train_network(  # noqa: F405
        dir="VGG16-CIFAR100/",
        dataset="CIFAR100",
        data_path="data/",
        epochs=1,
        model=MODEL,
        optimizer="SGD",
        optimizer_kwargs={"lr": 0.01, "momentum": 0.9, "weight_decay": 0, "batch_size": 128},
    )
    sgd = json.loads((workdir / "VGG16-CIFAR100" / "stats.json").read_text())
    assert sgd["config"]["optimizer"] == "SGD" and sgd["config"]["batch_size"] == 128
    assert "batch_size" not in sgd["config"]["optimizer_kwargs"]
    # Lanczos 2nd Order Training (into the same directory, as in the paper)
    train_network(  # noqa: F405
        dir="VGG16-CIFAR100/",
        dataset="CIFAR100",
        data_path="data/",
        epochs=1,
        model=MODEL,
        optimizer="LancGN",
        optimizer_kwargs={
            "lr": 1,
            "damping": 10,
            "weight_decay": 0,
            "batch_size": 128,
            "curvature_batch_size": 128,
        },
    )
    lanc = json.loads((workdir / "VGG16-CIFAR100" / "stats.json").read_text())
    assert lanc["config"]["optimizer"] == "LancGN"
    assert lanc["config"]["curvature_batch_size"] == 128
    assert np.isfinite(lanc["epochs"][-1]["train_loss"])
    assert (workdir / "VGG16-CIFAR100" / "checkpoint-00001.pt").is_file()
