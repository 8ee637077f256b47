"""The main job: the paper's whole workflow on the embedded digits data, in a few minutes on a CPU.

:func:`run_demo` trains the small BatchNorm CNN (:class:`nets.models.SmallCNN`,
1,946 parameters) on scikit-learn's handwritten digits, computes the Lanczos
spectra of the Hessian and of the generalised Gauss-Newton matrix over the full
training set, compares them with the Monte-Carlo GGN diagonal (the paper's
Figure 2; the exact diagonal too with ``exact_diagonal=True``), builds the loss
landscape along the top Hessian eigenvectors (the bottom one and a random
direction as controls) and over the plane of the two top eigenvectors, and
writes everything under ``out_dir``:

======================================  ==============================================
``checkpoint-XXXXX.pt``                 model and optimiser state: the initialisation
                                        (``00000``), half-way and the last epoch
``stats.json``                          per-epoch training statistics
``spectra/spectrum-XXXXX-*.npz``        Hessian and GGN spectra (Hessian ``-eigvec.npz``)
``spectra/ggn-diagonal-XXXXX.npz``      ``diagonal`` (MC; ``diagonal_exact`` if asked),
                                        ``config_json``
``compare-XXXXX-ggn.npz``, ``.png``     K-FAC, E-KFAC, the exact and MC GGN diagonals and
                                        a low-rank proxy graded against the exact GGN
                                        (:func:`nets.workflow.compare.compare_curvatures`
                                        on 256 training images, BatchNorm in eval mode):
                                        the reports and every spectrum in one unit (CDFs)
``landscape-XXXXX.npz``                 loss/accuracy along the directions
``landscape-plane-XXXXX.npz``           loss/accuracy over the top-1/top-2 plane
``training.png``                        training curves
``curvature.jsonl``,                    top Hessian eigenvalues, trace and SLQ densities
``curvature.density-*.npz``             measured during training (:class:`nets.CurvatureTracker`;
                                        ``curvature.jsonl.ritz.npz``: its warm start)
``curvature-tracking.png``              those against steps, with the 2/lr edge of stability
``spectrum-hessian.png``, ``-ggn.png``  stem plots of the spectra (log weights)
``lanczos-vs-diagonal.png``             Lanc-Hess and Lanc-GGN against Diag-GGN
``landscape.png``, ``-plane.png``       loss curves; contours over the plane
``demo.json``                           marks the directory as a demo's output
======================================  ==============================================

With ``model="gpt-tiny"`` the same pipeline runs on a language model: the
436k-parameter :class:`nets.models.GPT` trained with Adam on the embedded byte-level
``text`` dataset (next-token cross-entropy, perplexity reported), spectra and
landscape on a fixed subsample of the training sequences, and no diagonal stage (the
Monte-Carlo GGN diagonal needs a recognised classification loss).

It returns a :class:`DemoSummary` (``curvature demo`` prints it, with every file
written); nothing is printed here. A progress bar over the stages goes to stderr
and can be switched off.

Three losses at the last checkpoint, and what each is: the training table's is the
running mean over the last epoch's minibatches (train mode: BatchNorm batch
statistics, weights changing; the digits are not augmented); the landscape's at
t = 0 is one full pass over the training set in eval mode (BatchNorm running
statistics); the spectra are of the mean loss with BatchNorm in train mode.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from spectral.errors import argument_error
from spectral.io import load_npz, save_npz

__all__ = ["DemoSettings", "DemoSummary", "run_demo"]

logger = logging.getLogger(__name__)

Row = tuple[str, str]


@dataclass(frozen=True)
class DemoSettings:
    """The knobs of the demo (defaults: the full demo; :meth:`quick`: a smoke test)."""

    epochs: int = 10
    lanczos_iters: int = 50
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mc_samples: int = 1
    exact_diagonal: bool = False
    landscape_points: int = 21
    plane_points: int = 13
    landscape_dist: float = 1.0
    plane: bool = True
    seed: int = 0
    model: str = "SmallCNN"
    dataset: str = "digits"
    optimizer: str = "SGD"
    subsample: int | None = None  # samples used by the spectra and the landscape
    diagonal: bool = True
    #: proxies graded against the exact GGN (``None``: no comparison stage)
    compare: tuple[str, ...] | None = ("kfac", "ekfac", "diag-ggn", "diag-mc", "low-rank-10")
    compare_samples: int = 256  # the first training images, one batch
    track_every: int | None = 20  # curvature tracking during training (None: off)

    @property
    def track(self) -> dict[str, Any] | None:
        """The ``train_network(track=...)`` options: top-2 Hessian eigenvalues, trace, densities."""
        if self.track_every is None:
            return None
        return {
            "every": self.track_every,
            "top_k": 2,
            "trace_probes": 4,
            "samples": 128,
            "density_every": 2 * self.track_every,
            "density_iters": 16,
            "density_probes": 1,
            "seed": self.seed,
        }

    @classmethod
    def quick(cls) -> DemoSettings:
        """Two epochs, eight Lanczos steps, five landscape points, no plane, a small comparison."""
        return cls(
            epochs=2,
            lanczos_iters=8,
            landscape_points=5,
            plane=False,
            track_every=10,
            compare=("kfac", "ekfac", "diag-ggn", "diag-mc", "low-rank-4"),
            compare_samples=64,
        )

    @classmethod
    def language_model(cls, quick: bool = False) -> DemoSettings:
        """gpt-tiny on ``text``: one Adam epoch, curvature on 64 training sequences."""
        return cls(
            epochs=1,
            lanczos_iters=4 if quick else 12,
            batch_size=32,
            lr=3e-3,
            weight_decay=0.0,
            landscape_points=3 if quick else 9,
            plane=False,
            model="gpt-tiny",
            dataset="text",
            optimizer="Adam",
            subsample=16 if quick else 64,
            diagonal=False,
            track_every=None,
            compare=None,
        )

    @property
    def title(self) -> str:
        """``"<model> on <dataset>, <optimizer>"`` for figures and the summary."""
        model = "SmallCNN (BatchNorm)" if self.model == "SmallCNN" else self.model
        return f"{model} on {self.dataset}, {self.optimizer}"


@dataclass
class DemoSummary:
    """What the demo did: titled sections of (name, value) rows, files written, stage timings."""

    out_dir: Path
    sections: list[tuple[str, list[Row]]] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def total_time(self) -> float:
        """Wall time of all stages, in seconds."""
        return float(sum(self.timings.values()))

    def add(self, title: str, rows: list[Row]) -> None:
        """Append a section."""
        self.sections.append((title, rows))


def _fmt(x: Any) -> str:
    if isinstance(x, int | np.integer):
        return f"{int(x):,}"
    if x is None:
        return "-"
    x = float(x)
    if not np.isfinite(x):
        return "n/a"
    return f"{x:.4g}" if x == 0 or 1e-3 <= abs(x) < 1e6 else f"{x:.3e}"


def _check_positive(name: str, value: object) -> None:
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
    exact_diagonal: bool = False,
    seed: int = 0,
    device: str | torch.device = "auto",
    progress: bool = True,
    num_threads: int | None = 1,
    model: str = "SmallCNN",
    overwrite: bool = False,
) -> DemoSummary:
    """Train, compute spectra and the diagonal, build the landscape, and draw every figure.

    Parameters
    ----------
    out_dir:
        Where every file goes (created if needed).  A directory an earlier demo wrote is
        written again (its files replaced); one that holds another training run
        (``stats.json`` or checkpoints, no ``demo.json``) is refused unless ``overwrite``:
        the demo's training replaces a run's files, and its checkpoints of other epochs
        were deleted.
    epochs:
        Training epochs (default 10; 2 with ``quick``).
    lanczos_iters:
        Lanczos iterations of both spectra (default 50; 8 with ``quick``).
    quick:
        Tiny settings for a smoke test: see :meth:`DemoSettings.quick`.
    exact_diagonal:
        Also compute the exact GGN diagonal (``N * C`` vector-Jacobian products: minutes
        on a CPU) and draw it beside the Monte-Carlo one.
    seed:
        Seeds training, probes, the Monte-Carlo diagonal and the random direction.
    device:
        ``"auto"`` (CUDA when available), ``"cpu"``, ...
    progress:
        Show a progress bar over the stages (stderr).
    num_threads:
        Torch intra-op threads on the CPU while the demo runs (restored afterwards). The
        model is tiny, so one thread is fastest: synchronising threads costs more than it
        saves, badly so on a shared machine. ``None`` keeps torch's setting.
    model:
        ``"SmallCNN"`` (digits) or ``"gpt-tiny"`` (the byte-level ``text`` dataset,
        :meth:`DemoSettings.language_model`).
    overwrite:
        Replace a training run found in ``out_dir`` (see there).

    Returns
    -------
    DemoSummary
        Sections (training, spectra, landscape, files, timings), the files and timings.

    Raises
    ------
    ValueError
        For non-positive ``epochs``, ``lanczos_iters`` or ``num_threads``, or a
        ``model`` other than ``"SmallCNN"`` and ``"gpt-tiny"``.
    """
    from nets.models import canonical_model_name

    name = canonical_model_name(model)
    if name == "gpt-tiny":
        settings = DemoSettings.language_model(quick)
    elif name == "SmallCNN":
        settings = DemoSettings.quick() if quick else DemoSettings()
    else:
        raise argument_error("model", "'SmallCNN' or 'gpt-tiny'", model)
    settings = replace(
        settings,
        epochs=settings.epochs if epochs is None else epochs,
        lanczos_iters=settings.lanczos_iters if lanczos_iters is None else lanczos_iters,
        exact_diagonal=exact_diagonal,
        seed=seed,
    )
    _check_positive("epochs", settings.epochs)
    _check_positive("lanczos_iters", settings.lanczos_iters)
    if num_threads is not None:
        _check_positive("num_threads", num_threads)

    from nets.device import resolve_device

    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text(json.dumps({"written_by": "curvature demo"}) + "\n")
    dev = resolve_device(device)
    with _torch_threads(num_threads if dev.type == "cpu" else None):
        return _run(out, settings, dev, progress=progress)


#: The file that marks a directory as a demo's output (written before anything else).
DEMO_MARKER = "demo.json"


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, or that holds a training run no demo wrote.

    A demo's own earlier output (``demo.json``, or from before that marker its
    ``spectrum-hessian.png``) is written again.
    """
    if out.exists() and not out.is_dir():
        raise argument_error(
            "out_dir", "a directory (or a path to create one)", f"the file '{out}'"
        )
    if overwrite or not out.is_dir():
        return
    held = (out / "stats.json").is_file() or any(out.glob("checkpoint-*.pt"))
    ours = (out / DEMO_MARKER).is_file() or (out / "spectrum-hessian.png").is_file()
    if held and not ours:
        raise argument_error(
            "out_dir",
            "a new directory or a demo's earlier output (this one holds a training run that "
            "the demo's training would replace, its checkpoints deleted; pass overwrite=True "
            "to replace it)",
            str(out),
        )


def _run(out: Path, settings: DemoSettings, dev: torch.device, *, progress: bool) -> DemoSummary:
    from nets.checkpoint import checkpoint_name

    summary = DemoSummary(out_dir=out)
    summary.files.append(out / DEMO_MARKER)
    common: dict[str, Any] = {
        "dataset": settings.dataset,
        "model": settings.model,
        "seed": settings.seed,
        "device": dev,
        "progress": False,
    }
    spectra: dict[str, Path] = {}
    diagonals: dict[str, np.ndarray] = {}
    reports: dict[str, Any] = {}
    with tqdm(total=7, disable=not progress, unit="stage") as bar:
        with _stage(summary, "training", bar):
            summary.files += _train(out, settings, common)
        checkpoint = out / checkpoint_name(settings.epochs)
        for curvature in ("hessian", "ggn"):
            with _stage(summary, f"{curvature} spectrum", bar):
                spectra[curvature], files = _spectrum(out, checkpoint, curvature, settings, common)
                summary.files += files
        with _stage(summary, "GGN diagonal", bar):
            if settings.diagonal:  # the language model has no Monte-Carlo diagonal stage
                summary.files.append(_diagonals(out, checkpoint, settings, dev, diagonals))
        with _stage(summary, "proxies vs exact GGN", bar):
            if settings.compare:  # K-FAC & co. need a recognised classification loss
                summary.files += _compare(out, checkpoint, settings, dev, reports)
        with _stage(summary, "loss landscape", bar):
            landscapes = _landscapes(out, checkpoint, spectra["hessian"], settings, common)
            summary.files += landscapes
        with _stage(summary, "figures", bar):
            for name, draw in _figures(out, spectra, diagonals, landscapes, settings).items():
                _draw(draw, out / name)
                summary.files.append(out / name)

    _summarise(summary, spectra, diagonals, landscapes[0], settings, dev, reports)
    return summary


def _train(out: Path, settings: DemoSettings, common: dict[str, Any]) -> list[Path]:
    """Train (tracking the curvature unless switched off); the files written."""
    from nets.training import train_network

    sgd = settings.optimizer == "SGD"
    train_network(
        dir=str(out),
        optimizer=settings.optimizer,
        optimizer_kwargs={
            "lr": settings.lr,
            **({"momentum": settings.momentum} if sgd else {}),
            "weight_decay": settings.weight_decay,
        },
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        save_freq=max(1, settings.epochs // 2),
        track=settings.track,
        **common,
    )
    files = [out / "stats.json", *sorted(out.glob("checkpoint-*.pt"))]
    if settings.track is not None:
        files += sorted(out.glob("curvature.*"))  # rows, densities, warm start
    return files


def _spectrum(
    out: Path, checkpoint: Path, curvature: str, settings: DemoSettings, common: dict[str, Any]
) -> tuple[Path, list[Path]]:
    """The Lanczos spectrum of ``curvature`` at ``checkpoint``; its file and the files written."""
    from nets.workflow._resolve import eigvec_file
    from nets.workflow.spectrum import compute_eigenspectrum

    target = out / "spectra" / f"spectrum-{settings.epochs:05d}-{curvature}-lanczos.npz"
    compute_eigenspectrum(
        subsample=settings.subsample,
        batch_size=16 if settings.subsample else 256,
        checkpoint_path=str(checkpoint),
        save_spectrum_path=str(target),
        save_eigvec=curvature == "hessian",
        lanczos_iters=settings.lanczos_iters,
        curvature_matrix=f"{curvature}-lanczos",
        bn_mode="train",
        **common,
    )
    return target, [target, eigvec_file(target)] if curvature == "hessian" else [target]


def _diagonals(
    out: Path,
    checkpoint: Path,
    settings: DemoSettings,
    dev: torch.device,
    diagonals: dict[str, np.ndarray],
) -> Path:
    """The Monte-Carlo (and, if asked, exact) GGN diagonal into ``diagonals``; its file."""
    from curvops.diagonal import ggn_diagonal
    from nets.checkpoint import model_from_checkpoint
    from nets.data import load_dataset, make_loader

    model, _ = model_from_checkpoint(checkpoint, dev)
    loader = make_loader(load_dataset("digits").train_eval, 256, shuffle=False)
    loss = torch.nn.CrossEntropyLoss()
    label = "MC" if settings.mc_samples == 1 else f"MC x{settings.mc_samples}"
    diagonals[label] = _host(
        ggn_diagonal(model, loss, loader, method="mc", mc_samples=settings.mc_samples,
                     seed=settings.seed, bn_mode="train")
    )  # fmt: skip
    config = {
        "function": "ggn_diagonal",
        "method": "mc",
        "mc_samples": settings.mc_samples,
        "model": settings.model,
        "dataset": settings.dataset,
        "checkpoint": str(checkpoint),
        "epoch": settings.epochs,
        "bn_mode": "train",
        "seed": settings.seed,
        "exact_diagonal": settings.exact_diagonal,
        "loss": "CrossEntropyLoss",
    }
    arrays: dict[str, Any] = {
        "diagonal": diagonals[label],
        "mc_samples": np.int64(settings.mc_samples),
        "config_json": np.str_(json.dumps(config, sort_keys=True)),
    }
    if settings.exact_diagonal:
        diagonals["exact"] = _host(
            ggn_diagonal(model, loss, loader, method="exact", bn_mode="train")
        )
        arrays["diagonal_exact"] = diagonals["exact"]
    diagonal_path = out / "spectra" / f"ggn-diagonal-{settings.epochs:05d}.npz"
    save_npz(diagonal_path, **arrays)
    return diagonal_path


def _compare(
    out: Path, checkpoint: Path, settings: DemoSettings, dev: torch.device, reports: dict[str, Any]
) -> list[Path]:
    """The proxies of ``settings.compare`` against the exact GGN (into ``reports``); files."""
    from nets.checkpoint import model_from_checkpoint
    from nets.data import load_dataset, make_loader
    from nets.workflow.compare import compare_curvatures

    assert settings.compare is not None
    model, _ = model_from_checkpoint(checkpoint, dev)
    dataset = load_dataset(settings.dataset).train_eval
    batch = next(iter(make_loader(dataset, settings.compare_samples, shuffle=False)))
    target = out / f"compare-{settings.epochs:05d}-ggn.npz"
    figure = target.with_suffix(".png")
    low_rank = [int(name.split("-")[2]) for name in settings.compare if name.startswith("low-")]
    reports.update(
        compare_curvatures(
            model,
            torch.nn.CrossEntropyLoss(),
            batch,
            approximations=settings.compare,
            exact="ggn",
            bn_mode="eval",
            k=min([10, *low_rank]),
            num_iters=settings.lanczos_iters,
            seed=settings.seed,
            save_path=target,
            figure_path=figure,
        )
    )
    return [target, figure]


def _landscapes(
    out: Path,
    checkpoint: Path,
    spectrum: Path,
    settings: DemoSettings,
    common: dict[str, Any],
) -> list[Path]:
    """The loss along the top/bottom Ritz and a random direction (and over the top plane)."""
    from nets.workflow.landscape import build_loss_landscape

    tag = f"{settings.epochs:05d}"
    landscape = {
        **common,
        "subsample": settings.subsample,
        "dist": settings.landscape_dist,
        "spectrum_path": str(spectrum),
        "checkpoint_path": str(checkpoint),
    }
    target = out / f"landscape-{tag}.npz"
    build_loss_landscape(
        n_points=settings.landscape_points,
        save_path=str(target),
        directions=["ritz-top", "ritz-bottom-1"],
        num_directions=2,
        random_directions=1,
        **landscape,
    )
    landscapes = [target]
    if settings.plane:
        target = out / f"landscape-plane-{tag}.npz"
        build_loss_landscape(
            n_points=settings.plane_points,
            save_path=str(target),
            directions=["ritz-top"],
            num_directions=2,
            planes=["ritz-top-1|ritz-top-2"],
            **landscape,
        )
        landscapes.append(target)
    return landscapes


def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().to(torch.float64).numpy()


def _draw(draw: Callable[[Path], Any], path: Path) -> None:
    from nets.plots._figure import close_figure

    close_figure(draw(path))


def _figures(
    out: Path,
    spectra: dict[str, Path],
    diagonals: dict[str, np.ndarray],
    landscapes: list[Path],
    settings: DemoSettings,
) -> dict[str, Callable[[Path], Any]]:
    from nets.plots import (
        plot_loss_landscape,
        plot_spectrum,
        plot_spectrum_comparison,
        plot_training,
    )

    figures: dict[str, Callable[[Path], Any]] = {
        "training.png": lambda p: plot_training(out, save_path=p, title=settings.title),
        "spectrum-hessian.png": lambda p: plot_spectrum(
            "lanczos", path=spectra["hessian"], log_weights=True, save_path=p
        ),
        "spectrum-ggn.png": lambda p: plot_spectrum(
            "lanczos", path=spectra["ggn"], log_weights=True, save_path=p
        ),
        "landscape.png": lambda p: plot_loss_landscape(landscapes[0], metric="both", save_path=p),
    }
    if settings.track is not None:
        from nets.plots.tracking import plot_curvature_tracking

        figures["curvature-tracking.png"] = lambda p: plot_curvature_tracking(
            out, save_path=p, title=settings.title
        )
    if diagonals:
        figures["lanczos-vs-diagonal.png"] = lambda p: plot_spectrum_comparison(
            spectra["hessian"], spectra["ggn"], diagonals, save_path=p
        )
    if len(landscapes) > 1:
        figures["landscape-plane.png"] = lambda p: plot_loss_landscape(
            landscapes[1], curves=False, save_path=p
        )
    return figures


def _summarise(
    summary: DemoSummary,
    spectra: dict[str, Path],
    diagonals: dict[str, np.ndarray],
    landscape_path: Path,
    settings: DemoSettings,
    device: torch.device,
    reports: dict[str, Any],
) -> None:
    """The summary's sections, in order: training, spectra, landscape, proxies, files, times."""
    summary.add("Training", _training_rows(summary.out_dir, settings, device))
    summary.add("Spectra (Lanczos vs diagonal)", _spectra_rows(spectra, diagonals, settings))
    summary.add("Loss landscape (full passes, eval mode)", _landscape_rows(landscape_path))
    if reports:
        summary.add("Proxies against the exact GGN", _proxy_rows(reports, settings))
    out = summary.out_dir
    summary.add(
        f"Files (under {out})",
        [(str(p.relative_to(out)) if p.is_relative_to(out) else str(p), "written")
         for p in summary.files],
    )  # fmt: skip
    timing_rows = [(name, f"{sec:.1f} s") for name, sec in summary.timings.items()]
    timing_rows.append(("total", f"{summary.total_time:.1f} s"))
    summary.add("Timings", timing_rows)


def _training_rows(out: Path, settings: DemoSettings, device: torch.device) -> list[Row]:
    """Model, device, epochs and the last epoch's losses, accuracies and perplexities."""
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    last = stats["epochs"][-1]
    tested = [e for e in stats["epochs"] if e.get("test_loss") is not None]
    rows: list[Row] = [
        ("model / data", settings.title.rsplit(",", 1)[0].replace(" on ", " / ")),
        ("device", str(device)),
        ("epochs", _fmt(settings.epochs)),
        (
            "train loss / accuracy (%): running mean over the last epoch, train mode"
            + (" (no augmentation on digits)" if settings.dataset == "digits" else ""),
            f"{_fmt(last['train_loss'])} / {_fmt(last['train_acc'])}",
        ),
    ]
    if tested:
        best = tested[-1]
        rows.append(
            (
                "test loss / accuracy (%): full pass, eval mode",
                f"{_fmt(best['test_loss'])} / {_fmt(best['test_acc'])}",
            )
        )
    if last.get("train_ppl") is not None:  # a language model
        test_ppl = tested[-1].get("test_ppl") if tested else None
        rows.append(("perplexity train / test", f"{_fmt(last['train_ppl'])} / {_fmt(test_ppl)}"))
    return rows


def _spectra_rows(
    spectra: dict[str, Path], diagonals: dict[str, np.ndarray], settings: DemoSettings
) -> list[Row]:
    """Ritz extremes, trace, negative mass and condition (Hessian / GGN); diagonal sums."""
    from nets.plots.spectrum import spectrum_summary

    hess = spectrum_summary(spectra["hessian"])
    ggn = spectrum_summary(spectra["ggn"])
    rows: list[Row] = [
        ("parameters P", _fmt(hess["num_params"])),
        ("Lanczos iterations m", _fmt(settings.lanczos_iters)),
        _spectra_of(settings),
    ]
    for key, label in (
        ("top", "top Ritz value"),
        ("bottom", "bottom Ritz value"),
        ("trace", "trace P*sum(w*theta)"),
        ("negative_mass", "negative spectral mass"),
        ("positive_condition", "condition of positive part"),
    ):
        rows.append((f"{label} (Hessian / GGN)", f"{_fmt(hess[key])} / {_fmt(ggn[key])}"))
    for label, diagonal in diagonals.items():
        rows.append(
            (f"diagonal GGN ({label}): trace / max", f"{_fmt(diagonal.sum())} / "
             f"{_fmt(diagonal.max())}")
        )  # fmt: skip
    return rows


def _spectra_of(settings: DemoSettings) -> Row:
    """What the spectra are of: the mean loss over the training set (or the subsample the
    language model's spectra take), with BatchNorm in train mode where there is one."""
    data = (
        "the mean training loss"
        if settings.subsample is None
        else f"the mean loss of {settings.subsample} training samples"
    )
    if settings.model == "SmallCNN":
        return (f"of {data}, BatchNorm in", "train mode (batch statistics)")
    return ("of", data)


def _landscape_rows(landscape_path: Path) -> list[Row]:
    """The loss at the checkpoint and at both ends of every direction."""
    land = load_npz(landscape_path)
    t = land["t"]
    mid = int(np.abs(t).argmin())
    rows: list[Row] = [
        (
            "train loss at the checkpoint (t = 0): full pass, eval mode",
            _fmt(float(land["train_loss"][0, mid])),
        )
    ]
    values = land["direction_values"]
    for i, name in enumerate(land["direction_names"]):
        curve = land["train_loss"][i]
        theta = f" (theta = {_fmt(float(values[i]))})" if np.isfinite(values[i]) else ""
        rows.append(
            (f"{name}{theta}: loss at t = -{t[-1]:g} / +{t[-1]:g}",
             f"{_fmt(float(curve[0]))} / {_fmt(float(curve[-1]))}")
        )  # fmt: skip
    rows.append(("directions", "unit Euclidean norm in parameter space (t in these units)"))
    return rows


def _proxy_rows(reports: dict[str, Any], settings: DemoSettings) -> list[Row]:
    """Each proxy's W1 distance, top-1 and trace relative errors against the exact GGN."""
    rows: list[Row] = [
        (
            "of the mean loss on the first "
            f"{settings.compare_samples} training images, BatchNorm in",
            "eval mode (running statistics)",
        )
    ]
    rows.append(
        (
            "exact GGN trace (sum of its exact diagonal)",
            _fmt(float(next(iter(reports.values())).trace_exact)),
        )
    )
    for name, r in reports.items():
        top = float(np.abs(r.top_eigenvalue_errors[0])) if r.top_eigenvalue_errors.size else None
        rows.append(
            (f"{name}: W1 / top-1 rel. err / trace rel. err",
             f"{_fmt(float(r.wasserstein))} / {_fmt(top)} / {_fmt(float(r.trace_error))}")
        )  # fmt: skip
    return rows
