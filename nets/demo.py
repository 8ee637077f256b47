"""The main job: the paper's whole workflow on the embedded digits data, in a few minutes on a CPU.

:func:`run_demo` trains the small BatchNorm CNN (:class:`nets.models.SmallCNN`)
on scikit-learn's handwritten digits, computes the Lanczos spectra of the
Hessian and of the generalised Gauss-Newton matrix over the full training set,
compares them with the exact and Monte-Carlo GGN diagonals (the paper's
Figure 2), builds the loss landscape along the top Hessian eigenvectors (with a
random direction as a control and the plane of the two top eigenvectors), and
writes everything under ``out_dir``:

==================================  ==============================================
``checkpoint-XXXXX.pt``             model and optimiser state per saved epoch
``stats.json``                      per-epoch training statistics
``spectra/spectrum-XXXXX-*.npz``    Hessian and GGN spectra (+ ``-eigvec.npz``)
``spectra/ggn-diagonal-XXXXX.npz``  ``diagonal`` (exact), ``diagonal_mc`` (MC)
``landscape-XXXXX.npz``             loss/accuracy along directions and the plane
``training.png``                    training curves
``spectrum-hessian.png``, ...       stem plots of the spectra (log weights)
``lanczos-vs-diagonal.png``         Lanc-Hess and Lanc-GGN against Diag-GGN
``landscape.png``                   loss curves and contours
==================================  ==============================================

It returns a :class:`DemoSummary` (the ``curvature demo`` command prints it);
nothing is printed here. Progress bars go to stderr and can be switched off.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from spectral.errors import argument_error
from spectral.io import save_npz

__all__ = ["DemoSettings", "DemoSummary", "run_demo"]

logger = logging.getLogger(__name__)

Row = tuple[str, str]


@dataclass(frozen=True)
class DemoSettings:
    """The knobs of the demo; :func:`run_demo` fills them from its arguments.

    ``quick`` shrinks everything to a smoke test (a few seconds).
    """

    epochs: int = 10
    lanczos_iters: int = 60
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mc_samples: int = 1
    landscape_points: int = 21
    landscape_dist: float = 1.0
    plane: bool = True
    seed: int = 0

    @classmethod
    def create(
        cls,
        *,
        quick: bool,
        epochs: int | None,
        lanczos_iters: int | None,
        seed: int,
    ) -> DemoSettings:
        base = cls(epochs=2, lanczos_iters=8, landscape_points=5, plane=False) if quick else cls()
        return cls(
            epochs=base.epochs if epochs is None else epochs,
            lanczos_iters=base.lanczos_iters if lanczos_iters is None else lanczos_iters,
            batch_size=base.batch_size,
            lr=base.lr,
            momentum=base.momentum,
            weight_decay=base.weight_decay,
            mc_samples=base.mc_samples,
            landscape_points=base.landscape_points,
            landscape_dist=base.landscape_dist,
            plane=base.plane,
            seed=seed,
        )


@dataclass
class DemoSummary:
    """What the demo did: sections of (name, value) rows, the files written and the timings."""

    out_dir: Path
    sections: list[tuple[str, list[Row]]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def total_time(self) -> float:
        """Wall time of all stages, in seconds."""
        return float(sum(self.timings.values()))

    def add(self, title: str, rows: list[Row]) -> None:
        self.sections.append((title, rows))


def _fmt(x: Any) -> str:
    if isinstance(x, int | np.integer):
        return f"{int(x):,}"
    x = float(x)
    if not np.isfinite(x):
        return "n/a"
    return f"{x:.4g}" if x == 0 or 1e-3 <= abs(x) < 1e6 else f"{x:.3e}"


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise argument_error(name, "a positive integer", value)


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Use ``num_threads`` intra-op threads inside the block and restore the setting after."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _stage(summary: DemoSummary, name: str, bar: Any) -> Iterator[None]:
    bar.set_description(f"demo: {name}")
    start = time.perf_counter()
    yield
    summary.timings[name] = time.perf_counter() - start
    logger.info("demo stage %r took %.1f s", name, summary.timings[name])
    bar.update(1)


def run_demo(
    out_dir: str | os.PathLike[str] = "results",
    *,
    epochs: int | None = None,
    lanczos_iters: int | None = None,
    quick: bool = False,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    num_threads: int | None = 1,
) -> DemoSummary:
    """Train, compute spectra and diagonals, build the landscape, and draw every figure.

    Parameters
    ----------
    out_dir:
        Where every file goes (created if needed; existing files are overwritten).
    epochs:
        Training epochs (default 10; 2 with ``quick``).
    lanczos_iters:
        Lanczos iterations for both spectra (default 60; 8 with ``quick``).
    quick:
        Tiny settings for a smoke test: few epochs and iterations, 5 landscape points,
        no plane.
    seed:
        Seeds training, probes, Monte-Carlo diagonal and random directions.
    device:
        ``"auto"`` (CUDA when available), ``"cpu"``, ...
    progress:
        Show progress bars (stderr).
    num_threads:
        Torch intra-op threads on the CPU while the demo runs (restored afterwards).
        The model has two thousand parameters, so one thread is fastest: thread
        synchronisation costs more than it saves, badly so on a shared machine.
        ``None`` keeps torch's setting.

    Returns
    -------
    DemoSummary
        Sections of rows (training, spectra, diagonal, landscape, files, timings).

    Raises
    ------
    ValueError
        For non-positive ``epochs`` or ``lanczos_iters``.
    """
    if num_threads is not None:
        _check_positive("num_threads", num_threads)
    settings = DemoSettings.create(
        quick=quick, epochs=epochs, lanczos_iters=lanczos_iters, seed=seed
    )
    _check_positive("epochs", settings.epochs)
    _check_positive("lanczos_iters", settings.lanczos_iters)

    from nets.device import resolve_device

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    with _torch_threads(num_threads if dev.type == "cpu" else None):
        return _run(out, settings, dev, quick=quick, progress=progress)


def _run(
    out: Path, settings: DemoSettings, dev: torch.device, *, quick: bool, progress: bool
) -> DemoSummary:
    from curvops.diagonal import ggn_diagonal
    from nets.checkpoint import checkpoint_name, model_from_checkpoint
    from nets.data import load_dataset, make_loader
    from nets.plots import (
        plot_loss_landscape,
        plot_spectrum,
        plot_spectrum_comparison,
        plot_training,
    )
    from nets.plots._figure import close_figure
    from nets.training import train_network
    from nets.workflow.landscape import build_loss_landscape
    from nets.workflow.spectrum import compute_eigenspectrum

    summary = DemoSummary(out_dir=out)
    tag = f"{settings.epochs:05d}"
    spectra = out / "spectra"
    stages = 6
    with tqdm(total=stages, disable=not progress, unit="stage", leave=True) as bar:
        with _stage(summary, "training", bar):
            train_network(
                dir=str(out),
                dataset="digits",
                model="SmallCNN",
                optimizer="SGD",
                optimizer_kwargs={
                    "lr": settings.lr,
                    "momentum": settings.momentum,
                    "weight_decay": settings.weight_decay,
                },
                epochs=settings.epochs,
                batch_size=settings.batch_size,
                save_freq=max(1, settings.epochs // 2),
                seed=settings.seed,
                device=dev,
                progress=False,
            )
        checkpoint = out / checkpoint_name(settings.epochs)
        summary.files.append(checkpoint)

        paths: dict[str, Path] = {}
        for curvature in ("hessian", "ggn"):
            with _stage(summary, f"{curvature} spectrum", bar):
                target = spectra / f"spectrum-{tag}-{curvature}-lanczos.npz"
                compute_eigenspectrum(
                    dataset="digits",
                    model="SmallCNN",
                    checkpoint_path=str(checkpoint),
                    save_spectrum_path=str(target),
                    save_eigvec=curvature == "hessian",
                    lanczos_iters=settings.lanczos_iters,
                    curvature_matrix=f"{curvature}-lanczos",
                    bn_mode="train",
                    seed=settings.seed,
                    device=dev,
                    progress=False,
                )
                paths[curvature] = target
                summary.files.append(target)

        with _stage(summary, "GGN diagonal", bar):
            model, _ = model_from_checkpoint(checkpoint, dev)
            splits = load_dataset("digits", seed=settings.seed)
            loader = make_loader(splits.train_eval, 256, shuffle=False)
            loss = torch.nn.CrossEntropyLoss()
            exact = ggn_diagonal(model, loss, loader, method="exact", bn_mode="train")
            mc = ggn_diagonal(
                model,
                loss,
                loader,
                method="mc",
                mc_samples=settings.mc_samples,
                seed=settings.seed,
                bn_mode="train",
            )
            exact_np = exact.detach().cpu().double().numpy()
            mc_np = mc.detach().cpu().double().numpy()
            diag_path = spectra / f"ggn-diagonal-{tag}.npz"
            save_npz(
                diag_path,
                diagonal=exact_np,
                diagonal_mc=mc_np,
                mc_samples=np.int64(settings.mc_samples),
            )
            summary.files.append(diag_path)

        with _stage(summary, "loss landscape", bar):
            landscape_path = out / f"landscape-{tag}.npz"
            build_loss_landscape(
                dataset="digits",
                model="SmallCNN",
                dist=settings.landscape_dist,
                n_points=settings.landscape_points,
                spectrum_path=str(paths["hessian"]),
                checkpoint_path=str(checkpoint),
                save_path=str(landscape_path),
                directions=["ritz-top", "ritz-bottom"],
                num_directions=2 if not quick else 1,
                random_directions=1,
                planes=["ritz-top-1|ritz-top-2"] if settings.plane else None,
                seed=settings.seed,
                device=dev,
                progress=False,
            )
            summary.files.append(landscape_path)

        with _stage(summary, "figures", bar):
            figures = {
                "training.png": lambda p: plot_training(out, save_path=p),
                "spectrum-hessian.png": lambda p: plot_spectrum(
                    "lanczos", path=paths["hessian"], log_weights=True, save_path=p
                ),
                "spectrum-ggn.png": lambda p: plot_spectrum(
                    "lanczos", path=paths["ggn"], log_weights=True, save_path=p
                ),
                "lanczos-vs-diagonal.png": lambda p: plot_spectrum_comparison(
                    paths["hessian"],
                    paths["ggn"],
                    {"exact": exact_np, f"MC, {settings.mc_samples} sample": mc_np},
                    save_path=p,
                    title=f"SmallCNN on digits: Lanczos (m = {settings.lanczos_iters}) "
                    "vs diagonal GGN",
                ),
                "landscape.png": lambda p: plot_loss_landscape(
                    landscape_path, metric="both", save_path=p
                ),
            }
            for name, draw in figures.items():
                close_figure(draw(out / name))
                summary.files.append(out / name)

    _summarise(summary, out, paths, exact_np, mc_np, landscape_path, settings, dev)
    return summary


def _summarise(
    summary: DemoSummary,
    out: Path,
    paths: dict[str, Path],
    exact: np.ndarray,
    mc: np.ndarray,
    landscape_path: Path,
    settings: DemoSettings,
    device: torch.device,
) -> None:
    import json

    from nets.plots.spectrum import spectrum_summary
    from spectral.io import load_npz

    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    last = stats["epochs"][-1]
    tested = [e for e in stats["epochs"] if e.get("test_loss") is not None]
    rows: list[Row] = [
        ("model / data", "SmallCNN (BatchNorm) on digits"),
        ("device", str(device)),
        ("epochs", _fmt(settings.epochs)),
        ("train loss / accuracy (%)", f"{_fmt(last['train_loss'])} / {_fmt(last['train_acc'])}"),
    ]
    if tested:
        rows.append(
            (
                "test loss / accuracy (%)",
                f"{_fmt(tested[-1]['test_loss'])} / {_fmt(tested[-1]['test_acc'])}",
            )
        )
    summary.add("Training", rows)

    hess = spectrum_summary(paths["hessian"])
    ggn = spectrum_summary(paths["ggn"])
    rows = [
        ("parameters P", _fmt(hess["num_params"])),
        ("Lanczos iterations m", _fmt(settings.lanczos_iters)),
    ]
    for key, label in (
        ("top", "top Ritz value"),
        ("bottom", "bottom Ritz value"),
        ("trace", "trace P*sum(w*theta)"),
        ("negative_mass", "negative spectral mass"),
        ("positive_condition", "condition of positive part"),
    ):
        rows.append((f"{label} (Hessian / GGN)", f"{_fmt(hess[key])} / {_fmt(ggn[key])}"))
    rows += [
        ("trace of exact diagonal GGN", _fmt(float(exact.sum()))),
        ("trace of MC diagonal GGN", _fmt(float(mc.sum()))),
        ("largest diagonal entry (exact / MC)", f"{_fmt(exact.max())} / {_fmt(mc.max())}"),
    ]
    summary.add("Spectra (Lanczos vs diagonal)", rows)

    land = load_npz(landscape_path)
    t = land["t"]
    mid = int(np.abs(t).argmin())
    rows = [("checkpoint train loss", _fmt(float(land["train_loss"][0, mid])))]
    for i, name in enumerate(land["direction_names"]):
        curve = land["train_loss"][i]
        rows.append(
            (
                f"train loss at t = +-{t[-1]:g} along {name}",
                f"{_fmt(float(curve[0]))} / {_fmt(float(curve[-1]))}",
            )
        )
    summary.add("Loss landscape", rows)
    summary.add(
        "Files",
        [
            (str(p.relative_to(out)) if p.is_relative_to(out) else str(p), "written")
            for p in summary.files
        ],
    )
    timing_rows = [(name, f"{sec:.1f} s") for name, sec in summary.timings.items()]
    timing_rows.append(("total", f"{summary.total_time:.1f} s"))
    summary.add("Timings", timing_rows)
