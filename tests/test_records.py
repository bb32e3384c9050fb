"""Every figure the README and the docs quote agrees with its record in ``benchmarks/results/*.json``.

How to quote a recorded number (README.md and docs/*.md): write the number as readers should see it, then, right
after it (after its unit, if any: ``%``, ``×``, ``nats``, ``s``, ``MiB``), an HTML comment naming the record and the
value::

    the iterative model reaches 98.6<!-- rec training_comparison: nll_iterative --> nats
    5 steps close 93%<!-- rec frozen_refinement: 100 * per_init.encoder.gap_closed_T5 --> of the gap
    a learned step costs 2.4×<!-- rec frozen_refinement: timings["learned (encoder)"].step_s
        / timings["adam (lr 0.003)"].step_s --> an Adam step

``rec <name>: <expression>`` reads ``benchmarks/results/<name>.json``. The expression is arithmetic (``+ - * /``,
parentheses, ``abs``, ``min``, ``max``, number constants) over key paths into that record: ``a.b`` or ``a["b"]``
for a key (``["..."]`` for keys with spaces or that start with a digit), ``a[0]`` for a list item. The test rounds
the value to the decimals the quoted number shows and fails if they differ (``−`` and ``-`` are both minus; commas
in thousands are ignored), if the record or a key is missing, or if the comment follows no number. Markdown renders
the comment invisibly, on GitHub and in the Sphinx build.

A figure from elsewhere is marked ``<!-- cited: <source> -->`` (a paper's table, a threshold a test asserts), an
option's value ``<!-- setting: <option> -->``. A number followed by nats, ``%`` or ``×``, and a negative decimal
(an ELBO), outside code, must carry one of the three markers (:func:`test_every_result_figure_carries_a_marker`):
a measured figure without a record is removed, not quoted.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

MINUS, TIMES = "\u2212", "\u00d7"  # − and ×, as the pages write them
MARKER = re.compile(r"<!--\s*(?P<kind>rec|cited|setting)\b(?P<body>.*?)-->", flags=re.DOTALL)
#: a quoted number, its unit and any closing emphasis, right before a marker
QUOTED = re.compile(rf"(?P<number>[{MINUS}-]?\d[\d,]*(?:\.\d+)?)(?P<unit>\s?(?:%|{TIMES}|nats|s|MiB))?\**$")
#: figures that must carry a marker: a number with a unit of a result, or a negative decimal
RESULT_LIKE = re.compile(rf"(?<![\w.])(?:[{MINUS}-]\d+\.\d+|\d[\d,]*(?:\.\d+)?(?:\s?(?:%|{TIMES}(?!\d))|\snats\b))")

_OPERATORS: dict[type, Callable[..., float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}
_FUNCTIONS: dict[str, Callable[..., float]] = {"abs": abs, "min": min, "max": max}


@cache
def record(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"no record benchmarks/results/{name}.json")
    return json.loads(path.read_text(encoding="utf-8"))


def evaluate(expression: str, data: dict[str, Any]) -> float:
    """The value of a marker's expression: arithmetic over key paths into ``data`` (see the module docstring)."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return value(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float | str):
            return node.value
        if isinstance(node, ast.Name):
            return data[node.id]
        if isinstance(node, ast.Attribute):
            return value(node.value)[node.attr]
        if isinstance(node, ast.Subscript):
            return value(node.value)[value(node.slice)]
        if isinstance(node, ast.BinOp | ast.UnaryOp) and type(node.op) in _OPERATORS:
            operands = (node.left, node.right) if isinstance(node, ast.BinOp) else (node.operand,)
            return _OPERATORS[type(node.op)](*(value(o) for o in operands))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
            return _FUNCTIONS[node.func.id](*(value(a) for a in node.args))
        raise ValueError(f"not allowed in a record expression: {ast.dump(node)}")

    result = value(ast.parse(expression.strip(), mode="eval"))
    if isinstance(result, bool) or not isinstance(result, int | float):
        raise ValueError(f"{expression!r} is not a number but {result!r}")
    return float(result)


def prose(text: str) -> str:
    """``text`` with fenced code blocks and inline code blanked (same length, so offsets and lines hold)."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
    text = re.sub(r"^([ \t]*)(`{3,}|~{3,})[^\n]*\n.*?^\1\2[ \t]*$", blank, text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]+`", blank, text)


def quotes(page: Path) -> list[tuple[int, str, str, str]]:
    """Every ``rec`` marker of a page: (line, quoted number as written, record name, expression)."""
    text = prose(page.read_text(encoding="utf-8"))
    found = []
    for marker in MARKER.finditer(text):
        if marker["kind"] != "rec":
            continue
        line = text.count("\n", 0, marker.start()) + 1
        head, sep, expression = marker["body"].partition(":")
        before = QUOTED.search(text[max(0, marker.start() - 40):marker.start()])
        assert sep and before, f"{page.name}:{line}: a rec marker must follow a number and read 'rec <name>: <expr>'"
        found.append((line, before["number"], head.strip(), " ".join(expression.split())))
    return found


def agrees(quoted: str, value: float) -> bool:
    """Whether ``quoted`` (as written) is ``value`` rounded to the decimals it shows."""
    number = float(quoted.replace(MINUS, "-").replace(",", ""))
    decimals = len(quoted.partition(".")[2])
    return math.isfinite(value) and abs(number - value) <= 0.5 * 10.0 ** -decimals * (1 + 1e-9)


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_quoted_number_agrees_with_its_record(page: Path):
    wrong = []
    for line, quoted, name, expression in quotes(page):
        try:
            value = evaluate(expression, record(name))
        except (KeyError, IndexError, TypeError, ValueError) as error:
            wrong.append(f"line {line}: {quoted} <- {name}: {expression}: {error!r}")
            continue
        if not agrees(quoted, value):
            wrong.append(f"line {line}: quotes {quoted}, but {name}.json gives {expression} = {value!r}")
    assert not wrong, f"{page_id(page)}: numbers that differ from their records:\n" + "\n".join(wrong)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_result_figure_carries_a_marker(page: Path):
    text = prose(page.read_text(encoding="utf-8"))
    unmarked = []
    for figure in RESULT_LIKE.finditer(text):
        after = text[figure.end():figure.end() + 12]
        if not re.match(r"(?:\s?(?:nats|s|MiB))?\**\s?<!--\s*(?:rec|cited|setting)\b", after):
            line = text.count("\n", 0, figure.start()) + 1
            unmarked.append(f"line {line}: {figure.group(0)}")
    assert not unmarked, (f"{page_id(page)}: figures without a record marker (see tests/test_records.py for how to "
                          "quote one):\n" + "\n".join(unmarked))


def test_the_readme_table_has_a_row_linking_each_record():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = [line for line in readme.splitlines() if line.startswith("|")]
    for path in sorted(RESULTS.glob("*.json")):
        link = f"](benchmarks/results/{path.stem}.md)" if path.with_suffix(".md").exists() else \
            f"](benchmarks/results/{path.name})"
        assert any(link in row for row in table), f"README's results table has no row linking {link[2:-1]}"


def test_every_record_says_how_when_and_from_what_it_was_made():
    run_all = (ROOT / "benchmarks" / "run_all.sh").read_text(encoding="utf-8")
    for path in sorted(RESULTS.glob("*.json")):
        data = record(path.stem)
        for key in ("command", "date", "scale", "commit"):
            assert key in data, f"{path.name} has no {key!r}"
        assert data["commit"] or data.get("recorded_in_commit"), f"{path.name}: neither commit nor recorded_in_commit"
        assert re.search(rf"^run {path.stem} ", run_all, flags=re.MULTILINE), f"run_all.sh does not rerun {path.stem}"


# --- the checker itself ---------------------------------------------------------------------------------------------

def test_the_checker_reads_markers_and_rounds_as_written(tmp_path: Path):
    data = {"a": {"b c": [1.0, -102.4254]}, "gap": 0.932, "t": {"x": 0.071, "y": 0.0299}}
    assert evaluate('a["b c"][1]', data) == -102.4254
    assert evaluate("100 * gap", data) == pytest.approx(93.2)
    assert evaluate("t.x / t.y", data) == pytest.approx(2.3746, rel=1e-4)
    with pytest.raises(ValueError, match="not allowed"):
        evaluate("__import__('os')", data)
    assert agrees(f"{MINUS}102.43", -102.4254) and not agrees(f"{MINUS}102.42", -102.4254)
    assert agrees("93", 93.2) and not agrees("94", 93.2) and agrees("1,500", 1500.0)
    page = tmp_path / "page.md"
    page.write_text(f"closes **93%**<!-- rec x: 100 * gap --> and {MINUS}102.43 nats<!-- rec x: a.b -->\n"
                    f"```python\nprint(-1.5)\n```\n`-2.5` and {MINUS}3.5\n")
    assert [(q, n, e) for _, q, n, e in quotes(page)] == [("93", "x", "100 * gap"), (f"{MINUS}102.43", "x", "a.b")]
    figures = [f.group(0) for f in RESULT_LIKE.finditer(prose(page.read_text()))]
    assert figures == ["93%", f"{MINUS}102.43", f"{MINUS}3.5"]
