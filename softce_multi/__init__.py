"""Masked soft-target cross entropy for EAGLE-3 draft models, on every array-API backend."""

import importlib
from types import ModuleType

from softce_multi._api import (
    linear_masked_soft_cross_entropy,
    linear_masked_soft_cross_entropy_with_grad,
    masked_soft_cross_entropy,
    masked_soft_cross_entropy_with_grad,
)
from softce_multi._types import LinearGradients

__all__ = [
    "LinearGradients",
    "linear_masked_soft_cross_entropy",
    "linear_masked_soft_cross_entropy_with_grad",
    "masked_soft_cross_entropy",
    "masked_soft_cross_entropy_with_grad",
]

__version__ = "0.1.0"

# Submodules that need an optional library are imported on first use, so that importing the
# package needs NumPy, array-api-compat and array-api-extra only.
_LAZY_SUBMODULES = ("reference", "torch", "jax", "eagle3", "distributed", "testing")


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"softce_multi.{name}")
    msg = f"module 'softce_multi' has no attribute {name!r}"
    raise AttributeError(msg)
