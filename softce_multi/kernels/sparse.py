"""The routines of sparse (top-k) targets, in any array-API library.

With sparse targets a row holds ``K`` ids and their probabilities, ``ids[n, k]`` and
``p[n, k]``, and the loss is the dense loss of the targets made by adding each ``p[n, k]`` at
``ids[n, k]`` into a row of zeros. That dense row never exists here:

* the row statistics (:class:`~softce_multi._core.RowStatistics`) take ``sum_k p[n, k]`` and
  ``sum_k p[n, k] * (z[n, ids[n, k]] - row_max)``, a gather of ``K`` logits per row;
* the logits gradient ``row_scale * (sum(p) * softmax(z) - scatter(p))`` is the softmax term,
  made from the exponentials of the statistics pass, with ``-row_scale * p`` added at the ids
  (:func:`scatter_add`, where duplicates add up);
* the targets gradient is the dense one, ``-row_scale * log_softmax(z)``, gathered at the ids.

A slot with ``p == 0`` adds exactly 0 wherever its id points, ``-1`` padding included; an id
outside ``[0, V)`` with a nonzero probability makes its row's loss NaN (its gathered logit is
NaN), and so its logits gradient and its targets gradient at that slot. Nothing reads a value
on the host.

:func:`sparse_row_routine` and :func:`sparse_gradient_routine` are the
:class:`~softce_multi._core.RowRoutine` and :class:`~softce_multi._core.GradientRoutine` of
sparse targets for every engine. Each block of rows is read once: its exponentials serve the
sum and the gradient. The only operation that depends on the library is the scatter
(:func:`scatter_add`); the array API has none that adds up duplicates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import array_api_extra as xpx

from softce_multi import _compat, _core
from softce_multi._types import Array, Namespace

__all__ = [
    "BlockRunner",
    "gather_shifted",
    "scatter_add",
    "sparse_gradient_routine",
    "sparse_row_routine",
]


#: ``run(work, z, block_rows)`` runs ``work(blocks)`` over the blocks of ``block_rows`` rows of
#: the ``[N, V]`` logits ``z``, each block once (in order, or shared among worker threads).
BlockRunner = Callable[[Callable[[Iterator[slice]], None], Array, int], None]


def gather_shifted(shifted: Array, ids: Array, *, xp: Namespace) -> Array:
    """``shifted[n, ids[n, k]]`` for a ``[n, V]`` block; NaN where an id is outside ``[0, V)``."""
    valid = _valid_ids(ids, shifted.shape[-1], xp=xp)
    picked = xp.take_along_axis(shifted, _safe_ids(ids, valid, xp=xp), axis=-1)
    return xp.where(valid, picked, math.nan)


def scatter_add(block: Array, ids: Array, values: Array, *, xp: Namespace) -> Array:
    """``block`` with ``values[n, k]`` added at ``block[n, ids[n, k]]``; duplicate ids add up.

    ``ids`` must lie in ``[0, V)`` (int64 for torch). NumPy, torch and CuPy blocks are updated
    in place (and returned); JAX and other libraries get a new array.
    """
    if _compat.is_torch_array(block):
        return block.scatter_add_(1, ids, values)
    if _compat.is_jax_array(block):
        rows = xp.arange(block.shape[0])[:, None]
        return block.at[rows, ids].add(values)
    if _compat.is_numpy_array(block) or _compat.is_cupy_array(block):
        rows = xp.arange(block.shape[0])[:, None]
        add_at = _add_at(block)
        add_at(block, (rows, ids), values)
        return block
    # No scatter in the array API: one comparison with the vocabulary per slot.
    vocabulary = xp.arange(block.shape[1], dtype=ids.dtype, device=_compat.device(ids))
    for slot in range(ids.shape[1]):
        hit = vocabulary[None, :] == ids[:, slot : slot + 1]
        block = block + xp.where(hit, values[:, slot : slot + 1], 0.0)
    return block


def sparse_row_routine(
    block_rows: int | None, *, xp: Namespace, over_logits: bool = False
) -> _core.RowRoutine:
    """The :class:`~softce_multi._core.RowRoutine` of sparse targets, over blocks of
    ``block_rows`` rows (all at once if None, for traced backends).

    With ``over_logits`` the logits gradient is written over ``rows.z`` (scratch logits of a
    chunk of the linear loss) and ``rows.z`` is returned as the gradient.
    """

    def routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
        assert rows.ids is not None  # the adapters choose this routine for sparse targets
        return sparse_row_pass(
            rows.z,
            rows.ids,
            rows.p,
            rows.weights,
            _core.row_scale(rows),
            with_logits_grad=with_logits_grad,
            block_rows=block_rows,
            over_logits=over_logits,
            xp=xp,
        )

    return routine


def sparse_row_pass(
    z: Array,
    ids: Array,
    p: Array,
    weights: Array,
    row_scale: Array,
    *,
    with_logits_grad: bool,
    block_rows: int | None,
    over_logits: bool,
    xp: Namespace,
    run_blocks: BlockRunner | None = None,
    populate: Callable[[Array], None] | None = None,
) -> _core.RowResults:
    """The work of :func:`sparse_row_routine` on ``[N, V]`` logits ``z``, ``[N, K]`` ``ids``
    and ``p``, and the ``[N]`` ``weights`` and ``row_scale`` (``w / den``) of the rows.

    For a library that writes in place, ``run_blocks`` runs the block loop (in order by
    default) and ``populate``, when given, is called on each block's rows of a fresh gradient
    before they are written (the torch CPU operators pass theirs,
    :mod:`softce_multi.kernels.torch_cpu_blocks`).
    """
    if _writes_in_place(z):
        return _eager_row_pass(
            z,
            ids,
            p,
            weights,
            row_scale,
            with_logits_grad=with_logits_grad,
            block_rows=block_rows,
            over_logits=over_logits,
            xp=xp,
            run_blocks=run_blocks or _in_order,
            populate=populate,
        )
    dtype = weights.dtype
    valid = weights != 0
    parts: dict[str, list[Array]] = {name: [] for name in _ROW_OUTPUTS}
    grad = None
    if with_logits_grad:
        grad = z if over_logits else _allocate_if_blocked(z, block_rows, xp=xp)
    for block in _core.row_blocks(z.shape[0], block_rows):
        z_block = xp.astype(z[block, ...], dtype, copy=False)
        p_block = xp.astype(p[block, ...], dtype, copy=False)
        ids_block = ids[block, ...]
        row_max = _shift(z_block, xp=xp)
        picked = gather_shifted(z_block, ids_block, xp=xp) - row_max
        exps = xp.exp(z_block - row_max)
        stats = _core.RowStatistics(
            row_max[:, 0],
            xp.sum(exps, axis=-1),
            xp.sum(p_block, axis=-1),
            xp.sum(xp.where(p_block == 0, 0.0, p_block * picked), axis=-1),
        )
        log_sum_exp = xp.log(stats.sum_exp)
        weighted = weights[block] * _core.row_losses(stats, xp=xp)
        parts["weighted"].append(xp.where(valid[block], weighted, 0.0))
        parts["row_max"].append(xp.where(valid[block], stats.row_max, 0.0))
        parts["log_sum_exp"].append(xp.where(valid[block], log_sum_exp, 0.0))
        parts["target_sum"].append(xp.where(valid[block], stats.target_sum, 0.0))
        if with_logits_grad:
            grad_block = _logits_gradient(
                exps,
                ids_block,
                p_block,
                log_sum_exp,
                stats.target_sum,
                row_scale[block],
                xp=xp,
            )
            grad_block = xp.astype(grad_block, z.dtype, copy=False)
            if grad is None:
                parts["grad"].append(grad_block)
            else:
                grad = _put_rows(grad, block, grad_block, xp=xp)
    if with_logits_grad and grad is None:
        grad = _concat(parts["grad"], xp=xp)
    saved = _core.SavedRows(
        *(_concat(parts[name], xp=xp) for name in ("row_max", "log_sum_exp", "target_sum"))
    )
    return _core.RowResults(_concat(parts["weighted"], xp=xp), saved, grad)


def _eager_row_pass(
    z: Array,
    ids: Array,
    p: Array,
    weights: Array,
    row_scale: Array,
    *,
    with_logits_grad: bool,
    block_rows: int | None,
    over_logits: bool,
    xp: Namespace,
    run_blocks: BlockRunner,
    populate: Callable[[Array], None] | None,
) -> _core.RowResults:
    """:func:`sparse_row_pass` for a library that writes in place (NumPy, torch, CuPy).

    What concerns the ``K`` slots is done once for all rows, on ``[N, K]`` arrays, before the
    blocks (the gather, which must precede any write over ``z``) and after them (the target
    terms of the loss). Each block is read once, for its maximum and its exponentials, which go
    where its gradient rows go (or into a buffer each ``run_blocks`` worker reuses when the
    gradient has another dtype), are summed, scaled and get the target mass scattered in,
    before their one rounding to the gradient's dtype. Rows without a gradient are zeroed at
    the end.
    """
    dtype = weights.dtype
    n_rows, vocab_size = z.shape
    device = _compat.device(z)
    valid = weights != 0
    probs = xp.astype(p, dtype, copy=False)
    valid_ids = _valid_ids(ids, vocab_size, xp=xp)
    safe_ids = _safe_ids(ids, valid_ids, xp=xp)
    picked = xp.astype(xp.take_along_axis(z, safe_ids, axis=-1), dtype, copy=False)
    target_sum = xp.sum(probs, axis=-1)
    row_max = xp.empty((n_rows,), dtype=dtype, device=device)
    sum_exp = xp.empty((n_rows,), dtype=dtype, device=device)
    grad = None
    if with_logits_grad:
        grad = z if over_logits else xp.empty(z.shape, dtype=z.dtype, device=device)
        # A slot of probability 0 adds 0 wherever it points; one with mass and a bad id adds NaN.
        mass = xp.where(probs == 0, 0.0, xp.where(valid_ids, probs, math.nan))
        scattered = -row_scale[:, None] * mass
    # A gradient of its own is fresh memory, whose pages ``populate`` maps block by block.
    fresh_grad = None if over_logits else grad

    def work(blocks: Iterator[slice]) -> None:
        scratch = _Scratch(z, dtype, block_rows, xp=xp)
        for block in blocks:
            if fresh_grad is not None and populate is not None:
                populate(fresh_grad[block, ...])
            z_block = xp.astype(z[block, ...], dtype, copy=False)
            shift = _shift(z_block, xp=xp)
            exps = _exp_shifted(z_block, shift, scratch.rows(block, grad), xp=xp)
            row_max[block] = shift[:, 0]
            sum_exp[block] = xp.sum(exps, axis=-1)
            if grad is not None:
                scale = row_scale[block]
                coefficient = _core.softmax_coefficient(
                    scale, target_sum[block], xp.log(sum_exp[block]), xp=xp
                )
                exps = _scaled(exps, coefficient[:, None], xp=xp)
                exps = scatter_add(exps, safe_ids[block, ...], scattered[block, ...], xp=xp)
                if exps.dtype != grad.dtype:
                    grad[block, ...] = xp.astype(exps, grad.dtype)

    run_blocks(work, z, block_rows or n_rows)
    stats = _core.RowStatistics(
        row_max,
        sum_exp,
        target_sum,
        xp.sum(
            xp.where(
                probs == 0, 0.0, probs * (xp.where(valid_ids, picked, math.nan) - row_max[:, None])
            ),
            axis=-1,
        ),
    )
    log_sum_exp = xp.log(sum_exp)
    weighted = xp.where(valid, weights * _core.row_losses(stats, xp=xp), 0.0)
    if grad is not None:
        grad = _zero_rows_without_gradient(grad, _core.rows_with_gradient(row_scale, target_sum))
    saved = _core.SavedRows(*(xp.where(valid, x, 0.0) for x in (row_max, log_sum_exp, target_sum)))
    return _core.RowResults(weighted, saved, grad)


def _in_order(work: Callable[[Iterator[slice]], None], z: Array, block_rows: int) -> None:
    """The default :data:`BlockRunner`: every block in order, on the caller's thread."""
    work(iter(_core.row_blocks(z.shape[0], block_rows)))


def _shift(z: Array, *, xp: Namespace) -> Array:
    """The ``[n, 1]`` row maxima of a block, 0 where not finite (the core's convention)."""
    row_max = xp.max(z, axis=-1, keepdims=True)
    return xp.where(xp.isfinite(row_max), row_max, 0.0)


class _Scratch:
    """Where an eager block's exponentials go: the block's rows of the gradient when it has
    the computation dtype (they become the gradient in place), else one block-sized buffer
    reused by every block."""

    def __init__(self, z: Array, dtype: Any, block_rows: int | None, *, xp: Namespace) -> None:
        self._dtype = dtype
        self._buffer: Array | None = None
        self._shape = (min(block_rows or z.shape[0], z.shape[0]), z.shape[1])
        self._device = _compat.device(z)
        self._xp = xp

    def rows(self, block: slice, grad: Array | None) -> Array:
        if grad is not None and grad.dtype == self._dtype:
            return grad[block, ...]
        if self._buffer is None:
            self._buffer = self._xp.empty(self._shape, dtype=self._dtype, device=self._device)
        return self._buffer[: block.stop - block.start, ...]


def _exp_shifted(z: Array, row_max: Array, into: Array, *, xp: Namespace) -> Array:
    """``exp(z - row_max)``, written into ``into`` (an eager library's buffer)."""
    if _compat.is_torch_array(into):
        import torch

        torch.sub(z, row_max, out=into)
        return into.exp_()
    xp.subtract(z, row_max, out=into)
    return xp.exp(into, out=into)


def _writes_in_place(x: Array) -> bool:
    """Whether ``x``'s library writes into existing arrays (NumPy, torch, CuPy)."""
    return _compat.is_torch_array(x) or _compat.is_numpy_array(x) or _compat.is_cupy_array(x)


def sparse_gradient_routine(
    block_rows: int | None, *, xp: Namespace, over_logits: bool = False
) -> _core.GradientRoutine:
    """The :class:`~softce_multi._core.GradientRoutine` of sparse targets, over blocks of
    ``block_rows`` rows; ``over_logits`` is as in :func:`sparse_row_routine`.

    The targets gradient is ``[N, K]``, in the dtype of ``rows.p``: ``-row_scale *
    log_softmax(z)`` at each id, 0 at a slot whose id is outside ``[0, V)`` and whose
    probability is 0, NaN at one whose probability is not.
    """

    def routine(
        rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool
    ) -> tuple[Array | None, Array | None]:
        z, p, saved, row_scale, ids = rows
        assert ids is not None  # the adapters choose this routine for sparse targets
        dtype = saved.row_max.dtype
        grad_z = None
        if logits_grad:
            grad_z = z if over_logits else _allocate_if_blocked(z, block_rows, xp=xp)
        z_blocks, p_blocks = [], []
        for block in _core.row_blocks(z.shape[0], block_rows):
            z_block = xp.astype(z[block, ...], dtype, copy=False)
            p_block = xp.astype(p[block, ...], dtype, copy=False)
            ids_block = ids[block, ...]
            row_max, log_sum_exp = saved.row_max[block], saved.log_sum_exp[block]
            scale = row_scale[block]
            if targets_grad:
                picked = gather_shifted(z_block, ids_block, xp=xp) - row_max[:, None]
                log_softmax = picked - log_sum_exp[:, None]
                unused = (p_block == 0) & ~_valid_ids(ids_block, z.shape[1], xp=xp)
                grad_p = xp.where(
                    (scale[:, None] == 0) | unused, 0.0, -scale[:, None] * log_softmax
                )
                p_blocks.append(xp.astype(grad_p, p.dtype, copy=False))
            if logits_grad:
                exps = xp.exp(z_block - row_max[:, None])
                grad_block = _logits_gradient(
                    exps,
                    ids_block,
                    p_block,
                    log_sum_exp,
                    saved.target_sum[block],
                    scale,
                    xp=xp,
                )
                grad_block = xp.astype(grad_block, z.dtype, copy=False)
                if grad_z is None:
                    z_blocks.append(grad_block)
                else:
                    grad_z = _put_rows(grad_z, block, grad_block, xp=xp)
        if logits_grad and grad_z is None:
            grad_z = _concat(z_blocks, xp=xp)
        return grad_z, (_concat(p_blocks, xp=xp) if targets_grad else None)

    return routine


#: What :func:`sparse_row_routine` collects per block.
_ROW_OUTPUTS = ("weighted", "row_max", "log_sum_exp", "target_sum", "grad")


def _logits_gradient(
    exps: Array,
    ids: Array,
    p: Array,
    log_sum_exp: Array,
    target_sum: Array,
    row_scale: Array,
    *,
    xp: Namespace,
) -> Array:
    """``row_scale * (sum(p) * softmax(z) - scatter(p))`` of a block, from its ``exps``
    (``exp(z - row_max)``, which it may overwrite); 0 in rows without a gradient
    (:func:`softce_multi._core.rows_with_gradient`), whatever they hold."""
    coefficient = _core.softmax_coefficient(row_scale, target_sum, log_sum_exp, xp=xp)
    grad = _scaled(exps, coefficient[:, None], xp=xp)
    valid = _valid_ids(ids, exps.shape[-1], xp=xp)
    # A slot of probability 0 adds 0 wherever it points; one with mass and a bad id adds NaN.
    mass = xp.where(p == 0, 0.0, xp.where(valid, p, math.nan))
    grad = scatter_add(grad, _safe_ids(ids, valid, xp=xp), -row_scale[:, None] * mass, xp=xp)
    live = _core.rows_with_gradient(row_scale, target_sum)
    if _writes_in_place(grad):
        return _zero_rows_without_gradient(grad, live)
    return xp.where(live[:, None], grad, 0.0)


def _zero_rows_without_gradient(grad: Array, live: Array) -> Array:
    """``grad`` (of a library that writes in place) with its rows that are not ``live`` set to
    exactly 0, in place; on the CPU only those rows are written."""
    if _compat.is_torch_array(grad):
        if grad.device.type != "cpu":  # no host read on a device
            return grad.masked_fill_(~live[:, None], 0.0)
        return grad.index_fill_(0, (~live).nonzero()[:, 0], 0.0)
    grad[~live, ...] = 0.0
    return grad


def _scaled(block: Array, factor: Array, *, xp: Namespace) -> Array:
    """``block * factor``, in place where the library writes in place."""
    if _compat.is_torch_array(block):
        return block.mul_(factor)
    if _compat.is_numpy_array(block) or _compat.is_cupy_array(block):
        block *= factor
        return block
    return block * factor


def _valid_ids(ids: Array, vocab_size: int, *, xp: Namespace) -> Array:
    """Whether each id lies in ``[0, V)``. A ``V`` beyond the ids' dtype (int8 ids of a
    200-entry vocabulary) bounds no id of it, and is not compared: it would wrap, or be refused.
    """
    if vocab_size > xp.iinfo(ids.dtype).max:
        return ids >= 0
    return (ids >= 0) & (ids < vocab_size)


def _safe_ids(ids: Array, valid: Array, *, xp: Namespace) -> Array:
    """The ids with those outside the vocabulary replaced by 0, safe to index with: in the
    default index dtype (int64 for torch, whose gathers and scatters take no other), where a
    narrower one cannot count to ``V`` (JAX normalises indices in the ids' dtype)."""
    safe = xp.where(valid, ids, 0)
    if _compat.is_torch_array(safe):
        return safe.long()
    index_dtype = xpx.default_dtype(xp, "indexing", device=_compat.device(safe))
    return xp.astype(safe, index_dtype, copy=False)


def _add_at(block: Array) -> Any:
    if _compat.is_cupy_array(block):
        import cupyx

        return cupyx.scatter_add
    import numpy as np

    return np.add.at


def _allocate_if_blocked(z: Array, block_rows: int | None, *, xp: Namespace) -> Array | None:
    """An ``[N, V]`` output to fill block by block; None when one block covers every row."""
    if block_rows is None or block_rows >= z.shape[0]:
        return None
    return xp.empty(z.shape, dtype=z.dtype, device=_compat.device(z))


def _put_rows(out: Array, block: slice, rows: Array, *, xp: Namespace) -> Array:
    """``out`` with ``rows`` written at ``block``, in place (``out`` comes from an eager
    library: a block loop runs only there)."""
    out[block, ...] = rows
    return out


def _concat(blocks: list[Array], *, xp: Namespace) -> Array:
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)
