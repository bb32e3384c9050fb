"""pytest: the doctests in ``integrations/`` run on the modules of ``learned_inference.integrations``.

The folder ``integrations/`` is the package ``learned_inference.integrations`` (``[tool.setuptools.package-dir]``
in pyproject.toml), but pytest imports a file by its path: ``integrations/pyro/layout.py`` would become a
top-level module ``integrations.pyro.layout``, a second copy of ``learned_inference.integrations.pyro.layout``
(other classes, other module state). So before pytest collects a file there, the names ``integrations.*`` are made
aliases of the modules ``learned_inference.integrations.*``: each file is imported once, under its installed name.

A subpackage whose library is not installed (extras ``pyro``, ``lightning``) is not collected. One whose import
fails otherwise is left to pytest, which reports the error. This file lives outside the package, so that it is
neither installed nor documented with it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parent / "integrations"
PACKAGE = "learned_inference.integrations"
#: the library each subpackage needs, where its import name differs from the subpackage's
LIBRARIES: dict[str, str] = {}


@functools.cache
def _import(name: str) -> bool:
    """Imports ``learned_inference.integrations`` and its subpackage ``name`` (all its modules; none for "") and
    makes ``integrations.*`` aliases of what was imported from this folder. False if an import failed."""
    try:
        package = importlib.import_module(PACKAGE)
        if name:
            package = importlib.import_module(f"{PACKAGE}.{name}")
            for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
                importlib.import_module(info.name)
    except Exception:  # pytest then imports the file itself and reports the error
        return False
    for full_name, module in list(sys.modules.items()):
        if full_name != PACKAGE and not full_name.startswith(f"{PACKAGE}."):
            continue
        file = getattr(module, "__file__", None)
        if file is not None and Path(file).resolve().is_relative_to(FOLDER):  # not an installed copy elsewhere
            sys.modules.setdefault("integrations" + full_name.removeprefix(PACKAGE), module)
    return True


def _subpackage(path: Path) -> str | None:
    """The subpackage of ``integrations/`` that ``path`` is or is in; "" for the folder and its own files; None for
    a path outside the folder or a directory in it that is not a package."""
    try:
        parts = path.resolve().relative_to(FOLDER).parts
    except ValueError:
        return None
    if not parts or (len(parts) == 1 and not (FOLDER / parts[0]).is_dir()):
        return ""
    return parts[0] if (FOLDER / parts[0] / "__init__.py").is_file() else None


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    name = _subpackage(collection_path)
    if name is None or _import(name) or not name:
        return None
    # the subpackage failed to import: not collected if its library (its extra) is not installed, else pytest
    # imports it and reports the error
    return True if importlib.util.find_spec(LIBRARIES.get(name, name)) is None else None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> None:
    name = _subpackage(file_path)
    if name is not None:
        _import(name)
