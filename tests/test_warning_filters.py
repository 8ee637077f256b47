"""The suite's warning filters work by origin, in both directions (pyproject.toml).

A warning is attributed to the module of the frame it names (``stacklevel``):
dependencies' notices about their own code are ignored, every warning attributed to
our packages, examples, benchmarks or tests stays an error.  These tests run under
the filters pytest installs from ``pyproject.toml`` for every test, so they check the
configuration itself, not a copy of it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest

OURS = [
    "spectral.lanczos",
    "curvops.products",
    "nets.training",
    "examples.quickstart_pipeline",
    "benchmarks.run_benchmarks",
    "tests.test_warning_filters",
]
DEPENDENCIES = [
    "torch.jit._script",
    "torch",
    "torchvision.io",
    "matplotlib.cbook",
    "transformers.modeling_utils",
]
CATEGORIES = [DeprecationWarning, FutureWarning, UserWarning]


def _warn_as(module: str, category: type[Warning], *, via: str | None = None) -> None:
    """Issue ``category`` from a frame whose module is ``module``.

    With ``via``, the warning is issued inside ``via`` with ``stacklevel=2``, as a
    dependency reports a deprecated call: it is attributed to the caller ``module``.
    """
    if via is None:
        source = "import warnings\nwarnings.warn('probe', category)\n"
        exec(compile(source, f"<{module}>", "exec"), {"__name__": module, "category": category})
        return
    callee: dict[str, object] = {"__name__": via, "category": category}
    exec(
        compile(
            "import warnings\n"
            "def deprecated():\n"
            "    warnings.warn('probe', category, stacklevel=2)\n",
            f"<{via}>",
            "exec",
        ),
        callee,
    )
    exec(compile("deprecated()\n", f"<{module}>", "exec"), {**callee, "__name__": module})


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("module", OURS)
def test_our_warnings_fail(module: str, category: type[Warning]) -> None:
    with pytest.raises(category, match="probe"):
        _warn_as(module, category)


@pytest.mark.parametrize("category", CATEGORIES)
@pytest.mark.parametrize("module", DEPENDENCIES)
def test_dependency_notices_about_their_own_code_pass(module: str, category: type[Warning]) -> None:
    with warnings.catch_warnings(record=True) as caught:  # keeps the active filters
        _warn_as(module, category)
    assert caught == []


@pytest.mark.parametrize("module", ["torchfoo", "matplotlibx.core", "scipy.sparse"])
def test_other_modules_are_not_exempt(module: str) -> None:
    """The exemption is anchored on whole package names, and lists only dependencies."""
    with pytest.raises(FutureWarning):
        _warn_as(module, FutureWarning)


@pytest.mark.parametrize("module", ["curvops.products", "nets.cli"])
def test_a_dependency_deprecating_our_call_fails(module: str) -> None:
    """A deprecated call made by our code is attributed to our code: an error."""
    with pytest.raises(DeprecationWarning):
        _warn_as(module, DeprecationWarning, via="torch.nn.functional")


def test_fresh_process_products_emit_no_warning() -> None:
    """The first GGN product of a process (forward mode) prints nothing, on any torch.

    From torch 2.14 loading the forward-mode decompositions issues
    ``torch.jit.script is deprecated`` (once per process); :mod:`curvops` silences
    exactly that notice around the import.  ``-W error`` turns anything else into a
    failure of the child process.
    """
    script = textwrap.dedent(
        """
        import numpy as np
        import torch
        from curvops import GGNOperator
        from curvops.testing import dense_ggn

        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
        ).double()
        batch = (torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]))
        loss = torch.nn.CrossEntropyLoss()
        G = GGNOperator(model, loss, batch, cache=False)
        v = np.ones(G.shape[0])
        y = G @ v
        y_linearized = GGNOperator(model, loss, batch, linearize=True) @ v
        reference = dense_ggn(model, loss, batch).numpy() @ v
        assert np.allclose(y, reference, rtol=1e-12, atol=1e-12)
        assert np.allclose(y_linearized, reference, rtol=1e-12, atol=1e-12)
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr == ""
