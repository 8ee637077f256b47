"""The documentation's promises, checked without building the site (``make docs`` builds it).

* Every name in the ``__all__`` of each documented package appears in an autosummary
  list of the API reference (the lists are generated from ``__all__`` by
  ``docs/apigen.py``, which is what ``docs/conf.py`` runs).
* Every public function and class has a numpydoc docstring with ``Parameters``,
  ``Returns`` (functions that return something) and ``Examples`` sections; the
  exceptions still to be completed are listed in :data:`INCOMPLETE`, in one place.
* Every script in ``examples/`` is in the gallery (executed, or shown with its output),
  has a title, and is run by a test of the suite with small settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"


def _load(name: str) -> ModuleType:
    """Import ``docs/<name>.py`` (the docs folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", DOCS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


apigen = _load("apigen")
gallery = _load("gallery_support")

# Public names whose docstrings still lack sections, to be completed: ``qualified name ->
# missing sections``. Keep this the only list of exceptions; remove an entry when its
# docstring is done.
INCOMPLETE: dict[str, set[str]] = {}

SECTION = re.compile(r"^(Parameters|Attributes|Returns|Yields|Examples)\n-{3,}$", re.MULTILINE)


def _public() -> list[tuple[str, str, str]]:
    """``(package, name, kind)`` of every public name, each object once (at its home)."""
    packages = apigen.all_packages()
    home = apigen.homes(packages)
    out = []
    for package in packages:
        module = importlib.import_module(package)
        for name, kind in apigen.public_names(package):
            if kind == "module" or home.get(id(getattr(module, name))) == package:
                out.append((package, name, kind))
    return out


PUBLIC = _public()


def _autosummary_entries(text: str) -> list[str]:
    """The entries of every ``.. autosummary::`` block of a reST page."""
    entries: list[str] = []
    for block in re.findall(r"\.\. autosummary::\n((?:   .*\n|\n)+)", text + "\n"):
        for line in block.splitlines():
            item = line.strip()
            if item and not item.startswith(":"):
                entries.append(item)
    return entries


def test_the_documented_packages_include_the_required_ones() -> None:
    packages = apigen.all_packages()
    required = {"spectral", "curvops", "nets", "spectral.synthetic", "spectral.plot"}
    required |= {"curvops.testing", "curvops.losses", "nets.models", "nets.optim"}
    assert required <= set(packages)
    assert "spectral.rmt" in packages  # public submodules named in __all__ are found


@pytest.mark.parametrize("package", apigen.all_packages())
def test_every_public_name_is_in_an_autosummary_list(package: str) -> None:
    module = importlib.import_module(package)
    text = apigen.page(package)
    entries = _autosummary_entries(text)
    listed = {entry.lstrip("~").rsplit(".", 1)[-1]: entry for entry in entries}
    for name, kind in apigen.public_names(package):
        obj = getattr(module, name)
        if kind == "module":
            target = obj.__name__
            assert f":doc:`{target}`" in text or f":mod:`{target}`" in text, target
            continue
        assert name in listed, f"{package}.{name} is in __all__ but not in the reference"
        # the entry resolves to the very object (relative entries are under `package`)
        entry = listed[name].lstrip("~")
        where, _, attr = f"{package}.{entry}".rpartition(".")
        if not entry.startswith(package.split(".")[0] + "."):
            assert getattr(importlib.import_module(where), attr) is obj, entry
    # nothing listed that is not public
    public = set(module.__all__)
    assert {entry.lstrip("~").rsplit(".", 1)[-1] for entry in entries} <= public


def test_the_reference_index_lists_every_package_page() -> None:
    text = apigen.index(apigen.all_packages())
    for package in apigen.all_packages():
        assert f"   {package}\n" in text + "\n"


def _takes_arguments(obj: Any) -> bool:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return False
    names = [p for p in signature.parameters if p not in ("self", "cls")]
    if inspect.isclass(obj) and names == ["args", "kwargs"]:  # object.__init__
        return False
    return bool(names)


def _returns_something(obj: Any) -> bool:
    try:
        annotation = inspect.signature(obj).return_annotation
    except (TypeError, ValueError):
        return True
    return annotation not in (None, "None", inspect.Signature.empty)


def _missing_sections(obj: Any, kind: str) -> set[str]:
    doc = inspect.getdoc(obj) or ""
    found = set(SECTION.findall(doc))
    wanted = {"Examples"}
    if _takes_arguments(obj):
        wanted.add("Parameters")
        if kind == "class" and "Attributes" in found:  # a record: its fields are its arguments
            found.add("Parameters")
    if kind == "function" and _returns_something(obj):
        wanted.add("Returns")
        if "Yields" in found:
            found.add("Returns")
    return wanted - found


@pytest.mark.parametrize(("package", "name", "kind"), PUBLIC, ids=lambda v: str(v))
def test_public_docstrings_have_the_numpydoc_sections(package: str, name: str, kind: str) -> None:
    obj = getattr(importlib.import_module(package), name)
    if kind == "data":  # a constant cannot carry its own docstring; the module's covers it
        return
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"{package}.{name} has no docstring"
    if kind == "module":
        return
    missing = _missing_sections(obj, kind) - INCOMPLETE.get(f"{package}.{name}", set())
    assert not missing, f"{package}.{name}: docstring lacks {sorted(missing)}"


def test_the_exceptions_name_public_objects() -> None:
    known = {f"{package}.{name}" for package, name, _ in PUBLIC}
    assert set(INCOMPLETE) <= known, sorted(set(INCOMPLETE) - known)


# ---------------------------------------------------------------------------- the gallery
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not re.search(gallery.IGNORE_PATTERN, str(p)))


def test_the_gallery_has_a_header_and_examples() -> None:
    assert (EXAMPLES / "GALLERY_HEADER.rst").read_text().startswith("Gallery\n=======")
    assert len(SCRIPTS) >= 7
    for name in gallery.NOT_EXECUTED:
        assert (EXAMPLES / name).exists(), name


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_example_is_in_the_gallery_and_tested(script: Path) -> None:
    source = script.read_text()
    executed = re.search(gallery.FILENAME_PATTERN, str(script)) is not None
    assert executed != (script.name in gallery.NOT_EXECUTED), script.name
    # sphinx-gallery needs a docstring whose first line is an underlined title
    doc = re.match(r'\s*(?:r)?"""(.*?)"""', source, flags=re.S)
    assert doc, f"{script.name} has no module docstring"
    title, underline = [*doc.group(1).splitlines(), "", ""][:2]
    assert title.strip() and set(underline) == {"="} and len(underline) >= len(title), (
        f"{script.name}: the docstring's first line must be underlined with '=' "
        "at least as long (the gallery page's title)"
    )
    if executed:  # the build runs it with its entry in ARGUMENTS, else --quick --out
        arguments = gallery.ARGUMENTS.get(script.name, gallery.DEFAULT_ARGUMENTS)
        if arguments is gallery.DEFAULT_ARGUMENTS:
            assert '"--quick"' in source and '"--out"' in source, script.name
        assert "{out}" in " ".join(arguments)
    else:  # shown with the output of a real run
        assert "printed::" in doc.group(1), f"{script.name}: show its output in the docstring"
    # some test of the suite runs it with small settings
    tests = [p for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_docs.py"]
    tested = script.name in GALLERY_ONLY or any(script.name in p.read_text() for p in tests)
    assert tested, f"no test runs {script.name}"


# The gallery's own examples (the others are run by tests/test_examples_*.py and
# tests/nets/test_example_*.py): each runs end to end with --quick and writes its figure.
GALLERY_ONLY = (
    "approximations_versus_exact.py",
    "certified_density.py",
    "tracking_curvature.py",
    "transformer_blocks.py",
)


@pytest.mark.parametrize("name", GALLERY_ONLY)
def test_gallery_example_runs(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "figure:" in done.stdout
    png = next(tmp_path.glob("*.png")).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left no temporary file


# ---------------------------------------------------------------------------- the rest
def test_the_cli_reference_is_generated_from_the_parser() -> None:
    text = (DOCS / "cli.rst").read_text()
    assert ".. argparse::" in text
    assert ":module: nets.cli" in text and ":func: build_parser" in text
    from nets.cli import build_parser

    assert build_parser().prog == "curvature"


def test_the_guide_pages_are_in_the_toctree() -> None:
    index = (DOCS / "index.rst").read_text()
    pages = sorted(p.stem for p in (DOCS / "guide").glob("*.md"))
    assert len(pages) >= 7
    for page in pages:
        assert f"guide/{page}\n" in index, page


def test_readme_and_makefile_mention_make_docs() -> None:
    assert "make docs" in (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^docs:", makefile, flags=re.M)
    assert "-W --keep-going" in makefile and "docs/_build/html" in makefile
