"""Row routines for JAX on XLA (CPU, TPU): the generic core, one chunk of rows at a time.

Unchunked, XLA keeps an ``[N, V]`` float32 temporary for the softmax, as large as the gradient
itself. Here a ``lax.fori_loop`` walks the rows in chunks of :func:`chunk_rows`: each chunk is
read with ``lax.dynamic_slice``, reduced by the core's two steps, and its results written with
``lax.dynamic_update_slice`` into the loop's outputs, which XLA updates in place. The last
chunk starts at ``N - chunk`` rather than padding the inputs, so it recomputes a few rows of the
chunk before it, with the same values. Temporaries are then a few chunks, whatever ``N``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softce_multi import _core

__all__ = ["chunk_rows", "gradient_routine", "row_routine"]

#: Elements of one chunk of rows: its float32 temporaries take 4 MiB each.
CHUNK_ELEMENTS = 1 << 20


def chunk_rows(n_rows: int, vocab_size: int) -> int:
    """Rows per chunk: the largest divisor of ``n_rows`` within :data:`CHUNK_ELEMENTS`."""
    limit = max(1, min(n_rows, CHUNK_ELEMENTS // max(vocab_size, 1)))
    return next(size for size in range(limit, 0, -1) if n_rows % size == 0)


def row_routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of the core, chunk by chunk of rows."""
    n_rows, vocab_size = rows.z.shape
    chunk = chunk_rows(n_rows, vocab_size)
    core = _core.blocked_row_routine(None, xp=jnp)
    vector = jax.ShapeDtypeStruct((n_rows,), rows.dtype)
    outputs = [vector, _core.SavedRows(vector, vector, vector)]
    if with_logits_grad:
        outputs.append(jax.ShapeDtypeStruct(rows.z.shape, rows.z.dtype))

    def chunk_results(start: Any) -> list[Any]:
        piece = _core.Rows(
            _rows_at(rows.z, start, chunk),
            _rows_at(rows.p, start, chunk),
            jax.lax.dynamic_slice_in_dim(rows.weights, start, chunk),
            rows.inv_den,
        )
        result = core(piece, with_logits_grad=with_logits_grad)
        return [result.weighted, result.saved, result.logits_grad][: len(outputs)]

    results = _over_chunks(chunk_results, outputs, n_rows, chunk)
    return _core.RowResults(results[0], results[1], results[2] if with_logits_grad else None)


def gradient_routine(
    z: jax.Array,
    p: jax.Array,
    saved: _core.SavedRows,
    row_scale: jax.Array,
    /,
    *,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[jax.Array | None, jax.Array | None]:
    """The :class:`~softce_multi._core.GradientRoutine` of the core, chunk by chunk of rows."""
    n_rows, vocab_size = z.shape
    chunk = chunk_rows(n_rows, vocab_size)
    core = _core.blocked_gradient_routine(None, xp=jnp)
    wanted = (logits_grad, targets_grad)
    outputs = [
        jax.ShapeDtypeStruct(z.shape, dtype)
        for dtype, want in zip((z.dtype, p.dtype), wanted, strict=True)
        if want
    ]

    def chunk_results(start: Any) -> list[Any]:
        grads = core(
            _rows_at(z, start, chunk),
            _rows_at(p, start, chunk),
            jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk), saved),
            jax.lax.dynamic_slice_in_dim(row_scale, start, chunk),
            logits_grad=logits_grad,
            targets_grad=targets_grad,
        )
        return [grad for grad in grads if grad is not None]

    results = iter(_over_chunks(chunk_results, outputs, n_rows, chunk))
    return tuple(next(results) if want else None for want in wanted)  # type: ignore[return-value]


def _over_chunks(chunk_results: Any, outputs: Any, n_rows: int, chunk: int) -> Any:
    """The pytree ``outputs`` (shapes, rows first) from ``chunk_results(start)`` of each chunk.

    ``chunk`` divides ``n_rows``: ``lax.map`` stacks the chunks' results, and the stack is the
    output, reshaped for free. 16-bit floats are stacked as their bits: XLA's CPU backend
    computes them in float32, and would convert the whole stack to float32 and back to write
    one chunk into it.
    """

    def bits_of_chunk(start: Any) -> Any:
        return jax.tree.map(_as_bits, chunk_results(start))

    stacked = jax.lax.map(bits_of_chunk, jnp.arange(0, n_rows, chunk))
    return jax.tree.map(
        lambda x, out: _from_bits(jnp.reshape(x, out.shape), out.dtype), stacked, outputs
    )


def _as_bits(x: jax.Array) -> jax.Array:
    """A 16-bit float array as unsigned 16-bit integers; any other array as it is."""
    if jnp.dtype(x.dtype).itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating):
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def _from_bits(x: jax.Array, dtype: Any) -> jax.Array:
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def _rows_at(x: jax.Array, start: Any, chunk: int) -> jax.Array:
    """Rows ``start`` to ``start + chunk`` of ``x``, as they are stored.

    A 16-bit float array is sliced as its bits, for the reason given in :func:`_over_chunks`:
    sliced as floats, the whole array would be converted to float32 first.
    """
    rows = jax.lax.dynamic_slice_in_dim(_as_bits(x), start, chunk, axis=0)
    return _from_bits(rows, x.dtype)
