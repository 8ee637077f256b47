"""Spectrum summaries and plots refuse non-finite Ritz values or weights (they were dropped,
and the trace and top of what was left reported), and only a PSD curvature kind (a word of
the label, not a substring: "hessian-before" contains "ef") is drawn without negative mass."""

from __future__ import annotations

import numpy as np
import pytest

from nets.plots import plot_spectrum, spectrum_summary
from nets.plots.spectrum import is_psd


@pytest.mark.parametrize("where", ["w", "gammas"])
def test_non_finite_ritz_values_or_weights_are_refused(where: str) -> None:
    spec = {"w": np.array([-0.1, 0.5, 0.7]), "gammas": np.array([0.2, 0.3, 0.5]), "num_params": 100}
    spec[where] = spec[where].copy()
    spec[where][2] = np.nan
    with pytest.raises(
        ValueError, match=r"finite Ritz values and weights.*1 non-finite of 3.*index 2"
    ):
        spectrum_summary(spec)
    with pytest.raises(ValueError, match=r"finite Ritz values and weights"):
        plot_spectrum(spec)


def test_psd_kinds_are_words_not_substrings() -> None:
    assert is_psd("ggn") and is_psd("GGN-lanczos") and is_psd("fisher") and is_psd("ef")
    assert not is_psd("hessian-before") and not is_psd("default") and not is_psd("hessian")
    spec = {"w": np.array([-2.0, 1.0]), "gammas": np.array([0.5, 0.5]), "num_params": 10}
    spec["curvature"] = "hessian-before"
    fig = plot_spectrum(spec, smooth=0.1)
    x, y = fig.axes[1].get_lines()[0].get_xydata().T
    assert x.min() < -2.0  # the negative half of the mass is drawn
    assert np.trapezoid(y[x < 0], x[x < 0]) > 0.4
