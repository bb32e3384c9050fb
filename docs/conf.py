"""Sphinx configuration for learned_inference (MyST Markdown pages, autodoc + napoleon API reference).

Build (CI runs it with warnings as errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Two build-time hooks (``source-read``) keep pages in sync with the repository without generated files:

* the benchmarks page gets one ``{include}`` per ``benchmarks/results/*.md`` (plots next to a summary are shown
  too), so a new recorded result appears without editing the page;
* the API page documents the optional integrations only when their libraries import (pip extras ``pyro`` and
  ``lightning``); otherwise it says how to install them, so the build never depends on them.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

import learned_inference  # noqa: E402

project = "learned_inference"
author = "learned_inference contributors"
copyright = "2025, learned_inference contributors"
release = learned_inference.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_typehints_description_target = "documented"
autoclass_content = "class"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
# Only what a module writes itself: inherited docstrings (e.g. LightningModule's hooks) are not ours to render.
autodoc_inherit_docstrings = False

html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {"description": "Iterative amortized inference for any PyTorch VAE", "fixed_sidebar": True}

# --- hooks --------------------------------------------------------------------------------------------------------

PLOT_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif")
INTEGRATIONS = {  # optional integration module → (its pip extra, the library it needs)
    "learned_inference.integrations.pyro": ("pyro", "pyro"),
    "learned_inference.integrations.lightning": ("lightning", "lightning"),
}


def benchmark_sections(results: Path = RESULTS, *, docs: Path = DOCS) -> str:
    """MyST source with one section per ``*.md`` summary in ``results`` (sorted by name), each followed by the
    plots sharing its file stem (``memory.png``, ``memory_steps.svg``, ...) that the summary does not already show,
    and a download link to the raw ``<stem>.json`` when there is one. Raw JSON files without a summary are listed
    at the end. Paths are relative to ``docs``."""
    if not results.is_dir():
        return "\n*No recorded results yet (``benchmarks/results/`` is missing).*\n"
    rel = Path("..") / results.relative_to(docs.parent) if results.is_relative_to(docs.parent) else results
    summaries = sorted(results.glob("*.md"))
    if not summaries:
        return "\n*No recorded results yet.*\n"
    parts: list[str] = []
    for summary in summaries:
        text = summary.read_text(encoding="utf-8")
        include = (rel / summary.name).as_posix()
        parts.append(f"\n```{{include}} {include}\n:heading-offset: 1\n:relative-images:\n```\n")
        plots = [
            p for p in sorted(results.iterdir())
            if p.suffix.lower() in PLOT_SUFFIXES and (p.stem == summary.stem or p.stem.startswith(summary.stem + "_"))
            and p.name not in text
        ]
        for plot in plots:
            parts.append(f"\n```{{figure}} {(rel / plot.name).as_posix()}\n:alt: {plot.stem}\n\n{plot.name}\n```\n")
        raw = summary.with_suffix(".json")
        if raw.exists():
            parts.append(f"\nRaw data: {{download}}`{raw.name} <{(rel / raw.name).as_posix()}>`.\n")
    orphans = [p for p in sorted(results.glob("*.json")) if not p.with_suffix(".md").exists()]
    if orphans:
        parts.append("\n## Raw results without a summary\n")
        parts.extend(f"\n- {{download}}`{p.name} <{(rel / p.name).as_posix()}>`" for p in orphans)
        parts.append("\n")
    return "".join(parts)


def integration_reference(module: str) -> str:
    """``automodule`` for an optional integration when it imports, else a note naming its pip extra."""
    name = module.rsplit(".", 1)[1]
    extra, library = INTEGRATIONS.get(module, (name, name))
    try:
        importlib.import_module(module)
    except ImportError:
        return (
            f"\n`{module}` is not documented in this build: it needs {library} "
            f"(from a clone: `pip install -e \".[{extra}]\"`).\n"
        )
    return f"\n```{{eval-rst}}\n.. automodule:: {module}\n```\n"


# Docstrings in this package write maths as plain text, e.g. "[α·log(|g| + ε), sign(g)]". In reST, |g| would
# be a substitution reference (an error), so bars in prose are escaped; literal and doctest blocks and ``inline
# literals`` are left alone.
_BARS = re.compile(r"(``.*?``)|\|")


def escape_bars(lines: list[str]) -> list[str]:
    """``|`` → ``\\|`` in the prose lines of a docstring (in place), outside literal blocks, doctests and
    inline literals."""
    literal_indent: int | None = None  # the indent of the paragraph that opened a ``::`` literal block
    in_doctest = False
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if not stripped:
            in_doctest = False
            continue
        if literal_indent is not None:
            if indent > literal_indent:
                continue
            literal_indent = None
        if in_doctest or stripped.startswith(">>>"):
            in_doctest = True
            continue
        if "|" in line:
            lines[i] = _BARS.sub(lambda m: m.group(1) or "\\|", line)
        if stripped.endswith("::"):
            literal_indent = indent
    return lines


def _on_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    escape_bars(lines)


def public_modules() -> list[str]:
    """Every public module of the package and of ``learned_inference.integrations`` (names without a leading
    underscore; ``__main__`` excluded), found on disk so that a new module is documented without editing a page."""
    import learned_inference.integrations as integrations

    names = [f"learned_inference.{m.name}" for m in pkgutil.iter_modules(learned_inference.__path__)]
    names += [f"learned_inference.integrations.{m.name}" for m in pkgutil.iter_modules(integrations.__path__)]
    return sorted(n for n in names if not n.rsplit(".", 1)[1].startswith("_"))


def other_modules(page: str) -> str:
    """Reference sections for the public modules that ``page`` does not document by name."""
    missing = [m for m in public_modules() if f"automodule:: {m}\n" not in page and f"integration: {m} " not in page]
    if not missing:
        return ""
    parts = ["\n## Other modules\n"]
    for module in missing:
        parts.append(f"\n### `{module}`\n")
        parts.append(integration_reference(module) if ".integrations." in module else
                     f"\n```{{eval-rst}}\n.. automodule:: {module}\n```\n")
    return "".join(parts)


def _on_source_read(app, docname: str, source: list[str]) -> None:
    text = source[0]
    if docname == "api":
        text = text.replace("<!-- other-modules -->", other_modules(text))
    if docname == "benchmarks":
        text = text.replace("<!-- recorded-results -->", benchmark_sections())
    text = re.sub(r"<!-- integration: (\S+) -->", lambda m: integration_reference(m.group(1)), text)
    source[0] = text


def setup(app):
    app.connect("source-read", _on_source_read)
    app.connect("autodoc-process-docstring", _on_docstring)
    return {"parallel_read_safe": True}
