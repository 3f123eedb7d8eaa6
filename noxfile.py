"""Developer and CI sessions. ``nox -s tests`` runs the CPU test suite; ``nox -l`` lists the rest.

Every session builds its own virtual environment with the standard library's ``venv`` and pip,
so a machine needs only Python 3.11 and ``python3 -m pip install nox==2026.10.20``. Environments
are kept in ``.nox/`` and reused on the next run; ``nox -R`` also skips the install step.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests", "lint"]

PYTHON = "3.11"

# The CPU build of torch 2.13.0 comes from PyTorch's CPU index,
# https://download.pytorch.org/whl/cpu; on PyPI, torch==2.13.0 (like an unpinned "torch" or a
# range that admits a newer release) is a CUDA build of several GB. The sessions name no index:
# pip finds the CPU build where its configuration points it, a find-links folder holding the
# wheel or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; with PyPI alone they install
# the CUDA build. Torch is always pinned and installed in the same pip command as the package.
TORCH_CPU = os.environ.get("SOFTCE_TORCH_SPEC", "torch==2.13.0")
JAX_CPU = os.environ.get("SOFTCE_JAX_SPEC", "jax==0.10.2")
TRITON = "triton==3.9.0"
ARRAY_API_STRICT = "array-api-strict==2.6.1"

# One CUDA release for the three: torch's wheel on PyPI, JAX's plugin and CuPy all for CUDA 13.
TORCH_GPU = os.environ.get("SOFTCE_TORCH_GPU_SPEC", "torch==2.14.1")
JAX_GPU = os.environ.get("SOFTCE_JAX_GPU_SPEC", "jax[cuda13]==0.10.2")
CUPY_GPU = os.environ.get("SOFTCE_CUPY_SPEC", "cupy-cuda13x")

# The examples' libraries, at releases that install here beside the CPU torch. NeMo AutoModel
# 0.7.0 requires this transformers release. It is installed without its dependencies, which
# include CUDA-only kernels (quack-kernels brings nvidia-cutlass-dsl and cuda-python); the
# modules its EAGLE-3 trainer imports need only transformers, datasets and Pillow besides torch.
# The Trainer of transformers needs accelerate.
TRANSFORMERS = os.environ.get("SOFTCE_TRANSFORMERS_SPEC", "transformers==5.18.0")
ACCELERATE = "accelerate==1.16.0"
LIGHTNING = os.environ.get("SOFTCE_LIGHTNING_SPEC", "lightning==2.6.6")
NEMO_AUTOMODEL = os.environ.get("SOFTCE_NEMO_AUTOMODEL_SPEC", "nemo_automodel==0.7.0")
NEMO_AUTOMODEL_IMPORTS = ("datasets==5.2.0", "pillow==13.0.0")
OPTAX = "optax==0.2.8"
# The device check's peers (device/wheels.txt carries the same releases to the GPU machine);
# installed without their dependencies, the dry run of the check runs their Triton kernels in
# Triton's interpreter.
LIGER_KERNEL = "liger-kernel==0.8.5"

RUFF = "ruff==0.17.6"
MYPY = "mypy==2.4.1"
SPHINX = "sphinx==9.0.4"

# Tests of the Triton kernel run on the CPU through Triton's interpreter; JAX stays on the CPU.
CPU_TEST_ENV = {"TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite on every CPU backend: NumPy, array-api-strict, PyTorch and JAX."""
    session.install(
        TORCH_CPU, JAX_CPU, TRITON, ARRAY_API_STRICT, "pytest-xdist", "-e", ".[test,bench]"
    )
    session.install("--no-deps", NEMO_AUTOMODEL, LIGER_KERNEL)
    # One worker per core, each test file on one worker (its module fixtures are built once);
    # "nox -s tests -- -n 0" runs in a single process.
    session.run("pytest", "-n", "auto", "--dist", "loadfile", *session.posargs, env=CPU_TEST_ENV)


@nox.session(python=PYTHON)
def tests_numpy(session: nox.Session) -> None:
    """Run the test suite with NumPy as the only array library installed."""
    session.install("-e", ".[test,cli]")
    session.run(
        "python",
        "-c",
        "import importlib.util, sys; "
        "found = [m for m in ('torch', 'jax', 'array_api_strict', 'cupy') "
        "if importlib.util.find_spec(m)]; "
        "sys.exit(f'expected NumPy alone, also found {found}' if found else 0)",
    )
    session.run("python", "-c", "import softce_multi")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lowest(session: nox.Session) -> None:
    """Run the test suite on the lowest releases the package admits (tests/lowest-versions.txt).

    PyTorch 2.8 is on PyPI as a CUDA build only, a download of several GB; it runs on the CPU.
    """
    constraints = ("-c", "tests/lowest-versions.txt")
    session.install(*constraints, "torch", "jax", "array-api-strict", "pytest-xdist")
    session.install(*constraints, "-e", ".[test,bench]")
    session.install("--no-deps", NEMO_AUTOMODEL, LIGER_KERNEL)
    session.run("pytest", "-n", "auto", "--dist", "loadfile", *session.posargs, env=CPU_TEST_ENV)


@nox.session(python=PYTHON)
def gpu(session: nox.Session) -> None:
    """Run the test suite and ``check`` with PyTorch CUDA, JAX GPU and CuPy on a CUDA device."""
    device = _cuda_device()
    if device is None:
        session.error(
            "the gpu session needs a CUDA device, and none was found "
            "(nvidia-smi lists no GPU and there is no /dev/nvidia<N>)"
        )
    session.log(f"CUDA device: {device}")
    session.install(TORCH_GPU, JAX_GPU, CUPY_GPU, ARRAY_API_STRICT, "-e", ".[test,bench]")
    session.run("pytest", *session.posargs)
    session.run("python", "-m", "softce_multi", "check")
    session.run("python", "-m", "softce_multi", "bench", "--device", "cuda", "--dtypes", "bfloat16")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check style with ruff and types with mypy (which sees torch, JAX and Triton)."""
    session.install(TORCH_CPU, JAX_CPU, TRITON, RUFF, MYPY, "-e", ".[test,cli]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy", "softce_multi")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the HTML documentation into docs/_build/html; any warning is an error.

    The theme and extensions are pinned like Sphinx: MathJax comes bundled, so the pages render
    offline.
    """
    theme_and_extensions = (
        "furo==2025.12.19",
        "sphinx-copybutton==0.5.2",
        "sphinx-mathjax-offline==0.0.2",
    )
    session.install(TORCH_CPU, JAX_CPU, SPHINX, *theme_and_extensions, "-e", ".[docs]")
    session.run(
        "sphinx-build",
        "-W",
        "--keep-going",
        "-b",
        "html",
        "docs",
        "docs/_build/html",
        env={"JAX_PLATFORMS": "cpu"},
    )
    # Offline: no page loads a script from the network, and the formulas' MathJax is bundled.
    session.run("python", "-c", _OFFLINE_PAGES_CHECK, "docs/_build/html")


_OFFLINE_PAGES_CHECK = """
import pathlib, re, sys
root = pathlib.Path(sys.argv[1])
remote = re.compile(r'<script[^>]+src="(https?:)?//', re.IGNORECASE)
pages = sorted(root.glob("*.html"))
bad = [page.name for page in pages if remote.search(page.read_text(encoding="utf-8"))]
if bad:
    sys.exit(f"pages that load a script from the network: {bad}")
if not (root / "_static" / "mathjax" / "tex-chtml.js").is_file():
    sys.exit("MathJax is not bundled in _static/mathjax")
print(f"{len(pages)} pages load no script from the network; MathJax is bundled")
"""


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """Check the loss on every backend, then train a small EAGLE-3 draft head on torch and JAX.

    Arguments after ``--`` go to ``python -m softce_multi demo`` instead, for a single run.
    """
    session.install(TORCH_CPU, JAX_CPU, "-e", ".[cli]")
    env = {"JAX_PLATFORMS": "cpu"}
    session.run("python", "-m", "softce_multi", "check", "--shape", "2", "64", "1000", env=env)
    if session.posargs:
        session.run("python", "-m", "softce_multi", "demo", *session.posargs, env=env)
        return
    for backend in ("torch", "jax"):
        session.run("python", "-m", "softce_multi", "demo", "--backend", backend, env=env)


@nox.session(python=PYTHON)
def examples(session: nox.Session) -> None:
    """Run every script in examples/ on the CPU, stopping at the first that fails.

    The libraries the scripts train with (transformers, Lightning, NeMo AutoModel, optax)
    are installed pinned, with the CPU builds of torch and JAX.
    """
    session.install(
        TORCH_CPU,
        JAX_CPU,
        OPTAX,
        TRANSFORMERS,
        ACCELERATE,
        LIGHTNING,
        *NEMO_AUTOMODEL_IMPORTS,
        "-e",
        ".",
    )
    session.install("--no-deps", NEMO_AUTOMODEL)
    scripts = (
        "torch_linear_loss.py",
        "jax_optax.py",
        "numpy_with_grad.py",
        "specforge_reduction.py",
        "hf_trainer.py",
        "lightning_module.py",
        "nemo_automodel_eagle3.py",
    )
    for script in scripts:
        session.run("python", f"examples/{script}", env={"JAX_PLATFORMS": "cpu"})


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Time softce_multi against NeMo's formula, F.cross_entropy, SpecForge, optax and NumPy.

    Arguments after ``--`` go to ``python -m softce_multi bench`` (default: the full sweep,
    with ``bench.json`` and ``bench.png`` written in the working directory).
    """
    session.install(TORCH_CPU, JAX_CPU, "-e", ".[bench]")
    arguments = session.posargs or ["--json", "bench.json", "--plot", "bench.png"]
    session.run("python", "-m", "softce_multi", "bench", *arguments, env={"JAX_PLATFORMS": "cpu"})


def _cuda_device() -> str | None:
    """Return a description of the first CUDA device, or None when there is none."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is not None:
        listing = subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, check=False)
        if listing.returncode == 0 and listing.stdout.strip():
            return listing.stdout.strip().splitlines()[0]
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*"))
    return nodes[0] if nodes else None
