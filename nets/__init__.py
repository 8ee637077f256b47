"""nets: models, datasets, training and the curvature-analysis workflow of the Deep Curvature Suite.

``from nets import *`` gives the calls of the paper's Tables 1-4.
"""

from __future__ import annotations

# --- models, data, training (models/, data/, training.py, checkpoint.py, schedules.py) ---

# --- optimisers (optim/) ---

# --- workflow, plots (workflow/, plots/) ---

__all__: list[str] = []
