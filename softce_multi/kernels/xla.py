"""Row routines for JAX on XLA: the generic core, one chunk of rows at a time.

Unchunked, XLA keeps an ``[N, V]`` float32 temporary for the softmax, as large as the gradient
itself. Here the rows are walked in chunks of :func:`chunk_rows`: each chunk is read with
``lax.dynamic_slice`` and reduced by the core's two steps. When the chunk divides ``N``,
``lax.map`` stacks the chunks' results and the stack is the output. When ``N`` has no divisor
near the chunk size (a prime ``N``, say), the traced loop of :mod:`softce_multi._chunks` writes
each chunk's results with ``lax.dynamic_update_slice`` into the loop's outputs, which XLA
updates in place, and gives the shorter last chunk a step of its own. Temporaries are a few
chunks either way, whatever ``N``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from softce_multi import _chunks, _core, kernels
from softce_multi.kernels import blocked, sparse

__all__ = ["chunk_rows", "gradient_routine", "row_routine", "widened", "zero_rows"]

#: Elements of one chunk of rows on the CPU and TPU: its float32 temporaries take 4 MiB each.
CHUNK_ELEMENTS = 1 << 20

#: Elements of one chunk of rows on a GPU: 256 MiB per float32 temporary. The chunks run one
#: after the other, each as a few kernels over its rows; a chunk of a few thousand rows fills
#: a GPU, where one of a few dozen (``CHUNK_ELEMENTS`` at ``V = 32000``) leaves it mostly idle.
GPU_CHUNK_ELEMENTS = 1 << 26


def chunk_rows(n_rows: int, vocab_size: int, *, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk: at most ``elements`` elements, a divisor of ``n_rows`` if one is at
    least half that many rows, else the most rows that fit."""
    limit = max(1, min(n_rows, elements // max(vocab_size, 1)))
    divisors = (size for size in range(limit, (limit + 1) // 2 - 1, -1) if n_rows % size == 0)
    return next(divisors, limit)


def row_routine(
    rows: _core.Rows, /, *, with_logits_grad: bool, chunk: int | None = None
) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of the core, chunk by chunk of rows.

    ``chunk`` is the number of rows per chunk; None for :func:`chunk_rows`. Rows with sparse
    targets (``rows.ids``) run the routine of :mod:`softce_multi.kernels.sparse` on each chunk.
    """
    chunk = _chunk(rows.z, chunk)
    n_rows, vocab_size = rows.z.shape
    width = rows.p.shape[1]
    loop = _chunks.traced()
    ids, rows = rows.ids, rows._replace(ids=None)  # integers: outside what is differentiated
    if ids is None:
        core = blocked.blocked_row_routine(None, xp=jnp)
    else:
        core = sparse.sparse_row_routine(None, xp=jnp)
    vector = jax.ShapeDtypeStruct((n_rows,), rows.dtype)
    outputs = [vector, _core.SavedRows(vector, vector, vector)]
    if with_logits_grad:
        outputs.append(jax.ShapeDtypeStruct(rows.z.shape, rows.z.dtype))

    def compute(as_bits: bool, rows: _core.Rows) -> list[Any]:
        def chunk_results(start: Any, size: int) -> list[Any]:
            weights = loop.get(rows.weights, (start,), (size,))
            live = weights != 0
            piece = _core.Rows(
                zero_rows(loop.get(rows.z, (start, 0), (size, vocab_size)), live),
                zero_rows(loop.get(rows.p, (start, 0), (size, width)), live),
                weights,
                rows.inv_den,
                _slice_ids(ids, start, size),
            )
            result = core(piece, with_logits_grad=with_logits_grad)
            return [result.weighted, result.saved, result.logits_grad][: len(outputs)]

        return _over_chunks(chunk_results, outputs, n_rows, chunk, as_bits=as_bits)

    results = _differentiable_as_floats(compute, rows, outputs)
    return _core.RowResults(results[0], results[1], results[2] if with_logits_grad else None)


def gradient_routine(
    rows: _core.BackwardRows,
    /,
    *,
    logits_grad: bool,
    targets_grad: bool,
    chunk: int | None = None,
) -> tuple[jax.Array | None, jax.Array | None]:
    """The :class:`~softce_multi._core.GradientRoutine` of the core, chunk by chunk of rows.

    ``chunk`` and sparse targets are as in :func:`row_routine`.
    """
    z, p = rows.z, rows.p
    chunk = _chunk(z, chunk)
    n_rows, vocab_size = z.shape
    width = p.shape[1]
    loop = _chunks.traced()
    ids, rows = rows.ids, rows._replace(ids=None)  # integers: outside what is differentiated
    if ids is None:
        core = blocked.blocked_gradient_routine(None, xp=jnp)
    else:
        core = sparse.sparse_gradient_routine(None, xp=jnp)
    wanted = (logits_grad, targets_grad)
    outputs = [
        jax.ShapeDtypeStruct(x.shape, x.dtype)
        for x, want in zip((z, p), wanted, strict=True)
        if want
    ]

    def compute(as_bits: bool, rows: _core.BackwardRows) -> list[Any]:
        def chunk_results(start: Any, size: int) -> list[Any]:
            row_scale = loop.get(rows.row_scale, (start,), (size,))
            live = row_scale != 0
            saved = _core.SavedRows(*(loop.get(x, (start,), (size,)) for x in rows.saved))
            piece = _core.BackwardRows(
                zero_rows(loop.get(rows.z, (start, 0), (size, vocab_size)), live),
                zero_rows(loop.get(rows.p, (start, 0), (size, width)), live),
                saved,
                row_scale,
                _slice_ids(ids, start, size),
            )
            grads = core(piece, logits_grad=logits_grad, targets_grad=targets_grad)
            return [grad for grad in grads if grad is not None]

        return _over_chunks(chunk_results, outputs, n_rows, chunk, as_bits=as_bits)

    results = iter(_differentiable_as_floats(compute, rows, outputs))
    return tuple(next(results) if want else None for want in wanted)  # type: ignore[return-value]


def widened(x: jax.Array, dtype: Any) -> jax.Array:
    """``x`` converted to the floating ``dtype``, at least as wide, holding values of ``x``'s
    dtype.

    A plain conversion may carry more precision than ``x``'s dtype has. XLA's CPU compiler
    computes a bfloat16 matmul in float32 and rounds it to bfloat16 only on paper: its algebraic
    simplifier drops the conversion to bfloat16 and back (excess precision is allowed by
    default), and its matmul fusions ignore the conversions inside them. ``reduce_precision``
    rounds in any case. It would flush float16's subnormal numbers to zero, so these keep the
    plain conversion, within ``2**-25`` of their rounded value whether rounded or not.
    """
    wide = jnp.astype(x, dtype)
    if x.dtype == dtype:
        return wide
    info = jnp.finfo(x.dtype)
    rounded = jax.lax.reduce_precision(wide, exponent_bits=info.nexp, mantissa_bits=info.nmant)
    return jnp.where(jnp.abs(wide) < float(info.smallest_normal), wide, rounded)


def zero_rows(x: jax.Array, live: jax.Array) -> jax.Array:
    """``x`` with the rows that are not ``live`` replaced by zeros, before any arithmetic.

    Padding may hold NaN or inf. The core's ``where`` gives such a row a zero result, but the
    derivative of the result (a gradient penalty, a hessian) would still multiply a zero by the
    NaN derivative of the row's arithmetic; with zeros in, every derivative is exactly 0. XLA
    fuses the selection into the chunk's computation.
    """
    return jnp.where(live[:, None], x, jnp.zeros((), x.dtype))


def _slice_ids(ids: jax.Array | None, start: Any, size: int) -> jax.Array | None:
    """The ``[size, K]`` ids of the chunk at ``start`` (None without sparse targets)."""
    if ids is None:
        return None
    return jax.lax.dynamic_slice(ids, (start, 0), (size, ids.shape[1]))


def _chunk(z: Any, chunk: int | None) -> int:
    """Rows per chunk of the ``[N, V]`` logits ``z``: all of them if the shape is symbolic
    (:func:`_chunks.is_static`); else ``chunk`` (at most ``N``, at least 1) if given; all of
    them if ``z`` is split over devices (:func:`_chunks.split_over_devices`); else
    :func:`chunk_rows`, of :data:`GPU_CHUNK_ELEMENTS` on a GPU."""
    if not _chunks.is_static(*z.shape):
        return z.shape[0]
    if chunk is not None:
        return max(1, min(chunk, z.shape[0]))
    if _chunks.split_over_devices(z):
        return z.shape[0]
    on_gpu = kernels.jax_platforms(z) == {"gpu"}
    return chunk_rows(*z.shape, elements=GPU_CHUNK_ELEMENTS if on_gpu else CHUNK_ELEMENTS)


def _over_chunks(
    chunk_results: Any, outputs: Any, n_rows: int, chunk: int, *, as_bits: bool
) -> Any:
    """The pytree ``outputs`` (shapes, rows first) from ``chunk_results(start, size)`` of each
    chunk.

    One chunk of every row is computed as it is. When ``chunk`` divides ``n_rows``, ``lax.map``
    stacks the chunks' results, and the stack is the output, reshaped for free; otherwise the
    loop of :func:`softce_multi._chunks.over_chunks` writes them into the outputs in place.
    With ``as_bits``, 16-bit floats are stacked and written as their bits: XLA's CPU backend
    computes them in float32, and would convert the whole output to float32 and back to write
    one chunk into it. JAX differentiates no bitcast, so :func:`_differentiable_as_floats`
    differentiates the same stacking of floats.
    """
    encode = _as_bits if as_bits else _unchanged

    def bits_of_chunk(start: Any, size: int) -> Any:
        return jax.tree.map(encode, chunk_results(start, size))

    if chunk == n_rows:
        bits = bits_of_chunk(0, n_rows)
    elif n_rows % chunk == 0:
        stacked = jax.lax.map(
            lambda start: bits_of_chunk(start, chunk), jnp.arange(0, n_rows, chunk)
        )
        bits = jax.tree.map(lambda x, out: jnp.reshape(x, out.shape), stacked, outputs)
    else:
        loop = _chunks.traced()

        def write_chunk(start: Any, size: int, bits: Any) -> Any:
            return jax.tree.map(
                lambda out, new: loop.put(out, (start,) + (0,) * (out.ndim - 1), new),
                bits,
                bits_of_chunk(start, size),
            )

        empty = jax.tree.map(lambda out: jnp.zeros(out.shape, encode(out).dtype), outputs)
        bits = _chunks.over_chunks(n_rows, chunk, write_chunk, empty, loop)
    return jax.tree.map(lambda x, out: _from_bits(x, out.dtype), bits, outputs)


def _differentiable_as_floats(
    compute: Callable[[bool, Any], Any], arrays: Any, outputs: Any
) -> Any:
    """``compute(True, arrays)``, whose 16-bit float ``outputs`` are stacked as their bits,
    with the derivatives of ``compute(False, arrays)``, which stacks them as floats.

    A derivative through a bitcast is 0 to JAX, so differentiating the fast computation (the
    routine's gradient penalties, hessians) would silently give zeros. Without a 16-bit float
    output both are the same computation, which runs as it is.
    """
    if not any(_is_half(out) for out in jax.tree.leaves(outputs)):
        return compute(False, arrays)

    @jax.custom_jvp
    def stacked_as_bits(arrays: Any) -> Any:
        return compute(True, arrays)

    @stacked_as_bits.defjvp
    def derivatives(primals: Any, tangents: Any) -> Any:
        return jax.jvp(functools.partial(compute, False), primals, tangents)

    return stacked_as_bits(arrays)


def _is_half(x: Any) -> bool:
    """Whether ``x`` (an array or shape) is of a 16-bit floating dtype."""
    return jnp.dtype(x.dtype).itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating)


def _unchanged(x: Any) -> Any:
    return x


def _as_bits(x: Any) -> Any:
    """A 16-bit float array (or shape) as unsigned 16-bit integers; any other as it is."""
    if _is_half(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, jnp.uint16)
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def _from_bits(x: jax.Array, dtype: Any) -> jax.Array:
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)
