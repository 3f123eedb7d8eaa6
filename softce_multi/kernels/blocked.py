"""The generic routines: the core's two steps over blocks of rows, in any array-API library.

:func:`blocked_row_routine` and :func:`blocked_gradient_routine` are the
:class:`~softce_multi._core.RowRoutine` and :class:`~softce_multi._core.GradientRoutine` of
the array API itself: each block of rows is read once for its statistics, then again for its
gradient rows, so that no ``[N, V]`` float32 intermediate outlives one block. They serve every
library without a routine of its own (CuPy, array-api-strict), the XLA routines (one block:
XLA fuses it) and the tests, which hold every faster routine to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_extra as xpx

from softce_multi import _compat, _core
from softce_multi._types import Array, Namespace

__all__ = ["blocked_gradient_routine", "blocked_row_routine"]


def blocked_row_routine(block_rows: int | None, *, xp: Namespace) -> _core.RowRoutine:
    """The generic :class:`~softce_multi._core.RowRoutine`: the two steps over blocks of
    ``block_rows`` rows.

    ``None`` processes every row at once, for traced backends (XLA fuses it).
    """

    def routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
        z, p, dtype = rows.z, rows.p, rows.dtype
        valid = rows.weights != 0
        row_scale = _core.row_scale(rows)
        losses, row_maxes, log_sum_exps, target_sums, grad_blocks = [], [], [], [], []
        grad = _allocate_if_blocked(z, block_rows, with_logits_grad, xp=xp)
        for block in _core.row_blocks(z.shape[0], block_rows):
            z_block = xp.astype(z[block, ...], dtype, copy=False)
            p_block = xp.astype(p[block, ...], dtype, copy=False)
            stats = _core.row_statistics(z_block, p_block, xp=xp)
            log_sum_exp = xp.log(stats.sum_exp)
            weighted = rows.weights[block] * _core.row_losses(stats, xp=xp)
            # Rows of weight 0 (padding, which may hold anything) keep zeros, as in the kernels.
            losses.append(xp.where(valid[block], weighted, 0.0))
            row_maxes.append(xp.where(valid[block], stats.row_max, 0.0))
            log_sum_exps.append(xp.where(valid[block], log_sum_exp, 0.0))
            target_sums.append(xp.where(valid[block], stats.target_sum, 0.0))
            if with_logits_grad:
                grad_block = _core.logits_gradient_rows(
                    z_block,
                    p_block,
                    stats.row_max,
                    log_sum_exp,
                    stats.target_sum,
                    row_scale[block],
                    xp=xp,
                )
                grad_block = xp.astype(grad_block, z.dtype, copy=False)
                if grad is None:
                    grad_blocks.append(grad_block)
                else:
                    grad = xpx.at(grad, (block, ...)).set(grad_block, xp=xp)
        if with_logits_grad and grad is None:
            grad = _concat(grad_blocks, xp=xp)
        saved = _core.SavedRows(
            _concat(row_maxes, xp=xp), _concat(log_sum_exps, xp=xp), _concat(target_sums, xp=xp)
        )
        return _core.RowResults(_concat(losses, xp=xp), saved, grad)

    return routine


def blocked_gradient_routine(block_rows: int | None, *, xp: Namespace) -> _core.GradientRoutine:
    """The generic :class:`~softce_multi._core.GradientRoutine`, over blocks of ``block_rows``
    rows."""

    def routine(
        rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool
    ) -> tuple[Array | None, Array | None]:
        z, p, saved, row_scale = rows.z, rows.p, rows.saved, rows.row_scale
        dtype = saved.row_max.dtype

        def logits_block(block: slice) -> Array:
            return _core.logits_gradient_rows(
                xp.astype(z[block, ...], dtype, copy=False),
                xp.astype(p[block, ...], dtype, copy=False),
                saved.row_max[block],
                saved.log_sum_exp[block],
                saved.target_sum[block],
                row_scale[block],
                xp=xp,
            )

        def targets_block(block: slice) -> Array:
            return _core.targets_gradient_rows(
                xp.astype(z[block, ...], dtype, copy=False),
                saved.row_max[block],
                saved.log_sum_exp[block],
                row_scale[block],
                xp=xp,
            )

        grad_z = (
            _map_row_blocks(logits_block, z, z.dtype, block_rows, xp=xp) if logits_grad else None
        )
        grad_p = (
            _map_row_blocks(targets_block, z, p.dtype, block_rows, xp=xp) if targets_grad else None
        )
        return grad_z, grad_p

    return routine


def _concat(blocks: list[Array], *, xp: Namespace) -> Array:
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)


def _allocate_if_blocked(
    z: Array, block_rows: int | None, needed: bool, *, xp: Namespace, dtype: Any = None
) -> Array | None:
    """Preallocate an ``[N, V]`` output when it will be filled block by block."""
    if not needed or block_rows is None or block_rows >= z.shape[0]:
        return None
    out_dtype = z.dtype if dtype is None else dtype
    return xp.empty(z.shape, dtype=out_dtype, device=_compat.device(z))


def _map_row_blocks(
    block: Callable[[slice], Array],
    z: Array,
    out_dtype: Any,
    block_rows: int | None,
    *,
    xp: Namespace,
) -> Array:
    """Assemble an ``[N, V]`` array of ``out_dtype`` from ``block(rows)`` over row blocks."""
    out = _allocate_if_blocked(z, block_rows, True, xp=xp, dtype=out_dtype)
    if out is None:
        return xp.astype(block(slice(0, z.shape[0])), out_dtype, copy=False)
    for rows in _core.row_blocks(z.shape[0], block_rows):
        out = xpx.at(out, (rows, ...)).set(xp.astype(block(rows), out_dtype, copy=False), xp=xp)
    return out
