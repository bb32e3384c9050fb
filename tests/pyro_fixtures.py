"""What the Pyro integration's test modules share: a small guide size and a clean param store for every test.

Import it after ``pytest.importorskip("pyro")``; importing the fixture into a test module makes it apply there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyro
import pytest

SMALL = {"num_steps": 2, "hidden_size": 16}


@pytest.fixture(autouse=True)
def fresh_param_store() -> Iterator[None]:
    """Every test starts from an empty param store and a fixed seed, and leaves the store empty."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
