"""Import the packages before pytest collects their modules' doctests.

With ``--import-mode=importlib`` a module collected on its own (``pytest
curvops/curvature.py``) would otherwise be imported under its package while the package
itself imports it, giving two copies of its classes (``isinstance`` then fails in its
doctests).  Importing the packages first makes pytest reuse the modules in
``sys.modules``.
"""

import curvops  # noqa: F401
import nets  # noqa: F401
import spectral  # noqa: F401
