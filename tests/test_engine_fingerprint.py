"""Every method gives the numbers it gave before the refinement loop became one engine (rtol 1e-10, float64).

The reference was recorded by ``python -m tests.fingerprint`` on the code before the rewrite (commit message of
``tests/data/engine_fingerprint.json``); see :mod:`tests.fingerprint` for the cases.
"""

from __future__ import annotations

import json

import pytest

from tests.fingerprint import CASES, PATH, fingerprint

REFERENCE = json.loads(PATH.read_text())


def _assert_same(actual: object, expected: object, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), where
        for key in expected:
            _assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == pytest.approx(expected, rel=1e-10, abs=1e-12), where


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_matches_its_recorded_fingerprint(name):
    if name == "pyro_guide":
        pytest.importorskip("pyro")
    _assert_same(fingerprint(name), REFERENCE[name], name)
