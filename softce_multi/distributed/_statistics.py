"""The vocabulary-parallel forward pass, shared by torch and JAX.

Each rank reduces its slice of the vocabulary to the core's row statistics
(:func:`local_statistics`); :func:`global_rows` all-reduces them into the statistics of the
whole vocabulary (one max-reduction of ``[N]``, one sum-reduction of ``[3, N]``), hence the
weighted row losses and the :class:`~softce_multi._core.SavedRows` every backward pass starts
from; :func:`global_forward` reduces those losses as the single-device loss does. The
collectives come in as functions (``max_over_shards``, ``sum_over_shards``): torch's
all-reduce over a process group, JAX's ``pmax`` and ``psum`` over a mesh axis. Nothing here
imports torch or JAX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from softce_multi import _core
from softce_multi._types import Array, Namespace


def vocab_parallel_forward(
    logits_shard: Array,
    target_probs_shard: Array,
    position_mask: Array,
    *,
    reduction: str,
    num_valid: Array | float | None,
    max_over_shards: Callable[[Array], Array],
    sum_over_shards: Callable[[Array], Array],
    block_rows: int | None,
    xp: Namespace,
) -> _core.ForwardResult:
    """:func:`global_forward` of the logits' local statistics, ``block_rows`` rows at a time."""
    rows = _core.as_rows(
        logits_shard,
        target_probs_shard,
        position_mask,
        reduction=reduction,
        num_valid=num_valid,
        xp=xp,
    )

    def logits_of(block: slice) -> Array:
        return rows.z[block, ...]

    return global_forward(
        local_statistics(logits_of, rows.p, rows.dtype, block_rows, xp=xp),
        rows.weights,
        rows.inv_den,
        reduction=reduction,
        batch_shape=tuple(logits_shard.shape[:-1]),
        max_over_shards=max_over_shards,
        sum_over_shards=sum_over_shards,
        xp=xp,
    )


def global_forward(
    local: _core.RowStatistics,
    weights: Array,
    inv_den: Array,
    *,
    reduction: str,
    batch_shape: tuple[int, ...],
    max_over_shards: Callable[[Array], Array],
    sum_over_shards: Callable[[Array], Array],
    xp: Namespace,
) -> _core.ForwardResult:
    """The loss over every shard from this shard's row statistics, and what a backward needs.

    ``local`` holds the :class:`~softce_multi._core.RowStatistics` of this rank's slice of the
    vocabulary; ``weights`` (``[N]``) and ``inv_den`` are those of
    :class:`softce_multi._core.Rows`. ``max_over_shards`` and ``sum_over_shards`` all-reduce an
    array over the ranks that share the vocabulary.
    """
    results = global_rows(
        local, weights, max_over_shards=max_over_shards, sum_over_shards=sum_over_shards, xp=xp
    )
    loss = _core.reduce_loss(
        results.weighted, inv_den, reduction=reduction, batch_shape=batch_shape, xp=xp
    )
    return _core.ForwardResult(loss, None, results.saved, weights * inv_den)


def global_rows(
    local: _core.RowStatistics,
    weights: Array,
    *,
    max_over_shards: Callable[[Array], Array],
    sum_over_shards: Callable[[Array], Array],
    xp: Namespace,
) -> _core.RowResults:
    """The weighted losses and saved statistics of rows whose vocabulary is split over shards.

    ``local`` holds the row statistics of this rank's slice of the vocabulary; the result is
    the same on every rank, without a logits gradient.
    """
    valid = weights != 0
    # Padding enters the collectives as the statistics of a row with nothing in it: its NaN
    # and inf stay out of every reduction (and out of NaN checks such as TORCH_NCCL_NAN_CHECK).
    empty = (0.0, 1.0, 0.0, 0.0)
    local = _core.RowStatistics(
        *(xp.where(valid, field, value) for field, value in zip(local, empty, strict=True))
    )
    shift = _core.common_shift(max_over_shards(_core.merge_candidate(local, xp=xp)), xp=xp)
    shifted = _core.shift_statistics(local, shift, xp=xp)
    sums = sum_over_shards(xp.stack([shifted.sum_exp, shifted.target_sum, shifted.target_dot]))
    total = _core.RowStatistics(shift, sums[0, ...], sums[1, ...], sums[2, ...])
    weighted = xp.where(valid, weights * _core.row_losses(total, xp=xp), 0.0)
    saved = _core.SavedRows(
        xp.where(valid, total.row_max, 0.0),
        xp.where(valid, xp.log(total.sum_exp), 0.0),
        xp.where(valid, total.target_sum, 0.0),
    )
    return _core.RowResults(weighted, saved, None)


def local_statistics(
    logits_of: Callable[[slice], Array],
    p: Array,
    dtype: Any,
    block_rows: int | None,
    *,
    xp: Namespace,
) -> _core.RowStatistics:
    """:func:`softce_multi._core.row_statistics` of every row, a block of rows at a time.

    ``logits_of(rows)`` returns the logits of a slice of rows (a slice of the logits, or the
    chunk's matmul of the linear loss); ``p`` is ``[N, V_r]``.
    """
    blocks = [
        _core.row_statistics(
            xp.astype(logits_of(block), dtype, copy=False),
            xp.astype(p[block, ...], dtype, copy=False),
            xp=xp,
        )
        # No rows still make one (empty) block, for the shapes of the statistics.
        for block in list(_core.row_blocks(p.shape[0], block_rows)) or [slice(0, 0)]
    ]
    if len(blocks) == 1:
        return blocks[0]
    return _core.RowStatistics(*(xp.concat(field, axis=0) for field in zip(*blocks, strict=True)))
