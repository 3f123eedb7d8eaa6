"""array-api-compat's type checks, answered for PyTorch first, without their caches.

array-api-compat memoises its type tests with :func:`functools.lru_cache`. When
``torch.compile`` traces a public function, Dynamo steps through those caches and warns once
for every call site it passes, about twenty UserWarnings on the first compiled loss ("Dynamo
detected a call to a `functools.lru_cache`-wrapped function"). The functions here answer for
PyTorch tensors and namespaces by ``isinstance`` and a module's name, which Dynamo traces
without a warning, and ask array-api-compat about everything else. Every module of the package
asks here rather than array-api-compat.

PyTorch is looked up among the imported modules, never imported: an array can only be a
PyTorch tensor once PyTorch is loaded.
"""

from __future__ import annotations

import sys

import array_api_compat

from softce_multi._types import Array, Namespace

#: The ``__name__`` of PyTorch's namespaces: its own and array-api-compat's wrapper.
_TORCH_NAMESPACES = frozenset({"torch", "array_api_compat.torch"})


def is_torch_array(x: object) -> bool:
    """Whether ``x`` is a PyTorch tensor (a subclass such as ``Parameter`` included)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def is_torch_namespace(xp: Namespace) -> bool:
    """Whether ``xp`` is PyTorch or array-api-compat's PyTorch namespace."""
    return getattr(xp, "__name__", None) in _TORCH_NAMESPACES


def is_array_api_obj(x: object) -> bool:
    """Whether ``x`` is an array of a library that array-api-compat knows (``None``, a list
    and a tuple are not)."""
    if x is None or isinstance(x, (list, tuple)):  # Dynamo before torch 2.11 has no X | Y
        return False
    return is_torch_array(x) or array_api_compat.is_array_api_obj(x)


def is_jax_array(x: object) -> bool:
    """Whether ``x`` is a JAX array or tracer."""
    return not is_torch_array(x) and array_api_compat.is_jax_array(x)


def is_numpy_array(x: object) -> bool:
    """Whether ``x`` is a NumPy array or scalar."""
    return not is_torch_array(x) and array_api_compat.is_numpy_array(x)


def is_cupy_array(x: object) -> bool:
    """Whether ``x`` is a CuPy array."""
    return not is_torch_array(x) and array_api_compat.is_cupy_array(x)


def is_jax_namespace(xp: Namespace) -> bool:
    """Whether ``xp`` is JAX's namespace."""
    return not is_torch_namespace(xp) and array_api_compat.is_jax_namespace(xp)


def is_numpy_namespace(xp: Namespace) -> bool:
    """Whether ``xp`` is NumPy or array-api-compat's NumPy namespace."""
    return not is_torch_namespace(xp) and array_api_compat.is_numpy_namespace(xp)


def is_array_api_strict_namespace(xp: Namespace) -> bool:
    """Whether ``xp`` is array-api-strict."""
    return not is_torch_namespace(xp) and array_api_compat.is_array_api_strict_namespace(xp)


def array_namespace(*arrays: Array) -> Namespace:
    """The array-API namespace of ``arrays``: array-api-compat's PyTorch namespace for tensors.

    Raises
    ------
    TypeError
        As :func:`array_api_compat.array_namespace`: for a non-array, or arrays of two
        libraries.
    """
    if arrays and all(is_torch_array(x) for x in arrays):
        from array_api_compat import torch as torch_namespace

        return torch_namespace
    return array_api_compat.array_namespace(*arrays)


def is_jax_symbolic_size(size: object) -> bool:
    """Whether ``size`` is one of ``jax.export``'s symbolic sizes (a number, or a PyTorch
    symbolic size under ``torch.compile``, is not; Dynamo traces this for those)."""
    if isinstance(size, int):
        return False
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(size, torch.SymInt):
        return False
    return type(size).__module__.startswith("jax.")


def cumulative_sum(x: Array, *, xp: Namespace) -> Array:
    """``xp.cumulative_sum`` of the 1-D array ``x``; array-api-compat's own looks the namespace
    up again, through its caches."""
    return x.cumsum(0) if is_torch_array(x) else xp.cumulative_sum(x)


def device(x: Array) -> object:
    """The device of the array ``x`` (``None`` for a traced JAX array)."""
    return x.device if is_torch_array(x) else array_api_compat.device(x)


#: The command that installs the PyTorch CPU build the package is tested with, from PyTorch's
#: CPU index: ``torch`` from PyPI alone is a CUDA build of several GB.
TORCH_CPU_INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

#: How to install each optional framework, for :func:`missing_framework`.
_INSTALL_HINTS = {
    "torch": (
        "PyTorch, which is not installed: install the build for your machine "
        f"(https://pytorch.org/get-started/locally/); the CPU build: {TORCH_CPU_INSTALL}"
    ),
    "jax": "JAX, which is not installed: pip install 'softce_multi[jax]' (JAX for the CPU)",
}


def missing_framework(library: str, module: str) -> ModuleNotFoundError:
    """The error for ``module`` of the package imported without ``library`` ("torch", "jax")."""
    error = ModuleNotFoundError(f"{module} needs {_INSTALL_HINTS[library]}")
    error.name = library
    return error
