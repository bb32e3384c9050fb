"""Pytest plugin: Pyro's own autoguide tests with ``pyro.infer.autoguide.AutoNormal`` (or, with ``LI_GUIDE=low_rank``,
``AutoLowRankMultivariateNormal``) rebound to a drop-in subclass of :class:`AutoIterativeNormal` (issue 15: is the
iterative guide a true drop-in for ``AutoNormal``?).

Loaded with ``-p``, the plugin rebinds the name before any test module is imported, so every
``AutoNormal(model, ...)`` in Pyro's tests builds an iterative guide (same keyword options as ``AutoNormal``: the
refinement options keep their defaults). Our guide keeps the real ``AutoNormal`` for its global sites (it was
imported first). With ``LI_AUTONORMAL=original`` the name stays Pyro's and the plugin only records which tests build
an ``AutoNormal``; ``LI_AUTONORMAL_RECORD=<file>`` writes those tests' ids, one a line, at the end of the session,
and ``LI_AUTONORMAL_SELECT=<file>`` runs only the tests listed in such a file.

``LI_GUIDE=low_rank`` does the same for ``AutoLowRankMultivariateNormal`` (``AutoNormal`` then stays Pyro's): it
becomes ``AutoIterativeNormal`` with ``family=LowRankGaussian(rank)`` and Pyro's signature ``(model,
init_loc_fn=init_to_median, init_scale=0.1, rank=None)``. Pyro picks ``rank=None`` as round(sqrt(latent_dim)) at
set-up, over all latent sites together; our family is built at construction and covers one datapoint's local sites
(the globals get the internal diagonal ``AutoNormal``), so that dimension is neither known up front nor the one
Pyro means: ``rank=None`` gives ``LowRankGaussian``'s default rank 2 (columns beyond the local dimension stay zero,
so a 1-d local site simply gets a full-covariance Gaussian).

Usage (Pyro's tests live in a scratch copy outside this repository; never commit them)::

    git -C <pyro mirror> archive HEAD tests/__init__.py tests/common.py tests/conftest.py \\
        tests/infer/__init__.py tests/infer/test_autoguide.py setup.cfg | tar -x -C /tmp/pyro_tests
    cd /tmp/pyro_tests
    LI_AUTONORMAL=original LI_AUTONORMAL_RECORD=/tmp/autonormal_tests.txt PYTHONPATH=<repo>/benchmarks \\
        python -m pytest -p pyro_autoguide_suite tests/infer/test_autoguide.py -q     # which tests use AutoNormal
    LI_AUTONORMAL_SELECT=/tmp/autonormal_tests.txt PYTHONPATH=<repo>/benchmarks \\
        python -m pytest -p pyro_autoguide_suite tests/infer/test_autoguide.py -q      # the 82 with our guide
    LI_GUIDE=low_rank LI_AUTONORMAL=original LI_AUTONORMAL_RECORD=/tmp/low_rank_tests.txt \\
        PYTHONPATH=<repo>/benchmarks python -m pytest -p pyro_autoguide_suite tests/infer/test_autoguide.py -q
    LI_GUIDE=low_rank LI_AUTONORMAL_SELECT=/tmp/low_rank_tests.txt PYTHONPATH=<repo>/benchmarks \\
        python -m pytest -p pyro_autoguide_suite tests/infer/test_autoguide.py -q      # the low-rank ones, ours
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import Any

import pyro.infer.autoguide
import pytest
from pyro.infer.autoguide.initialization import init_to_feasible, init_to_median

from learned_inference import LowRankGaussian
from learned_inference.integrations.pyro import AutoIterativeNormal

_CURRENT: list[str] = []
_USERS: set[str] = set()


class _Records:
    """Mixin: records the running test when the guide is built."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _CURRENT:
            _USERS.add(_CURRENT[-1])
        super().__init__(*args, **kwargs)


class RecordingAutoNormal(_Records, pyro.infer.autoguide.AutoNormal):
    """Pyro's ``AutoNormal``, recording the test that builds it."""


class RecordingAutoLowRankMultivariateNormal(_Records, pyro.infer.autoguide.AutoLowRankMultivariateNormal):
    """Pyro's ``AutoLowRankMultivariateNormal``, recording the test that builds it."""


class IterativeAutoNormal(_Records, AutoIterativeNormal):
    """``AutoIterativeNormal`` with ``AutoNormal``'s signature, recording the test that builds it."""

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        init_loc_fn: Callable[[dict], Any] = init_to_feasible,
        init_scale: float = 0.1,
        create_plates: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(model, init_loc_fn=init_loc_fn, init_scale=init_scale, create_plates=create_plates)


class IterativeLowRank(_Records, AutoIterativeNormal):
    """``AutoIterativeNormal(family=LowRankGaussian(rank))`` with ``AutoLowRankMultivariateNormal``'s signature,
    recording the test that builds it; ``rank=None``: rank 2 (see the module docstring)."""

    def __init__(
        self,
        model: Callable[..., Any],
        init_loc_fn: Callable[[dict], Any] = init_to_median,
        init_scale: float = 0.1,
        rank: int | None = None,
    ) -> None:
        family = LowRankGaussian(2 if rank is None else rank)
        super().__init__(model, init_loc_fn=init_loc_fn, init_scale=init_scale, family=family)


# LI_GUIDE: (the name rebound, its recording original, our drop-in); the test ids keep the name
_GUIDES: dict[str, tuple[str, type, type]] = {
    "normal": ("AutoNormal", RecordingAutoNormal, IterativeAutoNormal),
    "low_rank": ("AutoLowRankMultivariateNormal", RecordingAutoLowRankMultivariateNormal, IterativeLowRank),
}
_NAME, _RECORDING, _OURS = _GUIDES[os.environ.get("LI_GUIDE", "normal")]
_RECORDING.__name__ = _OURS.__name__ = _NAME
setattr(pyro.infer.autoguide, _NAME, _RECORDING if os.environ.get("LI_AUTONORMAL") == "original" else _OURS)


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
