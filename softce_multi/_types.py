"""Types shared by every module of the package; this module imports nothing of the package."""

from __future__ import annotations

from typing import Any, Literal, get_args

__all__ = ["REDUCTIONS", "Array", "Namespace", "Reduction"]

#: An array of any array-API library (NumPy, PyTorch, JAX, CuPy, array-api-strict).
Array = Any

#: An array-API namespace, as :func:`array_api_compat.array_namespace` returns it.
Namespace = Any

#: How the per-position losses are reduced.
Reduction = Literal["mean", "sum", "none"]

#: Every :data:`Reduction`, in the order the error messages list them.
REDUCTIONS: tuple[str, ...] = get_args(Reduction)
