"""The README's quickstart runs as written, and stays short."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_quickstart_runs_as_written():
    blocks = _python_blocks()
    assert blocks, "README has no python code block"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["posterior"].batch_shape == (16,)


def test_quickstart_is_at_most_about_15_lines():
    code = [line for line in _python_blocks()[0].splitlines() if line.strip()]
    assert len(code) <= 16


def test_readme_names_the_ci_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = 'python -m pytest -m "not slow"'
    assert command in README.read_text() and command in ci
