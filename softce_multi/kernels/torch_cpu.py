"""The torch CPU path: the core's routines as ``torch.library`` custom operators.

``softce_multi::torch_row_routine`` and ``softce_multi::torch_gradient_routine`` run the core's
two steps (:func:`softce_multi._core.row_statistics` and the gradients from the saved
statistics) for torch tensors on the CPU, and on any device where Triton does not run. The
rows are cut into blocks of about 1 MiB, worked on in place in a few block-sized buffers. In
the forward pass each block's softmax is made by PyTorch's vectorised softmax kernel where the
block's gradient goes (:func:`_block_statistics_by_softmax`), then turned into the gradient
there (:func:`_gradient_over_softmax`), so that the logits and targets are read and the
gradient written once each from memory. On the CPU the blocks go to single-threaded workers
(:func:`softce_multi.kernels.torch_cpu_blocks.run_blocks`), so that a core another process
keeps busy slows only its worker, and each worker maps the pages of its block of a fresh
gradient in one system call (:func:`softce_multi.kernels.torch_cpu_blocks.populate`). A block
runs its elementwise passes and nothing else: the per-row bookkeeping (losses, the log of the
sum, zeros in padding rows) and the checks for the rare valid rows that need the core's slower
convention (no finite maximum, a ``0 * -inf`` target term) run once on ``[N]`` vectors after
the blocks; padding rows, which may hold anything, are never computed again. Each
operator has a fake implementation (shapes and dtypes only) and a vmap rule that folds the
batch into the rows, so ``torch.compile`` sees an opaque call and ``torch.func.vmap`` works.

:func:`row_routine` and :func:`gradient_routine` are the
:class:`~softce_multi._core.RowRoutine` and :class:`~softce_multi._core.GradientRoutine` that
call them. ``softce_multi::torch_row_routine_`` and ``softce_multi::torch_gradient_routine_``
are the operators writing the logits gradient over the logits, for the chunks of the linear loss
(:func:`row_routine_over_logits`, :func:`gradient_routine_over_logits`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import cast

import array_api_compat.torch as torch_namespace
import torch
from torch import Tensor

from softce_multi import _core, kernels
from softce_multi.kernels import torch_cpu_blocks

__all__ = [
    "gradient_routine",
    "gradient_routine_over_logits",
    "row_routine",
    "row_routine_over_logits",
    "torch_gradient_routine",
    "torch_gradient_routine_",
    "torch_row_routine",
    "torch_row_routine_",
]

#: Elements per block: 1 MiB of float32. A worker's few blocks of this size stay in the cache
#: shared by the cores while they are worked on; each block costs a dozen PyTorch calls, and
#: each worker's block buffers add to the memory of one gradient (under 4% at ``[512, 32000]``).
BLOCK_ELEMENTS = 1 << 18


def row_routine(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """The :class:`~softce_multi._core.RowRoutine` of the operator :func:`torch_row_routine`."""
    return kernels.run_row_operator(torch_row_routine, rows, with_logits_grad=with_logits_grad)


def row_routine_over_logits(rows: _core.Rows, /, *, with_logits_grad: bool) -> _core.RowResults:
    """:func:`row_routine` for logits that are scratch: the gradient is written over ``rows.z``.

    With ``with_logits_grad``, it runs the operator :func:`torch_row_routine_` and the logits
    gradient it returns is ``rows.z`` itself, so that a chunk of the linear loss holds one
    ``[chunk, V]`` tensor, not two.
    """
    if not with_logits_grad:
        return row_routine(rows, with_logits_grad=False)
    return kernels.run_row_operator_over_logits(torch_row_routine_, rows)


def gradient_routine(
    rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The :class:`~softce_multi._core.GradientRoutine` of :func:`torch_gradient_routine`."""
    return kernels.run_gradient_operator(
        torch_gradient_routine, rows, logits_grad=logits_grad, targets_grad=targets_grad
    )


def gradient_routine_over_logits(
    rows: _core.BackwardRows, /, *, logits_grad: bool, targets_grad: bool
) -> tuple[Tensor | None, Tensor | None]:
    """:func:`gradient_routine` for logits that are scratch: the logits gradient is written
    over ``rows.z`` by the operator :func:`torch_gradient_routine_`, and returned as ``rows.z``.
    """
    if not logits_grad:
        return gradient_routine(rows, logits_grad=False, targets_grad=targets_grad)
    return kernels.run_gradient_operator_over_logits(
        torch_gradient_routine_, rows, targets_grad=targets_grad
    )


@torch.library.custom_op("softce_multi::torch_row_routine", mutates_args=())
def torch_row_routine(
    z: Tensor, p: Tensor, weights: Tensor, row_scale: Tensor, with_logits_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The per-row work of the forward pass, as the operator ``softce_multi::torch_row_routine``.

    The core's two steps, with the elementwise work done in place on block-sized buffers.

    Parameters
    ----------
    z, p : Tensor, shape ``[N, V]``
        Logits and targets, ``N > 0``, any floating dtypes and strides.
    weights : Tensor, shape ``[N]``
        Row weights in the computation dtype (float32 or float64).
    row_scale : Tensor, shape ``[N]``
        ``d loss / d c_row`` for a unit upstream gradient, in the computation dtype.
    with_logits_grad : bool
        Whether to compute the logits gradient.

    Returns
    -------
    tuple of Tensor
        ``w * c``, the row maximum, the log of the sum of exponentials and the target mass
        (:class:`softce_multi._core.SavedRows`), each ``[N]`` in the computation dtype and 0 in
        rows of weight 0; and ``row_scale * (sum(p) * softmax(z) - p)`` as ``[N, V]`` in the
        logits' dtype (exactly 0 in rows of weight 0), or ``[0, V]`` without
        ``with_logits_grad``.
    """
    losses, row_max, log_sum_exp, target_sum, grad = kernels.empty_row_outputs(
        z, weights, with_logits_grad=with_logits_grad
    )
    outputs = (losses, row_max, log_sum_exp, target_sum)
    _row_work(z, p, weights, row_scale, outputs, grad if with_logits_grad else None)
    return losses, row_max, log_sum_exp, target_sum, grad


@torch.library.custom_op("softce_multi::torch_row_routine_", mutates_args=("z",))
def torch_row_routine_(
    z: Tensor, p: Tensor, weights: Tensor, row_scale: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`torch_row_routine` with the logits gradient written over ``z``.

    For a caller whose logits are scratch (the chunks of the linear loss): the gradient needs
    no ``[N, V]`` array of its own. ``z`` is read block by block before its block is written,
    so it must not overlap itself (no expanded strides). Returns the four ``[N]`` outputs of
    :func:`torch_row_routine`; ``z`` holds the fifth.
    """
    outputs = kernels.empty_row_statistics(z, weights)
    _row_work(z, p, weights, row_scale, outputs, z)
    return outputs


def _row_work(
    z: Tensor,
    p: Tensor,
    weights: Tensor,
    row_scale: Tensor,
    outputs: tuple[Tensor, Tensor, Tensor, Tensor],
    grad: Tensor | None,
) -> None:
    """Fill the four ``[N]`` ``outputs`` of :func:`torch_row_routine` and, unless ``grad`` is
    None, the ``[N, V]`` logits gradient ``grad`` (which may be ``z`` itself)."""
    xp = torch_namespace
    dtype = weights.dtype
    losses, row_max, log_sum_exp, target_sum = outputs
    # Filled block by block, then turned into the losses and the log of the sum in place.
    target_dot, sum_exp = losses, log_sum_exp
    stats = _core.RowStatistics(row_max, sum_exp, target_sum, target_dot)
    # A block's softmax is made where its gradient goes when that holds the computation dtype
    # and is contiguous; else in a buffer, then rounded into place.
    in_grad = grad is not None and grad.dtype == dtype and grad.is_contiguous()
    on_cpu = z.device.type == "cpu"
    valid = weights != 0
    # Rows are checked in their block where the block's logits are overwritten, else after all.
    check_in_block = grad is z
    fresh_grad = grad is not None and grad is not z
    # (row indices, logits) of the rows without a finite maximum, kept before they are gone.
    kept: list[tuple[Tensor, Tensor]] = []

    def work(blocks: Iterator[slice]) -> None:
        products_buf = _block_buffer(z, dtype)
        softmax_buf = None if in_grad else torch.empty_like(products_buf)
        for block in blocks:
            size = block.stop - block.start
            if fresh_grad:
                torch_cpu_blocks.populate(cast(Tensor, grad)[block])
            softmax = cast(Tensor, grad)[block] if softmax_buf is None else softmax_buf[:size]
            p_block = p[block]
            block_stats = _core.RowStatistics(*(row_output[block] for row_output in stats))
            softmax_sum = None
            if on_cpu:
                rows, softmax_sum = _block_statistics_by_softmax(
                    z[block],
                    p_block,
                    block_stats,
                    softmax=softmax,
                    products=products_buf[:size],
                    valid=valid[block] if check_in_block else None,
                )
                if rows is not None:
                    kept.append((rows[0] + block.start, rows[1]))
            else:
                _block_statistics(
                    z[block], p_block, block_stats, softmax=softmax, products=products_buf[:size]
                )
            if grad is not None:
                _gradient_over_softmax(
                    softmax, p_block, row_scale[block], target_sum[block], softmax_sum
                )
                if softmax_buf is not None:
                    grad[block] = softmax

    torch_cpu_blocks.run_blocks(work, z, _block_rows(*z.shape))
    if on_cpu:
        if not check_in_block:
            _redo_nan_dots(p, target_dot, valid, lambda rows: z[rows] - row_max[rows, None])
            rows = _rows_without_finite_maximum(row_max, valid)
            if rows is not None:
                kept.append((rows, z[rows]))
        for rows, z_rows in kept:
            _redo_rows_without_finite_maximum(rows, z_rows, p, stats, row_scale, grad)
    weighted = torch.where(valid, weights * _core.row_losses(stats, xp=xp), 0.0)
    if grad is not None:
        # Padding may hold NaN or inf, and a row with no target mass may have no softmax.
        _zero_rows(grad, ~_core.rows_with_gradient(row_scale, target_sum))
    # Rows of weight 0 (padding, which may hold anything) keep zeros, as in the kernels.
    losses.copy_(weighted)
    log_sum_exp.log_()
    for row_output in (row_max, log_sum_exp, target_sum):
        row_output.masked_fill_(~valid, 0.0)


def _block_statistics(
    z: Tensor, p: Tensor, stats: _core.RowStatistics, *, softmax: Tensor, products: Tensor
) -> None:
    """Fill the ``[n]`` ``stats`` of a block of ``[n, V]`` logits ``z`` and targets ``p``, and
    leave the block's softmax in ``softmax``; ``products`` is scratch space of the same shape.

    The core's convention, row by row with no host read: a row with no finite maximum is
    shifted by 0, and a ``p == 0`` term of the target dot is exactly 0 where the shifted logit
    is -inf (``0 * -inf`` is NaN). Used on devices other than the CPU, and on the CPU for the
    rows that :func:`_block_statistics_by_softmax` leaves to it.
    """
    row_max, sum_exp, target_sum, target_dot = stats
    row_max.copy_(torch.amax(z, dim=-1))
    row_max.nan_to_num_(0.0, 0.0, 0.0)
    shifted = torch.sub(z, row_max[:, None], out=softmax)
    torch.sum(p, dim=-1, out=target_sum)
    torch.mul(p, shifted, out=products)
    torch.sum(products.masked_fill_(p == 0, 0.0), dim=-1, out=target_dot)
    torch.sum(shifted.exp_(), dim=-1, out=sum_exp)
    softmax.mul_(sum_exp.reciprocal()[:, None])


def _block_statistics_by_softmax(
    z: Tensor,
    p: Tensor,
    stats: _core.RowStatistics,
    *,
    softmax: Tensor,
    products: Tensor,
    valid: Tensor | None,
) -> tuple[tuple[Tensor, Tensor] | None, Tensor]:
    """:func:`_block_statistics` on the CPU, by PyTorch's vectorised softmax kernel, except for
    the rare rows that need the core's slower convention.

    The softmax runs in place on ``z - row_max`` (whose maximum is 0). The kernel adds each row
    into float32 accumulators one element after another, which loses accuracy as rows grow
    (:doc:`/kernels` has the measurement); :func:`torch.sum` adds in a cascade. So the
    softmax's total ``t`` is taken again by :func:`torch.sum`: the sum of exponentials is ``t``
    over the softmax's maximum (``exp(0)`` over the kernel's sum), and the softmax left in
    ``softmax``, the kernel's, is returned with ``t``, by which :func:`_gradient_over_softmax`
    divides it.

    Rows with no finite maximum break that, and a target dot with a ``0 * -inf`` term comes out
    NaN. Given the block's ``valid`` rows (for logits that ``softmax`` overwrites), both are
    found here among them, on the host: NaN dots are summed again (:func:`_redo_nan_dots`), and
    the indices and logits of the rows with no finite maximum are returned first, for the caller
    to compute again (:func:`_redo_rows_without_finite_maximum`) after the block has overwritten
    them. With ``valid`` None the caller finds both on ``[N]`` vectors after all blocks, so that
    a block runs its few elementwise passes and nothing else, and the first value is None.
    """
    row_max, sum_exp, target_sum, target_dot = stats
    row_max.copy_(torch.amax(z, dim=-1))
    kept = None
    if valid is not None:
        rows = _rows_without_finite_maximum(row_max, valid)
        if rows is not None:
            kept = rows, z[rows]
    shifted = torch.sub(z, row_max[:, None], out=softmax)
    torch.sum(p, dim=-1, out=target_sum)
    torch.sum(torch.mul(p, shifted, out=products), dim=-1, out=target_dot)
    if valid is not None:
        _redo_nan_dots(p, target_dot, valid, lambda rows: shifted[rows])
    torch.softmax(shifted, dim=-1, out=softmax)
    softmax_sum = torch.sum(softmax, dim=-1)
    torch.amax(softmax, dim=-1, out=sum_exp).reciprocal_().mul_(softmax_sum)
    return kept, softmax_sum


def _rows_without_finite_maximum(row_max: Tensor, valid: Tensor) -> Tensor | None:
    """The indices of the ``valid`` rows whose maximum ``row_max`` is not finite, or None
    (after one check on the host) where there are none. Rows of weight 0 (padding) are not
    counted: their outputs are zeros whatever they hold."""
    wrong = valid & ~row_max.isfinite()
    if not bool(wrong.any()):
        return None
    return torch.nonzero(wrong).squeeze(1)


def _redo_rows_without_finite_maximum(
    rows: Tensor,
    z_rows: Tensor,
    p: Tensor,
    stats: _core.RowStatistics,
    row_scale: Tensor,
    grad: Tensor | None,
) -> None:
    """Compute again, by :func:`_block_statistics`, the ``stats`` and gradient rows of the
    ``rows`` whose maximum is not finite (all -inf, or holding inf or NaN), from their logits
    ``z_rows``."""
    p_rows = p[rows]
    softmax = z_rows.new_empty(z_rows.shape, dtype=stats.row_max.dtype)
    redone = _core.RowStatistics(*(torch.empty_like(row_output[rows]) for row_output in stats))
    _block_statistics(z_rows, p_rows, redone, softmax=softmax, products=torch.empty_like(softmax))
    for row_output, value in zip(stats, redone, strict=True):
        row_output[rows] = value
    if grad is not None:
        _gradient_over_softmax(softmax, p_rows, row_scale[rows], redone.target_sum)
        grad[rows] = softmax.to(grad.dtype)


def _redo_nan_dots(
    p: Tensor, target_dot: Tensor, valid: Tensor, shifted_rows: Callable[[Tensor], Tensor]
) -> None:
    """Sum again the ``valid`` rows of ``target_dot`` that came out NaN, with a ``p == 0`` term
    exactly 0 where the shifted logit (``shifted_rows(rows)``, ``z - row_max`` of those rows)
    is -inf: ``0 * -inf`` is NaN, and a NaN input keeps its row NaN. Only those rows are read
    again, so no ``where`` runs over whole blocks."""
    nan = valid & target_dot.isnan()
    if not bool(nan.any()):
        return
    rows = torch.nonzero(nan).squeeze(1)
    p_rows = p[rows]
    terms = torch.where(p_rows == 0, 0.0, p_rows * shifted_rows(rows))
    target_dot[rows] = terms.sum(dim=-1).to(target_dot.dtype)


def _gradient_over_softmax(
    softmax: Tensor,
    p: Tensor,
    row_scale: Tensor,
    target_sum: Tensor,
    softmax_sum: Tensor | None = None,
) -> None:
    """Turn the softmax of a block into its logits gradient, ``row_scale * (sum(p) * softmax -
    p)``, in place; a softmax whose rows add up to ``softmax_sum`` rather than 1 is divided by
    it (:func:`_block_statistics_by_softmax`)."""
    coefficient = row_scale * target_sum
    if softmax_sum is not None:
        coefficient = coefficient / softmax_sum
    softmax.mul_(coefficient[:, None]).addcmul_(p, row_scale[:, None], value=-1)


@torch.library.custom_op("softce_multi::torch_gradient_routine", mutates_args=())
def torch_gradient_routine(
    z: Tensor,
    p: Tensor,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    logits_grad: bool,
    targets_grad: bool,
) -> tuple[Tensor, Tensor]:
    """The per-row work of the backward pass, as ``softce_multi::torch_gradient_routine``.

    From the saved statistics, never through a rounded log-normalizer: the log-softmax is
    ``(z - row_max) - log_sum_exp`` and the softmax ``exp(z - row_max)`` times the row's
    :func:`softce_multi._core.softmax_coefficient`. Every elementwise step runs in place on one
    block-sized buffer.

    Parameters
    ----------
    z, p : Tensor, shape ``[N, V]``
        Logits and targets, ``N > 0``, any floating dtypes and strides.
    row_max, log_sum_exp, target_sum : Tensor, shape ``[N]``
        The :class:`softce_multi._core.SavedRows` of the forward pass, in the computation dtype.
    row_scale : Tensor, shape ``[N]``
        ``d loss / d c_row`` times the upstream gradient, in the computation dtype.
    logits_grad, targets_grad : bool
        Which gradients to compute.

    Returns
    -------
    tuple of Tensor
        ``row_scale * (sum(p) * softmax(z) - p)`` in the logits' dtype and
        ``-row_scale * log_softmax(z)`` in the targets' dtype, both ``[N, V]`` and exactly 0 in
        rows whose scale is 0 (the logits gradient also in rows without target mass); a
        gradient not asked for is ``[0, V]``.
    """
    grad_z, grad_p = kernels.empty_gradient_outputs(
        z, p, logits_grad=logits_grad, targets_grad=targets_grad
    )
    saved = _core.SavedRows(row_max, log_sum_exp, target_sum)
    _gradient_work(
        z,
        p,
        saved,
        row_scale,
        grad_z if logits_grad else None,
        grad_p if targets_grad else None,
    )
    return grad_z, grad_p


@torch.library.custom_op("softce_multi::torch_gradient_routine_", mutates_args=("z",))
def torch_gradient_routine_(
    z: Tensor,
    p: Tensor,
    row_max: Tensor,
    log_sum_exp: Tensor,
    target_sum: Tensor,
    row_scale: Tensor,
    targets_grad: bool,
) -> Tensor:
    """:func:`torch_gradient_routine` with the logits gradient written over ``z``.

    For a caller whose logits are scratch (the recomputed chunks of the linear loss's backward
    pass): the gradient needs no ``[N, V]`` array of its own. ``z`` is read block by block
    before its block is written, so it must not overlap itself (no expanded strides). Returns
    the targets gradient (``[0, V]`` without ``targets_grad``); ``z`` holds the logits gradient.
    """
    grad_p = kernels.empty_gradient_outputs(z, p, logits_grad=False, targets_grad=targets_grad)[1]
    saved = _core.SavedRows(row_max, log_sum_exp, target_sum)
    _gradient_work(z, p, saved, row_scale, z, grad_p if targets_grad else None)
    return grad_p


def _gradient_work(
    z: Tensor,
    p: Tensor,
    saved: _core.SavedRows,
    row_scale: Tensor,
    grad_z: Tensor | None,
    grad_p: Tensor | None,
) -> None:
    """Fill the ``[N, V]`` gradients of :func:`torch_gradient_routine` that are not None;
    ``grad_z`` may be ``z`` itself."""
    row_max, log_sum_exp, target_sum = saved
    dtype = row_max.dtype
    xp = torch_namespace
    coefficient = _core.softmax_coefficient(row_scale, target_sum, log_sum_exp, xp=xp)
    fresh_outputs = [grad for grad in (grad_z, grad_p) if grad is not None and grad is not z]

    def work(blocks: Iterator[slice]) -> None:
        shifted_buf = _block_buffer(z, dtype)
        # A targets gradient of another dtype is computed here, then rounded into place.
        cast_buf = None
        if grad_p is not None and grad_p.dtype != dtype:
            cast_buf = torch.empty_like(shifted_buf)
        for block in blocks:
            for fresh in fresh_outputs:
                torch_cpu_blocks.populate(fresh[block])
            size = block.stop - block.start
            shifted = shifted_buf[:size]
            scale = row_scale[block, None]
            torch.sub(z[block], row_max[block, None], out=shifted)
            if grad_p is not None:
                # -scale * log_softmax = scale * (log_sum_exp - (z - row_max))
                out = grad_p[block] if cast_buf is None else cast_buf[:size]
                torch.sub(log_sum_exp[block, None], shifted, out=out).mul_(scale)
                if cast_buf is not None:
                    grad_p[block] = out
            if grad_z is not None:
                exponentials = shifted.exp_()
                out = grad_z[block] if grad_z.dtype == dtype else exponentials
                torch.mul(exponentials, coefficient[block, None], out=out)
                out.addcmul_(p[block], scale, value=-1)
                if out is exponentials:
                    grad_z[block] = exponentials

    torch_cpu_blocks.run_blocks(work, z, _block_rows(*z.shape))
    # Padding may hold NaN or inf, and a row with no target mass may have no softmax.
    if grad_p is not None:
        _zero_rows(grad_p, row_scale == 0)
    if grad_z is not None:
        _zero_rows(grad_z, ~_core.rows_with_gradient(row_scale, target_sum))


kernels.register_operator_rules(
    torch_row_routine, torch_gradient_routine, torch_row_routine_, torch_gradient_routine_
)


def _block_buffer(z: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised buffer of one block of the ``[N, V]`` logits ``z``, in ``dtype``."""
    n_rows, vocab_size = z.shape
    return torch.empty((_block_rows(n_rows, vocab_size), vocab_size), dtype=dtype, device=z.device)


def _block_rows(n_rows: int, vocab_size: int) -> int:
    return max(1, min(BLOCK_ELEMENTS // vocab_size, n_rows))


def _zero_rows(block: Tensor, rows: Tensor) -> None:
    """Set the rows of ``block`` where the bool vector ``rows`` is true to 0, in place.

    On the CPU only those rows are written, not the whole block as a broadcast ``masked_fill_``
    or ``where`` would. The row indices are read on the host, which costs no wait there and is
    invisible to tracing (this runs inside an opaque operator); on other devices reading them
    would wait for the device, so they take the broadcast fill.
    """
    if block.device.type == "cpu":
        block.index_fill_(0, torch.nonzero(rows).squeeze(1), 0.0)
    else:
        block.masked_fill_(rows[:, None], 0.0)
