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

As a script, it is the benchmark that runs all of this and records the counts (``results/pyro_autoguide_suite.json``
and ``.md``): it extracts Pyro's tests (``tests/infer/test_autoguide.py`` with its helpers and ``setup.cfg``) from
the ``HEAD`` of a Pyro git directory (``--pyro-repo``, default ``$PYRO_REPO`` or the local mirror) into a temporary
folder and, for each guide of ``--guides``, runs three pytest processes there (``OMP_NUM_THREADS`` = ``--threads``):
the recording run with Pyro's class, the selected tests with Pyro's class, the selected tests with ours; the counts
come from pytest's JUnit XML. ``--scale smoke`` runs only the tests matching ``-k "test_scores or test_callable"``
(a few seconds each; tests the script, no numbers)::

    python benchmarks/pyro_autoguide_suite.py --threads 1                      # writes benchmarks/results/
    python benchmarks/pyro_autoguide_suite.py --scale smoke --out /tmp/bench   # functional test (< 1 min)

By hand (Pyro's tests live in a scratch copy outside this repository; never commit them)::

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

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
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


# ---- the benchmark script (``python benchmarks/pyro_autoguide_suite.py``): the pytest runs are subprocesses ----

NAME = "pyro_autoguide_suite"
BENCHMARKS = Path(__file__).resolve().parent
DEFAULT_PYRO_REPO = Path(os.environ.get("PYRO_REPO", "/work/.mirror/pyro-ppl+pyro/repo"))
TEST_FILE = "tests/infer/test_autoguide.py"
PYRO_FILES = ("tests/__init__.py", "tests/common.py", "tests/conftest.py", "tests/infer/__init__.py", TEST_FILE,
              "setup.cfg")
SMOKE_FILTER = "test_scores or test_callable"
OURS = {"normal": "AutoIterativeNormal", "low_rank": "AutoIterativeNormal(family=LowRankGaussian(rank))"}


def extract_tests(repo: Path, into: Path) -> str:
    """Writes Pyro's autoguide tests (:data:`PYRO_FILES` at ``HEAD`` of the git directory ``repo``) under ``into``;
    returns the commit."""
    archive = subprocess.run(["git", "-C", str(repo), "archive", "HEAD", *PYRO_FILES], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _nodeid(root: Path, classname: str, name: str) -> str:
    """pytest's node id of a JUnit ``testcase`` (its ``classname`` is the module path with dots, then classes)."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (root / path).is_file():
            return "::".join([path, *parts[i:], name])
    return f"{classname}::{name}"


def junit_counts(xml: Path, root: Path) -> dict[str, Any]:
    """Passed, failed (a failure or an error), xfailed and skipped tests of a ``--junitxml`` report, with the ids of
    the failed ones."""
    counts: dict[str, Any] = {"passed": 0, "failed": 0, "xfailed": 0, "skipped": 0}
    failed: list[str] = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        tags = {child.tag: child for child in case}
        if "failure" in tags or "error" in tags:
            counts["failed"] += 1
            failed.append(_nodeid(root, case.get("classname", ""), case.get("name", "")))
        elif "skipped" in tags:
            counts["xfailed" if tags["skipped"].get("type") == "pytest.xfail" else "skipped"] += 1
        else:
            counts["passed"] += 1
    counts["failed_tests"] = sorted(failed)
    return counts


def run_pytest(root: Path, env: dict[str, str], label: str, *, keyword: str | None, quiet: bool) -> dict[str, Any]:
    """Pyro's autoguide tests under this plugin (``env`` holds the ``LI_*`` settings) in ``root``: the counts
    (:func:`junit_counts`) and the seconds the process took."""
    xml, log = root / f"{label}.xml", root / f"{label}.log"
    command = [sys.executable, "-m", "pytest", "-p", "pyro_autoguide_suite", "-p", "no:cacheprovider", "-q",
               "-rfEsxX", f"--junitxml={xml}", TEST_FILE, *(["-k", keyword] if keyword else [])]
    started = time.perf_counter()
    with open(log, "w") as output:
        streams: dict[str, Any] = {"stdout": output, "stderr": subprocess.STDOUT} if quiet else {}
        done = subprocess.run(command, cwd=root, env=env, check=False, **streams)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1) or not xml.is_file():  # 0: all passed, 1: some failed; else pytest broke
        tail = log.read_text()[-4000:] if quiet else "(its output is above)"
        raise RuntimeError(f"pytest ({label}) exited with {done.returncode}:\n{tail}")
    return {**junit_counts(xml, root), "seconds": round(seconds, 2)}


def run_guide(guide: str, root: Path, threads: int, *, keyword: str | None, quiet: bool) -> dict[str, Any]:
    """The three runs of one guide: record the tests that build Pyro's class, run those with Pyro's class, then with
    ours."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LI_AUTONORMAL", "LI_GUIDE"))}
    base.update(LI_GUIDE=guide, OMP_NUM_THREADS=str(threads),
                PYTHONPATH=os.pathsep.join([str(BENCHMARKS), *filter(None, [os.environ.get("PYTHONPATH")])]))
    selection = root / f"{guide}_tests.txt"
    original = {**base, "LI_AUTONORMAL": "original"}
    run_pytest(root, {**original, "LI_AUTONORMAL_RECORD": str(selection)}, f"{guide}_record", keyword=keyword,
               quiet=quiet)
    selected = [line for line in selection.read_text().splitlines() if line]
    select = {"LI_AUTONORMAL_SELECT": str(selection)}
    pyro_run = run_pytest(root, {**original, **select}, f"{guide}_original", keyword=keyword, quiet=quiet)
    ours = run_pytest(root, {**base, **select}, f"{guide}_ours", keyword=keyword, quiet=quiet)
    return {"class": _GUIDES[guide][0], "ours_class": OURS[guide], "selected": len(selected),
            "original": pyro_run, "ours": ours}


def render(guides: dict[str, dict[str, Any]], commit: str, keyword: str | None) -> list[str]:
    """The Markdown body: the counts by guide and the tests that fail with ours."""
    import common

    header = ("guide", "tests selected", "passed with Pyro's class", "passed with ours", "failed with ours",
              "xfailed (Pyro's / ours)")
    rows = [(f"{g} (`{r['class']}`)", r["selected"], r["original"]["passed"], r["ours"]["passed"],
             r["ours"]["failed"], f"{r['original']['xfailed']} / {r['ours']['xfailed']}") for g, r in guides.items()]
    lines = [f"Pyro's own `{TEST_FILE}` (Pyro commit `{commit[:12]}`"
             + (f", only `-k \"{keyword}\"`" if keyword else "") + "), run on the tests that build the guide, with "
             "Pyro's class and with ours rebound to its name (`benchmarks/pyro_autoguide_suite.py`, a pytest plugin).",
             "", *common.table(header, rows), ""]
    for guide, r in guides.items():
        failing = r["ours"]["failed_tests"]
        lines += [f"Failing with ours ({guide}, `{r['ours_class']}`)" + (":" if failing else ": none."), ""]
        lines += [f"* `{test}`" for test in failing] + ([""] if failing else [])
    return lines[:-1]


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pyro-repo", type=Path, default=DEFAULT_PYRO_REPO,
                        help=f"a Pyro git directory whose HEAD's tests run (default $PYRO_REPO or {DEFAULT_PYRO_REPO})")
    parser.add_argument("--guides", nargs="+", choices=list(_GUIDES), default=list(_GUIDES),
                        help="which of Pyro's classes to swap for ours (default both)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark (see the module docstring) and writes its results; returns the JSON content."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import common

    args = common.parse_args(NAME, "Pyro's own autoguide tests with AutoNormal / AutoLowRankMultivariateNormal "
                             "rebound to AutoIterativeNormal", argv=argv, extra=_options)
    started = common.setup(args)
    if not ((args.pyro_repo / "HEAD").is_file() or (args.pyro_repo / ".git").exists()):
        raise SystemExit(f"no Pyro git directory at {args.pyro_repo}: pass --pyro-repo or set PYRO_REPO")
    keyword = SMOKE_FILTER if args.scale == "smoke" else None
    guides: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pyro_autoguide_suite_") as scratch:
        root = Path(scratch)
        commit = extract_tests(args.pyro_repo, root)
        for guide in args.guides:
            guides[guide] = run_guide(guide, root, args.threads, keyword=keyword, quiet=args.quiet)
            if not args.quiet:
                r = guides[guide]
                print(f"{guide}: {r['selected']} selected; Pyro's {r['original']['passed']} passed, ours "
                      f"{r['ours']['passed']} passed, {r['ours']['failed']} failed", flush=True)
    result = {
        "settings": {"pyro_repo": str(args.pyro_repo), "pyro_tests_commit": commit, "test_file": TEST_FILE,
                     "keyword": keyword, "guides": args.guides},
        "pyro_version": pyro.__version__,
        "guides": guides,
    }
    common.write_results(args, result, title="Pyro's autoguide tests with our guides in place of Pyro's",
                         body=render(guides, commit, keyword), started=started)
    return result


if __name__ == "__main__":
    main()
