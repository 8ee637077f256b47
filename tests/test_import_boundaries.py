"""The layering of the three packages (DESIGN.md): spectral <- curvops <- nets."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_top_level(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("spectral", {"torch", "curvops", "nets"}),
        ("curvops", {"nets"}),
    ],
)
def test_no_module_imports_a_higher_layer(package: str, forbidden: set[str]) -> None:
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, f"no modules found in {package}"
    offenders = {
        str(m.relative_to(ROOT)): sorted(_imported_top_level(m) & forbidden) for m in modules
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{package} imports a forbidden layer: {offenders}"


def test_import_spectral_leaves_torch_unloaded() -> None:
    code = (
        "import sys, spectral, spectral.synthetic, spectral.plot\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'curvops', 'nets'})\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr


def test_all_three_packages_import() -> None:
    code = "import spectral, curvops, nets\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
