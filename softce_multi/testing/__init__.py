"""Helpers to test code that uses :mod:`softce_multi`, on every array library.

The module is public in the way ``scipy._lib._array_api`` and ``array_api_extra.testing`` are:
it holds, written once, what a test of the loss needs.

- :class:`Backend`, :func:`backends` and :func:`known_backends`: the array libraries and devices
  the loss runs on, and which of them this machine has (with the reason a missing one is
  missing);
- :func:`to_numpy` and :func:`to_float64`: copies of any backend's array in NumPy (bfloat16
  becomes float32, exactly);
- :func:`reference`: the float64 oracle (loss and both gradients, every reduction, ``num_valid``,
  a per-position cotangent for ``"none"``), from :mod:`softce_multi.reference` and torch autograd
  when torch is installed, else from :func:`numpy_reference`;
- :data:`LOSS_RTOL` and :data:`GRAD_RTOL`: the tolerances, by dtype;
- :func:`assert_loss_close` and :func:`assert_gradient_close`: comparisons that check the
  namespace, dtype, shape and device before the values;
- :func:`group_of_one`: a ``torch.distributed`` group of this one process, on loopback, for
  the vocabulary-parallel losses and anything else that needs a process group;
- :func:`ulp_error`, :func:`formula_gradient`, :func:`rounding_errors` and
  :func:`assert_gradient_rounded_once`: the accuracy of a 16-bit gradient in units in the last
  place, against that of the plain formula.

It imports with NumPy alone; every other library is imported when it is used. The rest of the
package does not import it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "GRAD_RTOL",
    "LOSS_RTOL",
    "ULP_MARGIN",
    "Backend",
    "Case",
    "Expected",
    "Unavailable",
    "assert_gradient_close",
    "assert_gradient_rounded_once",
    "assert_loss_close",
    "availability",
    "backends",
    "compute_dtype",
    "device_of",
    "dtype_name",
    "formula_gradient",
    "gradient_tolerance",
    "group_of_one",
    "is_installed",
    "known_backends",
    "library_of",
    "make_case",
    "numpy_reference",
    "random_logits",
    "random_mask",
    "random_targets",
    "reference",
    "rounding_errors",
    "to_float64",
    "to_numpy",
    "ulp_error",
]

Array = Any

#: Relative tolerance of the loss, by the dtype it is computed in.
LOSS_RTOL: dict[str, float] = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}

#: Gradient tolerance relative to the largest entry of the reference gradient, by dtype: the
#: larger of the computation dtype's and the returned gradient dtype's applies.
GRAD_RTOL: dict[str, float] = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}

#: How much further from the float64 gradient a 16-bit gradient may be than the plain float32
#: formula's, in units in the last place of its dtype (:func:`assert_gradient_rounded_once`).
ULP_MARGIN = 0.05

#: The explicit mantissa bits and the smallest normal exponent of each floating dtype.
_FLOAT_FORMATS: dict[str, tuple[int, int]] = {
    "bfloat16": (7, -126),
    "float16": (10, -14),
    "float32": (23, -126),
    "float64": (52, -1022),
}


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def is_installed(name: str) -> bool:
    """Whether the top-level package ``name`` can be imported (without importing it)."""
    return importlib.util.find_spec(name) is not None


def _torch_cuda_count() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _jax_gpu_count() -> int:
    import jax

    try:
        return len(jax.devices("gpu"))
    except RuntimeError:  # JAX raises RuntimeError when the platform has no device
        return 0


def _cupy_gpu_count() -> int:
    import cupy

    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver: CuPy raises its own runtime error classes
        return 0


_GPU_COUNT: dict[str, Callable[[], int]] = {
    "torch": _torch_cuda_count,
    "jax": _jax_gpu_count,
    "cupy": _cupy_gpu_count,
}


@dataclass(frozen=True)
class Backend:
    """One array library on one device, with conversions from and to NumPy.

    Parameters
    ----------
    name
        Identifier, e.g. ``"torch-cpu"`` (the test id).
    library
        Importable name: ``"numpy"``, ``"array_api_strict"``, ``"torch"``, ``"jax"``, ``"cupy"``.
    device
        ``"cpu"`` or ``"gpu"``.
    float_dtypes
        Names of the floating dtypes the library has.
    is_autodiff
        Whether the library differentiates the loss itself (torch and JAX).

    Examples
    --------
    >>> from softce_multi.testing import known_backends
    >>> numpy_backend = known_backends()[0]
    >>> numpy_backend.asarray([1.0, 2.0], "float32").dtype
    dtype('float32')
    """

    name: str
    library: str
    device: str
    float_dtypes: tuple[str, ...] = ("float64", "float32", "float16")
    is_autodiff: bool = False
    _other_dtypes: tuple[str, ...] = field(default=("bool", "int32", "int64"), repr=False)

    @property
    def module(self) -> ModuleType:
        """The library's array namespace (``jax.numpy`` for JAX)."""
        return importlib.import_module("jax.numpy" if self.library == "jax" else self.library)

    def supports(self, dtype: str) -> bool:
        """Whether the library has the dtype called ``dtype``."""
        return dtype in self.float_dtypes or dtype in self._other_dtypes

    def require(self, *dtypes: str) -> None:
        """Skip the calling pytest test unless the library has every dtype in ``dtypes``.

        pytest is imported only to skip: ``check`` and the demo run without it.
        """
        missing = [dtype for dtype in dtypes if not self.supports(dtype)]
        if missing:
            import pytest

            pytest.skip(f"{self.library} has no {missing[0]} dtype")

    def dtype(self, name: str) -> Any:
        """The library's dtype object called ``name`` (skips the calling test if none)."""
        self.require(name)
        return getattr(self.module, name)

    @property
    def jax_device(self) -> Any:
        """The JAX device of a JAX backend."""
        import jax

        return jax.devices(self.device)[0]

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here (library or device missing), or ``None``."""
        if not is_installed(self.library):
            return f"{self.library} not installed"
        if self.device == "gpu" and _GPU_COUNT[self.library]() == 0:
            return f"{self.library} sees no GPU"
        return None

    @property
    def is_available(self) -> bool:
        """Whether the library is installed and the device is present."""
        return self.unavailable_reason() is None

    def asarray(self, values: Any, dtype: str | None = None) -> Array:
        """Copy ``values`` (NumPy array or nested sequence) to an array of this backend.

        ``dtype`` is a dtype name; by default the NumPy dtype of ``values`` is kept.
        """
        values = np.asarray(values)
        name = values.dtype.name if dtype is None else dtype
        if self.library == "numpy":
            return np.array(values, dtype=self.dtype(name), copy=True)
        if self.library == "array_api_strict":
            import array_api_strict

            return array_api_strict.asarray(values.astype(name), dtype=self.dtype(name))
        if self.library == "torch":
            import torch

            source = values.astype(np.float32) if name == "bfloat16" else values.astype(name)
            return torch.from_numpy(np.array(source)).to(
                device="cuda" if self.device == "gpu" else "cpu", dtype=self.dtype(name)
            )
        if self.library == "jax":
            import jax

            return jax.device_put(
                self.module.asarray(values, dtype=self.dtype(name)), jax.devices(self.device)[0]
            )
        if self.library == "cupy":
            import cupy

            return cupy.asarray(values.astype(name))
        msg = f"unknown library {self.library!r}"
        raise ValueError(msg)

    def to_numpy(self, array: Array) -> np.ndarray:
        """Copy an array of this backend to NumPy (see :func:`to_numpy`)."""
        return to_numpy(array)

    def __str__(self) -> str:
        return self.name


_FLOATS_WITH_BF16 = ("float64", "float32", "bfloat16", "float16")

_KNOWN = (
    Backend("numpy", "numpy", "cpu"),
    Backend("array-api-strict", "array_api_strict", "cpu", ("float64", "float32")),
    Backend("torch-cpu", "torch", "cpu", _FLOATS_WITH_BF16, is_autodiff=True),
    Backend("jax-cpu", "jax", "cpu", _FLOATS_WITH_BF16, is_autodiff=True),
    Backend("torch-cuda", "torch", "gpu", _FLOATS_WITH_BF16, is_autodiff=True),
    Backend("jax-gpu", "jax", "gpu", _FLOATS_WITH_BF16, is_autodiff=True),
    Backend("cupy", "cupy", "gpu"),
)


class Unavailable(NamedTuple):
    """A known backend and why it cannot run here (``None`` when it can)."""

    backend: Backend
    reason: str | None


def known_backends() -> tuple[Backend, ...]:
    """Every backend the loss supports, installed or not, CPU ones first.

    Examples
    --------
    >>> from softce_multi.testing import known_backends
    >>> [backend.name for backend in known_backends()][:2]
    ['numpy', 'array-api-strict']
    """
    return _KNOWN


def availability() -> tuple[Unavailable, ...]:
    """Each known backend with the reason it is unavailable here, or ``None`` if available.

    Tests parametrized over :func:`known_backends` skip a missing one with this reason.
    """
    return tuple(Unavailable(backend, backend.unavailable_reason()) for backend in _KNOWN)


def backends(*, autodiff: bool | None = None) -> tuple[Backend, ...]:
    """The backends whose library is installed and whose device is present.

    Parameters
    ----------
    autodiff
        If given, keep only the backends whose :attr:`Backend.is_autodiff` equals it.

    Examples
    --------
    >>> from softce_multi.testing import backends
    >>> backends()[0].name
    'numpy'
    """
    return tuple(
        backend
        for backend in _KNOWN
        if backend.is_available and (autodiff is None or backend.is_autodiff == autodiff)
    )


# --------------------------------------------------------------------------------------------
# Conversions and descriptions
# --------------------------------------------------------------------------------------------


def library_of(array: Array) -> str:
    """The library an array belongs to: ``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"``...

    NumPy scalars count as ``"numpy"``.
    """
    module = type(array).__module__.split(".", maxsplit=1)[0]
    return {"jaxlib": "jax", "builtins": "python"}.get(module, module)


def device_of(array: Array) -> str:
    """``"cpu"`` or ``"gpu"``: where an array of any backend lives."""
    library = library_of(array)
    if library == "torch":
        return "cpu" if array.device.type == "cpu" else "gpu"
    if library == "jax":
        platforms = {device.platform for device in array.devices()}
        return "cpu" if platforms == {"cpu"} else "gpu"
    if library == "cupy":
        return "gpu"
    return "cpu"


def dtype_name(array: Array) -> str:
    """The short name of an array's dtype (``"float32"``, ``"bfloat16"``...), on any backend."""
    return str(array.dtype).rsplit(".", maxsplit=1)[-1]


def to_numpy(array: Array) -> np.ndarray:
    """Copy an array of any backend to a new NumPy array; bfloat16 becomes float32 exactly.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.testing import to_numpy
    >>> to_numpy(np.float32(2.5))
    array(2.5, dtype=float32)
    """
    library = library_of(array)
    if library == "torch":
        import torch

        tensor = array.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.to(torch.float32)
        return np.array(tensor.numpy(), copy=True)
    if library == "cupy":
        import cupy

        return np.asarray(cupy.asnumpy(array))
    if library == "array_api_strict":
        return np.array(np.from_dlpack(array), copy=True)
    result = np.array(array, copy=True)
    if result.dtype.name == "bfloat16":  # JAX arrays come out as ml_dtypes.bfloat16
        result = result.astype(np.float32)
    return result


def to_float64(array: Array) -> np.ndarray:
    """Copy an array of any backend to a float64 NumPy array."""
    return to_numpy(array).astype(np.float64)


# --------------------------------------------------------------------------------------------
# Random inputs
# --------------------------------------------------------------------------------------------


def random_logits(
    rng: np.random.Generator, shape: tuple[int, ...], scale: float = 3.0
) -> np.ndarray:
    """Normal float64 logits of standard deviation ``scale``."""
    return rng.standard_normal(shape) * scale


def random_targets(
    rng: np.random.Generator, shape: tuple[int, ...], *, normalised: bool = True
) -> np.ndarray:
    """Non-negative float64 targets with some exact zeros; rows sum to 1 if ``normalised``."""
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

    ``kind`` is ``"bool"``, ``"int"`` (int32 0/1) or ``"float"`` (non-negative weights, some 0);
    ``valid`` is ``"random"`` (about 70% valid, at least one), ``"all"`` or ``"none"``.
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
    """Random inputs of ``shape`` on ``backend`` (skips the test if a dtype is missing).

    The logits are ``offset`` plus normal noise of standard deviation ``scale``; the other
    arguments are those of :func:`random_targets` and :func:`random_mask`.
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
    """The dtype the loss is computed and returned in, from the inputs' dtype names."""
    return "float64" if "float64" in (logits_dtype, target_dtype) else "float32"


@contextlib.contextmanager
def group_of_one(timeout: float = 60.0) -> Iterator[Any]:
    """A ``torch.distributed`` gloo group of this one process, on 127.0.0.1 (a free port).

    It is the default process group while the context lasts, and destroyed after. Code written
    for a vocabulary split across ranks runs on it with the whole vocabulary on rank 0.

    Parameters
    ----------
    timeout
        Seconds a collective may wait.

    Yields
    ------
    torch.distributed.ProcessGroup
        The default group (``torch.distributed.group.WORLD``).

    Raises
    ------
    RuntimeError
        If a default process group already exists (from ``torch.distributed``).
    """
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=timeout),
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


class Expected(NamedTuple):
    """The float64 loss and its gradients for the logits and the targets."""

    loss: np.ndarray
    grad_logits: np.ndarray
    grad_targets: np.ndarray


def reference(
    logits: np.ndarray,
    target_probs: np.ndarray,
    position_mask: np.ndarray,
    /,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> Expected:
    """The float64 loss of :mod:`softce_multi.reference` and its gradients.

    Parameters
    ----------
    logits, target_probs
        ``[..., V]`` values (converted to float64).
    position_mask
        Weights of shape ``[...]`` or ``[..., 1]``.
    reduction
        ``"mean"``, ``"sum"`` or ``"none"``.
    num_valid
        Denominator of ``"mean"`` in place of ``max(sum(mask), 1)``.
    upstream
        Cotangent of the loss: a number, or an array of the loss's shape for ``"none"``.

    Returns
    -------
    Expected
        ``loss``, ``grad_logits`` and ``grad_targets`` as float64 NumPy arrays. They come from
        :func:`softce_multi.reference.masked_soft_cross_entropy` with torch autograd when torch
        is installed, else from :func:`numpy_reference`.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.testing import reference
    >>> expected = reference(np.zeros((1, 2)), np.array([[0.5, 0.5]]), np.ones(1))
    >>> round(float(expected.loss), 6)
    0.693147
    """
    z, p, w = (to_float64(value) for value in (logits, target_probs, position_mask))
    if not is_installed("torch"):
        return numpy_reference(z, p, w, reduction=reduction, num_valid=num_valid, upstream=upstream)
    import torch

    from softce_multi.reference import masked_soft_cross_entropy

    z_tensor = torch.tensor(z, requires_grad=True)
    p_tensor = torch.tensor(p, requires_grad=True)
    loss = masked_soft_cross_entropy(
        z_tensor, p_tensor, torch.tensor(w), reduction=reduction, num_valid=num_valid
    )
    loss.backward(torch.as_tensor(np.asarray(upstream), dtype=torch.float64).expand_as(loss))
    assert z_tensor.grad is not None and p_tensor.grad is not None
    return Expected(
        loss.detach().numpy(), z_tensor.grad.numpy().copy(), p_tensor.grad.numpy().copy()
    )


def numpy_reference(
    logits: np.ndarray,
    target_probs: np.ndarray,
    position_mask: np.ndarray,
    /,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> Expected:
    """The same as :func:`reference`, from the formula and its analytic gradients in NumPy.

    ``d/dz = w/den * (sum(p) * softmax(z) - p)`` and ``d/dp = -w/den * log_softmax(z)``, with
    ``den`` the mean's denominator (1 for ``"sum"`` and ``"none"``).
    """
    z, p = np.asarray(logits, np.float64), np.asarray(target_probs, np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    terms = np.where(p == 0, 0.0, p * np.where(p == 0, 0.0, log_probs))
    per_position = -terms.sum(axis=-1)
    weights = np.asarray(position_mask, dtype=np.float64).reshape(per_position.shape)
    weighted = weights * per_position
    if reduction == "none":
        loss = weighted
    elif reduction == "sum":
        loss = weighted.sum()
    else:
        loss = weighted.sum() * _inverse_denominator(weights, num_valid)
    scale = _row_scale(
        weights, per_position.shape, reduction=reduction, num_valid=num_valid, upstream=upstream
    )
    grad_logits = scale * (p.sum(axis=-1, keepdims=True) * np.exp(log_probs) - p)
    grad_targets = -scale * log_probs
    return Expected(np.asarray(loss), grad_logits, grad_targets)


def _inverse_denominator(weights: np.ndarray, num_valid: float | None) -> float:
    """``1 / den`` of ``"mean"``: ``max(sum(w), 1)`` or ``num_valid``; 0 when that is 0."""
    den = max(float(weights.sum()), 1.0) if num_valid is None else float(num_valid)
    return 0.0 if den == 0 else 1.0 / den


def _row_scale(
    position_mask: np.ndarray,
    batch_shape: tuple[int, ...],
    *,
    reduction: str,
    num_valid: float | None,
    upstream: np.ndarray | float,
) -> np.ndarray:
    """``d loss / d c`` per position times the upstream gradient, shape ``batch_shape + (1,)``."""
    weights = np.asarray(position_mask, dtype=np.float64).reshape(batch_shape)
    inverse_den = _inverse_denominator(weights, num_valid) if reduction == "mean" else 1.0
    return (np.broadcast_to(upstream, batch_shape) * weights * inverse_den)[..., None]


# --------------------------------------------------------------------------------------------
# Assertions
# --------------------------------------------------------------------------------------------


def _describe(array: Array) -> str:
    return (
        f"{library_of(array)} array of dtype {dtype_name(array)}, shape "
        f"{tuple(array.shape)}, on {device_of(array)}"
    )


def _check_properties(
    actual: Array,
    desired: Array,
    compute_dtype: str | None,
    *,
    library: str | None,
    dtype: str | None,
    device: str | None,
) -> None:
    """Namespace, dtype, shape and device of ``actual``, before any value is compared.

    Each expectation comes from the keyword when given, else from ``desired`` unless ``desired``
    is the float64 oracle (a float64 NumPy array with ``compute_dtype`` given, or a NumPy array
    for another library's result): then only the keywords given are checked.
    """
    desired_is_oracle = library_of(desired) == "numpy" and (
        library_of(actual) != "numpy"
        or (compute_dtype is not None and dtype_name(desired) == "float64")
    )
    expected_library = library or (None if desired_is_oracle else library_of(desired))
    expected_dtype = dtype or (None if desired_is_oracle else dtype_name(desired))
    expected_device = device or (None if desired_is_oracle else device_of(desired))
    both = f"\nactual:  {_describe(actual)}\ndesired: {_describe(desired)}"
    if expected_library is not None and library_of(actual) != expected_library:
        msg = f"namespaces differ: expected {expected_library}, got {library_of(actual)}{both}"
        raise AssertionError(msg)
    if expected_dtype is not None and dtype_name(actual) != expected_dtype:
        msg = f"dtypes differ: expected {expected_dtype}, got {dtype_name(actual)}{both}"
        raise AssertionError(msg)
    if tuple(actual.shape) != tuple(desired.shape):
        msg = f"shapes differ: expected {tuple(desired.shape)}, got {tuple(actual.shape)}{both}"
        raise AssertionError(msg)
    if expected_device is not None and device_of(actual) != expected_device:
        msg = f"devices differ: expected {expected_device}, got {device_of(actual)}{both}"
        raise AssertionError(msg)


def assert_loss_close(
    actual: Array,
    desired: Array,
    compute_dtype: str | None = None,
    /,
    *,
    library: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    atol: float | np.ndarray = 0.0,
) -> None:
    """Assert a loss equals the desired one within the relative tolerance of its dtype.

    Parameters
    ----------
    actual
        The loss: a 0-d array, or per position for ``"none"``, of any backend.
    desired
        The expected loss: an array of the same backend, or the float64 NumPy oracle
        (:func:`reference`).
    compute_dtype
        Name of the dtype the loss was computed in; picks the tolerance in :data:`LOSS_RTOL`.
        Default: the dtype of ``actual``. Given with a float64 NumPy ``desired``, it marks
        ``desired`` as the oracle, whose dtype is not the one ``actual`` must have.
    library, dtype, device
        Expected library (``"torch"``...), dtype name and device (``"cpu"``, ``"gpu"``) of
        ``actual``. Default: those of ``desired``, unless ``desired`` is the oracle (then they
        are checked only when given).
    atol
        An absolute floor, added to the relative tolerance (a number, or per position for
        ``"none"``): for losses whose rounding is set by terms larger than the loss, such as a
        confident row's, a small difference of terms of the size of its target mass.

    Raises
    ------
    AssertionError
        If the namespace, dtype, shape or device differ (checked in that order, before the
        values), or a value is further than ``atol`` plus ``LOSS_RTOL[compute_dtype]``
        relatively.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.testing import assert_loss_close
    >>> assert_loss_close(np.float32(1.0), np.array(1.0, dtype=np.float32))
    >>> assert_loss_close(np.float32(1.0), np.array(1.0))
    Traceback (most recent call last):
    ...
    AssertionError: dtypes differ: expected float64, got float32...
    """
    _check_properties(actual, desired, compute_dtype, library=library, dtype=dtype, device=device)
    rtol = LOSS_RTOL[compute_dtype or dtype_name(actual)]
    actual_values, desired_values = to_float64(actual), to_float64(desired)
    # np.isclose, unlike np.testing.assert_allclose, takes a per-position atol.
    close = np.isclose(actual_values, desired_values, rtol=rtol, atol=atol, equal_nan=True)
    if not np.all(close):
        far = np.atleast_1d(~close)
        allowed = np.broadcast_to(atol + rtol * np.abs(desired_values), far.shape)
        shown = [np.atleast_1d(values)[far][:5] for values in (actual_values, desired_values)]
        msg = (
            f"loss beyond rtol {rtol} and atol at {np.count_nonzero(far)} of {far.size} "
            f"positions: actual {shown[0]}, desired {shown[1]}, allowed difference "
            f"{allowed[far][:5]}\nactual: {_describe(actual)}; desired: {_describe(desired)}"
        )
        raise AssertionError(msg)


def ulp_error(
    actual: Array,
    desired: Array,
    dtype: str | None = None,
    *,
    resolution: float | np.ndarray = 0.0,
) -> float:
    """The largest distance of ``actual`` from ``desired``, in units in the last place.

    Each entry's distance is divided by the spacing of ``dtype`` at the desired value (the
    spacing of its binade; below the smallest normal number, that of the subnormals), or at
    ``resolution`` where that is larger. A value rounded once, correctly, from an exact one is
    at most 0.5 from it.

    Parameters
    ----------
    actual
        An array of any backend, for example a bfloat16 gradient.
    desired
        The exact values, or nearly (the float64 oracle of :func:`reference`), same shape.
    dtype
        ``"bfloat16"``, ``"float16"``, ``"float32"`` or ``"float64"``; by default the dtype of
        ``actual``.
    resolution
        The smallest magnitude, per entry or for all, that the computation of ``actual`` can
        resolve: an entry whose desired value is smaller is measured in the spacing at
        ``resolution`` instead (see :func:`assert_gradient_rounded_once`).

    Returns
    -------
    float
        The largest distance, in units of ``dtype``; ``inf`` where ``actual`` is not finite
        and ``desired`` is; entries where ``desired`` is not finite are not counted. 0 for an
        empty array.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.testing import ulp_error
    >>> ulp_error(np.float32(1 + 2**-23), np.array(1.0))
    1.0
    >>> ulp_error(np.array([1.0, 2.0]), np.array([1.0 + 2**-9, 2.0]), "bfloat16")
    0.25
    """
    mantissa_bits, min_exponent = _FLOAT_FORMATS[dtype or dtype_name(actual)]
    actual_values, desired_values = to_float64(actual), to_float64(desired)
    counted = np.isfinite(desired_values)
    # frexp: |x| = m * 2**e with m in [0.5, 1), so the binade of x starts at 2**(e - 1).
    magnitude = np.maximum(np.abs(np.where(counted, desired_values, 0.0)), resolution)
    _, exponent = np.frexp(magnitude)
    binade = np.maximum(exponent - 1, min_exponent)
    spacing = np.ldexp(1.0, binade - mantissa_bits)
    with np.errstate(invalid="ignore"):
        distance = np.abs(actual_values - desired_values) / spacing
    distance = np.where(np.isnan(distance), np.inf, distance)
    return float(np.max(distance[counted], initial=0.0))


def formula_gradient(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    /,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> np.ndarray:
    """The logits gradient of the plain formula, as EAGLE-3 trainers compute it in 16 bits.

    :func:`softce_multi.reference.masked_soft_cross_entropy` (``log_softmax`` of the logits
    upcast to float32) differentiated by torch autograd, for logits of the dtype of
    ``logits``: the gradient is computed in float32 and rounded once to that dtype. Needs torch.

    Parameters
    ----------
    logits, target_probs, position_mask, reduction, num_valid, upstream
        As in :func:`reference`; ``logits`` of any backend, its values and dtype kept.

    Returns
    -------
    numpy.ndarray
        The gradient's values in float64 (bfloat16 and float16 values are exact there).
    """
    import torch

    from softce_multi.reference import masked_soft_cross_entropy

    dtype = getattr(torch, dtype_name(logits))
    z = torch.tensor(to_numpy(logits)).to(dtype).requires_grad_(True)
    p = torch.tensor(to_numpy(target_probs))
    loss = masked_soft_cross_entropy(
        z, p, torch.tensor(to_numpy(position_mask)), reduction=reduction, num_valid=num_valid
    )
    loss.backward(torch.as_tensor(np.asarray(upstream), dtype=loss.dtype).expand_as(loss))
    assert z.grad is not None
    return to_float64(z.grad)


def rounding_errors(
    actual: Array,
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    /,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> tuple[float, float]:
    """The :func:`ulp_error` of a logits gradient and that of the plain formula's, in the
    logits' dtype, as :func:`assert_gradient_rounded_once` measures them. Needs torch.

    Returns
    -------
    tuple of float
        The largest error of ``actual``, then of :func:`formula_gradient`, against the float64
        gradient, each entry in the spacing at ``max(|exact|, 2**(m - 16) * terms)``.
    """
    dtype = dtype_name(logits)
    options: dict[str, Any] = {"reduction": reduction, "num_valid": num_valid, "upstream": upstream}
    exact = reference(logits, target_probs, position_mask, **options).grad_logits
    formula = formula_gradient(logits, target_probs, position_mask, **options)
    z, p = to_float64(logits), to_float64(target_probs)
    softmax = np.exp(z - z.max(axis=-1, keepdims=True))
    softmax /= softmax.sum(axis=-1, keepdims=True)
    scale = _row_scale(to_float64(position_mask), z.shape[:-1], **options)
    terms = np.abs(scale) * (np.abs(p.sum(axis=-1, keepdims=True)) * softmax + np.abs(p))
    resolution = np.ldexp(terms, _FLOAT_FORMATS[dtype][0] - 16)
    return (
        ulp_error(actual, exact, dtype, resolution=resolution),
        ulp_error(formula, exact, dtype, resolution=resolution),
    )


def assert_gradient_rounded_once(
    actual: Array,
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    /,
    *,
    reduction: str = "mean",
    num_valid: float | None = None,
    upstream: np.ndarray | float = 1.0,
) -> None:
    """Assert a 16-bit logits gradient is as accurate as the plain float32 formula's.

    Its :func:`ulp_error` against the float64 gradient (:func:`reference`) may exceed that of
    :func:`formula_gradient`, computed in float32 and rounded once, by at most
    :data:`ULP_MARGIN`. A gradient rounded twice (made in 16 bits for a unit upstream gradient,
    then multiplied by the upstream gradient in 16 bits) is about 0.5 further. Needs torch.

    Each entry ``r * (sum(p) * softmax(z)_v - p_v)`` is a difference of two terms, which
    float32 computes to within a few of its roundings of their size (``2**-21`` of it, say).
    Where they nearly cancel, no float32 computation resolves the entry to a 16-bit spacing,
    and which of two float32 computations lands nearer is chance. So an entry is measured in
    the spacing at ``max(|exact|, 2**(m - 16) * terms)``, ``m`` the dtype's mantissa bits and
    ``terms = |r| * (sum(p) * softmax(z)_v + |p_v|)``: there float32's own error is at most
    ``2**-21 / 2**-16 = 1/32`` of a spacing.

    Parameters
    ----------
    actual
        The logits gradient to judge, of any backend, in the dtype of ``logits``.
    logits, target_probs, position_mask, reduction, num_valid, upstream
        What ``actual`` is the gradient of, as in :func:`reference`.

    Raises
    ------
    AssertionError
        If the dtypes differ, or ``actual`` is further from the float64 gradient than
        allowed; the message gives both errors.
    """
    dtype = dtype_name(logits)
    if dtype_name(actual) != dtype:
        msg = f"dtypes differ: the gradient is {dtype_name(actual)}, the logits {dtype}"
        raise AssertionError(msg)
    error, formula_error = rounding_errors(
        actual,
        logits,
        target_probs,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        upstream=upstream,
    )
    if error > formula_error + ULP_MARGIN:
        msg = (
            f"{dtype} gradient {error:.3f} ulp from the float64 gradient, where the plain "
            f"float32 formula rounded once is {formula_error:.3f} ulp from it (allowed: "
            f"{formula_error + ULP_MARGIN:.3f}); upstream {upstream}, reduction {reduction!r}"
        )
        raise AssertionError(msg)


def gradient_tolerance(compute_dtype: str, gradient_dtype: str) -> float:
    """Gradient tolerance relative to the largest entry: the coarser of the two dtypes'."""
    return max(GRAD_RTOL[compute_dtype], GRAD_RTOL[gradient_dtype])


def assert_gradient_close(
    actual: Array,
    desired: Array,
    compute_dtype: str | None = None,
    /,
    *,
    library: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    atol: float = 0.0,
) -> None:
    """Assert a gradient equals the desired one within a tolerance of its largest entry.

    Every entry must be within ``gradient_tolerance(compute_dtype, dtype of actual)`` times
    ``max(abs(desired))`` of the desired entry, or within ``atol`` if that is larger: the
    gradient of a loss is judged on the scale of its largest component, since small entries
    carry the rounding of large ones.

    Parameters
    ----------
    actual, desired, compute_dtype, library, dtype, device
        As in :func:`assert_loss_close`.
    atol
        An absolute floor for gradients whose largest entry is below the rounding of the terms
        they are computed from (a gradient that cancels, such as every gradient of ``V = 1``),
        or below what their dtype resolves (float16 subnormals).

    Raises
    ------
    AssertionError
        If the namespace, dtype, shape or device differ (before the values), or a value is
        outside the tolerance.

    Examples
    --------
    >>> import numpy as np
    >>> from softce_multi.testing import assert_gradient_close
    >>> assert_gradient_close(np.array([1.0, 1e-13]), np.array([1.0, 0.0]))
    >>> assert_gradient_close(np.array([1.0, 0.0]), np.array([1.0]))
    Traceback (most recent call last):
    ...
    AssertionError: shapes differ: expected (1,), got (2,)...
    """
    _check_properties(actual, desired, compute_dtype, library=library, dtype=dtype, device=device)
    desired_values = to_float64(desired)
    rtol = gradient_tolerance(compute_dtype or dtype_name(actual), dtype_name(actual))
    largest = float(np.max(np.abs(desired_values), initial=0.0))
    np.testing.assert_allclose(
        to_float64(actual),
        desired_values,
        rtol=0.0,
        atol=max(rtol * largest, atol),
        err_msg=f"gradient; actual: {_describe(actual)}; desired: {_describe(desired)}",
    )
