"""Masked soft-target cross entropy and its gradients, written once against the array API.

Every function here takes the array namespace ``xp`` explicitly and creates its arrays on the
device of its inputs. The work is split in two reusable steps:

1. :func:`row_statistics` reduces a block of rows to four numbers per row (the row maximum, the
   sum of exponentials relative to it, the target mass and the target-weighted logits).
2. :func:`row_losses`, :func:`logits_gradient_rows` and :func:`targets_gradient_rows` turn those
   statistics, and the same block, into per-row losses and gradient rows.

The drivers (:func:`forward`, :func:`logits_gradient`, :func:`targets_gradient`) run the two
steps over blocks of rows, so that no ``[N, V]`` float32 intermediate outlives one block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import array_api_compat

Array = Any
Namespace = Any

#: Elements per block on eager backends: large enough that few parallel regions are started
#: (each one costs dearly on a busy machine), small enough that a block's few float32
#: temporaries (4 MiB each) stay in a server CPU's last-level cache.
BLOCK_ELEMENTS = 1 << 20

REDUCTIONS = ("mean", "sum", "none")


class RowStatistics(NamedTuple):
    """Per-row reductions of a block of logits ``z`` and targets ``p``.

    All fields have shape ``[n]``. ``target_dot`` is taken relative to ``row_max`` so that the
    loss never subtracts two large numbers.
    """

    row_max: Array
    """``max_v z_v``, or 0 where that maximum is not finite."""
    sum_exp: Array
    """``sum_v exp(z_v - row_max)``."""
    target_sum: Array
    """``sum_v p_v``."""
    target_dot: Array
    """``sum_v p_v * (z_v - row_max)``, where a term with ``p_v == 0`` is exactly 0."""


class SavedRows(NamedTuple):
    """What a backward pass needs of the forward pass, per row: three ``[N]`` arrays."""

    row_max: Array
    """:attr:`RowStatistics.row_max`."""
    log_sum_exp: Array
    """``log(sum_exp)``; the log-normalizer is ``row_max + log_sum_exp``.

    The two are kept apart because ``exp((z - row_max) - log_sum_exp)`` is accurate where
    ``exp(z - logsumexp(z))`` with a rounded ``logsumexp`` is not (logits far from 0).
    """
    target_sum: Array
    """:attr:`RowStatistics.target_sum`."""


class ForwardResult(NamedTuple):
    """What one pass over the inputs produces."""

    loss: Array
    """The reduced loss, in the computation dtype."""
    logits_grad: Array | None
    """``d loss / d logits`` in the logits' dtype and shape, if it was asked for."""
    saved: SavedRows
    """Row statistics for a later backward pass."""
    row_scale: Array
    """``d loss / d c_row`` per row, shape ``[N]``: ``w / den`` (``w`` for ``"none"``)."""


def compute_dtype(logits: Array, target_probs: Array, *, xp: Namespace) -> Any:
    """Return float64 when either input is float64, else float32."""
    if xp.float64 in (logits.dtype, target_probs.dtype):
        return xp.float64
    return xp.float32


def row_statistics(z: Array, p: Array, *, xp: Namespace) -> RowStatistics:
    """Reduce a ``[n, V]`` block of logits and targets to its :class:`RowStatistics`."""
    row_max = xp.max(z, axis=-1, keepdims=True)
    # A row with no finite maximum (all -inf, or padding holding inf/NaN) is shifted by 0, so
    # that z - row_max does not turn every entry of the row into NaN.
    row_max = xp.where(xp.isfinite(row_max), row_max, 0.0)
    shifted = z - row_max
    sum_exp = xp.sum(xp.exp(shifted), axis=-1)
    target_sum = xp.sum(p, axis=-1)
    # 0 * -inf is NaN; a target of exactly 0 must contribute exactly 0.
    target_dot = xp.sum(xp.where(p == 0, 0.0, p * shifted), axis=-1)
    return RowStatistics(row_max[..., 0], sum_exp, target_sum, target_dot)


def row_losses(stats: RowStatistics, *, xp: Namespace) -> Array:
    """Return ``c = -sum_v p_v log_softmax(z)_v`` per row.

    A row whose targets are all 0 costs exactly 0, even when its logits are all -inf (where
    ``log(sum_exp)`` is -inf).
    """
    normalizer = xp.where(stats.target_sum == 0, 0.0, stats.target_sum * xp.log(stats.sum_exp))
    return normalizer - stats.target_dot


def log_softmax_rows(z: Array, row_max: Array, log_sum_exp: Array) -> Array:
    """Return ``log_softmax(z)`` of a ``[n, V]`` block from its row statistics."""
    return (z - row_max[:, None]) - log_sum_exp[:, None]


def logits_gradient_rows(
    z: Array,
    p: Array,
    row_max: Array,
    log_sum_exp: Array,
    target_sum: Array,
    row_scale: Array,
    *,
    xp: Namespace,
) -> Array:
    """Return ``row_scale * (sum(p) * softmax(z) - p)`` for a ``[n, V]`` block.

    Rows whose ``row_scale`` is 0 are exactly 0, whatever ``z`` and ``p`` hold there, and so
    are rows whose targets are all 0, even where their softmax is undefined (logits all -inf).
    """
    scale = row_scale[:, None]
    grad = (scale * target_sum[:, None]) * xp.exp(log_softmax_rows(z, row_max, log_sum_exp))
    grad = grad - scale * p
    return xp.where(rows_with_gradient(row_scale, target_sum)[:, None], grad, 0.0)


def rows_with_gradient(row_scale: Array, target_sum: Array) -> Array:
    """Whether a row's logits gradient can be nonzero: a nonzero scale and some target mass."""
    return (row_scale != 0) & (target_sum != 0)


def targets_gradient_rows(
    z: Array, row_max: Array, log_sum_exp: Array, row_scale: Array, *, xp: Namespace
) -> Array:
    """Return ``-row_scale * log_softmax(z)`` for a ``[n, V]`` block; 0 where ``row_scale`` is."""
    scale = row_scale[:, None]
    return xp.where(scale != 0, -scale * log_softmax_rows(z, row_max, log_sum_exp), 0.0)


def row_blocks(n_rows: int, block_rows: int | None) -> Iterator[slice]:
    """Yield slices covering ``range(n_rows)`` in blocks of ``block_rows`` (all at once if None)."""
    step = n_rows if block_rows is None else block_rows
    for start in range(0, n_rows, max(step, 1)):
        yield slice(start, min(start + step, n_rows))


def default_block_rows(vocab_size: int) -> int:
    """Rows per block on eager backends, for a vocabulary of ``vocab_size``."""
    return max(1, BLOCK_ELEMENTS // vocab_size)


def inverse_denominator(
    weights: Array, reduction: str, num_valid: Array | float | None, *, xp: Namespace
) -> Array:
    """Return ``1 / den`` for the reduction, as a 0-d array; 0 when ``num_valid`` is 0.

    ``weights`` are the per-row mask values, already in the computation dtype.
    """
    dtype = weights.dtype
    device = _device(weights)
    if reduction != "mean":
        return xp.asarray(1.0, dtype=dtype, device=device)
    if num_valid is None:
        total = xp.sum(weights)
        # maximum, not clip: array-api-compat's CuPy clip indexes with a mask (a host sync).
        return 1.0 / xp.maximum(total, xp.ones_like(total))
    count = xp.asarray(num_valid, dtype=dtype, device=device)
    safe = xp.where(count == 0, 1.0, count)
    return xp.where(count == 0, 0.0, 1.0 / safe)


class Rows(NamedTuple):
    """The inputs as rows, with what every implementation derives from them before the pass."""

    z: Array
    """The logits as ``[N, V]``, in their own dtype."""
    p: Array
    """The targets as ``[N, V]``, in their own dtype."""
    weights: Array
    """The mask as ``[N]`` weights, in the computation dtype."""
    inv_den: Array
    """``1 / den`` as a 0-d array (see :func:`inverse_denominator`)."""
    dtype: Any
    """The computation dtype (see :func:`compute_dtype`)."""

    @property
    def row_scale(self) -> Array:
        """``d loss / d c_row`` for a unit upstream gradient: ``w / den``."""
        return self.weights * self.inv_den


def as_rows(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    *,
    reduction: str,
    num_valid: Array | float | None,
    xp: Namespace,
) -> Rows:
    """Reshape validated inputs to rows and compute their weights and denominator."""
    dtype = compute_dtype(logits, target_probs, xp=xp)
    vocab_size = logits.shape[-1]
    n_rows = math.prod(logits.shape[:-1])
    weights = xp.astype(xp.reshape(position_mask, (n_rows,)), dtype)
    return Rows(
        xp.reshape(logits, (n_rows, vocab_size)),
        xp.reshape(target_probs, (n_rows, vocab_size)),
        weights,
        inverse_denominator(weights, reduction, num_valid, xp=xp),
        dtype,
    )


def reduce_loss(
    weighted: Array, rows: Rows, *, reduction: str, batch_shape: tuple[int, ...], xp: Namespace
) -> Array:
    """Reduce the weighted per-row losses ``w * c`` (``[N]``) to the loss."""
    if reduction == "none":
        return xp.reshape(weighted, batch_shape)
    total = xp.asarray(xp.sum(weighted))  # NumPy reductions return scalars
    if reduction == "sum":
        return total
    return xp.where(rows.inv_den == 0, 0.0, total * rows.inv_den)


def forward(
    logits: Array,
    target_probs: Array,
    position_mask: Array,
    *,
    reduction: str,
    num_valid: Array | float | None,
    with_logits_grad: bool,
    block_rows: int | None,
    xp: Namespace,
) -> ForwardResult:
    """Compute the loss, and optionally ``d loss / d logits``, in one pass over row blocks.

    Parameters
    ----------
    logits, target_probs, position_mask
        Validated inputs: ``[..., V]``, ``[..., V]`` and ``[...]`` or ``[..., 1]``.
    reduction
        ``"mean"``, ``"sum"`` or ``"none"``.
    num_valid
        Replacement denominator of ``"mean"``, or None.
    with_logits_grad
        Whether to compute the logits gradient (scaled for a unit upstream gradient).
    block_rows
        Rows per block, or None to process every row at once (for traced backends).
    xp
        The array namespace of the inputs.
    """
    rows_in = as_rows(
        logits, target_probs, position_mask, reduction=reduction, num_valid=num_valid, xp=xp
    )
    z, p, weights, dtype = rows_in.z, rows_in.p, rows_in.weights, rows_in.dtype
    valid = weights != 0
    row_scale = rows_in.row_scale

    losses, row_maxes, log_sum_exps, target_sums, grad_blocks = [], [], [], [], []
    grad = _allocate_if_blocked(z, block_rows, with_logits_grad, xp=xp)
    for rows in row_blocks(z.shape[0], block_rows):
        z_block = xp.astype(z[rows, ...], dtype, copy=False)
        p_block = xp.astype(p[rows, ...], dtype, copy=False)
        stats = row_statistics(z_block, p_block, xp=xp)
        log_sum_exp = xp.log(stats.sum_exp)
        losses.append(xp.where(valid[rows], weights[rows] * row_losses(stats, xp=xp), 0.0))
        row_maxes.append(stats.row_max)
        log_sum_exps.append(log_sum_exp)
        target_sums.append(stats.target_sum)
        if with_logits_grad:
            block = logits_gradient_rows(
                z_block,
                p_block,
                stats.row_max,
                log_sum_exp,
                stats.target_sum,
                row_scale[rows],
                xp=xp,
            )
            block = xp.astype(block, logits.dtype, copy=False)
            if grad is None:
                grad_blocks.append(block)
            else:
                grad[rows, ...] = block

    loss = reduce_loss(
        _concat(losses, xp=xp),
        rows_in,
        reduction=reduction,
        batch_shape=logits.shape[:-1],
        xp=xp,
    )

    logits_grad = None
    if with_logits_grad:
        logits_grad = grad if grad is not None else _concat(grad_blocks, xp=xp)
        logits_grad = xp.reshape(logits_grad, logits.shape)
    saved = SavedRows(
        _concat(row_maxes, xp=xp), _concat(log_sum_exps, xp=xp), _concat(target_sums, xp=xp)
    )
    return ForwardResult(loss, logits_grad, saved, row_scale)


def logits_gradient(
    logits: Array,
    target_probs: Array,
    saved: SavedRows,
    row_scale: Array,
    *,
    block_rows: int | None,
    xp: Namespace,
) -> Array:
    """Return ``d loss / d logits`` from the row statistics ``saved`` by :func:`forward`.

    ``row_scale`` is ``d loss / d c_row`` (the forward's, times the upstream gradient). The
    result has the logits' dtype and shape.
    """
    dtype = saved.row_max.dtype
    z, p = _as_rows(logits, xp=xp), _as_rows(target_probs, xp=xp)

    def block(rows: slice) -> Array:
        z_block = xp.astype(z[rows, ...], dtype, copy=False)
        p_block = xp.astype(p[rows, ...], dtype, copy=False)
        return logits_gradient_rows(
            z_block,
            p_block,
            saved.row_max[rows],
            saved.log_sum_exp[rows],
            saved.target_sum[rows],
            row_scale[rows],
            xp=xp,
        )

    grad = _map_row_blocks(block, z, logits.dtype, block_rows, xp=xp)
    return xp.reshape(grad, logits.shape)


def targets_gradient(
    logits: Array,
    saved: SavedRows,
    row_scale: Array,
    *,
    out_dtype: Any,
    block_rows: int | None,
    xp: Namespace,
) -> Array:
    """Return ``d loss / d target_probs`` from the row statistics ``saved``, in ``out_dtype``."""
    dtype = saved.row_max.dtype
    z = _as_rows(logits, xp=xp)

    def block(rows: slice) -> Array:
        z_block = xp.astype(z[rows, ...], dtype, copy=False)
        return targets_gradient_rows(
            z_block, saved.row_max[rows], saved.log_sum_exp[rows], row_scale[rows], xp=xp
        )

    grad = _map_row_blocks(block, z, out_dtype, block_rows, xp=xp)
    return xp.reshape(grad, logits.shape)


def _as_rows(x: Array, *, xp: Namespace) -> Array:
    return xp.reshape(x, (math.prod(x.shape[:-1]), x.shape[-1]))


def _device(x: Array) -> Any:
    # None under a JAX trace, where arrays carry no concrete device.
    return array_api_compat.device(x)


def _concat(blocks: list[Array], *, xp: Namespace) -> Array:
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)


def _allocate_if_blocked(
    z: Array, block_rows: int | None, needed: bool, *, xp: Namespace, dtype: Any = None
) -> Array | None:
    """Preallocate an ``[N, V]`` output when it will be filled block by block."""
    if not needed or block_rows is None or block_rows >= z.shape[0]:
        return None
    out_dtype = z.dtype if dtype is None else dtype
    return xp.empty(z.shape, dtype=out_dtype, device=_device(z))


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
    for rows in row_blocks(z.shape[0], block_rows):
        out[rows, ...] = xp.astype(block(rows), out_dtype, copy=False)
    return out
