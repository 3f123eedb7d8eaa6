"""Shared fixtures and helpers: the backends under test, array conversions and the oracle.

Every optional library is imported only when it is installed, so that the suite collects and
runs with NumPy, pytest and hypothesis alone. Backends whose library or device is missing are
skipped with a stated reason.

The oracle is :func:`softce_multi.reference.masked_soft_cross_entropy` (with torch autograd for
its gradients) evaluated in float64 on the exact values the backend received, after rounding to
the backend dtype. Without torch, a float64 NumPy version of the same formula takes its place.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import hypothesis
import numpy as np
import pytest

Array = Any

# Without a CUDA device, the Triton kernels run in Triton's interpreter on CPU tensors; the
# choice is read when triton is imported, so it is made here, before any test module imports it.
if not any(Path("/dev").glob("nvidia[0-9]*")):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def is_installed(name: str) -> bool:
    """Whether the top-level package ``name`` can be imported."""
    return importlib.util.find_spec(name) is not None


HAS_TORCH = is_installed("torch")
HAS_JAX = is_installed("jax")
HAS_ARRAY_API_STRICT = is_installed("array_api_strict")
HAS_CUPY = is_installed("cupy")

if HAS_JAX:
    import jax

    # float64 cases need it; set once, before any JAX array exists.
    jax.config.update("jax_enable_x64", True)

hypothesis.settings.register_profile("default", deadline=None, max_examples=30)
hypothesis.settings.register_profile("ci", deadline=None, max_examples=30, derandomize=True)
# For a long search by hand: pytest --hypothesis-profile=thorough tests/test_properties.py
hypothesis.settings.register_profile("thorough", deadline=None, max_examples=1000)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "default")


def import_or_skip(name: str) -> ModuleType:
    """Import an optional library, or skip the calling test with the reason it is missing."""
    return pytest.importorskip(name, reason=f"{name} not installed")


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def _torch_has_cuda() -> bool:
    if not HAS_TORCH:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _jax_has_gpu() -> bool:
    if not HAS_JAX:
        return False
    try:
        return len(jax.devices("gpu")) > 0
    except RuntimeError:
        return False


def _cupy_has_gpu() -> bool:
    if not HAS_CUPY:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver, no device: CuPy raises its own runtime errors
        return False


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------

FLOAT_DTYPES = ("float64", "float32", "bfloat16", "float16")

_DTYPES_OF_LIBRARY = {
    "numpy": ("float64", "float32", "float16", "bool", "int32", "int64"),
    "array_api_strict": ("float64", "float32", "bool", "int32", "int64"),
    "torch": ("float64", "float32", "bfloat16", "float16", "bool", "int32", "int64"),
    "jax": ("float64", "float32", "bfloat16", "float16", "bool", "int32", "int64"),
    "cupy": ("float64", "float32", "float16", "bool", "int32", "int64"),
}


@dataclass(frozen=True)
class Backend:
    """One array library on one device, with conversions from and to NumPy.

    Parameters
    ----------
    name
        Test id, e.g. ``"torch-cpu"``.
    library
        ``"numpy"``, ``"array_api_strict"``, ``"torch"``, ``"jax"`` or ``"cupy"``.
    device
        ``"cpu"`` or ``"gpu"``.
    """

    name: str
    library: str
    device: str

    @property
    def module(self) -> ModuleType:
        """The library's array module (``jax.numpy`` for JAX)."""
        return importlib.import_module("jax.numpy" if self.library == "jax" else self.library)

    @property
    def is_autodiff(self) -> bool:
        """Whether the library differentiates :func:`masked_soft_cross_entropy` itself."""
        return self.library in ("torch", "jax")

    def supports(self, dtype: str) -> bool:
        """Whether the library has the dtype called ``dtype``."""
        return dtype in _DTYPES_OF_LIBRARY[self.library]

    def require(self, *dtypes: str) -> None:
        """Skip the calling test unless the library has every dtype in ``dtypes``."""
        for dtype in dtypes:
            if not self.supports(dtype):
                pytest.skip(f"{self.library} has no {dtype} dtype")

    def dtype(self, name: str) -> Any:
        """The library's dtype object called ``name``."""
        self.require(name)
        return getattr(self.module, name)

    def asarray(self, values: Any, dtype: str | None = None) -> Array:
        """Return ``values`` (a NumPy array or a number) as an array of this backend.

        ``dtype`` is a dtype name; by default the NumPy array's own dtype is kept.
        """
        values = np.asarray(values)
        name = values.dtype.name if dtype is None else dtype
        if self.library == "numpy":
            return np.array(values, dtype=name, copy=True)
        if self.library == "array_api_strict":
            import array_api_strict

            return array_api_strict.asarray(values.astype(name), dtype=self.dtype(name))
        if self.library == "torch":
            import torch

            device = "cuda" if self.device == "gpu" else "cpu"
            source = values.astype(np.float32) if name == "bfloat16" else values.astype(name)
            return torch.from_numpy(np.array(source)).to(device=device, dtype=self.dtype(name))
        if self.library == "jax":
            return jax.device_put(
                self.module.asarray(values, dtype=self.dtype(name)), self.jax_device
            )
        if self.library == "cupy":
            import cupy

            return cupy.asarray(values.astype(name))
        msg = f"unknown library {self.library}"
        raise AssertionError(msg)

    @property
    def jax_device(self) -> Any:
        """The JAX device this backend puts its arrays on."""
        return jax.devices("gpu" if self.device == "gpu" else "cpu")[0]

    def __str__(self) -> str:
        return self.name


def to_numpy(array: Array) -> np.ndarray:
    """Copy an array of any backend to a NumPy array; bfloat16 becomes float32 (exactly)."""
    module = type(array).__module__
    if module.startswith("torch"):
        import torch

        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.to(torch.float32)
        return array.numpy().copy()
    if module.startswith("cupy"):
        import cupy

        return cupy.asnumpy(array)
    if module.startswith("array_api_strict"):
        return np.from_dlpack(array).copy()
    result = np.array(array, copy=True)
    if result.dtype.name == "bfloat16":  # JAX arrays come out as ml_dtypes.bfloat16
        result = result.astype(np.float32)
    return result


def to_float64(array: Array) -> np.ndarray:
    """Copy an array of any backend to a float64 NumPy array."""
    return to_numpy(array).astype(np.float64)


def to_torch(array: Array, dtype: Any = None) -> Any:
    """Copy an array of any backend to a CPU torch tensor (of ``dtype`` if given)."""
    import torch

    tensor = torch.from_numpy(to_numpy(array))
    return tensor if dtype is None else tensor.to(dtype)


_BACKENDS = [
    pytest.param(Backend("numpy", "numpy", "cpu"), id="numpy"),
    pytest.param(
        Backend("array_api_strict", "array_api_strict", "cpu"),
        id="array_api_strict",
        marks=pytest.mark.skipif(not HAS_ARRAY_API_STRICT, reason="array_api_strict not installed"),
    ),
    pytest.param(
        Backend("torch-cpu", "torch", "cpu"),
        id="torch-cpu",
        marks=pytest.mark.skipif(not HAS_TORCH, reason="torch not installed"),
    ),
    pytest.param(
        Backend("jax-cpu", "jax", "cpu"),
        id="jax-cpu",
        marks=pytest.mark.skipif(not HAS_JAX, reason="jax not installed"),
    ),
    pytest.param(
        Backend("torch-cuda", "torch", "gpu"),
        id="torch-cuda",
        marks=pytest.mark.skipif(not _torch_has_cuda(), reason="needs torch and a CUDA device"),
    ),
    pytest.param(
        Backend("jax-gpu", "jax", "gpu"),
        id="jax-gpu",
        marks=pytest.mark.skipif(not _jax_has_gpu(), reason="needs jax and a CUDA device"),
    ),
    pytest.param(
        Backend("cupy", "cupy", "gpu"),
        id="cupy",
        marks=pytest.mark.skipif(not _cupy_has_gpu(), reason="needs cupy and a CUDA device"),
    ),
]

_AUTODIFF_BACKENDS = [param for param in _BACKENDS if param.values[0].is_autodiff]


@pytest.fixture(params=_BACKENDS, scope="session")
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every installed backend, on every available device."""
    return request.param


@pytest.fixture(params=_AUTODIFF_BACKENDS, scope="session")
def autodiff_backend(request: pytest.FixtureRequest) -> Backend:
    """The backends that differentiate the loss themselves: torch and JAX."""
    return request.param


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def random_logits(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 3.0):
    """Normal logits of standard deviation ``scale``, float64."""
    return rng.standard_normal(shape) * scale


def random_targets(rng: np.random.Generator, shape: tuple[int, ...], *, normalised: bool = True):
    """Non-negative targets with some exact zeros; rows sum to 1 if ``normalised``."""
    targets = rng.random(shape) ** 3
    targets[rng.random(shape) < 0.2] = 0.0
    if normalised:
        totals = targets.sum(axis=-1, keepdims=True)
        targets = np.where(totals > 0, targets / np.where(totals > 0, totals, 1.0), 1.0 / shape[-1])
    return targets


def random_mask(
    rng: np.random.Generator,
    positions: tuple[int, ...],
    *,
    kind: str = "bool",
    valid: str = "random",
) -> np.ndarray:
    """A mask over ``positions``.

    ``kind`` is ``"bool"``, ``"int"`` (0/1) or ``"float"`` (non-negative weights, some 0);
    ``valid`` is ``"random"`` (about 70% valid, at least one valid), ``"all"`` or ``"none"``.
    """
    if valid == "all":
        keep = np.ones(positions, dtype=bool)
    elif valid == "none":
        keep = np.zeros(positions, dtype=bool)
    else:
        keep = rng.random(positions) < 0.7
        keep.flat[rng.integers(keep.size)] = True
    if kind == "bool":
        return keep
    if kind == "int":
        return keep.astype(np.int32)
    weights = rng.choice(np.array([0.25, 0.5, 1.0, 2.5]), size=positions)
    return np.where(keep, weights, 0.0)


class Case(NamedTuple):
    """Inputs on a backend, and the exact float64 values they hold (for the oracle)."""

    logits: Array
    target_probs: Array
    position_mask: Array
    z: np.ndarray
    p: np.ndarray
    w: np.ndarray


def make_case(
    backend: Backend,
    rng: np.random.Generator,
    shape: tuple[int, ...],
    *,
    logits_dtype: str = "float32",
    target_dtype: str = "float32",
    mask_kind: str = "bool",
    mask_trailing_one: bool = False,
    valid: str = "random",
    scale: float = 3.0,
    offset: float = 0.0,
    normalised: bool = True,
) -> Case:
    """Random inputs of ``shape`` on ``backend``; skips if the backend lacks a dtype.

    The logits are ``offset`` plus normal noise of standard deviation ``scale``.
    """
    backend.require(logits_dtype, target_dtype)
    positions = shape[:-1]
    mask = random_mask(rng, positions, kind=mask_kind, valid=valid)
    if mask_trailing_one:
        mask = mask.reshape((*positions, 1))
    logits = backend.asarray(offset + random_logits(rng, shape, scale), logits_dtype)
    targets = backend.asarray(random_targets(rng, shape, normalised=normalised), target_dtype)
    return Case(
        logits,
        targets,
        backend.asarray(mask),
        to_float64(logits),
        to_float64(targets),
        mask.astype(np.float64),
    )


def compute_dtype(logits_dtype: str, target_dtype: str) -> str:
    """The dtype the loss is computed and returned in."""
    return "float64" if "float64" in (logits_dtype, target_dtype) else "float32"


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


class Expected(NamedTuple):
    """Float64 loss and gradients of the reference formula."""

    loss: np.ndarray
    grad_logits: np.ndarray
    grad_targets: np.ndarray


def reference(
    z: np.ndarray,
    p: np.ndarray,
    w: np.ndarray,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> Expected:
    """The reference loss of float64 inputs, and its gradients for the cotangent ``upstream``.

    Uses :mod:`softce_multi.reference` and torch autograd when torch is installed, else
    :func:`numpy_reference`. ``w`` may have shape ``z.shape[:-1]`` or ``z.shape[:-1] + (1,)``.
    """
    if not HAS_TORCH:
        return numpy_reference(z, p, w, reduction=reduction, num_valid=num_valid, upstream=upstream)
    import torch

    import softce_multi as sc

    logits = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor(p, dtype=torch.float64, requires_grad=True)
    loss = sc.reference.masked_soft_cross_entropy(
        logits, targets, torch.tensor(w), reduction=reduction, num_valid=num_valid
    )
    loss.backward(torch.as_tensor(upstream, dtype=torch.float64).expand_as(loss))
    return Expected(loss.detach().numpy(), logits.grad.numpy(), targets.grad.numpy())


def numpy_reference(
    z: np.ndarray,
    p: np.ndarray,
    w: np.ndarray,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> Expected:
    """The reference formula and its analytic gradients, in float64 NumPy."""
    shifted = z - z.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    per_position = -(p * log_probs).sum(axis=-1)
    weights = np.asarray(w, dtype=np.float64).reshape(per_position.shape)
    weighted = weights * per_position
    if reduction == "none":
        loss, inverse_den = weighted, 1.0
    elif reduction == "sum":
        loss, inverse_den = weighted.sum(), 1.0
    else:
        den = max(weights.sum(), 1.0) if num_valid is None else num_valid
        inverse_den = 0.0 if den == 0 else 1.0 / den
        loss = weighted.sum() * inverse_den
    scale = (np.broadcast_to(upstream, per_position.shape) * weights * inverse_den)[..., None]
    grad_logits = scale * (p.sum(axis=-1, keepdims=True) * np.exp(log_probs) - p)
    grad_targets = -scale * log_probs
    return Expected(np.asarray(loss), grad_logits, grad_targets)


# --------------------------------------------------------------------------------------------
# Tolerances (DESIGN.md section 4)
# --------------------------------------------------------------------------------------------

#: Relative tolerance of the loss, by computation dtype.
LOSS_RTOL = {"float32": 1e-5, "float64": 1e-12}

#: Gradient tolerance relative to the largest reference entry, by dtype: the larger of the
#: computation dtype's and the returned gradient dtype's applies.
GRAD_RTOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def dtype_name(array: Array) -> str:
    """The short name of an array's dtype on any backend (``"float32"``, ``"bfloat16"``...)."""
    return str(array.dtype).rsplit(".", maxsplit=1)[-1]


def assert_loss_close(actual: Array, expected: np.ndarray, compute: str) -> None:
    """Loss (scalar or per position) within the relative tolerance of ``compute``."""
    np.testing.assert_allclose(
        to_float64(actual), expected, rtol=LOSS_RTOL[compute], atol=0.0, strict=True
    )


def assert_gradient_close(actual: Array, expected: np.ndarray, compute: str) -> None:
    """Gradient within a tolerance times the largest reference entry.

    The tolerance is that of the computation dtype, or of the gradient's own dtype when its
    rounding is coarser (float32 gradients of a float64 computation, bfloat16, float16).
    """
    rtol = max(GRAD_RTOL[compute], GRAD_RTOL[dtype_name(actual)])
    largest = float(np.max(np.abs(expected), initial=0.0))
    np.testing.assert_allclose(
        to_float64(actual), expected, rtol=0.0, atol=rtol * largest, strict=True
    )
