"""The documentation: every ```python block on every page runs, and the Sphinx build has no warnings.

Each page's python blocks run in order in one namespace (like a notebook), from a temporary working directory,
with one torch thread. A page that needs optional libraries says so on a line ``% requires: mod1, mod2`` (a MyST
comment); its test is skipped when one of them does not import. Tracebacks point at the page's own line numbers.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts)

FENCE = re.compile(r"^\s*(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\n]*)$")
#: fence languages that would show Python code that is not executed: use ```python (run) or a shell language
UNEXECUTED_PYTHON = {"py", "python3", "pycon", "ipython", "ipython3", "{code-block} python", "{code} python"}


@dataclass(frozen=True)
class Block:
    page: Path
    number: int  # 1-based, among the page's python blocks
    line: int  # 1-based line of the first code line
    info: str
    code: str


def _closes(line: str, fence: str) -> bool:
    """A closing fence: the opening character only, at least as many (CommonMark)."""
    stripped = line.strip()
    return len(stripped) >= len(fence) and set(stripped) == {fence[0]}


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced code block of a Markdown page (top level; nested fences inside a block are its content)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info = match["fence"], match["info"].strip()
        end = i + 1
        while end < len(lines) and not _closes(lines[end], fence):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: code fence {fence!r} is never closed")
        number = sum(b.info == "python" for b in blocks) + 1 if info == "python" else 0
        code = textwrap.dedent("\n".join(lines[i + 1:end])) + "\n"  # blocks inside list items are indented
        blocks.append(Block(page, number, i + 2, info, code))
        i = end + 1
    return blocks


def python_blocks(page: Path) -> list[Block]:
    return [b for b in fenced_blocks(page) if b.info == "python"]


def requirements(page: Path) -> list[str]:
    found = re.findall(r"^%\s*requires:\s*(.+)$", page.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return [name.strip() for line in found for name in line.split(",") if name.strip()]


def page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


def test_the_docs_have_pages_with_code():
    names = {page_id(p) for p in PAGES}
    assert {"index.md", "quickstart.md", "concepts.md", "pyro.md", "api.md", "benchmarks.md", "faq.md"} <= names
    assert sum(len(python_blocks(p)) for p in PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_no_python_example_escapes_execution(page: Path):
    """Python shown under another fence language would not be run by the tests: only ```python is allowed."""
    bad = [f"line {b.line - 1}: ```{b.info}" for b in fenced_blocks(page) if b.info.lower() in UNEXECUTED_PYTHON]
    assert not bad, f"{page_id(page)}: use ```python (executed by tests/test_docs.py) for Python code: {bad}"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=page_id)
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for module in requirements(page):
        try:
            importlib.import_module(module)
        except ImportError as error:
            pytest.skip(f"{page_id(page)} needs {module}: {error}")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small examples: threads only contend on a shared machine
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    try:
        for block in python_blocks(page):
            # pad so that line numbers in tracebacks are the page's own
            code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
            try:
                exec(code, namespace)
            except Exception:
                pytest.fail(
                    f"{page_id(page)}, python block {block.number} (line {block.line}) failed:\n"
                    f"{traceback.format_exc()}",
                    pytrace=False,
                )
    finally:
        torch.set_num_threads(threads)
        pyro = sys.modules.get("pyro")
        if pyro is not None:
            pyro.clear_param_store()


# --- the build hooks in docs/conf.py ------------------------------------------------------------------------------

def _conf():
    spec = importlib.util.spec_from_file_location("_docs_conf", DOCS / "conf.py")
    assert spec is not None and spec.loader is not None
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


def test_benchmarks_page_includes_every_summary_and_its_plots(tmp_path: Path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "alpha.md").write_text("# Alpha\n\nno plots here\n")
    (results / "alpha.json").write_text("{}")
    (results / "beta.md").write_text("# Beta\n\n![shown already](beta_curve.png)\n")
    for plot in ("beta.png", "beta_curve.png", "beta_steps.svg", "betamax.png"):
        (results / plot).write_bytes(b"")
    (results / "gamma.json").write_text("{}")
    text = _conf().benchmark_sections(results, docs=tmp_path / "docs")

    assert "{include} ../benchmarks/results/alpha.md" in text and "{include} ../benchmarks/results/beta.md" in text
    assert text.index("alpha.md") < text.index("beta.md")
    assert "{figure} ../benchmarks/results/beta.png" in text and "{figure} ../benchmarks/results/beta_steps.svg" in text
    assert "{figure} ../benchmarks/results/beta_curve.png" not in text  # the summary shows it itself
    assert "betamax" not in text  # another stem
    assert "alpha.json" in text and "gamma.json" in text  # raw data, with and without a summary
    assert "No recorded results" in _conf().benchmark_sections(tmp_path / "missing", docs=tmp_path / "docs")


def test_bars_in_docstring_prose_are_escaped_but_code_is_not():
    lines = [
        "[a·log(|g| + e), sign(g)] and ``|x|``", "Usage::", "", "    a = b | c", "", "back to |prose|",
        ">>> y = 1 | 2", "3", "", "done",
    ]
    assert _conf().escape_bars(list(lines)) == [
        r"[a·log(\|g\| + e), sign(g)] and ``|x|``", "Usage::", "", "    a = b | c", "", r"back to \|prose\|",
        ">>> y = 1 | 2", "3", "", "done",
    ]


def test_every_public_module_is_in_the_api_reference():
    conf = _conf()
    page = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = page + conf.other_modules(page)
    for module in conf.public_modules():
        assert module in documented, module
    assert "learned_inference.optimizer" in conf.public_modules()


# --- the build itself -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML of one ``sphinx-build -W`` of the docs (shared by the tests below); fails on any warning."""
    for module in ("sphinx", "myst_parser"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    tmp_path = tmp_path_factory.mktemp("docs")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
               "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, f"sphinx-build failed ({' '.join(command)}):\n{done.stdout}\n{done.stderr}"
    return tmp_path / "html"


def test_sphinx_build_has_no_warnings(built_docs: Path):
    assert (built_docs / "index.html").exists()


def test_the_build_documents_every_public_name(built_docs: Path):
    """Every name in ``learned_inference.__all__`` and the integrations' classes have an entry (an HTML anchor named
    by their module) on some page: with the ``docs`` extra, which installs Pyro and Lightning, nothing is left out."""
    for extra in ("pyro", "lightning"):
        if importlib.util.find_spec(extra) is None:
            pytest.skip(f"{extra} is not installed (pip install -e '.[docs]')")
    import learned_inference
    import learned_inference.integrations.lightning as lightning
    import learned_inference.integrations.pyro as pyro

    anchors = {a for page in built_docs.glob("*.html") for a in re.findall(r'id="([\w.]+)"', page.read_text("utf-8"))}
    objects = [getattr(learned_inference, name) for name in learned_inference.__all__ if name != "__version__"]
    wanted = {f"{obj.__module__}.{obj.__name__}" for obj in objects}  # documented where they are defined
    # the integrations are documented as packages, under the names their users import
    wanted |= {f"{package.__name__}.{name}" for package in (pyro, lightning) for name in package.__all__}
    assert "learned_inference.integrations.lightning.IterativeInferenceModule" in wanted
    assert not sorted(wanted - anchors), "public names without an entry in the API reference"
