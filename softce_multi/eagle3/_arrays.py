"""Array operations that several EAGLE-3 steps share, written once for every backend."""

from __future__ import annotations

import math

import array_api_compat
import array_api_extra as xpx

from softce_multi._types import Array, Namespace

__all__ = ["constant", "nan_where", "top_index", "zero_d"]


def constant(x: Array, *, xp: Namespace) -> Array:
    """Cut ``x`` from automatic differentiation.

    Parameters
    ----------
    x : array
        Any array of the namespace ``xp``.
    xp : namespace
        The array namespace of ``x``.

    Returns
    -------
    array
        ``x.detach()`` on PyTorch, ``jax.lax.stop_gradient(x)`` on JAX, ``x`` itself elsewhere.
    """
    if array_api_compat.is_torch_namespace(xp):
        return x.detach()
    if array_api_compat.is_jax_namespace(xp):
        import jax

        return jax.lax.stop_gradient(x)
    return x


def zero_d(x: Array, *, xp: Namespace) -> Array:
    """Return a 0-d result as an array of ``xp``.

    Parameters
    ----------
    x : array or scalar
        The result of a full reduction, which NumPy gives as a NumPy scalar.
    xp : namespace
        The array namespace the result belongs to.

    Returns
    -------
    array, shape ``()``
        ``x`` as a 0-d NumPy array on NumPy; ``x`` itself elsewhere.
    """
    return xp.asarray(x) if array_api_compat.is_numpy_namespace(xp) else x


def top_index(x: Array, *, xp: Namespace) -> Array:
    """Return the ``argmax`` over the last axis: the first index of the maximum.

    Parameters
    ----------
    x : array, shape ``[..., V]``
        Real floating values; a NaN counts as larger than every number.
    xp : namespace
        The array namespace of ``x``.

    Returns
    -------
    array, shape ``[...]``
        The index of the first maximum (the first NaN where there is one) of each row.
    """
    if not (array_api_compat.is_jax_namespace(xp) and _jax_runs_on_cpu()):
        return xp.argmax(x, axis=-1)
    # XLA's CPU backend lowers argmax to one reduction over (value, index) pairs; a max, then a
    # min over the positions of the maximum, finds the same index with two plain reductions.
    top = xp.max(x, axis=-1, keepdims=True)
    is_top = xp.where(xp.isnan(top), xp.isnan(x), x == top)
    size = x.shape[-1]
    positions = xp.arange(size, dtype=xpx.default_dtype(xp, "indexing"))
    return xp.min(xp.where(is_top, positions, size), axis=-1)


def nan_where(condition: Array, x: Array, *, xp: Namespace) -> Array:
    """Return ``x``, or NaN everywhere where a 0-d condition holds: an error on the device.

    Parameters
    ----------
    condition : array, shape ``()``, bool
        Whether the values of ``x`` are to be replaced by NaN.
    x : array
        Real floating values.
    xp : namespace
        The array namespace of both.

    Returns
    -------
    array
        Shape, dtype and device of ``x``.
    """
    nan = xp.asarray(math.nan, dtype=x.dtype, device=array_api_compat.device(x))
    return xp.where(condition, nan, x)


def _jax_runs_on_cpu() -> bool:
    """Return whether JAX's default backend is the CPU."""
    import jax

    return jax.default_backend() == "cpu"
