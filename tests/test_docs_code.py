"""Every ``.. code-block:: python`` of docs/eagle3.rst and docs/sparse.rst runs to the end on
its own.

Each block is executed in a fresh namespace, so it may use nothing that an earlier block
defined. The blocks assert their own results; a block that imports a library that is not
installed is skipped, naming the library.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = {"eagle3.rst": 3, "sparse.rst": 3}  # each page and the code blocks it has at least

# The directive, its option lines, then the indented body up to the first unindented line.
CODE_BLOCK = re.compile(
    r"^\.\. code-block:: python\n(?:[ \t]+:.*\n)*\n((?:[ \t]+.*\n|[ \t]*\n)+)", re.MULTILINE
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The body of each Python code block of ``text``, dedented, with its directive's line."""
    return [
        (text.count("\n", 0, match.start()) + 1, textwrap.dedent(match.group(1)))
        for match in CODE_BLOCK.finditer(text)
    ]


def imported_libraries(source: str) -> set[str]:
    """The top-level names of the modules that ``source`` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


BLOCKS = [
    (page, line, source)
    for page in PAGES
    for line, source in python_blocks((DOCS / page).read_text())
]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_has_code_blocks(page: str) -> None:
    found = sum(1 for name, _, _ in BLOCKS if name == page)
    assert found >= PAGES[page], f"expected {PAGES[page]} code blocks in {page}, found {found}"


@pytest.mark.parametrize(
    ("page", "line", "source"), BLOCKS, ids=[f"{page}:{line}" for page, line, _ in BLOCKS]
)
def test_code_block_runs(page: str, line: int, source: str) -> None:
    missing = sorted(
        name
        for name in imported_libraries(source)
        if name not in sys.builtin_module_names and importlib.util.find_spec(name) is None
    )
    if missing:
        pytest.skip(f"the block at {page}:{line} needs {', '.join(missing)}, not installed")
    code = compile(source, f"{page}:{line}", "exec")
    exec(code, {"__name__": "__docs__"})
