"""nets: models, datasets, training and the curvature-analysis workflow of the Deep Curvature Suite.

``from nets import *`` gives the calls of the paper's Tables 1-4.
"""

from __future__ import annotations

# --- models, data, training (models/, data/, training.py, checkpoint.py, schedules.py) ---
from nets.checkpoint import (
    checkpoint_name,
    load_checkpoint,
    load_model_state,
    model_from_checkpoint,
    save_checkpoint,
)
from nets.data import DatasetSplits, available_datasets, load_dataset, make_loader
from nets.device import resolve_device
from nets.models import MODELS, available_models, get_model
from nets.optim.registry import available_optimizers, get_optimizer, register_optimizer
from nets.schedules import constant_schedule, linear_schedule
from nets.tracker import CurvatureTracker
from nets.training import TrainingResult, train_network

# isort: split

# --- optimisers (optim/) ---
from nets.optim import EKFAC, KFAC, SWATS, LanczosNewton

# isort: split

# --- workflow, plots (workflow/, plots/) ---
from nets.plots import (
    plot_block_spectra,
    plot_curvature_tracking,
    plot_loss_landscape,
    plot_spectrum,
    plot_spectrum_comparison,
    plot_training,
)
from nets.workflow import (
    BlockSpectraResult,
    SpectrumResult,
    build_loss_landscape,
    compute_block_spectra,
    compute_eigenspectrum,
    compute_loss_stats,
    load_block_spectra,
    load_spectrum,
)

__all__: list[str] = [
    "EKFAC",
    "KFAC",
    "MODELS",
    "SWATS",
    "BlockSpectraResult",
    "CurvatureTracker",
    "DatasetSplits",
    "LanczosNewton",
    "SpectrumResult",
    "TrainingResult",
    "available_datasets",
    "available_models",
    "available_optimizers",
    "build_loss_landscape",
    "checkpoint_name",
    "compute_block_spectra",
    "compute_eigenspectrum",
    "compute_loss_stats",
    "constant_schedule",
    "get_model",
    "get_optimizer",
    "linear_schedule",
    "load_block_spectra",
    "load_checkpoint",
    "load_dataset",
    "load_model_state",
    "load_spectrum",
    "make_loader",
    "model_from_checkpoint",
    "plot_block_spectra",
    "plot_curvature_tracking",
    "plot_loss_landscape",
    "plot_spectrum",
    "plot_spectrum_comparison",
    "plot_training",
    "register_optimizer",
    "resolve_device",
    "save_checkpoint",
    "train_network",
]
