"""Pytest set-up only: the backend fixtures, the hypothesis profiles, the Triton interpreter.

The helpers tests use (backends, conversions, the float64 oracle, tolerances, assertions, random
inputs) are in the public module :mod:`softce_multi.testing`; tests import them from there.
"""

from __future__ import annotations

import os
from pathlib import Path

import hypothesis
import pytest

from softce_multi import testing

# Without a CUDA device, the Triton kernels run in Triton's interpreter on CPU tensors; the
# choice is read when triton is imported, so it is made here, before any test module imports it.
if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

if testing.is_installed("jax"):
    import jax

    # float64 cases need it; set once, before any JAX array exists.
    jax.config.update("jax_enable_x64", True)
    # Float32 matmuls in float32: on recent NVIDIA GPUs JAX's default rounds their operands to
    # TensorFloat-32, beyond the float32 tolerance of the tests against the float64 oracle.
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def xla_on_the_cpu():
    """JAX, for a test of what XLA does on the CPU (its temporaries, its CPU-only routines):
    skipped where JAX's default backend is a GPU, on which the same code compiles otherwise."""
    jax = pytest.importorskip("jax", reason="jax not installed")
    if jax.default_backend() != "cpu":
        pytest.skip(
            f"a statement about XLA on the CPU; JAX's default backend is {jax.default_backend()}"
        )
    return jax


@pytest.fixture
def wrap_triton_of_jit_functions_only(monkeypatch):
    """torch 2.11's ``wrap_triton``, which refuses the kernels of Triton's interpreter, put
    wherever the Triton launchers could take ``wrap_triton`` from; skipped on a GPU, where
    ``triton.jit`` makes JIT functions, which every torch wraps."""
    torch = pytest.importorskip("torch", reason="torch not installed")
    pytest.importorskip("triton", reason="triton not installed")
    if torch.cuda.is_available():
        pytest.skip("on a GPU, triton.jit makes a JIT function, which every torch wraps")
    from triton.runtime.jit import JITFunction

    from softce_multi.kernels import triton, triton_sparse

    def wrap_jit_functions_only(kernel):
        if not isinstance(kernel, JITFunction):
            raise RuntimeError("wrap_triton only works on functions annotated with triton.jit")
        return kernel

    for module in (triton, triton_sparse):
        monkeypatch.setattr(module, "wrap_triton", wrap_jit_functions_only, raising=False)


hypothesis.settings.register_profile("default", deadline=None, max_examples=30)
hypothesis.settings.register_profile("ci", deadline=None, max_examples=30, derandomize=True)
# A long search: pytest --hypothesis-profile=thorough tests/test_properties.py
hypothesis.settings.register_profile("thorough", deadline=None, max_examples=2000)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "default")


def _parameters(autodiff: bool | None = None) -> list:
    return [
        pytest.param(
            backend,
            id=backend.name,
            marks=pytest.mark.skipif(reason is not None, reason=str(reason)),
        )
        for backend, reason in testing.availability()
        if autodiff is None or backend.is_autodiff == autodiff
    ]


@pytest.fixture(params=_parameters(), scope="session")
def backend(request: pytest.FixtureRequest) -> testing.Backend:
    """Every known backend; those whose library or device is missing skip with the reason."""
    return request.param


@pytest.fixture(params=_parameters(autodiff=True), scope="session")
def autodiff_backend(request: pytest.FixtureRequest) -> testing.Backend:
    """The backends that differentiate the loss themselves: torch and JAX."""
    return request.param


@pytest.fixture(scope="module")
def group_of_one():
    """:func:`softce_multi.testing.group_of_one` for a test module; skips without gloo."""
    dist = pytest.importorskip("torch.distributed", reason="torch.distributed not available")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo not available")
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    with testing.group_of_one() as group:
        yield group
