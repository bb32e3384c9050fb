"""Pytest plugin: Pyro's own autoguide tests with ``pyro.infer.autoguide.AutoNormal`` rebound to a drop-in subclass
of :class:`AutoIterativeNormal` (issue 15: is the iterative guide a true drop-in for ``AutoNormal``?).

Loaded with ``-p``, the plugin rebinds the name before any test module is imported, so every
``AutoNormal(model, ...)`` in Pyro's tests builds an iterative guide (same keyword options as ``AutoNormal``: the
refinement options keep their defaults). Our guide keeps the real ``AutoNormal`` for its global sites (it was
imported first). With ``LI_AUTONORMAL=original`` the name stays Pyro's and the plugin only records which tests build
an ``AutoNormal``; ``LI_AUTONORMAL_RECORD=<file>`` writes those tests' ids, one a line, at the end of the session,
and ``LI_AUTONORMAL_SELECT=<file>`` runs only the tests listed in such a file.

Usage (Pyro's tests live in a scratch copy outside this repository; never commit them)::

    git -C <pyro mirror> archive HEAD tests/__init__.py tests/common.py tests/conftest.py \\
        tests/infer/__init__.py tests/infer/test_autoguide.py setup.cfg | tar -x -C /tmp/pyro_tests
    cd /tmp/pyro_tests
    LI_AUTONORMAL=original LI_AUTONORMAL_RECORD=/tmp/autonormal_tests.txt PYTHONPATH=<repo>/benchmarks \\
        python -m pytest -p pyro_autoguide_suite tests/infer/test_autoguide.py -q     # which tests use AutoNormal
    LI_AUTONORMAL_SELECT=/tmp/autonormal_tests.txt PYTHONPATH=<repo>/benchmarks \
        python -m pytest -p pyro_autoguide_suite tests/infer/test_autoguide.py -q      # the 82 with our guide
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import Any

import pyro.infer.autoguide
import pytest
from pyro.infer.autoguide.initialization import init_to_feasible

from learned_inference.integrations.pyro import AutoIterativeNormal

_CURRENT: list[str] = []
_USERS: set[str] = set()
_ORIGINAL = pyro.infer.autoguide.AutoNormal


def _record() -> None:
    if _CURRENT:
        _USERS.add(_CURRENT[-1])


class RecordingAutoNormal(_ORIGINAL):
    """Pyro's ``AutoNormal``, recording the test that builds it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _record()
        super().__init__(*args, **kwargs)


class IterativeAutoNormal(AutoIterativeNormal):
    """``AutoIterativeNormal`` with ``AutoNormal``'s signature, recording the test that builds it."""

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        init_loc_fn: Callable[[dict], Any] = init_to_feasible,
        init_scale: float = 0.1,
        create_plates: Callable[..., Any] | None = None,
    ) -> None:
        _record()
        super().__init__(model, init_loc_fn=init_loc_fn, init_scale=init_scale, create_plates=create_plates)


# the test ids keep the name "AutoNormal"
RecordingAutoNormal.__name__ = IterativeAutoNormal.__name__ = "AutoNormal"
pyro.infer.autoguide.AutoNormal = (  # type: ignore[misc]
    RecordingAutoNormal if os.environ.get("LI_AUTONORMAL") == "original" else IterativeAutoNormal
)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    _CURRENT.append(item.nodeid)
    try:
        yield
    finally:
        _CURRENT.pop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = os.environ.get("LI_AUTONORMAL_SELECT")
    if path:
        with open(path) as file:
            wanted = {line.strip() for line in file if line.strip()}
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in wanted])
        items[:] = [item for item in items if item.nodeid in wanted]


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("LI_AUTONORMAL_RECORD")
    if path:
        with open(path, "w") as file:
            file.writelines(f"{nodeid}\n" for nodeid in sorted(_USERS))
