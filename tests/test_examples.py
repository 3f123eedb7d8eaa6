"""Each script in ``examples/`` whose libraries are installed runs to the end.

The scripts assert their own results (the loss goes down, a reduction matches its formula), so
an exit status of 0 means they hold. Those that need transformers, Lightning or NeMo AutoModel
skip in ``nox -s tests``; ``nox -s examples`` installs those libraries and runs every script.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Each script and the libraries it imports besides NumPy and softce_multi.
REQUIREMENTS = {
    "torch_linear_loss.py": ("torch",),
    "jax_optax.py": ("jax", "optax"),
    "numpy_with_grad.py": (),
    "specforge_reduction.py": ("torch",),
    "hf_trainer.py": ("torch", "transformers", "accelerate"),
    "lightning_module.py": ("torch", "lightning"),
    "nemo_automodel_eagle3.py": ("torch", "transformers", "nemo_automodel"),
}

SCRIPTS = sorted(path.name for path in EXAMPLES.glob("*.py"))


def test_every_example_lists_its_libraries() -> None:
    assert sorted(REQUIREMENTS) == SCRIPTS


def test_the_examples_page_shows_every_example() -> None:
    page = (ROOT / "docs" / "examples.rst").read_text()

    shown = sorted(name for name in SCRIPTS if f".. literalinclude:: ../examples/{name}" in page)

    assert shown == SCRIPTS


def test_examples_session_runs_every_example() -> None:
    noxfile = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    sessions = [
        node
        for node in noxfile.body
        if isinstance(node, ast.FunctionDef) and node.name == "examples"
    ]
    assert len(sessions) == 1, "noxfile.py has no examples session"
    named = {
        node.value
        for node in ast.walk(sessions[0])
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    forgotten = [script for script in SCRIPTS if script not in named]
    assert not forgotten, f"nox -s examples does not run {forgotten}"


@pytest.mark.parametrize("script", sorted(REQUIREMENTS))
def test_example_runs(script: str) -> None:
    missing = [name for name in REQUIREMENTS[script] if importlib.util.find_spec(name) is None]
    if missing:
        which = "which is" if len(missing) == 1 else "which are"
        pytest.skip(f"examples/{script} needs {', '.join(missing)}, {which} not installed")
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, (
        f"examples/{script} exited with {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )
    assert "loss went from" in completed.stdout
