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
    """Rows per chunk for ``n_rows`` rows of ``vocab_size`` entries (all of them if few)."""
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(vocab_size, 1)))


def row_routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of the core, chunk by chunk of rows."""
    n_rows, vocab_size = rows.z.shape
    chunk = chunk_rows(n_rows, vocab_size)
    core = _core.blocked_row_routine(None, xp=jnp)
    vector = jnp.zeros((n_rows,), rows.dtype)
    outputs = [vector, _core.SavedRows(vector, vector, vector)]
    if with_logits_grad:
        outputs.append(jnp.zeros(rows.z.shape, rows.z.dtype))

    def step(index: Any, outputs: list[Any]) -> list[Any]:
        start = _chunk_start(index, chunk, n_rows)
        piece = _core.Rows(
            _rows_at(rows.z, start, chunk),
            _rows_at(rows.p, start, chunk),
            jax.lax.dynamic_slice_in_dim(rows.weights, start, chunk),
            rows.inv_den,
        )
        result = core(piece, with_logits_grad=with_logits_grad)
        pieces = [result.weighted, result.saved]
        if with_logits_grad:
            pieces.append(result.logits_grad)
        return jax.tree.map(
            lambda out, new: jax.lax.dynamic_update_slice_in_dim(out, new, start, axis=0),
            outputs,
            pieces,
        )

    results = jax.lax.fori_loop(0, _n_chunks(n_rows, chunk), step, outputs)
    grad = results[2] if with_logits_grad else None
    return _core.RowResults(results[0], results[1], grad)


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
        jnp.zeros(z.shape, dtype) for dtype, want in zip((z.dtype, p.dtype), wanted) if want
    ]

    def step(index: Any, outputs: list[Any]) -> list[Any]:
        start = _chunk_start(index, chunk, n_rows)
        pieces = core(
            _rows_at(z, start, chunk),
            _rows_at(p, start, chunk),
            jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk), saved),
            jax.lax.dynamic_slice_in_dim(row_scale, start, chunk),
            logits_grad=logits_grad,
            targets_grad=targets_grad,
        )
        pieces = [piece for piece in pieces if piece is not None]
        return [
            jax.lax.dynamic_update_slice_in_dim(out, new, start, axis=0)
            for out, new in zip(outputs, pieces, strict=True)
        ]

    results = iter(jax.lax.fori_loop(0, _n_chunks(n_rows, chunk), step, outputs))
    return tuple(next(results) if want else None for want in wanted)  # type: ignore[return-value]


def _n_chunks(n_rows: int, chunk: int) -> int:
    return -(-n_rows // chunk)


def _chunk_start(index: Any, chunk: int, n_rows: int) -> Any:
    """The first row of chunk ``index``; the last chunk ends at the last row."""
    return jnp.minimum(index * chunk, n_rows - chunk)


def _rows_at(x: jax.Array, start: Any, chunk: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=0)
