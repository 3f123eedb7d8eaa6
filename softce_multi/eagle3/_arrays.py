"""Array operations that several EAGLE-3 steps share, written once for every backend."""

from __future__ import annotations

import math
from typing import Any

import array_api_extra as xpx

from softce_multi import _chunks, _compat
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
    if _compat.is_torch_namespace(xp):
        return x.detach()
    if _compat.is_jax_namespace(xp):
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
    return xp.asarray(x) if _compat.is_numpy_namespace(xp) else x


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
    if not (_compat.is_jax_namespace(xp) and _jax_runs_on_cpu()):
        return xp.argmax(x, axis=-1)
    # XLA's CPU backend lowers argmax to one reduction over (value, index) pairs; a max, then a
    # min over the positions of the maximum, finds the same index with two plain reductions,
    # but XLA keeps the positions of the maximum as a [..., V] integer array: chunks of rows
    # keep it to TOP_INDEX_CHUNK_ELEMENTS.
    size = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    if rows * size <= TOP_INDEX_CHUNK_ELEMENTS or size == 0:
        return _first_maximum(x, xp=xp)
    flat = xp.reshape(x, (rows, size))
    loop = _chunks.traced()
    index_dtype = xpx.default_dtype(xp, "indexing")

    def step(start: Any, count: int, out: Array) -> Array:
        block = loop.get(flat, (start, 0), (count, size))
        return loop.put(out, (start,), _first_maximum(block, xp=xp))

    chunk = max(1, TOP_INDEX_CHUNK_ELEMENTS // size)
    out = xp.zeros((rows,), dtype=index_dtype, device=_compat.device(x))
    out = _chunks.over_chunks(rows, chunk, step, out, loop)
    return xp.reshape(out, x.shape[:-1])


#: Elements of the rows whose top index JAX on the CPU finds at once (4 MiB of int32 positions).
TOP_INDEX_CHUNK_ELEMENTS = 1 << 20


def _first_maximum(x: Array, *, xp: Namespace) -> Array:
    """The first index of the maximum of each row of ``x`` by two plain reductions."""
    top = xp.max(x, axis=-1, keepdims=True)
    # XLA's CPU max may skip a NaN: whether a row holds one is a reduction of its own.
    nan = xp.isnan(x)
    is_top = xp.where(xp.any(nan, axis=-1, keepdims=True), nan, x == top)
    size = x.shape[-1]
    index_dtype = xpx.default_dtype(xp, "indexing")
    positions = xp.arange(size, dtype=index_dtype, device=_compat.device(x))
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
    nan = xp.full((), math.nan, dtype=x.dtype, device=_compat.device(x))
    return xp.where(condition, nan, x)


def _jax_runs_on_cpu() -> bool:
    """Return whether JAX's default backend is the CPU."""
    import jax

    return jax.default_backend() == "cpu"
