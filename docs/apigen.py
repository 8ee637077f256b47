"""Write the API reference pages from each package's ``__all__`` (run by ``conf.py``).

Every public package gets one page, ``api/<package>.rst``, with ``autosummary``
tables of its classes, functions and data in the order of ``__all__``, and a
link to the page of each public submodule. The lists are never written by hand,
so a name added to ``__all__`` appears in the reference on the next build, and
``tests/test_docs.py`` checks the same lists without building the site.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable
from pathlib import Path

# The packages whose ``__all__`` makes the reference; public submodules named in
# an ``__all__`` (``spectral.rmt``, ``curvops.distributed``...) are added on the way.
PACKAGES: tuple[str, ...] = (
    "spectral",
    "spectral.synthetic",
    "spectral.plot",
    "curvops",
    "curvops.testing",
    "curvops.losses",
    "nets",
    "nets.models",
    "nets.optim",
)

KINDS = (("class", "Classes"), ("function", "Functions"), ("data", "Data"))


def kind_of(obj: object) -> str:
    """``module``, ``class``, ``function`` or ``data`` for an object named in ``__all__``."""
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj) and not hasattr(obj, "__origin__"):  # typing aliases are data
        return "function"
    return "data"


def public_names(package: str) -> list[tuple[str, str]]:
    """``(name, kind)`` for every name in ``package.__all__``, in its order."""
    module = importlib.import_module(package)
    return [(name, kind_of(getattr(module, name))) for name in module.__all__]


def all_packages(roots: Iterable[str] = PACKAGES) -> list[str]:
    """``roots`` and every submodule with an ``__all__`` that a listed ``__all__`` names."""
    seen: list[str] = []
    todo = list(roots)
    while todo:
        package = todo.pop(0)
        if package in seen:
            continue
        seen.append(package)
        module = importlib.import_module(package)
        for name, kind in public_names(package):
            sub = getattr(module, name)
            if kind == "module" and hasattr(sub, "__all__"):
                todo.append(sub.__name__)
    return seen


def homes(packages: Iterable[str]) -> dict[int, str]:
    """``id(obj) -> package`` where each public object is documented.

    A name exported by several packages (``nets.KFAC`` is ``nets.optim.KFAC``) gets one
    page, under the most specific package that exports it; the other packages' lists
    link to that page. (Documenting one class under two names would register its
    canonical name twice, a duplicate-object warning.)
    """
    home: dict[int, str] = {}
    for package in packages:
        module = importlib.import_module(package)
        for name, kind in public_names(package):
            if kind == "module":
                continue
            key = id(getattr(module, name))
            if key not in home or package.count(".") > home[key].count("."):
                home[key] = package
    return home


def entries(package: str, kind: str, home: dict[int, str]) -> list[str]:
    """The autosummary entries of ``package`` for one kind, in ``__all__`` order."""
    module = importlib.import_module(package)
    out = []
    for name, k in public_names(package):
        if k != kind:
            continue
        where = home.get(id(getattr(module, name)), package)
        if where == package:
            out.append(name)
        elif where.startswith(package + "."):  # autosummary wants it relative
            out.append(f"~{where[len(package) + 1 :]}.{name}")
        else:
            out.append(f"~{where}.{name}")
    return out


def page(package: str, home: dict[int, str] | None = None) -> str:
    """The reST text of the reference page of ``package``."""
    module = importlib.import_module(package)
    if home is None:
        home = homes(all_packages())
    title = f"``{package}``"
    lines = [title, "=" * len(title), "", f".. automodule:: {package}", "", ""]
    lines += [f".. currentmodule:: {package}", ""]
    names = public_names(package)
    for kind, heading in KINDS:
        members = entries(package, kind, home)
        if not members:
            continue
        lines += [heading, "-" * len(heading), "", ".. autosummary::"]
        lines += ["   :toctree: generated/", "   :nosignatures:", ""]
        lines += [f"   {name}" for name in members]
        lines.append("")
    modules = [name for name, k in names if k == "module"]
    if modules:
        lines += ["Modules", "-------", ""]
        for name in modules:
            sub = getattr(module, name)
            if hasattr(sub, "__all__"):
                lines.append(f"* :doc:`{sub.__name__}` — {_summary(sub)}")
            else:
                lines.append(f"* :mod:`{sub.__name__}` — {_summary(sub)}")
        lines.append("")
        for name in modules:  # a module without __all__: its docstring here
            sub = getattr(module, name)
            if not hasattr(sub, "__all__"):
                lines += [f".. automodule:: {sub.__name__}", "   :no-index:", ""]
    return "\n".join(lines)


def _summary(module: object) -> str:
    doc = inspect.getdoc(module) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def index(packages: list[str]) -> str:
    """The reST text of ``api/index.rst``: one toctree over the package pages."""
    title = "API reference"
    lines = [title, "=" * len(title), ""]
    lines += [
        "Generated from each package's ``__all__``: every public name of ``spectral``,",
        "``curvops`` and ``nets`` has a page with its docstring, its signature and a",
        "runnable example. The command line is described in :doc:`../cli`.",
        "",
        ".. toctree::",
        "   :maxdepth: 1",
        "",
    ]
    lines += [f"   {package}" for package in packages]
    return "\n".join(lines) + "\n"


def write(folder: Path) -> list[Path]:
    """Write ``index.rst`` and one page per package into ``folder``; return the paths.

    A file whose text is unchanged is not rewritten (Sphinx then keeps its cache).
    """
    folder.mkdir(parents=True, exist_ok=True)
    packages = all_packages()
    texts = {"index.rst": index(packages)}
    home = homes(packages)
    texts.update({f"{package}.rst": page(package, home) for package in packages})
    paths = []
    for name, text in texts.items():
        path = folder / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        paths.append(path)
    return paths
