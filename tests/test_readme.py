"""The README reads in two minutes and its examples run as written.

Words are counted as a reader sees them: HTML comments (the record markers of ``tests/test_records.py``) are left
out, code is counted.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _text() -> str:
    return re.sub(r"<!--.*?-->", "", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_readme_is_short_and_shows_code_early():
    text = _text()
    assert len(text.split()) <= 900
    assert len(text[:text.index("```python")].split()) <= 250


def test_use_it_with_your_vae_runs_as_written():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Use it with your VAE"):]
    assert section.index("```python") < section.index("\n## ", 1), "the section's example is its first code"
    code = _python_blocks()[0]
    assert all(name in code for name in ("VAEModel", 'init="encoder"', "fit(", ".infer("))
    assert len([line for line in code.splitlines() if line.strip()]) <= 16
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["posterior"].batch_shape == (16,)
    assert len(namespace["history"].train_elbo) == 2


def test_the_lightning_example_continues_the_first(tmp_path, monkeypatch):
    if importlib.util.find_spec("lightning") is None:
        pytest.skip("lightning is not installed (pip install -e '.[lightning]')")
    monkeypatch.chdir(tmp_path)  # Lightning may write logs next to the working directory
    first, lightning = _python_blocks()[:2]
    assert "IterativeInferenceModule" in lightning
    namespace: dict = {}
    exec(compile(first + lightning, str(README), "exec"), namespace)
    assert namespace["module"].trainer.current_epoch == 1


def test_readme_names_the_ci_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = 'python -m pytest -m "not slow"'
    assert command in README.read_text() and command in ci
    assert "pip install torch==2.13.0" in README.read_text() and "pip install -q torch==2.13.0" in ci
