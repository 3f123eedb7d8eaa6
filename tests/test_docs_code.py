"""Every ``.. code-block:: python`` of docs/eagle3.rst runs to the end on its own.

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

PAGE = Path(__file__).resolve().parent.parent / "docs" / "eagle3.rst"

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


BLOCKS = python_blocks(PAGE.read_text())


def test_page_has_code_blocks() -> None:
    assert len(BLOCKS) >= 3, f"expected the three code blocks of {PAGE.name}, found {len(BLOCKS)}"


@pytest.mark.parametrize(("line", "source"), BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_code_block_runs(line: int, source: str) -> None:
    missing = sorted(
        name
        for name in imported_libraries(source)
        if name not in sys.builtin_module_names and importlib.util.find_spec(name) is None
    )
    if missing:
        pytest.skip(f"the block at {PAGE.name}:{line} needs {', '.join(missing)}, not installed")
    code = compile(source, f"{PAGE.name}:{line}", "exec")
    exec(code, {"__name__": "__docs__"})
