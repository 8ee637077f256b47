"""The workflows' settings records: every setting reaches the state's and the output's config.

A setting missing from the state configuration would let a run resume from a state
made with another value (a silently wrong result); one missing from the output
config would be lost from the file.  Each record is filled with distinctive values
and both configurations are checked to carry each of them.
"""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from nets.workflow.landscape import _LandscapeSettings
from nets.workflow.loss_stats import _StatsSettings
from nets.workflow.spectrum import _SpectrumSettings


def _resolved() -> Any:
    model = torch.nn.Linear(2, 2)
    return SimpleNamespace(model=model, name="MLP", checkpoint_path=None, epoch=3)


def _carries(config: dict[str, Any], key: str, value: Any) -> bool:
    return key in config and config[key] == value


def test_stats_settings_reach_both_configs() -> None:
    settings = _StatsSettings("ggn", "eval", 37, ["0.weight"], 0.25, 5, None, 11)
    loss = torch.nn.CrossEntropyLoss()
    state = settings.state_config("digits", None, "MLP", [None], loss)
    out = settings.output_config("digits", None, ["MLP"], loss)
    for key, value in [
        ("curvature", "ggn"),
        ("bn_mode", "eval"),
        ("batch_size", 37),
        ("subsample", 0.25),
        ("frobenius_probes", 5),
        ("seed", 11),
    ]:
        assert _carries(state, key, value) and _carries(out, key, value), key
    assert out["params"] == ["0.weight"] and "0.weight" in str(state["params"])
    assert out["direction"] == "gaussian(seed=11)" and "direction" in state
    assert {f.name for f in fields(settings)} <= set(state) | {"direction"}


def test_spectrum_settings_reach_both_configs() -> None:
    settings = _SpectrumSettings("ggn", 7, 3, "eval", ["w"], 100, 64, 5, True)
    loss = torch.nn.CrossEntropyLoss()
    state = settings.state_config(
        "digits", None, "MLP", None, fingerprint="abc", names=["w"], loss=loss
    )
    loader = SimpleNamespace(dataset=list(range(100)), batch_size=64)
    data = SimpleNamespace(name="digits")
    out = settings.output_config(_resolved(), data, None, ["w"], loader, loss)
    for key, value in [
        ("curvature", "ggn"),
        ("lanczos_iters", 7),
        ("num_probes", 3),
        ("bn_mode", "eval"),
        ("subsample", 100),
        ("seed", 5),
    ]:
        assert _carries(state, key, value) and _carries(out, key, value), key
    assert state["batch_size"] == 64 and out["batch_size"] == 64 and out["num_samples"] == 100
    assert state["save_eigvec"] is True and state["model_fingerprint"] == "abc"
    assert state["params"] == ["w"] and out["params"] == ["w"] and out["epoch"] == 3


def test_landscape_settings_reach_both_configs() -> None:
    t = np.linspace(-0.5, 0.5, 3)
    settings = _LandscapeSettings(t, 0.5, 3, "spec.npz", True, 64, 32, 9)
    loss = torch.nn.CrossEntropyLoss()
    chosen = [SimpleNamespace(name="ritz-top-1", vector=np.ones(2))]
    state = settings.state_config(
        "digits", None, None, None, fingerprint="f", chosen=chosen, plane_pairs=[], loss=loss
    )
    out = settings.output_config(_resolved(), SimpleNamespace(name="digits"), None, chosen, loss)
    for key, value in [("refresh_bn", True), ("subsample", 64), ("batch_size", 32), ("seed", 9)]:
        assert _carries(state, key, value) and _carries(out, key, value), key
    assert state["t"] == t.tolist() and out["dist"] == 0.5 and out["n_points"] == 3
    assert out["spectrum_path"] == "spec.npz" and out["directions"] == ["ritz-top-1"]
    assert state["directions"][0][0] == "ritz-top-1"
