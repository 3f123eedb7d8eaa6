"""The package's layout: imports only go down the layers, never in a circle, and no module is long.

Every import of a module of the package counts, lazy ones inside functions included, read from
the source with :mod:`ast`. ``docs/architecture.rst`` draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "softce_multi"

#: The layers, lowest first: a module may import its own layer's modules (without a circle) and
#: those of lower layers, never a higher one. A module is in the layer of its longest prefix.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("softce_multi._types", "softce_multi._compat"),
    ("softce_multi._core", "softce_multi._validate", "softce_multi._chunks"),
    ("softce_multi._linear",),
    ("softce_multi.kernels",),
    ("softce_multi._adapters",),
    ("softce_multi._api",),
    ("softce_multi.torch", "softce_multi.jax", "softce_multi.reference"),
    ("softce_multi.testing", "softce_multi.eagle3", "softce_multi.distributed"),
    ("softce_multi", "softce_multi.__main__", "softce_multi._cli"),
)

#: The most lines a module outside the tests may have.
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (a parent package only by name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from package import module`` imports the module; any other name, the package.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                for alias in node.names
            ]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _layer(name: str) -> int:
    matches = [
        (len(prefix), index)
        for index, layer in enumerate(LAYERS)
        for prefix in layer
        if name == prefix or name.startswith(prefix + ".")
    ]
    assert matches, f"{name} is in no layer: add it to LAYERS"
    return max(matches)[1]


MODULES = _modules()
GRAPH = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}


def test_every_module_is_in_a_layer():
    for name in MODULES:
        _layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_down_the_layers(name):
    upward = sorted(target for target in GRAPH[name] if _layer(target) > _layer(name))
    assert not upward, f"{name} (layer {_layer(name)}) imports higher layers: {upward}"


def test_no_import_cycles():
    cycles = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(MODULES):
        if name not in state:
            visit(name, [name])
    assert not cycles, " | ".join(" -> ".join(cycle) for cycle in cycles)


def _uses_array_api_compat_checks(path: Path) -> bool:
    """Whether the module imports array-api-compat itself or a name from it other than a
    namespace (``from array_api_compat import torch`` is a namespace)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(
            alias.name == "array_api_compat" for alias in node.names
        ):
            return True
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == "array_api_compat"
            and any(alias.name not in {"numpy", "torch", "cupy"} for alias in node.names)
        ):
            return True
    return False


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"softce_multi._compat"}))
def test_type_checks_go_through_compat(name):
    # array-api-compat's checks are cached, and Dynamo warns as it traces each cached call.
    assert not _uses_array_api_compat_checks(MODULES[name]), (
        f"{name} imports array_api_compat's checks: use softce_multi._compat"
    )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_are_at_most_600_lines(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


@pytest.mark.parametrize("library", ["generic", "torch", "jax"])
def test_every_adapter_module_is_an_adapter(library):
    import importlib

    from softce_multi._core import Adapter

    pytest.importorskip(library if library != "generic" else "numpy")
    module = importlib.import_module(f"softce_multi._adapters.{library}")

    assert isinstance(module, Adapter)
