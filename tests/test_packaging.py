"""Packaging and release: one version for the package, its metadata and its citation; the
license; the dependencies the README names; the install hints of the command line; an sdist that
carries what its tests read."""

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import tomllib

import softce_multi
from softce_multi._cli import demo as _demo

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_installed_metadata_has_the_package_version() -> None:
    try:
        installed_version = importlib.metadata.version("softce_multi")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("softce_multi is not installed, so it has no metadata to read")
    assert installed_version == softce_multi.__version__


def test_the_build_reads_the_version_from_the_package() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project
    assert "version" in project["dynamic"]
    dynamic_version = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic_version == {"attr": "softce_multi.__version__"}


def test_citation_and_changelog_carry_the_package_version() -> None:
    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert re.search(r"^cff-version: 1\.2\.0$", citation, re.MULTILINE)
    assert re.search(rf"^version: {re.escape(softce_multi.__version__)}$", citation, re.MULTILINE)
    assert re.search(r"^license: Apache-2\.0$", citation, re.MULTILINE)
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{softce_multi.__version__}]" in changelog


def test_the_license_file_is_the_apache_license_the_metadata_names() -> None:
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text
    assert "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_the_readme_names_every_dependency() -> None:
    names = [
        re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
        for requirement in PYPROJECT["project"]["dependencies"]
    ]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sentence = next(line for line in readme.splitlines() if "only dependencies" in line)
    named = {"NumPy": "numpy"}
    mentioned = re.findall(r"NumPy|array-api-[a-z]+", sentence)
    assert sorted(named.get(name, name) for name in mentioned) == sorted(names)


def test_the_cupy_extra_is_the_cuda_13_build() -> None:
    assert PYPROJECT["project"]["optional-dependencies"]["cupy"][0].startswith("cupy-cuda13x")
    assert "cupy-cuda13x" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_demo_without_torch_points_to_the_pinned_cpu_build(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_demo, "installed", lambda name: False)
    assert _demo.main(["--backend", "torch"]) == 2
    error = capsys.readouterr().err
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in error
    assert "softce_multi[torch]" not in error


CPU_INDEX_INSTALL = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


@pytest.mark.parametrize("page", ["README.md", "docs/getting_started.rst", "docs/eagle3.rst"])
def test_every_cpu_build_hint_names_pytorchs_cpu_index(page: str) -> None:
    """On PyPI, ``torch==2.13.0`` alone is the CUDA build: a hint for the CPU build gives the
    index it comes from."""
    text = " ".join((ROOT / page).read_text(encoding="utf-8").split())
    hints = re.findall(r"pip install torch==[^`\n]*", text)
    assert hints, f"{page} gives no command that installs torch"
    assert all(CPU_INDEX_INSTALL in hint for hint in hints), hints


def test_the_noxfile_says_where_the_cpu_build_comes_from_and_installs_it_as_pip_is_set_up() -> None:
    """The sessions install ``torch==2.13.0`` through pip's own configuration (no index of their
    own), and the comment above the pin says the CPU build is on PyTorch's CPU index."""
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    comment = noxfile[: noxfile.index("TORCH_CPU = ")].rsplit("\n\n", 1)[-1]
    assert "https://download.pytorch.org/whl/cpu" in comment
    assert "index-url" not in noxfile.replace(comment, "")


def _markdown_tables(text: str) -> list[list[list[str]]]:
    """The tables of a Markdown text, each a list of rows of cells (the header row first, the
    ``|---|`` row left out)."""
    tables: list[list[list[str]]] = []
    previous_was_row = False
    for line in text.splitlines():
        is_row = line.startswith("|")
        if is_row and not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line):
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            if not previous_was_row:
                tables.append([])
            tables[-1].append(cells)
        previous_was_row = is_row
    return tables


def _readme_table(header: list[str]) -> list[list[str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return next(table for table in _markdown_tables(readme) if table[0] == header)


def test_every_row_of_the_readme_tables_has_as_many_cells_as_its_header() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for table in _markdown_tables(readme):
        assert [len(row) for row in table] == [len(table[0])] * len(table), table


def test_the_readme_says_the_cuda_and_gpu_backends_are_tested_by_the_gpu_session() -> None:
    table = _readme_table(["backend", "device", "tested by"])
    tested_by = {(backend, device): session for backend, device, session in table[1:]}
    for backend, device in [("PyTorch", "CUDA"), ("JAX", "GPU"), ("CuPy", "CUDA")]:
        assert tested_by[backend, device] == "`nox -s gpu`"


def test_the_readme_lists_every_nox_session() -> None:
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    sessions = re.findall(r"^@nox\.session\(.*\)\ndef (\w+)\(", noxfile, re.MULTILINE)
    table = _readme_table(["session", "what it does"])
    listed = [session for session, _ in table[1:]]
    assert sorted(listed) == sorted(f"`nox -s {session}`" for session in sessions)


SDIST_FOLDERS = ("tests", "docs", "examples", "device")
"""The folders of the repository the test suite reads, which the sdist carries whole."""

SDIST_RELEASE_FILES = (
    "README.md",
    "LICENSE",
    "CITATION.cff",
    "CHANGELOG.md",
    "noxfile.py",
    "pyproject.toml",
)

BUILD_OUTPUTS = ("docs/_build/html/index.html", "tests/__pycache__/conftest.cpython-311.pyc")
"""Files a build or a test run leaves in the tree, which no sdist carries."""


def _is_build_output(path: str) -> bool:
    parts = path.split("/")
    return (
        "__pycache__" in parts or path.endswith((".pyc", ".pyo")) or path.startswith("docs/_build/")
    )


def test_the_sdist_carries_every_file_its_tests_read_and_no_build_output(tmp_path: Path) -> None:
    """The sdist, built by the project's build backend from a copy of this tree with build outputs
    added, holds every file of the folders the tests read and the release files, and none of
    the outputs."""
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"the build needs setuptools>=77, and {setuptools.__version__} is installed")
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".nox", "build", "dist", "_build", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    for output in BUILD_OUTPUTS:
        (source / output).parent.mkdir(parents=True, exist_ok=True)
        (source / output).write_text("", encoding="utf-8")
    expected = set(SDIST_RELEASE_FILES) | {
        path.relative_to(source).as_posix()
        for folder in SDIST_FOLDERS
        for path in (source / folder).rglob("*")
        if path.is_file() and not path.name.startswith(".")
    }
    expected = {path for path in expected if not _is_build_output(path)}
    build = (
        "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    )
    built = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")],
        cwd=source,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    archive = tmp_path / "dist" / built.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}

    assert sorted(expected - members) == []
    assert sorted(path for path in members if _is_build_output(path)) == []


def test_the_readme_and_ci_install_one_pinned_nox() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    pinned = r"pip install (nox==[0-9.]+)"

    assert len(re.findall(pinned, readme)) == 2  # the demo's command and the tests'
    assert set(re.findall(pinned, readme)) == set(re.findall(pinned, ci))
    assert len(set(re.findall(pinned, ci))) == 1
