"""The NumPy row routine: the core's two steps in place, a few passes over each block in cache.

NumPy runs one thread, so the time goes into passes over memory. This routine makes each block
of rows small enough to stay in the CPU's cache while it is worked on, and works on it in place
with ``out=`` operations: the shifted logits become their exponentials, which become the
gradient, written straight into the output. The ``where`` that makes a ``p == 0`` term exactly
0 where the logit is -inf (``0 * -inf`` is NaN) runs only on the rows whose plain dot product
came out NaN, never on whole blocks.

The result is that of :func:`softce_multi.kernels.blocked.blocked_row_routine`, the generic routine,
to rounding: the tests hold it to the same saved statistics and gradients.
"""

from __future__ import annotations

import numpy as np

from softce_multi import _core

__all__ = ["row_routine"]

#: Elements per block: four float32 blocks of this size fit together in a core's L2 cache.
BLOCK_ELEMENTS = 1 << 16


def row_routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of NumPy arrays."""
    z, p, weights = rows.z, rows.p, rows.weights
    dtype = rows.dtype
    n_rows, vocab_size = z.shape
    row_scale = _core.row_scale(rows)
    valid = weights != 0

    weighted = np.zeros(n_rows, dtype)
    row_max = np.zeros(n_rows, dtype)
    log_sum_exp = np.zeros(n_rows, dtype)
    target_sum = np.zeros(n_rows, dtype)
    grad = np.empty(z.shape, z.dtype) if with_logits_grad else None

    block_rows = max(1, min(BLOCK_ELEMENTS // vocab_size, n_rows))
    work = np.empty((block_rows, vocab_size), dtype)
    z_buf = None if z.dtype == dtype else np.empty_like(work)
    p_buf = None if p.dtype == dtype else np.empty_like(work)
    with np.errstate(all="ignore"):
        for block in _core.row_blocks(n_rows, block_rows):
            size = block.stop - block.start
            rows_valid = valid[block]
            if not rows_valid.any():
                if grad is not None:
                    grad[block] = 0
                continue
            z_block = _in_dtype(z[block], z_buf, size)
            p_block = _in_dtype(p[block], p_buf, size)
            shifted = work[:size]

            block_max = np.max(z_block, axis=1)
            block_max[~np.isfinite(block_max)] = 0
            np.subtract(z_block, block_max[:, None], out=shifted)
            block_target_sum = np.sum(p_block, axis=1)
            target_dot = np.einsum("ij,ij->i", p_block, shifted)
            _exact_zero_terms(target_dot, p_block, shifted)
            sum_exp = np.sum(np.exp(shifted, out=shifted), axis=1)

            block_lse = np.log(sum_exp)
            normalizer = np.where(block_target_sum == 0, 0, block_target_sum * block_lse)
            losses = weights[block] * (normalizer - target_dot)
            weighted[block] = np.where(rows_valid, losses, 0)
            row_max[block] = np.where(rows_valid, block_max, 0)
            log_sum_exp[block] = np.where(rows_valid, block_lse, 0)
            target_sum[block] = np.where(rows_valid, block_target_sum, 0)

            if grad is not None:
                scale = row_scale[block]
                # scale * (sum(p) * exp(shifted) / sum_exp - p), from the exponentials in place;
                # scaled last, so that gradients of two scales differ by one rounding only.
                np.multiply(shifted, (block_target_sum / sum_exp)[:, None], out=shifted)
                np.subtract(shifted, p_block, out=shifted)
                np.multiply(shifted, scale[:, None], out=shifted)
                # Padding may hold NaN or inf, and a row with no target mass may have no softmax.
                shifted[~_core.rows_with_gradient(scale, block_target_sum)] = 0
                grad[block] = shifted
    saved = _core.SavedRows(row_max, log_sum_exp, target_sum)
    return _core.RowResults(weighted, saved, grad)


def _in_dtype(block: np.ndarray, buffer: np.ndarray | None, size: int) -> np.ndarray:
    """``block`` in the computation dtype, copied into ``buffer`` when it has another dtype."""
    if buffer is None:
        return block
    out = buffer[:size]
    out[...] = block
    return out


def _exact_zero_terms(target_dot: np.ndarray, p: np.ndarray, shifted: np.ndarray) -> None:
    """Recompute, with ``p == 0`` terms exactly 0, the rows of ``target_dot`` that came out NaN."""
    (redo,) = np.nonzero(np.isnan(target_dot))
    if redo.size:
        terms = np.where(p[redo] == 0, 0, p[redo] * shifted[redo])
        target_dot[redo] = np.sum(terms, axis=1)
