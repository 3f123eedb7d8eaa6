"""The API reference documents every public name of every public module, and nothing private."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import softce_multi

DOCS = Path(__file__).resolve().parents[1] / "docs"

PUBLIC_MODULES = [
    "softce_multi",
    "softce_multi.torch",
    "softce_multi.jax",
    "softce_multi.distributed",
    "softce_multi.eagle3",
    "softce_multi.reference",
    "softce_multi.testing",
    "softce_multi.kernels",
]


def _documented() -> set[str]:
    """The fully qualified names the reference pages document, from their autodoc directives."""
    names = set()
    for page in ("api.rst", "eagle3.rst"):
        text = (DOCS / page).read_text()
        names.update(re.findall(r"^\.\. auto(?:function|class|data):: (\S+)", text, re.M))
        for module, body in re.findall(
            r"^\.\. automodule:: (\S+)\n((?:   .*\n|\n)*)", text, flags=re.M
        ):
            members = re.search(r":members:(.*(?:\n      .*)*)", body)
            listed = members.group(1).replace("\n", " ") if members else ""
            if members and not listed.strip():
                # ``:members:`` alone documents the module's __all__.
                listed = ", ".join(importlib.import_module(module).__all__)
            names.update(f"{module}.{name.strip()}" for name in listed.split(",") if name.strip())
            names.update(
                f"{module}.{name}" for name in re.findall(r"^\.\. py:data:: (\S+)", text, re.M)
            )
    return names


def test_every_public_module_is_on_the_reference_pages():
    """Every module without a leading underscore, but the engine modules of the kernel layer,
    which docs/kernels.rst describes and only the adapters import."""
    found = {"softce_multi"} | {
        module.name
        for module in pkgutil.walk_packages(softce_multi.__path__, "softce_multi.")
        if not any(part.startswith("_") for part in module.name.split("."))
        and not module.name.startswith("softce_multi.kernels.")
    }

    assert found == set(PUBLIC_MODULES)


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_is_on_the_reference_pages(module):
    if module in ("softce_multi.torch", "softce_multi.reference"):
        pytest.importorskip("torch")
    if module == "softce_multi.jax":
        pytest.importorskip("jax")
    public = importlib.import_module(module).__all__
    documented = _documented()

    missing = [name for name in public if f"{module}.{name}" not in documented]

    assert not missing, f"{module}: not on docs/api.rst or docs/eagle3.rst: {missing}"


def test_the_reference_pages_document_no_private_module():
    text = (DOCS / "api.rst").read_text() + (DOCS / "eagle3.rst").read_text()

    private = re.findall(r"^\.\. auto\w+:: (softce_multi\.\S*\._\w+)", text, re.M)

    assert not private


# The architecture and kernels pages are for contributors: they name the internals on purpose.
USER_PAGES = sorted(
    page.name for page in DOCS.glob("*.rst") if page.name not in ("architecture.rst", "kernels.rst")
)


@pytest.mark.parametrize("page", USER_PAGES)
def test_user_pages_point_at_no_private_module(page):
    text = (DOCS / page).read_text()

    private = re.findall(r"softce_multi(?:\.\w+)*\._\w+|softce_multi/_\w+", text)

    assert not private, f"docs/{page} names private modules: {sorted(set(private))}"


@pytest.mark.parametrize("page", [*USER_PAGES, "../README.md"])
def test_documented_commands_write_outside_the_checkout(page):
    text = (DOCS / page).read_text()

    written = re.findall(r"--(?:plot|json|out)[ =]+([^\s`]+)", text)
    # An absolute path, a shell variable or a placeholder such as PATH or DIR.
    inside = [path for path in written if not (path.startswith(("/", "$", '"$')) or path.isupper())]

    assert not inside, f"{page}: commands write into the checkout: {inside}"
