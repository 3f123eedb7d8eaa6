"""Each script in ``examples/`` that needs only the test environment's libraries runs to the end.

The scripts assert their own results (the loss goes down, a reduction matches its formula), so
an exit status of 0 means they hold.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Each script and the libraries it imports besides NumPy and softce_multi.
REQUIREMENTS = {
    "torch_linear_loss.py": ("torch",),
    "jax_optax.py": ("jax", "optax"),
    "numpy_with_grad.py": (),
    "specforge_reduction.py": ("torch",),
}


@pytest.mark.parametrize("script", sorted(REQUIREMENTS))
def test_example_runs(script: str) -> None:
    missing = [name for name in REQUIREMENTS[script] if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"examples/{script} needs {', '.join(missing)}, which is not installed")
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
