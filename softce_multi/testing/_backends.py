"""The backends the loss runs on, which of them this machine has, and conversions to NumPy."""

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

from softce_multi._types import Array

__all__ = [
    "Backend",
    "Unavailable",
    "availability",
    "backends",
    "device_of",
    "dtype_name",
    "group_of_one",
    "is_installed",
    "known_backends",
    "library_of",
    "to_float64",
    "to_numpy",
]


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
    _other_dtypes: tuple[str, ...] = field(
        # The array API standard's booleans and integers: every library has them.
        default=("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"),
        repr=False,
    )

    @property
    def module(self) -> ModuleType:
        """The library's array namespace (``jax.numpy`` for JAX)."""
        return importlib.import_module("jax.numpy" if self.library == "jax" else self.library)

    def supports(self, dtype: str) -> bool:
        """Whether the library has the dtype called ``dtype``.

        JAX has float64, int64 and uint64 only with ``jax_enable_x64`` (without it,
        ``jax.numpy`` makes them float32, int32 and uint32).
        """
        if dtype not in self.float_dtypes and dtype not in self._other_dtypes:
            return False
        return not (self.library == "jax" and dtype in _JAX_X64_DTYPES and not _jax_has_x64())

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

        ``dtype`` is a dtype name; by default the NumPy dtype of ``values`` is kept. Skips the
        calling pytest test if the library has no such dtype (:meth:`supports`).
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


_JAX_X64_DTYPES = frozenset({"float64", "int64", "uint64"})


def _jax_has_x64() -> bool:
    """Whether JAX makes 64-bit arrays (``jax_enable_x64``); ``True`` if JAX is not installed."""
    if not is_installed("jax"):
        return True
    import jax

    return bool(jax.config.read("jax_enable_x64"))


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
    """Where an array of any backend lives: ``"cpu"`` or ``"gpu"``.

    Two other answers: ``"meta"`` for a PyTorch tensor on the meta device (which has no
    values), and the device itself, as ``str`` gives it, for an array-api-strict array on
    another device than its ``CPU_DEVICE`` (``"array_api_strict.Device('device1')"``).
    """
    library = library_of(array)
    if library == "torch":
        if array.device.type in ("cpu", "meta"):
            return str(array.device.type)
        return "gpu"
    if library == "array_api_strict":
        import array_api_strict

        return "cpu" if array.device == array_api_strict.Device("CPU_DEVICE") else str(array.device)
    if library == "jax":
        platforms = {device.platform for device in array.devices()}
        return "cpu" if platforms == {"cpu"} else "gpu"
    if library == "cupy":
        return "gpu"
    return "cpu"


def dtype_name(array: Array) -> str:
    """The short name of an array's dtype (``"float32"``, ``"bfloat16"``...), on any backend.

    The name holds no byte order: a big-endian NumPy float32 array's is ``"float32"``.
    """
    if isinstance(array.dtype, np.dtype):
        return array.dtype.name
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


@contextlib.contextmanager
def group_of_one(timeout: float = 60.0, *, backend: str = "gloo") -> Iterator[Any]:
    """A ``torch.distributed`` group of this one process, on 127.0.0.1 (a free port).

    It is the default process group while the context lasts, and destroyed after. Code written
    for a vocabulary split across ranks runs on it with the whole vocabulary on rank 0.

    Parameters
    ----------
    timeout
        Seconds a collective may wait.
    backend
        The ``torch.distributed`` backend: ``"gloo"`` (CPU tensors, and CUDA ones for the
        collectives gloo has for them) or ``"nccl"`` (CUDA tensors).

    Yields
    ------
    torch.distributed.ProcessGroup
        The default group (``torch.distributed.group.WORLD``).

    Raises
    ------
    ValueError
        If a default process group already exists.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        msg = "a default process group already exists: group_of_one makes one of its own"
        raise ValueError(msg)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=timeout),
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
